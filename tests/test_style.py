import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed with the [test] extra")
def test_ruff_finds_nothing():
    command = ["ruff", "check", "--no-cache", "src", "tests", "benchmarks"]  # a stale cache can hide findings
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_run_folder_names_are_defined_in_run_py_alone():
    """The run folder's layout belongs to run.py: no other module spells a file name of the run folder."""
    from brainvq import run

    names = [value.split("/")[-1] for key, value in vars(run).items()
             if key.isupper() and isinstance(value, str) and "." in value]
    assert {"config.json", "metrics.jsonl", "best.safetensors", "eval_samples.json", "report.html"} <= set(names)
    for path in (ROOT / "src" / "brainvq").rglob("*.py"):
        if path.name != "run.py":
            text = path.read_text()
            assert not [name for name in names if f'"{name}"' in text or f"/{name}\"" in text], path


def test_the_cli_offers_the_checkpoints_a_run_holds():
    from brainvq import cli, run

    assert tuple(run.CHECKPOINTS) == cli.CHECKPOINT_CHOICES
