"""3D MRI volumes (NIfTI, Analyze) to OASIS-style axial slices.

Slicing convention, shared with the demo cohort (:mod:`brainvq.data.demo`) so that both give alike images:

* ``n_slices`` axial planes evenly spaced over the middle of the foreground's inferior-superior extent
  (:data:`AXIAL_RANGE`, skipping the extreme bottom and top where there is almost no brain), slice 0 lowest;
* in-plane, the foreground's longer side spans :data:`FRAME_FILL` of the image, aspect ratio kept (pixels are
  square in millimetres whatever the voxel sizes);
* radiological view: anterior (nose) at the top of the image, the subject's right on the image's left;
* intensities scaled to 0..255 between robust low and high percentiles of the foreground.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from brainvq.data.layout import (
    IMAGE_SIZE,
    SLICES_PER_CASE,
    SPLITS,
    case_sort_key,
    split_cases,
    split_folder,
    staged_layout,
    write_case,
)
from brainvq.errors import DataError

# Share of the foreground's inferior-superior extent that the slices span (fractions from the bottom).
AXIAL_RANGE = (0.25, 0.85)
# Share of the image width taken by the foreground's longer in-plane side: about 1 mm per pixel for an adult
# brain at 256x256, as in OASIS.
FRAME_FILL = 0.66
# Foreground: voxels above this share of the volume's robust intensity range.
FOREGROUND_LEVEL = 0.1
# Percentiles of the foreground mapped to 0 and 255.
INTENSITY_PERCENTILES = (0.5, 99.5)
# Share of foreground voxels ignored at each end of an axis when measuring its extent.
EXTENT_TAIL = 0.001
# The extent is measured on every EXTENT_STRIDE-th voxel per axis: within a voxel of exact, and 8 times cheaper.
EXTENT_STRIDE = 2

# Largest volume read, in voxels: a 1 mm whole-head scan has 256^3. A header can claim 32767^3 voxels in a few
# bytes; this refuses it before nibabel allocates the data.
MAX_VOXELS = 512**3
# Voxel sizes accepted, in mm: beyond these the header is corrupt (or in other units) and the framing of the
# slices, which works in millimetres, would be meaningless.
MIN_ZOOM, MAX_ZOOM = 0.01, 100.0

_VOLUME_SUFFIX = re.compile(r"\.(nii|nii\.gz|hdr|img)$", re.IGNORECASE)


@dataclass(frozen=True)
class Volume:
    """A 3D scan in RAS+ voxel order: ``data[i, j, k]`` grows toward the subject's Right, Anterior, Superior.

    ``data`` is float32 [X, Y, Z]; ``zooms`` are the voxel sizes in mm along those axes.
    """

    data: np.ndarray
    zooms: tuple[float, float, float]
    path: Path | None = None


def load_volume(path: str | Path) -> Volume:
    """Load a NIfTI (``.nii``, ``.nii.gz``) or Analyze (``.hdr``/``.img``) file as a validated RAS+ Volume.

    A trailing singleton 4th dimension is dropped. Raises DataError naming the file if it cannot be read, is
    not 3D, is larger than MAX_VOXELS, holds NaN or infinite values, or has constant intensity.
    """
    path = Path(path)
    try:
        image = nib.load(path)  # reads the header only
        shape = tuple(int(size) for size in image.shape)
    except Exception as error:
        raise _unreadable(path, error) from error
    spatial = shape[:3] if len(shape) > 3 and math.prod(shape[3:]) == 1 else shape
    if len(spatial) != 3 or min(spatial) < 2:
        raise DataError(f"expected a 3D volume, got shape {shape}", path)
    if math.prod(shape) > MAX_VOXELS:  # checked before nibabel allocates the data
        raise DataError(f"volume of shape {shape} has more than {MAX_VOXELS} voxels", path)
    try:
        _checked_zooms(image, path)  # before the reorientation divides by them
        image = nib.as_closest_canonical(image)
        data = image.get_fdata(dtype=np.float32)
        zooms = _checked_zooms(image, path)  # in the reoriented axis order
    except DataError:
        raise
    except Exception as error:
        raise _unreadable(path, error) from error
    data = data.reshape(data.shape[:3])  # drops the singleton 4th dimension, if any
    if not np.isfinite(data).all():
        raise DataError("volume contains NaN or infinite values", path)
    if data.min() == data.max():
        raise DataError("volume has constant intensity", path)
    return Volume(data, zooms, path)


def _checked_zooms(image: nib.spatialimages.SpatialImage, path: Path) -> tuple[float, float, float]:
    """The first three voxel sizes in mm, refusing a corrupt header before its affine is used."""
    zooms = tuple(float(zoom) for zoom in image.header.get_zooms()[:3])
    if len(zooms) < 3 or not all(MIN_ZOOM <= zoom <= MAX_ZOOM for zoom in zooms):
        raise DataError(f"voxel sizes must be between {MIN_ZOOM} and {MAX_ZOOM} mm, got {zooms}", path)
    if not np.isfinite(image.affine).all():
        raise DataError("the orientation (affine) in the header holds NaN or infinite values", path)
    return zooms


def _unreadable(path: Path, error: Exception) -> DataError:
    # nibabel reports malformed headers and data with many exception types (ImageFileError, HeaderDataError,
    # OSError, ValueError, TypeError, struct.error, zlib.error...): for any of them the file is not a usable
    # volume.
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(f"cannot read as a NIfTI or Analyze volume ({reason})", path)


def foreground_points(mask: np.ndarray, zooms: tuple[float, float, float]) -> np.ndarray:
    """Coordinates in mm (float32 [3, M]) of every EXTENT_STRIDE-th voxel, per axis, of a foreground mask."""
    stride = EXTENT_STRIDE
    voxels = np.argwhere(mask[::stride, ::stride, ::stride]).T
    return (voxels * (stride * np.asarray(zooms)[:, None])).astype(np.float32)


def foreground_box(points: np.ndarray) -> np.ndarray:
    """Low and high coordinate per axis (float64 [3, 2]) of foreground points [3, M].

    EXTENT_TAIL of the points is ignored at each end, so that a few specks of noise far from the head do not
    stretch the box.
    """
    return np.quantile(points, (EXTENT_TAIL, 1 - EXTENT_TAIL), axis=1).T


def framed_grid(box: np.ndarray, n_slices: int = SLICES_PER_CASE, size: int = IMAGE_SIZE) -> np.ndarray:
    """World coordinates (float32 [3, n_slices, size, size], x/y/z in mm) of the output pixels for a foreground
    box [3, 2] in mm, RAS+, framed as the module docstring describes."""
    (x0, x1), (y0, y1), (z0, z1) = box
    bottom, top = (z0 + fraction * (z1 - z0) for fraction in AXIAL_RANGE)
    offsets = (np.arange(size) - (size - 1) / 2) * (max(x1 - x0, y1 - y0) / (FRAME_FILL * size))
    shape = (n_slices, size, size)
    x = np.broadcast_to((x0 + x1) / 2 - offsets, shape)  # columns run from the subject's right to left
    y = np.broadcast_to(((y0 + y1) / 2 - offsets)[:, None], shape)  # rows run from anterior to posterior
    z = np.broadcast_to(np.linspace(bottom, top, n_slices)[:, None, None], shape)
    return np.stack([x, y, z]).astype(np.float32)


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` to 0 and ``high`` to 255 linearly, clipping outside; returns uint8 of the same shape."""
    scaled = (values - low) * (255.0 / (high - low))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def volume_to_slices(volume: Volume, n_slices: int = SLICES_PER_CASE, size: int = IMAGE_SIZE) -> np.ndarray:
    """Cut OASIS-style axial slices (uint8 [n_slices, size, size]) from a volume; see the module docstring."""
    data = volume.data
    low, high = np.percentile(data, INTENSITY_PERCENTILES)
    if high <= low:  # a foreground smaller than the percentile tails: fall back to the full range
        low, high = data.min(), data.max()
    foreground = data > low + FOREGROUND_LEVEL * (high - low)
    points = foreground_points(foreground, volume.zooms)
    if points.shape[1] == 0:
        raise DataError("too little foreground to slice (a few bright voxels at most)", volume.path)
    grid = framed_grid(foreground_box(points), n_slices, size)
    voxels = grid / np.asarray(volume.zooms, dtype=np.float32)[:, None, None, None]
    samples = ndimage.map_coordinates(data, voxels, order=1, mode="constant", cval=low)
    foreground_low, foreground_high = np.percentile(data[foreground], INTENSITY_PERCENTILES)
    # A uniform foreground (a binary mask) has no range of its own: scale it against the background.
    return scale_to_uint8(samples, foreground_low if foreground_high > foreground_low else low, foreground_high)


