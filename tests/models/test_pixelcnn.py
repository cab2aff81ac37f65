import copy
import dataclasses

import pytest
import torch

from brainvq.errors import ConfigError
from brainvq.models.pixelcnn import NO_POSITION, WINDOW_MARGIN, GatedPixelCNN, PixelCNNConfig, Window, layer_bias


def input_gradients(model: GatedPixelCNN, codes: torch.Tensor, row: int, column: int) -> torch.Tensor:
    """|d logits[row, column] / d embedded input| summed over channels: [G, G]."""
    captured = {}

    def make_leaf(module, inputs, output):
        captured["x"] = output.detach().requires_grad_(True)
        return captured["x"]

    handle = model.embedding.register_forward_hook(make_leaf)
    try:
        logits = model(codes, torch.tensor([3]))
    finally:
        handle.remove()
    logits[0, :, row, column].sum().backward()
    return captured["x"].grad[0].abs().sum(-1)  # embedding output is [B, G, G, C]


@pytest.mark.parametrize(("kernel_size", "layers", "size", "attention_layers", "attention_block", "template"),
                         [(3, 3, 5, 0, 1, 0), (5, 2, 6, 0, 1, 0), (3, 1, 8, 1, 2, 0), (3, 2, 8, 2, 4, 0),
                          (3, 2, 8, 2, 4, 4)])
def test_each_output_sees_every_earlier_position_and_nothing_later(kernel_size, layers, size, attention_layers,
                                                                   attention_block, template):
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=6, channels=8, layers=layers, kernel_size=kernel_size, grid_size=size,
                            attention_layers=attention_layers, attention_block=attention_block,
                            position_template=template)
    model = GatedPixelCNN(config).double()
    torch.nn.init.normal_(model.location_projection.weight)  # trained location and position maps must not leak
    torch.nn.init.normal_(model.position_maps)
    torch.nn.init.normal_(model.position_logits)
    torch.nn.init.normal_(model.head[-1].weight)  # the head starts at zero: the output would see nothing
    for block in model.attention.values():  # nor may trained attention (its output starts at zero)
        torch.nn.init.normal_(block.output.weight)
        torch.nn.init.normal_(block.token_place)
    reach = (kernel_size // 2) * (layers + 1)  # of the convolutional stacks, in each direction
    codes = torch.randint(0, 6, (1, size, size))
    for row in range(size):
        for column in range(size):
            gradient = input_gradients(model, codes, row, column).flatten()
            here = row * size + column
            assert torch.all(gradient[here:] == 0), f"output ({row}, {column}) sees itself or a later code"
            if attention_layers:
                # Global reach: every code of the complete block rows above, however far beyond the stacks' reach
                # (which is shorter than the grid here). Later codes are left to the stacks.
                assert reach < size - 1
                seen = row // attention_block * attention_block * size
            else:
                # The grid is small enough for the stacks' reach to cover it: no blind spot.
                assert reach >= size - 1
                seen = here
            assert torch.all(gradient[:seen] > 0), f"output ({row}, {column}) has a blind spot"


def test_attention_gives_the_bottom_of_the_grid_the_top_that_the_stacks_cannot_reach():
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=6, channels=8, layers=2, kernel_size=3, grid_size=16, attention_block=4)
    codes = torch.randint(0, 6, (1, 16, 16))
    plain = GatedPixelCNN(dataclasses.replace(config, attention_layers=0)).double()
    with_attention = GatedPixelCNN(config).double()
    for block in with_attention.attention.values():
        torch.nn.init.normal_(block.output.weight)
    for model in (plain, with_attention):
        torch.nn.init.normal_(model.head[-1].weight)
    for model, sees_the_top in ((plain, False), (with_attention, True)):
        gradient = input_gradients(model, codes, 15, 8)
        assert bool(gradient[:4].sum() > 0) == sees_the_top


