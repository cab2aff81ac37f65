import pytest
import torch

from brainvq.config import VQVAEConfig
from brainvq.models.vqvae2 import TwoLevelVQVAE

SMALL = {"channels": 16, "residual_channels": 8, "code_dim": 8, "codebook_size": 16}


def test_a_16x16_top_grid_over_the_64x64_bottom_grid():
    model = TwoLevelVQVAE(VQVAEConfig(**SMALL), top_codebook_size=8)
    output = model(torch.rand(2, 1, 256, 256))
    assert output.reconstruction.shape == (2, 1, 256, 256)
    assert output.indices.shape == (2, 64, 64)
    assert output.top_indices.shape == (2, 16, 16)
    assert model.top_quantizer.codebook.shape == (8, 8)


def test_encode_then_decode_equals_the_forward_pass_at_both_levels():
    torch.manual_seed(0)
    model = TwoLevelVQVAE(VQVAEConfig(label_classes=3, **SMALL)).eval()
    images, labels = torch.rand(2, 1, 64, 64), torch.randint(0, 3, (2, 64, 64))
    output = model(images, labels)
    bottom, top = model.encode(images, labels)
    assert torch.equal(bottom, output.indices) and torch.equal(top, output.top_indices)
    decoded, decoded_labels = model.decode((bottom, top))
    assert torch.allclose(decoded, output.reconstruction.clamp(0, 1), atol=1e-6)
    assert torch.equal(decoded_labels, output.label_logits.argmax(1))
    codes, reconstructed, _ = model.reconstruct(images, labels)
    assert torch.equal(codes, bottom) and torch.equal(reconstructed, decoded)


def test_the_top_codes_change_the_decoded_image():
    torch.manual_seed(0)
    model = TwoLevelVQVAE(VQVAEConfig(**SMALL)).eval()
    bottom, top = model.encode(torch.rand(1, 1, 64, 64))
    other_top = (top + 1) % model.top_quantizer.codebook_size
    assert not torch.allclose(model.decode((bottom, top))[0], model.decode((bottom, other_top))[0])


def test_losses_cover_both_levels_and_gradients_reach_the_top_encoder():
    torch.manual_seed(0)
    model = TwoLevelVQVAE(VQVAEConfig(**SMALL)).eval()  # eval: the EMA codebooks stay put between calls
    images = torch.rand(2, 1, 64, 64)
    output = model(images)
    latents = model.encoder(images)
    top = model.top_quantizer(model.top_encoder(latents))
    bottom = model.quantizer(model.bottom_mix(torch.cat([latents, model.top_decoder(top.quantized)], dim=1)))
    assert torch.allclose(output.commitment_loss, top.commitment_loss + bottom.commitment_loss)
    assert torch.allclose(output.codebook_loss, top.codebook_loss + bottom.codebook_loss)
    model.train()
    model.loss(images, model(images))["loss"].backward()
    first_top_conv = model.top_encoder[0]
    assert first_top_conv.weight.grad is not None and first_top_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_downsample", [3, 128])
def test_a_top_grid_that_does_not_tile_the_bottom_grid_is_refused(top_downsample):
    with pytest.raises(ValueError, match="top_downsample"):
        TwoLevelVQVAE(VQVAEConfig(**SMALL), top_downsample=top_downsample)
