import dataclasses

import pytest
import torch

from brainvq.errors import ConfigError
from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.sampling import choose_codes, draw_uniforms, guided_logits, sample_fast, sample_naive


def trained_looking_model(conditional: bool = True, grid_size: int = 8, attention_layers: int = 2,
                          attention_block: int = 2, context_grid_size: int = 0,
                          position_template: int = 0, outline_modes: int = 0, windowed: bool = False) -> GatedPixelCNN:
    """Random weights scaled up so that logits are far from uniform, as after training; zero-initialised parts
    (conditioning, location projection, position maps and logits, the head's output, attention output) made
    non-zero so that they count.
    With `context_grid_size`, the prior is conditioned on a context grid of that side and 3 codes; with
    `outline_modes`, on an outline, with its position logits framed by the outline's box (and run on the window
    around the outlines with `windowed`)."""
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=8, channels=16, layers=3, conditional=conditional, grid_size=grid_size,
                            attention_layers=attention_layers, attention_block=attention_block,
                            context_codebook_size=3 if context_grid_size else 0, context_grid_size=context_grid_size,
                            position_template=position_template, position_dropout=0.1, outline_modes=outline_modes,
                            windowed=windowed)
    model = GatedPixelCNN(config).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.conditioning.weight)
        torch.nn.init.normal_(model.location_projection.weight, std=0.3)
        torch.nn.init.normal_(model.position_maps)
        torch.nn.init.normal_(model.position_logits, std=0.3)
        if outline_modes:
            torch.nn.init.normal_(model.outline_logits, std=0.3)
        torch.nn.init.normal_(model.head[-1].weight, std=0.3)
        for block in model.attention.values():
            for parameter in (block.output.weight, block.token_place, block.nothing_yet):
                torch.nn.init.normal_(parameter, std=0.3)
        for parameter in model.parameters():
            parameter.mul_(2.0)
    return model


@pytest.mark.parametrize(("conditional", "temperature", "top_k", "attention_layers", "position_template", "guidance"),
                         [(True, 1.0, None, 2, 0, 1.0), (True, 0.7, 3, 2, 0, 1.0), (False, 1.3, None, 2, 0, 1.0),
                          (True, 1.0, None, 0, 0, 1.0), (True, 1.0, None, 2, 4, 1.0), (True, 0.8, None, 2, 4, 2.5)])
def test_fast_sampling_gives_exactly_the_naive_code_grids(conditional, temperature, top_k, attention_layers,
                                                          position_template, guidance):
    model = trained_looking_model(conditional, attention_layers=attention_layers, position_template=position_template)
    uniforms = draw_uniforms(4, 8, torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 9, 20, 31])
    options = {"temperature": temperature, "top_k": top_k, "guidance": guidance}
    naive = sample_naive(model, uniforms, positions, **options)
    fast = sample_fast(model, uniforms, positions, **options)
    assert torch.equal(fast, naive)
    assert len(naive.unique()) > 1  # not a degenerate test: the grids hold several codes


@pytest.mark.slow
def test_fast_sampling_gives_exactly_the_naive_code_grids_at_the_default_64x64_grid():
    """At the grid brainvq samples (64x64, 4x4 attention blocks): 4,096 codes in a row, each drawn from logits
    that depend on all earlier ones, so one rounding difference anywhere would show.

    Naive sampling of a 64x64 grid takes 4,096 full passes (hours on 2 cores), so this checks the same thing
    with one: naive sampling draws the code at p from a full pass over a grid whose codes after p are still 0;
    the network is causal (tests/models/test_pixelcnn.py) and later codes enter only through weights masked
    to exactly 0, so that pass's logits at p are bit for bit those of one full pass over the finished grid."""
    default = PixelCNNConfig()
    model = trained_looking_model(grid_size=default.grid_size, attention_layers=1,
                                  attention_block=default.attention_block)
    uniforms = draw_uniforms(2, default.grid_size, torch.Generator().manual_seed(3))
    positions = torch.tensor([4, 27])
    fast = sample_fast(model, uniforms, positions)
    with torch.no_grad():
        logits = model(fast, positions)  # [B, K, G, G]
    naive = choose_codes(logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), uniforms.reshape(-1))
    assert torch.equal(fast.reshape(-1), naive)
    assert len(fast.unique()) > 1