def find_volumes(src: str | Path) -> dict[str, Path]:
    """The volume files under ``src`` (searched recursively, or ``src`` itself if it is a file) by subject id.

    The subject id is the path relative to ``src`` without its volume suffix (``sub-01/anat/T1w``), or the
    bare stem for a single file. An Analyze pair counts once, through its ``.hdr``; a ``.img`` without one is
    kept so that loading it reports the problem. Hidden files and folders are skipped. Sorted naturally by
    id; two files with the same id (``a.nii`` and ``a.nii.gz``) raise DataError.
    """
    src = Path(src)
    if not src.exists():
        raise DataError("does not exist", src)
    if src.is_file():
        return {_VOLUME_SUFFIX.sub("", src.name): src}
    ids = {
        path: _VOLUME_SUFFIX.sub("", path.relative_to(src).as_posix())
        for path in sorted(src.rglob("*"))
        if _VOLUME_SUFFIX.search(path.name)
        and not any(part.startswith(".") for part in path.relative_to(src).parts)
        and path.is_file()
    }
    headers = {subject for path, subject in ids.items() if path.suffix.lower() == ".hdr"}
    volumes: dict[str, Path] = {}
    for path, subject in ids.items():
        if path.suffix.lower() == ".img" and subject in headers:
            continue  # the image half of an Analyze pair, loaded through its .hdr
        if subject in volumes:
            raise DataError(f"two volumes for subject {subject} (the other is {volumes[subject]})", path)
        volumes[subject] = path
    return dict(sorted(volumes.items(), key=lambda item: case_sort_key(item[0])))


