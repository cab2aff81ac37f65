from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainvq.data import check
from brainvq.data.check import check_data
from brainvq.data.layout import mask_folder, split_folder


def train_file(data_dir: Path, case_number: int = 1, slice_index: int = 0) -> Path:
    return split_folder(data_dir, "train") / f"case_{case_number:03d}_slice_{slice_index}.nii.png"


def write_manifest(data_dir: Path) -> Path:
    """A manifest of every file under ``data_dir``, as the OASIS one is made."""
    manifest = data_dir.parent / "manifest.tsv"
    rows = [
        f"{path.relative_to(data_dir).as_posix()}\t{path.stat().st_size}\t{hashlib.sha256(path.read_bytes()).hexdigest()}"
        for path in sorted(data_dir.rglob("*.png"))
    ]
    manifest.write_text("\n".join(["path\tbytes\tsha256", *rows]) + "\n")
    return manifest


def test_a_good_folder_passes_with_one_summary_per_split(oasis_dir: Path) -> None:
    report = check_data(oasis_dir)
    assert report.ok, report.problems
    assert report.summaries == [
        "train: 64 slices from 2 cases, 256x256 L",
        "validate: 32 slices from 1 cases, 256x256 L",
        "test: 32 slices from 1 cases, 256x256 L",
    ]


def test_slices_with_masks_are_counted_per_split(oasis_with_masks: Path) -> None:
    report = check_data(oasis_with_masks)
    assert report.ok, report.problems
    assert [line for line in report.summaries if "masks" in line] == [
        "train: 64 slices with masks",
        "validate: 32 slices with masks",
        "test: 32 slices with masks",
    ]


def test_each_bad_mask_is_reported_by_name(oasis_with_masks: Path, mask_values) -> None:
    folder = mask_folder(oasis_with_masks, "train")
    (folder / "seg_001_slice_0.nii.png").unlink()
    Image.fromarray(mask_values(1, 0)).save(folder / "seg_009_slice_0.nii.png")
    Image.new("L", (128, 256)).save(folder / "seg_001_slice_1.nii.png")
    bad = mask_values(1, 2)
    bad[5, 5] = 7
    Image.fromarray(bad).save(folder / "seg_001_slice_2.nii.png")
    report = check_data(oasis_with_masks)
    assert sorted(report.problems) == sorted([
        f"{train_file(oasis_with_masks)}: slice has no mask (seg_001_slice_0.nii.png is not in {folder})",
        f"{folder / 'seg_009_slice_0.nii.png'}: mask has no slice",
        f"{folder / 'seg_001_slice_1.nii.png'}: image is 128x256, expected 256x256",
        f"{folder / 'seg_001_slice_2.nii.png'}: mask holds values other than 0, 85, 170, 255 (7)",
    ])
    assert "train: 63 slices with masks" in report.summaries


def test_summary_recognises_the_oasis_split_sizes(oasis_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "OASIS_COUNTS", {"train": (64, 2), "validate": (1120, 35), "test": (544, 17)})
    summaries = check_data(oasis_dir).summaries
    assert summaries[0].endswith("256x256 L — matches the full public OASIS train split")
    assert "matches" not in summaries[1]


def save_image(mode: str, size: tuple[int, int] = (256, 256)) -> Callable[[Path], None]:
    return lambda path: Image.new(mode, size).save(path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def add_duplicate(path: Path) -> None:
    shutil.copy(path, path.with_name("case_001_slice_00.nii.png"))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda path: path.write_bytes(b""), "case_001_slice_0.nii.png: cannot decode the image"),
        (truncate, "case_001_slice_0.nii.png: cannot decode the image"),
        (save_image("L", (128, 256)), "case_001_slice_0.nii.png: image is 128x256, expected 256x256"),
        (save_image("RGB"), "case_001_slice_0.nii.png: image mode is RGB, expected 8-bit grayscale (L)"),
        (save_image("I;16"), "case_001_slice_0.nii.png: image mode is I;16, expected 8-bit grayscale (L)"),
        (lambda path: path.rename(path.with_name("montage.png")), "montage.png: cannot parse case and slice"),
        (Path.unlink, "case 001 has 31 slices numbered 1..31, expected 32 numbered 0..31"),
        (add_duplicate, "case_001_slice_00.nii.png: duplicate of slice 0 of case 001 (case_001_slice_0.nii.png)"),
    ],
)
def test_each_damaged_file_is_reported_by_name(oasis_dir: Path, damage: Callable[[Path], None], problem: str) -> None:
    damage(train_file(oasis_dir))
    report = check_data(oasis_dir)
    assert not report.ok
    assert any(problem in line for line in report.problems), report.problems
    assert all(str(split_folder(oasis_dir, "train")) in line for line in report.problems)


