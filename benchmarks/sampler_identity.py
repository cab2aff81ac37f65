"""Fast against naive sampling of a trained run's prior at its own grid (64x64 by default), with the same random
numbers, on CUDA with TF32 matmuls/convolutions on and off (on a CPU the setting changes nothing). Prints one
JSON line per setting: how many codes differ, where each grid's first difference is, and each sampler's seconds.
Naive sampling runs the whole network once per code, so on a CPU a 64x64 grid takes hours; this is for GPUs.

    python benchmarks/sampler_identity.py RUN [--grids 4] [--tf32 on off]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from brainvq.run import load_prior
from brainvq.sampling import draw_uniforms, sample_fast, sample_naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--grids", type=int, default=4)
    parser.add_argument("--tf32", nargs="+", choices=["on", "off"], default=["on", "off"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prior = load_prior(args.run)[0].to(device)
    uniforms = draw_uniforms(args.grids, prior.config.grid_size, torch.Generator().manual_seed(0))
    positions = (torch.arange(args.grids) * 7 % prior.config.positions).to(device)
    for setting in args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setting == "on"
        grids, seconds = {}, {}
        for name, sampler in (("fast", sample_fast), ("naive", sample_naive)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            grids[name] = sampler(prior, uniforms, positions).cpu()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - started
        differs = (grids["fast"] != grids["naive"]).flatten(1)
        first = [int(row.nonzero()[0]) if row.any() else -1 for row in differs]  # raster index, -1: identical
        print(json.dumps({"tf32": setting, "grid": prior.config.grid_size, "grids": args.grids,
                          "codes_differing": int(differs.sum()), "grids_differing": int(differs.any(1).sum()),
                          "first_difference_per_grid": first, "seconds": seconds,
                          "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}), flush=True)


if __name__ == "__main__":
    main()
