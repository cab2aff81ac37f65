"""Where and how tensors are computed: device choice, mixed precision, memory layout, compilation, the memory
allocator and seeding.

On a CPU with native bf16 instructions (AVX-512-BF16 or AMX) the fast path is usually bf16 autocast with
channels_last tensors: about 2x fp32 NCHW on an AMD EPYC, which is what its bf16:fp32 arithmetic ratio allows
(benchmarks/RESULTS.md). Not on every such CPU: on an Intel Xeon with AVX-512-BF16 (no AMX exposed) the bf16
training steps ran at 0.84-0.91x fp32's. On a CPU without them (most laptops, AVX2 servers) bf16 is emulated
and was measured several times *slower* than fp32. So `precision="auto"` (the default) picks bf16 on a CPU only
where short timed matrix products say it is clearly faster there (`cpu_bf16_is_faster`). On CUDA it is bf16
autocast with TF32 matmuls and torch.compile. fp32 stays available everywhere (`precision="fp32"`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import random
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from brainvq.config import DEVICE_NAMES, is_device_name
from brainvq.errors import ConfigError

# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu (never mps: ask for it by name); a device that is not there is a
    ConfigError."""
    if not is_device_name(name):
        raise ConfigError(f"device must be {DEVICE_NAMES}, not {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} was asked for but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name} was asked for but this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s), numbered from 0")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps was asked for but no Apple GPU (MPS) is available to torch here")
    return device


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """CUDA matmuls and convolutions in full fp32 (no TF32) inside the block; the settings are restored after.

    Why sampling uses it: fast and naive sampling add the same products in different orders, and with TF32's
    10-bit mantissas the two samplers' logits differ enough to flip codes (one flipped code changes every code
    after it). Measured on an H200 with a trained prior at 64x64 (benchmarks/RESULTS.md): TF32 on, 799 of
    16,384 codes differed; TF32 off, none. No effect on a CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512-BF16 or AMX-BF16; Linux's /proc/cpuinfo flags).

    Why not `torch.ops.mkldnn._is_mkldnn_bf16_supported()`: it also says yes for AVX-512 CPUs that only emulate
    bf16. On a 2-core AMD EPYC without these flags (AVX2 only, torch 2.13) bf16 autocast made the VQ-VAE's
    training step 14-16x slower than fp32: 0.33 against 4.8-5.6 images/s (benchmarks/RESULTS.md, "2026-11-30: a
    machine without bf16")."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# How much faster bf16 matrix products must run than fp32 ones in `cpu_bf16_is_faster` for "auto" to train in bf16
# on a CPU. Measured ratios: 4.2x on a 2-core AMD EPYC with AVX-512-BF16 (its training steps 2x fp32's), 0.53x on
# a 2-core Intel Xeon with AVX-512-BF16 but no AMX exposed (its steps 0.84-0.91x fp32's; benchmarks/RESULTS.md).
# Far from both, so that the choice, and with it a seeded run's result, does not flip between runs on a machine.
BF16_SPEED_MARGIN = 1.25


def matmul_seconds(dtype: torch.dtype, *, size: int = 1024, repeats: int = 3) -> float:
    """Seconds for `repeats` products of two [size, size] matrices in `dtype` (the convolutions of training run
    on the same kernels, oneDNN's). Its own random generator: asking leaves the global seed's sequence as it was."""
    matrix = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(matrix, matrix)
    return time.perf_counter() - start


@functools.cache
def cpu_bf16_is_faster(rounds: int = 3) -> bool:
    """Whether this CPU multiplies bf16 matrices at least BF16_SPEED_MARGIN x as fast as fp32 ones: the best of
    `rounds` timed rounds each (after one to warm up), interleaved; a fraction of a second, once per process. A
    CPU without native bf16 (`native_cpu_bf16`) is not timed: there bf16 is emulated, 14-16x slower than fp32."""
    if not native_cpu_bf16():
        return False
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for round_ in range(rounds + 1):
        for dtype in best:
            seconds = matmul_seconds(dtype)
            if round_:
                best[dtype] = min(best[dtype], seconds)
    return best[torch.float32] >= BF16_SPEED_MARGIN * best[torch.bfloat16]


def resolve_precision(name: str, device: torch.device) -> str:
    """"auto" -> "bf16" on a bf16-capable GPU and on a CPU where bf16 is clearly faster than fp32
    (`cpu_bf16_is_faster`), else "fp32"; "bf16" and "fp32" are kept as asked."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_bf16_is_faster() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for precision "bf16", a no-op for "fp32"."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def prepare_module(module: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Move to `device`; bf16 also switches to channels_last, which oneDNN/cuDNN convolutions prefer."""
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if precision == "bf16" else module


def compile_enabled(setting: str, device: torch.device, *, static_shapes: bool = True) -> bool:
    """Whether training runs its network through torch.compile: "on", "off", or "auto" = on CUDA only, for a
    network whose steps all have the same shapes (`static_shapes`; "on" without them is a ConfigError).

    Why not on CPU by default: there it gave the VQ-VAE nothing and the prior 6% (benchmarks/RESULTS.md), for
    3-50 s of compiling and a C++ compiler that a laptop may not have. Why not with changing shapes: a windowed
    prior's window changes shape from batch to batch, and torch 2.13 failed to compile its dynamic shapes."""
    if setting == "on" and not static_shapes:
        raise ConfigError("--compile on needs a network whose steps all have the same shapes; a windowed prior's "
                          "change from batch to batch (train it with --no-windowed to compile it)")
    return static_shapes and (setting == "on" or (setting == "auto" and device.type == "cuda"))


def prepare_images(images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """[B, 1, S, S] batch to `device` in the layout `prepare_module` chose."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if precision == "bf16" else images


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel; True if set.

    Why: by default glibc serves every block above 32 MB with a fresh mmap and unmaps it on free, and trims the
    heap top when it frees. A training step allocates and frees hundreds of MB of activations, so every step
    page-faulted them in anew: 2.2 million page faults and 3.9 s of kernel time per 2 fp32 VQ-VAE steps (7.5
    images/s; 16 images/s without the faults), and 24 against 31 images/s on the default bf16 path
    (benchmarks/RESULTS.md). The price is that the process keeps its peak memory until it exits, which a
    training process does anyway. Process-wide, so only the `brainvq` command and the training loop call it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): same seed, same device -> same result."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def machine_description() -> str:
    """CPU model and usable cores (and the GPU, when one is used), for benchmark and run records."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = f"{model}, {cores} cores"
    if torch.cuda.is_available():
        description += f", {torch.cuda.get_device_name()}"
    return description
