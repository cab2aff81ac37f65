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

Tissue label volumes (FSL FAST ``*_seg``/``*_pveseg``, FreeSurfer ``aseg``/``aparc+aseg``, BIDS ``*_dseg``), one
per image and in its voxel grid (:func:`check_same_grid`), give each slice an OASIS segmentation mask: the same
map, sampled nearest-neighbour (:func:`slice_labels`), with the values turned into classes by a
:mod:`~brainvq.data.label_maps` map. :func:`match_labels` pairs label files with images by name.
"""

from __future__ import annotations

import itertools
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
from brainvq.data.label_maps import LabelMap, load_label_map
from brainvq.data.layout import (
    AXIAL_RANGE,
    IMAGE_SIZE,
    MASK_VALUES,
    SLICES_PER_CASE,
    SPLITS,
    case_sort_key,
    mask_folder,
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
# Name endings of label volumes (FSL FAST, FreeSurfer, BIDS derivatives), stripped to match them to images
# (see match_labels); ids are compared in lower case for them.
LABEL_SUFFIXES = ("_dseg", "_seg", "_pveseg", "_aseg", "_aparc+aseg")
_BIDS_IMAGE_SUFFIX = "_T1w"
# How far a label volume's voxel centres may lie from its image's, in voxels (float32 headers round to ~1e-5 mm).
GRID_TOLERANCE = 0.01


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
    return pixel_grid(frame(box, n_slices, size, axial_range), n_slices, size)


def pixel_grid(matrix: np.ndarray, n_slices: int, size: int) -> np.ndarray:
    """A :func:`frame` map [4, 4] applied to every output pixel: float32 [3, n_slices, size, size], x/y/z in mm."""
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
    voxels = pixel_voxels(frame(box, n_slices, size, axial_range), volume.zooms, n_slices, size)
    samples = ndimage.map_coordinates(data, voxels, order=1, mode="constant", cval=low)
    foreground_low, foreground_high = np.percentile(data[foreground], INTENSITY_PERCENTILES)
    # A uniform foreground (a binary mask) has no range of its own: scale it against the background.
    black = foreground_low if foreground_high > foreground_low else low
    images = scale_to_uint8(samples, black, foreground_high)
    return SlicedVolume(images, frame(box, n_slices, size, axial_range), (float(black), float(foreground_high)))


def pixel_voxels(to_mm: np.ndarray, zooms: tuple[float, float, float], n_slices: int, size: int) -> np.ndarray:
    """Where each output pixel is sampled: float32 [3, n_slices, size, size] voxel indices of :attr:`Volume.data`
    for a map ``to_mm`` [4, 4] from ``[row, column, slice, 1]`` to mm (:attr:`SlicedVolume.to_mm`)."""
    return pixel_grid(to_mm, n_slices, size) / np.asarray(zooms, dtype=np.float32)[:, None, None, None]


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


def is_label_name(volume_id: str) -> bool:
    """Whether a volume id ends in one of :data:`LABEL_SUFFIXES` (``sub-1_seg``, ``sub-01/anat/sub-01_dseg``)."""
    return volume_id.lower().endswith(LABEL_SUFFIXES)


def _label_keys(volume_id: str) -> list[str]:
    """The ids a volume's label file may have, without its label suffix, most specific first: the volume's own
    id, then, for a BIDS ``..._T1w`` image, the id without ``_T1w``."""
    bare = volume_id[: -len(_BIDS_IMAGE_SUFFIX)] if volume_id.endswith(_BIDS_IMAGE_SUFFIX) else None
    return [volume_id] if bare is None else [volume_id, bare]


def match_labels(src: str | Path, volumes: dict[str, Path], labels: str | Path) -> dict[str, Path]:
    """The label volume of each volume of ``volumes`` (volume id -> path, found under ``src``), by volume id.

    ``labels`` is a file when ``src`` is, and then the label of its one volume. Otherwise it is a folder searched
    like ``src`` (:func:`find_volumes`), and a label file matches a volume when its id, without one of
    :data:`LABEL_SUFFIXES` (or with none), equals the volume's id or, for a BIDS ``..._T1w`` image, the volume's
    id without ``_T1w``: ``s1`` takes ``s1_seg``, ``s1_pveseg`` or ``s1``; ``sub-01/anat/sub-01_T1w`` takes
    ``sub-01/anat/sub-01_T1w_pveseg`` or ``sub-01/anat/sub-01_dseg``. Where several match, the volume's own id
    beats the one without ``_T1w``, then the first suffix of ``("", *LABEL_SUFFIXES)`` wins (FAST writes both
    ``_seg`` and ``_pveseg``). A file is never its own label; label files that match no volume are ignored.

    Raises DataError naming the first volume without a label volume, before anything is read.
    """
    src, labels = Path(src), Path(labels)
    if not labels.exists():
        raise DataError("does not exist", labels)
    if src.is_file() or labels.is_file():
        if not (src.is_file() and labels.is_file()):
            raise DataError("labels must be a file when the volumes are one file, a folder when they are a "
                            "folder", labels)
        return dict.fromkeys(volumes, labels)
    candidates: dict[str, list[tuple[int, Path]]] = {}  # label id without suffix -> (suffix rank, file)
    for label_id, path in find_volumes(labels).items():
        for rank, suffix in enumerate(("", *LABEL_SUFFIXES)):
            if label_id.lower().endswith(suffix):
                candidates.setdefault(label_id[: len(label_id) - len(suffix)], []).append((rank, path))
    matched = {}
    for volume_id, volume_path in volumes.items():
        found = [
            (key_rank, suffix_rank, path)
            for key_rank, key in enumerate(_label_keys(volume_id))
            for suffix_rank, path in candidates.get(key, [])
            if path.resolve() != volume_path.resolve()
        ]
        if not found:
            raise DataError(f"has no label volume in {labels} (expected {' or '.join(_label_keys(volume_id))}, "
                            f"as is or ending in {'/'.join(LABEL_SUFFIXES)})", volume_path)
        matched[volume_id] = min(found)[2]
    return matched


def _file_shape(volume: Volume) -> tuple[int, ...]:
    """The shape of a volume's array as its file stores it (before the reorientation to RAS+)."""
    return tuple(int(n) for n in np.rint(np.abs(volume.to_file[:3, :3]) @ volume.data.shape))


