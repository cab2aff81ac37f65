"""One training loop for every model: precision, progress, metrics.jsonl, checkpoints and exact resume.

A model plugs in through a `TrainingTask` (training/vqvae.py for the VQ-VAE): what one step computes, what to
measure over an epoch, how to validate. The loop owns everything else:

- randomness is re-seeded at the start of every epoch from (seed, epoch), so a run resumed from the checkpoint
  of epoch k draws exactly the batches and restarts that an uninterrupted run draws from epoch k+1 on;
- after every epoch it validates, then writes `checkpoints/last.safetensors` (model, optimizer, and the whole
  metrics history in the header) in one atomic rename, `checkpoints/best.safetensors` when the selection metric
  improved, and rewrites `metrics.jsonl` from that history, so each finished epoch is in it exactly once;
- `max_steps` and `max_minutes` (total across resumes, validation included) end training early; the epoch in
  flight is then validated and saved as a partial epoch;
- a step whose loss or gradient is not finite is skipped (its buffer updates undone, a warning printed, counted
  in the epoch's `skipped_steps`); MAX_BAD_STEPS of them in a row stop the run with a `TrainingError`, before
  anything is saved, so the last good checkpoint stays as it was;
- the learning rate warms up over `warmup_steps`, stays, and falls to 0 over the last `cooldown` share of the
  run (of its steps or its minutes, whichever limit is nearer);
- gradients are clipped to `max_grad_norm`; the epoch's mean norm before clipping is logged as `grad_norm`;
- freed memory is kept for reuse (runtime.reuse_freed_memory): without it every step page-faults its
  activations in anew, which halved fp32 speed;
- the network runs through torch.compile when `config.compile` says so (runtime.compile_enabled); validation
  and checkpoints use the plain model;
- under torchrun the model is wrapped in DDP and each process trains on its share of every global batch
  (distributed.py has the rules).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo.exc import TorchDynamoException
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from brainvq.atomic import atomic_write_bytes, remove_stale_temporaries
from brainvq.checkpoint import (
    load_checkpoint,
    load_module_state,
    module_tensors,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from brainvq.config import TrainConfig
from brainvq.distributed import barrier, is_main, largest_over_processes, rank, world_size
from brainvq.errors import CheckpointError, ConfigError, TrainingError
from brainvq.run import BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_FILE
from brainvq.runtime import autocast, compile_enabled, reuse_freed_memory, seed_everything

MAX_BAD_STEPS = 10  # non-finite losses in a row that stop a run: by then it is the recipe, not a fluke


class TrainingTask(Protocol):
    model: nn.Module  # what is trained, validated and saved
    network: nn.Module  # what training_step runs forward: the model, or it wrapped in DDP and/or torch.compile
    selection_metric: str  # a key of validate()'s result: the best checkpoint is chosen by it
    higher_is_better: bool  # True for SSIM, False for a negative log-likelihood
    static_shapes: bool  # whether every step's tensors have the same shapes (torch.compile needs them to)

    def training_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward pass of one batch (under autocast); must return at least {"loss": scalar}."""

    def start_epoch(self) -> None:
        """Reset whatever `epoch_metrics` accumulates."""

    def epoch_metrics(self) -> dict[str, float]:
        """Figures accumulated over the epoch's training steps (e.g. codebook usage)."""

    def validate(self) -> dict[str, float]:
        """Validation figures; must contain `selection_metric`."""


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def new_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `model`'s weights at `config`'s learning rate and weight decay, fused (one kernel for all weights
    per step) on the CPU and CUDA, where PyTorch has the fused kernel.

    Why fused: the prior's position-logit tables hold 8.4M weights, and the default per-tensor AdamW took ~43 ms of
    its ~0.6 s step on the 2-core CPU, the fused one ~8 ms (benchmarks/RESULTS.md). Same update, same state."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def train(task: TrainingTask, train_set: Dataset, run_dir: Path, config: TrainConfig, device: torch.device,
          *, resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Train `task.model` (already on `device`) and return the metrics history, one dict per epoch.

    Under torchrun (distributed.py) every process calls this; rank 0 alone validates and writes files, and only
    its returned history is complete."""
    run_dir = Path(run_dir)
    reuse_freed_memory()
    processes, main = world_size(), is_main()
    if config.batch_size % processes:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {processes} processes")
    optimizer = new_optimizer(task.model, config, device)
    history: list[dict[str, Any]] = []
    step, seconds_so_far = 0, 0.0
    if main:  # a kill during an atomic write leaves its temporary file behind
        for folder in (run_dir, run_dir / "checkpoints"):
            remove_stale_temporaries(folder)
    # Resuming a run killed before its first checkpoint starts it from the beginning: nothing was saved to lose.
    if resume and (run_dir / LAST_CHECKPOINT).exists():
        history, step, seconds_so_far = _resume(task.model, optimizer, run_dir / LAST_CHECKPOINT)
        if main:
            _write_metrics(run_dir, history)
    if processes > 1:  # DDP averages the gradients over the processes during backward
        task.network = DistributedDataParallel(task.model, device_ids=[device] if device.type == "cuda" else None)
    if compile_enabled(config.compile, device, static_shapes=task.static_shapes):
        task.network = torch.compile(task.network)
    sign = 1.0 if task.higher_is_better else -1.0  # compare `sign * metric`, so that higher is always better
    best = max((sign * record["val"][task.selection_metric] for record in history), default=-math.inf)
    first_epoch = history[-1]["epoch"] + 1 if history else 1
    started = time.monotonic() - seconds_so_far
    budget = _budget_seconds(config)
    validation_seconds = 0.0
    bad_steps_in_a_row = 0
    if main and first_epoch > config.epochs:
        print(f"brainvq: nothing to train: the run has done {first_epoch - 1} epochs and --epochs is {config.epochs}; "
              f"pass a larger --epochs to continue it", file=sys.stderr)

    for epoch in range(first_epoch, config.epochs + 1):
        seed_everything(epoch_seed(config.seed, epoch))
        loader = epoch_loader(train_set, config, epoch, device)
        if main and epoch == first_epoch:  # after the loader, which refuses a batch larger than the data
            _announce_limits(config, first_epoch, seconds_so_far)
        task.model.train()
        task.start_epoch()
        sums: dict[str, float] = {}
        steps_this_epoch, skipped_steps, stop_reason = 0, 0, None
        epoch_started = time.monotonic()
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not (progress and main), leave=False,
                   file=sys.stderr, dynamic_ncols=True)
        for batch in bar:
            if config.max_steps is not None and step >= config.max_steps:
                stop_reason = "max_steps"
                break
            # Seconds as the slowest process counts them, so that every process stops and sets its learning
            # rate alike; the last validation's length is counted ahead for the one still to come.
            seconds = _latest_over_processes(time.monotonic() - started + validation_seconds,
                                             device) if budget < math.inf else 0.0
            if seconds >= budget:
                stop_reason = "max_minutes"
                break
            _set_learning_rate(optimizer, config, step, _share_done(config, step, seconds, len(loader)))
            before = _model_state(task.model)
            terms, gradient_norm = forward_backward(task, batch, optimizer, config)
            finite = math.isfinite(float(terms["loss"].detach())) and math.isfinite(gradient_norm)
            if _in_any_process(not finite, device):
                # Skipping must also undo what the forward pass changed: the EMA codebook's buffers, and a
                # dead-code restart, which writes the codebook itself (a parameter under --no-ema).
                _restore_model_state(task.model, before)
                bad_steps_in_a_row += 1
                skipped_steps += 1
                _skip_non_finite_step(bad_steps_in_a_row, epoch, step, run_dir)
                continue
            bad_steps_in_a_row = 0
            optimizer.step()
            step += 1
            steps_this_epoch += 1
            for name, value in (terms | {"grad_norm": torch.tensor(gradient_norm)}).items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{sums['loss'] / steps_this_epoch:.4f}", refresh=False)
        bar.close()
        train_seconds = time.monotonic() - epoch_started
        if steps_this_epoch == 0:
            if stop_reason is not None:
                break  # the budget ran out exactly at an epoch boundary: nothing new to validate or save
            continue  # every step was skipped: the model is the one already saved

        train_means = _mean_over_processes(sums, steps_this_epoch, device)
        if main:
            validation_started = time.monotonic()
            task.model.eval()
            validation = task.validate()
            validation_seconds = time.monotonic() - validation_started
            record = {
                "epoch": epoch,
                "step": step,
                "train": train_means | task.epoch_metrics(),
                "val": validation,
                "images_per_second": steps_this_epoch * config.batch_size / train_seconds,
                "epoch_seconds": time.monotonic() - epoch_started,
                "elapsed_seconds": time.monotonic() - started,
                "lr": optimizer.param_groups[0]["lr"],
                "partial": stop_reason is not None,
                "skipped_steps": skipped_steps,
            }
            history.append(record)
            improved = sign * validation[task.selection_metric] > best
            best = max(best, sign * validation[task.selection_metric])
            _save(run_dir, task.model, optimizer, history, step, improved)
            if progress:
                print(_summary_line(record, task.selection_metric), file=sys.stderr)
        barrier()  # the others wait while rank 0 validates and saves
        if stop_reason is not None:
            break
    task.network = task.model
    return history


def _announce_limits(config: TrainConfig, first_epoch: int, seconds_so_far: float) -> None:
    """Say on stderr, before the first step, what will stop this training and how to lift it, or that a resumed
    run has already spent its minutes."""
    limits = [f"epochs {first_epoch}..{config.epochs}"]
    if config.max_steps is not None:
        limits.append(f"at most {config.max_steps} steps in all")
    if config.max_minutes is not None:
        left = config.max_minutes - seconds_so_far / 60
        if left <= 0:
            print(f"brainvq: nothing to train: the run has spent its {config.max_minutes:g}-minute budget; pass a "
                  f"larger --max-minutes, or --max-minutes 0 for no time limit", file=sys.stderr)
            return
        limits.append(f"at most {config.max_minutes:g} minutes of training in all ({left:.1f} left; "
                      f"--max-minutes 0 lifts the limit)")
    print(f"training: {', '.join(limits)}", file=sys.stderr)


def _model_state(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every parameter and buffer: what a forward pass may change in place."""
    return [tensor.detach().clone() for tensor in (*model.parameters(), *model.buffers())]


