"""Bad input, hostile files and invalid options: one line naming the file and the problem, never a traceback.

Every mistake below ends with exit code 1 and a single stderr line ``brainvq: error: <file>: <problem>`` (or, for
option values argparse checks, exit code 2 and its usage message). The promise about output is: nothing is
left at the output path of a command that failed on its input. train-vqvae and train-prior read and check all
their input before they create the run folder; data from-volumes builds its folder under a hidden temporary
name and renames it into place only when complete; sample and evaluate load the run before writing anything.
So the same command can simply be run again once the input is fixed.

Audit list: each bad input and the tests that cover it.

Data folders and slice images (``data check`` reports every problem; the other commands stop at the first):

- missing data folder: tests/test_cli.py::test_user_mistakes_get_one_line_and_a_non_zero_exit,
  tests/data/test_check.py::test_a_missing_folder_is_a_problem_not_an_exception, and here
  test_train_vqvae_refuses_bad_data_and_leaves_no_run_folder[missing folder]
- empty data folder: tests/data/test_layout.py::test_split_files_explains_a_folder_without_slices, and here
  test_train_vqvae_refuses_bad_data_and_leaves_no_run_folder[empty folder]
- missing or empty split: tests/test_cli.py::test_data_check_exits_non_zero_naming_the_problem_file[empty split],
  tests/data/test_check.py::test_missing_and_empty_split_folders_are_reported,
  tests/data/test_layout.py::test_find_splits_needs_all_three_folders_or_none, and here
  test_train_vqvae_refuses_bad_data_and_leaves_no_run_folder[missing split, empty split]
- corrupt, truncated or zero-byte PNG: tests/test_cli.py::test_data_check_exits_non_zero_naming_the_problem_file
  [corrupt png], tests/data/test_check.py::test_each_damaged_file_is_reported_by_name,
  tests/data/test_dataset.py::test_unusable_images_are_errors_naming_the_file,
  tests/test_images.py::test_load_png_raises_data_error_for_unreadable_files, and here
  test_train_vqvae_refuses_bad_data_and_leaves_no_run_folder[truncated png, zero-byte png, text named .png]
- a non-image file among the slices (decision: skipped, as README's "Your own data" says; a file with an image
  suffix that does not decode is an error): tests/data/test_layout.py::
  test_list_slices_sorts_numerically_and_skips_non_images, and here test_files_that_are_not_images_are_skipped;
  a file of another format renamed .png is refused:
  tests/data/test_layout.py::test_read_image_refuses_formats_other_than_the_slice_suffixes
- RGB, RGBA, 16-bit PNGs (decision: converted; colour to grayscale, 16-bit scaled by the image's maximum, not
  clipped): tests/data/test_dataset.py::test_colour_images_are_converted_to_grayscale,
  tests/data/test_dataset.py::test_16_bit_images_are_scaled_by_their_maximum,
  tests/test_images.py::test_load_png_scales_16_bit_images_over_their_full_range, and here
  test_colour_and_16_bit_slices_are_converted_as_documented; ``data check`` still reports the mode
  (tests/data/test_check.py::test_each_damaged_file_is_reported_by_name)
- absurd image size in a PNG header (decompression bomb): test_a_png_claiming_huge_dimensions_is_refused_unread
- wrong image size: tests/test_cli.py::test_data_check_exits_non_zero_naming_the_problem_file[wrong size],
  tests/data/test_dataset.py::test_unusable_images_are_errors_naming_the_file, and here
  test_train_vqvae_refuses_bad_data_and_leaves_no_run_folder[wrong size]
- unparseable file name: tests/data/test_layout.py::test_parse_slice_name_rejects_other_names_naming_the_file,
  tests/data/test_check.py::test_each_damaged_file_is_reported_by_name, and here
  test_train_vqvae_refuses_bad_data_and_leaves_no_run_folder[unparseable name]
- a case in two splits: tests/test_cli.py::test_data_check_exits_non_zero_naming_the_problem_file
  [case in two splits], tests/data/test_check.py::test_a_case_in_two_splits_is_reported, and here
  test_train_vqvae_refuses_bad_data_and_leaves_no_run_folder[case in two splits]

Volumes (``data from-volumes``):

- NIfTI that is 2D, 4D, has NaN or inf, or zero intensity everywhere:
  tests/data/test_volumes.py::test_load_volume_rejects_unusable_volumes,
  tests/data/test_volumes.py::test_volumes_to_layout_writes_nothing_if_a_volume_is_bad, and here
  test_from_volumes_refuses_a_bad_volume_and_leaves_nothing (through the CLI) and
  test_from_volumes_in_a_subprocess_prints_one_line_and_no_traceback
- a header claiming an absurd number of voxels: test_a_volume_claiming_huge_dimensions_is_refused_unread
- a slice count or axial range out of bounds (--slices 0, --axial-range 0.9 0.1):
  tests/data/test_volumes.py::test_volumes_to_layout_refuses_bad_slicing_options, and here
  test_from_volumes_refuses_bad_slicing_options_before_reading
- tissue labels (``--labels``): a volume without a label volume, a label map naming an unknown class, a label
  map without labels: test_from_volumes_refuses_a_volume_without_labels_and_a_bad_label_map; a label volume off
  its image's voxel grid, unknown or fractional label values:
  tests/data/test_volumes.py::test_a_label_volume_off_the_image_grid_is_refused_naming_it,
  tests/data/test_volumes.py::test_a_json_label_map_maps_its_values_and_refuses_others
- a path with spaces and non-ASCII characters:
  tests/test_cli.py::test_data_from_volumes_writes_the_oasis_layout_and_check_accepts_it

Run folders and options:

- a run folder from a different model config (config.json edited, or a checkpoint of another run):
  test_a_checkpoint_that_does_not_fit_config_json_is_refused[evaluate, train-prior]
- a prior that does not fit the run's VQ-VAE: test_a_prior_of_another_vqvae_is_refused
- invalid option values (negative epochs, temperature 0 or negative, negative guidance, --slice -1, --n 0, seeds out of
  range):
  tests/test_cli.py::test_user_mistakes_get_one_line_and_a_non_zero_exit (negative epochs), and here
  test_invalid_option_values_are_usage_errors
- top-k above the codebook size, unknown slice position (--slice 40):
  tests/test_generation.py::test_cli_sample_rejects_invalid_values_with_one_line (--top-k 40),
  tests/test_generation.py::test_same_seed_same_samples_and_bad_options_are_refused, and here
  test_sample_options_that_need_the_run_are_checked_against_it
- --guidance other than 1 with a prior trained without position dropout, or without slice positions:
  tests/test_sampling.py::test_guided_samples_differ_from_plain_ones_and_guidance_needs_a_prior_trained_with_position_dropout

Hostile files:

- a pickle with a code-running payload where a checkpoint is expected (and as *.pt next to it):
  tests/test_checkpoint.py::test_a_pickle_with_a_payload_is_refused_and_never_runs, and here
  test_a_pickle_payload_in_the_run_folder_never_runs (in a subprocess, through evaluate, sample and --resume)
- safetensors with missing keys, wrong shapes, wrong dtypes, NaN:
  tests/test_checkpoint.py::test_module_state_refuses_missing_keys_wrong_shapes_dtypes_and_nan, and here
  test_a_tampered_checkpoint_is_refused_through_the_cli
- a tampered optimizer state (resume): test_a_tampered_optimizer_state_is_refused_on_resume
- a tampered config.json (wrong types, unknown keys, negative or absurd sizes, not JSON, a JSON list):
  tests/test_config.py (from_dict and load_json), and here test_a_tampered_config_json_is_refused_through_the_cli
- a tampered prior config.json (absurd sizes): test_a_tampered_prior_config_cannot_make_it_allocate_gigabytes
- a tampered training history in a checkpoint: test_a_tampered_training_history_is_refused_on_resume
- a damaged or pickled code-grid cache (RUN/codes): test_damaged_or_hostile_code_grid_caches_are_remade_never_loaded
- a damaged RUN/prior/eval_prior.json: test_a_damaged_prior_evaluation_record_is_refused_before_sampling
- mutated PNG, NIfTI, config and checkpoint bytes: tests/test_fuzz.py

And a run that failed before its first checkpoint can be started again with the same command:
test_a_run_that_failed_before_its_first_checkpoint_can_simply_be_started_again.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from brainvq.checkpoint import load_checkpoint, module_tensors, optimizer_tensors, save_checkpoint
from brainvq.cli import main
from brainvq.config import TrainConfig, VQVAEConfig
from brainvq.data.dataset import load_split
from brainvq.data.layout import MAX_IMAGE_PIXELS, SLICES_PER_CASE, split_folder, write_case
from brainvq.data.volumes import MAX_VOXELS
from brainvq.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from brainvq.models.vqvae import VQVAE
from brainvq.run import BEST_CHECKPOINT, LAST_CHECKPOINT, PRIOR_FOLDER, write_run_config

TRAIN_FAST = ["--batch-size", "8", "--quiet", "--max-minutes", "0", "--epochs", "1"]
SMALL_VQVAE = VQVAEConfig(downsample=8, channels=8, residual_channels=4, code_dim=4, codebook_size=8)
SMALL_PRIOR = PixelCNNConfig(codebook_size=8, grid_size=32, channels=8, layers=2)


def check_error_output(stderr: str, *named: str) -> None:
    """A failed command's stderr: progress bars at most, then one error line naming each of `named`."""
    lines = stderr.splitlines()
    assert lines and lines[-1].startswith("brainvq: error: ") and stderr.endswith("\n"), stderr
    assert "Traceback" not in stderr and all("brainvq:" not in line for line in lines[:-1]), stderr
    for text in named:
        assert text in lines[-1], stderr


