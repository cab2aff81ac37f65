"""Slices for training: each split is decoded once into a uint8 cache file, then memory-mapped.

Decoding thousands of PNGs every epoch would dominate training time on a small machine, and holding them as
Python objects would cost memory per worker. The first :func:`load_split` of a folder decodes its images
slice by slice into ``<cache>/<key>.uint8`` (raw uint8 [N, 256, 256]) with a ``<key>.json`` index beside
it; later loads map that file without decoding. The key hashes the folder and each file's name, size,
modification time and first and last ``SAMPLE_BYTES`` bytes, so a changed folder gets a new cache, even where a
file is rewritten with its size and modification time kept. The tail of a PNG holds the CRC-32 of its last data
chunk and the Adler-32 of all its pixels, so a PNG with any pixel changed gets a new key; other formats are
sampled at both ends only. Reading 8 KB of each file keeps the key cheap (it is computed on every load).
The cache folder as a whole (listing, clearing, the automatic clean-up) is :mod:`brainvq.data.cache`.

Decoding policy for images that are not 8-bit grayscale (:func:`~brainvq.data.layout.grayscale_pixels`):
colour (RGB, RGBA, palette...) is converted to grayscale with Pillow's ``convert("L")``; 16-bit, 32-bit or
float grayscale is scaled so that the image's own maximum becomes 255 (negative values become 0). A corrupt
image, or one that is not 256x256, is an error naming the file.

Segmentation masks (OASIS ``keras_png_slices_seg_<split>``, see :mod:`brainvq.data.layout`) are loaded with
their slices when the split has them. They are decoded the same way, must hold only the four
:data:`~brainvq.data.layout.MASK_VALUES`, and are cached as class indices 0..3 right after the images in the
same ``<key>.uint8`` file (uint8 [2, N, 256, 256]), so an entry stays one file that the cache folder's rules
cover.
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

from brainvq.atomic import atomic_path, atomic_write_bytes
from brainvq.data.cache import default_cache_dir, entry_paths, mark_used, prune
from brainvq.data.layout import (
    IMAGE_SIZE,
    parse_slice_name,
    read_mask,
    read_slice,
    split_files,
    split_masks,
)
from brainvq.errors import DataError
from brainvq.runtime import prepare_images

# Part of the cache key: bump it when decoding or the key changes so that caches made by older code are not
# reused (2: the key samples each file's bytes; the index records what the entry was made from; 3: masks).
CACHE_VERSION = 3
SAMPLE_BYTES = 4096  # read from each end of every file for the key: one page each
_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)


@dataclass
class SliceSet:
    """The slices of one split, in file order (by case, then slice index).

    ``images`` is uint8 [N, 256, 256], a read-only ``np.memmap`` of the cache; ``slice_indices`` is int64 [N];
    ``case_ids`` and ``files`` have N entries. ``key`` is the cache key, a fingerprint of the files' content:
    what is made from the slices (code grids) is remade when it changes. ``labels`` is uint8 [N, 256, 256] of
    class indices (0 background, 1 CSF, 2 grey matter, 3 white matter; a read-only memmap like ``images``)
    where the split has segmentation masks, else None; ``mask_files`` then names each slice's mask.
    """

    images: np.ndarray
    case_ids: list[str]
    slice_indices: np.ndarray
    files: list[Path]
    split: str
    key: str
    labels: np.ndarray | None = None
    mask_files: list[Path] | None = None


class SliceDataset(Dataset):
    """A SliceSet for torch: item ``i`` is (image float32 [1, 256, 256] in [0, 1], slice index), followed by
    the label map (uint8 [256, 256] class indices) where the slices have masks; with ``mirrored``, image and
    label map are mirrored left-right (their columns in reverse order)."""

    def __init__(self, slices: SliceSet, *, mirrored: bool = False) -> None:
        self.slices = slices
        self.mirrored = mirrored

    def __len__(self) -> int:
        return len(self.slices.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        image = torch.from_numpy(self._pixels(self.slices.images, index).astype(np.float32) / 255).unsqueeze(0)
        item = (image, int(self.slices.slice_indices[index]))
        if self.slices.labels is None:
            return item
        return (*item, torch.from_numpy(self._pixels(self.slices.labels, index)))

    def _pixels(self, array: np.ndarray, index: int) -> np.ndarray:
        """A copy of array[index] [256, 256] (mirrored if the data set is): the memmap is read-only."""
        return (array[index, :, ::-1] if self.mirrored else array[index]).copy()


def prepare_batch(batch: tuple | list, device: torch.device,
                  precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of SliceDataset items -> (images [B, 1, 256, 256] as :func:`~brainvq.runtime.prepare_images`
    makes them, label maps [B, 256, 256] on `device`, or None where the slices have none)."""
    labels = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
    return prepare_images(batch[0], device, precision), labels


