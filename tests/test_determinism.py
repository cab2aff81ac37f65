"""The same seed twice on the CPU gives bit-identical checkpoints and samples; another seed gives other ones.

tests/training/test_loop.py checks that a resumed run ends like an uninterrupted one; this checks that two runs
made from scratch with one seed agree, through the whole pipeline: data, VQ-VAE, code grids, prior, sampling.
"""

import pytest
import torch

from brainvq import api
from brainvq.checkpoint import load_checkpoint
from brainvq.cli import main
from brainvq.config import TrainConfig, VQVAEConfig
from brainvq.models.pixelcnn import PixelCNNConfig
from brainvq.run import BEST_CHECKPOINT, LAST_CHECKPOINT

VQVAE = VQVAEConfig(downsample=16, channels=32, code_dim=16)  # 16x16 code grids: quick to sample
PRIOR = PixelCNNConfig(codebook_size=32, channels=16, layers=3, grid_size=16)
ONE_EPOCH = {"epochs": 1, "max_minutes": None, "batch_size": 8}
# No warm-up for the VQ-VAE: after its 8 steps its decoder must already turn different codes into different pixels,
# or every sample is the same black image and "another seed gives other samples" could not be seen.
VQVAE_TRAINING = {"warmup_steps": 0, "lr": 2e-3}
TIMING_KEYS = ("images_per_second", "epoch_seconds", "elapsed_seconds")


@pytest.fixture(scope="module")
def runs(tiny_cohort, tmp_path_factory):
    """One epoch of a VQ-VAE and then of a prior on it, three times: seed 1, seed 1 again, seed 2."""
    root = tmp_path_factory.mktemp("determinism")
    made = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BRAINVQ_CACHE_DIR", str(root / "cache"))
        for name, seed in (("first", 1), ("again", 1), ("other seed", 2)):
            run = made[name] = root / name
            api.train_vqvae(tiny_cohort, run, model_config=VQVAE,
                            train_config=TrainConfig(seed=seed, **ONE_EPOCH, **VQVAE_TRAINING), progress=False)
            api.train_prior(run, prior_config=PRIOR, train_config=TrainConfig(seed=seed, **ONE_EPOCH),
                            progress=False)
    return made


def untimed(history):
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in history]


@pytest.mark.parametrize("model", ["vqvae", "prior"])
@pytest.mark.parametrize("checkpoint", [LAST_CHECKPOINT, BEST_CHECKPOINT])
def test_the_same_seed_gives_bit_identical_checkpoints_and_another_seed_does_not(runs, model, checkpoint):
    folder = "" if model == "vqvae" else "prior"
    (first, first_header), (again, again_header), (other, _) = (
        load_checkpoint(runs[name] / folder / checkpoint) for name in ("first", "again", "other seed"))
    assert first.keys() == again.keys() == other.keys()
    for name, tensor in first.items():
        assert tensor.dtype == again[name].dtype and torch.equal(tensor, again[name]), name
    assert untimed(first_header.get("history", [])) == untimed(again_header.get("history", []))
    assert any(name.startswith("model.") for name in first)
    assert not all(torch.equal(tensor, other[name]) for name, tensor in first.items() if name.startswith("model."))


def test_the_same_seed_gives_byte_identical_sample_pngs_and_another_seed_does_not(runs, tmp_path):
    def sample(run, seed):
        out = tmp_path / f"{run} {seed}"
        assert main(["sample", str(runs[run]), "--n", "3", "--out", str(out), "--seed", str(seed)]) == 0
        return {path.name: path.read_bytes() for path in sorted(out.iterdir())}

    first = sample("first", 5)
    assert len(first) == 4 and "samples_grid.png" in first  # 3 samples and the grid
    assert sample("first", 5) == first  # the same run sampled twice
    assert sample("again", 5) == first  # a second run trained with the same seed, sampled with the same seed
    other = sample("first", 6)
    assert other["samples_grid.png"] != first["samples_grid.png"]
    assert set(other.values()).isdisjoint(first.values())