def error_line(capsys: pytest.CaptureFixture[str], *named: str) -> None:
    check_error_output(capsys.readouterr().err, *named)


# --- data folders -------------------------------------------------------------------------------------------

def slice_pixels(case_number: int, slice_index: int) -> np.ndarray:
    ramp = np.add.outer(np.arange(256), 2 * np.arange(256))
    return ((ramp + 41 * case_number + 7 * slice_index) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def pristine_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2/1/1-case OASIS-layout folder; tests damage copies of it."""
    data_dir = tmp_path_factory.mktemp("bad-input") / "oasis"
    for split, cases in {"train": (1, 2), "validate": (3,), "test": (4,)}.items():
        split_folder(data_dir, split).mkdir(parents=True)
        for case in cases:
            write_case(split_folder(data_dir, split), case,
                       np.stack([slice_pixels(case, s) for s in range(SLICES_PER_CASE)]))
    return data_dir


@pytest.fixture
def data_dir(pristine_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine_data, tmp_path / "my data ü"))


def train_slice(data_dir: Path, case: int = 1, index: int = 0) -> Path:
    return split_folder(data_dir, "train") / f"case_{case:03d}_slice_{index}.nii.png"


def damage_data(data_dir: Path, damage: str) -> tuple[str, str]:
    """Spoil a copy of the data as `damage` says; returns what the error must name and the problem it states."""
    victim = train_slice(data_dir)
    if damage == "missing folder":
        shutil.rmtree(data_dir)
        return str(data_dir), "folder does not exist"
    if damage == "empty folder":
        for folder in data_dir.iterdir():
            shutil.rmtree(folder)
        return str(data_dir), "no keras_png_slices_{train,validate,test} folders and no <case>_slice_<S>.png"
    if damage == "missing split":
        shutil.rmtree(split_folder(data_dir, "validate"))
        return str(split_folder(data_dir, "validate")), "split folder does not exist"
    if damage == "empty split":
        for path in split_folder(data_dir, "validate").iterdir():
            path.unlink()
        return str(split_folder(data_dir, "validate")), "no slice images"
    if damage == "truncated png":
        victim.write_bytes(victim.read_bytes()[:300])
    elif damage == "zero-byte png":
        victim.write_bytes(b"")
    elif damage == "text named .png":
        victim.write_text("a note, not a slice")
    elif damage == "wrong size":
        Image.new("L", (256, 200)).save(victim)
        return str(victim), "image is 256x200, expected 256x256"
    elif damage == "unparseable name":
        victim.rename(victim.with_name("montage.png"))
        return str(victim.with_name("montage.png")), "cannot parse case and slice index"
    elif damage == "case in two splits":
        shutil.copy(train_slice(data_dir, 2, 5), split_folder(data_dir, "validate"))
        return str(train_slice(data_dir, 2, 0)), "case 002 is also in the validate split (case_002_slice_5.nii.png)"
    return str(victim), "cannot decode the image"


DAMAGES = ["missing folder", "empty folder", "missing split", "empty split", "truncated png", "zero-byte png",
           "text named .png", "wrong size", "unparseable name", "case in two splits"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_train_vqvae_refuses_bad_data_and_leaves_no_run_folder(data_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               damage: str) -> None:
    """Promise: the run folder is not created at all, so the same command works once the data is fixed."""
    named, problem = damage_data(data_dir, damage)
    run = tmp_path / "run"
    assert main(["train-vqvae", "--data", str(data_dir), "--out", str(run), *TRAIN_FAST]) == 1
    error_line(capsys, named, problem)
    assert not run.exists()


def test_files_that_are_not_images_are_skipped(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README.txt, .DS_Store, ._ files and subfolders among the slices are ignored, by check and by training."""
    folder = split_folder(data_dir, "train")
    (folder / "README.txt").write_text("notes")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._case_001_slice_0.nii.png").write_bytes(b"\0\5\26\7 resource fork")
    (folder / "thumbnails").mkdir()
    assert main(["data", "check", str(data_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "train: 64 slices from 2 cases, 256x256 L"
    assert len(load_split(data_dir, "train").files) == 2 * SLICES_PER_CASE


def test_colour_and_16_bit_slices_are_converted_as_documented(data_dir: Path) -> None:
    gray = slice_pixels(1, 0)
    rgb = np.stack([gray, gray, gray], axis=-1)
    Image.fromarray(rgb).save(train_slice(data_dir, 1, 0))
    Image.fromarray(rgb).convert("RGBA").save(train_slice(data_dir, 1, 1))
    full_range = (np.add.outer(np.arange(256), np.arange(256)) * (65535 / 510)).round().astype(np.uint16)
    Image.fromarray(full_range).save(train_slice(data_dir, 1, 2))
    with Image.open(train_slice(data_dir, 1, 2)) as stored:
        assert stored.mode == "I;16"
    images = load_split(data_dir, "train").images
    np.testing.assert_array_equal(images[0], gray)
    np.testing.assert_array_equal(images[1], gray)
    # 16-bit: 0..65535 maps onto 0..255 in proportion, so the ramp keeps every grey level, none clipped.
    scaled = images[2].astype(int)
    assert scaled[0, 0] == 0 and scaled[255, 255] == 255
    assert np.abs(scaled - full_range / 65535 * 255).max() < 0.51
    assert len(np.unique(scaled)) == 256


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit gray pixels, followed by a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize(("width", "height"), [(65535, 65535), (4097, 4096), (100_000, 200)])
def test_a_png_claiming_huge_dimensions_is_refused_unread(data_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], width: int,
                                                          height: int) -> None:
    """A 60-byte file cannot make brainvq allocate gigabytes: the header alone is enough to refuse it."""
    bomb = train_slice(data_dir)
    bomb.write_bytes(png_with_size(width, height))
    assert width * height > MAX_IMAGE_PIXELS
    assert main(["train-vqvae", "--data", str(data_dir), "--out", str(tmp_path / "run"), *TRAIN_FAST]) == 1
    error_line(capsys, str(bomb), "larger than this program reads")
    assert main(["data", "check", str(data_dir)]) == 1
    assert f"{bomb}: image is " in capsys.readouterr().err


# --- volumes ------------------------------------------------------------------------------------------------

def head(shape: tuple[int, ...] = (30, 34, 28)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape[:3]), indexing="ij"))
    return np.where((grid**2).sum(0) < 0.7, 100 + 40 * grid[2], 0).astype(np.float32)


def with_nan(data: np.ndarray) -> np.ndarray:
    data[3, 4, 5] = np.nan
    return data


def with_inf(data: np.ndarray) -> np.ndarray:
    data[3, 4, 5] = np.inf
    return data


BAD_VOLUMES: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    "2D": (lambda: head()[:, :, 10], "expected a 3D volume, got shape (30, 34)"),
    "4D": (lambda: np.stack([head(), head()], axis=-1), "expected a 3D volume, got shape (30, 34, 28, 2)"),
    "NaN": (lambda: with_nan(head()), "volume contains NaN or infinite values"),
    "inf": (lambda: with_inf(head()), "volume contains NaN or infinite values"),
    "all zero": (lambda: np.zeros((30, 34, 28), np.float32), "volume has constant intensity"),
}


