"""Slices for training: each split is decoded once into a uint8 cache file, then memory-mapped.

Decoding thousands of PNGs every epoch would dominate training time on a small machine, and holding them as
Python objects would cost memory per worker. The first :func:`load_split` of a folder decodes its images
slice by slice into ``<cache>/<key>.uint8`` (raw uint8 [N, 256, 256]) with a ``<key>.json`` index beside
it; later loads map that file without decoding. The key hashes the folder, the file names, sizes and
modification times, so a changed folder gets a new cache.

Decoding policy for images that are not 8-bit grayscale (:func:`~brainvq.data.layout.grayscale_pixels`):
colour (RGB, RGBA, palette...) is converted to grayscale with Pillow's ``convert("L")``; 16-bit, 32-bit or
float grayscale is scaled so that the image's own maximum becomes 255 (negative values become 0). A corrupt
image, or one that is not 256x256, is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from brainvq.data.layout import (
    IMAGE_SIZE,
    grayscale_pixels,
    parse_slice_name,
    read_image,
    size_problem,
    split_files,
)
from brainvq.errors import DataError

# Part of the cache key: bump it when decoding changes so that caches made by older code are not reused.
CACHE_VERSION = 1
_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)


@dataclass
class SliceSet:
    """The slices of one split, in file order (by case, then slice index).

    ``images`` is uint8 [N, 256, 256], a read-only ``np.memmap`` of the cache; ``slice_indices`` is int64 [N];
    ``case_ids`` and ``files`` have N entries.
    """

    images: np.ndarray
    case_ids: list[str]
    slice_indices: np.ndarray
    files: list[Path]
    split: str


class SliceDataset(Dataset):
    """A SliceSet for torch: item ``i`` is (image float32 [1, 256, 256] in [0, 1], slice index)."""

    def __init__(self, slices: SliceSet) -> None:
        self.slices = slices

    def __len__(self) -> int:
        return len(self.slices.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.slices.images[index].astype(np.float32) / 255
        return torch.from_numpy(image).unsqueeze(0), int(self.slices.slice_indices[index])


def default_cache_dir() -> Path:
    """``$BRAINVQ_CACHE_DIR`` if set, else ``~/.cache/brainvq``."""
    return Path(os.environ.get("BRAINVQ_CACHE_DIR") or Path.home() / ".cache" / "brainvq")


def load_split(
    data_dir: str | Path, split: str, *, cache_dir: str | Path | None = None, progress: bool = False
) -> SliceSet:
    """Load one split of a slice data set (OASIS split folders, or a folder of slice images split by case).

    Decodes the images into the cache on first use (``cache_dir``, default :func:`default_cache_dir`) and
    memory-maps them afterwards. Raises DataError naming the file or folder for anything unusable.
    """
    files = split_files(data_dir, split)
    if not files:
        raise DataError(f"no cases fall in the {split} split (too few cases in the folder)", data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(files)
    images_path, index_path = cache_dir / f"{key}.uint8", cache_dir / f"{key}.json"
    cached = _open_cache(images_path, index_path)
    if cached is None:
        _build_cache(files, images_path, index_path, progress)
        cached = _open_cache(images_path, index_path)
    images, index = cached
    return SliceSet(
        images=images,
        case_ids=index["case_ids"],
        slice_indices=np.array(index["slice_indices"], dtype=np.int64),
        files=[Path(file) for file in index["files"]],
        split=split,
    )


def read_slice(path: Path) -> np.ndarray:
    """Decode one slice image to uint8 [256, 256] following the module's decoding policy."""
    image = read_image(path)
    if problem := size_problem(image):
        raise DataError(problem, path)
    return grayscale_pixels(image, path)


def _cache_key(files: list[Path]) -> str:
    """SHA-1 of the folder, the files' names, sizes and modification times, and CACHE_VERSION."""
    folder = files[0].parent.resolve()
    try:
        stats = [(path.name, stat.st_size, stat.st_mtime_ns) for path in files for stat in [path.stat()]]
    except OSError as error:
        raise DataError(f"cannot read the file ({error.strerror})", error.filename or folder) from error
    return hashlib.sha1(json.dumps([CACHE_VERSION, str(folder), stats]).encode()).hexdigest()


def _open_cache(images_path: Path, index_path: Path) -> tuple[np.memmap, dict] | None:
    """The cached images (read-only memmap) and index, or None if there is no complete cache."""
    # The index is written last, after the images file is complete: a missing or unreadable index means no
    # cache, whatever else a killed build left behind.
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        count = len(index["files"])
        if images_path.stat().st_size != count * IMAGE_SIZE * IMAGE_SIZE:
            return None
        return np.memmap(images_path, dtype=np.uint8, mode="r", shape=(count, *_SHAPE)), index
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_cache(files: list[Path], images_path: Path, index_path: Path, progress: bool) -> None:
    """Decode ``files`` into ``images_path`` one slice at a time, then write ``index_path``; both atomically."""
    suffix = f".{os.getpid()}.tmp"  # per process, so two processes building the same cache do not collide
    images_tmp = images_path.with_name(images_path.name + suffix)
    index_tmp = index_path.with_name(index_path.name + suffix)
    names = [parse_slice_name(path) for path in files]
    index = {
        "files": [str(path.resolve()) for path in files],
        "case_ids": [name.case_id for name in names],
        "slice_indices": [name.slice_index for name in names],
    }
    try:
        images_path.parent.mkdir(parents=True, exist_ok=True)
        images = np.memmap(images_tmp, dtype=np.uint8, mode="w+", shape=(len(files), *_SHAPE))
        for i, path in enumerate(tqdm(files, desc="decoding slices", unit="slice", disable=not progress)):
            images[i] = read_slice(path)
        images.flush()
        del images  # closes the map before the rename
        os.replace(images_tmp, images_path)
        index_tmp.write_text(json.dumps(index), encoding="utf-8")
        os.replace(index_tmp, index_path)
    except OSError as error:
        raise DataError(f"cannot write the slice cache ({error})", images_path.parent) from error
    finally:
        images_tmp.unlink(missing_ok=True)
        index_tmp.unlink(missing_ok=True)
