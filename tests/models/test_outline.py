import dataclasses

import pytest
import torch

from brainvq.config import PixelCNNConfig
from brainvq.errors import ConfigError
from brainvq.models.outline import BOX_SPAN, OutlineModel, box_frame, from_box_frame, into_box_frame, signed_distance
from brainvq.models.pixelcnn import GatedPixelCNN


def discs(radii: list[float], size: int = 32) -> torch.Tensor:
    """Centred discs of the given radii (in cells): int64 [N, size, size], 1 inside."""
    rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    distance = ((rows - size / 2 + 0.5) ** 2 + (columns - size / 2 + 0.5) ** 2).sqrt()
    return torch.stack([(distance < radius).to(torch.int64) for radius in radii])


def test_signed_distance_is_negative_inside_positive_outside_and_counts_cells_to_the_edge():
    square = torch.zeros(1, 9, 9, dtype=torch.int64)
    square[0, 2:7, 2:7] = 1
    distance = signed_distance(square)[0]
    assert distance[4, 4] == -3 and distance[2, 4] == -1  # the centre is 3 cells from the nearest outside cell
    assert distance[0, 4] == 2 and distance[1, 4] == 1
    assert ((distance < 0) == square[0].bool()).all()
    empty, full = signed_distance(torch.stack([torch.zeros(9, 9), torch.ones(9, 9)]))
    assert (empty == 9).all() and (full == -9).all()


def boxes(corners: list[tuple[int, int, int]], size: int = 16) -> torch.Tensor:
    """Square outlines (top row, left column, side) -> int64 [N, size, size], 1 inside."""
    outlines = torch.zeros(len(corners), size, size, dtype=torch.int64)
    for outline, (top, left, side) in zip(outlines, corners, strict=True):
        outline[top:top + side, left:left + side] = 1
    return outlines


def test_the_box_frame_maps_each_outlines_box_onto_the_same_square_and_back():
    outlines = boxes([(2, 1, 4), (5, 6, 8), (0, 0, 0)])  # the last is empty
    frames = box_frame(outlines)
    # Cell i of a 16-cell axis sits at (2i + 1) / 16 - 1; the box's outer edges land on -BOX_SPAN and BOX_SPAN.
    for frame, (top, left, side) in zip(frames[:2], [(2, 1, 4), (5, 6, 8)], strict=True):
        for axis, first in ((0, left), (1, top)):
            edges = torch.tensor([2 * first / 16 - 1, 2 * (first + side) / 16 - 1])
            torch.testing.assert_close(frame[axis, axis] * edges + frame[axis, 2], torch.tensor([-BOX_SPAN, BOX_SPAN]))
    assert torch.equal(frames[2], torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))  # an empty outline: its own grid
    # A map that is linear over the grid comes back from the frame unchanged inside each box.
    ramp = torch.arange(256.0).view(1, 1, 16, 16).expand(3, 2, 16, 16)
    back = from_box_frame(into_box_frame(ramp, outlines), outlines)
    inside = outlines[:, None].expand_as(ramp).bool()
    torch.testing.assert_close(back[inside], ramp[inside])
    # Both boxes fill the same part of their frames: all of it within 0.55 of the middle (cells 3..12), little of
    # the outermost cells (beyond 0.9; only bilinear interpolation reaches there from the box's edge).
    framed = into_box_frame(outlines[:2, None].float(), outlines[:2])[:, 0]
    assert (framed[:, 3:13, 3:13] > 0.99).all()
    assert (framed[:, [0, -1]] < 0.2).all() and (framed[:, :, [0, -1]] < 0.2).all()


