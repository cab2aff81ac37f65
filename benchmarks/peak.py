"""The machine's measured matmul peak in GFLOP/s, fp32 and bf16: the reference limit for the other benchmarks.

Large square matrix products (C = A @ B, 2 n^3 floating-point operations each) at the default thread count,
timed one product at a time after a warm-up, computed two ways:

- `matmul`: `torch.mm`, the reference. In the CPU build bf16 goes to oneDNN and fp32 to MKL;
- `conv1x1`: the same n x n x n product as a 1x1 convolution over a channels_last tensor, which oneDNN runs in
  both dtypes. The models' convolutions run in oneDNN, so this is the fp32 figure they can reach: MKL's fp32
  GEMM may not use the best instruction set on a non-Intel CPU.

Sizes, dtypes and methods are interleaved over rounds; the table gives the best and the median of each.

Other scripts import `peak_gflops` to measure the bf16 peak in their own run, interleaved with what they
measure, so that "share of peak" compares figures taken under the same machine load. Run from the repository
root:

    python benchmarks/peak.py [--sizes 2048 4096] [--rounds 3] [--repeats 3] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("matmul", "conv1x1")
REFERENCE_SIZE = 4096  # what other scripts use by default; large enough for oneDNN/MKL to reach their best


def matmul_gflops(dtype: str, size: int = REFERENCE_SIZE, repeats: int = 3, method: str = "matmul") -> list[float]:
    """GFLOP/s of `repeats` products of two random size x size matrices of `dtype`, after one warm-up."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(DTYPES[dtype]) for _ in range(2))
    if method == "matmul":
        out = torch.empty(size, size, dtype=DTYPES[dtype])

        def product() -> None:
            torch.mm(a, b, out=out)
    else:  # images: 1 x size channels x (size/64 x 64) pixels; weights: size x size x 1 x 1
        # A fresh tensor, not a view of `b`: a view can carry strides that make PyTorch hand oneDNN another layout.
        images = torch.randn(1, size, size // 64, 64, generator=generator).to(DTYPES[dtype])
        images = images.contiguous(memory_format=torch.channels_last)
        weights = a.reshape(size, size, 1, 1).contiguous(memory_format=torch.channels_last)

        def product() -> None:
            F.conv2d(images, weights)
    product()  # warm-up: kernel choice, page faults of the output
    return [2 * size**3 / seconds(product) / 1e9 for _ in range(repeats)]


def peak_gflops(dtype: str = "bf16", size: int = REFERENCE_SIZE, repeats: int = 3) -> float:
    """Best GFLOP/s of `repeats` torch.mm products: one peak measurement, for interleaving with other work."""
    return max(matmul_gflops(dtype, size, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="products per round, dtype and size")
    add_output_arguments(parser, "peak")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.repeats = [256], 1, 2
    env = environment(args)

    rates: dict[str, list[float]] = {}

    def measure(dtype: str, method: str, size: int):
        def run() -> float:
            values = matmul_gflops(dtype, size, args.repeats, method)
            rates.setdefault(f"{dtype} {method} {size}", []).extend(values)
            return max(values)
        return run

    cases = [(dtype, method, size) for dtype in DTYPES for method in METHODS for size in args.sizes]
    with CpuShare() as share:
        interleaved({" ".join(map(str, case)): measure(*case) for case in cases}, args.rounds)

    rows, results = [], []
    for dtype, method, size in cases:
        values = rates[f"{dtype} {method} {size}"]
        results.append({"dtype": dtype, "method": method, "size": size, "best_gflops": max(values),
                        "median_gflops": median(values), "gflops": values})
        rows.append([dtype, method, size, len(values), max(values), median(values)])
    peaks = {f"{dtype} {method}": {key: max(r[key] for r in results if (r["dtype"], r["method"]) == (dtype, method))
                                   for key in ("best_gflops", "median_gflops")}
             for dtype in DTYPES for method in METHODS}
    ratio = peaks["bf16 matmul"]["median_gflops"] / peaks["fp32 matmul"]["median_gflops"]

    print(f"\nmatmul peak, {env['machine']}, torch {env['torch']}, {env['threads']} threads")
    print(table(["dtype", "method", "n (n x n @ n x n)", "products", "best GFLOP/s", "median GFLOP/s"], rows))
    print("peak (best size), best / median GFLOP/s: " + ", ".join(
        f"{name} {peak['best_gflops']:.0f} / {peak['median_gflops']:.0f}" for name, peak in peaks.items()))
    print(f"bf16 / fp32, torch.mm medians: {ratio:.2f}x")
    print(share.line())
    write_json(json_path(args, "peak"), {"benchmark": "peak", **env, "rounds": args.rounds,
                                         "repeats": args.repeats, "results": results, "peak": peaks,
                                         "ratio_bf16_over_fp32_matmul_median": ratio,
                                         "cpu_share": share.record()})


if __name__ == "__main__":
    main()