def _restore_model_state(model: nn.Module, state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for tensor, saved in zip((*model.parameters(), *model.buffers()), state, strict=True):
            tensor.copy_(saved)


def epoch_loader(train_set: Dataset, config: TrainConfig, epoch: int, device: torch.device) -> DataLoader:
    """This process's batches of one epoch: every process shuffles with the same seed, and each takes its
    batch_size / processes share of every global batch (one process: a plain seeded shuffle)."""
    processes = world_size()
    sampler = DistributedSampler(train_set, num_replicas=processes, rank=rank(), shuffle=True,
                                 seed=epoch_seed(config.seed, epoch), drop_last=True)
    loader = DataLoader(train_set, batch_size=config.batch_size // processes, sampler=sampler, drop_last=True,
                        pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the training set "
                          f"({len(train_set)} images)")
    return loader


def forward_backward(task: TrainingTask, batch: Any, optimizer: torch.optim.Optimizer,
                      config: TrainConfig) -> tuple[dict[str, torch.Tensor], float]:
    """Loss terms and gradients of one batch, the gradients clipped to `max_grad_norm`; returns (terms, norm
    before clipping)."""
    try:
        with autocast(task_device(task), config.precision):
            terms = task.training_step(batch)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
    except TorchDynamoException as error:  # e.g. Inductor on a CPU without a C++ compiler
        raise TrainingError(f"torch.compile failed ({str(error).splitlines()[0][:200]}); "
                            "train with --compile off") from error
    limit = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    return terms, float(nn.utils.clip_grad_norm_(task.model.parameters(), limit))


def _skip_non_finite_step(bad_steps_in_a_row: int, epoch: int, step: int, run_dir: Path) -> None:
    if bad_steps_in_a_row >= MAX_BAD_STEPS:
        raise TrainingError(f"the loss was not finite in {bad_steps_in_a_row} steps in a row (epoch {epoch}, after "
                            f"step {step}); training stopped. The last good checkpoint is intact; try a lower --lr",
                            run_dir / LAST_CHECKPOINT)
    if is_main():
        print(f"brainvq: warning: non-finite loss at epoch {epoch}, after step {step}: step skipped",
              file=sys.stderr)


def _in_any_process(flag: bool, device: torch.device) -> bool:
    """`flag` of this process, or'ed over all processes so that every process takes the same branch."""
    return bool(largest_over_processes(torch.tensor([float(flag)], device=device)))


def _mean_over_processes(sums: dict[str, float], steps: int, device: torch.device) -> dict[str, float]:
    """Per-step means of the summed training figures, averaged over all processes."""
    totals = torch.tensor([sums[name] for name in sorted(sums)], dtype=torch.float64, device=device)
    if world_size() > 1:
        dist.all_reduce(totals)
    return {name: float(total) / (steps * world_size()) for name, total in zip(sorted(sums), totals, strict=True)}


def task_device(task: TrainingTask) -> torch.device:
    return next(task.model.parameters()).device


def _latest_over_processes(seconds: float, device: torch.device) -> float:
    """The largest of every process's `seconds` (this process's own when alone)."""
    return float(largest_over_processes(torch.tensor([seconds], device=device)))


def _share_done(config: TrainConfig, step: int, seconds: float, steps_per_epoch: int) -> float:
    """How much of the run is done, 0..1, by whichever of its limits (epochs, max_steps, max_minutes) is
    nearest: `step` optimizer steps and `seconds` of its minutes spent, with `steps_per_epoch` steps an epoch."""
    shares = [step / (config.epochs * steps_per_epoch)]
    if config.max_steps is not None:
        shares.append(step / config.max_steps)
    shares.append(seconds / _budget_seconds(config))  # 0 without a time limit
    return min(1.0, max(shares))


def _budget_seconds(config: TrainConfig) -> float:
    """The run's time limit in seconds (infinite without one)."""
    return math.inf if config.max_minutes is None else config.max_minutes * 60


def _set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, share_done: float) -> None:
    """Linear warm-up over `warmup_steps`, constant, then a linear fall to 0 over the last `cooldown` share of
    the run. A run continued with a larger budget picks up the rate that its new end implies."""
    scale = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.cooldown:
        scale *= min(1.0, (1.0 - share_done) / config.cooldown)
    for group in optimizer.param_groups:
        group["lr"] = config.lr * scale


