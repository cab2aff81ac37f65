"""benchmarks/segmentation_transfer.py's pieces on a tiny synthetic labelled set, in seconds: the generated-pairs
reader and its errors, the batches of the union arm, and the three arms' equal budgets and learning."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainvq.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks import `common`
import segmentation_transfer as transfer

CPU = torch.device("cpu")


def banded_pairs(count: int, seed: int) -> transfer.Pairs:
    """Slices of smooth random blobs whose label is a known function of the pixel value: 0 below 40, then CSF,
    grey and white matter in bands (the way T1 intensity roughly separates tissues)."""
    random = np.random.default_rng(seed)
    rows, cols = np.mgrid[:64, :64] / 64
    images = []
    for _ in range(count):
        field = np.zeros((64, 64))
        for _ in range(4):
            centre, spread = random.random(2), 0.1 + 0.2 * random.random()
            field += random.random() * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / spread**2)
        images.append((255 * field / field.max()).astype(np.uint8))
    images = np.stack(images)
    labels = np.digitize(images, [40, 100, 170]).astype(np.uint8)
    return transfer.Pairs(images, labels)


def small_settings(**changes) -> transfer.Settings:
    return transfer.Settings(**{"steps": 3, "batch_size": 4, "crop": 32, "width": 4, "levels": 3} | changes)


def test_written_pairs_read_back(tmp_path):
    pairs = banded_pairs(3, seed=0)
    pairs = transfer.Pairs(np.pad(pairs.images, ((0, 0), (96, 96), (96, 96))),
                           np.pad(pairs.labels, ((0, 0), (96, 96), (96, 96))))  # 256x256, as read_slice wants
    transfer.write_pairs(pairs, tmp_path)
    (tmp_path / "notes.txt").write_text("not a sample")  # other files are ignored
    read = transfer.read_generated(tmp_path)
    assert np.array_equal(read.images, pairs.images) and np.array_equal(read.labels, pairs.labels)
    assert len(transfer.read_generated(tmp_path, limit=2)) == 2


def test_a_slice_without_its_label_map_is_an_error_naming_it(tmp_path):
    transfer.write_pairs(banded_pairs(2, seed=0), tmp_path)
    (tmp_path / "sample_0001_slice_1_seg.png").unlink()
    with pytest.raises(DataError, match=r"sample_0001_slice_1\.png: slice has no label map"):
        transfer.generated_files(tmp_path)


def test_a_label_map_without_its_slice_is_an_error_naming_it(tmp_path):
    transfer.write_pairs(banded_pairs(2, seed=0), tmp_path)
    (tmp_path / "sample_0000_slice_0.png").unlink()
    with pytest.raises(DataError, match=r"sample_0000_slice_0_seg\.png: label map has no slice"):
        transfer.generated_files(tmp_path)


def test_a_label_map_with_other_values_is_an_error_naming_it(tmp_path):
    image = np.zeros((256, 256), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "sample_0000_slice_3.png")
    Image.fromarray(image + 100).save(tmp_path / "sample_0000_slice_3_seg.png")
    with pytest.raises(DataError, match=r"sample_0000_slice_3_seg\.png: mask holds values other than"):
        transfer.read_generated(tmp_path)


def test_an_empty_samples_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no generated pairs"):
        transfer.generated_files(tmp_path)


def test_union_batches_mix_both_sources_and_crops_cover_the_brain():
    real, generated = banded_pairs(5, seed=1), banded_pairs(3, seed=2)
    stream = transfer.BatchStream([real, generated], small_settings(batch_size=5, crop=16))
    for _ in range(4):
        images, labels, origins = stream.next()
        assert images.shape == (5, 1, 16, 16) and labels.shape == (5, 16, 16)
        assert sorted(origins) == [0, 0, 0, 1, 1]
        assert images.min() >= 0 and images.max() <= 1
        assert (images > 0).float().mean() > 0.5  # placed over the brain, not in the background


def test_the_three_arms_have_the_same_budget_and_start_from_the_same_weights():
    real, generated, test = banded_pairs(4, seed=3), banded_pairs(6, seed=4), banded_pairs(2, seed=5)
    settings = small_settings()
    results = transfer.run_arms(real, generated, test, settings, CPU)
    assert list(results) == list(transfer.ARMS)
    assert [results[arm]["pairs"] for arm in transfer.ARMS] == [4, 6, 10]
    for arm in transfer.ARMS:
        record = results[arm]["train"]
        assert record["steps"] == settings.steps
        assert sum(record["pairs_seen_per_source"]) == settings.steps * settings.batch_size
        assert record["final_learning_rate"] == pytest.approx(0, abs=1e-9)  # the whole schedule ran
    assert results["real+generated"]["train"]["pairs_seen_per_source"] == [6, 6]
    # Everything random is seeded: the same arm trained again takes the same steps from the same weights.
    _, again = transfer.train([real, generated], settings, CPU)
    assert again["first_loss"] == results["real+generated"]["train"]["first_loss"]
    assert again["last_losses"] == results["real+generated"]["train"]["last_losses"]
    assert set(transfer.ratios(results)) == {"generated/real", "real+generated/real"}


def test_training_learns_labels_that_are_a_function_of_the_image():
    train, test = banded_pairs(16, seed=6), banded_pairs(4, seed=7)
    settings = small_settings(steps=60, batch_size=8, crop=32, width=8, learning_rate=1e-2)
    model, record = transfer.train([train], settings, CPU)
    dice = transfer.score(model, test, CPU)
    assert record["last_losses"][-1] < record["first_loss"] / 2
    assert dice["dice_mean"] > 0.8, dice