def check_same_grid(labels: Volume, image: Volume) -> None:
    """Raise DataError naming the label file unless it has its image's shape and affine: every voxel centre
    within GRID_TOLERANCE of a voxel of the image's, in world mm."""
    if _file_shape(labels) != _file_shape(image):
        raise DataError(f"label volume has shape {_file_shape(labels)} but its image {image.path} has "
                        f"{_file_shape(image)}; labels must be in the image's voxel grid", labels.path)
    # The affines differ by an affine map, so voxel centres lie furthest apart at a corner of the grid.
    corners = np.array([[*corner, 1] for corner in itertools.product(*((0, n - 1) for n in _file_shape(image)))]).T
    shift = np.linalg.norm(((labels.affine - image.affine) @ corners)[:3], axis=0).max()
    if shift > GRID_TOLERANCE * min(image.zooms):
        raise DataError(f"label volume's affine differs from that of its image {image.path} (voxels up to "
                        f"{shift:.3g} mm apart); labels must be in the image's voxel grid", labels.path)


def slice_labels(labels: Volume, image: Volume, sliced: SlicedVolume, label_map: LabelMap) -> np.ndarray:
    """The segmentation masks of the slices cut from ``image``, uint8 [n_slices, size, size] of
    :data:`~brainvq.data.layout.MASK_VALUES`, from a label volume in the same voxel grid.

    Each pixel takes the class (``label_map``) of the voxel nearest the point its image pixel was sampled at (no
    interpolation); pixels outside the volume are background. Raises DataError naming the label file if it is
    not in the image's grid (:func:`check_same_grid`) or holds values the map refuses (:meth:`LabelMap.apply`).
    """
    check_same_grid(labels, image)
    classes = label_map.apply(labels.data, labels.path)
    n_slices, size = sliced.images.shape[:2]
    voxels = pixel_voxels(sliced.to_mm, image.zooms, n_slices, size)
    sampled = ndimage.map_coordinates(classes, voxels, order=0, mode="constant", cval=0)
    return np.asarray(MASK_VALUES, dtype=np.uint8)[sampled]