def test_output_shape_and_slice_conditioning_changes_the_logits():
    torch.manual_seed(0)
    model = GatedPixelCNN(PixelCNNConfig(codebook_size=6, channels=8, layers=2, grid_size=4))
    torch.nn.init.normal_(model.conditioning.weight)
    torch.nn.init.normal_(model.head[-1].weight)
    codes = torch.randint(0, 6, (2, 4, 4))
    logits = model(codes, torch.tensor([0, 0]))
    assert logits.shape == (2, 6, 4, 4)
    assert not torch.allclose(logits, model(codes, torch.tensor([0, 20])))


def test_unconditional_model_ignores_positions_and_bad_positions_are_refused():
    model = GatedPixelCNN(PixelCNNConfig(codebook_size=6, channels=8, layers=2, conditional=False, grid_size=4))
    codes = torch.randint(0, 6, (2, 4, 4))
    assert torch.equal(model(codes, torch.tensor([0, 31])), model(codes, None))
    conditional = GatedPixelCNN(PixelCNNConfig(codebook_size=6, channels=8, layers=2, grid_size=4))
    with pytest.raises(ConfigError, match=r"0\.\.31"):
        conditional(codes, torch.tensor([0, 32]))
    with pytest.raises(ConfigError, match="this prior models 4x4"):
        conditional(torch.zeros(1, 5, 5, dtype=torch.int64))


def test_the_no_position_row_starts_as_the_code_frequencies_of_all_positions_and_needs_position_dropout():
    config = PixelCNNConfig(codebook_size=3, channels=8, layers=1, grid_size=2, positions=2, attention_layers=0,
                            position_dropout=0.1)
    model = GatedPixelCNN(config)
    codes = torch.tensor([[[0, 1], [2, 2]], [[1, 1], [2, 0]], [[1, 0], [2, 2]]])
    model.init_position_logits(codes, torch.tensor([0, 1, 1]), smoothing=1.0)
    # Top-left place: code 0 in position 0's grid; code 1 in both of position 1's. Each count plus 1, then the
    # positions' frequencies mixed by their shares of the grids (1/3 and 2/3).
    expected = torch.tensor([2.0, 1.0, 1.0]) / 4 / 3 + torch.tensor([1.0, 3.0, 1.0]) / 5 * 2 / 3
    assert torch.allclose(model.position_logits[NO_POSITION, :, 0, 0], expected.log())
    assert len(model.position_logits) == 3  # positions 0 and 1, then the no-position row
    logits = model(codes, torch.tensor([0, NO_POSITION, 1]))
    assert torch.allclose(logits[1], model(codes[1:2], torch.tensor([NO_POSITION]))[0])
    without = GatedPixelCNN(dataclasses.replace(config, position_dropout=0.0))
    assert len(without.position_logits) == 2
    with pytest.raises(ConfigError, match=r"0\.\.1$"):
        without(codes, torch.tensor([0, NO_POSITION, 1]))


def test_the_location_map_makes_the_logits_depend_on_where_a_position_is():
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=6, channels=8, layers=1, kernel_size=3, grid_size=16, conditional=False,
                            attention_layers=0)  # the stacks alone: their reach is what this test counts on
    model = GatedPixelCNN(config)
    torch.nn.init.normal_(model.head[-1].weight)
    # The same code everywhere, and two positions whose receptive fields (2 positions each way) stay off the
    # zero padding: only their location tells them apart.
    codes = torch.zeros(1, 16, 16, dtype=torch.int64)
    assert torch.allclose(model(codes)[0, :, 8, 6], model(codes)[0, :, 8, 9])  # zero-initialised projection
    torch.nn.init.normal_(model.location_projection.weight)
    logits = model(codes)
    assert not torch.allclose(logits[0, :, 8, 6], logits[0, :, 8, 9])


