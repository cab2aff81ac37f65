"""Checkpoints: safetensors files with a JSON header, written atomically, loaded without unpickling.

A checkpoint is one `.safetensors` file: named tensors plus a JSON metadata string under the key "brainvq"
(epoch, step, optimizer hyper-parameters...). One file means one atomic rename, so a kill can never leave
weights and metadata out of step. safetensors parses a fixed binary header and raw tensor bytes only; a pickle
(or anything else) where a checkpoint is expected is refused with a `CheckpointError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from brainvq.atomic import atomic_path
from brainvq.errors import CheckpointError

METADATA_KEY = "brainvq"


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write `tensors` (contiguous CPU copies are made) and JSON-able `metadata` to `path` atomically."""
    cpu_tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(cpu_tensors, str(temporary), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`: (tensors on CPU, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file does not exist", path)
    try:
        tensors = load_file(str(path), device="cpu")
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_length))
        metadata = json.loads(header.get("__metadata__", {}).get(METADATA_KEY, "null"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"not a valid safetensors checkpoint ({_first_line(error)})", path) from None
    if not isinstance(metadata, dict):
        raise CheckpointError("safetensors file has no brainvq metadata; not a brainvq checkpoint", path)
    return tensors, metadata


def load_module_state(module: nn.Module, tensors: dict[str, torch.Tensor], *, prefix: str = "",
                      source: str | Path = "checkpoint") -> None:
    """Load `prefix`-named tensors into `module`, refusing missing or extra keys, wrong shapes or dtypes."""
    expected = module.state_dict()
    given = {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"tensors do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}", source)
    for name, tensor in given.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(
                f"tensor {prefix}{name} is {tuple(tensor.shape)} {tensor.dtype}, the model needs "
                f"{tuple(want.shape)} {want.dtype}", source)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor {prefix}{name} holds NaN or infinite values", source)
    module.load_state_dict(given, strict=True)


def module_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in module.state_dict().items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict, dict]:
    """Split an optimizer's state into tensors (for safetensors) and JSON (everything else)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict,
                      prefix: str = "optim.", source: str | Path = "checkpoint") -> None:
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith(prefix):
            param_id, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in saved.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"optimizer state does not fit this model ({_first_line(error)})", source) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