def test_guidance_moves_the_logits_from_the_unconditional_ones_through_the_conditional_ones():
    conditional, unconditional = torch.tensor([[1.0, 3.0, -2.0]]), torch.tensor([[0.5, 1.0, 0.0]])
    both = torch.cat([conditional, unconditional])  # the batch guided sampling runs: positions, then none
    assert torch.equal(guided_logits(both, 1.0), both)  # guidance 1: the conditional prior, run once
    assert torch.equal(guided_logits(both, 0.0), unconditional)
    assert torch.allclose(guided_logits(both, 3.0), torch.tensor([[2.0, 7.0, -6.0]]))


def test_guided_samples_differ_from_plain_ones_and_guidance_needs_a_prior_trained_with_position_dropout():
    model = trained_looking_model()
    uniforms = draw_uniforms(3, 8, torch.Generator().manual_seed(4))
    positions = torch.tensor([2, 15, 29])
    guided = sample_fast(model, uniforms, positions, guidance=3.0)
    assert not torch.equal(guided, sample_fast(model, uniforms, positions))
    untrained_for_it = GatedPixelCNN(dataclasses.replace(model.config, position_dropout=0.0))
    with pytest.raises(ConfigError, match="position_dropout"):
        sample_fast(untrained_for_it, uniforms, positions, guidance=2.0)
    with pytest.raises(ConfigError, match="needs slice positions"):
        sample_fast(model, uniforms, None, guidance=2.0)


def test_samples_depend_on_the_random_numbers_and_the_slice_position():
    model = trained_looking_model(grid_size=6)
    first = draw_uniforms(2, 6, torch.Generator().manual_seed(1))
    second = draw_uniforms(2, 6, torch.Generator().manual_seed(2))
    positions = torch.tensor([5, 5])
    assert not torch.equal(sample_fast(model, first, positions), sample_fast(model, second, positions))
    assert not torch.equal(sample_fast(model, first, positions), sample_fast(model, first, torch.tensor([25, 25])))


def test_choose_codes_is_inverse_cdf_with_temperature_and_top_k():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    pick = lambda u, **kw: int(choose_codes(logits, torch.tensor([u]), **kw))  # noqa: E731
    assert [pick(u) for u in (0.05, 0.15, 0.35, 0.99)] == [0, 1, 2, 3]
    assert pick(0.0, top_k=1) == 3 and pick(0.999, top_k=1) == 3
    assert {pick(u, top_k=2) for u in (0.01, 0.5, 0.99)} == {2, 3}
    # A low temperature concentrates the mass on the likeliest code.
    assert pick(0.05, temperature=0.05) == 3


def test_sampling_shows_a_progress_bar_over_the_rows_only_when_asked(capsys):
    model = trained_looking_model(grid_size=4)
    uniforms = draw_uniforms(1, 4, torch.Generator().manual_seed(0))
    quiet = sample_fast(model, uniforms, torch.tensor([3]))
    assert capsys.readouterr().err == ""
    assert torch.equal(sample_fast(model, uniforms, torch.tensor([3]), progress=True), quiet)
    assert "sampling" in capsys.readouterr().err  # tqdm draws the bar on stderr


