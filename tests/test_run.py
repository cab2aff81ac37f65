import json

from brainvq.config import TrainConfig, to_dict
from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.run import read_run_config, write_run_config


def test_a_prior_saved_before_attention_existed_is_rebuilt_as_the_plain_gated_pixelcnn(tmp_path):
    write_run_config(tmp_path, PixelCNNConfig(attention_layers=0), TrainConfig())
    path = tmp_path / "config.json"
    values = json.loads(path.read_text())
    for key in ("attention_layers", "attention_heads", "attention_block"):
        del values["model"][key]  # as written by brainvq before the prior had attention
    path.write_text(json.dumps(values))
    config, _ = read_run_config(tmp_path, PixelCNNConfig)
    assert config.attention_layers == 0 and len(GatedPixelCNN(config).attention) == 0
    # A config that names the setting keeps it.
    write_run_config(tmp_path, PixelCNNConfig(attention_layers=3), TrainConfig())
    assert read_run_config(tmp_path, PixelCNNConfig)[0].attention_layers == 3
    assert to_dict(read_run_config(tmp_path, PixelCNNConfig)[0]) == to_dict(PixelCNNConfig(attention_layers=3))
