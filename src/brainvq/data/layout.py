"""The on-disk layout of a slice data set: file names, split folders, case splits, the OASIS manifest.

The OASIS "keras_png_slices" layout is::

    DIR/keras_png_slices_{train,validate,test}/case_NNN_slice_S.nii.png

with 256x256 8-bit grayscale PNGs, 32 axial slices per case (S = 0..31, not zero padded) and whole cases per
split. Optional tissue segmentations lie beside them, one per slice::

    DIR/keras_png_slices_seg_{train,validate,test}/seg_NNN_slice_S.nii.png

uint8 masks holding only the values of :data:`MASK_VALUES` (background, CSF, grey matter, white matter).

Any other folder of ``<case>_slice_<S>.<png|jpg|...>`` images is accepted too; its cases are then assigned to
splits here, deterministically, by :func:`split_cases`.

Everything that reads or writes these files goes through this module, so the naming rules live in one place.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from brainvq.errors import ConfigError, DataError

SPLITS = ("train", "validate", "test")
IMAGE_SIZE = 256
SLICES_PER_CASE = 32
# Part of the foreground's inferior-superior extent that slices cut from a volume span, as fractions from its
# bottom: the middle, where OASIS's slices lie, skipping the extreme bottom and top where there is almost no brain.
AXIAL_RANGE = (0.25, 0.85)
# The pixel values of a segmentation mask, in class-index order, and the names of those classes.
MASK_VALUES = (0, 85, 170, 255)
MASK_CLASS_NAMES = ("background", "csf", "grey_matter", "white_matter")
# Pixel value -> class index of a mask; len(MASK_VALUES) marks values that are no label.
_MASK_CLASSES = np.full(256, len(MASK_VALUES), dtype=np.uint8)
_MASK_CLASSES[list(MASK_VALUES)] = np.arange(len(MASK_VALUES))
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})

# (slices, cases) of each split of the full public OASIS keras_png_slices set.
OASIS_COUNTS = {"train": (9664, 302), "validate": (1120, 35), "test": (544, 17)}
# path, bytes and sha256 of every image (not segmentation) file of that set, relative to its top folder.
OASIS_MANIFEST = Path(__file__).with_name("oasis_manifest.tsv.gz")

_MANIFEST_HEADER = ["path", "bytes", "sha256"]
_SLICE_NAME = re.compile(r"(?P<case>.+)_slice_(?P<index>\d+)(?:\.nii)?\.(?:png|jpe?g|tiff?|bmp)", re.IGNORECASE)
# The Pillow decoders tried on a slice file: those of IMAGE_SUFFIXES only, so that a file of some other format
# renamed to .png is refused rather than handed to a decoder nobody meant to expose to untrusted files.
_DECODERS = ("PNG", "JPEG", "TIFF", "BMP")
# Largest image decoded, in pixels: a slice has 65,536. A header can claim 65535x65535 in a few bytes; this
# refuses such a file before any pixel memory is allocated (Pillow's own limit, 179M pixels, allows files that
# decode to hundreds of megabytes).
MAX_IMAGE_PIXELS = 4096 * 4096


class SliceName(NamedTuple):
    """What a slice file's name says: its case id (``"007"`` for ``case_007_slice_12.nii.png``) and index."""

    case_id: str
    slice_index: int


def split_folder(data_dir: str | Path, split: str) -> Path:
    """The folder holding one split of an OASIS-layout data set: ``data_dir/keras_png_slices_<split>``."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return Path(data_dir) / f"keras_png_slices_{split}"


def mask_folder(data_dir: str | Path, split: str) -> Path:
    """The folder holding one split's segmentation masks: ``data_dir/keras_png_slices_seg_<split>``."""
    return split_folder(data_dir, split).with_name(f"keras_png_slices_seg_{split}")


def slice_file_name(case_number: int, slice_index: int, prefix: str = "case") -> str:
    """The OASIS file name of a slice, e.g. ``slice_file_name(7, 12) == "case_007_slice_12.nii.png"``.

    ``prefix="seg"`` gives the name of its mask, ``seg_007_slice_12.nii.png``.
    """
    return f"{prefix}_{case_number:03d}_slice_{slice_index}.nii.png"


def parse_slice_name(path_or_name: str | Path) -> SliceName:
    """Read the case and slice index from a file name ``<prefix>_slice_<S>[.nii].<image suffix>``.

    The case id is the prefix, without a leading ``case_``: OASIS ``case_007_slice_3.nii.png`` gives
    ``SliceName("007", 3)``, a generic ``sub-12_slice_3.png`` gives ``SliceName("sub-12", 3)``.
    """
    name = _match_slice_name(Path(path_or_name).name)
    if name is None:
        problem = "cannot parse case and slice index from the file name; expected <case>_slice_<S>.png"
        raise DataError(problem, path_or_name)
    return name