def load_split(
    data_dir: str | Path, split: str, *, cache_dir: str | Path | None = None, progress: bool = False
) -> SliceSet:
    """Load one split of a slice data set (OASIS split folders, or a folder of slice images split by case).

    Decodes the images into the cache on first use (``cache_dir``, default :func:`default_cache_dir`) and
    memory-maps them afterwards; writing a new entry prunes old ones (:func:`brainvq.data.cache.prune`).
    The split's masks, if it has a mask folder, come with them (see :func:`~brainvq.data.layout.split_masks`).
    Raises DataError naming the file or folder for anything unusable.
    """
    files = split_files(data_dir, split)
    if not files:
        raise DataError(f"no cases fall in the {split} split (too few cases in the folder)", data_dir)
    masks = split_masks(data_dir, split, files)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(files + (masks or []))
    images_path, index_path = entry_paths(cache_dir, key)
    cached = _open_cache(images_path, index_path)
    if cached is None:
        made_from = {"data_dir": str(Path(data_dir).resolve()), "split": split}
        _build_cache(files, masks, made_from, images_path, index_path, progress)
        prune(cache_dir, keep=key)
        cached = _open_cache(images_path, index_path)
    planes, index = cached
    return SliceSet(
        images=planes[0],
        labels=planes[1] if len(planes) > 1 else None,
        mask_files=[Path(file) for file in index["masks"]] if "masks" in index else None,
        case_ids=index["case_ids"],
        slice_indices=np.array(index["slice_indices"], dtype=np.int64),
        files=[Path(file) for file in index["files"]],
        split=split,
        key=key,
    )


def _cache_key(files: list[Path]) -> str:
    """SHA-1 of CACHE_VERSION, the folder, and each file's name, size, modification time and sampled bytes."""
    folder = files[0].parent.resolve()
    digest = hashlib.sha1(json.dumps([CACHE_VERSION, str(folder)]).encode())
    for path in files:
        try:
            # Raw descriptor calls: a buffered file object per file would cost more than the reads themselves.
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                stat = os.fstat(descriptor)
                head = os.read(descriptor, SAMPLE_BYTES)
                # The last SAMPLE_BYTES, or whatever follows the head in a file of up to 2 * SAMPLE_BYTES.
                os.lseek(descriptor, max(SAMPLE_BYTES, stat.st_size - SAMPLE_BYTES), os.SEEK_SET)
                tail = os.read(descriptor, SAMPLE_BYTES)
            finally:
                os.close(descriptor)
        except OSError as error:
            raise DataError(f"cannot read the file ({error.strerror})", path) from error
        # The size fixes how many bytes head and tail hold, so the files' records cannot run into each other.
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        digest.update(head)
        digest.update(tail)
    return digest.hexdigest()


def _open_cache(images_path: Path, index_path: Path) -> tuple[np.memmap, dict] | None:
    """The cache (read-only memmap uint8 [planes, N, 256, 256]: the images, then the labels where the index
    lists masks) and its index, or None if there is no complete cache."""
    # The index is written last, after the images file is complete: a missing or unreadable index means no
    # cache, whatever else a killed build left behind.
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shape = (2 if "masks" in index else 1, len(index["files"]), *_SHAPE)
        if images_path.stat().st_size != np.prod(shape):
            return None
        planes = np.memmap(images_path, dtype=np.uint8, mode="r", shape=shape)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mark_used(index_path)
    return planes, index


def _build_cache(files: list[Path], masks: list[Path] | None, made_from: dict[str, str], images_path: Path,
                 index_path: Path, progress: bool) -> None:
    """Decode ``files`` (and ``masks``, one per file, if any) into ``images_path`` one slice at a time, then
    write ``index_path``; both atomically.

    ``made_from`` (data folder and split) goes into the index for ``brainvq cache list``."""
    names = [parse_slice_name(path) for path in files]
    index = {
        "made_from": made_from,
        "files": [str(path.resolve()) for path in files],
        "case_ids": [name.case_id for name in names],
        "slice_indices": [name.slice_index for name in names],
    }
    if masks is not None:
        index["masks"] = [str(path.resolve()) for path in masks]
    # A temporary of its own per write, so two processes building the same entry do not collide.
    with atomic_path(images_path) as temporary:
        shape = (1 if masks is None else 2, len(files), *_SHAPE)
        planes = np.memmap(temporary, dtype=np.uint8, mode="w+", shape=shape)
        for i, path in enumerate(tqdm(files, desc="decoding slices", unit="slice", disable=not progress)):
            planes[0, i] = read_slice(path)
            if masks is not None:
                planes[1, i] = read_mask(masks[i])
        planes.flush()
        del planes  # closes the map before the rename
    atomic_write_bytes(index_path, json.dumps(index).encode())