def volume_folder(folder: Path, bad: np.ndarray | None = None) -> Path:
    """Three good subjects, plus `bad` as sub-9 if given."""
    folder.mkdir(parents=True)
    for subject in range(3):
        nib.save(nib.Nifti1Image(head(), np.eye(4)), folder / f"sub-{subject}.nii.gz")
    if bad is not None:
        nib.save(nib.Nifti1Image(bad, np.eye(4)), folder / "sub-9.nii.gz")
    return folder


@pytest.mark.parametrize("kind", sorted(BAD_VOLUMES))
def test_from_volumes_refuses_a_bad_volume_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              kind: str) -> None:
    """Promise: no output folder and no hidden half-built one; after removing the bad volume a retry works."""
    make, problem = BAD_VOLUMES[kind]
    source = volume_folder(tmp_path / "scans", make())
    out = tmp_path / "slices"
    assert main(["data", "from-volumes", str(source), "--out", str(out)]) == 1
    error_line(capsys, str(source / "sub-9.nii.gz"), problem)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scans"]
    (source / "sub-9.nii.gz").unlink()
    assert main(["data", "from-volumes", str(source), "--out", str(out)]) == 0
    assert (out / "cases.tsv").exists()


def test_from_volumes_in_a_subprocess_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    source = volume_folder(tmp_path / "scans", with_nan(head()))
    result = subprocess.run([sys.executable, "-m", "brainvq", "data", "from-volumes", str(source), "--out",
                             str(tmp_path / "slices")], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (1, "")
    check_error_output(result.stderr, f"{source / 'sub-9.nii.gz'}: volume contains NaN or infinite values")
    assert not (tmp_path / "slices").exists()


@pytest.mark.parametrize(("option", "problem"), [(["--slices", "0"], "the number of slices must be"),
                                               (["--axial-range", "0.9", "0.1"], "the axial range must be")])
def test_from_volumes_refuses_bad_slicing_options_before_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 option: list[str], problem: str) -> None:
    source = volume_folder(tmp_path / "scans", with_nan(head()))  # a bad volume, never read
    assert main(["data", "from-volumes", str(source), "--out", str(tmp_path / "slices"), *option]) == 1
    error_line(capsys, problem)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scans"]


