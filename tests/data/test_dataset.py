from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainvq.data import dataset
from brainvq.data.cache import default_cache_dir
from brainvq.data.dataset import SliceDataset, load_split, read_slice
from brainvq.data.layout import MASK_VALUES, SLICES_PER_CASE, SPLITS, mask_folder, split_folder
from brainvq.errors import DataError


def first_train_file(data_dir: Path) -> Path:
    return split_folder(data_dir, "train") / "case_001_slice_0.nii.png"


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path) -> np.ndarray:
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(dataset, "read_slice", fail)


def test_load_split_returns_the_images_exactly(oasis_dir: Path, tmp_path: Path, pixels) -> None:
    slices = load_split(oasis_dir, "train", cache_dir=tmp_path / "cache")
    assert isinstance(slices.images, np.memmap)
    assert slices.images.shape == (2 * SLICES_PER_CASE, 256, 256)
    assert slices.images.dtype == np.uint8
    assert not slices.images.flags.writeable
    assert slices.case_ids == ["001"] * SLICES_PER_CASE + ["002"] * SLICES_PER_CASE
    np.testing.assert_array_equal(slices.slice_indices, np.tile(np.arange(SLICES_PER_CASE), 2))
    assert slices.slice_indices.dtype == np.int64
    assert slices.files[0] == first_train_file(oasis_dir).resolve()
    assert slices.split == "train"
    assert slices.labels is None and slices.mask_files is None  # no mask folders: no masks
    for i in (0, 5, 40):
        case_number, slice_index = int(slices.case_ids[i]), int(slices.slice_indices[i])
        np.testing.assert_array_equal(slices.images[i], pixels(case_number, slice_index))


def test_masks_are_loaded_as_class_indices_paired_with_their_slices(
    oasis_with_masks: Path, tmp_path: Path, pixels, mask_values, monkeypatch: pytest.MonkeyPatch
) -> None:
    slices = load_split(oasis_with_masks, "train", cache_dir=tmp_path / "cache")
    assert isinstance(slices.labels, np.memmap) and not slices.labels.flags.writeable
    assert (slices.labels.shape, slices.labels.dtype) == ((2 * SLICES_PER_CASE, 256, 256), np.uint8)
    assert slices.mask_files[40] == (mask_folder(oasis_with_masks, "train") / "seg_002_slice_8.nii.png").resolve()
    for i in (0, 5, 40):
        case_number, slice_index = int(slices.case_ids[i]), int(slices.slice_indices[i])
        np.testing.assert_array_equal(slices.images[i], pixels(case_number, slice_index))
        np.testing.assert_array_equal(np.asarray(MASK_VALUES)[slices.labels[i]], mask_values(case_number, slice_index))
    forbid_decoding(monkeypatch)
    again = load_split(oasis_with_masks, "train", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.labels, slices.labels)


@pytest.mark.parametrize("problem", ["missing", "unpaired", "size", "values"])
def test_unusable_masks_are_errors_naming_the_file(
    oasis_with_masks: Path, tmp_path: Path, mask_values, problem: str
) -> None:
    folder = mask_folder(oasis_with_masks, "train")
    mask = folder / "seg_001_slice_3.nii.png"
    if problem == "missing":
        mask.unlink()
        named, message = first_train_file(oasis_with_masks).with_name("case_001_slice_3.nii.png"), "slice has no mask"
    elif problem == "unpaired":
        mask = folder / "seg_009_slice_0.nii.png"
        Image.fromarray(mask_values(1, 0)).save(mask)
        named, message = mask, "mask has no slice in"
    elif problem == "size":
        Image.new("L", (128, 256)).save(mask)
        named, message = mask, "image is 128x256, expected 256x256"
    else:
        bad = mask_values(1, 3)
        bad[0, :2] = [3, 86]
        Image.fromarray(bad).save(mask)
        named, message = mask, "mask holds values other than 0, 85, 170, 255 (3, 86)"
    with pytest.raises(DataError, match=f"^{re.escape(str(named))}: {re.escape(message)}") as error:
        load_split(oasis_with_masks, "train", cache_dir=tmp_path / "cache")
    assert "\n" not in str(error.value)
    load_split(oasis_with_masks, "validate", cache_dir=tmp_path / "cache")  # the other splits are unaffected


