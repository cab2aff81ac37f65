"""Slice-position consistency: does a generated slice show the anatomy of the position it was asked for?

A SmallCNN regressor learns the slice position of real training slices. Its mean absolute error on generated
slices (against the position each was generated for) is compared with its error on real held-out slices: a
prior that draws the right anatomy for each position scores close to the real error, one that draws brain-like
texture in a plausible outline does not. The regressor's penultimate layer is also a feature space learnt on the
training split (nothing downloaded) for a Fréchet distance (`frechet_distance` in metrics/samples.py).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from brainvq.metrics.small_cnn import SmallCNN, downsample, predict, train_small_cnn


class PositionRegressor:
    """Predicts slice positions 0..positions-1 of images [N, 1, H, W] in [0, 1]."""

    def __init__(self, images: Tensor, slice_indices: Tensor, positions: int, *, epochs: int = 15,
                 seed: int = 0) -> None:
        self.positions = positions
        targets = slice_indices.float() / max(positions - 1, 1)  # scaled to [0, 1] for a well-sized loss
        self.network: SmallCNN = train_small_cnn(downsample(images), targets, loss="squared", epochs=epochs,
                                                 seed=seed)

    def predict(self, images: Tensor) -> Tensor:
        """Predicted positions [N] (float, in slice units)."""
        return predict(self.network, downsample(images)) * max(self.positions - 1, 1)

    def mean_absolute_error(self, images: Tensor, slice_indices: Tensor) -> float:
        """Mean |predicted - true| position over `images`, in slices."""
        return float((self.predict(images) - slice_indices.float()).abs().mean())

    def features(self, images: Tensor) -> np.ndarray:
        """The regressor's penultimate features [N, 64] as float64, for a Fréchet distance."""
        return predict(self.network.features, downsample(images)).double().numpy()

