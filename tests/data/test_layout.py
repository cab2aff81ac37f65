from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainvq.data import layout
from brainvq.data.layout import (
    OASIS_COUNTS,
    SPLITS,
    SliceName,
    find_splits,
    list_slices,
    load_manifest,
    parse_slice_name,
    read_image,
    slice_file_name,
    split_cases,
    split_files,
    split_folder,
    staged_layout,
)
from brainvq.errors import ConfigError, DataError

SHARED_MANIFEST = Path("/work/shared/reference/oasis_keras_png_slices_manifest.tsv")


def test_slice_file_name_round_trips_through_parse() -> None:
    name = slice_file_name(7, 12)
    assert name == "case_007_slice_12.nii.png"
    assert parse_slice_name(name) == SliceName("007", 12)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("case_441_slice_31.nii.png", SliceName("441", 31)),
        ("sub-12_slice_3.png", SliceName("sub-12", 3)),
        ("brain_a_slice_04.nii.JPG", SliceName("brain_a", 4)),
        ("x_slice_0.tiff", SliceName("x", 0)),
    ],
)
def test_parse_slice_name_reads_case_and_index(name: str, expected: SliceName) -> None:
    assert parse_slice_name(Path("some/folder") / name) == expected


@pytest.mark.parametrize("name", ["montage.png", "case_001_slice_.png", "case_001_slice_3.nii.gz", "slice_3.png"])
def test_parse_slice_name_rejects_other_names_naming_the_file(name: str) -> None:
    with pytest.raises(DataError, match=f"^{re.escape(name)}: cannot parse case and slice index"):
        parse_slice_name(name)


def test_split_folder_rejects_unknown_split(tmp_path: Path) -> None:
    assert split_folder(tmp_path, "validate") == tmp_path / "keras_png_slices_validate"
    with pytest.raises(DataError, match="unknown split 'val'"):
        split_folder(tmp_path, "val")


def test_list_slices_sorts_numerically_and_skips_non_images(tmp_path: Path, slices_writer) -> None:
    slices_writer(tmp_path, ["case_10", "case_2"], n_slices=11)
    for clutter in ("README.txt", ".DS_Store", "._case_2_slice_0.png", "cases.tsv"):
        (tmp_path / clutter).write_text("not a slice")
    (tmp_path / "sub").mkdir()
    names = [(parse_slice_name(path).case_id, parse_slice_name(path).slice_index) for path in list_slices(tmp_path)]
    assert names == [("2", index) for index in range(11)] + [("10", index) for index in range(11)]


