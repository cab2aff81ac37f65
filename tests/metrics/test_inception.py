import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from brainvq.errors import CheckpointError
from brainvq.metrics.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE, FIDInceptionV3, load_inception
from brainvq.metrics.samples import fid, frechet_distance

# pytorch-fid's fid_inception_v3() (src/pytorch_fid/inception.py) is torchvision's Inception3(num_classes=1008,
# aux_logits=False) with Mixed_5b..5d, 6b..6e, 7b and 7c replaced by its FID blocks, which keep torchvision's
# branches. Branches of each block type in registration order (torchvision/models/inception.py), each a
# BasicConv2d (conv without bias + batch norm):
BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
BLOCKS = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
          ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
          ("Mixed_7c", "E")]
CONV_TENSORS = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
# Shapes read off the reference constructors (out, in, kh, kw); in-channels follow from the block outputs
# 256, 288, 768, 1280, 2048.
SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Conv2d_1a_3x3.bn.num_batches_tracked": (),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_1.conv.weight": (48, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch3x3dbl_2.conv.weight": (96, 64, 3, 3),
    "Mixed_5b.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch1x1.conv.weight": (64, 256, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch_pool.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_1.conv.weight": (64, 288, 1, 1),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6b.branch7x7_1.conv.weight": (128, 768, 1, 1),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7_3.conv.weight": (192, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_6c.branch7x7_1.conv.weight": (160, 768, 1, 1),
    "Mixed_6d.branch7x7dbl_3.conv.weight": (160, 160, 1, 7),
    "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
    "Mixed_6e.branch_pool.conv.weight": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_1.conv.weight": (192, 768, 1, 1),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_2.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_1.conv.weight": (384, 1280, 1, 1),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7b.branch3x3dbl_2.conv.weight": (384, 448, 3, 3),
    "Mixed_7b.branch_pool.conv.weight": (192, 1280, 1, 1),
    "Mixed_7c.branch1x1.conv.weight": (320, 2048, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
# torchvision documents 27,161,264 parameters for Inception3 with AuxLogits and 1000 classes. Without AuxLogits
# (conv0 768*128 + 2*128, conv1 128*768*25 + 2*768, fc 768*1000 + 1000: 3,326,696) and with fc 2048 -> 1008
# instead of 2048 -> 1000 (+ 8*2048 + 8 = 16,392): 27,161,264 - 3,326,696 + 16,392.
REFERENCE_PARAMETERS = 23_850_960


def random_network(seed: int) -> FIDInceptionV3:
    """The network with seeded random weights and batch-norm statistics, in eval mode.

    He-initialised convolutions keep activations of order one through the ~40 layers (PyTorch's default init
    shrinks them to ~1e-8), and the batch-norm buffers differ from their defaults, so that a load that missed
    them would change the features."""
    torch.manual_seed(seed)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.8, 1.2)
            nn.init.normal_(module.bias, 0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.8, 1.2)
    return network.eval()


def images(count: int, seed: int, brightness: float = 1.0) -> torch.Tensor:
    """Smooth random grayscale images [count, 1, 256, 256] in [0, brightness]."""
    coarse = torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(256, 256), mode="bilinear", align_corners=False) * brightness


@pytest.fixture(scope="module")
def network() -> FIDInceptionV3:
    return random_network(seed=0)


@pytest.fixture(scope="module")
def weights_file(network, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "fid_inception.safetensors"
    save_file(network.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def probe(network):
    """(two images [2, 1, 256, 256], what the first convolution received, the network's features [2, 2048],
    what the last block Mixed_7c returned)."""
    batch = images(2, seed=1)
    seen, last = [], []
    hooks = [network.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0])),
             network.Mixed_7c.register_forward_hook(lambda module, inputs, output: last.append(output))]
    with torch.no_grad():
        features = network(batch)
    for hook in hooks:
        hook.remove()
    return batch, seen[0], features, last[0]


def test_two_images_give_two_finite_2048_feature_vectors(probe):
    _, _, features, last_block = probe
    assert features.shape == (2, 2048)
    # pool3: the last block's 8x8 map (its size checks the stem's strides and pools) averaged over space.
    assert last_block.shape == (2, 2048, 8, 8)
    torch.testing.assert_close(features, last_block.mean(dim=(2, 3)))
    assert torch.isfinite(features).all()
    assert features.std() > 0.01  # activations neither vanished nor saturated to a constant
    assert not torch.allclose(features[0], features[1])  # the features depend on the image


