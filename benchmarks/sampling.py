"""Sampling speed: naive (whole network per code) against fast (cached) sampling, batch 16, one run.

The prior a run gets by default (PixelCNNConfig with the outline model of `PRIOR_OUTLINE_MODES` modes, so each
grid is conditioned on an outline, as `brainvq sample` draws them, and windowed as PRIOR_WINDOWED says) samples a
batch of code grids both ways for each grid size, in fp32 as `brainvq sample` runs it. The outlines cover the
whole grid, so a windowed prior's window is the whole grid too: the figures are those of sampling whole grids.
Fast sampling is timed over whole grids. Naive sampling costs one full forward pass per position whatever the
position, so it is timed over the first `--naive-positions` positions and scaled to the whole grid (a full naive
64x64 batch takes the better part of an hour here); the scaled figure is marked as such. Both are interleaved
over `--rounds` rounds and the table gives medians. Weights are random: speed does not depend on them. Run from
the repository root:

    python benchmarks/sampling.py [--grid-sizes 32 64] [--batch-size 16] [--naive-positions 16] [--rounds 3]
                                  [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from common import (
    CpuShare,
    add_output_arguments,
    environment,
    interleaved,
    json_path,
    median,
    seconds,
    table,
    write_json,
)

from brainvq.config import PRIOR_OUTLINE_MODES, PRIOR_WINDOWED
from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.sampling import choose_codes, draw_uniforms, sample_fast

DEFAULT_PRIOR = PixelCNNConfig(outline_modes=PRIOR_OUTLINE_MODES, windowed=PRIOR_WINDOWED)  # a run's default prior


def default_prior(grid_size: int) -> GatedPixelCNN:
    """The prior a run gets by default, at `grid_size`, with random weights (speed does not depend on them)."""
    return GatedPixelCNN(dataclasses.replace(DEFAULT_PRIOR, grid_size=grid_size)).eval()


def full_outlines(batch_size: int, grid_size: int) -> torch.Tensor:
    """Outlines [B, G, G] covering every code (what they cover does not change the work)."""
    return torch.ones(batch_size, grid_size, grid_size, dtype=torch.int64)


@torch.no_grad()
def naive_seconds_per_position(model: GatedPixelCNN, grid_size: int, batch_size: int, positions: int) -> float:
    """Mean time of `positions` naive sampling steps (one full forward pass each)."""
    codes = torch.zeros(batch_size, grid_size, grid_size, dtype=torch.int64)
    slices = torch.randint(0, 32, (batch_size,))
    uniforms = torch.rand(batch_size)

    outlines = full_outlines(batch_size, grid_size)

    def run() -> None:
        for index in range(positions):
            row, column = divmod(index, grid_size)
            codes[:, row, column] = choose_codes(model(codes, slices, outlines)[:, :, row, column], uniforms)
    return seconds(run) / positions


def fast_seconds(model: GatedPixelCNN, grid_size: int, batch_size: int) -> float:
    uniforms = draw_uniforms(batch_size, grid_size, torch.Generator().manual_seed(0))
    slices = torch.randint(0, 32, (batch_size,))
    return seconds(lambda: sample_fast(model, uniforms, slices, context=full_outlines(batch_size, grid_size)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--naive-positions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    add_output_arguments(parser, "sampling")
    args = parser.parse_args()
    if args.quick:
        args.grid_sizes, args.naive_positions, args.rounds = [8], 4, 1
    env = environment(args)
    measures = {}
    for grid_size in args.grid_sizes:
        torch.manual_seed(0)
        model = default_prior(grid_size)
        naive_seconds_per_position(model, grid_size, args.batch_size, 1)  # warm-up
        measures[f"fast {grid_size}"] = lambda model=model, size=grid_size: fast_seconds(model, size, args.batch_size)
        measures[f"naive {grid_size}"] = lambda model=model, size=grid_size: naive_seconds_per_position(
            model, size, args.batch_size, args.naive_positions)
    with CpuShare() as share:
        rounds = interleaved(measures, args.rounds)

    results, rows = [], []
    for grid_size in args.grid_sizes:
        fast, per_position = median(rounds[f"fast {grid_size}"]), median(rounds[f"naive {grid_size}"])
        naive = per_position * grid_size**2
        results.append({"grid_size": grid_size, "fast_seconds_per_batch": fast,
                        "naive_seconds_per_position": per_position, "naive_seconds_per_batch_scaled": naive,
                        "ratio_naive_over_fast": naive / fast, "fast_rounds": rounds[f"fast {grid_size}"],
                        "naive_per_position_rounds": rounds[f"naive {grid_size}"]})
        rows.append([f"{grid_size}x{grid_size}", fast, per_position, naive, f"{naive / fast:.0f}x"])
    print(f"\nsampling, batch {args.batch_size}, {env['machine']}, torch {env['torch']}, {env['threads']} threads; "
          f"medians of {args.rounds} rounds, naive timed over {args.naive_positions} positions")
    print(table(["grid", "fast s per batch", "naive s per position", "naive s per batch (scaled)",
                 "naive / fast"], rows))
    print(share.line())
    write_json(json_path(args, "sampling"), {
        "benchmark": "sampling", **env, "quick": args.quick, "batch_size": args.batch_size,
        "rounds": args.rounds, "cpu_share": share.record(),
        "naive_positions": args.naive_positions, "prior": DEFAULT_PRIOR.__dict__,
        "results": results})


if __name__ == "__main__":
    main()
