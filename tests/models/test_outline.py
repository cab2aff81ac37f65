import pytest
import torch

from brainvq.config import PixelCNNConfig
from brainvq.errors import ConfigError
from brainvq.models.outline import OutlineModel, signed_distance
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
