import json

import pytest

from brainvq.config import PixelCNNConfig, TrainConfig, VQVAEConfig, from_dict, load_json, save_json, to_dict
from brainvq.errors import ConfigError


def test_json_round_trip(tmp_path):
    model = VQVAEConfig(downsample=8, codebook_size=64)
    train = TrainConfig(epochs=3, max_minutes=None, lr=2e-4)
    save_json(tmp_path / "config.json", {"model": to_dict(model), "train": to_dict(train)})
    values = load_json(tmp_path / "config.json")
    assert from_dict(VQVAEConfig, values["model"]) == model
    assert from_dict(TrainConfig, values["train"]) == train



def test_prior_config_json_round_trip_with_and_without_a_context(tmp_path):
    with_context = PixelCNNConfig(grid_size=64, context_codebook_size=128, context_grid_size=16)
    save_json(tmp_path / "config.json", {"with": to_dict(with_context), "without": to_dict(PixelCNNConfig())})
    values = load_json(tmp_path / "config.json")
    assert from_dict(PixelCNNConfig, values["with"]) == with_context
    # A config.json written before contexts existed has neither key: it loads as a prior without a context.
    old = {key: value for key, value in values["without"].items() if not key.startswith("context_")}
    assert from_dict(PixelCNNConfig, old) == PixelCNNConfig()
    assert PixelCNNConfig().context_grid_size == 0 and PixelCNNConfig().context_codebook_size == 0


def test_a_prior_config_written_before_position_logits_describes_a_prior_without_them(tmp_path):
    # New priors have them; a config.json without the key was written for a checkpoint without that tensor.
    assert PixelCNNConfig().position_logits
    save_json(tmp_path / "config.json", to_dict(PixelCNNConfig()))
    values = load_json(tmp_path / "config.json")
    assert from_dict(PixelCNNConfig, values) == PixelCNNConfig()
    del values["position_logits"]
    assert from_dict(PixelCNNConfig, values) == PixelCNNConfig(position_logits=False)
    assert from_dict(PixelCNNConfig, values | {"position_logits": True}).position_logits


def test_a_prior_config_written_before_the_outline_frame_and_background_describes_a_prior_without_them():
    # Each key came with a tensor (the outline logits, the background codes) that older checkpoints lack.
    values = to_dict(PixelCNNConfig(outline_modes=8))
    assert from_dict(PixelCNNConfig, values).framed_logits and from_dict(PixelCNNConfig, values).keeps_background
    del values["outline_frame"], values["outline_background"]
    old = from_dict(PixelCNNConfig, values)
    assert not old.framed_logits and not old.keeps_background
    assert not PixelCNNConfig().keeps_background  # no outline model, no outline to keep the background outside


def test_position_dropout_is_a_share_below_1():
    values = to_dict(PixelCNNConfig(position_dropout=0.1))
    assert from_dict(PixelCNNConfig, values) == PixelCNNConfig(position_dropout=0.1)
    for share in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="position_dropout"):
            from_dict(PixelCNNConfig, values | {"position_dropout": share})


def test_a_training_config_written_before_the_cooldown_describes_a_constant_rate_run():
    values = to_dict(TrainConfig())
    assert TrainConfig().cooldown > 0 and from_dict(TrainConfig, values) == TrainConfig()
    del values["cooldown"]
    assert from_dict(TrainConfig, values).cooldown == 0.0
    with pytest.raises(ConfigError, match="cooldown"):
        from_dict(TrainConfig, values | {"cooldown": 1.0})


@pytest.mark.parametrize(("values", "message"), [
    ({"context_codebook_size": 16}, "must both be 0"),
    ({"context_grid_size": 16}, "must both be 0"),
    ({"context_codebook_size": 16, "context_grid_size": 24}, "context_grid_size = 24 must divide grid_size = 64"),
    ({"context_codebook_size": 16, "context_grid_size": 16, "location_channels": 0}, "location_channels > 0"),
    ({"context_codebook_size": 257, "context_grid_size": 16}, r"context_codebook_size = 257 .*0\.\.256"),
    ({"context_codebook_size": 16, "context_grid_size": -1}, r"context_grid_size = -1 .*0\.\.512"),
])
def test_bad_prior_context_values_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        PixelCNNConfig(grid_size=64, **values).validate()
    PixelCNNConfig(grid_size=64, context_codebook_size=16, context_grid_size=16).validate()


@pytest.mark.parametrize(("values", "message"), [
    ({"codebook_size": 32, "colour": 1}, "unknown key"),
    ({"codebook_size": "32"}, "codebook_size = '32' is not of type"),
    ({"ema": 1}, "ema = 1 is not of type"),
    ({"codebook_size": True}, "is not of type"),
    ({"codebook_size": 0}, "codebook_size must be >= 1"),
    ({"codebook_size": 300}, "uint8"),
    ({"beta": -1}, "beta must be >= 0"),
    ({"ssim_weight": -0.5}, "ssim_weight must be >= 0"),
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