def test_input_is_repeated_resized_and_scaled_as_pytorch_fid_does(probe):
    batch, first_input, _, _ = probe
    expected = F.interpolate(batch.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(first_input, 2 * expected - 1, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("block", "pool"), [
    (FIDInceptionA(8, pool_features=4), "average"),
    (FIDInceptionC(8, channels_7x7=4), "average"),
    (FIDInceptionE(8, max_pool=False), "average"),  # Mixed_7b
    (FIDInceptionE(8, max_pool=True), "max"),  # Mixed_7c
])
def test_pool_branches_pool_as_the_tensorflow_graph_does(block, pool):
    x = torch.rand(1, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    seen = []
    block.branch_pool.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    block.eval()(x)
    if pool == "max":
        expected = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:  # the mean over the pixels inside the image: border pixels average fewer than 9 values
        expected = F.avg_pool2d(x, 3, stride=1, padding=1) / F.avg_pool2d(torch.ones_like(x), 3, stride=1, padding=1)
    torch.testing.assert_close(seen[0], expected)


def test_state_dict_is_pytorch_fids_key_for_key():
    network = FIDInceptionV3()
    convolutions = STEM + [f"{block}.{branch}" for block, kind in BLOCKS for branch in BRANCHES[kind]]
    expected_keys = [f"{conv}.{tensor}" for conv in convolutions for tensor in CONV_TENSORS] + ["fc.weight", "fc.bias"]
    state = network.state_dict()
    assert list(state) == expected_keys and len(state) == 566
    assert {name: tuple(state[name].shape) for name in SHAPES} == SHAPES
    assert sum(parameter.numel() for parameter in network.parameters()) == REFERENCE_PARAMETERS
    # The graph's batch-norm epsilon is not in the state dict but changes every output.
    assert {module.eps for module in network.modules() if isinstance(module, nn.BatchNorm2d)} == {0.001}


def test_safetensors_round_trip_gives_identical_features(probe, weights_file):
    batch, _, features, _ = probe
    loaded = load_inception(weights_file)  # a new network: everything the features use must come from the file
    assert not loaded.training and not any(parameter.requires_grad for parameter in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(batch), features)


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PAYLOAD_MARK']).touch()",))


def test_wrong_weight_files_are_refused_naming_the_file(network, tmp_path, monkeypatch):
    state = network.state_dict()
    missing = tmp_path / "missing.safetensors"
    save_file({name: tensor for name, tensor in state.items() if name != "Mixed_7c.branch_pool.bn.running_var"},
              str(missing))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: .*missing \['Mixed_7c\.branch_pool\.bn\.running"):
        load_inception(missing)

    reshaped = tmp_path / "torchvision_classes.safetensors"  # torchvision's 1000 classes instead of the graph's 1008
    save_file({**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, str(reshaped))
    with pytest.raises(CheckpointError, match=r"torchvision_classes\.safetensors: tensor fc\.(weight|bias) is \(1000"):
        load_inception(reshaped)

    mark = tmp_path / "payload_ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    pickled = tmp_path / "pt_inception.safetensors"
    pickled.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(CheckpointError, match=r"pt_inception\.safetensors: not a valid safetensors"):
        load_inception(pickled)
    assert not mark.exists()
    pickle.loads(pickled.read_bytes())  # the payload is real: unpickling would have run it
    assert mark.exists()


def test_fid_is_the_frechet_distance_of_the_networks_features_image_by_image(network, probe):
    # Two images a side (the network takes up to a second per image on two busy cores) cannot say how far apart
    # two distributions are, and nothing here asks that: FID against Inception's closed form for Gaussians is in
    # test_samples.py. What is asserted holds at any n: fid() feeds each set through the network, in batches
    # that change nothing (eval-mode batch norm), and measures the distance of exactly those features. One set's
    # features used for both, or batch statistics in place of the running ones, would each move the value.
    batch, _, features, _ = probe
    darker = images(2, seed=3, brightness=0.5)
    with torch.no_grad():
        darker_features = network(darker)
    expected = frechet_distance(features.double().numpy(), darker_features.double().numpy())
    assert expected > 1.0  # a distance far from 0, so that the relative tolerance below means something
    assert fid(batch, darker, network, batch_size=1) == pytest.approx(expected, rel=1e-4)