def test_framed_position_logits_place_a_positions_anatomy_by_the_drawn_outlines_box():
    # Two training grids of one position: the same "anatomy" (code 1 in the top half of the brain, code 2 in the
    # bottom half, code 0 outside) at different places and sizes.
    outlines = boxes([(1, 1, 6), (6, 4, 10)])
    codes = outlines.clone()
    for grid, (top, side) in zip(codes, [(1, 6), (6, 10)], strict=True):
        grid[top + side // 2:top + side] *= 2
    config = PixelCNNConfig(codebook_size=3, channels=8, layers=1, grid_size=16, positions=1, attention_layers=0,
                            outline_modes=1)
    model = GatedPixelCNN(config)
    model.init_position_logits(codes, torch.zeros(2, dtype=torch.int64), outlines)
    new = boxes([(4, 6, 8)])  # a box at a third place and size
    with torch.no_grad():  # the head starts at zero: the output is the position logits alone
        likeliest = model(torch.zeros(1, 16, 16, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), new).argmax(1)
    expected = new[0].clone()
    expected[8:12] *= 2
    inside = new[0].bool()
    assert torch.equal(likeliest[0][inside], expected[inside])
    # Outside the outline: background, even where a training grid had brain. In the grid's own frame (without
    # the outline frame) the two training grids blur into each other: not the anatomy of the new box, and brain
    # outside it.
    unframed = GatedPixelCNN(dataclasses.replace(config, outline_frame=False))
    unframed.init_position_logits(codes, torch.zeros(2, dtype=torch.int64))
    assert not hasattr(unframed, "outline_logits")
    with torch.no_grad():
        unframed_likeliest = unframed(codes[:1], torch.zeros(1, dtype=torch.int64), new).argmax(1)[0]
    assert not torch.equal(unframed_likeliest[inside], expected[inside])
    assert (likeliest[0][~inside] == 0).all() and (unframed_likeliest[~inside] != 0).any()
    # Row 6, columns 4..6 lie inside both training outlines: outside an outline there, the position's codes outside
    # its outlines (all background), not even odds.
    assert (model.position_logits[0, :, 6, 4:7].argmax(dim=0) == 0).all()
    assert model.position_logits[0, 0, 6, 4] > model.position_logits[0, 1, 6, 4] + 2
    with pytest.raises(ConfigError, match="needs the outlines"):
        model.init_position_logits(codes, torch.zeros(2, dtype=torch.int64))


def test_framed_position_logits_are_the_same_whichever_batch_the_grids_are_counted_in():
    outlines = boxes([(1, 1, 6), (6, 4, 10), (2, 3, 9)])
    codes = outlines * torch.randint(1, 3, outlines.shape, generator=torch.Generator().manual_seed(0))
    config = PixelCNNConfig(codebook_size=3, channels=8, layers=1, grid_size=16, positions=2, attention_layers=0,
                            outline_modes=1)
    positions = torch.tensor([0, 1, 0])
    at_once, one_by_one = GatedPixelCNN(config), GatedPixelCNN(config)
    at_once.init_position_logits(codes, positions, outlines)
    one_by_one.init_position_logits(codes, positions, outlines, batch=1)
    assert torch.equal(at_once.outline_logits, one_by_one.outline_logits)
    assert torch.equal(at_once.position_logits, one_by_one.position_logits)
    assert not torch.equal(at_once.outline_logits[0], at_once.outline_logits[1])  # counted per position


def test_the_background_is_the_codes_common_outside_the_training_outlines_and_only_they_are_allowed_there():
    outlines = boxes([(2, 2, 8)] * 60)  # 60 grids of 16x16, 192 of their 256 cells outside the outline
    codes = outlines * 2  # code 2 inside
    codes[:, 0, :] = 1  # code 1 on 960 cells outside: background
    codes[0, 15, 15] = 3  # code 3 on 1 of 11,520 outside cells, under BACKGROUND_SHARE (1e-4): the encoder's slip
    model = GatedPixelCNN(PixelCNNConfig(codebook_size=4, channels=8, layers=1, grid_size=16, positions=1,
                                         attention_layers=0, outline_modes=1))
    assert model.background_codes.all()  # until fitted
    model.fit_background(codes, outlines)
    assert model.background_codes.tolist() == [True, True, False, False]
    allowed = model.allowed_codes(outlines[:2])
    assert allowed.shape == (2, 4, 16, 16)
    assert allowed[:, :, 5, 5].all()  # inside: every code
    assert allowed[:, :, 0, 0].tolist() == [[True, True, False, False]] * 2
    model.fit_background(codes, torch.ones_like(outlines))  # nothing outside: nothing to keep to
    assert model.background_codes.all()
    with pytest.raises(ConfigError, match="needs the outlines"):
        model.allowed_codes(None)
    without = GatedPixelCNN(dataclasses.replace(model.config, outline_background=False))
    assert without.allowed_codes(outlines) is None and not hasattr(without, "background_codes")
    with pytest.raises(ConfigError, match="does not keep the background"):
        without.fit_background(codes, outlines)


def test_drawn_outlines_are_whole_discs_within_the_range_of_the_training_ones_at_each_position():
    radii = [6.0, 7.0, 8.0, 9.0, 10.0]
    outlines = torch.cat([discs(radii), discs([r / 2 for r in radii])])
    positions = torch.tensor([0] * 5 + [1] * 5)
    model = OutlineModel(rows=3, grid_size=32, modes=4)
    model.fit(outlines, positions)
    drawn = model.sample(torch.tensor([0] * 50 + [1] * 50 + [2]), torch.Generator().manual_seed(0))
    areas = drawn.sum(dim=(1, 2)).float()
    radii_drawn = (areas[:100] / torch.pi).sqrt()
    # Position 0's radii have mean 8 and standard deviation 1.6, position 1's half that: so have the drawn ones.
    for drawn_radii, mean, deviation in ((radii_drawn[:50], 8.0, 1.58), (radii_drawn[50:], 4.0, 0.79)):
        assert abs(drawn_radii.mean() - mean) < 0.5 * deviation
        assert 0.6 * deviation < drawn_radii.std() < 1.5 * deviation
    assert drawn[100].sum() == 0  # position 2 had no training outlines: empty
    # Whole: every drawn outline is one disc about the centre, with no hole, bite or second piece.
    for outline, area in zip(drawn[:100], areas[:100], strict=True):
        radius = (area / torch.pi).sqrt()
        assert (outline == discs([float(radius)])[0]).float().mean() > 0.97
    again = model.sample(torch.tensor([0] * 50 + [1] * 50 + [2]), torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
    # Temperature scales the spread: at 0.5 half of it, at 0 every outline of a position is its mean one (radius 8).
    cooler = model.sample(torch.zeros(50, dtype=torch.int64), torch.Generator().manual_seed(0), temperature=0.5)
    cooler_radii = (cooler.sum(dim=(1, 2)).float() / torch.pi).sqrt()
    assert 0.3 < cooler_radii.std() / radii_drawn[:50].std() < 0.7
    frozen = model.sample(torch.zeros(5, dtype=torch.int64), torch.Generator().manual_seed(0), temperature=0.0)
    assert (frozen == frozen[0]).all() and abs(float((frozen[0].sum() / torch.pi).sqrt()) - 8.0) < 0.5


def test_a_prior_with_an_outline_model_is_conditioned_on_the_outline_and_keeps_the_model_in_its_state():
    config = PixelCNNConfig(codebook_size=4, channels=8, layers=2, grid_size=8, positions=3, attention_layers=0,
                            position_logits=False, outline_modes=2)  # so the head starts non-zero
    assert (config.context_side, config.context_codes) == (8, 2)
    model = GatedPixelCNN(config)
    outlines = discs([2.0, 3.0, 2.5, 3.5], size=8)
    model.fit_outlines(outlines, torch.tensor([0, 0, 1, 1]))
    state = model.state_dict()
    assert {"outline.mean", "outline.modes"} <= set(state)
    copy = GatedPixelCNN(config)
    copy.load_state_dict(state)
    assert torch.equal(copy.draw_outlines(torch.tensor([0, 1]), 2, torch.Generator().manual_seed(1)),
                       model.draw_outlines(torch.tensor([0, 1]), 2, torch.Generator().manual_seed(1)))
    codes = torch.zeros(2, 8, 8, dtype=torch.int64)
    torch.nn.init.normal_(model.location_projection.weight)  # as after training: the context then matters
    with pytest.raises(ConfigError, match="outlines of shape"):
        model(codes, torch.tensor([0, 1]))
    inside, outside = outlines[:2], 1 - outlines[:2]
    assert not torch.allclose(model(codes, torch.tensor([0, 1]), inside),
                              model(codes, torch.tensor([0, 1]), outside))
    with pytest.raises(ConfigError, match="no outline model"):
        GatedPixelCNN(PixelCNNConfig(grid_size=8, attention_layers=0)).draw_outlines(None, 1)


@pytest.mark.parametrize(("options", "message"), [
    ({"outline_modes": 4, "context_grid_size": 16, "context_codebook_size": 8}, "takes no other context"),
    ({"outline_modes": 4, "location_channels": 0}, "location_channels > 0"),
    ({"outline_modes": 257}, r"outline_modes = 257 .*0\.\.256"),
])
def test_outline_settings_that_cannot_work_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        PixelCNNConfig(**options).validate()
