"""Data-parallel training across the processes that `torchrun` starts (PyTorch DDP).

    torchrun --nproc-per-node 4 -m brainvq train-vqvae --data DIR --out RUN --batch-size 64

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each process; `process_group` joins them into one group (nccl on
CUDA, gloo on CPU) and gives each process its device (cuda:LOCAL_RANK on a GPU node). Multi-node runs use
torchrun's usual --nnodes/--node-rank/--rdzv-endpoint flags; nothing else changes.

The rules that make K processes train the same model one process would:
- `--batch-size` is the global batch. Each process takes batch_size / K images of every global batch, so the
  learning rate and the recipe stay the same whatever K is (raise the batch size yourself to use more devices).
- Every process draws the same permutation of the training set per epoch; process r takes its share of it
  (DistributedSampler), and DDP averages the gradients, as one process would over the whole global batch.
- What needs the batch's vectors themselves, not only their sums (the quantizer's dead-code restarts), gathers
  the global batch (`global_batch`) and draws from it with the generator state that every process shares.
- Only rank 0 validates, writes files and shows progress; the others wait for it at the end of each epoch.
Outside torchrun every helper here is a no-op for a single process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from brainvq.errors import ConfigError
from brainvq.runtime import resolve_device


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True in the process that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def largest_over_processes(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of a small tensor over all processes (itself when alone); for 0/1 flags, "is it true
    in any process?"."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def global_batch(share: torch.Tensor) -> torch.Tensor:
    """This process's share [b, ...] of a global batch -> the global batch [b * processes, ...], in the order one
    process holds it (the share itself when alone).

    epoch_loader's DistributedSampler deals the images round-robin (image i of a global batch to process
    i % processes), so the gathered shares are interleaved back: image j of process r is image j * processes + r."""
    processes = world_size()
    if processes == 1:
        return share
    share = share.contiguous()  # all_gather sends and receives dense tensors
    shares = [torch.empty_like(share) for _ in range(processes)]
    dist.all_gather(shares, share)
    return torch.stack(shares, 1).flatten(0, 1)


def process_share(values: torch.Tensor) -> torch.Tensor:
    """Values for a whole global batch [b * processes, ...] -> this process's share [b, ...], dealt as
    epoch_loader deals its images (the inverse of `global_batch`; all the values when alone)."""
    return values[rank()::world_size()]


@contextlib.contextmanager
def process_group(device_name: str = "auto") -> Iterator[torch.device]:
    """Join the torchrun process group, if launched by torchrun, and yield this process's device.

    Leaves an already initialised group (the caller's) alone; destroys the group it created on exit."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(device_name)
    if not launched or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()
