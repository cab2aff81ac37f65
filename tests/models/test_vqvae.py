import pytest
import torch

from brainvq.config import VQVAEConfig
from brainvq.errors import ConfigError
from brainvq.metrics.image import ssim
from brainvq.models.vqvae import VQVAE, reconstruction_error

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
    assert torch.allclose(model.decode(codes)[0], output.reconstruction.clamp(0, 1), atol=1e-6)


def test_loss_is_reconstruction_plus_codebook_plus_beta_commitment():
    model = VQVAE(VQVAEConfig(beta=0.5, ssim_weight=0, **SMALL)).eval()  # eval: the EMA codebook stays put
    images = torch.rand(2, 1, 32, 32)
    terms = model.loss(images, model(images))
    expected = terms["reconstruction"] + terms["codebook"] + 0.5 * terms["commitment"]
    assert torch.allclose(terms["loss"], expected)
    assert torch.allclose(terms["reconstruction"], (model(images).reconstruction - images).pow(2).mean(),
                          atol=1e-6)


def test_an_ssim_weight_adds_one_minus_the_ssim_of_the_clamped_output():
    model = VQVAE(VQVAEConfig(beta=0.5, ssim_weight=2.0, **SMALL)).eval()
    images = torch.rand(2, 1, 32, 32)
    output = model(images)
    terms = model.loss(images, output)
    expected_ssim = 1 - ssim(output.reconstruction.clamp(0, 1), images).mean()
    assert torch.allclose(terms["ssim"], expected_ssim)
    expected = terms["reconstruction"] + terms["codebook"] + 0.5 * terms["commitment"] + 2.0 * expected_ssim
    assert torch.allclose(terms["loss"], expected)
    assert "ssim" not in VQVAE(VQVAEConfig(ssim_weight=0, **SMALL)).eval().loss(images, output)


def test_reconstruction_error_forgives_only_pixels_that_the_clamp_makes_exact():
    images = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.0]).view(1, 1, 2, 3)
    output = torch.tensor([-0.3, 0.2, 1.4, 0.9, -0.1, 0.0], requires_grad=True)
    error = reconstruction_error(output.view(1, 1, 2, 3), images)
    # Beyond a bound the image sits at: no error (decode clamps it exact). Inside [0, 1], or beyond the bound of
    # an image in between (-0.1 for 0.5): the squared difference, so the gradient still pulls it back.
    assert torch.isclose(error, torch.tensor((0.2**2 + 0.1**2 + 0.6**2) / 6))
    error.backward()
    assert output.grad[0] == 0 and output.grad[2] == 0 and output.grad[4] < 0


def test_gradients_reach_the_encoder_through_the_quantizer():
    model = VQVAE(VQVAEConfig(**SMALL))
    images = torch.rand(2, 1, 32, 32)
    model.loss(images, model(images))["loss"].backward()
    first_conv = model.encoder.layers[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def test_invalid_config_is_refused():
    with pytest.raises(ConfigError, match="downsample"):
        VQVAE(VQVAEConfig(downsample=3))


JOINT = {**SMALL, "label_classes": 4, "label_weight": 0.3, "ssim_weight": 0.0}


def test_an_image_only_model_keeps_its_one_channel_input_and_output():
    """So checkpoints made before joint models existed still load into VQVAEConfig's default."""
    model = VQVAE(VQVAEConfig(**SMALL))
    assert model.encoder.layers[0].weight.shape[1] == 1
    assert model.decoder.layers[-1].weight.shape[1] == 1  # ConvTranspose2d: [in, out, k, k]
    codes = model.encode(torch.rand(2, 1, 32, 32))
    assert model.decode(codes)[1] is None


def test_a_joint_model_reads_the_label_map_and_decodes_one():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**JOINT)).eval()
    images, labels = torch.rand(2, 1, 32, 32), torch.randint(0, 4, (2, 32, 32), dtype=torch.uint8)
    output = model(images, labels)
    assert output.reconstruction.shape == (2, 1, 32, 32) and output.label_logits.shape == (2, 4, 32, 32)
    codes = model.encode(images, labels)
    assert torch.equal(codes, output.indices)
    decoded_images, decoded_labels = model.decode(codes)
    assert torch.allclose(decoded_images, output.reconstruction.clamp(0, 1), atol=1e-6)
    assert torch.equal(decoded_labels, output.label_logits.argmax(1))
    with pytest.raises(ValueError, match="label map"):
        model.encode(images)


def test_a_joint_loss_adds_the_weighted_cross_entropy_of_the_label_map():
    model = VQVAE(VQVAEConfig(beta=0.5, **JOINT)).eval()
    images, labels = torch.rand(2, 1, 32, 32), torch.randint(0, 4, (2, 32, 32))
    output = model(images, labels)
    terms = model.loss(images, output, labels)
    expected_labels = -torch.log_softmax(output.label_logits, 1).gather(1, labels[:, None]).mean()
    assert torch.allclose(terms["labels"], expected_labels, atol=1e-6)
    expected = terms["reconstruction"] + terms["codebook"] + 0.5 * terms["commitment"] + 0.3 * expected_labels
    assert torch.allclose(terms["loss"], expected)


def test_a_joint_model_encodes_the_label_map_and_decodes_it_back():
    """Labels drawn independently of the image, so only the encoder's label channels can carry them: a few
    hundred steps on one batch decode them almost exactly."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(**{**JOINT, "label_weight": 1.0}))
    images = torch.rand(8, 1, 32, 32)
    labels = torch.randint(0, 4, (8, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)  # 8x8 blocks
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        optimizer.zero_grad()
        model.loss(images, model(images, labels), labels)["loss"].backward()
        optimizer.step()
    _, decoded = model.eval().decode(model.encode(images, labels))
    assert (decoded == labels).float().mean() > 0.95