def _match_slice_name(name: str) -> SliceName | None:
    match = _SLICE_NAME.fullmatch(name)
    return None if match is None else SliceName(match["case"].removeprefix("case_"), int(match["index"]))


def case_sort_key(case_id: str) -> tuple[str | int, ...]:
    """Sort key ordering case ids naturally: ``"sub-2"`` before ``"sub-10"``."""
    # re.split with a capturing group alternates text and digit runs, always starting with text, so keys of
    # different case ids compare position by position without mixing str and int.
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", case_id)))


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name.

    Hidden files (``.DS_Store``, ``._case_001...``) and files whose suffix is not in :data:`IMAGE_SUFFIXES`
    (``README.txt``, ``cases.tsv``) are ignored, so notes and OS clutter next to the slices do no harm.
    Subfolders are not searched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("folder does not exist" if not folder.exists() else "not a folder", folder)
    return sorted(
        entry
        for entry in folder.iterdir()
        if not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file()
    )


def list_slices(folder: str | Path) -> list[Path]:
    """The slice images of a folder (see :func:`image_files`), sorted by case and then slice index.

    Raises DataError if the folder is missing, holds no slice images, or holds an image whose name does not
    follow ``<case>_slice_<S>``.
    """
    files = image_files(folder)
    if not files:
        raise DataError("no slice images (expected <case>_slice_<S>.png files)", folder)
    return sorted(files, key=_slice_sort_key)


def _slice_sort_key(path: Path) -> tuple[tuple[str | int, ...], int]:
    """Sort key ordering slice files by case (naturally) and then numerically by slice index."""
    name = parse_slice_name(path)
    return case_sort_key(name.case_id), name.slice_index


def find_splits(data_dir: str | Path) -> dict[str, Path]:
    """The OASIS split folders of ``data_dir`` by split name, or ``{}`` if it has none of them.

    ``{}`` means ``data_dir`` may be a generic folder of slice images (see :func:`split_files`). Raises
    DataError naming the first missing folder when only some of the three exist.
    """
    folders = {split: split_folder(data_dir, split) for split in SPLITS}
    if not any(folder.exists() for folder in folders.values()):
        return {}
    for folder in folders.values():
        if not folder.is_dir():
            raise DataError("split folder does not exist", folder)
    return folders


def split_files(data_dir: str | Path, split: str, *, seed: int = 0) -> list[Path]:
    """The slice files of one split, sorted by case and slice index.

    With OASIS split folders these are the slices of ``keras_png_slices_<split>``. Otherwise ``data_dir`` must
    itself hold slice images, and its cases are split by :func:`split_cases` with ``seed``.
    """
    split_folder(data_dir, split)  # validates the split name before anything is read
    folders = find_splits(data_dir)
    if folders:
        files = list_slices(folders[split])
        _refuse_shared_cases(files, split, folders)
        return files
    if not image_files(data_dir):
        raise DataError(
            "no keras_png_slices_{train,validate,test} folders and no <case>_slice_<S>.png images", data_dir
        )
    return group_by_split(list_slices(data_dir), seed=seed)[split]


def mask_file_name(slice_path: str | Path) -> str:
    """The name of a slice's mask: ``case_007_slice_3.nii.png`` gives ``seg_007_slice_3.nii.png``."""
    return "seg_" + Path(slice_path).name.removeprefix("case_")


def split_masks(data_dir: str | Path, split: str, files: list[Path]) -> list[Path] | None:
    """The mask of each slice of ``files`` (one split's :func:`split_files`), in the same order.

    None where ``data_dir`` has no OASIS split folders or no ``keras_png_slices_seg_<split>`` folder: such
    slices simply have no masks. Raises DataError naming the first slice without a mask, or else the first
    mask without a slice (each split's masks must be exactly its slices').
    """
    folder = mask_folder(data_dir, split)
    if not find_splits(data_dir) or not folder.is_dir():
        return None
    pairs, missing, unpaired = pair_masks(folder, files)
    if missing:
        raise DataError(missing_mask_problem(missing[0], folder), missing[0])
    if unpaired:
        raise DataError(f"mask has no slice in {split_folder(data_dir, split)}", unpaired[0])
    return [pairs[path] for path in files]


def missing_mask_problem(slice_path: Path, folder: Path) -> str:
    """What is wrong with a slice whose mask is not in the segmentation ``folder``."""
    return f"slice has no mask ({mask_file_name(slice_path)} is not in {folder})"


