import math

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from brainvq.models.pixelcnn import NO_POSITION, GatedPixelCNN, PixelCNNConfig
from brainvq.training.prior import PriorTask, drop_positions, nll_bits_per_code


def test_drop_positions_hides_about_the_asked_share_of_positions_and_keeps_the_rest():
    torch.manual_seed(0)
    positions = torch.arange(4000) % 32
    dropped = drop_positions(positions, 0.25)
    hidden = dropped == NO_POSITION
    assert 0.23 < hidden.float().mean() < 0.27
    assert torch.equal(dropped[~hidden], positions[~hidden])
    assert torch.equal(drop_positions(positions, 0.0), positions)


def test_a_windowed_prior_trains_and_is_scored_on_the_codes_of_its_window_only():
    torch.manual_seed(0)
    config = PixelCNNConfig(codebook_size=6, channels=8, layers=2, grid_size=16, attention_block=2, outline_modes=2,
                            windowed=True)
    model = GatedPixelCNN(config)
    torch.nn.init.normal_(model.head[-1].weight)  # the head starts at zero: every code would be as likely
    codes, positions = torch.randint(0, 6, (2, 16, 16)), torch.tensor([1, 7])
    outlines = torch.zeros(2, 16, 16, dtype=torch.int64)
    outlines[:, 6:10, 5:9] = 1
    window = model.window_of(outlines)
    assert window.height * window.width < 16 * 16 / 2
    inside = codes[:, window.rows, window.columns]
    with torch.no_grad():
        expected = F.cross_entropy(model(inside, positions, outlines, window), inside)
        loss = PriorTask(model, TensorDataset(codes, positions, outlines), precision="fp32").training_step(
            (codes, positions, outlines))["loss"]
        changed = codes.clone()
        changed[:, 0, 0] = (changed[:, 0, 0] + 1) % 6  # outside the window: not modelled, not scored
        changed_loss = PriorTask(model, TensorDataset(changed, positions, outlines), precision="fp32").training_step(
            (changed, positions, outlines))["loss"]
    torch.testing.assert_close(loss, expected)
    assert torch.equal(changed_loss, loss)
    bits = nll_bits_per_code(model, TensorDataset(codes, positions, outlines), precision="fp32")
    assert abs(bits - float(expected) / math.log(2)) < 1e-5
