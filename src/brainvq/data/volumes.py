"""3D MRI volumes (NIfTI, Analyze) to OASIS-style axial slices.

Slicing convention, shared with the demo cohort (:mod:`brainvq.data.demo`) so that both give alike images:

* ``n_slices`` axial planes evenly spaced over a range of the foreground's inferior-superior extent (by default
  :data:`~brainvq.data.layout.AXIAL_RANGE`), slice 0 lowest;
* in-plane, the foreground's longer side spans :data:`FRAME_FILL` of the image, aspect ratio kept (pixels are
  square in millimetres whatever the voxel sizes);
* radiological view: anterior (nose) at the top of the image, the subject's right on the image's left;
* intensities scaled to 0..255 between robust low and high percentiles of the foreground.

Each slice pixel comes from one point of the volume, so the slicing is an affine map from ``[row, column, slice, 1]``
to the volume's voxel indices; :func:`volumes_to_layout` records it per case (``volumes.json``) so that a slice can
be put back into its volume's space.
"""

from __future__ import annotations

import math
import numbers
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from brainvq.config import save_json
from brainvq.data.layout import (
    AXIAL_RANGE,
    IMAGE_SIZE,
    SLICES_PER_CASE,
    SPLITS,
    case_sort_key,
    split_cases,
    split_folder,
    staged_layout,
    write_case,
)
from brainvq.errors import ConfigError, DataError

# Most slices cut from one volume: a 1 mm scan has a few hundred axial planes at most, and sampling takes about
# 2.5 MB per slice (over 1 GB at this limit), so more is a typo.
MAX_SLICES = 512
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
# A BIDS T1-weighted image, as a volume id (path relative to the data set without suffix):
# sub-<label>[/ses-<label>]/anat/<name>T1w.
_BIDS_T1W = re.compile(r"(?P<subject>sub-[^/]+)/(?:ses-[^/]+/)?anat/[^/]*T1w")
# Where volumes_to_layout records each case's geometry, beside cases.tsv.
GEOMETRY_FILE = "volumes.json"


@dataclass(frozen=True)
class Volume:
    """A 3D scan in RAS+ voxel order: ``data[i, j, k]`` grows toward the subject's Right, Anterior, Superior.

    ``data`` is float32 [X, Y, Z]; ``zooms`` are the voxel sizes in mm along those axes. ``affine`` [4, 4] is the
    file's own voxel-to-world (scanner mm) matrix and ``to_file`` [4, 4] maps ``[i, j, k, 1]`` of ``data`` to the
    file's voxel indices (an axis permutation and flips); both are the identity for a volume made in memory.
    """

    data: np.ndarray
    zooms: tuple[float, float, float]
    path: Path | None = None
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    to_file: np.ndarray = field(default_factory=lambda: np.eye(4))


@dataclass(frozen=True)
class SlicedVolume:
    """What :func:`slice_volume` cut from a volume.

    ``images``: uint8 [n_slices, size, size]. ``to_mm`` [4, 4] maps ``[row, column, slice, 1]`` of ``images`` to
    the point it was sampled at, in mm along the RAS+ axes of :attr:`Volume.data` from its voxel [0, 0, 0].
    ``intensity``: the volume intensities mapped to 0 and 255.
    """

    images: np.ndarray
    to_mm: np.ndarray
    intensity: tuple[float, float]


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
        # What nib.as_closest_canonical does, keeping the orientation to map voxels back to the file's.
        orientation = nib.orientations.io_orientation(image.affine)
        canonical = image.as_reoriented(orientation)
        data = canonical.get_fdata(dtype=np.float32)
        zooms = _checked_zooms(canonical, path)  # in the reoriented axis order
    except DataError:
        raise
    except Exception as error:
        raise _unreadable(path, error) from error
    data = data.reshape(data.shape[:3])  # drops the singleton 4th dimension, if any
    if not np.isfinite(data).all():
        raise DataError("volume contains NaN or infinite values", path)
    if data.min() == data.max():
        raise DataError("volume has constant intensity", path)
    to_file = nib.orientations.inv_ornt_aff(orientation, spatial)
    return Volume(data, zooms, path, affine=np.asarray(image.affine, dtype=np.float64), to_file=to_file)


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


def check_slicing(n_slices: int, axial_range: tuple[float, float]) -> None:
    """Raise ConfigError unless ``n_slices`` is a whole number in 1..MAX_SLICES and ``axial_range`` is two
    fractions ``0 <= low < high <= 1`` of the foreground's inferior-superior extent."""
    if isinstance(n_slices, bool) or not isinstance(n_slices, numbers.Integral) or not 1 <= n_slices <= MAX_SLICES:
        raise ConfigError(f"the number of slices must be a whole number from 1 to {MAX_SLICES}, got {n_slices!r}")
    try:
        low, high = (float(fraction) for fraction in axial_range)
    except (TypeError, ValueError):
        low = high = math.nan  # not two numbers: refused below with the same message
    if not 0 <= low < high <= 1:  # also refuses NaN
        raise ConfigError("the axial range must be two fractions LOW HIGH of the foreground's inferior-superior "
                          f"extent with 0 <= LOW < HIGH <= 1, got {axial_range!r}")


