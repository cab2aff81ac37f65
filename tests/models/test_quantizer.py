import pytest
import torch

from brainvq.models.quantizer import CodeUsage, VectorQuantizer


def test_nearest_codes_match_brute_force():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 8)
    flat = torch.randn(100, 8)
    brute_force = torch.cdist(flat, quantizer.codebook).argmin(1)
    assert torch.equal(quantizer.nearest_codes(flat), brute_force)


def test_forward_shapes_and_values_are_the_chosen_codes():
    quantizer = VectorQuantizer(32, 128).eval()
    z = torch.randn(2, 128, 4, 4)
    output = quantizer(z)
    assert output.quantized.shape == z.shape
    assert output.indices.shape == (2, 4, 4)
    assert torch.allclose(output.quantized, quantizer.lookup(output.indices), atol=1e-6)


def test_straight_through_passes_the_gradient_unchanged():
    quantizer = VectorQuantizer(8, 4).eval()
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(1, 4, 3, 3)
    (quantizer(z).quantized * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)


def test_commitment_and_codebook_losses_are_the_squared_distance():
    quantizer = VectorQuantizer(8, 4).eval()
    z = torch.randn(2, 4, 3, 3)
    output = quantizer(z)
    distance = (quantizer.lookup(output.indices) - z).pow(2).mean()
    assert torch.allclose(output.commitment_loss, distance)
    assert torch.allclose(output.codebook_loss, distance)


def test_ema_with_zero_memory_moves_each_used_code_to_the_mean_of_its_vectors():
    quantizer = VectorQuantizer(4, 2, ema_decay=1e-9, restart_after_steps=0, epsilon=0.0).train()
    quantizer.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]))
    # Four vectors near code 0 and two near code 1, laid out as a [1, 2, 2, 3] latent grid.
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -2.0], [9.0, 9.0], [11.0, 12.0]])
    quantizer(vectors.t().reshape(1, 2, 2, 3))
    assert torch.allclose(quantizer.codebook[0], vectors[:4].mean(0), atol=1e-5)
    assert torch.allclose(quantizer.codebook[1], vectors[4:].mean(0), atol=1e-5)


def test_gradient_codebook_is_a_parameter_that_the_codebook_loss_trains():
    quantizer = VectorQuantizer(8, 4, ema=False).train()
    output = quantizer(torch.randn(2, 4, 3, 3))
    output.codebook_loss.backward()
    assert isinstance(quantizer.codebook, torch.nn.Parameter)
    assert quantizer.codebook.grad is not None and quantizer.codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("ema", [True, False])
def test_a_code_unused_for_long_enough_is_restarted_on_an_encoder_output(ema):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(4, 2, ema=ema, restart_after_steps=3).train()
    with torch.no_grad():
        quantizer.codebook[:] = torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]])
        if ema:
            quantizer.ema_sum.copy_(quantizer.codebook)
    z = torch.randn(1, 2, 4, 4) * 0.1  # every vector is nearest to code 0
    for _ in range(2):
        quantizer(z)
    assert quantizer.codebook[3].norm() > 100  # unused for 2 steps: not yet restarted
    quantizer(z)
    batch_vectors = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for code in (1, 2, 3):
        assert (batch_vectors == quantizer.codebook[code]).all(1).any(), f"code {code} was not re-seeded"
    assert quantizer.steps_unused[1:].tolist() == [0, 0, 0]


def test_eval_mode_never_changes_the_codebook():
    quantizer = VectorQuantizer(4, 2, restart_after_steps=1).eval()
    before = quantizer.codebook.clone()
    for _ in range(3):
        quantizer(torch.randn(1, 2, 4, 4))
    assert torch.equal(quantizer.codebook, before)


def test_code_usage_counts_codes_and_perplexity_over_many_batches():
    usage = CodeUsage(8)
    usage.update(torch.tensor([0, 1, 2, 3]))
    usage.update(torch.tensor([[4, 5], [6, 7]]))
    assert usage.used == 8
    assert usage.perplexity == pytest.approx(8.0)
    single = CodeUsage(8)
    single.update(torch.zeros(10, dtype=torch.int64))
    assert single.used == 1
    assert single.perplexity == pytest.approx(1.0)
