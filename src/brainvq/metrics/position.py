"""Slice-position consistency: does a generated slice show the anatomy of the position it was asked for?

A SmallCNN learns the slice position of real training slices, as a classification over the positions; its
prediction is the expected position under its softmax. Its mean absolute error on generated slices (against the
position each was generated for) is compared with its error on real held-out slices: a prior that draws the
right anatomy for each position scores close to the real error, one that draws brain-like texture in a
plausible outline does not. The network's penultimate layer is also a feature space learnt on the training split
(nothing downloaded) for a Fréchet distance (`frechet_distance` in metrics/samples.py), as Inception's is for
FID. Why classification and not regression: trained by squared error, the network's features collapsed onto the
one number it predicts (half of them never fired on the demo cohort), and a Fréchet distance in them scored
shapeless generated blobs closer to the test slices than the validation slices are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from brainvq.metrics.small_cnn import SmallCNN, downsample, predict, train_small_cnn


class PositionRegressor:
    """Predicts slice positions 0..positions-1 of images [N, 1, H, W] in [0, 1]."""

    def __init__(self, images: Tensor, slice_indices: Tensor, positions: int, *, epochs: int = 15,
                 seed: int = 0) -> None:
        self.positions = positions
        self.network: SmallCNN = train_small_cnn(downsample(images), slice_indices, loss="categorical",
                                                 classes=positions, epochs=epochs, seed=seed)

    def predict(self, images: Tensor) -> Tensor:
        """Predicted positions [N] (float, in slice units): the expected position under the network's softmax."""
        probabilities = predict(self.network, downsample(images)).reshape(len(images), -1).softmax(dim=1)
        return probabilities @ torch.arange(self.positions, dtype=probabilities.dtype)

    def mean_absolute_error(self, images: Tensor, slice_indices: Tensor) -> float:
        """Mean |predicted - true| position over `images`, in slices."""
        return float((self.predict(images) - slice_indices.float()).abs().mean())

    def features(self, images: Tensor) -> np.ndarray:
        """The regressor's penultimate features [N, 64] as float64, for a Fréchet distance."""
        return predict(self.network.features, downsample(images)).double().numpy()

