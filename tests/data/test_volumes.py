from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainvq.data.layout import SLICES_PER_CASE, SPLITS, list_slices, split_folder
from brainvq.data.volumes import (
    FRAME_FILL,
    Volume,
    find_volumes,
    load_volume,
    volume_to_slices,
    volumes_to_layout,
)
from brainvq.errors import DataError

ZOOMS = (1.2, 1.0, 1.0)
SHAPE = (60, 70, 50)


def phantom() -> np.ndarray:
    """An ellipsoid 'head' (semi-axes 24 x 30 x 22 mm at ZOOMS) brighter toward right, anterior and superior."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    inside = ((x - 30) * 1.2 / 24) ** 2 + ((y - 35) / 30) ** 2 + ((z - 25) / 22) ** 2 <= 1
    return np.where(inside, 100 + 2 * x + 3 * y + 1 * z, 0).astype(np.float32)


def foreground_mean(image: np.ndarray) -> float:
    return float(image[image > 0].mean())


def save(path: Path, data: np.ndarray, image_type=nib.Nifti1Image) -> Path:
    nib.save(image_type(data, np.diag([*ZOOMS, 1.0])), path)
    return path


@pytest.fixture
def volume_file(tmp_path: Path) -> Path:
    return save(tmp_path / "subject.nii.gz", phantom())


def test_load_volume_returns_float32_data_and_zooms(volume_file: Path) -> None:
    volume = load_volume(volume_file)
    assert volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data, phantom())
    assert volume.zooms == pytest.approx(ZOOMS)
    assert volume.path == volume_file


def test_load_volume_reorients_to_ras(tmp_path: Path) -> None:
    # Stored left-right and front-back flipped, with an affine that says so: the same anatomy.
    flipped = tmp_path / "lps.nii"
    affine = np.diag([-1.2, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(phantom()[::-1, ::-1].copy(), affine), flipped)
    np.testing.assert_array_equal(load_volume(flipped).data, phantom())


def test_load_volume_drops_a_singleton_fourth_dimension(tmp_path: Path) -> None:
    path = save(tmp_path / "4d.nii", phantom()[..., None])
    assert load_volume(path).data.shape == SHAPE


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (np.ones((20, 20), dtype=np.float32), "expected a 3D volume, got shape (20, 20)"),
        (np.ones((20, 20, 20, 3), dtype=np.float32), "expected a 3D volume, got shape (20, 20, 20, 3)"),
        (np.full((20, 20, 20), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.zeros((20, 20, 20), dtype=np.float32), "constant intensity"),
    ],
)
def test_load_volume_rejects_unusable_volumes(tmp_path: Path, data: np.ndarray, problem: str) -> None:
    path = save(tmp_path / "bad.nii.gz", data)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: .*{re.escape(problem)}"):
        load_volume(path)


def test_load_volume_names_files_that_are_not_volumes(tmp_path: Path, volume_file: Path) -> None:
    text = tmp_path / "notes.nii"
    text.write_text("not a volume")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(volume_file.read_bytes()[:2000])
    for path in (text, truncated, tmp_path / "missing.nii"):
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}: cannot read"):
            load_volume(path)


def test_volume_to_slices_frames_the_head_keeping_its_aspect_ratio() -> None:
    slices = volume_to_slices(Volume(phantom(), ZOOMS))
    assert slices.shape == (SLICES_PER_CASE, 256, 256)
    assert slices.dtype == np.uint8
    rows, columns = np.nonzero(slices[SLICES_PER_CASE // 2])
    height, width = np.ptp(rows) + 1, np.ptp(columns) + 1
    # The longer side (60 mm front to back) spans FRAME_FILL of the image; the width follows in millimetres.
    assert height == pytest.approx(FRAME_FILL * 256, rel=0.05)
    assert width / height == pytest.approx(48 / 60, rel=0.05)
    assert slices[:, 0, :].max() == slices[:, :, 0].max() == 0


def test_volume_to_slices_shows_a_radiological_view_from_bottom_to_top() -> None:
    slices = volume_to_slices(Volume(phantom(), ZOOMS))
    middle = slices[SLICES_PER_CASE // 2]
    assert foreground_mean(middle[:128]) > foreground_mean(middle[128:])  # anterior is up
    assert foreground_mean(middle[:, :128]) > foreground_mean(middle[:, 128:])  # the subject's right is left
    assert foreground_mean(slices[-1]) > foreground_mean(slices[0])  # slice 0 is the lowest


def test_volume_to_slices_spans_the_middle_of_the_head() -> None:
    slices = volume_to_slices(Volume(phantom(), ZOOMS))
    areas = np.count_nonzero(slices, axis=(1, 2))
    assert areas.min() > 0  # no slice falls outside the head
    assert areas[0] < areas[SLICES_PER_CASE // 2] and areas[-1] < areas[SLICES_PER_CASE // 2]


def test_volume_to_slices_shows_a_binary_mask_as_white_on_black() -> None:
    middle = volume_to_slices(Volume((phantom() > 0).astype(np.float32), ZOOMS))[SLICES_PER_CASE // 2]
    assert (middle[128, 128], middle[0, 0]) == (255, 0)


def test_volume_to_slices_rejects_a_volume_without_foreground() -> None:
    data = np.zeros(SHAPE, dtype=np.float32)
    data[1, 1, 1] = 1  # skipped by the strided extent measurement
    with pytest.raises(DataError, match="too little foreground"):
        volume_to_slices(Volume(data, ZOOMS))


def test_find_volumes_counts_an_analyze_pair_once(tmp_path: Path) -> None:
    save(tmp_path / "b.nii", phantom())
    (tmp_path / "nested").mkdir()
    save(tmp_path / "nested" / "a.hdr", phantom(), image_type=nib.AnalyzeImage)
    (tmp_path / ".hidden.nii").write_bytes(b"")
    assert find_volumes(tmp_path) == {"b": tmp_path / "b.nii", "nested/a": tmp_path / "nested" / "a.hdr"}


def test_find_volumes_rejects_two_files_for_one_subject(tmp_path: Path) -> None:
    save(tmp_path / "a.nii", phantom())
    save(tmp_path / "a.nii.gz", phantom())
    with pytest.raises(DataError, match="two volumes for subject a"):
        find_volumes(tmp_path)


def test_volumes_to_layout_writes_one_case_per_volume(tmp_path: Path) -> None:
    src = tmp_path / "scans"
    src.mkdir()
    for name in ("s1", "s2", "s3"):
        save(src / f"{name}.nii.gz", phantom())
    out_dir = tmp_path / "slices"
    summary = volumes_to_layout(src, out_dir)
    assert summary["cases"] == {"train": 1, "validate": 1, "test": 1}
    rows = [line.split("\t") for line in (out_dir / "cases.tsv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ["001", "002", "003"]
    assert [Path(row[1]).name for row in rows] == ["s1.nii.gz", "s2.nii.gz", "s3.nii.gz"]
    for case, _, split in rows:
        names = [path.name for path in list_slices(split_folder(out_dir, split))]
        assert names == [f"case_{case}_slice_{index}.nii.png" for index in range(SLICES_PER_CASE)]
    assert sorted(row[2] for row in rows) == sorted(SPLITS)


def test_volumes_to_layout_writes_nothing_if_a_volume_is_bad(tmp_path: Path) -> None:
    src = tmp_path / "scans"
    src.mkdir()
    save(src / "good.nii", phantom())
    bad = save(src / "zero.nii", np.zeros(SHAPE, dtype=np.float32))
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))}: volume has constant intensity"):
        volumes_to_layout(src, tmp_path / "slices")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scans"]


def test_volumes_to_layout_needs_volumes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no NIfTI or Analyze volumes"):
        volumes_to_layout(tmp_path, tmp_path / "slices")