def _save(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, history: list[dict[str, Any]],
          step: int, improved: bool) -> None:
    record = history[-1]
    weights = module_tensors(model, "model.")
    if improved:
        save_checkpoint(run_dir / BEST_CHECKPOINT, weights, {"epoch": record["epoch"], "step": step,
                                                              "val": record["val"]})
    optim_tensors, optim_state = optimizer_tensors(optimizer)
    save_checkpoint(run_dir / LAST_CHECKPOINT, weights | optim_tensors,
                    {"epoch": record["epoch"], "step": step, "history": history, "optimizer": optim_state,
                     "elapsed_seconds": record["elapsed_seconds"]})
    _write_metrics(run_dir, history)


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer,
            path: Path) -> tuple[list[dict[str, Any]], int, float]:
    """Load the last checkpoint into model and optimizer: (history, global step, training seconds so far)."""
    tensors, metadata = load_checkpoint(path)
    try:
        history, step, elapsed = metadata["history"], int(metadata["step"]), float(metadata["elapsed_seconds"])
        optimizer_state = metadata["optimizer"]
        valid_history = isinstance(history, list) and all(
            isinstance(record, dict) and type(record.get("epoch")) is int and isinstance(record.get("val"), dict)
            for record in history)
    except (KeyError, TypeError, ValueError):
        valid_history = False
    if not valid_history:
        raise CheckpointError("checkpoint header lacks the training state (history, step, optimizer)", path)
    load_module_state(model, tensors, prefix="model.", source=path)
    restore_optimizer(optimizer, tensors, optimizer_state, source=path)
    return history, step, elapsed


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in history)
    atomic_write_bytes(run_dir / METRICS_FILE, lines.encode())


def _summary_line(record: dict[str, Any], selection_metric: str) -> str:
    return (f"epoch {record['epoch']}: loss {record['train']['loss']:.4f}  "
            f"{selection_metric} {record['val'][selection_metric]:.4f}  "
            f"{record['images_per_second']:.1f} img/s  {record['elapsed_seconds'] / 60:.1f} min")
