"""Checkpoints: safetensors files with a JSON header, written atomically, loaded without unpickling.

A checkpoint is one `.safetensors` file: named tensors plus a JSON metadata string under the key "brainvq"
(epoch, step, optimizer hyper-parameters...). One file means one atomic rename, so a kill can never leave
weights and metadata out of step. safetensors parses a fixed binary header and raw tensor bytes only; a pickle
(or anything else) where a checkpoint is expected is refused with a `CheckpointError`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from brainvq.atomic import atomic_path
from brainvq.errors import CheckpointError

METADATA_KEY = "brainvq"


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write `tensors` (contiguous CPU copies are made) and JSON-able `metadata` to `path` atomically."""
    cpu_tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    # Serialised in memory, then written by Python: a failed write (disk full) is then an OSError, which
    # atomic_path reports clearly, where safetensors' own file writer raises its own error type.
    data = save(cpu_tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read any safetensors file, brainvq's or not: (tensors on CPU, its string metadata, possibly empty)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file does not exist" if not path.exists() else "not a file", path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            stored = handle.metadata() or {}
            names = handle.keys()  # safe_open is no mapping: iterating it directly is not supported
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"not a valid safetensors checkpoint ({_first_line(error)})", path) from None
    return tensors, stored


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`: (tensors on CPU, metadata)."""
    tensors, stored = load_safetensors(path)
    try:
        metadata = json.loads(stored.get(METADATA_KEY, "null"))
    except (ValueError, RuntimeError) as error:  # RecursionError (deeply nested JSON) is a RuntimeError
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


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: Any,
                      prefix: str = "optim.", source: str | Path = "checkpoint") -> None:
    """Inverse of `optimizer_tensors`, refusing state that does not fit the optimizer's parameters.

    A tampered or foreign checkpoint would otherwise load silently and fail (or train on NaN) at the next
    optimizer step: every parameter must have the same state entries, and each entry must be finite and either
    a scalar for every parameter or shaped like each parameter (see `_entry_problem`).
    """
    try:
        state: dict[int, dict[str, Any]] = {}
        for name, tensor in tensors.items():
            if name.startswith(prefix):
                param_id, key = name[len(prefix):].split(".", 1)
                state.setdefault(int(param_id), {})[key] = tensor
        for param_id, values in saved.get("scalars", {}).items():
            state.setdefault(int(param_id), {}).update(values)
        current = optimizer.state_dict()["param_groups"]
        groups = saved["param_groups"]
        if problem := _param_groups_problem(groups, current):
            raise CheckpointError(f"optimizer state does not fit this model: {problem}", source)
        # How torch computes the step is this optimizer's choice, not the checkpoint's (a run saved before the
        # optimizer was fused resumes fused): the update and the state are the same.
        groups = [group | {key: now[key] for key in IMPLEMENTATION_KEYS if key in now}
                  for group, now in zip(groups, current, strict=True)]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (AttributeError, KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"optimizer state does not fit this model ({_first_line(error)})", source) from None
    params = [param for group in optimizer.param_groups for param in group["params"]]
    states = [optimizer.state.get(param, {}) for param in params]
    for param, param_state in zip(params, states, strict=True):
        # Moments come back contiguous; give them their parameter's layout (channels_last under bf16). The fused
        # CPU AdamW walks a parameter and its moments as flat memory, so mismatched strides pair the wrong
        # elements: without this a resumed bf16 run took different steps from an uninterrupted one.
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
    if len({frozenset(state) for state in states}) > 1:
        raise CheckpointError("optimizer state is incomplete: its parameters do not all have the same entries",
                              source)
    for key in states[0] if states else ():
        if problem := _entry_problem([state[key] for state in states], params):
            raise CheckpointError(f"optimizer state {key} {problem}", source)


# Param-group settings that choose how torch computes an optimizer step, not what it computes.
IMPLEMENTATION_KEYS = ("foreach", "fused")


def _param_groups_problem(saved: Any, current: list[dict[str, Any]]) -> str | None:
    """What makes saved param_groups unusable for an optimizer whose own groups are `current`, if anything.

    Numeric hyper-parameters both have (lr, betas, eps...) must be finite numbers; the others (amsgrad,
    maximize...) select the algorithm and the state it keeps, so they must be equal, but for IMPLEMENTATION_KEYS.
    Keys only one of them has are left to torch, so that a checkpoint of another torch version still loads.
    """
    if not isinstance(saved, list) or len(saved) != len(current) or not all(isinstance(g, dict) for g in saved):
        return f"expected {len(current)} parameter group(s)"
    for saved_group, group in zip(saved, current, strict=True):
        params = saved_group.get("params")
        if not isinstance(params, list) or len(params) != len(group["params"]) or not all(
                type(param_id) is int for param_id in params):
            return f"expected {len(group['params'])} parameter ids per group"
        for key in saved_group.keys() & group.keys() - {"params", *IMPLEMENTATION_KEYS}:
            if not _same_kind(saved_group[key], group[key]):
                return f"{key} is {saved_group[key]!r} where this optimizer has {group[key]!r}"
    return None


def _same_kind(saved: Any, current: Any) -> bool:
    if isinstance(current, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(current) and all(map(_same_kind, saved, current))
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    return type(saved) is type(current) and saved == current


def _entry_problem(values: list[Any], params: list[torch.Tensor]) -> str | None:
    """What is wrong with one optimizer state entry (e.g. exp_avg) across all parameters, if anything.

    It must be a finite number for every parameter, a floating point scalar tensor for every parameter (Adam's
    step), or a tensor of each parameter's shape and dtype (Adam's moments).
    """
    if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        return None if all(math.isfinite(value) for value in values) else "holds NaN or infinite values"
    if not all(isinstance(value, torch.Tensor) for value in values):
        return "mixes numbers and tensors"
    scalars = all(value.dim() == 0 and value.is_floating_point() for value in values)
    shaped = all(value.shape == param.shape and value.dtype == param.dtype
                 for value, param in zip(values, params, strict=True))
    if not (scalars or shaped):
        return "is neither a float scalar nor shaped like its parameter for every parameter"
    if not all(torch.isfinite(value).all() for value in values):
        return "holds NaN or infinite values"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