def volumes_to_layout(
    src: str | Path,
    out_dir: str | Path,
    *,
    n_slices: int = SLICES_PER_CASE,
    axial_range: tuple[float, float] = AXIAL_RANGE,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    labels: str | Path | None = None,
    label_map: str | Path | None = None,
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

    With ``labels`` (a file or folder of tissue label volumes, see :func:`match_labels`), every volume must have
    a label volume in its voxel grid, and every slice gets a mask in ``keras_png_slices_seg_<split>``
    (:func:`slice_labels`, classes by ``label_map``: see :func:`~brainvq.data.label_maps.load_label_map`);
    files of a source folder named like labels (:func:`is_label_name`) are then not converted as images.
    ``cases.tsv`` and ``volumes.json`` also name each case's label file. A volume without labels raises
    DataError naming it before anything is written.

    Returns ``{"cases": {split: n}, "subjects": {split: n}, "slices": {split: n}, "seconds": float}``, with
    ``"label_map"`` (its name) when there are labels.
    """
    start = time.perf_counter()
    check_slicing(n_slices, axial_range)
    if labels is None and label_map is not None:
        raise ConfigError("a label map only applies to label volumes; give the label volumes too (--labels)")
    mapping = None if labels is None else load_label_map(label_map)
    found = find_volumes(src)
    if labels is not None and Path(src).is_dir():
        found = {volume_id: path for volume_id, path in found.items() if not is_label_name(volume_id)}
    if not found:
        raise DataError("no NIfTI or Analyze volumes (*.nii, *.nii.gz, *.hdr/*.img)", src)
    subject_of = subjects_of(found)
    label_of = {} if labels is None else match_labels(src, {volume_id: found[volume_id] for volume_id in subject_of},
                                                      labels)
    splits = split_cases(subject_of.values(), seed, fractions)
    subject_split = {subject: split for split, subjects in splits.items() for subject in subjects}
    rows = ["case\tsource\tsplit\tsubject" + ("\tlabels" if label_of else "")]
    cases = []
    with staged_layout(out_dir, masks=bool(label_of)) as staging:
        for case_number, volume_id in enumerate(
            tqdm(subject_of, desc="volumes", unit="volume", disable=not progress), start=1
        ):
            volume = load_volume(found[volume_id])
            sliced = slice_volume(volume, n_slices, axial_range=axial_range)
            split = subject_split[subject_of[volume_id]]
            write_case(split_folder(staging, split), case_number, sliced.images)
            case = {"case": f"{case_number:03d}", "source": str(found[volume_id].resolve()), "split": split,
                    "subject": subject_of[volume_id]}
            if label_of:
                masks = slice_labels(load_volume(label_of[volume_id]), volume, sliced, mapping)
                write_case(mask_folder(staging, split), case_number, masks, prefix="seg")
                case["labels"] = str(label_of[volume_id].resolve())
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
            **({"label_map": mapping.name} if label_of else {}),
            "cases": cases,
        })
    n_cases = {split: sum(split == case["split"] for case in cases) for split in SPLITS}
    return {
        "cases": n_cases,
        "subjects": {split: len(splits[split]) for split in SPLITS},
        "slices": {split: n_cases[split] * n_slices for split in SPLITS},
        **({"label_map": mapping.name} if label_of else {}),
        "seconds": time.perf_counter() - start,
    }
