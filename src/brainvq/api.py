"""What the CLI and Python users call: one function per job, each reading and writing a run folder.

    from brainvq import api
    api.make_demo_data("data/demo")
    api.train_vqvae("data/demo", "runs/demo")
    api.evaluate("runs/demo", "data/demo", split="test")
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from brainvq.codes import CodeGrids, code_grids, grids_name
from brainvq.config import (
    DEMO_MINUTES,
    DEMO_VQVAE_SHARE,
    OUTLINE_TEMPERATURE,
    PRIOR_OUTLINE_MODES,
    PRIOR_WINDOWED,
    SAMPLES_EVALUATED,
    SAMPLING_GUIDANCE,
    SAMPLING_TEMPERATURE,
    TrainConfig,
    VQVAEConfig,
    default_batch_size,
    default_mirror,
    default_warped_copies,
    load_json,
    save_json,
)
from brainvq.data.dataset import SliceDataset, SliceSet, load_split
from brainvq.data.demo import make_demo_cohort
from brainvq.data.layout import MASK_VALUES, mask_file_name, mask_folder, mask_pixels
from brainvq.data.warp import training_variants, variant_dataset
from brainvq.distributed import barrier, is_main, process_group
from brainvq.errors import CheckpointError, ConfigError, DataError
from brainvq.images import save_grid, save_png, to_uint8
from brainvq.metrics.inception import load_inception
from brainvq.metrics.position import PositionRegressor
from brainvq.metrics.samples import (
    as_float_images,
    c2st,
    fid,
    frechet_distance,
    mean_pairwise_ms_ssim,
    nearest_ssim,
)
from brainvq.metrics.segmentation import TISSUE_NAMES, IntensityRanges
from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.models.vqvae import VQVAE
from brainvq.reconstruction import measure_reconstructions, reconstruct_batches
from brainvq.report import write_report
from brainvq.run import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    PRIOR_EVALUATION,
    PRIOR_FOLDER,
    REAL_VS_GENERATED,
    SAMPLE_EVALUATION,
    SAMPLE_PAIRS,
    SAMPLES_BY_POSITION,
    SAMPLES_GRID,
    evaluation_file,
    load_prior,
    load_vqvae,
    prior_vqvae_mismatch,
    read_run_config,
    reconstruction_grid,
    resumed_train_config,
    sample_mask_path,
    sample_path,
    write_run_config,
)
from brainvq.runtime import prepare_module, resolve_device, resolve_precision, seed_everything, tf32_off
from brainvq.sampling import draw_uniforms, sample_fast, sample_naive
from brainvq.training.loop import train
from brainvq.training.prior import PriorTask, code_dataset, new_prior, nll_bits_per_code
from brainvq.training.vqvae import VQVAETask

RECON_GRID_IMAGES = 8


def make_demo_data(out_dir: str | Path, **cohort_options: Any) -> dict[str, Any]:
    """Write the embedded MNI152 pseudo-cohort in the OASIS layout (see data/demo.py for the options)."""
    return make_demo_cohort(Path(out_dir), **cohort_options)


def train_vqvae(data_dir: str | Path, run_dir: str | Path, *, model_config: VQVAEConfig | None = None,
                train_config: TrainConfig | None = None, resume: bool = False,
                resume_overrides: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train a VQ-VAE on `data_dir`'s train split, validating on its validate split; returns the history.

    Without `model_config` the model is `default_vqvae_config(data_dir)`. A new run needs an empty or absent
    `run_dir`. With `resume=True` the run's own config.json is used,
    with `resume_overrides` (e.g. a larger `epochs`) applied to the training config.
    """
    run_dir = Path(run_dir)
    train_slices = load_split(data_dir, "train", progress=progress)
    model_config = model_config or default_vqvae_config(data_dir)
    model_config, train_config = _run_settings(run_dir, VQVAEConfig, model_config, train_config,
                                               resume=resume, overrides=resume_overrides, data_dir=data_dir)
    train_set = ConcatDataset([_slice_dataset(train_slices, model_config, data_dir),
                               *[variant_dataset(train_slices, copy, mirrored) for copy, mirrored
                                 in training_variants(train_config.mirror, train_config.warped_copies or 0)]])
    validation_set = _slice_dataset(load_split(data_dir, "validate", progress=progress), model_config, data_dir)
    with process_group(train_config.device) as device:
        seed_everything(train_config.seed)  # the initial weights
        model = prepare_module(VQVAE(model_config), device, train_config.precision)
        if not resume and is_main():
            write_run_config(run_dir, model_config, train_config)
        task = VQVAETask(model, validation_set, precision=train_config.precision,
                         val_images=train_config.val_images)
        return train(task, train_set, run_dir, train_config, device, resume=resume, progress=progress)


