from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainvq.data import demo
from brainvq.data.demo import make_demo_cohort, template_folder
from brainvq.data.layout import (
    MASK_VALUES,
    SLICES_PER_CASE,
    SPLITS,
    list_slices,
    mask_folder,
    slice_file_name,
    split_folder,
)
from brainvq.data.volumes import load_volume, slice_volume
from brainvq.errors import ConfigError, DataError


def read_case(data_dir: Path, split: str, case_number: int, prefix: str = "case") -> np.ndarray:
    """uint8 [32, 256, 256]: one case's slices as written (``prefix="seg"``: its masks)."""
    folder = (split_folder if prefix == "case" else mask_folder)(data_dir, split)
    return np.stack(
        [
            np.asarray(Image.open(folder / slice_file_name(case_number, index, prefix)))
            for index in range(SLICES_PER_CASE)
        ]
    )


def correlation(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.corrcoef(first.ravel(), second.ravel())[0, 1])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("demo") / "cohort"
    return out_dir, make_demo_cohort(out_dir, train_cases=2, val_cases=1, test_cases=1, seed=0)


def test_cohort_has_the_oasis_layout_with_consecutive_case_numbers(cohort: tuple[Path, dict]) -> None:
    out_dir, summary = cohort
    assert summary["cases"] == {"train": 2, "validate": 1, "test": 1}
    assert summary["slices"] == {"train": 64, "validate": 32, "test": 32}
    expected = {"train": (1, 2), "validate": (3,), "test": (4,)}
    for split in SPLITS:
        names = [path.name for path in list_slices(split_folder(out_dir, split))]
        assert names == [slice_file_name(case, index) for case in expected[split] for index in range(SLICES_PER_CASE)]
    with Image.open(split_folder(out_dir, "train") / slice_file_name(1, 0)) as image:
        assert (image.mode, image.size) == ("L", (256, 256))


def test_cases_are_brains_on_black_filling_the_frame_like_oasis(cohort: tuple[Path, dict]) -> None:
    out_dir, summary = cohort
    slices = read_case(out_dir, "train", 1)
    assert 0.2 < summary["brain_coverage"] < 0.35
    assert slices[:, :8].max() == slices[:, -8:].max() == slices[:, :, :8].max() == 0  # black background
    assert 230 <= np.percentile(slices[slices > 0], 99.5) <= 255
    areas = np.count_nonzero(slices, axis=(1, 2))
    assert areas[0] < areas[SLICES_PER_CASE // 2] > areas[-1]  # slices run through the brain, not past it


def test_every_slice_has_a_mask_whose_labels_follow_the_image(cohort: tuple[Path, dict]) -> None:
    out_dir, _ = cohort
    for split, case_number in (("train", 1), ("train", 2), ("validate", 3), ("test", 4)):
        images, masks = read_case(out_dir, split, case_number), read_case(out_dir, split, case_number, "seg")
        assert set(np.unique(masks)) == set(MASK_VALUES)
        np.testing.assert_array_equal(masks == 0, images == 0)  # background agrees with the black of the T1
        csf, grey, white = (images[masks == value].mean() for value in MASK_VALUES[1:])
        assert white > grey > csf  # T1 contrast
    assert sorted(path.name for path in mask_folder(out_dir, "test").iterdir()) == sorted(
        slice_file_name(4, index, "seg") for index in range(SLICES_PER_CASE)
    )


def test_cases_differ_from_each_other(cohort: tuple[Path, dict]) -> None:
    out_dir, _ = cohort
    first, second = read_case(out_dir, "train", 1), read_case(out_dir, "train", 2)
    middle = SLICES_PER_CASE // 2
    assert np.count_nonzero(first[middle]) != np.count_nonzero(second[middle])
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 10


def test_an_unperturbed_subject_is_the_template_sliced_like_a_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without its random affine, contrast and noise, a demo case must match slice_volume on the template
    # (tested on its own to frame the brain with the nose up), and must not match it upside down.
    identity = demo._Subject(
        inverse_affine=np.eye(3), shift=np.zeros(3), tissue_shifts=(0, 0, 0), gamma=1, noise=0, robust_max=255
    )
    monkeypatch.setattr(demo, "_draw_subject", lambda rng: identity)
    make_demo_cohort(tmp_path / "cohort", train_cases=1, val_cases=1, test_cases=1)
    synthetic = read_case(tmp_path / "cohort", "train", 1).astype(float)
    sliced = slice_volume(load_volume(template_folder() / demo._TEMPLATE_FILES["t1"])).images.astype(float)
    upright = correlation(synthetic, sliced)
    assert upright > 0.9
    assert correlation(synthetic, sliced[:, ::-1]) < upright - 0.05


def test_a_case_depends_only_on_seed_and_case_number(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    out_dir, _ = cohort
    again = tmp_path / "again"
    make_demo_cohort(again, train_cases=1, val_cases=1, test_cases=1, seed=0)
    np.testing.assert_array_equal(read_case(again, "train", 1), read_case(out_dir, "train", 1))
    # Case 2 is a validation case here and a training case in the 2/1/1 cohort: same images.
    np.testing.assert_array_equal(read_case(again, "validate", 2), read_case(out_dir, "train", 2))
    other_seed = tmp_path / "other"
    make_demo_cohort(other_seed, train_cases=1, val_cases=1, test_cases=1, seed=1)
    assert not np.array_equal(read_case(other_seed, "train", 1), read_case(out_dir, "train", 1))


def test_refuses_a_non_empty_folder_and_empty_splits(cohort: tuple[Path, dict], tmp_path: Path) -> None:
    out_dir, _ = cohort
    with pytest.raises(DataError, match="already exists and is not empty"):
        make_demo_cohort(out_dir, train_cases=1, val_cases=1, test_cases=1)
    with pytest.raises(ConfigError, match="at least one demo case"):
        make_demo_cohort(tmp_path / "none", train_cases=1, val_cases=0, test_cases=1)


def test_an_interrupted_run_leaves_no_partial_cohort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = []

    def write_then_fail(folder: Path, case_number: int, slices: np.ndarray, prefix: str = "case") -> None:
        if written:
            raise KeyboardInterrupt
        written.append((case_number, prefix))

    monkeypatch.setattr(demo, "write_case", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_demo_cohort(tmp_path / "cohort", train_cases=1, val_cases=1, test_cases=1)
    assert written == [(1, "case")]
    assert list(tmp_path.iterdir()) == []
