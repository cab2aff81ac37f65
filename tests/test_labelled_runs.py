"""Slices with tissue masks end to end: a joint VQ-VAE (models/vqvae.py) trained on a folder of OASIS-named slices
and masks written by the tests, its Dice, reconstructed and generated label maps, and bad masks refused."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainvq import api
from brainvq.cli import main
from brainvq.config import TrainConfig, VQVAEConfig
from brainvq.data.dataset import load_split
from brainvq.data.layout import MASK_VALUES, mask_folder, split_folder
from brainvq.errors import DataError
from brainvq.images import load_png
from brainvq.models.pixelcnn import PixelCNNConfig
from brainvq.report import write_report
from brainvq.run import read_run_config

QUICK = {"max_minutes": None, "batch_size": 8, "seed": 1}
SMALL_JOINT = VQVAEConfig(downsample=8, channels=32, code_dim=16, label_classes=4)
TILE_STEP = 258  # a 256-pixel tile and the 2-pixel gap of saved grids


@pytest.fixture
def joint_run(oasis_with_masks, tmp_path):
    run = tmp_path / "run"
    api.train_vqvae(oasis_with_masks, run, model_config=SMALL_JOINT, train_config=TrainConfig(epochs=1, **QUICK),
                    progress=False)
    return run


def test_the_default_vqvae_is_joint_where_the_slices_have_masks(pristine_oasis, oasis_with_masks):
    assert api.default_vqvae_config(pristine_oasis).label_classes == 0
    assert api.default_vqvae_config(oasis_with_masks).label_classes == len(MASK_VALUES)
    assert api.default_vqvae_config(oasis_with_masks, labels=False).label_classes == 0
    assert api.default_vqvae_config(oasis_with_masks, code_dim=16).code_dim == 16


def test_a_folder_of_oasis_slices_and_masks_trains_end_to_end(joint_run, oasis_with_masks, tmp_path):
    assert read_run_config(joint_run)[0].label_classes == 4
    history = [json.loads(line) for line in (joint_run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train"]["labels"] > 0  # the cross-entropy term was trained and logged
    results = api.evaluate(joint_run)
    for name in ("dice_csf", "dice_grey_matter", "dice_white_matter", "dice_mean"):
        assert 0 <= results[name] <= 1
    # originals, reconstructions, true masks, decoded label maps
    grid = load_png(joint_run / "recon_test.png")
    assert grid.shape[0] == 4 * TILE_STEP - 2
    first_true_mask = grid[2 * TILE_STEP:2 * TILE_STEP + 256, :256]
    assert set(np.unique(first_true_mask)) <= {*MASK_VALUES}

    out = tmp_path / "reconstructed"
    assert api.reconstruct(joint_run, out) == 32
    masks = sorted(out.glob("seg_*.png"))
    assert len(masks) == 32 and len(list(out.glob("case_*.png"))) == 32
    assert masks[0].name == "seg_004_slice_0.nii.png"
    assert set(np.unique(load_png(masks[0]))) <= {*MASK_VALUES}


def test_a_joint_runs_samples_come_with_label_maps(joint_run, tmp_path):
    api.train_prior(joint_run, prior_config=PixelCNNConfig(codebook_size=32, channels=16, layers=2, grid_size=32),
                    train_config=TrainConfig(epochs=1, **QUICK), progress=False)
    made = api.sample(joint_run, 2, tmp_path / "samples", seed=0, slice_position=5)
    assert made["labelled"]
    for file in map(Path, made["files"]):
        label_map = load_png(file.with_name(file.stem + "_seg.png"))
        assert label_map.shape == (256, 256) and set(np.unique(label_map)) <= {*MASK_VALUES}
    generated = api.generate(joint_run, 2, seed=0, slice_position=5)
    assert generated.labels.shape == (2, 256, 256)
    saved = np.stack([load_png(Path(file).with_name(Path(file).stem + "_seg.png")) for file in made["files"]])
    assert np.array_equal(saved, np.asarray(MASK_VALUES)[generated.labels.numpy()])


def test_an_image_only_run_on_slices_with_masks_ignores_them(oasis_with_masks, tmp_path, capsys):
    run = tmp_path / "plain"
    assert main(["train-vqvae", "--data", str(oasis_with_masks), "--out", str(run), "--no-labels", "--epochs", "1",
                 "--batch-size", "8", "--max-minutes", "0", "--downsample", "8", "--code-dim", "16", "--quiet"]) == 0
    assert read_run_config(run)[0].label_classes == 0
    results = api.evaluate(run)
    assert "dice_mean" not in results
    assert load_png(run / "recon_test.png").shape[0] == 2 * TILE_STEP - 2
    # A run made before joint models and the SSIM term existed has none of their fields in its config.json: it
    # loads as the image-only, squared-error-only model it was trained as.
    config = json.loads((run / "config.json").read_text())
    del config["model"]["label_classes"], config["model"]["label_weight"], config["model"]["ssim_weight"]
    (run / "config.json").write_text(json.dumps(config))
    assert read_run_config(run)[0].ssim_weight == 0
    assert api.evaluate(run)["ssim"] == results["ssim"]


def test_a_joint_run_refuses_slices_without_masks_in_one_line(joint_run, pristine_oasis, capsys):
    assert main(["evaluate", str(joint_run), "--data", str(pristine_oasis)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(pristine_oasis) in error and "keras_png_slices_seg_test" in error


def _wrong_size(folder: Path) -> tuple[Path, str]:
    path = folder / "seg_001_slice_3.nii.png"
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(path)
    return path, "256x256"


def _unknown_values(folder: Path) -> tuple[Path, str]:
    path = folder / "seg_002_slice_7.nii.png"
    pixels = load_png(path).copy()
    pixels[10, 10] = 100
    Image.fromarray(pixels).save(path)
    return path, "values other than 0, 85, 170, 255 (100)"


def _missing_partner(folder: Path) -> tuple[Path, str]:
    path = folder / "seg_001_slice_0.nii.png"
    path.unlink()
    return split_folder(folder.parent, "train") / "case_001_slice_0.nii.png", "slice has no mask"


@pytest.mark.parametrize("damage", [_wrong_size, _unknown_values, _missing_partner])
def test_bad_masks_stop_training_with_one_line_naming_the_file(oasis_with_masks, tmp_path, capsys, damage):
    named, problem = damage(mask_folder(oasis_with_masks, "train"))
    run = tmp_path / "run"
    assert main(["train-vqvae", "--data", str(oasis_with_masks), "--out", str(run), "--epochs", "1"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert str(named) in error and problem in error, error
    assert not run.exists()  # refused before anything was written


def test_load_split_refuses_a_bad_mask_naming_it(oasis_with_masks):
    named, _ = _unknown_values(mask_folder(oasis_with_masks, "train"))
    with pytest.raises(DataError) as caught:
        load_split(oasis_with_masks, "train")
    assert caught.value.path == named


def test_evaluate_samples_of_a_joint_run_checks_its_pairs_and_the_report_shows_them(joint_run):
    # After one epoch this joint VQ-VAE decodes nearly every code to a background label map, so whether any
    # sample has a tissue pixel (and an agreement that is a number, not None) rests on the prior's exact steps:
    # these are the steps this test was written with, on the training grids alone.
    api.train_prior(joint_run, prior_config=PixelCNNConfig(codebook_size=32, channels=16, layers=2, grid_size=32),
                    train_config=TrainConfig(epochs=1, mirror=False, **QUICK), progress=False)
    api.evaluate(joint_run)
    results = api.evaluate_samples(joint_run, n=32, progress=False)
    agreement = results["label_agreement"]
    assert set(agreement) == {"samples", "real_test", "reconstructed_test", "ranges"}
    # The real test pairs come from the same (synthetic) tissue distribution as the training pairs that set the
    # ranges, so about the ranges' 90% of their tissue pixels fall inside.
    assert 0.8 < agreement["real_test"]["all"] <= 1
    assert 0 <= agreement["samples"]["all"] <= 1
    # real slices and masks above generated slices and label maps, 8 positions spread over 0..31
    pairs = load_png(joint_run / "sample_pairs.png")
    assert pairs.shape == (4 * TILE_STEP - 2, 8 * TILE_STEP - 2)
    test = load_split(Path(read_run_config(joint_run)[1].data_dir), "test")
    assert np.array_equal(pairs[:256, :256], test.images[0])
    assert np.array_equal(pairs[TILE_STEP:TILE_STEP + 256, :256], np.asarray(MASK_VALUES, np.uint8)[test.labels[0]])
    page = write_report(joint_run).read_text()
    assert "generated label maps" in page and "mean Dice" in page and "intensity range" in page
