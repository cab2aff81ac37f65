"""Code grids: every slice of a split encoded once by the trained VQ-VAE, cached in the run folder.

    RUN/codes/<split>.npy    uint8 [N, G, G], the code index at each latent position
    RUN/codes/<split>.json   case id and slice index of each grid, and what made them (checkpoint, slices)
    (the prior's extra training grids: <split>_mirrored, <split>_warped<k>, <split>_warped<k>_mirrored)

The prior trains on these grids (and, for a prior with an outline model, on each slice's outline at the grid's
size, made from the slices each time: it takes a moment); they are remade when the VQ-VAE checkpoint (its
SHA-256) or the split's slices change. The slices are identified by their cache key (:mod:`brainvq.data.dataset`),
which samples each file's bytes: slices replaced in place, with their sizes and modification times kept, give new
grids too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from brainvq.atomic import atomic_path, atomic_write_bytes, remove_stale_temporaries
from brainvq.data.dataset import SliceDataset, load_split, prepare_batch
from brainvq.data.warp import variant_dataset
from brainvq.metrics.image import brain_mask
from brainvq.metrics.samples import as_float_images
from brainvq.models.outline import fill_holes
from brainvq.models.vqvae import VQVAE
from brainvq.run import BEST_CHECKPOINT, CODES_FOLDER
from brainvq.runtime import autocast


@dataclass
class CodeGrids:
    """Code grids of one split: `codes` uint8 [N, G, G], `slice_indices` int64 [N], `case_ids` N strings, and
    the slices' `outlines` uint8 [N, G, G] (`slice_outlines`) where they were asked for, else None."""

    codes: np.ndarray
    slice_indices: np.ndarray
    case_ids: list[str]
    split: str
    outlines: np.ndarray | None = None


def slice_outlines(images: np.ndarray, grid_size: int, *, mirrored: bool = False, batch: int = 256) -> np.ndarray:
    """Slices uint8 [N, S, S] -> their outlines uint8 [N, G, G] (G = `grid_size`, dividing S): 1 where any of the
    code's (S/G)^2 pixels is brain by the metrics' brain mask (metrics/image.py), and in the holes that leaves
    (models/outline.py, `fill_holes`), else 0; of the slices mirrored left-right with `mirrored`.

    Any pixel, not most: then a code outside the outline is pure background in every training slice, and the
    prior learns to draw nothing there (with "at least half", codes of the brain's dark edge lay outside, and the
    prior drew dark smudges beyond the outline)."""
    scale = images.shape[-1] // grid_size
    outlines = []
    for start in range(0, len(images), batch):
        pixels = as_float_images(images[start:start + batch])
        inside = F.max_pool2d(brain_mask(pixels.flip(-1) if mirrored else pixels).float(), scale)[:, 0]
        outlines.append(fill_holes(inside).to(torch.uint8).numpy())
    return np.concatenate(outlines) if outlines else np.zeros((0, grid_size, grid_size), dtype=np.uint8)


@torch.no_grad()
def encode_dataset(model: VQVAE, dataset: SliceDataset, *, device: torch.device, precision: str,
                   batch_size: int = 32) -> np.ndarray:
    """All images of `dataset` (with their label maps, for a joint model) -> code grids uint8 [N, G, G], in data
    set order."""
    model.eval()
    grids = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        with autocast(device, precision):
            grids.append(model.encode(*prepare_batch(batch, device, precision)).to(torch.uint8).cpu())
    return torch.cat(grids).numpy()


def grids_name(split: str, *, mirrored: bool = False, warped: int | None = None) -> str:
    """The file name (without suffix) of a split's code grids in RUN/codes: `split`, `split`_mirrored,
    `split`_warped<k>, `split`_warped<k>_mirrored."""
    return split + (f"_warped{warped}" if warped is not None else "") + ("_mirrored" if mirrored else "")


def code_grids(run_dir: Path, data_dir: str | Path, split: str, model: VQVAE, *, device: torch.device,
               precision: str, mirrored: bool = False, warped: int | None = None,
               outlines: bool = False) -> CodeGrids:
    """The cached code grids of `split` (with `mirrored`: of its slices mirrored left-right; with `warped`: of
    that warped copy of them, data/warp.py; each cached apart), (re)made if missing or stale; with `outlines`, the
    slices' outlines too (seconds for a few thousand slices, so only for a prior that uses them)."""
    dataset = variant_dataset(load_split(data_dir, split), warped, mirrored)
    slices = dataset.slices
    folder = Path(run_dir) / CODES_FOLDER
    name = grids_name(split, mirrored=mirrored, warped=warped)
    codes_path, index_path = folder / f"{name}.npy", folder / f"{name}.json"
    made_by = {"checkpoint_sha256": _sha256(Path(run_dir) / BEST_CHECKPOINT), "slices_key": slices.key}
    made_outlines = (slice_outlines(slices.images, model.config.grid_size, mirrored=dataset.mirrored) if outlines
                     else None)
    cached = _read_cache(codes_path, index_path, made_by, len(slices.files))
    if cached is not None:
        return CodeGrids(*cached, split, made_outlines)
    remove_stale_temporaries(folder)  # of a remake cut short by a kill
    codes = encode_dataset(model, dataset, device=device, precision=precision)
    with atomic_path(codes_path) as temporary, open(temporary, "wb") as handle:
        np.save(handle, codes)
    index = {"made_by": made_by, "case_ids": slices.case_ids, "slice_indices": slices.slice_indices.tolist()}
    atomic_write_bytes(index_path, json.dumps(index).encode())  # written last: it vouches for the .npy
    return CodeGrids(codes, slices.slice_indices.astype(np.int64), list(slices.case_ids), split, made_outlines)


def _read_cache(codes_path: Path, index_path: Path, made_by: dict[str, Any],
                count: int) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """(codes, slice indices, case ids) from the cache if it is intact and made from the same checkpoint and
    slices; None (remake it) if it is missing, stale or damaged in any way, pickles included (never loaded)."""
    try:
        index = json.loads(index_path.read_text())
        if index.get("made_by") != made_by:
            return None
        codes = np.load(codes_path, allow_pickle=False)
        slice_indices = np.array(index["slice_indices"], dtype=np.int64)
        case_ids = [str(case_id) for case_id in index["case_ids"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # JSONDecodeError is a ValueError
        return None
    if codes.dtype != np.uint8 or codes.ndim != 3 or len(codes) != count or slice_indices.shape != (count,) \
            or len(case_ids) != count:
        return None
    return codes, slice_indices, case_ids


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
