"""Training-step throughput of the VQ-VAE and of the PixelCNN prior, and its share of the machine's bf16 peak.

For each model, three variants of one full training step (forward, loss, backward, AdamW step) on one batch:

- `fp32_nchw_eager`: the baseline, fp32 and NCHW tensors, no compilation;
- `default`: what `brainvq train-vqvae` / `train-prior` run on CPU: the model prepared as `brainvq.api` prepares
  it (`runtime.prepare_module`: channels_last for bf16), bf16 autocast, and the training loop's own step:
  `training.loop.forward_backward` (autocast, the task's `training_step`, backward, gradient clipping), the
  loop's buffer snapshot and finiteness check, AdamW;
- `compiled`: the default path with the task's network replaced by `torch.compile(model)`, as training does with
  `--compile on` (the default on CUDA); skipped with `--no-compile`; a compile failure is recorded, not fatal. The
  first calls, which compile, are timed separately and not counted.

Floating-point operations per step are counted once with `torch.utils.flop_counter.FlopCounterMode` (matrix
products and convolutions, forward and backward). The bf16 matmul peak (`peak.py`) is measured in every round,
interleaved with the training steps. All variants of both models run in every round. Speed-ups and shares of
the peak are taken within each round (the figures of one round were measured under the same load) and the
median over rounds is reported; images/s are medians (and the best round, the least disturbed one). Inputs are
random (images uniform in [0, 1], codes uniform): the speed of a step does not depend on the values.

Targets (checked on the default path, the one training uses): VQ-VAE >= 3x fp32 eager and >= 40% of the
measured bf16 peak; prior >= 2.5x fp32 eager. Run from the repository root:

    python benchmarks/train_throughput.py [--batch-size 16] [--rounds 5] [--steps 2] [--no-compile]
                                          [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
from collections.abc import Callable
from typing import Any

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
    verdict,
    write_json,
)
from peak import REFERENCE_SIZE, peak_gflops
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from brainvq.config import PRIOR_BATCH_SIZE, TrainConfig, VQVAEConfig
from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.models.vqvae import VQVAE
from brainvq.runtime import autocast, prepare_module
from brainvq.training.loop import forward_backward, new_optimizer
from brainvq.training.prior import PriorTask
from brainvq.training.vqvae import VQVAETask

VARIANTS = {"fp32_nchw_eager": "fp32", "default": "bf16", "compiled": "bf16"}
TARGETS = {"vqvae": {"speedup": 3.0, "peak_share": 0.40}, "prior": {"speedup": 2.5}}


class TrainingStep:
    """One training step as `training/loop.py` takes it in a single process, on a fixed batch `self.batch`."""

    def __init__(self, task: Any, batch: tuple[torch.Tensor, ...], precision: str) -> None:
        self.config = TrainConfig(precision=precision)
        self.task, self.batch, self.precision = task, batch, precision
        self.device = next(task.model.parameters()).device
        self.optimizer = new_optimizer(task.model, self.config, self.device)
        task.model.train()
        task.start_epoch()

    def __call__(self) -> None:
        buffers = [buffer.detach().clone() for buffer in self.task.model.buffers()]  # the loop's undo snapshot
        terms, gradient_norm = forward_backward(self.task, self.batch, self.optimizer, self.config)
        if math.isfinite(float(terms["loss"].detach())) and math.isfinite(gradient_norm):
            self.optimizer.step()
        del buffers
        for value in terms.values():  # the loop sums every term as a Python float (a sync point on a GPU)
            float(value.detach())

    def images_per_second(self, steps: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            self()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return steps * len(self.batch[0]) / (time.perf_counter() - started)


def vqvae_step(precision: str, compiled: bool, batch_size: int, config: VQVAEConfig) -> TrainingStep:
    torch.manual_seed(0)
    model = prepare_module(VQVAE(config), torch.device("cpu"), precision)  # as api.train_vqvae does
    unused_validation = TensorDataset(torch.zeros(1, 1, config.image_size, config.image_size), torch.zeros(1))
    task = VQVAETask(model, unused_validation, precision=precision)
    if compiled:
        task.network = torch.compile(model)
    images = torch.rand(batch_size, 1, config.image_size, config.image_size)
    return TrainingStep(task, (images, torch.randint(0, 32, (batch_size,))), precision)


def prior_step(precision: str, compiled: bool, batch_size: int, config: PixelCNNConfig) -> TrainingStep:
    torch.manual_seed(0)
    model = prepare_module(GatedPixelCNN(config), torch.device("cpu"), precision)  # as api.train_prior does
    codes = torch.randint(0, config.codebook_size, (batch_size, config.grid_size, config.grid_size))
    positions = torch.randint(0, config.positions, (batch_size,))
    task = PriorTask(model, TensorDataset(codes[:1], positions[:1]), precision=precision)
    if compiled:
        task.network = torch.compile(model)
    return TrainingStep(task, (codes, positions), precision)


BUILDERS: dict[str, Callable[[str, bool, int, Any], TrainingStep]] = {"vqvae": vqvae_step, "prior": prior_step}
CONFIGS = {"vqvae": VQVAEConfig(), "prior": PixelCNNConfig()}
QUICK_CONFIGS = {"vqvae": VQVAEConfig(image_size=64), "prior": PixelCNNConfig(grid_size=16)}


def flops_per_step(step: TrainingStep) -> tuple[int, dict[str, int]]:
    """FLOPs of one whole step, and of the forward pass alone in each child of the model (encoder, decoder, ...).

    The split is of the forward pass only: the counter's module attribution is unreliable in the backward pass
    (it credits most of it to the last layer). A child that is a ModuleList is never called itself, so it gets
    the sum of its members."""
    with FlopCounterMode(display=False) as counter:
        step()
    total = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, autocast(step.device, step.precision):
        step.task.training_step(step.batch)  # forward only (the graph is dropped)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name != "Global"}
    called = {name: flops for name, flops in counts.items() if name.count(".") == 1}
    lists: dict[str, int] = {}
    for name, flops in counts.items():
        child = name.rsplit(".", 1)[0]
        if name.count(".") == 2 and child not in called:
            lists[child] = lists.get(child, 0) + flops
    return total, called | lists


def prepare_variant(model: str, variant: str, args: argparse.Namespace) -> tuple[TrainingStep | None, dict]:
    """Build and warm up one variant; a failure (typically of torch.compile) is recorded, not raised."""
    info: dict[str, Any] = {}
    try:
        config = (QUICK_CONFIGS if args.quick else CONFIGS)[model]
        step = BUILDERS[model](VARIANTS[variant], variant == "compiled", args.batch_size, config)
        info["first_step_seconds"] = seconds(step)  # compiles, for the compiled variant
        info["warmup_seconds"] = seconds(lambda: [step() for _ in range(args.warmup)])
    except Exception as error:  # any compile error: report it and carry on without the variant
        info["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        info["traceback_tail"] = traceback.format_exc()[-2000:]
        print(f"{model} {variant} failed: {info['error']}", flush=True)
        return None, info
    print(f"{model} {variant}: first step {info['first_step_seconds']:.1f} s", flush=True)
    return step, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=PRIOR_BATCH_SIZE,
                        help=f"images or code grids per step of both models (default {PRIOR_BATCH_SIZE}, the prior's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="training steps per round and variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after the first one")
    parser.add_argument("--peak-size", type=int, default=REFERENCE_SIZE)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include the torch.compile variant (default: yes, except with --quick)")
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    add_output_arguments(parser, "train_throughput")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.rounds, args.steps, args.warmup, args.peak_size = 2, 1, 1, 0, 256
    compile_variant = (not args.quick) if args.compile is None else args.compile
    env = environment(args)

    steps: dict[str, TrainingStep] = {}
    records: dict[str, dict[str, Any]] = {}
    for model in args.models:
        records[model] = {"variants": {}}
        for variant in VARIANTS:
            if variant == "compiled" and not compile_variant:
                continue
            step, info = prepare_variant(model, variant, args)
            records[model]["variants"][variant] = info
            if step is not None:
                steps[f"{model} {variant}"] = step
        flops, per_module = flops_per_step(steps[f"{model} default"])
        records[model] |= {"flops_per_step": flops, "flops_per_image": flops / args.batch_size,
                           "forward_flops_by_module": per_module}

    measures: dict[str, Callable[[], float]] = {"peak": lambda: peak_gflops("bf16", args.peak_size, repeats=2)}
    measures |= {name: (lambda step=step: step.images_per_second(args.steps)) for name, step in steps.items()}
    with CpuShare() as share:
        rounds = interleaved(measures, args.rounds)
    peak_rounds = rounds.pop("peak")
    peak = median(peak_rounds)

    rows, checks = [], []
    for model, record in records.items():
        baseline = rounds[f"{model} fp32_nchw_eager"]
        for variant, info in record["variants"].items():
            if "error" in info:
                rows.append([model, variant, "failed", "", "", "", "", info["error"][:60]])
                continue
            values = rounds[f"{model} {variant}"]
            gflops = [rate * record["flops_per_image"] / 1e9 for rate in values]
            # Ratios are taken within each round (same load), then the median over rounds is reported.
            info |= {"images_per_second": values, "images_per_second_median": median(values),
                     "images_per_second_best": max(values),
                     "speedup_over_fp32": median([rate / base for rate, base in zip(values, baseline, strict=True)]),
                     "achieved_gflops_median": median(gflops),
                     "share_of_bf16_peak": median([g / p for g, p in zip(gflops, peak_rounds, strict=True)])}
            rows.append([model, variant, median(values), max(values), f"{info['speedup_over_fp32']:.2f}x",
                         median(gflops), f"{info['share_of_bf16_peak']:.0%}", f"{info['first_step_seconds']:.1f}"])
        default = record["variants"]["default"]
        target = TARGETS[model]
        checks.append((f"{model} default >= {target['speedup']}x fp32 eager",
                       default["speedup_over_fp32"] >= target["speedup"], f"{default['speedup_over_fp32']:.2f}x"))
        if "peak_share" in target:
            checks.append((f"{model} default >= {target['peak_share']:.0%} of bf16 peak",
                           default["share_of_bf16_peak"] >= target["peak_share"],
                           f"{default['share_of_bf16_peak']:.0%}"))

    print(f"\ntraining step, batch {args.batch_size}, {env['machine']}, torch {env['torch']}, "
          f"{env['threads']} threads; medians of {args.rounds} rounds of {args.steps} steps")
    print(table(["model", "variant", "images/s (median)", "images/s (best round)", "x fp32 eager", "GFLOP/s",
                 "share of bf16 peak", "first step s"], rows))
    print(f"bf16 matmul peak in this run: {peak:.0f} GFLOP/s (n = {args.peak_size}, median of {args.rounds} rounds); "
          + ", ".join(f"{model} {record['flops_per_image'] / 1e9:.1f} GFLOP per image and step"
                      for model, record in records.items()))
    print(share.line())
    for name, holds, figure in checks:
        print(f"target {name}: {figure}, {verdict(holds)}")
    write_json(json_path(args, "train_throughput"), {
        "benchmark": "train_throughput", **env, "batch_size": args.batch_size, "rounds": args.rounds,
        "steps_per_round": args.steps, "quick": args.quick, "bf16_peak_gflops_rounds": peak_rounds,
        "bf16_peak_gflops_median": peak, "cpu_share": share.record(), "peak_size": args.peak_size, "models": records,
        "targets": [{"name": name, "holds": holds, "value": figure} for name, holds, figure in checks]})


if __name__ == "__main__":
    main()