def test_from_volumes_refuses_a_volume_without_labels_and_a_bad_label_map(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = volume_folder(tmp_path / "scans")
    labels = tmp_path / "labels"
    labels.mkdir()
    for subject in (0, 2):
        nib.save(nib.Nifti1Image((head() > 0).astype(np.int16) * 3, np.eye(4)), labels / f"sub-{subject}_seg.nii.gz")
    out = tmp_path / "slices"
    assert main(["data", "from-volumes", str(source), "--out", str(out), "--labels", str(labels)]) == 1
    error_line(capsys, str(source / "sub-1.nii.gz"), "has no label volume in")
    label_map = tmp_path / "map.json"
    label_map.write_text('{"3": "bone"}')
    assert main(["data", "from-volumes", str(source), "--out", str(out), "--labels", str(labels), "--label-map",
                 str(label_map)]) == 1
    error_line(capsys, str(label_map), "'bone' (for 3) is not one of background, csf, grey_matter, white_matter")
    assert main(["data", "from-volumes", str(source), "--out", str(out), "--label-map", "freesurfer"]) == 1
    error_line(capsys, "--labels")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["labels", "map.json", "scans"]


def test_a_volume_claiming_huge_dimensions_is_refused_unread(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """The header says 2000^3 float64 voxels (64 GB); the file holds a few bytes. Nothing is allocated."""
    source = volume_folder(tmp_path / "scans")
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.float64)
    huge = source / "sub-9.nii.gz"
    huge.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 64))
    assert MAX_VOXELS < 2000**3
    assert main(["data", "from-volumes", str(source), "--out", str(tmp_path / "slices")]) == 1
    error_line(capsys, str(huge), "(2000, 2000, 2000) has more than")


