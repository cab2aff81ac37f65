"""The two-level design (VQ-VAE-2) against a finished one-level run: same data, same training minutes, same seed,
the same sample metrics (api.measure_samples) and pictures.

What it trains, in `--out`:
- vqvae/: a two-level VQ-VAE (models/vqvae2.py: the one-level model's encoder, 64x64 bottom grid with its
  32 x 128 codebook and decoder, plus a 16x16 top grid), joint with the label maps where the run's is;
- top_prior/: a PixelCNN with causal attention over the whole top grid (attention_block 1: every position sees
  every complete row above it, and its own row through the gated stacks), conditioned on the slice position;
- bottom_prior/: the plain gated PixelCNN over the 64x64 bottom grid, conditioned on the slice position and on the
  top codes (models/pixelcnn.py, `context_*`), as in Razavi et al. 2019.
The VQ-VAE gets the run's VQ-VAE minutes and the two priors share the run's prior minutes (`--top-share` of them
for the top prior), so the comparison is at the same training budget on the same machine. Sampling draws the top
grid, then the bottom grid given it, both with the fast samplers; then everything is measured as
`evaluate-samples` measures a run, beside the run's own eval_samples.json. Run from the repository root, after
`brainvq demo --out runs/demo`:

    python benchmarks/two_level_design.py --run runs/demo --out runs/two_level

A check that it runs (8 minutes on 2 cores, figures meaningless): add `--vqvae-minutes 0.3 --prior-minutes 0.3 --n 32`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from common import table
from torch.utils.data import DataLoader, Dataset, TensorDataset

from brainvq import api
from brainvq.checkpoint import load_checkpoint, load_module_state
from brainvq.config import TrainConfig, load_json, save_json
from brainvq.data.dataset import SliceDataset, load_split, prepare_batch
from brainvq.metrics.samples import as_float_images
from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.models.vqvae import VQVAEConfig
from brainvq.models.vqvae2 import TwoLevelVQVAE
from brainvq.reconstruction import measure_reconstructions, reconstruct_batches
from brainvq.run import (
    BEST_CHECKPOINT,
    PRIOR_EVALUATION,
    PRIOR_FOLDER,
    SAMPLE_EVALUATION,
    evaluation_file,
    read_run_config,
)
from brainvq.runtime import (
    autocast,
    machine_description,
    prepare_module,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from brainvq.sampling import draw_uniforms, sample_fast
from brainvq.training.loop import train
from brainvq.training.prior import PriorTask, new_prior, nll_bits_per_code
from brainvq.training.vqvae import VQVAETask

SPLITS = ("train", "validate", "test")


def load_best(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """`model` with the weights of `folder`'s best checkpoint, in eval mode."""
    tensors, _ = load_checkpoint(folder / BEST_CHECKPOINT)
    load_module_state(model, tensors, prefix="model.", source=folder / BEST_CHECKPOINT)
    return model.eval()


