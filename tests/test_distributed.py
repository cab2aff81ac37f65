"""Data-parallel training (DDP through torchrun, gloo on CPU) trains the same model one process would."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from brainvq import api
from brainvq.checkpoint import load_checkpoint
from brainvq.cli import main
from brainvq.config import TrainConfig, VQVAEConfig
from brainvq.models.quantizer import VectorQuantizer
from brainvq.run import CONFIG_FILE, LAST_CHECKPOINT

STEPS = ["--max-steps", "3", "--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--quiet",
         "--max-minutes", "0"]
TINY_PRIOR = ["--channels", "8", "--layers", "2"]
# At initialisation one code wins every vector, so the other 31 are restarted at step 2, the last step of the
# run. Not later: codes restarted on near-identical background vectors then split those vectors between them
# by float rounding, which one and two processes do differently (ema_count 2% apart one step on).
# Squared error only: with the SSIM term one and two processes left 2 of 131,072 decoder weights 1.1e-4 and
# 1.4e-4 apart while their Adam moments agreed to 0.2% (measured), an update of about the learning rate's size
# that rounding decided (Adam's first step is +-lr whatever a gradient's size). The joint test below trains with
# the SSIM term.
RESTARTING_VQVAE = VQVAEConfig(restart_after_steps=2, ssim_weight=0.0)
RESTART_STEPS = TrainConfig(max_steps=2, epochs=1, batch_size=8, precision="fp32", max_minutes=None)


def torchrun(*arguments: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "brainvq", *arguments]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]


def count_restarted_codes(monkeypatch) -> list[int]:
    """Spy on the quantizer of this process: the list fills with the number of codebook rows each step's
    dead-code restart moved."""
    moved = []
    restart = VectorQuantizer._restart_dead_codes

    def counting_restart(quantizer, vectors):
        before = quantizer.codebook.detach().clone()
        restart(quantizer, vectors)
        moved.append(int((quantizer.codebook != before).any(1).sum()))

    monkeypatch.setattr(VectorQuantizer, "_restart_dead_codes", counting_restart)
    return moved


def assert_same_weights(first, second) -> None:
    """Every model tensor of two last.safetensors equal to float tolerance. The order of float32 additions
    differs (each process sums its half first), which shows most in the EMA codebook sums: thousands of
    vectors, about 1e-4 relative after 3 steps. A wrong split of the batch or gradient gives errors of order 1."""
    weights = [{name: tensor for name, tensor in load_checkpoint(path)[0].items() if name.startswith("model.")}
               for path in (first / LAST_CHECKPOINT, second / LAST_CHECKPOINT)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_weights_as_one_process_with_the_same_global_batch(tiny_cohort,
                                                                                             tmp_path, monkeypatch):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    restarted = count_restarted_codes(monkeypatch)
    api.train_vqvae(tiny_cohort, single, model_config=RESTARTING_VQVAE, train_config=RESTART_STEPS, progress=False)
    assert sum(restarted) > 0  # the comparison covers restarted codes, which are drawn from the global batch
    # restart_after_steps is no command-line option: the two processes resume the single run's config.json, and
    # a run without a checkpoint starts from the beginning.
    parallel.mkdir()
    shutil.copy(single / CONFIG_FILE, parallel / CONFIG_FILE)
    torchrun("train-vqvae", "--data", str(tiny_cohort), "--out", str(parallel), "--resume", "--quiet")
    assert_same_weights(single, parallel)
    # Only rank 0 wrote: one record per epoch, no stray files of a second writer.
    assert len((parallel / "metrics.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in (parallel / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]

    # The prior, on the same VQ-VAE: a copy of the single-process run gets a two-process prior.
    # Half the slice positions hidden: the two processes must hide those of the images one process hides.
    shutil.copytree(single, parallel, dirs_exist_ok=True)
    hiding = [*TINY_PRIOR, "--position-dropout", "0.5"]
    assert main(["train-prior", str(single), *STEPS, *hiding]) == 0
    torchrun("train-prior", str(parallel), *STEPS, *hiding)
    assert_same_weights(single / "prior", parallel / "prior")
    # Resume under DDP picks up from the saved step.
    torchrun("train-prior", str(parallel), "--resume", "--epochs", "2", "--max-steps", "5", "--quiet")
    assert load_checkpoint(parallel / "prior" / LAST_CHECKPOINT)[1]["step"] == 5


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_joint_vqvae_as_one_process(tiny_cohort, tmp_path):
    """The demo cohort has masks: each process gets the label maps of its share of the batch."""
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    joint = VQVAEConfig(label_classes=4, downsample=8, channels=32, code_dim=16, restart_after_steps=0)
    assert joint.ssim_weight > 0  # each process's SSIM term is the mean over its share of the batch, as the MSE's
    api.train_vqvae(tiny_cohort, single, model_config=joint, train_config=RESTART_STEPS, progress=False)
    parallel.mkdir()
    shutil.copy(single / CONFIG_FILE, parallel / CONFIG_FILE)
    torchrun("train-vqvae", "--data", str(tiny_cohort), "--out", str(parallel), "--resume", "--quiet")
    assert_same_weights(single, parallel)
    history = json.loads((parallel / "metrics.jsonl").read_text().splitlines()[0])
    assert history["train"]["labels"] == pytest.approx(
        json.loads((single / "metrics.jsonl").read_text().splitlines()[0])["train"]["labels"], rel=1e-3)


@pytest.mark.slow
def test_compiled_data_parallel_training_trains_the_same_prior_as_one_eager_process(tiny_cohort, tmp_path):
    # On CUDA, --compile auto compiles, so torchrun on a GPU cluster runs torch.compile over DDP: check that pair.
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main(["train-vqvae", "--data", str(tiny_cohort), "--out", str(eager), "--downsample", "8", *STEPS]) == 0
    shutil.copytree(eager, compiled)
    # A windowed prior (the default) is not compiled: its windows change shape from batch to batch.
    whole_grid = [*TINY_PRIOR, "--no-windowed"]
    assert main(["train-prior", str(eager), *STEPS, *whole_grid, "--compile", "off"]) == 0
    torchrun("train-prior", str(compiled), *STEPS, *whole_grid, "--compile", "on")
    assert_same_weights(eager / "prior", compiled / "prior")


def test_a_global_batch_that_does_not_split_evenly_over_the_processes_is_refused(tiny_cohort, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "brainvq", "train-vqvae", "--data", str(tiny_cohort), "--out", str(tmp_path / "run"),
               "--batch-size", "7", "--max-steps", "1", "--quiet"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode != 0
    assert "brainvq: error: batch_size 7 is not divisible by the 2 processes" in finished.stderr