def test_the_position_map_gives_each_slice_position_its_own_spatial_pattern():
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=6, channels=8, layers=1, kernel_size=3, grid_size=16, position_map_size=4,
                            attention_layers=0)  # the stacks alone: their reach is what this test counts on
    model = GatedPixelCNN(config)
    torch.nn.init.normal_(model.head[-1].weight)
    codes = torch.zeros(2, 16, 16, dtype=torch.int64)
    positions = torch.tensor([3, 30])
    assert torch.equal(model.position_map(positions, 2), torch.zeros(2, 8, 16, 16))  # zero-initialised
    with torch.no_grad():
        model.position_maps[30, :, 0, 0] = 5.0  # slice 30 only, top-left corner only
    logits = model(codes, positions)
    # Position (2, 2) sees the top-left corner of the map; position (12, 12) does not, so it stays as it was.
    assert not torch.allclose(logits[0, :, 2, 2], logits[1, :, 2, 2])
    assert torch.allclose(logits[0, :, 12, 12], logits[1, :, 12, 12])
    unconditional = GatedPixelCNN(dataclasses.replace(config, conditional=False))
    assert unconditional.position_maps.numel() == 0


def test_the_position_template_tells_a_place_what_its_slice_position_expects_far_below_it():
    """The position logits of the bottom rows change the logits of a place near the top, beyond every causal
    reach of the stacks, only through the template (which takes no codes: causality, test above)."""
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=6, channels=8, layers=1, kernel_size=3, grid_size=16, positions=2,
                            position_template=4, attention_layers=0)
    codes = torch.zeros(2, 16, 16, dtype=torch.int64)
    positions = torch.tensor([0, 1])
    for template, sees_below in ((4, True), (0, False)):
        model = GatedPixelCNN(dataclasses.replace(config, position_template=template))
        torch.nn.init.normal_(model.head[-1].weight)
        torch.nn.init.normal_(model.location_projection.weight)
        with torch.no_grad():
            model.position_logits[1, 5, 12:, 12:] = 4.0  # slice position 1 expects code 5 at the bottom right
            logits = model(codes, positions)
        assert bool((logits[0, :, 2, 2] != logits[1, :, 2, 2]).any()) == sees_below
        assert hasattr(model, "template_reader") == sees_below  # no unused parameters without a template


def test_a_position_template_needs_position_logits_and_a_location_map():
    for missing in ({"position_logits": False}, {"location_channels": 0}):
        with pytest.raises(ConfigError, match="position template"):
            GatedPixelCNN(PixelCNNConfig(position_template=16, **missing))
        GatedPixelCNN(PixelCNNConfig(position_template=0, **missing))


def test_invalid_config_is_refused():
    with pytest.raises(ConfigError, match="kernel_size"):
        GatedPixelCNN(PixelCNNConfig(kernel_size=4))


