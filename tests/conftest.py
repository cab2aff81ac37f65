"""Data shared by the tests: the tiny demo cohort, tiny OASIS-layout folders (with masks), the private cache."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainvq.data.demo import make_demo_cohort
from brainvq.data.layout import IMAGE_SIZE, MASK_VALUES, SLICES_PER_CASE, mask_folder, split_folder, write_case


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A 2/1/1-case demo cohort (64/32/32 slices), made once per test session."""
    folder = tmp_path_factory.mktemp("cohort") / "demo"
    make_demo_cohort(folder, train_cases=2, val_cases=1, test_cases=1, seed=3)
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep the decoded-slice cache out of the user's home folder."""
    monkeypatch.setenv("BRAINVQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def write_stored_png(path: Path, pixels: np.ndarray, *, in_place: bool = False) -> None:
    """Write `pixels` as a PNG without compression, whose size therefore depends on the image's shape alone.

    `in_place`: keep the size and modification time of the PNG already there (one written by this function), as
    a tool that rewrites slices within the file system's timestamp granularity would leave them."""
    before = path.stat() if in_place else None
    Image.fromarray(pixels).save(path, compress_level=0)
    if before is not None:
        assert path.stat().st_size == before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.fixture
def stored_png_writer() -> Callable[..., None]:
    """:func:`write_stored_png`, for tests of caches that must notice slices replaced in place."""
    return write_stored_png


# Tiny OASIS cohort: case numbers per split, disjoint as in OASIS.
TINY_CASES = {"train": (1, 2), "validate": (3,), "test": (4,)}


def slice_pixels(case_number: int, slice_index: int) -> np.ndarray:
    """A distinct, deterministic uint8 [256, 256] image for each (case, slice), so values can be compared."""
    ramp = np.add.outer(np.arange(IMAGE_SIZE), 3 * np.arange(IMAGE_SIZE))
    return ((ramp + 37 * case_number + 11 * slice_index) % 256).astype(np.uint8)


def mask_pixels(case_number: int, slice_index: int) -> np.ndarray:
    """A distinct, deterministic uint8 [256, 256] mask of MASK_VALUES for each (case, slice)."""
    return np.asarray(MASK_VALUES, dtype=np.uint8)[(slice_pixels(case_number, slice_index) // 7) % 4]


def write_slices(folder: Path, case_ids: list[str], n_slices: int = SLICES_PER_CASE) -> list[Path]:
    """Write ``<case_id>_slice_<S>.png`` images (content from :func:`slice_pixels`) and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for case_number, case_id in enumerate(case_ids, start=1):
        for slice_index in range(n_slices):
            path = folder / f"{case_id}_slice_{slice_index}.png"
            Image.fromarray(slice_pixels(case_number, slice_index)).save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="session")
def pristine_oasis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2/1/1-case OASIS-layout folder, written once; tests get copies through ``oasis_dir``."""
    data_dir = tmp_path_factory.mktemp("pristine") / "oasis"
    for split, case_numbers in TINY_CASES.items():
        folder = split_folder(data_dir, split)
        folder.mkdir(parents=True)
        for case_number in case_numbers:
            write_case(folder, case_number, np.stack([slice_pixels(case_number, s) for s in range(SLICES_PER_CASE)]))
    return data_dir


@pytest.fixture
def oasis_dir(pristine_oasis: Path, tmp_path: Path) -> Path:
    """A fresh, modifiable copy of the tiny OASIS-layout folder."""
    return Path(shutil.copytree(pristine_oasis, tmp_path / "oasis"))


@pytest.fixture
def mask_values() -> Callable[[int, int], np.ndarray]:
    """:func:`mask_pixels`: the mask written for (case number, slice index) by ``oasis_with_masks``."""
    return mask_pixels


@pytest.fixture
def oasis_with_masks(oasis_dir: Path) -> Path:
    """``oasis_dir`` with OASIS segmentation folders: a mask (:func:`mask_pixels`) beside every slice."""
    for split, case_numbers in TINY_CASES.items():
        folder = mask_folder(oasis_dir, split)
        folder.mkdir()
        for case_number in case_numbers:
            masks = np.stack([mask_pixels(case_number, s) for s in range(SLICES_PER_CASE)])
            write_case(folder, case_number, masks, prefix="seg")
    return oasis_dir


@pytest.fixture
def slices_writer() -> Callable[..., list[Path]]:
    """:func:`write_slices`, for tests that need a generic folder of slice images."""
    return write_slices


@pytest.fixture
def pixels() -> Callable[[int, int], np.ndarray]:
    """:func:`slice_pixels`: the image written for (case number, slice index)."""
    return slice_pixels