def default_vqvae_config(data_dir: str | Path, *, labels: bool = True, **options: Any) -> VQVAEConfig:
    """The VQ-VAE a run gets unless told otherwise: VQVAEConfig's defaults with `options` (other VQVAEConfig
    fields) over them, made joint (images and tissue label maps, models/vqvae.py) when the training slices of
    `data_dir` have segmentation masks, unless `labels` is False."""
    has_masks = load_split(data_dir, "train").labels is not None
    return VQVAEConfig(label_classes=len(MASK_VALUES) if labels and has_masks else 0, **options)


def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, *, split: str = "test", device: str = "auto",
             precision: str | None = None, batch_size: int = 32, checkpoint: str = "best") -> dict[str, Any]:
    """Reconstruction quality of the run's VQ-VAE (its `checkpoint`, "best" or "last") on `split` of `data_dir`
    (default: the folder it was trained on): writes eval_<split>.json and recon_<split>.png (originals above
    reconstructions; for a joint model, true label maps above decoded ones below them) into the run folder and
    returns the figures (with Dice per tissue class for a joint model)."""
    run_dir = Path(run_dir)
    data_dir = _data_dir(run_dir, data_dir)
    model, metadata, torch_device, precision = _ready_vqvae(run_dir, device, precision, checkpoint)
    dataset = _slice_dataset(load_split(data_dir, split), model.config, data_dir)
    results = measure_reconstructions(model, dataset, device=torch_device, precision=precision,
                                      batch_size=batch_size)
    results |= {"split": split, "data_dir": str(Path(data_dir).resolve()), "checkpoint": checkpoint,
                "checkpoint_epoch": metadata["epoch"], "precision": precision}
    save_json(run_dir / evaluation_file(split), results)
    _save_reconstruction_grid(model, dataset, run_dir / reconstruction_grid(split), torch_device, precision)
    return results


def reconstruct(run_dir: str | Path, out_dir: str | Path, *, data_dir: str | Path | None = None, split: str = "test",
                device: str = "auto", precision: str | None = None, batch_size: int = 32,
                checkpoint: str = "best") -> int:
    """Write each reconstruction of `split` (of `data_dir`, default the run's own data) as an 8-bit PNG named
    like its input into `out_dir`, with (joint model) its decoded label map beside it under the mask's OASIS
    name (seg_NNN_slice_S.nii.png, values 0/85/170/255); returns the count of slices."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    data_dir = _data_dir(run_dir, data_dir)
    model, _, torch_device, precision = _ready_vqvae(run_dir, device, precision, checkpoint)
    slices = load_split(data_dir, split)
    files = iter(slices.files)
    count = 0
    for batch in reconstruct_batches(model, _slice_dataset(slices, model.config, data_dir), device=torch_device,
                                     precision=precision, batch_size=batch_size):
        label_maps = [None] * len(batch.codes) if batch.reconstructed_labels is None else batch.reconstructed_labels
        for image, label_map in zip(to_uint8(batch.reconstructions), label_maps, strict=True):
            file = next(files)
            save_png(image, out_dir / file.name)
            if label_map is not None:
                save_png(mask_pixels(label_map.numpy()), out_dir / mask_file_name(file))
            count += 1
    return count


def train_prior(run_dir: str | Path, *, data_dir: str | Path | None = None,
                prior_config: PixelCNNConfig | None = None, train_config: TrainConfig | None = None,
                resume: bool = False, resume_overrides: dict[str, Any] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Train the PixelCNN prior on the code grids of the run's VQ-VAE (RUN/prior); returns the validation and
    test negative log-likelihoods in bits per code, also written to RUN/prior/eval_prior.json."""
    run_dir = Path(run_dir)
    prior_dir = run_dir / PRIOR_FOLDER
    vqvae_config, _ = read_run_config(run_dir)
    data_dir = _data_dir(run_dir, data_dir)
    prior_config = prior_config or default_prior_config(run_dir, data_dir)
    prior_config, train_config = _run_settings(prior_dir, PixelCNNConfig, prior_config, train_config, resume=resume,
                                               overrides=resume_overrides, data_dir=data_dir)
    if problem := prior_vqvae_mismatch(prior_config, vqvae_config):
        raise ConfigError(f"prior {problem}", run_dir / CONFIG_FILE)
    if (positions := slice_positions(data_dir)) > prior_config.positions:
        raise ConfigError(f"the training slices have {positions} slice positions but the prior has "
                          f"{prior_config.positions}", data_dir)
    with process_group(train_config.device) as device:
        # Rank 0 encodes and caches the code grids; the others then read its cache.
        outlines = prior_config.outline_modes > 0
        grids = _all_code_grids(run_dir, data_dir, train_config, outlines=outlines) if is_main() else None
        barrier()
        grids = grids or _all_code_grids(run_dir, data_dir, train_config, outlines=outlines)
        train_set = code_dataset(*[part for name, part in grids.items() if name.startswith("train")],
                                 outlines=outlines)
        seed_everything(train_config.seed)
        model = prepare_module(new_prior(prior_config, train_set), device, train_config.precision)
        if not resume and is_main():
            write_run_config(prior_dir, prior_config, train_config)
        task = PriorTask(model, code_dataset(grids["validate"], outlines=outlines), precision=train_config.precision)
        train(task, train_set, prior_dir, train_config, device, resume=resume, progress=progress)
        if not is_main():
            return {}
    best, metadata = load_prior(run_dir)
    results = {  # the best checkpoint's validation figure was measured when it was saved; only test is new
        "validate_nll_bits_per_code": _number(metadata.get("val"), "nll_bits_per_code",
                                              run_dir / PRIOR_FOLDER / BEST_CHECKPOINT),
        "test_nll_bits_per_code": nll_bits_per_code(best.to(device), code_dataset(grids["test"], outlines=outlines),
                                                    precision=train_config.precision),
        "checkpoint_epoch": metadata["epoch"], "grid_size": vqvae_config.grid_size,
        "codebook_size": vqvae_config.codebook_size,
    }
    save_json(prior_dir / PRIOR_EVALUATION, results)
    return results