def frame(box: np.ndarray, n_slices: int = SLICES_PER_CASE, size: int = IMAGE_SIZE,
          axial_range: tuple[float, float] = AXIAL_RANGE) -> np.ndarray:
    """The affine map [4, 4] from ``[row, column, slice, 1]`` of the output pixels to ``[x, y, z, 1]`` in mm,
    RAS+, for a foreground box [3, 2] in mm, framed as the module docstring describes."""
    (x0, x1), (y0, y1), (z0, z1) = box
    bottom, top = (z0 + fraction * (z1 - z0) for fraction in axial_range)
    pixel = max(x1 - x0, y1 - y0) / (FRAME_FILL * size)  # mm per pixel
    half = (size - 1) / 2
    return np.array([
        [0, -pixel, 0, (x0 + x1) / 2 + half * pixel],  # columns run from the subject's right to left
        [-pixel, 0, 0, (y0 + y1) / 2 + half * pixel],  # rows run from anterior to posterior
        [0, 0, (top - bottom) / max(n_slices - 1, 1), bottom],
        [0, 0, 0, 1],
    ])


def framed_grid(box: np.ndarray, n_slices: int = SLICES_PER_CASE, size: int = IMAGE_SIZE,
                axial_range: tuple[float, float] = AXIAL_RANGE) -> np.ndarray:
    """Coordinates (float32 [3, n_slices, size, size], x/y/z in mm, RAS+) of the output pixels for a foreground
    box [3, 2] in mm: :func:`frame` applied to every pixel."""
    matrix = frame(box, n_slices, size, axial_range)
    # The map is separable (x from the column, y from the row, z from the slice): three 1D ramps broadcast.
    rows, columns, slices = np.arange(size), np.arange(size), np.arange(n_slices)
    shape = (n_slices, size, size)
    x = np.broadcast_to(matrix[0, 1] * columns + matrix[0, 3], shape)
    y = np.broadcast_to((matrix[1, 0] * rows + matrix[1, 3])[:, None], shape)
    z = np.broadcast_to((matrix[2, 2] * slices + matrix[2, 3])[:, None, None], shape)
    return np.stack([x, y, z]).astype(np.float32)


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` to 0 and ``high`` to 255 linearly, clipping outside; returns uint8 of the same shape."""
    scaled = (values - low) * (255.0 / (high - low))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


def slice_volume(volume: Volume, n_slices: int = SLICES_PER_CASE, size: int = IMAGE_SIZE,
                 axial_range: tuple[float, float] = AXIAL_RANGE) -> SlicedVolume:
    """Cut OASIS-style axial slices (uint8 [n_slices, size, size]) from a volume; see the module docstring."""
    check_slicing(n_slices, axial_range)
    data = volume.data
    low, high = np.percentile(data, INTENSITY_PERCENTILES)
    if high <= low:  # a foreground smaller than the percentile tails: fall back to the full range
        low, high = data.min(), data.max()
    foreground = data > low + FOREGROUND_LEVEL * (high - low)
    points = foreground_points(foreground, volume.zooms)
    if points.shape[1] == 0:
        raise DataError("too little foreground to slice (a few bright voxels at most)", volume.path)
    box = foreground_box(points)
    grid = framed_grid(box, n_slices, size, axial_range)
    voxels = grid / np.asarray(volume.zooms, dtype=np.float32)[:, None, None, None]
    samples = ndimage.map_coordinates(data, voxels, order=1, mode="constant", cval=low)
    foreground_low, foreground_high = np.percentile(data[foreground], INTENSITY_PERCENTILES)
    # A uniform foreground (a binary mask) has no range of its own: scale it against the background.
    black = foreground_low if foreground_high > foreground_low else low
    images = scale_to_uint8(samples, black, foreground_high)
    return SlicedVolume(images, frame(box, n_slices, size, axial_range), (float(black), float(foreground_high)))


def case_geometry(volume: Volume, sliced: SlicedVolume) -> dict:
    """Where a volume's slices lie in it, as JSON-ready lists.

    ``pixel_to_voxel`` and ``pixel_to_world`` [4, 4] map ``[row, column, slice, 1]`` of the slices to the voxel
    indices ``[i, j, k, 1]`` of the volume's file (as nibabel reads its array) and to world coordinates in mm
    (``affine @ voxel``); ``affine`` [4, 4] is the file's; ``intensity`` the values shown as 0 and 255.
    """
    mm_to_voxel = np.diag([*(1 / np.asarray(volume.zooms)), 1.0])  # the mm of SlicedVolume.to_mm are voxels * zooms
    pixel_to_voxel = volume.to_file @ mm_to_voxel @ sliced.to_mm
    return {
        "affine": volume.affine.tolist(),
        "pixel_to_voxel": pixel_to_voxel.tolist(),
        "pixel_to_world": (volume.affine @ pixel_to_voxel).tolist(),
        "intensity": list(sliced.intensity),
    }


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


def subjects_of(volumes: dict[str, Path]) -> dict[str, str]:
    """The subject of each volume to convert, by volume id (see :func:`find_volumes`).

    A BIDS data set (some ids match ``sub-<label>[/ses-<label>]/anat/<name>T1w`` of a ``.nii``/``.nii.gz``):
    only those T1-weighted images are converted, each with its ``sub-<label>`` folder as subject, so all the
    sessions (and runs) of a subject share one. Other images of the data set (T2w, functional, derivatives/) are
    left out. Any other folder: every volume is its own subject.
    """
    bids = {
        volume_id: match["subject"]
        for volume_id, path in volumes.items()
        if (match := _BIDS_T1W.fullmatch(volume_id)) and path.name.lower().endswith((".nii", ".nii.gz"))
    }
    return bids or {volume_id: volume_id for volume_id in volumes}


def volumes_to_layout(
    src: str | Path,
    out_dir: str | Path,
    *,
    n_slices: int = SLICES_PER_CASE,
    axial_range: tuple[float, float] = AXIAL_RANGE,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Turn 3D volumes into an OASIS-layout slice data set at ``out_dir``: ``n_slices`` slices per volume over
    ``axial_range`` of its foreground's inferior-superior extent (see :func:`check_slicing`).

    Each volume is one case, numbered 001.. in natural order of its path. Subjects (see :func:`subjects_of`: in a
    BIDS folder, ``sub-<label>``; otherwise each volume) are split with
    :func:`~brainvq.data.layout.split_cases`, so all the sessions of a subject are in the same split.
    ``out_dir/cases.tsv`` maps each case to its source file, split and subject, and ``out_dir/volumes.json``
    records each case's geometry (:func:`case_geometry`). Nothing is left at ``out_dir`` unless every volume
    converts (a bad one raises DataError naming it); bad options raise ConfigError before anything is read.

    Returns ``{"cases": {split: n}, "subjects": {split: n}, "slices": {split: n}, "seconds": float}``.
    """
    start = time.perf_counter()
    check_slicing(n_slices, axial_range)
    found = find_volumes(src)
    if not found:
        raise DataError("no NIfTI or Analyze volumes (*.nii, *.nii.gz, *.hdr/*.img)", src)
    subject_of = subjects_of(found)
    splits = split_cases(subject_of.values(), seed, fractions)
    subject_split = {subject: split for split, subjects in splits.items() for subject in subjects}
    rows = ["case\tsource\tsplit\tsubject"]
    cases = []
    with staged_layout(out_dir) as staging:
        for case_number, volume_id in enumerate(
            tqdm(subject_of, desc="volumes", unit="volume", disable=not progress), start=1
        ):
            volume = load_volume(found[volume_id])
            sliced = slice_volume(volume, n_slices, axial_range=axial_range)
            split = subject_split[subject_of[volume_id]]
            write_case(split_folder(staging, split), case_number, sliced.images)
            case = {"case": f"{case_number:03d}", "source": str(found[volume_id].resolve()), "split": split,
                    "subject": subject_of[volume_id]}
            rows.append("\t".join(case.values()))
            cases.append(case | case_geometry(volume, sliced))
        (staging / "cases.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        save_json(staging / GEOMETRY_FILE, {
            "about": "pixel_to_voxel and pixel_to_world map [row, column, slice, 1] of pixel image[row, column] of "
                     "keras_png_slices_<split>/case_<case>_slice_<slice>.nii.png to voxel [i, j, k, 1] of the "
                     "source file's array and to world mm [x, y, z, 1] (world = affine @ voxel); intensity: the "
                     "source values shown as 0 and 255",
            "n_slices": int(n_slices),
            "axial_range": [float(fraction) for fraction in axial_range],
            "cases": cases,
        })
    n_cases = {split: sum(split == case["split"] for case in cases) for split in SPLITS}
    return {
        "cases": n_cases,
        "subjects": {split: len(splits[split]) for split in SPLITS},
        "slices": {split: n_cases[split] * n_slices for split in SPLITS},
        "seconds": time.perf_counter() - start,
    }