def pair_masks(folder: Path, slices: Iterable[Path]) -> tuple[dict[Path, Path], list[Path], list[Path]]:
    """Pair slice files with the masks in ``folder`` by name (:func:`mask_file_name`).

    Returns ``({slice: mask}, slices without a mask, masks without a slice)``, the lists in the given and in
    name order.
    """
    masks = {path.name: path for path in image_files(folder)}
    pairs, missing = {}, []
    for path in slices:
        if (mask := masks.pop(mask_file_name(path), None)) is None:
            missing.append(path)
        else:
            pairs[path] = mask
    return pairs, missing, list(masks.values())


def mask_classes(pixels: np.ndarray, path: str | Path) -> np.ndarray:
    """A decoded mask's class indices, uint8 [H, W] of 0..3 (positions in :data:`MASK_VALUES`).

    Raises DataError naming the file (and up to five of the values) if it holds values other than those.
    """
    classes = _MASK_CLASSES[pixels]
    if (bad := classes == len(MASK_VALUES)).any():
        values = ", ".join(str(value) for value in np.unique(pixels[bad])[:5])
        raise DataError(f"mask holds values other than {', '.join(map(str, MASK_VALUES))} ({values})", path)
    return classes


def mask_pixels(classes: np.ndarray) -> np.ndarray:
    """Class indices (any int array of 0..3) -> the mask's pixel values, uint8 (:data:`MASK_VALUES`)."""
    return np.asarray(MASK_VALUES, dtype=np.uint8)[classes]


def _refuse_shared_cases(files: list[Path], split: str, folders: dict[str, Path]) -> None:
    """Raise DataError if a case of ``files`` (one split) also has slices in another split's folder.

    Such a case would leak between training and evaluation. Unparseable names in the other folders are left
    to the loading of those splits to report.
    """
    first_file = {parse_slice_name(path).case_id: path for path in reversed(files)}
    for other, folder in folders.items():
        if other == split:
            continue
        for path in image_files(folder):
            name = _match_slice_name(path.name)
            if name is not None and name.case_id in first_file:
                raise DataError(f"case {name.case_id} is also in the {other} split ({path.name}); a case must be "
                                "in one split only", first_file[name.case_id])


def group_by_split(slices: Iterable[Path], *, seed: int = 0) -> dict[str, list[Path]]:
    """Group the slice files of a generic folder by split, whole cases per split (see :func:`split_cases`)."""
    slices = list(slices)
    cases = split_cases({parse_slice_name(path).case_id for path in slices}, seed=seed)
    return {split: [path for path in slices if parse_slice_name(path).case_id in cases[split]] for split in SPLITS}


def split_cases(
    case_ids: Iterable[str], seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, set[str]]:
    """Assign whole cases to the train/validate/test splits, deterministically.

    Cases are ordered by a SHA-256 hash of ``seed`` and the case id (stable across runs and machines, unlike
    Python's ``hash``), and the splits take consecutive runs of that order, sized by ``fractions`` rounded to
    whole cases. With 3 or more cases every split gets at least one; with fewer, later splits may be empty.
    """
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = sorted(set(case_ids), key=lambda case: hashlib.sha256(f"{seed}:{case}".encode()).hexdigest())
    counts = [round(len(order) * fraction) for fraction in fractions[1:]]
    if len(order) >= len(SPLITS):
        counts = [max(count, 1) for count in counts]
    counts.insert(0, len(order) - sum(counts))
    bounds = np.cumsum([0, *counts])
    return {split: set(order[bounds[i] : bounds[i + 1]]) for i, split in enumerate(SPLITS)}


