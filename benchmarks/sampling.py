"""Sampling speed: naive (whole network per code) against fast (cached) sampling, batch 16, one run.

The default PixelCNN prior samples a batch of code grids both ways for each grid size. Fast sampling is timed
over whole grids. Naive sampling costs one full forward pass per position whatever the position, so it is timed
over the first `--naive-positions` positions and scaled to the whole grid (a full naive 64x64 batch takes the
better part of an hour here); the scaled figure is marked as such. Weights are random: speed does not depend on
them. Run from the repository root:

    python benchmarks/sampling.py [--grid-sizes 32 64] [--batch-size 16] [--naive-positions 32]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.runtime import machine_description, resolve_device
from brainvq.sampling import choose_codes, draw_uniforms, sample_fast


@torch.no_grad()
def naive_seconds_per_position(model: GatedPixelCNN, grid_size: int, batch_size: int, positions: int) -> float:
    """Mean time of `positions` naive sampling steps (one full forward pass each)."""
    codes = torch.zeros(batch_size, grid_size, grid_size, dtype=torch.int64)
    slices = torch.randint(0, 32, (batch_size,))
    uniforms = torch.rand(batch_size)
    model(codes, slices)  # warm-up
    started = time.perf_counter()
    for index in range(positions):
        row, column = divmod(index, grid_size)
        codes[:, row, column] = choose_codes(model(codes, slices)[:, :, row, column], uniforms)
    return (time.perf_counter() - started) / positions


def fast_seconds(model: GatedPixelCNN, grid_size: int, batch_size: int) -> float:
    uniforms = draw_uniforms(batch_size, grid_size, torch.Generator().manual_seed(0))
    slices = torch.randint(0, 32, (batch_size,))
    started = time.perf_counter()
    sample_fast(model, uniforms, slices)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--naive-positions", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    results = []
    for grid_size in args.grid_sizes:
        torch.manual_seed(0)
        model = GatedPixelCNN(PixelCNNConfig(grid_size=grid_size)).eval().to(device)
        fast = fast_seconds(model, grid_size, args.batch_size)
        per_position = naive_seconds_per_position(model, grid_size, args.batch_size, args.naive_positions)
        naive = per_position * grid_size**2
        results.append({"grid_size": grid_size, "fast_seconds_per_batch": fast,
                        "naive_seconds_per_position": per_position,
                        "naive_seconds_per_batch_scaled": naive, "ratio_naive_over_fast": naive / fast})
    print(json.dumps({"benchmark": "sampling", "machine": machine_description(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": args.batch_size,
                      "prior": PixelCNNConfig().__dict__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