def slice_positions(data_dir: str | Path) -> int:
    """The number of slice positions in a data folder: its training split's largest slice index + 1 (OASIS: 32)."""
    return int(load_split(data_dir, "train").slice_indices.max()) + 1


def default_prior_config(run_dir: str | Path, data_dir: str | Path | None = None, **options: Any) -> PixelCNNConfig:
    """The prior a run gets unless told otherwise: the codebook and grid of its VQ-VAE, one slice position per
    slice index of the training data (`data_dir`, default the run's), an outline model of PRIOR_OUTLINE_MODES
    modes, run on windows (PRIOR_WINDOWED) where its outline model keeps the background, and `options` (other
    PixelCNNConfig fields) over PixelCNNConfig's defaults."""
    vqvae_config, _ = read_run_config(Path(run_dir))
    config = PixelCNNConfig(codebook_size=vqvae_config.codebook_size, grid_size=vqvae_config.grid_size,
                            positions=slice_positions(_data_dir(Path(run_dir), data_dir)),
                            **({"outline_modes": PRIOR_OUTLINE_MODES} | options))
    if "windowed" not in options and config.keeps_background:
        config = dataclasses.replace(config, windowed=PRIOR_WINDOWED)
    return config


def _run_settings(folder: Path, model_class: type, model_config: Any, train_config: TrainConfig | None, *,
                  resume: bool, overrides: dict[str, Any] | None, data_dir: str | Path) -> tuple[Any, TrainConfig]:
    """(model config, training config) of a training run in `folder`.

    On resume: the run's own saved settings, of which only how long to train may be changed by `overrides`.
    Otherwise: the given settings, validated, refusing to overwrite a run that is already there."""
    if resume:
        model_config, saved = read_run_config(folder, model_class)
        return model_config, _with_model_defaults(resumed_train_config(saved, overrides or {}, folder), model_class)
    # A config.json without a checkpoint is a run that failed before its first epoch: nothing to lose by
    # starting it again, and a user who fixed the mistake should not be told to resume a run that never began.
    if (folder / CONFIG_FILE).exists() and (folder / LAST_CHECKPOINT).exists():
        raise ConfigError("already holds a training run; pass --resume to continue it or choose a new "
                          "output folder", folder)
    train_config = _with_model_defaults(train_config or TrainConfig(), model_class)
    train_config.validate()
    # The run records the precision it trains in, so that a resume (or an evaluation) elsewhere keeps it.
    precision = resolve_precision(train_config.precision, resolve_device(train_config.device))
    train_config = dataclasses.replace(train_config, data_dir=str(Path(data_dir).resolve()), precision=precision)
    model_config.validate()
    return model_config, train_config