def test_the_layer_bias_is_in_the_features_dtype_and_channels_last():
    # An fp32 bias under bf16 autocast would push every gate and its backward into fp32, and a channels-first
    # bias makes its gradient's sum over the batch slow: both cost the prior a large share of its training step.
    vector, location = torch.randn(3, 8), torch.randn(8, 5, 5, dtype=torch.bfloat16)
    bias = layer_bias(vector, location, torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias.shape == (3, 8, 5, 5)
    assert bias.is_contiguous(memory_format=torch.channels_last)
    expected = vector.to(torch.bfloat16)[:, :, None, None] + location
    assert torch.equal(bias, expected)


def test_bf16_channels_last_training_matches_fp32_and_its_gates_run_in_bf16():
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=6, channels=8, layers=2, grid_size=8, attention_layers=1, attention_block=2)
    model = GatedPixelCNN(config)
    torch.nn.init.normal_(model.conditioning.weight)
    torch.nn.init.normal_(model.attention["1"].output.weight)
    torch.nn.init.normal_(model.head[-1].weight)
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    codes, positions = torch.randint(0, 6, (4, 8, 8)), torch.randint(0, 32, (4,))
    gate_dtypes = []
    handle = fast.layers[0].skip.register_forward_pre_hook(lambda module, inputs: gate_dtypes.append(inputs[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_logits = fast(codes, positions)
    handle.remove()
    assert gate_dtypes == [torch.bfloat16]
    torch.testing.assert_close(fast_logits.float(), model(codes, positions), rtol=0.05, atol=0.05)


def context_model() -> GatedPixelCNN:
    """A small prior over 8x8 grids conditioned on a 4x4 context grid, its zero-initialised parts made non-zero."""
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=5, channels=16, layers=3, kernel_size=3, grid_size=8, attention_layers=1,
                            attention_block=2, context_codebook_size=3, context_grid_size=4)
    model = GatedPixelCNN(config).double()
    torch.nn.init.normal_(model.location_projection.weight)
    torch.nn.init.normal_(model.position_maps)
    for block in model.attention.values():
        torch.nn.init.normal_(block.output.weight)
        torch.nn.init.normal_(block.token_place)
    torch.nn.init.normal_(model.head[-1].weight)
    return model


def test_with_a_context_each_output_still_sees_no_code_at_or_after_its_own_position():
    model = context_model()
    codes, context = torch.randint(0, 5, (1, 8, 8)), torch.randint(0, 3, (1, 4, 4))
    positions = torch.tensor([3])
    with torch.no_grad():
        logits = model(codes, positions, context).flatten(2)  # [1, K, G*G], raster order
        for here in range(64):
            changed = codes.clone().flatten()
            changed[here] = (changed[here] + 1) % 5
            other = model(changed.view(1, 8, 8), positions, context).flatten(2)
            assert torch.equal(other[:, :, :here + 1], logits[:, :, :here + 1]), f"position {here} leaks"
            if here < 63:
                assert not torch.equal(other[:, :, here + 1:], logits[:, :, here + 1:])  # the code does count


def test_the_context_changes_the_logits_where_its_code_changes():
    model = context_model()
    codes, context = torch.randint(0, 5, (2, 8, 8)), torch.randint(0, 3, (2, 4, 4))
    with torch.no_grad():
        logits = model(codes, None, context)
        changed = context.clone()
        changed[:, 3, 3] = (changed[:, 3, 3] + 1) % 3  # the bottom-right 2x2 square of the grid
        other = model(codes, None, changed)
        assert logits.shape == (2, 5, 8, 8)
        assert not torch.allclose(logits[:, :, 6:, 6:], other[:, :, 6:, 6:])
        # The context comes before every code: nothing earlier than the changed square can see it, so above it
        # (rows 0..5) the logits stay exactly as they were.
        assert torch.equal(logits[:, :, :6], other[:, :, :6])
        # Nearest-neighbour upsampling: each context code covers its own 2x2 square of the location maps.
        maps = model.location_maps(context)  # [layers, B, 2C, G, G]
        assert maps.shape == (3, 2, 32, 8, 8)
        square = torch.zeros(8, 8, dtype=torch.bool)
        square[6:, 6:] = True
        assert torch.equal((maps != model.location_maps(changed)).any(dim=(0, 1, 2)), square)


@pytest.mark.parametrize("options", [{"context_codebook_size": 3, "context_grid_size": 4}, {"outline_modes": 2},
                                     {"position_template": 4}, {}])
def test_the_location_maps_of_some_rows_are_those_rows_of_the_whole_maps(options):
    torch.manual_seed(0)
    model = GatedPixelCNN(PixelCNNConfig(codebook_size=5, channels=8, layers=2, grid_size=8, positions=4,
                                         attention_layers=0, **options))
    torch.nn.init.normal_(model.location_projection.weight)
    side = model.config.context_side
    context = torch.randint(0, model.config.context_codes, (3, side, side)) if side else None
    positions = torch.tensor([0, 2, 3])
    with torch.no_grad():
        whole = model.location_maps(context, positions)
        for rows in (slice(0, 1), slice(3, 4), slice(5, 8), slice(7, 8)):
            torch.testing.assert_close(model.location_maps(context, positions, rows=rows), whole[..., rows, :],
                                       rtol=0, atol=1e-6)


def test_a_prior_without_context_has_no_context_parameters_and_contexts_are_checked():
    plain = GatedPixelCNN(PixelCNNConfig(codebook_size=5, channels=8, layers=2, grid_size=8))
    assert not hasattr(plain, "context_embedding")
    assert not any("context" in key for key in plain.state_dict())  # old checkpoints load unchanged
    codes = torch.randint(0, 5, (2, 8, 8))
    with pytest.raises(ConfigError, match="no context"):
        plain(codes, None, torch.zeros(2, 4, 4, dtype=torch.int64))
    model = context_model()
    assert model.context_embedding.weight.shape == (3, model.config.location_channels)
    with pytest.raises(ConfigError, match="needs a context"):
        model(codes)
    with pytest.raises(ConfigError, match=r"expected int64 of shape \(2, 4, 4\)"):
        model(codes, None, torch.zeros(2, 8, 8, dtype=torch.int64))
    with pytest.raises(ConfigError, match=r"0\.\.2"):
        model(codes, None, torch.full((2, 4, 4), 3))


def test_the_layer_bias_takes_a_location_per_grid():
    vector, location = torch.randn(3, 8), torch.randn(3, 8, 5, 5)
    bias = layer_bias(vector, location, torch.float32)
    assert bias.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(bias, vector[:, :, None, None] + location)


def test_position_logits_start_as_the_smoothed_code_frequencies_of_each_place_of_each_slice_position():
    config = PixelCNNConfig(codebook_size=4, channels=8, layers=2, grid_size=2, positions=3, attention_layers=0)
    model = GatedPixelCNN(config)
    codes = torch.tensor([[[2, 1], [1, 0]], [[2, 1], [1, 3]], [[0, 0], [0, 0]]])
    positions = torch.tensor([1, 1, 2])
    model.init_position_logits(codes, positions, smoothing=0.5)
    with torch.no_grad():  # the head starts at zero, so the output is the position logits alone
        probabilities = model(codes, positions).softmax(dim=1)
        never_seen = model(codes[:1], torch.tensor([0])).softmax(dim=1)
    # Slice position 1 has two grids: code 2 twice at the top left, codes 0 and 3 at the bottom right.
    torch.testing.assert_close(probabilities[0, :, 0, 0], torch.tensor([0.5, 0.5, 2.5, 0.5]) / 4)
    torch.testing.assert_close(probabilities[1, :, 1, 1], torch.tensor([1.5, 0.5, 0.5, 1.5]) / 4)
    torch.testing.assert_close(probabilities[2, 0], torch.full((2, 2), 1.5 / 3))  # one grid of code 0
    torch.testing.assert_close(never_seen, torch.full((1, 4, 2, 2), 0.25))  # no grid at slice position 0

    unconditional = GatedPixelCNN(dataclasses.replace(config, conditional=False))
    unconditional.init_position_logits(codes, positions, smoothing=0.5)  # one map for all three grids
    assert unconditional.position_logits.shape == (1, 4, 2, 2)
    torch.testing.assert_close(unconditional.position_logits.softmax(dim=1)[0, :, 0, 0],
                               torch.tensor([1.5, 0.5, 2.5, 0.5]) / 5)


def test_a_prior_without_position_logits_has_none_and_refuses_to_set_them():
    model = GatedPixelCNN(PixelCNNConfig(codebook_size=4, channels=8, layers=2, grid_size=4, position_logits=False))
    assert model.position_logits.numel() == 0
    assert model.head[-1].weight.any()  # the network alone gives the output: its head is not zeroed
    with pytest.raises(ConfigError, match="no position logits"):
        model.init_position_logits(torch.zeros(1, 4, 4, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))


def windowed_model() -> GatedPixelCNN:
    """A small windowed prior over 16x16 grids (attention blocks of 2), with an outline model that keeps codes 0
    and 1 as the background, its zero-initialised parts made non-zero."""
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=5, channels=8, layers=2, kernel_size=3, grid_size=16, attention_layers=1,
                            attention_block=2, outline_modes=2, windowed=True)
    model = GatedPixelCNN(config).double()
    (attention,) = model.attention.values()
    for parameter in (model.location_projection.weight, model.position_maps, model.position_logits,
                      model.outline_logits, model.head[-1].weight, attention.output.weight, attention.token_place):
        torch.nn.init.normal_(parameter)
    model.background_codes.copy_(torch.arange(5) < 2)
    return model


def test_a_windowed_prior_runs_on_the_box_around_the_outlines_with_a_margin_on_whole_attention_blocks():
    model = windowed_model()
    outlines = torch.zeros(2, 16, 16, dtype=torch.int64)
    outlines[0, 6:9, 7:10] = 1  # rows 6-8, columns 7-9
    outlines[1, 7, 5] = 1  # row 7, column 5
    assert WINDOW_MARGIN == 2
    # Rows 6-8 widened by 2 to 4-10, onto blocks of 2: 4-11; columns 5-9 -> 3-11 -> 2-11.
    assert model.window_of(outlines) == Window(top=4, left=2, height=8, width=10)
    outlines[1, 15, 15] = 1  # the margin stops at the grid's edge
    assert model.window_of(outlines) == Window(top=4, left=2, height=12, width=14)
    assert model.window_of(torch.zeros(2, 16, 16, dtype=torch.int64)) == Window(0, 0, 16, 16)  # nothing inside
    plain = GatedPixelCNN(dataclasses.replace(model.config, windowed=False))
    assert plain.window_of(outlines) == Window(0, 0, 16, 16)
    with pytest.raises(ConfigError, match="windowed"):
        PixelCNNConfig(windowed=True).validate()  # no outline model: nothing to put a window around


def test_a_windowed_forward_reads_every_learnt_map_at_the_windows_places_and_the_whole_grid_is_the_plain_one():
    model = windowed_model()
    codes, positions = torch.randint(0, 5, (2, 16, 16)), torch.tensor([3, 17])
    outlines = torch.zeros(2, 16, 16, dtype=torch.int64)
    outlines[:, 5:10, 4:9] = 1
    with torch.no_grad():
        whole = model(codes, positions, outlines)
        assert torch.equal(model(codes, positions, outlines, Window(0, 0, 16, 16)), whole)
        window = model.window_of(outlines)
        assert window == Window(2, 2, 10, 10)
        inside = model(codes[:, window.rows, window.columns], positions, outlines, window)
        assert inside.shape == (2, 5, 10, 10)
        # The window's edges are padded as the grid's are: the codes beyond them are not read.
        assert not torch.equal(inside, whole[:, :, window.rows, window.columns])
        # The same window's codes at another place of the grid: other learnt maps, other logits.
        moved = Window(4, 4, 10, 10)
        assert not torch.allclose(model(codes[:, window.rows, window.columns], positions, outlines, moved), inside)
        with pytest.raises(ConfigError, match=r"here a 10x10 window"):
            model(codes, positions, outlines, window)


def test_a_windowed_forward_is_causal_within_its_window():
    model = windowed_model()
    outlines = torch.zeros(1, 16, 16, dtype=torch.int64)
    outlines[0, 5:9, 5:9] = 1
    window = model.window_of(outlines)
    codes, positions = torch.randint(0, 5, (1, window.height, window.width)), torch.tensor([3])
    count = window.height * window.width
    with torch.no_grad():
        logits = model(codes, positions, outlines, window).flatten(2)
        for here in range(count):
            changed = codes.clone().flatten()
            changed[here] = (changed[here] + 1) % 5
            other = model(changed.view_as(codes), positions, outlines, window).flatten(2)
            assert torch.equal(other[:, :, :here + 1], logits[:, :, :here + 1]), f"position {here} leaks"
            if here < count - 1:
                assert not torch.equal(other[:, :, here + 1:], logits[:, :, here + 1:])


def test_complete_puts_each_places_likeliest_background_code_outside_the_window():
    model = windowed_model()
    outlines = torch.zeros(2, 16, 16, dtype=torch.int64)
    outlines[:, 6:9, 6:9] = 1
    positions = torch.tensor([0, 30])
    window = model.window_of(outlines)
    inside = torch.full((2, window.height, window.width), 4)
    with torch.no_grad():
        whole = model.complete(inside, window, positions, outlines)
        bias = model.output_bias(positions, 2, outlines)
    assert torch.equal(whole[:, window.rows, window.columns], inside)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[window.rows, window.columns] = False
    expected = torch.where(bias[:, 0] >= bias[:, 1], 0, 1)  # the likelier of the two background codes
    assert torch.equal(whole[:, outside], expected[:, outside])
    assert len(whole[:, outside].unique()) == 2  # the output bias differs between places and positions
