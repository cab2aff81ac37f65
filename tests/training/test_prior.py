import torch

from brainvq.models.pixelcnn import NO_POSITION
from brainvq.training.prior import drop_positions


def test_drop_positions_hides_about_the_asked_share_of_positions_and_keeps_the_rest():
    torch.manual_seed(0)
    positions = torch.arange(4000) % 32
    dropped = drop_positions(positions, 0.25)
    hidden = dropped == NO_POSITION
    assert 0.23 < hidden.float().mean() < 0.27
    assert torch.equal(dropped[~hidden], positions[~hidden])
    assert torch.equal(drop_positions(positions, 0.0), positions)
