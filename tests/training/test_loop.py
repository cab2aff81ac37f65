import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from brainvq.checkpoint import load_checkpoint
from brainvq.config import TrainConfig, VQVAEConfig
from brainvq.models.vqvae import VQVAE
from brainvq.runtime import prepare_module, seed_everything
from brainvq.training.loop import BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_FILE, train
from brainvq.training.vqvae import VQVAETask

SMALL = VQVAEConfig(image_size=32, channels=16, residual_channels=8, code_dim=8, codebook_size=16,
                    restart_after_steps=2)


def blob_images(count: int, size: int = 32, seed: int = 0) -> TensorDataset:
    """Bright discs of random size and position on black: a stand-in for brain slices."""
    generator = torch.Generator().manual_seed(seed)
    coordinates = torch.arange(size).float()
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    centres = torch.rand(count, 2, generator=generator) * size * 0.5 + size * 0.25
    radii = torch.rand(count, generator=generator) * size * 0.2 + size * 0.1
    distance = ((y - centres[:, 0, None, None]) ** 2 + (x - centres[:, 1, None, None]) ** 2).sqrt()
    images = (distance < radii[:, None, None]).float() * 0.8
    return TensorDataset(images.unsqueeze(1), torch.arange(count) % 32)


def run(run_dir, epochs, *, resume=False, precision="bf16", **options):
    config = TrainConfig(epochs=epochs, batch_size=4, lr=2e-3, warmup_steps=3, precision=precision,
                         max_minutes=None, seed=7, **options)
    seed_everything(config.seed)
    model = prepare_module(VQVAE(SMALL), torch.device("cpu"), precision)
    task = VQVAETask(model, blob_images(8, seed=1), precision=precision, val_images=8)
    return train(task, blob_images(24), run_dir, config, torch.device("cpu"), resume=resume, progress=False)


def without_timing(history):
    return [{key: value for key, value in record.items()
             if key not in ("images_per_second", "epoch_seconds", "elapsed_seconds")} for record in history]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_interrupted_then_resumed_run_ends_in_the_same_state_as_an_uninterrupted_one(tmp_path, precision):
    straight = run(tmp_path / "straight", 3, precision=precision)
    run(tmp_path / "interrupted", 1, precision=precision)
    resumed = run(tmp_path / "interrupted", 3, resume=True, precision=precision)

    assert without_timing(resumed) == without_timing(straight)
    final_straight, _ = load_checkpoint(tmp_path / "straight" / LAST_CHECKPOINT)
    final_resumed, _ = load_checkpoint(tmp_path / "interrupted" / LAST_CHECKPOINT)
    assert final_straight.keys() == final_resumed.keys()
    for name in final_straight:
        assert torch.equal(final_straight[name], final_resumed[name]), name


def test_metrics_jsonl_has_each_epoch_once_with_the_promised_fields(tmp_path):
    run(tmp_path, 2)
    run(tmp_path, 3, resume=True)
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2, 3]
    for record in records:
        assert {"loss", "reconstruction", "codebook", "commitment", "codebook_used", "perplexity"} <= set(
            record["train"])
        assert {"ssim", "ssim_brain", "psnr", "codebook_used", "perplexity"} <= set(record["val"])
        assert record["images_per_second"] > 0
        assert 1 <= record["train"]["codebook_used"] <= SMALL.codebook_size


def test_training_reduces_the_loss_and_keeps_the_best_checkpoint(tmp_path):
    history = run(tmp_path, 4)
    assert history[-1]["train"]["reconstruction"] < history[0]["train"]["reconstruction"]
    _, best = load_checkpoint(tmp_path / BEST_CHECKPOINT)
    assert best["val"]["ssim"] == max(record["val"]["ssim"] for record in history)


def test_max_steps_ends_training_with_a_partial_epoch(tmp_path):
    history = run(tmp_path, 5, max_steps=8)  # 6 steps per epoch
    assert [record["step"] for record in history] == [6, 8]
    assert history[-1]["partial"] is True
    assert not math.isnan(history[-1]["val"]["ssim"])


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    from brainvq.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nothing to resume"):
        run(tmp_path, 2, resume=True)