def volumes_to_layout(
    src: str | Path,
    out_dir: str | Path,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Turn a folder of 3D volumes (one subject each) into an OASIS-layout slice data set at ``out_dir``.

    Subjects are split with :func:`~brainvq.data.layout.split_cases`; cases are numbered 001.. in subject
    order, and ``out_dir/cases.tsv`` maps each case to its source file and split. Nothing is left at
    ``out_dir`` unless every volume converts (a bad one raises DataError naming it).

    Returns ``{"cases": {split: n}, "slices": {split: n}, "seconds": float}``.
    """
    start = time.perf_counter()
    volumes = find_volumes(src)
    if not volumes:
        raise DataError("no NIfTI or Analyze volumes (*.nii, *.nii.gz, *.hdr/*.img)", src)
    splits = split_cases(volumes, seed, fractions)
    split_of = {subject: split for split, subjects in splits.items() for subject in subjects}
    rows = ["case\tsource\tsplit"]
    with staged_layout(out_dir) as staging:
        for case_number, (subject, path) in enumerate(
            tqdm(volumes.items(), desc="volumes", unit="volume", disable=not progress), start=1
        ):
            slices = volume_to_slices(load_volume(path))
            write_case(split_folder(staging, split_of[subject]), case_number, slices)
            rows.append(f"{case_number:03d}\t{path.resolve()}\t{split_of[subject]}")
        (staging / "cases.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {
        "cases": {split: len(splits[split]) for split in SPLITS},
        "slices": {split: len(splits[split]) * SLICES_PER_CASE for split in SPLITS},
        "seconds": time.perf_counter() - start,
    }
