"""``brainvq data check DIR``: is a folder a usable slice data set, and is it the public OASIS set?

Every image is decoded, so a corrupt file is found here rather than halfway through training. Problems are
collected, not raised: the report lists all of them, one line each, naming the file.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from brainvq.data.layout import (
    OASIS_COUNTS,
    SPLITS,
    SliceName,
    group_by_split,
    image_files,
    load_manifest,
    mask_folder,
    missing_mask_problem,
    pair_masks,
    parse_slice_name,
    read_image,
    read_mask,
    size_problem,
    split_folder,
)
from brainvq.errors import DataError


@dataclass
class CheckReport:
    """What :func:`check_data` found: one summary line per split and one line per problem."""

    summaries: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: Path, problem: str) -> None:
        self.problems.append(f"{path}: {problem}")


def check_data(data_dir: str | Path, *, manifest: str | Path | None = None) -> CheckReport:
    """Check a slice data set: OASIS split folders, or a folder of slice images (split by case).

    Finds missing or empty split folders, images that do not decode, are not 256x256 or not 8-bit grayscale,
    unparseable names, duplicate slices, cases without exactly slices 0..N-1 (N: the split's number of slice
    positions, 32 in OASIS), and cases in two splits. Where a split has a segmentation folder
    (``keras_png_slices_seg_<split>``) it counts the slices with masks and reports slices without one, masks
    without a slice, and masks that do not decode, are not 256x256 or hold values other than the four labels.
    With a
    ``manifest`` (see :func:`~brainvq.data.layout.load_manifest`; paths relative to ``data_dir``) it also
    verifies every file's size and SHA-256 and reports files missing from or absent in the manifest, in the
    manifest's folders that exist in ``data_dir``.
    """
    data_dir = Path(data_dir)
    report = CheckReport()
    if not data_dir.is_dir():
        report.add(data_dir, "folder does not exist")
        return report
    first_split_of: dict[str, tuple[str, Path]] = {}
    for split, slices in _slices_by_split(data_dir, report).items():
        if not slices:
            continue  # reported as a problem already
        shapes = Counter(shape for path in slices if (shape := _check_image(path, report)) is not None)
        cases = _check_cases(slices, report)
        for case_id, path in cases.items():
            if case_id in first_split_of:
                other_split, other_path = first_split_of[case_id]
                report.add(path, f"case {case_id} is in both {other_split} ({other_path.name}) and {split}")
            else:
                first_split_of[case_id] = (split, path)
        report.summaries.append(_summary(split, len(slices), len(cases), shapes))
        if (masks := mask_folder(data_dir, split)).is_dir():
            report.summaries.append(f"{split}: {_check_masks(masks, list(slices), report)} slices with masks")
    if manifest is not None:
        _verify_manifest(data_dir, load_manifest(manifest), report)
    return report


def _slices_by_split(data_dir: Path, report: CheckReport) -> dict[str, dict[Path, SliceName]]:
    """The slice images of each split with their parsed names; folder and name problems go to the report."""
    folders = {split: split_folder(data_dir, split) for split in SPLITS}
    if any(folder.exists() for folder in folders.values()):
        return {split: _folder_slices(folder, report) for split, folder in folders.items()}
    files = image_files(data_dir)
    if not files:
        report.add(data_dir, "no keras_png_slices_{train,validate,test} folders and no slice images")
        return {}
    report.summaries.append(f"{data_dir}: a folder of slice images, split by case")
    names = _parse_names(files, report)
    slices = {}
    for split, paths in group_by_split(names).items():
        if not paths:
            report.add(data_dir, f"no cases fall in the {split} split (too few cases)")
        slices[split] = {path: names[path] for path in paths}
    return slices


def _folder_slices(folder: Path, report: CheckReport) -> dict[Path, SliceName]:
    try:
        files = image_files(folder)
    except DataError as error:
        report.problems.append(str(error))
        return {}
    if not files:
        report.add(folder, "no slice images (expected case_NNN_slice_S.nii.png files)")
    return _parse_names(files, report)


def _parse_names(files: list[Path], report: CheckReport) -> dict[Path, SliceName]:
    names = {}
    for path in files:
        try:
            names[path] = parse_slice_name(path)
        except DataError as error:
            report.problems.append(str(error))
    return names


def _check_image(path: Path, report: CheckReport) -> str | None:
    """Decode one image and check its size and mode; returns e.g. ``"256x256 L"``, or None if unreadable."""
    try:
        image = read_image(path)
    except DataError as error:
        report.problems.append(str(error))
        return None
    if problem := size_problem(image):
        report.add(path, problem)
    if image.mode != "L":
        report.add(path, f"image mode is {image.mode}, expected 8-bit grayscale (L)")
    return f"{image.width}x{image.height} {image.mode}"


def _check_masks(folder: Path, slices: list[Path], report: CheckReport) -> int:
    """Pair a split's slices with the masks in ``folder`` and check each mask; returns the number of pairs."""
    pairs, missing, unpaired = pair_masks(folder, slices)
    for path in missing:
        report.add(path, missing_mask_problem(path, folder))
    for path in unpaired:
        report.add(path, "mask has no slice")
    for mask in pairs.values():
        try:
            read_mask(mask)
        except DataError as error:
            report.problems.append(str(error))
    return len(pairs)


