"""Metrics for tissue label maps: per-class Dice overlap, and how well a label map agrees with its image.

`IntensityRanges` checks generated pairs, where there is no true label map: it learns the intensity range of
each tissue from real pairs and counts how many labelled pixels of a pair fall in the range of their label.
Real slices score high but not 1 (tissue intensities overlap at boundaries and vary between scans); a generated
pair whose label map does not belong to its image scores lower.

Label maps are class indices (0 background, 1 CSF, 2 grey matter, 3 white matter: the order of
:data:`brainvq.data.layout.MASK_VALUES`), int tensors [N, H, W]. Dice is accumulated over all pixels of all
images (not averaged per image), so a slice where a class is tiny or absent does not swing the figure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from brainvq.data.layout import MASK_CLASS_NAMES

TISSUE_NAMES = MASK_CLASS_NAMES[1:]
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


COVERAGE = 0.9
"""Share of each tissue's real intensities inside its range (the 5th to the 95th percentile)."""
MAX_PIXELS_PER_CLASS = 1_000_000  # a random subset this large pins the percentiles to well under 1 grey level


class IntensityRanges:
    """Per-tissue intensity ranges learnt on real pairs: images [N, 1, H, W] in [0, 1], labels [N, H, W]."""

    def __init__(self, images: Tensor, labels: Tensor, *, coverage: float = COVERAGE, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        tail = (1 - coverage) / 2
        intensities, labels = images[:, 0].flatten().float(), labels.flatten()
        ranges = []
        for tissue in range(1, len(TISSUE_NAMES) + 1):
            values = intensities[labels == tissue]
            if len(values) == 0:
                raise ValueError(f"no {TISSUE_NAMES[tissue - 1]} pixels in the real label maps")
            if len(values) > MAX_PIXELS_PER_CLASS:
                values = values[torch.randint(len(values), (MAX_PIXELS_PER_CLASS,), generator=generator)]
            ranges.append(torch.quantile(values, torch.tensor([tail, 1 - tail])))
        self.ranges = torch.stack(ranges)  # [3, 2]: (low, high) of CSF, grey matter, white matter

    def agreement(self, images: Tensor, labels: Tensor) -> dict[str, float | None]:
        """Share of each tissue's labelled pixels whose intensity lies in that tissue's range, and over all
        tissue pixels ("all"); None (JSON null) for a tissue no pixel is labelled with."""
        intensities, labels = images[:, 0].float().cpu(), labels.long().cpu()
        results, inside_total, count_total = {}, 0, 0
        for tissue, name in enumerate(TISSUE_NAMES, start=1):
            low, high = self.ranges[tissue - 1]
            values = intensities[labels == tissue]
            inside = int(((values >= low) & (values <= high)).sum())
            results[name] = inside / len(values) if len(values) else None
            inside_total, count_total = inside_total + inside, count_total + len(values)
        results["all"] = inside_total / count_total if count_total else None
        return results
