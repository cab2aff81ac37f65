import pytest
import torch

from brainvq.config import VQVAEConfig
from brainvq.errors import ConfigError
from brainvq.models.vqvae import VQVAE

SMALL = {"channels": 16, "residual_channels": 8, "code_dim": 8, "codebook_size": 16}


@pytest.mark.parametrize(("downsample", "grid"), [(4, 64), (8, 32)])
def test_shapes_for_each_downsampling_factor(downsample, grid):
    model = VQVAE(VQVAEConfig(downsample=downsample, **SMALL))
    output = model(torch.rand(2, 1, 256, 256))
    assert output.reconstruction.shape == (2, 1, 256, 256)
    assert output.indices.shape == (2, grid, grid)
    assert model.config.grid_size == grid


def test_default_is_32_codes_of_dimension_128():
    model = VQVAE()
    assert model.quantizer.codebook.shape == (32, 128)
    assert model.config.beta == 0.25


def test_encode_then_decode_equals_the_forward_reconstruction():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**SMALL)).eval()
    images = torch.rand(2, 1, 64, 64)
    output = model(images)
    codes = model.encode(images)
    assert torch.equal(codes, output.indices)
    assert torch.allclose(model.decode(codes), output.reconstruction.clamp(0, 1), atol=1e-6)


def test_loss_is_reconstruction_plus_codebook_plus_beta_commitment():
    model = VQVAE(VQVAEConfig(beta=0.5, **SMALL)).eval()  # eval: the EMA codebook stays put between calls
    images = torch.rand(2, 1, 32, 32)
    terms = model.loss(images, model(images))
    expected = terms["reconstruction"] + terms["codebook"] + 0.5 * terms["commitment"]
    assert torch.allclose(terms["loss"], expected)
    assert torch.allclose(terms["reconstruction"], (model(images).reconstruction - images).pow(2).mean(),
                          atol=1e-6)


def test_gradients_reach_the_encoder_through_the_quantizer():
    model = VQVAE(VQVAEConfig(**SMALL))
    images = torch.rand(2, 1, 32, 32)
    model.loss(images, model(images))["loss"].backward()
    first_conv = model.encoder.layers[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def test_invalid_config_is_refused():
    with pytest.raises(ConfigError, match="downsample"):
        VQVAE(VQVAEConfig(downsample=3))
