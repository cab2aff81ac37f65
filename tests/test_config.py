import json

import pytest

from brainvq.config import TrainConfig, VQVAEConfig, from_dict, load_json, save_json, to_dict
from brainvq.errors import ConfigError


def test_json_round_trip(tmp_path):
    model = VQVAEConfig(downsample=8, codebook_size=64)
    train = TrainConfig(epochs=3, max_minutes=None, lr=2e-4)
    save_json(tmp_path / "config.json", {"model": to_dict(model), "train": to_dict(train)})
    values = load_json(tmp_path / "config.json")
    assert from_dict(VQVAEConfig, values["model"]) == model
    assert from_dict(TrainConfig, values["train"]) == train


@pytest.mark.parametrize(("values", "message"), [
    ({"codebook_size": 32, "colour": 1}, "unknown key"),
    ({"codebook_size": "32"}, "codebook_size = '32' is not of type"),
    ({"ema": 1}, "ema = 1 is not of type"),
    ({"codebook_size": True}, "is not of type"),
    ({"codebook_size": 0}, "codebook_size must be >= 1"),
    ({"codebook_size": 300}, "uint8"),
    ({"beta": -1}, "beta must be >= 0"),
])
def test_bad_model_values_are_refused_naming_the_file_and_key(values, message):
    with pytest.raises(ConfigError, match=message) as caught:
        from_dict(VQVAEConfig, values, source="RUN/config.json")
    assert str(caught.value).startswith("RUN/config.json: ")


@pytest.mark.parametrize(("values", "message"), [
    ({"epochs": -1}, "epochs must be >= 1"),
    ({"precision": "fp16"}, "precision"),
    ({"max_minutes": 0}, "max_minutes must be > 0"),
    ({"lr": float("nan")}, "lr"),
])
def test_bad_training_values_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, values)


def test_int_is_accepted_where_a_float_is_expected():
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1


def test_unreadable_json_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_json(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_json(path)