# --- run folders --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with an untrained small VQ-VAE and prior: enough for everything that loads a run."""
    run = tmp_path_factory.mktemp("bad-input-run") / "run"
    torch.manual_seed(0)
    vqvae, prior = VQVAE(SMALL_VQVAE), GatedPixelCNN(SMALL_PRIOR)
    for folder, model, config in ((run, vqvae, SMALL_VQVAE), (run / PRIOR_FOLDER, prior, SMALL_PRIOR)):
        write_run_config(folder, config, TrainConfig(batch_size=8))
        optimizer = torch.optim.AdamW(model.parameters())
        for param in model.parameters():  # one step, so that the optimizer has state to save
            param.grad = torch.ones_like(param)
        optimizer.step()
        weights = module_tensors(model, "model.")
        save_checkpoint(folder / BEST_CHECKPOINT, weights, {"epoch": 1, "step": 1, "val": {}})
        optim_tensors, optim_state = optimizer_tensors(optimizer)
        history = [{"epoch": 1, "step": 1, "val": {"ssim": 0.1, "nll_bits_per_code": 3.0}, "elapsed_seconds": 1.0}]
        save_checkpoint(folder / LAST_CHECKPOINT, weights | optim_tensors,
                        {"epoch": 1, "step": 1, "history": history, "optimizer": optim_state,
                         "elapsed_seconds": 1.0})
    return run


@pytest.fixture
def run(pristine_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine_run, tmp_path / "my run"))


def edit_config(folder: Path, edit: Callable[[dict], object]) -> None:
    values = json.loads((folder / "config.json").read_text())
    edit(values)
    (folder / "config.json").write_text(json.dumps(values))


@pytest.mark.parametrize("command", ["evaluate", "train-prior"])
@pytest.mark.parametrize("mismatch", ["config.json edited", "checkpoint of another run"])
def test_a_checkpoint_that_does_not_fit_config_json_is_refused(run: Path, data_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str], command: str,
                                                               mismatch: str) -> None:
    if mismatch == "config.json edited":
        edit_config(run, lambda values: values["model"].update(code_dim=6))
    else:
        other = VQVAE(dataclasses.replace(SMALL_VQVAE, channels=12))
        save_checkpoint(run / BEST_CHECKPOINT, module_tensors(other, "model."), {"epoch": 1})
    shutil.rmtree(run / PRIOR_FOLDER)
    arguments = {"evaluate": ["evaluate", str(run), "--data", str(data_dir)],
                 "train-prior": ["train-prior", str(run), "--data", str(data_dir), "--quiet"]}[command]
    assert main(arguments) == 1
    error_line(capsys, str(run / BEST_CHECKPOINT), "does not fit the model that config.json describes: tensor model.")
    assert sorted(path.name for path in run.iterdir()) == ["checkpoints", "config.json"]  # nothing written


