"""Metrics for tissue label maps: per-class Dice overlap.

Label maps are class indices (0 background, 1 CSF, 2 grey matter, 3 white matter: the order of
:data:`brainvq.data.layout.MASK_VALUES`), int tensors [N, H, W]. Dice is accumulated over all pixels of all
images (not averaged per image), so a slice where a class is tiny or absent does not swing the figure.
"""

from __future__ import annotations

import torch
from torch import Tensor

TISSUE_NAMES = ("csf", "grey_matter", "white_matter")
"""Names of classes 1, 2 and 3; class 0, background, is left out of Dice (it would flatter every map)."""


class DiceCounter:
    """Accumulates per-class overlaps over batches; ``compute()`` gives Dice per tissue and their mean."""

    def __init__(self) -> None:
        self.overlap = torch.zeros(len(TISSUE_NAMES) + 1, dtype=torch.float64)
        self.predicted = torch.zeros_like(self.overlap)
        self.truth = torch.zeros_like(self.overlap)

    def update(self, predicted: Tensor, truth: Tensor) -> None:
        """predicted, truth: class indices [N, H, W] (any int dtype, any device)."""
        if predicted.shape != truth.shape:
            raise ValueError(f"label maps of different shapes: {predicted.shape} and {truth.shape}")
        classes = len(self.overlap)
        predicted, truth = predicted.long().flatten().cpu(), truth.long().flatten().cpu()
        self.overlap += torch.bincount(truth[predicted == truth], minlength=classes).double()
        self.predicted += torch.bincount(predicted, minlength=classes).double()
        self.truth += torch.bincount(truth, minlength=classes).double()

    def compute(self) -> dict[str, float]:
        """{"dice_csf", "dice_grey_matter", "dice_white_matter", "dice_mean"}; a class absent from both maps
        counts as perfect agreement (1.0)."""
        total = self.predicted + self.truth
        dice = torch.where(total > 0, 2 * self.overlap / total.clamp(min=1), torch.ones_like(total))
        results = {f"dice_{name}": float(dice[index + 1]) for index, name in enumerate(TISSUE_NAMES)}
        results["dice_mean"] = sum(results.values()) / len(TISSUE_NAMES)
        return results


def dice_per_class(predicted: Tensor, truth: Tensor) -> dict[str, float]:
    """Dice of one batch of label maps [N, H, W] (see :class:`DiceCounter`)."""
    counter = DiceCounter()
    counter.update(predicted, truth)
    return counter.compute()