def test_fast_sampling_gives_exactly_the_naive_code_grids_with_a_context():
    model = trained_looking_model(attention_layers=1, context_grid_size=4)
    uniforms = draw_uniforms(3, 8, torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 9, 20])
    context = torch.randint(0, 3, (3, 4, 4), generator=torch.Generator().manual_seed(2))
    naive = sample_naive(model, uniforms, positions, context=context)
    fast = sample_fast(model, uniforms, positions, context=context)
    assert torch.equal(fast, naive)
    assert len(naive.unique()) > 1


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_fast_sampling_gives_exactly_the_naive_code_grids_with_an_outline_framing_the_position_logits(guidance):
    model = trained_looking_model(attention_layers=1, outline_modes=2, position_template=4)
    assert model.config.framed_logits
    uniforms = draw_uniforms(3, 8, torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 9, 20])
    outlines = torch.zeros(3, 8, 8, dtype=torch.int64)
    for outline, (top, left, side) in zip(outlines, [(1, 1, 5), (2, 3, 4), (0, 0, 8)], strict=True):
        outline[top:top + side, left:left + side] = 1
    model.background_codes.copy_(torch.arange(8) < 2)  # outside the outlines only codes 0 and 1 may be drawn
    naive = sample_naive(model, uniforms, positions, context=outlines, guidance=guidance)
    fast = sample_fast(model, uniforms, positions, context=outlines, guidance=guidance)
    assert torch.equal(fast, naive)
    assert set(naive[outlines == 0].tolist()) == {0, 1} and naive[outlines == 1].max() > 1
    moved = outlines.roll(1, dims=2)  # the same outlines one column to the right: other logits, other codes
    assert not torch.equal(sample_fast(model, uniforms, positions, context=moved, guidance=guidance), fast)


def test_choose_codes_draws_only_allowed_codes():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]))
    allowed = torch.tensor([[True, True, False, False], [False, False, False, True]])
    for u in (0.0, 0.2, 0.5, 0.999):
        chosen = choose_codes(logits, torch.tensor([u, u]), allowed=allowed)
        assert chosen[0] in (0, 1) and chosen[1] == 3
    # Among the allowed codes, by their own odds: code 0 for the first third of the uniforms, then code 1.
    assert choose_codes(logits[:1], torch.tensor([0.3]), allowed=allowed[:1]).item() == 0
    assert choose_codes(logits[:1], torch.tensor([0.4]), allowed=allowed[:1]).item() == 1


def test_samples_depend_on_the_context():
    model = trained_looking_model(attention_layers=1, context_grid_size=4)
    uniforms = draw_uniforms(2, 8, torch.Generator().manual_seed(1))
    positions = torch.tensor([5, 5])
    zeros, twos = torch.zeros(2, 4, 4, dtype=torch.int64), torch.full((2, 4, 4), 2)
    assert not torch.equal(sample_fast(model, uniforms, positions, context=zeros),
                           sample_fast(model, uniforms, positions, context=twos))
    with pytest.raises(ConfigError, match="needs a context"):
        sample_fast(model, uniforms, positions)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_a_windowed_prior_samples_only_its_window_fast_as_naive(guidance):
    model = trained_looking_model(grid_size=16, attention_layers=1, outline_modes=2, windowed=True)
    uniforms = draw_uniforms(3, 16, torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 9, 20])
    outlines = torch.zeros(3, 16, 16, dtype=torch.int64)
    for outline, (top, left, side) in zip(outlines, [(5, 5, 4), (6, 4, 3), (7, 7, 2)], strict=True):
        outline[top:top + side, left:left + side] = 1
    model.background_codes.copy_(torch.arange(8) < 2)
    window = model.window_of(outlines)
    assert window.height * window.width < 16 * 16 / 2
    naive = sample_naive(model, uniforms, positions, context=outlines, guidance=guidance)
    fast = sample_fast(model, uniforms, positions, context=outlines, guidance=guidance)
    assert torch.equal(fast, naive)
    assert set(naive[outlines == 0].tolist()) == {0, 1} and naive[outlines == 1].max() > 1
    # Outside the window nothing is drawn: other random numbers there change nothing.
    others = draw_uniforms(3, 16, torch.Generator().manual_seed(2))
    others[:, window.rows, window.columns] = uniforms[:, window.rows, window.columns]
    assert torch.equal(sample_fast(model, others, positions, context=outlines, guidance=guidance), fast)
