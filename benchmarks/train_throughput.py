"""VQ-VAE training step: fp32 NCHW eager (baseline) against the default path (bf16 autocast + channels_last).

Both variants train the same default VQ-VAE on the same random batch, measured side by side in one process and
interleaved (baseline, default, baseline, ...) so that machine noise hits both alike; the median of the rounds
is reported. Run from the repository root:

    python benchmarks/train_throughput.py [--batch-size 16] [--rounds 5] [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from brainvq.config import VQVAEConfig
from brainvq.models.vqvae import VQVAE
from brainvq.runtime import autocast, machine_description, prepare_images, prepare_module, resolve_device


def make_step(precision: str, device: torch.device, batch_size: int):
    torch.manual_seed(0)
    model = prepare_module(VQVAE(VQVAEConfig()).train(), device, precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = prepare_images(torch.rand(batch_size, 1, 256, 256), device, precision)

    def step() -> None:
        with autocast(device, precision):
            loss = model.loss(images, model(images))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def images_per_second(step, steps: int, batch_size: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round and variant")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    variants = {"fp32_nchw_eager": make_step("fp32", device, args.batch_size),
                "bf16_channels_last": make_step("bf16", device, args.batch_size)}
    for step in variants.values():  # warm-up: first calls pick kernels and allocate
        step()
        step()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            rates[name].append(images_per_second(step, args.steps, args.batch_size, device))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "benchmark": "train_throughput",
        "machine": machine_description(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "images_per_second_median": medians,
        "images_per_second_rounds": rates,
        "ratio_default_over_fp32": medians["bf16_channels_last"] / medians["fp32_nchw_eager"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
