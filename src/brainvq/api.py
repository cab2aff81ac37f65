"""What the CLI and Python users call: one function per job, each reading and writing a run folder.

    from brainvq import api
    api.make_demo_data("data/demo")
    api.train_vqvae("data/demo", "runs/demo")
    api.evaluate("runs/demo", "data/demo", split="test")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Subset

from brainvq.config import TrainConfig, VQVAEConfig, save_json
from brainvq.data.dataset import SliceDataset, load_split
from brainvq.data.demo import make_demo_cohort
from brainvq.errors import ConfigError
from brainvq.images import save_grid, save_png, to_uint8
from brainvq.models.vqvae import VQVAE
from brainvq.reconstruction import measure_reconstructions, reconstruct_batches
from brainvq.run import CONFIG_FILE, load_vqvae, read_run_config, resumed_train_config, write_run_config
from brainvq.runtime import prepare_module, resolve_device, seed_everything
from brainvq.training.loop import train
from brainvq.training.vqvae import VQVAETask

RECON_GRID_IMAGES = 8


def make_demo_data(out_dir: str | Path, **cohort_options: Any) -> dict[str, Any]:
    """Write the embedded MNI152 pseudo-cohort in the OASIS layout (see data/demo.py for the options)."""
    return make_demo_cohort(Path(out_dir), **cohort_options)


def train_vqvae(data_dir: str | Path, run_dir: str | Path, *, model_config: VQVAEConfig | None = None,
                train_config: TrainConfig | None = None, resume: bool = False,
                resume_overrides: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train a VQ-VAE on `data_dir`'s train split, validating on its validate split; returns the history.

    A new run needs an empty or absent `run_dir`. With `resume=True` the run's own config.json is used,
    with `resume_overrides` (e.g. a larger `epochs`) applied to the training config.
    """
    run_dir = Path(run_dir)
    if resume:
        model_config, saved = read_run_config(run_dir)
        train_config = resumed_train_config(saved, resume_overrides or {}, run_dir)
    else:
        if (run_dir / CONFIG_FILE).exists():
            raise ConfigError("already holds a training run; pass --resume to continue it or choose a new "
                              "output folder", run_dir)
        model_config = model_config or VQVAEConfig()
        train_config = train_config or TrainConfig()
        train_config = dataclasses.replace(train_config, data_dir=str(Path(data_dir).resolve()))
        model_config.validate()
        train_config.validate()
    train_set = SliceDataset(load_split(data_dir, "train", progress=progress))
    validation_set = SliceDataset(load_split(data_dir, "validate", progress=progress))
    device = resolve_device(train_config.device)
    seed_everything(train_config.seed)  # the initial weights
    model = prepare_module(VQVAE(model_config), device, train_config.precision)
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, model_config, train_config)
    task = VQVAETask(model, validation_set, precision=train_config.precision, val_images=train_config.val_images)
    return train(task, train_set, run_dir, train_config, device, resume=resume, progress=progress)


def evaluate(run_dir: str | Path, data_dir: str | Path, *, split: str = "test", device: str = "auto",
             precision: str | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Reconstruction quality of the run's best VQ-VAE on `split`: writes eval_<split>.json and
    recon_<split>.png (originals above reconstructions) into the run folder and returns the figures."""
    run_dir = Path(run_dir)
    model, metadata = load_vqvae(run_dir)
    precision = precision or read_run_config(run_dir)[1].precision
    torch_device = resolve_device(device)
    model = prepare_module(model, torch_device, precision)
    dataset = SliceDataset(load_split(data_dir, split))
    results = measure_reconstructions(model, dataset, device=torch_device, precision=precision,
                                      batch_size=batch_size)
    results |= {"split": split, "data_dir": str(Path(data_dir).resolve()), "checkpoint_epoch": metadata["epoch"],
                "precision": precision}
    save_json(run_dir / f"eval_{split}.json", results)
    _save_reconstruction_grid(model, dataset, run_dir / f"recon_{split}.png", torch_device, precision)
    return results


def reconstruct(run_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *, split: str = "test",
                device: str = "auto", precision: str | None = None, batch_size: int = 32) -> int:
    """Write each reconstruction of `split` as an 8-bit PNG named like its input; returns the count."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, _ = load_vqvae(run_dir)
    precision = precision or read_run_config(run_dir)[1].precision
    torch_device = resolve_device(device)
    model = prepare_module(model, torch_device, precision)
    slices = load_split(data_dir, split)
    files = iter(slices.files)
    count = 0
    for _, reconstructions, _ in reconstruct_batches(model, SliceDataset(slices), device=torch_device,
                                                     precision=precision, batch_size=batch_size):
        for image in to_uint8(reconstructions):
            save_png(image, out_dir / next(files).name)
            count += 1
    return count


def demo(run_dir: str | Path = "runs/demo", *, minutes: float = 14.0, seed: int = 0,
         progress: bool = True) -> dict[str, Any]:
    """The main job on the embedded default: demo cohort -> VQ-VAE (`minutes` of training) -> test evaluation.

    The cohort is written to RUN/data. Running it again on the same folder continues where it stopped."""
    run_dir = Path(run_dir)
    data_dir = run_dir / "data"
    if not data_dir.exists():
        make_demo_data(data_dir, seed=seed, progress=progress)
    resume = (run_dir / CONFIG_FILE).exists()
    train_vqvae(data_dir, run_dir, train_config=TrainConfig(seed=seed, max_minutes=minutes), resume=resume,
                resume_overrides={"max_minutes": minutes}, progress=progress)
    return evaluate(run_dir, data_dir, split="test")


def _save_reconstruction_grid(model: VQVAE, dataset: SliceDataset, path: Path, device: Any,
                              precision: str) -> None:
    """Evenly spaced slices of the split, originals above their reconstructions."""
    chosen = np.linspace(0, len(dataset) - 1, min(RECON_GRID_IMAGES, len(dataset))).astype(int)
    originals, reconstructions, _ = next(reconstruct_batches(model, Subset(dataset, chosen), device=device,
                                                             precision=precision, batch_size=len(chosen)))
    save_grid([to_uint8(originals), to_uint8(reconstructions)], path)