def _with_model_defaults(train_config: TrainConfig, model_class: type) -> TrainConfig:
    """`train_config` with its batch size, mirroring and warped copies, the model's defaults where it gives none."""
    batch_size = train_config.batch_size if train_config.batch_size is not None else default_batch_size(model_class)
    mirror = train_config.mirror if train_config.mirror is not None else default_mirror(model_class)
    warped = (train_config.warped_copies if train_config.warped_copies is not None
              else default_warped_copies(model_class))
    return dataclasses.replace(train_config, batch_size=batch_size, mirror=mirror, warped_copies=warped)


def _all_code_grids(run_dir: Path, data_dir: Path, train_config: TrainConfig, *,
                    outlines: bool) -> dict[str, CodeGrids]:
    """The code grids a prior trains with (with the slices' `outlines` for a prior with an outline model): of
    each split, and of the extra training grids it trains on too: "train_mirrored" (the mirrored training slices),
    "train_warped<k>" (warped copy k of them) and "train_warped<k>_mirrored" (of their mirror images)."""
    vqvae, _, device, precision = _ready_vqvae(run_dir, train_config.device, train_config.precision)

    def grids_of(split: str, **variant: Any) -> CodeGrids:
        return code_grids(run_dir, data_dir, split, vqvae, device=device, precision=precision, outlines=outlines,
                          **variant)

    grids = {split: grids_of(split) for split in ("train", "validate", "test")}
    for copy, mirrored in training_variants(train_config.mirror, train_config.warped_copies or 0):
        grids[grids_name("train", mirrored=mirrored, warped=copy)] = grids_of("train", mirrored=mirrored, warped=copy)
    return grids


