import numpy as np
import torch

from brainvq.metrics.position import PositionRegressor
from brainvq.metrics.samples import frechet_distance


def sized_by_position(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Discs whose radius grows with the slice position (as axial brain slices grow towards the middle), centred
    with a little jitter: [N, 1, 64, 64]."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.arange(64).float()
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    centres = 32 + (torch.rand(len(positions), 2, generator=generator) - 0.5) * 6
    radii = 6 + positions.float() * 0.8
    inside = (y - centres[:, 0, None, None]) ** 2 + (x - centres[:, 1, None, None]) ** 2 < radii[:, None, None] ** 2
    return inside.float().unsqueeze(1) * 0.8


def test_position_regressor_reads_the_position_and_its_features_tell_a_shifted_set():
    train_positions = torch.arange(320) % 32
    regressor = PositionRegressor(sized_by_position(train_positions, seed=0), train_positions, 32, epochs=30)
    test_positions = torch.arange(64) % 32
    test = sized_by_position(test_positions, seed=1)
    error = regressor.mean_absolute_error(test, test_positions)
    # A constant guess of the middle is 8 slices off on average; the regressor must be far better.
    assert error < 2.5
    # Images of the wrong positions (every one 16 slices away) are judged far worse than the real ones.
    assert regressor.mean_absolute_error(test, (test_positions + 16) % 32) > 3 * error
    features = regressor.features(test)
    assert features.shape == (64, 64) and features.dtype == np.float64
    alike = regressor.features(sized_by_position(test_positions, seed=2))
    only_small = regressor.features(sized_by_position(test_positions // 4, seed=3))
    assert frechet_distance(alike, features) < frechet_distance(only_small, features)
