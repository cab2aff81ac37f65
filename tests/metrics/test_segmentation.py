import pytest
import torch

from brainvq.metrics.segmentation import DiceCounter, IntensityRanges, dice_per_class


def test_dice_by_hand():
    truth = torch.tensor([[[0, 1, 1, 2], [2, 2, 3, 3]]])
    predicted = torch.tensor([[[0, 1, 2, 2], [2, 3, 3, 3]]])
    dice = dice_per_class(predicted, truth)
    # CSF: 1 overlap, 1 predicted, 2 true; GM: 2 overlap, 3 and 3; WM: 2 overlap, 3 and 2.
    assert dice["dice_csf"] == pytest.approx(2 * 1 / 3)
    assert dice["dice_grey_matter"] == pytest.approx(2 * 2 / 6)
    assert dice["dice_white_matter"] == pytest.approx(2 * 2 / 5)
    assert dice["dice_mean"] == pytest.approx((2 / 3 + 4 / 6 + 4 / 5) / 3)


def test_dice_pools_pixels_over_batches_instead_of_averaging_images():
    """One image with a large, perfect WM region and one with a single missed WM pixel: pooled Dice stays high,
    where a per-image mean would be 0.5."""
    big = torch.full((1, 8, 8), 3)
    missed = torch.zeros((1, 8, 8), dtype=torch.long)
    missed_truth = missed.clone()
    missed_truth[0, 0, 0] = 3
    counter = DiceCounter()
    counter.update(big, big)
    counter.update(missed, missed_truth)
    assert counter.compute()["dice_white_matter"] == pytest.approx(2 * 64 / (64 + 65))


def test_a_tissue_absent_from_both_maps_counts_as_agreement_and_background_is_left_out():
    truth = torch.zeros((1, 4, 4), dtype=torch.long)
    truth[0, :2] = 2
    predicted = truth.clone()
    predicted[0, 3] = 1  # background called CSF: CSF Dice 0, the others perfect
    dice = dice_per_class(predicted, truth)
    assert dice == {"dice_csf": 0.0, "dice_grey_matter": 1.0, "dice_white_matter": 1.0, "dice_mean": 2 / 3}
    with pytest.raises(ValueError, match="shapes"):
        dice_per_class(predicted, truth[:, :2])


def banded(intensity: torch.Tensor) -> torch.Tensor:
    """Class of each pixel of a synthetic slice: 0 below 0.1, CSF up to 0.4, GM up to 0.7, WM above."""
    return torch.bucketize(intensity, torch.tensor([0.1, 0.4, 0.7]))


def test_intensity_ranges_learn_each_tissues_central_90_percent():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(20, 1, 32, 32, generator=generator)
    ranges = IntensityRanges(images, banded(images[:, 0]))
    # Uniform intensities within each band: the 5th and 95th percentiles lie 5% of the band in from its ends.
    expected = torch.tensor([[0.115, 0.385], [0.415, 0.685], [0.715, 0.985]])
    assert torch.allclose(ranges.ranges, expected, atol=0.01)


def test_pairs_that_belong_together_agree_far_more_than_mismatched_ones():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(20, 1, 32, 32, generator=generator)
    ranges = IntensityRanges(images, banded(images[:, 0]))
    fresh = torch.rand(10, 1, 32, 32, generator=generator)
    matched = ranges.agreement(fresh, banded(fresh[:, 0]))
    assert matched["all"] == pytest.approx(0.9, abs=0.02)  # the coverage of the ranges, by construction
    mismatched = ranges.agreement(fresh, banded(fresh[:, 0].flip(0)))  # label maps of other images
    assert mismatched["all"] < 0.4
    labels = banded(fresh[:, 0])
    csf_only = ranges.agreement(fresh, labels.where(labels == 1, 0))
    assert csf_only["white_matter"] is None and csf_only["csf"] == pytest.approx(0.9, abs=0.03)