@dataclasses.dataclass
class Generated:
    """What `generate` made, on the CPU: images float32 [n, 1, S, S] in [0, 1], their label maps (class indices
    int64 [n, S, S]) where the VQ-VAE is joint, else None, the slice positions [n], the guidance they were drawn
    with, the seconds taken, and the outlines drawn first (int64 [n, G, G]) by a prior with an outline model, else
    None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    positions: torch.Tensor
    guidance: float
    seconds: float
    outlines: torch.Tensor | None = None


def generate(run_dir: str | Path, n: int, *, seed: int = 0, temperature: float = SAMPLING_TEMPERATURE,
             top_k: int | None = None, guidance: float | None = None,
             outline_temperature: float = OUTLINE_TEMPERATURE, slice_position: int | list[int] | None = None,
             method: str = "fast", device: str = "auto", progress: bool = True) -> Generated:
    """Sample `n` code grids from the run's prior and decode them with its VQ-VAE (into slices and, for a joint
    VQ-VAE, their label maps).

    Slice positions: `slice_position` for every sample, one per sample when a list, or drawn uniformly from
    the prior's positions (0..31 for OASIS) when None. `guidance`: None for the prior's default (`prior_guidance`).
    `outline_temperature`: of the outline model's draws, for a prior with one (0: each position's mean outline)."""
    samplers = {"fast": sample_fast, "naive": sample_naive}
    if method not in samplers:
        raise ConfigError(f"method must be 'fast' or 'naive', not {method!r}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, not {temperature}")
    if not outline_temperature >= 0:
        raise ConfigError(f"outline temperature must be >= 0, not {outline_temperature}")
    if guidance is not None and not guidance >= 0:
        raise ConfigError(f"guidance must be >= 0, not {guidance}")
    run_dir = Path(run_dir)
    torch_device = resolve_device(device)
    vqvae, _ = load_vqvae(run_dir)
    prior, _ = load_prior(run_dir)
    guidance = prior_guidance(prior) if guidance is None else guidance
    if top_k is not None and not 1 <= top_k <= prior.config.codebook_size:
        raise ConfigError(f"top_k must be in 1..{prior.config.codebook_size}, not {top_k}")
    generator = torch.Generator().manual_seed(seed)
    if slice_position is None:
        positions = torch.randint(0, prior.config.positions, (n,), generator=generator)
    else:
        positions = torch.tensor(slice_position).expand(n).clone()
        bad = positions[(positions < 0) | (positions >= prior.config.positions)]
        if len(bad):
            raise ConfigError(f"slice position must be in 0..{prior.config.positions - 1}, not {int(bad[0])}")
    started = time.perf_counter()
    # A prior with an outline model draws each slice's outline first, then the codes inside it.
    outlines = (prior.draw_outlines(positions, n, generator, temperature=outline_temperature).to(torch_device)
                if prior.config.outline_modes else None)
    uniforms = draw_uniforms(n, vqvae.config.grid_size, generator)
    with tf32_off():  # so that fast and naive sampling agree on CUDA too (runtime.tf32_off says why)
        codes = samplers[method](prior.to(torch_device), uniforms, positions.to(torch_device),
                                 temperature=temperature, top_k=top_k, guidance=guidance, progress=progress,
                                 context=outlines)
    images, labels = vqvae.to(torch_device).decode(codes)
    return Generated(images.cpu(), None if labels is None else labels.cpu(), positions, guidance,
                     time.perf_counter() - started, None if outlines is None else outlines.cpu())


def prior_guidance(prior: GatedPixelCNN) -> float:
    """The guidance sampling uses unless told otherwise: SAMPLING_GUIDANCE for a prior trained with position
    dropout, 1 (no guidance) for one without the unconditional model it needs."""
    return SAMPLING_GUIDANCE if prior.has_no_position_row else 1.0


def sample(run_dir: str | Path, n: int, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """`generate` (same options), then write one PNG per sample (sample_0000_slice_12.png), for a joint VQ-VAE
    its label map beside it (sample_0000_slice_12_seg.png, OASIS mask values 0/85/170/255), and
    samples_grid.png into `out_dir`."""
    out_dir = Path(out_dir)
    generated = generate(run_dir, n, **options)
    files = [sample_path(out_dir, index, position) for index, position in enumerate(generated.positions.tolist())]
    pixels = to_uint8(generated.images)
    for index, (image, file) in enumerate(zip(pixels, files, strict=True)):
        save_png(image, file)
        if generated.labels is not None:
            save_png(mask_pixels(generated.labels[index].numpy()), sample_mask_path(file))
    _save_tiles(pixels, out_dir / SAMPLES_GRID)
    return {"n": n, "seconds": generated.seconds, "positions": generated.positions.tolist(),
            "files": [str(file) for file in files], "labelled": generated.labels is not None}


def evaluate_samples(run_dir: str | Path, *, data_dir: str | Path | None = None, n: int = SAMPLES_EVALUATED,
                     seed: int = 0, temperature: float = SAMPLING_TEMPERATURE, top_k: int | None = None,
                     guidance: float | None = None, outline_temperature: float = OUTLINE_TEMPERATURE,
                     device: str = "auto", fid_weights: str | Path | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """How far `n` samples (drawn with `temperature`, `top_k`, `guidance` and `outline_temperature`, as `generate`
    does) are from real slices, each measure beside the same measure on real slices; writes RUN/eval_samples.json,
    samples_grid.png, samples_by_position.png and real_vs_generated_by_position.png, and returns the figures. The
    samples cover every slice position equally (position i % positions for sample i).

    - "c2st": subject-disjoint classifier two-sample tests (metrics/samples.py): samples against real slices of
      the validation and test subjects, raw and as VQ-VAE reconstructions (which separates the prior's errors
      from the decoder's); the "real" rows put n training slices (two groups of subjects) in the samples' place.
    - "position_error": a regressor trained on the training slices predicts each slice's position; its mean
      absolute error on samples (against the position asked for) and on real test slices.
    - "frechet": Fréchet distance in that regressor's features, samples against test beside validation against
      test, with as many images a side.
    - "diversity_ms_ssim" (mean MS-SSIM between pairs, lower is more varied) and "nearest_train_ssim"
      (memorisation), samples beside real test slices.
    - "label_agreement" (joint VQ-VAE only): the share of labelled pixels whose intensity lies in their tissue's
      range learnt on the training pairs, for generated pairs beside real and reconstructed test pairs; and
      sample_pairs.png (real test slices and masks above generated slices and label maps).

    With `fid_weights` (FID Inception weights as safetensors, see scripts/convert_fid_weights.py) the figures
    include "fid" between samples and as many real test slices; FID is biased upwards at small n, so compare
    values measured with the same n only."""
    run_dir = Path(run_dir)
    # Read before sampling, which takes minutes: a bad weights file fails at once.
    torch_device = resolve_device(device)
    inception = None if fid_weights is None else load_inception(fid_weights).to(torch_device)
    prior_nll = _number(load_json(run_dir / PRIOR_FOLDER / PRIOR_EVALUATION), "test_nll_bits_per_code",
                        run_dir / PRIOR_FOLDER / PRIOR_EVALUATION)
    data_dir = _data_dir(run_dir, data_dir)
    prior, _ = load_prior(run_dir)
    positions = torch.arange(n) % prior.config.positions
    generated = generate(run_dir, n, seed=seed, temperature=temperature, top_k=top_k, guidance=guidance,
                         outline_temperature=outline_temperature, slice_position=positions.tolist(), device=device,
                         progress=progress)
    samples = generated.images
    splits = {split: load_split(data_dir, split) for split in ("train", "validate", "test")}
    vqvae, _, vqvae_device, precision = _ready_vqvae(run_dir, device, None)
    datasets = {split: _slice_dataset(slices, vqvae.config, data_dir) for split, slices in splits.items()}

    def reconstructed(dataset: Dataset) -> torch.Tensor:
        return torch.cat([batch.reconstructions for batch in reconstruct_batches(
            vqvae, dataset, device=vqvae_device, precision=precision)])

    results = {"n_generated": n, "temperature": temperature, "top_k": top_k, "guidance": generated.guidance,
               "outline_temperature": outline_temperature if prior.config.outline_modes else None}
    results |= measure_samples(samples, positions, splits, datasets, reconstructed,
                               positions_count=prior.config.positions, seed=seed)
    results |= {"prior_nll_bits_per_code": prior_nll, "seconds_per_generated_image": generated.seconds / n}
    real_test = as_float_images(splits["test"].images)
    if generated.labels is not None:
        results["label_agreement"] = _label_agreement(as_float_images(splits["train"].images), splits, generated,
                                                      datasets["test"], vqvae, vqvae_device, precision)
    if inception is not None:
        count = results["frechet"]["n_per_side"]
        results["fid"] = fid(real_test[:count].to(torch_device), samples[:count].to(torch_device), inception)
    save_json(run_dir / SAMPLE_EVALUATION, results)
    save_sample_pictures(run_dir, samples, positions, real_test, torch.from_numpy(splits["test"].slice_indices),
                          seed)
    if generated.labels is not None:
        _save_sample_pairs(run_dir / SAMPLE_PAIRS, generated, splits["test"])
    return results


def measure_samples(samples: torch.Tensor, positions: torch.Tensor, splits: dict[str, SliceSet],
                    datasets: dict[str, Dataset], reconstructed: Callable[[Dataset], torch.Tensor], *,
                    positions_count: int, seed: int = 0) -> dict[str, Any]:
    """The sample figures of `evaluate_samples` for any generator: samples [n, 1, S, S] in [0, 1] made for slice
    `positions` [n], against the real slices of `splits` (train, validate, test) and, through `reconstructed`
    (a SliceDataset of `datasets`, or a Subset of one -> its reconstructions [m, 1, S, S]), their
    reconstructions by the generator's own VQ-VAE. Keys: "c2st", "position_error", "frechet",
    "diversity_ms_ssim", "nearest_train_ssim" (evaluate_samples' docstring says what each is)."""
    n = len(samples)
    real = {split: as_float_images(splits[split].images) for split in ("validate", "test")}
    training_groups = _training_groups(splits["train"], n)
    half = n // 2
    candidates = {"samples": (samples[:half], samples[half:]),
                  "real": tuple(as_float_images(splits["train"].images[group]) for group in training_groups)}
    c2st_results = {}
    for form in ("raw", "reconstructed"):
        against = real if form == "raw" else {split: reconstructed(datasets[split]) for split in real}
        for name, (first, second) in candidates.items():
            if form == "reconstructed" and name == "real":
                first, second = (reconstructed(Subset(datasets["train"], group)) for group in training_groups)
            c2st_results[f"{name}_vs_{form}"] = c2st((first, against["validate"]), (second, against["test"]),
                                                     seed=seed)
    train_images = as_float_images(splits["train"].images)
    train_positions = torch.from_numpy(splits["train"].slice_indices)
    regressor = PositionRegressor(train_images, train_positions, positions_count, seed=seed)
    test_positions = torch.from_numpy(splits["test"].slice_indices)
    count = min(n, len(real["validate"]), len(real["test"]))  # the same n on both sides of each distance
    test_features = regressor.features(real["test"][:count])
    nearest = {"samples": nearest_ssim(samples, splits["train"].images),
               "real_test": nearest_ssim(real["test"], splits["train"].images)}
    return {
        "c2st": c2st_results,
        "position_error": {"samples": regressor.mean_absolute_error(samples, positions),
                           "real_test": regressor.mean_absolute_error(real["test"], test_positions)},
        "frechet": {"samples_vs_test": frechet_distance(regressor.features(samples[:count]), test_features),
                    "validation_vs_test": frechet_distance(regressor.features(real["validate"][:count]),
                                                           test_features),
                    "n_per_side": count},
        "diversity_ms_ssim": {"samples": mean_pairwise_ms_ssim(samples),
                              "real_test": mean_pairwise_ms_ssim(real["test"])},
        "nearest_train_ssim": {name: _summary(values) for name, values in nearest.items()},
    }


def _label_agreement(train_images: torch.Tensor, splits: dict[str, SliceSet], generated: Generated,
                     test_set: Dataset, vqvae: VQVAE, device: torch.device, precision: str) -> dict[str, Any]:
    """How often generated label maps agree with their slices by the tissue intensity ranges of the training
    pairs (metrics/segmentation.py), beside real test pairs and the VQ-VAE's reconstructed test pairs."""
    rule = IntensityRanges(train_images, torch.from_numpy(np.array(splits["train"].labels)))
    batches = list(reconstruct_batches(vqvae, test_set, device=device, precision=precision))
    reconstructions = torch.cat([batch.reconstructions for batch in batches])
    reconstructed_labels = torch.cat([batch.reconstructed_labels for batch in batches])
    test = splits["test"]
    return {"samples": rule.agreement(generated.images, generated.labels),
            "real_test": rule.agreement(as_float_images(test.images), torch.from_numpy(np.array(test.labels))),
            "reconstructed_test": rule.agreement(reconstructions, reconstructed_labels),
            "ranges": {name: [float(value) for value in bounds]
                       for name, bounds in zip(TISSUE_NAMES, rule.ranges, strict=True)}}


def _training_groups(train: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of n training slices in two halves from disjoint halves of the training subjects, spread evenly
    over each half's slices (so over its subjects and slice positions)."""
    cases = sorted(set(train.case_ids))
    first_cases = set(cases[:len(cases) // 2])
    in_first = np.array([case in first_cases for case in train.case_ids])
    groups = []
    for members, count in ((np.flatnonzero(in_first), n // 2), (np.flatnonzero(~in_first), n - n // 2)):
        groups.append(members[np.linspace(0, len(members) - 1, min(count, len(members))).astype(int)])
    return groups[0], groups[1]


def save_sample_pictures(run_dir: Path, generated: torch.Tensor, positions: torch.Tensor, test: torch.Tensor,
                         test_positions: torch.Tensor, seed: int) -> None:
    """samples_grid.png (32 samples at random positions), samples_by_position.png (one per position, in order)
    and real_vs_generated_by_position.png (rows of real test slices, each above generated ones of the same
    positions)."""
    pixels = to_uint8(generated)
    chosen = torch.randperm(len(generated), generator=torch.Generator().manual_seed(seed))[:32]
    _save_tiles(pixels[chosen.numpy()], run_dir / SAMPLES_GRID)
    first_of_each = [int(np.flatnonzero(positions.numpy() == p)[0]) for p in positions.unique().tolist()]
    _save_tiles(pixels[first_of_each], run_dir / SAMPLES_BY_POSITION)
    real_pixels, blank = to_uint8(test), np.zeros_like(pixels[0])
    rows = []
    for start in range(0, len(first_of_each), 8):
        shown = first_of_each[start:start + 8]
        matching = [np.flatnonzero(test_positions.numpy() == int(positions[index])) for index in shown]
        padding = [blank] * (8 - len(shown))
        rows += [np.stack([real_pixels[m[0]] if len(m) else blank for m in matching] + padding),
                 np.stack([pixels[index] for index in shown] + padding)]
    _save_tiles(np.concatenate(rows), run_dir / REAL_VS_GENERATED)


def _save_sample_pairs(path: Path, generated: Generated, test: SliceSet, shown: int = 8) -> None:
    """Rows: real test slices at `shown` positions spread over the range, their masks, generated slices of the
    same positions and their generated label maps."""
    positions = generated.positions.numpy()
    chosen = [int(np.flatnonzero(positions == position)[0])
              for position in np.unique(positions)[np.linspace(0, len(np.unique(positions)) - 1, shown).astype(int)]]
    real = [int(np.flatnonzero(test.slice_indices == positions[index])[0]) for index in chosen]
    save_grid([np.asarray(test.images[real]), mask_pixels(np.asarray(test.labels[real])),
               to_uint8(generated.images[chosen]), mask_pixels(generated.labels[chosen].numpy())], path)


def _number(values: Any, key: str, source: Path) -> float:
    """values[key] as a float, or a CheckpointError naming `source` (a damaged or hand-edited record)."""
    value = values.get(key) if isinstance(values, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"has no number {key}; run train-prior again to remake it", source)
    return float(value)


def _summary(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "median": float(values.median()), "max": float(values.max())}


def _save_tiles(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """Save uint8 [N, H, W] as a grid PNG of `columns` images per row, the last row padded with black tiles."""
    missing = -len(images) % columns
    padded = np.concatenate([images, np.zeros((missing, *images.shape[1:]), images.dtype)])
    save_grid(list(padded.reshape(-1, columns, *images.shape[1:])), path)


def demo(run_dir: str | Path = "runs/demo", *, minutes: float = DEMO_MINUTES, seed: int = 0,
         progress: bool = True) -> dict[str, Any]:
    """The whole mission on the embedded default: demo cohort (RUN/data) -> VQ-VAE -> test evaluation -> prior
    -> samples and their evaluation -> RUN/report.html. `minutes` of training in all, DEMO_VQVAE_SHARE of it
    for the VQ-VAE and the rest for the prior.

    Running it again on the same folder continues each step where it stopped (finished steps are kept)."""
    run_dir = Path(run_dir)
    data_dir = run_dir / "data"
    if not data_dir.exists():
        make_demo_data(data_dir, seed=seed, progress=progress)
    vqvae_minutes, prior_minutes = DEMO_VQVAE_SHARE * minutes, (1 - DEMO_VQVAE_SHARE) * minutes
    train_vqvae(data_dir, run_dir, train_config=TrainConfig(seed=seed, max_minutes=vqvae_minutes),
                resume=(run_dir / CONFIG_FILE).exists(), resume_overrides={"max_minutes": vqvae_minutes},
                progress=progress)
    results = {"reconstruction": evaluate(run_dir, data_dir, split="test")}
    results["prior"] = train_prior(run_dir, train_config=TrainConfig(seed=seed, max_minutes=prior_minutes),
                                   resume=(run_dir / PRIOR_FOLDER / CONFIG_FILE).exists(),
                                   resume_overrides={"max_minutes": prior_minutes}, progress=progress)
    results["samples"] = evaluate_samples(run_dir, seed=seed, progress=progress)
    results["report"] = str(write_report(run_dir))
    return results


def _data_dir(run_dir: Path, data_dir: str | Path | None) -> Path:
    """`data_dir` if given, else the data folder the run's VQ-VAE was trained on (recorded in RUN/config.json)."""
    return Path(data_dir or read_run_config(run_dir)[1].data_dir)


def _ready_vqvae(run_dir: Path, device: str, precision: str | None,
                 checkpoint: str = "best") -> tuple[VQVAE, dict[str, Any], torch.device, str]:
    """The run's VQ-VAE (`checkpoint`: "best" or "last") on `device`, in `precision` (default: the one it was
    trained with).

    Returns (model, checkpoint metadata, torch device, precision)."""
    model, metadata = load_vqvae(run_dir, checkpoint=checkpoint)
    precision = precision or read_run_config(run_dir)[1].precision
    torch_device = resolve_device(device)
    return prepare_module(model, torch_device, precision), metadata, torch_device, precision


def _save_reconstruction_grid(model: VQVAE, dataset: SliceDataset, path: Path, device: Any,
                              precision: str) -> None:
    """Evenly spaced slices of the split, originals above their reconstructions (joint model: then the true
    label maps above the decoded ones)."""
    chosen = np.linspace(0, len(dataset) - 1, min(RECON_GRID_IMAGES, len(dataset))).astype(int)
    batch = next(reconstruct_batches(model, Subset(dataset, chosen), device=device, precision=precision,
                                     batch_size=len(chosen)))
    rows = [to_uint8(batch.originals), to_uint8(batch.reconstructions)]
    if batch.labels is not None:
        rows += [mask_pixels(batch.labels.numpy()), mask_pixels(batch.reconstructed_labels.numpy())]
    save_grid(rows, path)


def _slice_dataset(slices: SliceSet, model_config: VQVAEConfig, data_dir: str | Path) -> SliceDataset:
    """`slices` for a VQ-VAE with `model_config`; a joint model needs the split's masks."""
    if model_config.label_classes and slices.labels is None:
        raise DataError(f"the VQ-VAE encodes tissue label maps with the slices, but the {slices.split} split has "
                        f"no masks ({mask_folder(data_dir, slices.split).name})", data_dir)
    return SliceDataset(slices)
