"""kill -9 at random moments during `brainvq train-vqvae` and `train-prior` (real processes), then --resume.

The driver is benchmarks/fault_injection.py, which runs the same thing with 50 kills (benchmarks/RESULTS.md);
here it makes 5 kills per job, at moments drawn from a seeded RNG, on an 8/4/4-slice copy of the tiny cohort.
"""

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

from brainvq.cli import main

ROOT = Path(__file__).resolve().parents[1]
KILLS = 5


def load_driver():
    spec = importlib.util.spec_from_file_location("fault_injection", ROOT / "benchmarks" / "fault_injection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


driver = load_driver()


@pytest.fixture(scope="module")
def workspace(tiny_cohort, tmp_path_factory):
    """(data folder, environment of the training processes: a private slice cache, root folder)."""
    root = tmp_path_factory.mktemp("faults")
    data = driver.small_cohort(tiny_cohort, root / "data")
    environment = os.environ | {"BRAINVQ_CACHE_DIR": str(root / "cache")}
    return data, environment, root


@pytest.fixture(scope="module")
def campaigns(workspace):
    """5 kills of a VQ-VAE run, then 5 kills of a prior trained on it; each resumed, then run to the end."""
    data, environment, root = workspace
    rng = random.Random(20251125)
    run = root / "run"
    results = {}
    for job in (driver.vqvae_job(data, run, epochs=KILLS + 2), driver.prior_job(run, epochs=KILLS + 3)):
        results[job.name] = driver.campaign(job, KILLS, rng, root / "logs" / job.name, environment,
                                            after_first_checkpoint=True)
    return results


@pytest.mark.parametrize("job", ["train-vqvae", "train-prior"])
def test_kill_9_at_random_moments_then_resume_loses_no_finished_epoch(campaigns, job):
    result = campaigns[job]
    records = result["records"]
    assert len(records) == KILLS and not result["failures"], result["failures"]
    for record in records:
        context = f"kill {record['kill']}: {record}"
        assert not record["corrupt"], context
        assert record["checkpoints_loaded"] >= 1, context  # after the first checkpoint: last.safetensors at least
        assert record["problems"] == [], context
        assert record["epochs_lost"] == 0, context
        assert record["resume_failed"] is None, context
        # The next process picks up right after the checkpoint (0: it was killed before finishing an epoch).
        assert record["resumed_at"] in (0, record["checkpoint_epoch"] + 1), context
        assert driver.survived(record), context
    every_epoch = list(range(1, result["epochs"] + 1))
    assert result["final_metrics_epochs"] == every_epoch
    assert result["final_history_epochs"] == every_epoch
    assert not result["final_corrupt"]
    # Training removes the temporary files of brainvq's atomic writes that kills cut short.
    assert result["final_temporaries"] == []
    # The last process trained exactly the epochs after the last checkpoint, each once.
    assert result["final_announced"] == list(range(records[-1]["checkpoint_epoch"] + 1, result["epochs"] + 1))


def test_a_run_killed_while_writing_its_first_checkpoint_is_resumed_from_the_start(workspace, tmp_path):
    data, environment, _ = workspace
    job = driver.vqvae_job(data, tmp_path / "run", epochs=2)
    killed = driver.run_segment(job, False, driver.Moment("write", nth_write=1, target="best.safetensors"),
                                tmp_path / "killed.log", environment)
    if not (killed.killed and (job.folder / driver.CONFIG).exists() and not (job.folder / driver.LAST).exists()
            and driver.inspect(job).temporaries):
        pytest.fail(f"the kill did not land in the first checkpoint write: {killed}")

    assert main([*job.arguments(resume=True), "--quiet"]) == 0  # what the README says to do after a kill
    found = driver.inspect(job)
    assert found.metrics_epochs == found.history_epochs == [1, 2]
    assert found.temporaries == []
