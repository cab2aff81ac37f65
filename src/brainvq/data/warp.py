"""Warped copies of slices: each slice under its own small random affine transform (rotation, scale, aspect,
shift), so that the prior learns from more shapes than the training cases have (data augmentation).

Why: after the demo's 8.5 minutes (1.4 passes over the training grids and their mirror images) the prior already
fitted its training grids 0.2-0.37 bits per code better than unseen cases, most at the lowest slice positions.
Two warped copies of each training slice and of its mirror image took the test NLL from 0.968 to 0.929 bits per
code in the same minutes and the Fréchet distance of its samples from 0.78x to 0.65x real's; the lowest slices
still go wrong about as often, and the encoding costs minutes, so a run takes none unless asked
(config.PRIOR_WARPED_COPIES; benchmarks/RESULTS.md, "warped copies").

The warps are drawn from a fixed seed per copy, not the run's seed: a copy's slices, and so its cached code
grids, are the same for every run on the same data.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from brainvq.data.dataset import SliceDataset, SliceSet

MAX_ROTATION_DEGREES = 8.0
MAX_SCALE_CHANGE = 0.08  # the slice is scaled by 1 - this .. 1 + this
MAX_ASPECT_CHANGE = 0.04  # and stretched by 1 +- this along one axis against the other
MAX_SHIFT = 0.03  # of the slice's side, along each axis (8 pixels of 256)
WARP_SEED = 1234
# Bumped whenever the warps above change: the cache key of a warped copy's code grids carries it.
WARP_VERSION = 1


def random_affines(count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random warps as F.affine_grid's maps [count, 2, 3], from each output place to where it reads
    the slice (coordinates -1..1 across it): a rotation of up to MAX_ROTATION_DEGREES, a scale within
    MAX_SCALE_CHANGE, an aspect within MAX_ASPECT_CHANGE and a shift of up to MAX_SHIFT of the side."""
    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle = uniform(count) * math.radians(MAX_ROTATION_DEGREES)
    scale = 1 + uniform(count) * MAX_SCALE_CHANGE
    aspect = 1 + uniform(count) * MAX_ASPECT_CHANGE
    shift = uniform(count, 2) * 2 * MAX_SHIFT  # the side spans 2 in these coordinates
    affines = torch.zeros(count, 2, 3)
    # The map goes from output to input, so it holds the inverse of the scaling: a larger brain reads closer in.
    x_scale, y_scale = scale * aspect, scale / aspect
    affines[:, 0, 0], affines[:, 0, 1] = torch.cos(angle) / x_scale, -torch.sin(angle) / x_scale
    affines[:, 1, 0], affines[:, 1, 1] = torch.sin(angle) / y_scale, torch.cos(angle) / y_scale
    affines[:, :, 2] = shift
    return affines


def warp_pixels(pixels: np.ndarray, affines: torch.Tensor, *, nearest: bool = False) -> np.ndarray:
    """uint8 [N, S, S] under the warps `affines` [N, 2, 3] -> uint8 [N, S, S]; bilinear for images, `nearest`
    for label maps (a class index must never be interpolated). Outside the slice is 0 (background)."""
    values = torch.from_numpy(np.array(pixels, dtype=np.float32))[:, None]
    places = F.affine_grid(affines, list(values.shape), align_corners=False)
    warped = F.grid_sample(values, places, mode="nearest" if nearest else "bilinear", align_corners=False)
    return warped[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def warped_copy(slices: SliceSet, copy: int, *, mirrored: bool = False, batch: int = 256) -> SliceSet:
    """Copy number `copy` (0, 1, ...) of `slices` (mirrored left-right first with `mirrored`), each slice and its
    label map under its own random warp, in memory; its key says which copy of which slices it is."""
    generator = torch.Generator().manual_seed(WARP_SEED + 2 * copy + int(mirrored))
    affines = random_affines(len(slices.images), generator)

    def warped(array: np.ndarray, nearest: bool) -> np.ndarray:
        parts = [warp_pixels(array[start:start + batch, :, ::-1] if mirrored else array[start:start + batch],
                             affines[start:start + batch], nearest=nearest)
                 for start in range(0, len(array), batch)]
        return np.concatenate(parts) if parts else np.zeros_like(array)

    labels = None if slices.labels is None else warped(slices.labels, nearest=True)
    key = f"{slices.key}-warp{WARP_VERSION}-{copy}{'-mirrored' if mirrored else ''}"
    return dataclasses.replace(slices, images=warped(slices.images, nearest=False), labels=labels, key=key)


def training_variants(mirror: bool, warped_copies: int) -> list[tuple[int | None, bool]]:
    """The extra versions of the training slices a run also trains on, as (warped copy or None, mirrored): their
    mirror images with `mirror`, and each of `warped_copies` warped copies of them (and of the mirror images)."""
    mirrors = (False, True) if mirror else (False,)
    return [(copy, mirrored) for copy in (None, *range(warped_copies)) for mirrored in mirrors
            if copy is not None or mirrored]


def variant_dataset(slices: SliceSet, copy: int | None, mirrored: bool) -> SliceDataset:
    """`slices` as one version (see `training_variants`): warped copy `copy` (None: as they are), mirrored
    left-right first with `mirrored`."""
    if copy is None:
        return SliceDataset(slices, mirrored=mirrored)
    return SliceDataset(warped_copy(slices, copy, mirrored=mirrored))