def _check_cases(slices: dict[Path, SliceName], report: CheckReport) -> dict[str, Path]:
    """Check each case has exactly one image of each slice 0..N-1, where N (the number of slice positions) is
    the split's largest slice index + 1: OASIS has 32, other data may have more or fewer, but every case the
    same. Returns each case's first file by case id."""
    files_by_case: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path, name in slices.items():
        files_by_case[name.case_id][name.slice_index].append(path)
    first_files = {}
    positions = 1 + max((index for files_by_slice in files_by_case.values() for index in files_by_slice), default=-1)
    for case_id, files_by_slice in files_by_case.items():
        for slice_index, paths in files_by_slice.items():
            for duplicate in paths[1:]:
                report.add(duplicate, f"duplicate of slice {slice_index} of case {case_id} ({paths[0].name})")
        first = next(iter(files_by_slice.values()))[0]
        first_files[case_id] = first
        indices = sorted(files_by_slice)
        if indices != list(range(positions)):
            report.add(
                first,
                f"case {case_id} has {len(indices)} slices numbered {indices[0]}..{indices[-1]},"
                f" expected {positions} numbered 0..{positions - 1} like the split's other cases",
            )
    return first_files


def _summary(split: str, n_slices: int, n_cases: int, shapes: Counter[str]) -> str:
    """E.g. ``"train: 9664 slices from 302 cases, 256x256 L — matches the full public OASIS train split"``."""
    if len(shapes) == 1:
        geometry = next(iter(shapes))
    else:
        geometry = ", ".join(f"{shape} ({count})" for shape, count in shapes.most_common()) or "none readable"
    line = f"{split}: {n_slices} slices from {n_cases} cases, {geometry}"
    if (n_slices, n_cases) == OASIS_COUNTS[split]:
        line += f" — matches the full public OASIS {split} split"
    return line


def _verify_manifest(data_dir: Path, manifest: dict[str, tuple[int, str]], report: CheckReport) -> None:
    """Compare the files of the manifest's folders that exist in ``data_dir`` with the manifest's rows."""
    # Folders the manifest names but data_dir lacks are skipped: a missing split folder is already reported,
    # and the segmentation folders of the OASIS set are optional.
    folders = {PurePosixPath(relpath).parent for relpath in manifest}
    present = {
        (folder / path.name).as_posix()
        for folder in folders
        if (data_dir / folder).is_dir()
        for path in (data_dir / folder).iterdir()
        if path.is_file() and not path.name.startswith(".")
    }
    for relpath in sorted(manifest.keys() - present):
        if (data_dir / relpath).parent.is_dir():
            report.add(data_dir / relpath, "missing (listed in the manifest)")
    for relpath in sorted(present - manifest.keys()):
        report.add(data_dir / relpath, "not in the manifest")
    for relpath in sorted(present & manifest.keys()):
        size, sha256 = manifest[relpath]
        path = data_dir / relpath
        try:
            content = path.read_bytes()
        except OSError as error:
            report.add(path, f"cannot read the file ({error.strerror})")
            continue
        if len(content) != size:
            report.add(path, f"size is {len(content)} bytes, the manifest says {size}")
        elif hashlib.sha256(content).hexdigest() != sha256:
            report.add(path, "SHA-256 differs from the manifest")
