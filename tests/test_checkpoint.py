import json
import pickle
from pathlib import Path

import pytest
import torch

from brainvq.checkpoint import (
    load_checkpoint,
    load_module_state,
    module_tensors,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from brainvq.errors import CheckpointError, OutputError


def test_round_trip_of_tensors_and_metadata(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    save_checkpoint(tmp_path / "x.safetensors", tensors, {"epoch": 3, "history": [{"ssim": 0.5}]})
    loaded, metadata = load_checkpoint(tmp_path / "x.safetensors")
    assert metadata == {"epoch": 3, "history": [{"ssim": 0.5}]}
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left behind


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PAYLOAD_MARK']).touch()",))


def test_a_pickle_with_a_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    mark = tmp_path / "payload_ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    hostile = tmp_path / "last.safetensors"
    hostile.write_bytes(pickle.dumps({"model.weight": Payload()}))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(hostile)
    assert not mark.exists()
    pickle.loads(hostile.read_bytes())  # the payload is real: unpickling would have run it
    assert mark.exists()


def test_missing_file_and_foreign_safetensors_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="no brainvq metadata"):
        load_checkpoint(tmp_path / "foreign.safetensors")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"a": torch.ones(2)}, {"epoch": 1})

    def disk_full(self, data):
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OutputError, match=r"last\.safetensors: cannot write \(No space left on device\); the "
                                          "previous version is intact"):
        save_checkpoint(path, {"a": torch.zeros(2)}, {"epoch": 2})
    tensors, metadata = load_checkpoint(path)
    assert metadata["epoch"] == 1 and torch.equal(tensors["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_module_state_refuses_missing_keys_wrong_shapes_dtypes_and_nan():
    module = torch.nn.Linear(3, 2)
    good = module_tensors(module, "model.")
    cases = {
        "missing": {"model.weight": good["model.weight"]},
        "is \\(2, 4\\)": {**good, "model.weight": torch.zeros(2, 4)},
        "torch.float64": {**good, "model.bias": torch.zeros(2, dtype=torch.float64)},
        "NaN": {**good, "model.bias": torch.tensor([float("nan"), 0.0])},
    }
    for expected_message, tensors in cases.items():
        with pytest.raises(CheckpointError, match=expected_message):
            load_module_state(torch.nn.Linear(3, 2), tensors, prefix="model.")
    fresh = torch.nn.Linear(3, 2)
    load_module_state(fresh, good, prefix="model.")
    assert torch.equal(fresh.weight, module.weight)


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    tensors, state = optimizer_tensors(optimizer)
    save_checkpoint(tmp_path / "o.safetensors", tensors | module_tensors(model, "model."), {"optimizer": state})
    loaded, metadata = load_checkpoint(tmp_path / "o.safetensors")
    json.dumps(metadata)  # everything that is not a tensor is plain JSON

    copy = torch.nn.Linear(4, 1)
    load_module_state(copy, loaded, prefix="model.")
    copy_optimizer = torch.optim.AdamW(copy.parameters(), lr=0.1)
    restore_optimizer(copy_optimizer, loaded, metadata["optimizer"])
    batch = torch.randn(8, 4)
    for net, opt in ((model, optimizer), (copy, copy_optimizer)):
        opt.zero_grad()
        net(batch).pow(2).mean().backward()
        opt.step()
    assert torch.equal(model.weight, copy.weight)


def test_a_per_tensor_optimizer_checkpoint_resumes_fused_with_the_same_steps_in_channels_last(tmp_path):
    """Runs saved before the optimizer was fused resume fused; the moments take their parameter's layout (the
    fused CPU AdamW pairs a channels_last parameter with contiguous moments element by element in memory)."""
    def conv() -> torch.nn.Conv2d:
        return torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)

    def step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
        optimizer.zero_grad()
        images = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
        net(images.contiguous(memory_format=torch.channels_last)).pow(2).mean().backward()
        optimizer.step()

    torch.manual_seed(0)
    model = conv()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False)
    for seed in range(3):
        step(model, optimizer, seed)
    tensors, state = optimizer_tensors(optimizer)
    save_checkpoint(tmp_path / "o.safetensors", tensors | module_tensors(model, "model."), {"optimizer": state})
    loaded, metadata = load_checkpoint(tmp_path / "o.safetensors")
    copy = conv()
    load_module_state(copy, loaded, prefix="model.")
    fused = torch.optim.AdamW(copy.parameters(), lr=0.1, fused=True)
    restore_optimizer(fused, loaded, metadata["optimizer"])
    assert fused.param_groups[0]["fused"]
    for param in copy.parameters():
        assert all(moment.stride() == param.stride() for moment in (fused.state[param]["exp_avg"],
                                                                     fused.state[param]["exp_avg_sq"]))
    for seed in (3, 4):
        step(model, optimizer, seed)
        step(copy, fused, seed)
    torch.testing.assert_close(copy.weight, model.weight, rtol=1e-6, atol=1e-6)
