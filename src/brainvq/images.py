"""Saving and loading slices as 8-bit grayscale PNG files, singly or tiled into a grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from brainvq.atomic import atomic_path
from brainvq.data.layout import grayscale_pixels, read_image

GAP_VALUE = 128
"""Grey level of the gaps between grid tiles: mid-grey stays visible against the black around each brain."""


def to_uint8(images: Tensor | np.ndarray) -> np.ndarray:
    """Convert float images to 8-bit grey levels.

    Args:
        images: float tensor or array [N, 1, H, W] or [N, H, W] with values in [0, 1] (any float dtype, any
            device). Values outside [0, 1] are clamped to it.

    Returns:
        uint8 array [N, H, W]: each value times 255, rounded to the nearest integer with ``np.rint``.
    """
    if isinstance(images, Tensor):
        images = images.detach().float().cpu().numpy()  # float() first: numpy has no bfloat16
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3:
        raise ValueError(f"expected images [N, 1, H, W] or [N, H, W], got shape {images.shape}")
    return np.rint(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a uint8 image [H, W] to ``path`` as an 8-bit grayscale ('L') PNG, creating its folder.

    The PNG is written to a temporary file in the same folder and then renamed over ``path``, so that a
    reader, or a crash mid-write, never leaves a truncated image under the final name.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a uint8 image [H, W], got {image.dtype} {image.shape}")
    with atomic_path(path) as temporary:
        Image.fromarray(image).save(temporary, format="PNG")


def image_grid(rows: Sequence[np.ndarray], *, pad: int = 2) -> np.ndarray:
    """Tile rows of images into one image, e.g. originals above their reconstructions.

    Args:
        rows: R uint8 arrays [N, H, W] of one shape, N >= 1. Row r's N images lie side by side in the r-th
            strip of the grid.
        pad: width in pixels of the GAP_VALUE (mid-grey) gaps between neighbouring tiles; the grid has no
            outer border.

    Returns:
        uint8 array [R * H + (R - 1) * pad, N * W + (N - 1) * pad].
    """
    if not rows or any(row.dtype != np.uint8 or row.ndim != 3 or row.shape != rows[0].shape for row in rows):
        raise ValueError(f"expected uint8 rows [N, H, W] of one shape, got {[row.shape for row in rows]}")
    n_columns, height, width = rows[0].shape
    if n_columns == 0:
        raise ValueError("expected at least one image per row")
    grid_shape = (len(rows) * (height + pad) - pad, n_columns * (width + pad) - pad)
    grid = np.full(grid_shape, GAP_VALUE, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = r * (height + pad), c * (width + pad)
            grid[top : top + height, left : left + width] = image
    return grid


def save_grid(rows: Sequence[np.ndarray], path: str | Path, *, pad: int = 2) -> None:
    """Tile ``rows`` with ``image_grid`` and write the result with ``save_png``."""
    save_png(image_grid(rows, pad=pad), path)


def load_png(path: str | Path) -> np.ndarray:
    """Read an image file as a uint8 array [H, W], converting it to 8-bit grayscale if stored otherwise.

    The decoding rules are those of the slice data sets (:func:`~brainvq.data.layout.grayscale_pixels`): colour
    is converted to grayscale, and 16-bit images are scaled by their maximum rather than clipped.

    Raises:
        DataError: the file is missing, unreadable, not a complete image, or absurdly large.
    """
    return grayscale_pixels(read_image(path), path)