def test_list_slices_errors_name_the_folder_or_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder does not exist"):
        list_slices(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("only notes")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: no slice images"):
        list_slices(tmp_path)
    (tmp_path / "montage.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"montage\.png: cannot parse"):
        list_slices(tmp_path)


def test_find_splits_needs_all_three_folders_or_none(tmp_path: Path) -> None:
    assert find_splits(tmp_path) == {}
    split_folder(tmp_path, "train").mkdir()
    with pytest.raises(DataError, match="keras_png_slices_validate: split folder does not exist"):
        find_splits(tmp_path)
    for split in SPLITS:
        split_folder(tmp_path, split).mkdir(exist_ok=True)
    assert find_splits(tmp_path) == {split: split_folder(tmp_path, split) for split in SPLITS}


def test_split_files_splits_a_generic_folder_by_whole_cases(tmp_path: Path, slices_writer) -> None:
    written = slices_writer(tmp_path, [f"sub-{i}" for i in range(10)], n_slices=3)
    by_split = {split: split_files(tmp_path, split) for split in SPLITS}
    cases = {split: {parse_slice_name(path).case_id for path in files} for split, files in by_split.items()}
    assert sorted(path for files in by_split.values() for path in files) == sorted(written)
    assert [len(cases[split]) for split in SPLITS] == [8, 1, 1]
    assert not (cases["train"] & cases["validate"] or cases["train"] & cases["test"])


def test_split_files_explains_a_folder_without_slices(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no keras_png_slices_.* folders and no <case>_slice_<S>\.png images"):
        split_files(tmp_path, "train")


def test_split_cases_is_deterministic_and_sized_by_fractions() -> None:
    case_ids = [f"{i:03d}" for i in range(100)]
    splits = split_cases(case_ids, seed=3)
    assert splits == split_cases(reversed(case_ids), seed=3)
    assert splits != split_cases(case_ids, seed=4)
    assert [len(splits[split]) for split in SPLITS] == [80, 10, 10]
    assert set().union(*splits.values()) == set(case_ids)


def test_split_cases_gives_every_split_a_case_from_three_cases() -> None:
    assert [len(cases) for cases in split_cases(["a", "b", "c"]).values()] == [1, 1, 1]
    assert [len(cases) for cases in split_cases(["a", "b"]).values()] == [2, 0, 0]


def test_split_cases_rejects_bad_fractions() -> None:
    with pytest.raises(ConfigError, match="summing to 1"):
        split_cases(["a"], fractions=(0.5, 0.2, 0.2))


def test_packaged_manifest_lists_the_oasis_image_files() -> None:
    manifest = load_manifest()
    for split, (n_slices, n_cases) in OASIS_COUNTS.items():
        names = [path for path in manifest if path.startswith(f"keras_png_slices_{split}/")]
        assert len(names) == n_slices
        assert len({parse_slice_name(name).case_id for name in names}) == n_cases
    assert len(manifest) == sum(n_slices for n_slices, _ in OASIS_COUNTS.values())


@pytest.mark.skipif(not SHARED_MANIFEST.exists(), reason="shared OASIS manifest not present")
def test_packaged_manifest_equals_the_image_rows_of_the_shared_one() -> None:
    shared = load_manifest(SHARED_MANIFEST)
    assert load_manifest() == {path: row for path, row in shared.items() if "_seg_" not in path}


def test_load_manifest_rejects_malformed_files(tmp_path: Path) -> None:
    bad_header = tmp_path / "header.tsv"
    bad_header.write_text("file\tsize\n")
    with pytest.raises(DataError, match=r"header\.tsv: not a manifest"):
        load_manifest(bad_header)
    bad_row = tmp_path / "row.tsv.gz"
    with gzip.open(bad_row, "wt") as out:
        out.write("path\tbytes\tsha256\na.png\t12\tabc\nb.png\ttwelve\tabc\n")
    with pytest.raises(DataError, match=r"row\.tsv\.gz: line 3 is not"):
        load_manifest(bad_row)
    damaged = tmp_path / "damaged.tsv.gz"
    compressed = bytearray(gzip.compress(b"path\tbytes\tsha256\n" + b"a.png\t12\tabc\n" * 1000, mtime=0))
    compressed[30:40] = b"x" * 10
    damaged.write_bytes(bytes(compressed))
    with pytest.raises(DataError, match=r"damaged\.tsv\.gz: cannot read the manifest"):
        load_manifest(damaged)


def test_read_image_names_a_file_that_does_not_decode(tmp_path: Path) -> None:
    broken = tmp_path / "case_001_slice_0.nii.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=f"^{re.escape(str(broken))}: cannot decode the image"):
        read_image(broken)


def test_read_image_refuses_formats_other_than_the_slice_suffixes(tmp_path: Path) -> None:
    disguised = tmp_path / "case_001_slice_0.nii.png"
    Image.new("L", (256, 256)).save(disguised, format="GIF")  # a GIF decoder is never handed a slice file
    with pytest.raises(DataError, match=r"cannot decode the image \(not a PNG, JPEG, TIFF or BMP file\)"):
        read_image(disguised)


def test_staged_layout_moves_a_complete_folder_into_place(tmp_path: Path) -> None:
    out_dir = tmp_path / "cohort"
    with staged_layout(out_dir) as staging:
        layout.write_case(split_folder(staging, "train"), 1, np.zeros((2, 4, 4), dtype=np.uint8))
        assert not out_dir.exists()
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(f"keras_png_slices_{s}" for s in SPLITS)
    assert [path.name for path in list_slices(split_folder(out_dir, "train"))] == [
        "case_001_slice_0.nii.png",
        "case_001_slice_1.nii.png",
    ]


def test_staged_layout_leaves_nothing_when_interrupted(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), staged_layout(tmp_path / "cohort") as staging:
        (staging / "half.png").write_bytes(b"")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_staged_layout_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="already exists and is not empty"), staged_layout(tmp_path):
        pass
    assert (tmp_path / "keep.txt").exists()