def test_a_second_load_reuses_the_cache_without_decoding(
    oasis_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_split(oasis_dir, "validate", cache_dir=tmp_path / "cache")
    forbid_decoding(monkeypatch)
    second = load_split(oasis_dir, "validate", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(second.images, first.images)
    assert sorted(path.suffix for path in (tmp_path / "cache").iterdir()) == [".json", ".uint8"]


def test_a_changed_file_invalidates_the_cache(oasis_dir: Path, tmp_path: Path) -> None:
    load_split(oasis_dir, "train", cache_dir=tmp_path / "cache")
    changed = first_train_file(oasis_dir)
    Image.fromarray(np.full((256, 256), 9, dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(0, 1))  # a distinct mtime even on a coarse-grained file system
    assert (load_split(oasis_dir, "train", cache_dir=tmp_path / "cache").images[0] == 9).all()


def test_a_file_rewritten_with_its_size_and_mtime_kept_invalidates_the_cache(
    oasis_dir: Path, tmp_path: Path, stored_png_writer
) -> None:
    changed = first_train_file(oasis_dir)
    before = np.zeros((256, 256), dtype=np.uint8)
    stored_png_writer(changed, before)
    assert (load_split(oasis_dir, "train", cache_dir=tmp_path / "cache").images[0] == 0).all()
    after = before.copy()
    after[100:150] = 200  # the middle rows only: the file's first and last bytes but its checksums are the same
    stored_png_writer(changed, after, in_place=True)
    np.testing.assert_array_equal(load_split(oasis_dir, "train", cache_dir=tmp_path / "cache").images[0], after)


def test_an_interrupted_decode_leaves_no_cache_that_looks_valid(
    oasis_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = []

    def decode_then_die(path: Path) -> np.ndarray:
        if len(decoded) == 3:
            raise KeyboardInterrupt
        decoded.append(path)
        return read_slice(path)

    monkeypatch.setattr(dataset, "read_slice", decode_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_split(oasis_dir, "test", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(dataset, "read_slice", read_slice)
    assert load_split(oasis_dir, "test", cache_dir=tmp_path / "cache").images.shape[0] == SLICES_PER_CASE


def test_the_cache_goes_to_brainvq_cache_dir(oasis_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRAINVQ_CACHE_DIR", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    load_split(oasis_dir, "test")
    assert len(list((tmp_path / "env-cache").glob("*.uint8"))) == 1
    monkeypatch.delenv("BRAINVQ_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "brainvq"


def test_a_generic_folder_is_split_by_whole_cases(tmp_path: Path, slices_writer) -> None:
    slices_writer(tmp_path / "images", [f"sub-{i}" for i in range(10)], n_slices=2)
    splits = {split: load_split(tmp_path / "images", split, cache_dir=tmp_path / "cache") for split in SPLITS}
    cases = {split: set(slices.case_ids) for split, slices in splits.items()}
    assert [len(cases[split]) for split in SPLITS] == [8, 1, 1]
    assert set().union(*cases.values()) == {f"sub-{i}" for i in range(10)}
    assert sum(len(slices.files) for slices in splits.values()) == 20


def test_a_generic_folder_with_too_few_cases_has_empty_splits(tmp_path: Path, slices_writer) -> None:
    slices_writer(tmp_path, ["only"], n_slices=2)
    with pytest.raises(DataError, match="no cases fall in the validate split"):
        load_split(tmp_path, "validate", cache_dir=tmp_path / "cache")


def test_colour_images_are_converted_to_grayscale(tmp_path: Path) -> None:
    gray = np.random.default_rng(0).integers(0, 256, size=(256, 256), dtype=np.uint8)
    path = tmp_path / "case_1_slice_0.png"
    Image.fromarray(np.stack([gray] * 3, axis=-1)).convert("RGBA").save(path)
    np.testing.assert_array_equal(read_slice(path), gray)


def test_16_bit_images_are_scaled_by_their_maximum(tmp_path: Path) -> None:
    values = np.zeros((256, 256), dtype=np.uint16)
    values[0, :3] = [1000, 500, 2]
    path = tmp_path / "case_1_slice_0.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    assert read_slice(path)[0, :4].tolist() == [255, 128, 1, 0]


def test_unusable_images_are_errors_naming_the_file(oasis_dir: Path, tmp_path: Path) -> None:
    path = first_train_file(oasis_dir)
    Image.new("L", (256, 128)).save(path)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: image is 256x128, expected 256x256"):
        load_split(oasis_dir, "train", cache_dir=tmp_path / "cache")
    path.write_bytes(b"")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: cannot decode"):
        load_split(oasis_dir, "train", cache_dir=tmp_path / "cache")


def test_slice_dataset_gives_unit_range_tensors_with_slice_indices(oasis_dir: Path, tmp_path: Path, pixels) -> None:
    data = SliceDataset(load_split(oasis_dir, "train", cache_dir=tmp_path / "cache"))
    assert len(data) == 2 * SLICES_PER_CASE
    image, slice_index = data[SLICES_PER_CASE + 7]
    assert (image.shape, image.dtype, slice_index) == ((1, 256, 256), torch.float32, 7)
    torch.testing.assert_close(image[0], torch.from_numpy(pixels(2, 7)).float() / 255)
    assert image.min() >= 0 and image.max() <= 1


def test_a_mirrored_slice_dataset_gives_each_image_and_label_map_mirrored_left_right(tiny_cohort: Path) -> None:
    slices = load_split(tiny_cohort, "train")
    image, slice_index, labels = SliceDataset(slices)[40]
    mirrored_image, mirrored_index, mirrored_labels = SliceDataset(slices, mirrored=True)[40]
    assert mirrored_index == slice_index == 8
    assert not torch.equal(mirrored_image, image)  # a demo slice is not exactly symmetric
    torch.testing.assert_close(mirrored_image, image.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(mirrored_labels, labels.flip(-1), rtol=0, atol=0)
