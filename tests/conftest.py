import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainvq.data.demo import make_demo_cohort


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
