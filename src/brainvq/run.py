"""The run folder: what training writes and how trained models are loaded back from it.

    RUN/config.json                      {"brainvq_version", "model": VQVAEConfig, "train": TrainConfig}
    RUN/metrics.jsonl                    one JSON line per finished epoch
    RUN/checkpoints/last.safetensors     model + optimizer + history (resume point)
    RUN/checkpoints/best.safetensors     model weights with the best validation SSIM
    RUN/eval_<split>.json, RUN/recon_<split>.png   written by `evaluate`
    RUN/codes/<split>.npy                code grids of each split (codes.py)
    RUN/prior/...                        the PixelCNN prior: the same layout with a PixelCNNConfig
    RUN/prior/eval_prior.json            its validation and test NLL
    RUN/eval_samples.json, samples_grid.png, samples_by_position.png, real_vs_generated_by_position.png
                                         written by `evaluate-samples` (joint VQ-VAE: also sample_pairs.png)
    RUN/report.html                      written by `report`

Every one of these names is defined here, once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from brainvq import __version__
from brainvq.checkpoint import load_checkpoint, load_module_state
from brainvq.config import TrainConfig, VQVAEConfig, from_dict, load_json, save_json, to_dict
from brainvq.errors import CheckpointError, ConfigError
from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.models.vqvae import VQVAE

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LAST_CHECKPOINT = "checkpoints/last.safetensors"
BEST_CHECKPOINT = "checkpoints/best.safetensors"
CHECKPOINTS = {"best": BEST_CHECKPOINT, "last": LAST_CHECKPOINT}
CODES_FOLDER = "codes"
PRIOR_FOLDER = "prior"
PRIOR_EVALUATION = "eval_prior.json"
SAMPLE_EVALUATION = "eval_samples.json"
SAMPLES_GRID = "samples_grid.png"
SAMPLES_BY_POSITION = "samples_by_position.png"
REAL_VS_GENERATED = "real_vs_generated_by_position.png"
SAMPLE_PAIRS = "sample_pairs.png"  # real test slices and masks above generated slices and label maps
REPORT_FILE = "report.html"
CONFIG_SECTIONS = {"brainvq_version", "model", "train"}


def evaluation_file(split: str) -> str:
    """`evaluate`'s figures for a split."""
    return f"eval_{split}.json"


def reconstruction_grid(split: str) -> str:
    """`evaluate`'s picture of a split: originals above reconstructions."""
    return f"recon_{split}.png"


SAMPLE_MASK_SUFFIX = "_seg"  # a generated label map's name: its slice's stem + this suffix


def sample_path(out_dir: Path, index: int, position: int) -> Path:
    """Where `sample` writes generated slice number `index`, made for slice position `position`:
    out_dir/sample_0000_slice_12.png."""
    return out_dir / f"sample_{index:04d}_slice_{position}.png"


def sample_mask_path(slice_file: Path) -> Path:
    """Where `sample` writes a generated slice's label map: sample_0000_slice_12.png -> sample_0000_slice_12_seg.png."""
    return slice_file.with_name(f"{slice_file.stem}{SAMPLE_MASK_SUFFIX}{slice_file.suffix}")


# Fields that define the optimisation itself: a resumed run must keep them, or it is no longer the same run.
RECIPE_FIELDS = ("batch_size", "mirror", "lr", "warmup_steps", "cooldown", "weight_decay", "max_grad_norm", "precision",
                 "seed")

ModelConfig = TypeVar("ModelConfig", VQVAEConfig, PixelCNNConfig)


def write_run_config(run_dir: Path, model_config: Any, train_config: TrainConfig) -> None:
    save_json(run_dir / CONFIG_FILE, {"brainvq_version": __version__, "model": to_dict(model_config),
                                      "train": to_dict(train_config)})


def read_run_config(run_dir: Path, model_class: type[ModelConfig] = VQVAEConfig) -> tuple[ModelConfig, TrainConfig]:
    path = Path(run_dir) / CONFIG_FILE
    values = load_json(path)
    missing = {"model", "train"} - set(values)
    if missing:
        raise ConfigError(f"missing section(s) {', '.join(sorted(missing))}", path)
    unknown = set(values) - CONFIG_SECTIONS
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}", path)
    return from_dict(model_class, values["model"], source=path), from_dict(TrainConfig, values["train"], source=path)


def resumed_train_config(saved: TrainConfig, overrides: dict[str, Any], run_dir: Path) -> TrainConfig:
    """The saved training config with `overrides` applied; only how long to train may change on resume."""
    for name in RECIPE_FIELDS:
        if name in overrides and overrides[name] != getattr(saved, name):
            raise ConfigError(f"{name} was {getattr(saved, name)!r} in this run; resuming with "
                              f"{overrides[name]!r} would not continue the same run", run_dir / CONFIG_FILE)
    config = dataclasses.replace(saved, **overrides)
    config.validate()
    return config


def _load_model(run_dir: Path, model_class: type[nn.Module], config_class: type,
                checkpoint: str) -> tuple[Any, dict[str, Any]]:
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, not {checkpoint!r}")
    model_config, _ = read_run_config(run_dir, config_class)
    path = Path(run_dir) / CHECKPOINTS[checkpoint]
    tensors, metadata = load_checkpoint(path)
    model = model_class(model_config)
    try:
        load_module_state(model, tensors, prefix="model.", source=path)
    except CheckpointError as error:  # most often a config.json edited, or copied from another run
        raise CheckpointError(f"does not fit the model that {CONFIG_FILE} describes: {error.problem}", path) from None
    return model.eval(), metadata


def load_vqvae(run_dir: Path, *, checkpoint: str = "best") -> tuple[VQVAE, dict[str, Any]]:
    """The VQ-VAE of a run, rebuilt from config.json with its `checkpoint` ("best" or "last") weights.

    Returns (model in eval mode on the CPU, the checkpoint's metadata)."""
    return _load_model(Path(run_dir), VQVAE, VQVAEConfig, checkpoint)


def load_prior(run_dir: Path, *, checkpoint: str = "best") -> tuple[GatedPixelCNN, dict[str, Any]]:
    """The PixelCNN prior of a run (RUN/prior), like `load_vqvae`.

    Refuses a prior whose codes or grid differ from the run's VQ-VAE (RUN/config.json): the VQ-VAE could not
    decode its samples."""
    prior_dir = Path(run_dir) / PRIOR_FOLDER
    vqvae_config, _ = read_run_config(run_dir)
    prior_config, _ = read_run_config(prior_dir, PixelCNNConfig)
    if problem := prior_vqvae_mismatch(prior_config, vqvae_config):
        raise ConfigError(f"{problem} ({Path(run_dir) / CONFIG_FILE})", prior_dir / CONFIG_FILE)
    return _load_model(prior_dir, GatedPixelCNN, PixelCNNConfig, checkpoint)


def prior_vqvae_mismatch(prior_config: PixelCNNConfig, vqvae_config: VQVAEConfig) -> str | None:
    """Why the VQ-VAE could not decode this prior's code grids (another codebook size or grid), or None."""
    for name, vqvae_value in (("codebook_size", vqvae_config.codebook_size), ("grid_size", vqvae_config.grid_size)):
        if getattr(prior_config, name) != vqvae_value:
            return f"{name} {getattr(prior_config, name)} differs from the VQ-VAE's {vqvae_value}"
    return None