def test_a_prior_of_another_vqvae_is_refused(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A prior over 16 codes next to a VQ-VAE of 8: its samples would index past the VQ-VAE's codebook."""
    edit_config(run / PRIOR_FOLDER, lambda values: values["model"].update(codebook_size=16))
    assert main(["sample", str(run), "--n", "1", "--out", str(tmp_path / "samples")]) == 1
    error_line(capsys, str(run / PRIOR_FOLDER / "config.json"), "codebook_size 16 differs from the VQ-VAE's 8")
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    (["train-vqvae", "--data", "d", "--out", "r", "--epochs", "-1"], "argument --epochs: must be a positive"),
    (["train-prior", "r", "--epochs", "0"], "argument --epochs: must be a positive integer"),
    (["sample", "r", "--out", "o", "--temperature", "0"], "argument --temperature: must be a positive finite"),
    (["sample", "r", "--out", "o", "--temperature", "-0.5"], "argument --temperature: must be a positive finite"),
    (["sample", "r", "--out", "o", "--temperature", "nan"], "argument --temperature: must be a positive finite"),
    (["sample", "r", "--out", "o", "--slice", "-1"], "argument --slice: must be >= 0"),
    (["sample", "r", "--out", "o", "--n", "0"], "argument --n: must be a positive integer"),
    (["sample", "r", "--out", "o", "--top-k", "0"], "argument --top-k: must be a positive integer"),
    (["sample", "r", "--out", "o", "--guidance", "-1"], "argument --guidance: must be"),
    (["sample", "r", "--out", "o", "--outline-temperature", "-1"], "argument --outline-temperature: must be"),
    (["sample", "r", "--out", "o", "--seed", "-1"], "argument --seed: must be in 0..4294967295"),
    (["data", "demo", "--out", "o", "--seed", str(2**64)], "argument --seed: must be in 0..4294967295"),
    (["evaluate-samples", "r", "--n", "many"], "argument --n: invalid sample_count value: 'many'"),
    (["sample", "r", "--out", "o", "--n", str(10**7)], "argument --n: must be at most 100000"),
    (["train-vqvae", "--data", "d", "--out", "r", "--max-minutes", "-3"], "argument --max-minutes: must be a"),
])
def test_invalid_option_values_are_usage_errors(capsys: pytest.CaptureFixture[str], arguments: list[str],
                                                message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(arguments)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_max_minutes_zero_means_no_limit_however_it_is_written(data_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    for zero in ("0", "0.0", "0e0", "00"):
        assert main(["train-vqvae", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "r"),
                     "--max-minutes", zero]) == 1  # parsed: the error is about the data, not the option
        error_line(capsys, "absent", "folder does not exist")


@pytest.mark.parametrize(("options", "message"), [
    (["--slice", "40"], "slice position must be in 0..31, not 40"),
    (["--top-k", "9"], "top_k must be in 1..8, not 9"),
])
def test_sample_options_that_need_the_run_are_checked_against_it(run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 options: list[str], message: str) -> None:
    assert main(["sample", str(run), "--out", str(tmp_path / "samples"), *options]) == 1
    error_line(capsys, message)
    assert not (tmp_path / "samples").exists()


# --- hostile files ------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates the file named by $PAYLOAD_MARK: proof that the pickle was loaded."""

    def __reduce__(self) -> tuple:
        return (exec, ("import os, pathlib; pathlib.Path(os.environ['PAYLOAD_MARK']).touch()",))


def test_a_pickle_payload_in_the_run_folder_never_runs(run: Path, data_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every checkpoint of the run, and *.pt/*.pth/*.ckpt files beside them, hold a code-running pickle."""
    mark = tmp_path / "payload ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    hostile = pickle.dumps({"model.weight": Payload()})
    for folder in (run / "checkpoints", run / PRIOR_FOLDER / "checkpoints"):
        for name in ("best.safetensors", "last.safetensors", "best.pt", "last.pt", "model.pth", "model.ckpt"):
            (folder / name).write_bytes(hostile)

    result = subprocess.run([sys.executable, "-m", "brainvq", "evaluate", str(run), "--data", str(data_dir)],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (1, "")
    check_error_output(result.stderr, f"{run / BEST_CHECKPOINT}: not a valid safetensors checkpoint")
    for arguments in (["sample", str(run), "--n", "1", "--out", str(tmp_path / "samples")],
                      ["train-vqvae", "--data", str(data_dir), "--out", str(run), "--resume", "--quiet"],
                      ["train-prior", str(run), "--data", str(data_dir), "--resume", "--quiet"]):
        assert main(arguments) == 1
        error_line(capsys, "checkpoints", "not a valid safetensors checkpoint")
    assert not mark.exists()
    pickle.loads(hostile)  # the payload is real: unpickling it would have left the mark
    assert mark.exists()


def rewrite_checkpoint(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors, metadata = load_checkpoint(path)
    change(tensors)
    save_checkpoint(path, tensors, metadata)


CHECKPOINT_DAMAGES: dict[str, tuple[Callable[[dict[str, torch.Tensor]], object], str]] = {
    "missing key": (lambda t: t.pop("model.quantizer.codebook"), "missing ['quantizer.codebook']"),
    "unexpected key": (lambda t: t.update({"model.extra": torch.zeros(1)}), "unexpected ['extra']"),
    "wrong shape": (lambda t: t.update({"model.quantizer.codebook": torch.zeros(8, 5)}),
                    "tensor model.quantizer.codebook is (8, 5) torch.float32, the model needs (8, 4)"),
    "wrong dtype": (lambda t: t.update({"model.quantizer.codebook": torch.zeros(8, 4, dtype=torch.float16)}),
                    "tensor model.quantizer.codebook is (8, 4) torch.float16, the model needs (8, 4) torch.float32"),
    "NaN": (lambda t: t["model.quantizer.codebook"].fill_(float("nan")),
            "tensor model.quantizer.codebook holds NaN or infinite values"),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGES))
def test_a_tampered_checkpoint_is_refused_through_the_cli(run: Path, data_dir: Path,
                                                          capsys: pytest.CaptureFixture[str], damage: str) -> None:
    change, problem = CHECKPOINT_DAMAGES[damage]
    rewrite_checkpoint(run / BEST_CHECKPOINT, change)
    assert main(["evaluate", str(run), "--data", str(data_dir)]) == 1
    error_line(capsys, str(run / BEST_CHECKPOINT), problem)
    assert not (run / "eval_test.json").exists()


def reshape_first_exp_avg(tensors: dict[str, torch.Tensor]) -> None:
    name = next(name for name in tensors if name.endswith(".exp_avg"))
    tensors[name] = torch.zeros(3, 3)


@pytest.mark.parametrize(("change", "problem"), [
    (reshape_first_exp_avg, "optimizer state exp_avg is neither a float scalar nor shaped like its parameter"),
    (lambda t: t[next(name for name in t if name.endswith(".exp_avg_sq"))].fill_(float("inf")),
     "optimizer state exp_avg_sq holds NaN or infinite values"),
    (lambda t: t.pop(next(name for name in t if name.endswith(".exp_avg_sq"))),
     "optimizer state is incomplete"),
    (lambda t: t.update({"optim.x": torch.zeros(1)}), "optimizer state does not fit this model"),
])
def test_a_tampered_optimizer_state_is_refused_on_resume(run: Path, data_dir: Path,
                                                         capsys: pytest.CaptureFixture[str], change: Callable,
                                                         problem: str) -> None:
    rewrite_checkpoint(run / LAST_CHECKPOINT, change)
    before = (run / LAST_CHECKPOINT).read_bytes()
    assert main(["train-vqvae", "--data", str(data_dir), "--out", str(run), "--resume", *TRAIN_FAST[:2]]) == 1
    error_line(capsys, str(run / LAST_CHECKPOINT), problem)
    assert (run / LAST_CHECKPOINT).read_bytes() == before


def edited(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """A damage that reads config.json, applies `change` to the values and writes them back."""
    def damage(path: Path) -> None:
        values = json.loads(path.read_text())
        change(values)
        path.write_text(json.dumps(values))
    return damage


def set_model(key: str, value: object) -> Callable[[Path], None]:
    return edited(lambda values: values["model"].__setitem__(key, value))


CONFIG_DAMAGES: dict[str, tuple[Callable[[Path], object], str]] = {
    "not JSON": (lambda path: path.write_text("{'model': {}}"), "not valid JSON"),
    "not UTF-8": (lambda path: path.write_bytes(b"\xff\xfe{}"), "not valid JSON"),
    "a JSON list": (lambda path: path.write_text("[1, 2]"), "expected a JSON object"),
    "deeply nested": (lambda path: path.write_text("[" * 100_000), "not valid JSON"),
    "wrong type": (set_model("code_dim", "4"), "code_dim = '4' is not of type"),
    "bool for int": (set_model("channels", True), "channels = True is not of type"),
    "NaN": (set_model("beta", float("nan")), "beta = nan is not of type"),
    "unknown key": (set_model("colour", 1), "unknown key(s) colour for VQVAEConfig"),
    "unknown section": (edited(lambda values: values.update(extra={})), "unknown section(s) extra"),
    "missing section": (edited(lambda values: values.pop("train")), "missing section(s) train"),
    "negative size": (set_model("code_dim", -4), "code_dim must be >= 1"),
    "absurd size": (set_model("channels", 10**9), "channels must be <= 512"),
    "a section that is a list": (edited(lambda values: values.update(model=[1])),
                                 "expected a JSON object for VQVAEConfig"),
    "negative seed": (edited(lambda values: values["train"].update(seed=-1)), "seed must be in 0..4294967295"),
}


def test_a_tampered_prior_config_cannot_make_it_allocate_gigabytes(run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    edit_config(run / PRIOR_FOLDER, lambda values: values["model"].update(channels=100_000))
    assert main(["sample", str(run), "--n", "1", "--out", str(tmp_path / "samples")]) == 1
    error_line(capsys, str(run / PRIOR_FOLDER / "config.json"), "channels = 100000 is invalid (must be in 1..1024)")


@pytest.mark.parametrize("history", [5, [5], [{"epoch": "1", "val": {}}], None])
def test_a_tampered_training_history_is_refused_on_resume(run: Path, data_dir: Path,
                                                          capsys: pytest.CaptureFixture[str], history) -> None:
    tensors, metadata = load_checkpoint(run / LAST_CHECKPOINT)
    save_checkpoint(run / LAST_CHECKPOINT, tensors, metadata | {"history": history})
    assert main(["train-vqvae", "--data", str(data_dir), "--out", str(run), "--resume", *TRAIN_FAST[:2]]) == 1
    error_line(capsys, str(run / LAST_CHECKPOINT), "checkpoint header lacks the training state")


def test_damaged_or_hostile_code_grid_caches_are_remade_never_loaded(run: Path, data_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """RUN/codes is a cache: a damaged index, a pickled .npy or grids of the wrong shape are remade."""
    mark = tmp_path / "payload ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    shutil.rmtree(run / PRIOR_FOLDER)
    prior = ["train-prior", str(run), "--data", str(data_dir), "--max-steps", "1", *TRAIN_FAST, "--channels", "8",
             "--layers", "2"]
    assert main(prior) == 0
    index = json.loads((run / "codes" / "train.json").read_text())
    expected = np.load(run / "codes" / "train.npy")
    (run / "codes" / "train.json").write_bytes(b"{not json")
    (run / "codes" / "validate.npy").write_bytes(pickle.dumps(Payload()))
    np.save(run / "codes" / "test.npy", np.zeros((3, 3), dtype=np.uint8))  # a valid .npy of the wrong shape
    shutil.rmtree(run / PRIOR_FOLDER)
    assert main(prior) == 0
    assert json.loads((run / "codes" / "train.json").read_text()) == index
    assert np.array_equal(np.load(run / "codes" / "train.npy"), expected)
    assert all(np.load(run / "codes" / f"{split}.npy").dtype == np.uint8 for split in ("validate", "test"))
    assert not mark.exists()


def test_a_run_that_failed_before_its_first_checkpoint_can_simply_be_started_again(data_dir: Path, tmp_path: Path,
                                                                                  capsys) -> None:
    out = tmp_path / "run"
    arguments = ["train-vqvae", "--data", str(data_dir), "--out", str(out), "--quiet", "--max-steps", "1"]
    assert main([*arguments, "--batch-size", "1000"]) == 1  # larger than the training set
    error_line(capsys, "batch_size 1000 is larger than the training set")
    assert main([*arguments, "--batch-size", "8"]) == 0
    assert (out / LAST_CHECKPOINT).is_file()


@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGES))
def test_a_tampered_config_json_is_refused_through_the_cli(run: Path, data_dir: Path,
                                                           capsys: pytest.CaptureFixture[str], damage: str) -> None:
    change, problem = CONFIG_DAMAGES[damage]
    change(run / "config.json")
    assert main(["evaluate", str(run), "--data", str(data_dir)]) == 1
    error_line(capsys, str(run / "config.json"), problem)
    assert not (run / "eval_test.json").exists()


@pytest.mark.parametrize(("record", "problem"), [('{"test_nll_bits_per_code": "low"}', "test_nll_bits_per_code"),
                                                ("{}", "test_nll_bits_per_code"), ("[]", "expected a JSON object")])
def test_a_damaged_prior_evaluation_record_is_refused_before_sampling(run: Path, data_dir: Path,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      record: str, problem: str) -> None:
    (run / PRIOR_FOLDER / "eval_prior.json").write_text(record)
    assert main(["evaluate-samples", str(run), "--data", str(data_dir), "--n", "2"]) == 1
    error_line(capsys, str(run / PRIOR_FOLDER / "eval_prior.json"), problem)
    assert not (run / "eval_samples.json").exists()