def test_a_case_in_two_splits_is_reported(oasis_dir: Path) -> None:
    shutil.copytree(split_folder(oasis_dir, "test"), split_folder(oasis_dir, "validate"), dirs_exist_ok=True)
    problems = check_data(oasis_dir).problems
    first_test_file = split_folder(oasis_dir, "test") / "case_004_slice_0.nii.png"
    assert problems == [f"{first_test_file}: case 004 is in both validate (case_004_slice_0.nii.png) and test"]


def test_missing_and_empty_split_folders_are_reported(oasis_dir: Path) -> None:
    shutil.rmtree(split_folder(oasis_dir, "validate"))
    for path in split_folder(oasis_dir, "test").iterdir():
        path.unlink()
    report = check_data(oasis_dir)
    assert report.problems == [
        f"{split_folder(oasis_dir, 'validate')}: folder does not exist",
        f"{split_folder(oasis_dir, 'test')}: no slice images (expected case_NNN_slice_S.nii.png files)",
    ]
    assert report.summaries == ["train: 64 slices from 2 cases, 256x256 L"]


def test_a_generic_folder_is_checked_split_by_case(tmp_path: Path, slices_writer) -> None:
    slices_writer(tmp_path, ["a", "b", "c"])
    report = check_data(tmp_path)
    assert report.ok, report.problems
    assert report.summaries == [
        f"{tmp_path}: a folder of slice images, split by case",
        "train: 32 slices from 1 cases, 256x256 L",
        "validate: 32 slices from 1 cases, 256x256 L",
        "test: 32 slices from 1 cases, 256x256 L",
    ]


def test_a_missing_folder_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    assert check_data(tmp_path / "nowhere").problems == [f"{tmp_path / 'nowhere'}: folder does not exist"]


def test_manifest_verification_finds_changed_missing_and_extra_files(oasis_dir: Path) -> None:
    manifest = write_manifest(oasis_dir)
    assert check_data(oasis_dir, manifest=manifest).ok
    changed, missing = train_file(oasis_dir, 1, 0), train_file(oasis_dir, 1, 1)
    extra = split_folder(oasis_dir, "train") / "notes.txt"
    noise = np.random.default_rng(0).integers(0, 256, size=(256, 256), dtype=np.uint8)
    Image.fromarray(noise).save(changed)  # noise does not compress: the size changes
    missing.unlink()
    extra.write_text("not in the manifest")
    problems = check_data(oasis_dir, manifest=manifest).problems
    assert f"{missing}: missing (listed in the manifest)" in problems
    assert f"{extra}: not in the manifest" in problems
    assert any(line.startswith(f"{changed}: size is ") for line in problems)


def test_manifest_verification_compares_hashes_of_same_size_files(oasis_dir: Path) -> None:
    manifest = write_manifest(oasis_dir)
    first = train_file(oasis_dir)
    manifest.write_text(manifest.read_text().replace(hashlib.sha256(first.read_bytes()).hexdigest(), "0" * 64))
    assert check_data(oasis_dir, manifest=manifest).problems == [f"{first}: SHA-256 differs from the manifest"]


def test_manifest_folders_absent_from_the_data_are_not_reported(oasis_dir: Path) -> None:
    seg = oasis_dir / "keras_png_slices_seg_train"
    seg.mkdir()
    Image.new("L", (256, 256)).save(seg / "seg_001_slice_0.nii.png")
    manifest = write_manifest(oasis_dir)
    shutil.rmtree(seg)
    assert check_data(oasis_dir, manifest=manifest).ok