def load_manifest(path: str | Path = OASIS_MANIFEST) -> dict[str, tuple[int, str]]:
    """Read a manifest TSV (``path<TAB>bytes<TAB>sha256`` with that header; gzip-compressed if ``*.gz``).

    Returns ``{relative path: (size in bytes, sha256 hex digest)}``, paths relative to the data folder.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            header = next(lines, "").rstrip("\n").split("\t")
            if header != _MANIFEST_HEADER:
                raise DataError(f"not a manifest: the header must be {' '.join(_MANIFEST_HEADER)}", path)
            manifest = {}
            for line_number, line in enumerate(lines, start=2):
                fields = line.rstrip("\n").split("\t")
                if len(fields) != len(_MANIFEST_HEADER) or not fields[1].isdigit():
                    raise DataError(f"line {line_number} is not path<TAB>bytes<TAB>sha256", path)
                manifest[fields[0]] = (int(fields[1]), fields[2])
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as error:  # zlib.error: damaged gzip data
        raise DataError(f"cannot read the manifest ({error})", path) from error
    return manifest


def read_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (PNG, JPEG, TIFF or BMP).

    Raises DataError naming the file if it is missing, not a complete image of those formats, or larger than
    MAX_IMAGE_PIXELS.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its two bomb limits; an error here keeps the user's output one line.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=_DECODERS) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise DataError(f"image is {image.width}x{image.height}, larger than this program reads "
                                    f"({MAX_IMAGE_PIXELS} pixels at most)", path)
                image.load()  # decodes the pixels now, so a truncated file fails here and not later
                return image
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # beyond Pillow's own limit
        raise DataError(f"image is larger than this program reads ({error})", path) from error
    except Exception as error:
        # Pillow's decoders fail on malformed bytes with many exception types (OSError, SyntaxError, zlib.error,
        # struct.error, IndexError...); for any of them the file is not a usable image.
        raise DataError(f"cannot decode the image ({_decode_failure(error)})", path) from error


def _decode_failure(error: Exception) -> str:
    """Why Pillow could not read a file, in a few words (its messages often repeat the file's path)."""
    if isinstance(error, UnidentifiedImageError):
        return f"not a {', '.join(_DECODERS[:-1])} or {_DECODERS[-1]} file"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def grayscale_pixels(image: Image.Image, path: str | Path) -> np.ndarray:
    """An image's pixels as 8-bit grayscale, uint8 [H, W].

    Colour (RGB, RGBA, palette...) is converted with Pillow's ``convert("L")``. 16-bit, 32-bit or float
    grayscale is scaled so that the image's own maximum becomes 255 (negative values become 0, an all-zero
    image stays 0): Pillow's own conversion would clip everything above 255 to white.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float32)
        if not np.isfinite(pixels).all():
            raise DataError("image holds NaN or infinite values", path)
        peak = max(float(pixels.max()), 1.0)
        return np.rint(np.clip(pixels, 0, peak) * (255.0 / peak)).astype(np.uint8)
    try:
        return np.asarray(image.convert("L"))
    except ValueError as error:  # modes without a grayscale conversion, e.g. HSV
        raise DataError(f"cannot convert image mode {image.mode} to grayscale ({error})", path) from error


def size_problem(image: Image.Image) -> str | None:
    """What is wrong with an image's size for this layout (``"image is 128x256, expected 256x256"``), if anything."""
    if image.size == (IMAGE_SIZE, IMAGE_SIZE):
        return None
    return f"image is {image.width}x{image.height}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"


def write_case(folder: Path, case_number: int, slices: np.ndarray, prefix: str = "case") -> None:
    """Write one case's slices (uint8 [n_slices, H, W]) as ``<prefix>_NNN_slice_S.nii.png`` in ``folder``.

    ``prefix="seg"`` writes masks under OASIS's segmentation names.
    """
    for slice_index, image in enumerate(slices):
        path = folder / slice_file_name(case_number, slice_index, prefix)
        try:
            Image.fromarray(image).save(path)  # uint8 [H, W] gives mode L
        except OSError as error:
            raise DataError(f"cannot write the slice ({error})", path) from error


@contextlib.contextmanager
def staged_layout(out_dir: str | Path, *, masks: bool = False) -> Iterator[Path]:
    """Build a new OASIS-layout folder out of sight and move it to ``out_dir`` only once it is complete.

    Yields a temporary folder next to ``out_dir`` (same file system, so the final rename is atomic) that
    already holds the three empty split folders (with ``masks``, their three empty mask folders too). If the
    block raises, or the run is killed, no partial ``out_dir`` is left behind. Refuses an ``out_dir`` that
    already holds files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError("output folder already exists and is not empty", out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as error:
        raise DataError(f"cannot create the output folder ({error})", out_dir) from error
    try:
        for split in SPLITS:
            split_folder(staging, split).mkdir()
            if masks:
                mask_folder(staging, split).mkdir()
        yield staging
        if out_dir.exists():
            out_dir.rmdir()  # empty, as checked above; renaming onto a folder fails on some platforms
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_slice(path: Path) -> np.ndarray:
    """Decode one slice image to uint8 [256, 256] following the decoding policy of :func:`grayscale_pixels`."""
    image = read_image(path)
    if problem := size_problem(image):
        raise DataError(problem, path)
    return grayscale_pixels(image, path)


def read_mask(path: Path) -> np.ndarray:
    """Decode one segmentation mask to class indices, uint8 [256, 256] of 0..3 (see
    :func:`~brainvq.data.layout.mask_classes`)."""
    return mask_classes(read_slice(path), path)
