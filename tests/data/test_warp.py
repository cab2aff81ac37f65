"""Warped copies of slices (data/warp.py): fixed per copy, different between copies, label maps never blended."""

import numpy as np
import torch

from brainvq.data.dataset import load_split
from brainvq.data.warp import random_affines, warp_pixels, warped_copy


def test_a_warped_copy_is_the_same_every_time_and_differs_from_the_slices_and_the_other_copies(oasis_with_masks):
    slices = load_split(oasis_with_masks, "train")
    first, again, second = warped_copy(slices, 0), warped_copy(slices, 0), warped_copy(slices, 1)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert first.key == again.key and len({slices.key, first.key, second.key}) == 3  # cached apart
    for other in (slices.images, second.images):
        assert all(not np.array_equal(a, b) for a, b in zip(first.images, other, strict=True))
    assert first.images.dtype == np.uint8 and first.images.shape == slices.images.shape
    np.testing.assert_array_equal(first.slice_indices, slices.slice_indices)
    # A label map is moved, never blended: only the classes it had, and a similar share of brain.
    assert set(np.unique(first.labels)) <= set(np.unique(slices.labels))
    share = (first.labels > 0).mean() / (slices.labels > 0).mean()
    assert 0.8 < share < 1.25


def test_a_mirrored_copy_is_the_mirror_image_warped_by_its_own_draws(oasis_with_masks):
    slices = load_split(oasis_with_masks, "train")
    mirrored = warped_copy(slices, 0, mirrored=True)
    affines = random_affines(len(slices.images), torch.Generator().manual_seed(1234 + 1))
    np.testing.assert_array_equal(mirrored.images, warp_pixels(slices.images[:, :, ::-1], affines))
    assert mirrored.key != warped_copy(slices, 0).key


def test_the_identity_warp_keeps_every_pixel_and_a_shift_moves_them():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    np.testing.assert_array_equal(warp_pixels(pixels, identity), pixels)
    np.testing.assert_array_equal(warp_pixels(pixels, identity, nearest=True), pixels)
    shifted = identity.clone()
    shifted[:, 0, 2] = 2 * 4 / 32  # read 4 pixels to the right: the content moves 4 pixels left
    moved = warp_pixels(pixels, shifted, nearest=True)
    np.testing.assert_array_equal(moved[:, :, :28], pixels[:, :, 4:])
    assert (moved[:, :, 28:] == 0).all()


def test_random_warps_stay_within_their_bounds():
    affines = random_affines(2000, torch.Generator().manual_seed(0))
    linear = affines[:, :, :2]
    determinant = torch.linalg.det(linear)  # 1 / (scale^2): scales within 1 -+ 0.08
    assert (determinant > 1 / 1.08**2 - 1e-6).all() and (determinant < 1 / 0.92**2 + 1e-6).all()
    assert affines[:, :, 2].abs().max() <= 0.06 + 1e-6  # 3% of the side, in coordinates spanning 2
    angles = torch.atan2(linear[:, 1, 0], linear[:, 1, 1]).rad2deg()
    assert angles.abs().max() <= 8 + 1e-4 and angles.abs().max() > 7  # the whole range is drawn