@torch.no_grad()
def encode_splits(model: TwoLevelVQVAE, datasets: dict[str, Dataset], device: torch.device,
                  precision: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every split's (bottom [N, G, G], top [N, T, T]) code grids, int64, in data set order."""
    grids = {}
    for split, dataset in datasets.items():
        bottoms, tops = [], []
        for batch in DataLoader(dataset, batch_size=32):
            with autocast(device, precision):
                bottom, top = model.encode(*prepare_batch(batch, device, precision))
            bottoms.append(bottom.cpu())
            tops.append(top.cpu())
        grids[split] = (torch.cat(bottoms), torch.cat(tops))
    return grids


def train_prior(folder: Path, config: PixelCNNConfig, sets: dict[str, TensorDataset], train_config: TrainConfig,
                device: torch.device) -> tuple[GatedPixelCNN, dict[str, float], int]:
    """A prior trained on sets["train"]: (best model, validation and test NLL in bits per code, steps taken)."""
    seed_everything(train_config.seed)  # the initial weights
    model = prepare_module(new_prior(config, sets["train"]), device, train_config.precision)
    history = train(PriorTask(model, sets["validate"], precision=train_config.precision), sets["train"], folder,
                    train_config, device)
    best = load_best(GatedPixelCNN(config), folder).to(device)
    nll = {split: nll_bits_per_code(best, sets[split], precision=train_config.precision)
           for split in ("validate", "test")}
    return best, nll, history[-1]["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished one-level run")
    parser.add_argument("--out", type=Path, default=Path("runs/two_level"), help="a new folder for this design")
    parser.add_argument("--top-share", type=float, default=1 / 3, help="share of the prior minutes for the top prior")
    parser.add_argument("--top-downsample", type=int, default=4, help="bottom grid side / top grid side")
    parser.add_argument("--vqvae-minutes", type=float, help="VQ-VAE training minutes (default: the run's)")
    parser.add_argument("--prior-minutes", type=float, help="minutes of both priors together (default: the run's)")
    parser.add_argument("--n", type=int, default=256, help="samples measured (default 256)")
    args = parser.parse_args()
    started = time.perf_counter()
    vqvae_config, vqvae_train = read_run_config(args.run)
    _, prior_train = read_run_config(args.run / PRIOR_FOLDER, PixelCNNConfig)
    vqvae_train = dataclasses.replace(vqvae_train, max_minutes=args.vqvae_minutes or vqvae_train.max_minutes)
    data_dir = Path(vqvae_train.data_dir)
    device = resolve_device(vqvae_train.device)
    precision = resolve_precision(vqvae_train.precision, device)
    splits = {split: load_split(data_dir, split) for split in SPLITS}
    datasets = {split: SliceDataset(slices) for split, slices in splits.items()}
    positions_count = api.slice_positions(data_dir)

    seed_everything(vqvae_train.seed)
    model = prepare_module(TwoLevelVQVAE(vqvae_config, top_downsample=args.top_downsample), device, precision)
    history = train(VQVAETask(model, datasets["validate"], precision=precision), datasets["train"],
                    args.out / "vqvae", vqvae_train, device)
    vqvae_steps = history[-1]["step"]
    model = prepare_module(load_best(TwoLevelVQVAE(vqvae_config, top_downsample=args.top_downsample),
                                     args.out / "vqvae"), device, precision)
    reconstruction = measure_reconstructions(model, datasets["test"], device=device, precision=precision)

    grids = encode_splits(model, datasets, device, precision)
    positions = {split: torch.from_numpy(splits[split].slice_indices.astype(np.int64)) for split in SPLITS}
    top_side = vqvae_config.grid_size // args.top_downsample
    common = {"positions": positions_count, "codebook_size": vqvae_config.codebook_size}
    top_config = PixelCNNConfig(grid_size=top_side, attention_block=1, **common)
    bottom_config = PixelCNNConfig(grid_size=vqvae_config.grid_size, attention_layers=0,
                                   context_grid_size=top_side, context_codebook_size=model.top_quantizer.codebook_size,
                                   **common)
    minutes = args.prior_minutes or prior_train.max_minutes
    top_prior, top_nll, top_steps = train_prior(
        args.out / "top_prior", top_config, {s: TensorDataset(grids[s][1], positions[s]) for s in SPLITS},
        dataclasses.replace(prior_train, max_minutes=minutes * args.top_share), device)
    bottom_prior, bottom_nll, bottom_steps = train_prior(
        args.out / "bottom_prior", bottom_config,
        {s: TensorDataset(grids[s][0], positions[s], grids[s][1]) for s in SPLITS},
        dataclasses.replace(prior_train, max_minutes=minutes * (1 - args.top_share)), device)

    generator = torch.Generator().manual_seed(vqvae_train.seed)
    wanted = torch.arange(args.n) % positions_count
    sampling_started = time.perf_counter()
    top = sample_fast(top_prior, draw_uniforms(args.n, top_side, generator), wanted.to(device), progress=True)
    bottom = sample_fast(bottom_prior, draw_uniforms(args.n, vqvae_config.grid_size, generator), wanted.to(device),
                         context=top, progress=True)
    samples = torch.cat([model.decode((bottom[i:i + 32], top[i:i + 32]))[0].cpu() for i in range(0, args.n, 32)])
    sampling_seconds = time.perf_counter() - sampling_started

    def reconstructed(dataset: Dataset) -> torch.Tensor:
        return torch.cat([batch.reconstructions for batch in reconstruct_batches(
            model, dataset, device=device, precision=precision)])

    bits_per_slice = {split: top_nll[split] * top_side**2 + bottom_nll[split] * vqvae_config.grid_size**2
                      for split in ("validate", "test")}
    results = {"n_generated": args.n} | api.measure_samples(samples, wanted, splits, datasets, reconstructed,
                                                            positions_count=positions_count) | {
        "reconstruction_test": reconstruction, "vqvae_steps": vqvae_steps, "top_prior_steps": top_steps,
        "bottom_prior_steps": bottom_steps, "top_nll_bits_per_code": top_nll, "bottom_nll_bits_per_code": bottom_nll,
        "nll_bits_per_slice": bits_per_slice, "seconds_per_generated_image": sampling_seconds / args.n,
        "wall_minutes": (time.perf_counter() - started) / 60, "machine": machine_description()}
    save_json(args.out / SAMPLE_EVALUATION, results)
    api.save_sample_pictures(args.out, samples, wanted, as_float_images(splits["test"].images),
                             positions["test"], seed=vqvae_train.seed)
    print(json.dumps(results, indent=1))
    print_comparison(args.run, results, vqvae_config)


def print_comparison(run: Path, two_level: dict, vqvae_config: VQVAEConfig) -> None:
    """The one-level run's figures beside the two-level design's; each cell: samples / real where both exist."""
    one_level = load_json(run / SAMPLE_EVALUATION) | {"reconstruction_test": load_json(run / evaluation_file("test"))}
    prior_eval = load_json(run / PRIOR_FOLDER / PRIOR_EVALUATION)
    one_level["nll_bits_per_slice"] = {"test": prior_eval["test_nll_bits_per_code"] * vqvae_config.grid_size**2}

    def row(name: str, figures: dict) -> list[str]:
        c2st = figures["c2st"]

        def auc(key: str) -> str:
            return f"{c2st[key]['auc']:.3f} [{c2st[key]['ci95'][0]:.2f}, {c2st[key]['ci95'][1]:.2f}]"

        return [name, f"{figures['reconstruction_test']['ssim']:.3f}",
                f"{math.floor(figures['nll_bits_per_slice']['test'])}",
                f"{figures['position_error']['samples']:.2f} / {figures['position_error']['real_test']:.2f}",
                f"{auc('samples_vs_reconstructed')} / {auc('real_vs_reconstructed')}",
                f"{auc('samples_vs_raw')} / {auc('real_vs_raw')}",
                f"{figures['frechet']['samples_vs_test']:.3g} / {figures['frechet']['validation_vs_test']:.3g}",
                f"{figures['diversity_ms_ssim']['samples']:.3f} / {figures['diversity_ms_ssim']['real_test']:.3f}"]

    print(f"\none level ({run}) against two levels, {machine_description()}; each cell: samples / real")
    print(table(["design", "recon test SSIM", "test NLL bits/slice", "position error", "C2ST vs reconstructed",
                 "C2ST vs raw", "Fréchet (vs val-test)", "MS-SSIM diversity"],
                [row("one level (the run)", one_level), row("two levels", two_level)]))


if __name__ == "__main__":
    main()
