import importlib.util
from pathlib import Path

import pytest
import torch

from brainvq.metrics.inception import FIDInceptionV3, load_inception

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_fid_weights.py"


@pytest.fixture(scope="module")
def converter():
    spec = importlib.util.spec_from_file_location("convert_fid_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return FIDInceptionV3().state_dict()


def test_a_pth_state_dict_becomes_safetensors_that_load_inception_reads(converter, state, tmp_path, capsys):
    source = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    # Without batch-norm step counters, as a state dict from older torch (or built by hand) comes.
    torch.save({name: tensor for name, tensor in state.items() if not name.endswith("num_batches_tracked")}, source)
    assert converter.main([str(source), str(tmp_path / "fid.safetensors")]) == 0
    loaded = load_inception(tmp_path / "fid.safetensors").state_dict()  # built with other random weights
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    output = capsys.readouterr()
    assert output.out == f"wrote {tmp_path / 'fid.safetensors'}\n"
    assert "not pytorch-fid's published file" in output.err  # random weights do not hash to 6726825d...


def test_foreign_tensors_are_refused_and_nothing_is_written(converter, state, tmp_path, capsys):
    source = tmp_path / "torchvision_inception.pth"
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, source)
    assert converter.main([str(source), str(tmp_path / "fid.safetensors")]) == 1
    assert "unexpected ['AuxLogits.fc.weight']" in capsys.readouterr().err
    assert not (tmp_path / "fid.safetensors").exists()


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PAYLOAD_MARK']).touch()",))


def test_a_pth_with_a_pickled_payload_is_refused_and_never_runs(converter, tmp_path, monkeypatch, capsys):
    mark = tmp_path / "payload_ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    source = tmp_path / "hostile.pth"
    torch.save({"fc.weight": Payload()}, source)
    assert converter.main([str(source), str(tmp_path / "fid.safetensors")]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"convert_fid_weights: error: {source}: cannot be read as a weights-only state dict")
    assert not mark.exists() and not (tmp_path / "fid.safetensors").exists()
    torch.load(source, weights_only=False)  # the payload is real: a full unpickling would have run it
    assert mark.exists()
