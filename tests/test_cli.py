import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from brainvq import api
from brainvq.cli import build_parser, main
from brainvq.config import (
    PRIOR_BATCH_SIZE,
    PRIOR_MIRROR,
    PRIOR_OUTLINE_MODES,
    PRIOR_WARPED_COPIES,
    VQVAE_BATCH_SIZE,
    VQVAE_MIRROR,
)
from brainvq.errors import CheckpointError

TRAIN_FAST = ["--batch-size", "8", "--quiet", "--max-minutes", "0"]


def subcommand_paths(parser, prefix=()):
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, child in action.choices.items():
            yield (*prefix, name)
            yield from subcommand_paths(child, (*prefix, name))


def test_help_works_for_the_program_and_every_subcommand(capsys):
    paths = list(subcommand_paths(build_parser()))
    assert {("data", "demo"), ("data", "check"), ("data", "from-volumes"), ("train-vqvae",), ("evaluate",),
            ("reconstruct",), ("train-prior",), ("sample",), ("evaluate-samples",), ("report",),
            ("demo",), ("cache",), ("cache", "list"), ("cache", "clear")} <= set(paths)
    for path in [(), *paths]:
        with pytest.raises(SystemExit) as exited:
            main([*path, "--help"])
        assert exited.value.code == 0
        assert "usage: brainvq" in capsys.readouterr().out


def test_train_evaluate_reconstruct_end_to_end(tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["data", "check", str(tiny_cohort)]) == 0
    assert main(["train-vqvae", "--data", str(tiny_cohort), "--out", str(run), "--epochs", "2", *TRAIN_FAST]) == 0
    assert {"config.json", "metrics.jsonl", "checkpoints"} <= {p.name for p in run.iterdir()}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(tiny_cohort)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval_test.json").read_text())
    assert printed == saved
    assert {"ssim", "ssim_brain", "psnr", "codebook_used", "perplexity", "n_images"} <= set(saved)
    assert saved["n_images"] == 32 and 0 < saved["ssim"] <= 1 and 1 <= saved["codebook_used"] <= 32
    assert (run / "recon_test.png").stat().st_size > 0

    out = tmp_path / "recon"
    assert main(["reconstruct", str(run), "--data", str(tiny_cohort), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    originals = sorted(p.name for p in (tiny_cohort / "keras_png_slices_test").iterdir())
    masks = sorted(p.name for p in (tiny_cohort / "keras_png_slices_seg_test").iterdir())
    # The demo cohort has masks, so the run is joint: each decoded label map is written under its mask's name.
    assert written == sorted(originals + masks)


def test_evaluate_and_reconstruct_default_to_the_runs_data_and_take_either_checkpoint(tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train-vqvae", "--data", str(tiny_cohort), "--out", str(run), "--epochs", "1", *TRAIN_FAST]) == 0
    for checkpoint in ("best", "last"):
        capsys.readouterr()
        assert main(["evaluate", str(run), "--split", "validate", "--checkpoint", checkpoint]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["data_dir"] == str(tiny_cohort.resolve()) and printed["checkpoint"] == checkpoint
    assert main(["reconstruct", str(run), "--out", str(tmp_path / "recon"), "--checkpoint", "last"]) == 0
    slices = len(list((tiny_cohort / "keras_png_slices_test").iterdir()))
    assert len(list((tmp_path / "recon").glob("case_*"))) == slices


def test_user_mistakes_get_one_line_and_a_non_zero_exit(tiny_cohort, tmp_path, capsys):
    missing = tmp_path / "no such data"
    assert main(["train-vqvae", "--data", str(missing), "--out", str(tmp_path / "r"), *TRAIN_FAST]) == 1
    error = capsys.readouterr().err
    assert error.startswith("brainvq: error: ") and str(missing) in error and error.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing half-made

    assert main(["evaluate", str(tmp_path), "--data", str(tiny_cohort)]) == 1
    assert "config.json" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exited:
        main(["train-vqvae", "--data", str(tiny_cohort), "--out", str(tmp_path / "r"), "--epochs", "-1"])
    assert exited.value.code == 2


def test_a_new_run_refuses_to_overwrite_an_existing_one(tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    arguments = ["train-vqvae", "--data", str(tiny_cohort), "--out", str(run), "--max-steps", "1", *TRAIN_FAST]
    assert main(arguments) == 0
    before = (run / "checkpoints" / "last.safetensors").read_bytes()
    assert main(arguments) == 1
    assert "--resume" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == before


def test_each_model_gets_its_default_batch_size_and_mirroring_and_the_prior_an_outline_model(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    quick = ["--max-steps", "1", "--quiet", "--max-minutes", "0"]
    assert main(["train-vqvae", "--data", str(tiny_cohort), "--out", str(run), "--downsample", "8", *quick]) == 0
    assert main(["train-prior", str(run), "--channels", "8", "--layers", "2", *quick]) == 0
    settings = [json.loads((folder / "config.json").read_text())["train"] for folder in (run, run / "prior")]
    assert [train["batch_size"] for train in settings] == [VQVAE_BATCH_SIZE, PRIOR_BATCH_SIZE]
    assert [train["mirror"] for train in settings] == [VQVAE_MIRROR, PRIOR_MIRROR]
    assert [train["warped_copies"] for train in settings] == [0, PRIOR_WARPED_COPIES]
    model = json.loads((run / "prior" / "config.json").read_text())["model"]
    assert model["outline_modes"] == PRIOR_OUTLINE_MODES and model["outline_frame"] and model["outline_background"]
    shutil.rmtree(run / "prior")
    assert main(["train-prior", str(run), "--channels", "8", "--layers", "2", "--outline-modes", "0",
                 "--no-outline-frame", "--no-outline-background", *quick]) == 0
    model = json.loads((run / "prior" / "config.json").read_text())["model"]
    assert model["outline_modes"] == 0 and not model["outline_frame"] and not model["outline_background"]


def test_mirror_doubles_the_vqvae_training_slices_and_a_resume_may_not_change_it(tiny_cohort, tmp_path, capsys):
    steps = {}
    for mirror in ("--mirror", "--no-mirror"):
        run = tmp_path / mirror
        arguments = ["train-vqvae", "--data", str(tiny_cohort), "--out", str(run), "--downsample", "8", *TRAIN_FAST]
        assert main([*arguments, mirror, "--epochs", "1"]) == 0
        steps[mirror] = json.loads((run / "metrics.jsonl").read_text())["step"]
    assert steps == {"--mirror": 2 * 64 // 8, "--no-mirror": 64 // 8}  # 64 training slices (and mirrors), 8 a step
    capsys.readouterr()
    assert main([*arguments, "--mirror", "--epochs", "2", "--resume"]) == 1
    assert "mirror" in capsys.readouterr().err


def test_warped_copies_add_their_slices_to_a_vqvae_epoch_and_out_of_range_counts_are_refused(
        tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    arguments = ["train-vqvae", "--data", str(tiny_cohort), "--out", str(run), "--downsample", "8", *TRAIN_FAST]
    assert main([*arguments, "--no-mirror", "--warped-copies", "1", "--epochs", "1"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text())["step"] == 2 * 64 // 8  # the slices and one copy
    capsys.readouterr()
    assert main([*arguments[:4], str(tmp_path / "other"), *arguments[5:], "--warped-copies", "17"]) == 1
    error = capsys.readouterr().err
    assert "warped_copies" in error and error.count("\n") == 1


def test_warmup_steps_sets_the_learning_rate_ramp_and_a_resume_may_not_change_it(tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    arguments = ["train-vqvae", "--data", str(tiny_cohort), "--out", str(run), *TRAIN_FAST, "--lr", "0.002"]
    assert main([*arguments, "--max-steps", "2", "--warmup-steps", "4"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["warmup_steps"] == 4
    # The learning rate of the epoch's last step (step 2 of 4 warm-up steps): half the peak.
    lr = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lr[-1] == pytest.approx(0.002 * 2 / 4)
    capsys.readouterr()
    assert main([*arguments, "--max-steps", "3", "--warmup-steps", "5", "--resume"]) == 1
    assert "warmup_steps" in capsys.readouterr().err


def test_kill_during_training_then_resume_finishes_every_epoch_exactly_once(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "brainvq", "train-vqvae", "--data", str(tiny_cohort), "--out", str(run),
               "--epochs", "3", *TRAIN_FAST]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    # A wait, not a bar: a first epoch of the tiny cohort takes seconds, but minutes on a slow, shared CPU.
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "training ended before its first epoch"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.parametrize("damage", ["case in two splits", "wrong size", "corrupt png", "empty split"])
def test_data_check_exits_non_zero_naming_the_problem_file(tiny_cohort, tmp_path, capsys, damage):
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    test_folder = data / "keras_png_slices_test"
    victim = sorted(test_folder.iterdir())[0]
    if damage == "case in two splits":
        train_case = sorted((data / "keras_png_slices_train").iterdir())[0].name
        shutil.copy(victim, test_folder / train_case)
        named = train_case
    elif damage == "wrong size":
        Image.new("L", (128, 256)).save(victim)
        named = victim.name
    elif damage == "corrupt png":
        victim.write_bytes(victim.read_bytes()[:100])
        named = victim.name
    else:
        for path in test_folder.iterdir():
            path.unlink()
        named = "keras_png_slices_test"
    assert main(["data", "check", str(data)]) == 1
    problems = capsys.readouterr().err.strip().splitlines()
    assert problems and all(line.startswith("brainvq: problem: ") for line in problems)
    assert any(named in line for line in problems), problems


def test_data_from_volumes_writes_the_oasis_layout_and_check_accepts_it(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    source = tmp_path / "my scans ü"  # spaces and non-ASCII in the path
    source.mkdir()
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 48, 36)), indexing="ij"))
    for subject in range(3):
        head = ((grid**2).sum(0) < 0.6 + 0.1 * subject).astype(np.float32) * (100 + 50 * grid[2])
        nib.save(nib.Nifti1Image(head, np.diag([1.2, 1.0, 1.1, 1.0])), source / f"sub-{subject}.nii.gz")
    out = tmp_path / "slices"
    assert main(["data", "from-volumes", str(source), "--out", str(out)]) == 0
    assert main(["data", "check", str(out)]) == 0
    written = sorted((out / "keras_png_slices_train").iterdir()) + sorted((out / "keras_png_slices_test").iterdir())
    assert len(written) % 32 == 0 and written
    assert (out / "cases.tsv").exists()


def test_data_from_volumes_takes_the_number_of_slices_and_their_range(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (30, 34, 28)), indexing="ij"))
    source = tmp_path / "sub-1.nii.gz"
    nib.save(nib.Nifti1Image(((grid**2).sum(0) < 0.7) * (100 + 40 * grid[2]), np.eye(4)), source)
    out = tmp_path / "slices"
    assert main(["data", "from-volumes", str(source), "--out", str(out), "--slices", "5",
                 "--axial-range", "0.3", "0.7"]) == 0
    assert json.loads(capsys.readouterr().out)["slices"]["train"] == 5
    assert len(list((out / "keras_png_slices_train").iterdir())) == 5
    geometry = json.loads((out / "volumes.json").read_text())
    assert (geometry["n_slices"], geometry["axial_range"]) == (5, [0.3, 0.7])


def test_data_from_volumes_with_freesurfer_labels_writes_masks_that_check_accepts(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (30, 34, 28)), indexing="ij"))
    radius = (grid**2).sum(0)
    aseg = np.select([radius < 0.1, radius < 0.4, radius < 0.7], [4, 41, 42], 0).astype(np.int16)  # CSF, WM, GM
    t1 = np.vectorize({0: 0, 4: 30, 42: 80, 41: 120}.get)(aseg).astype(np.float32)
    for subject in ("sub-1", "sub-2", "sub-3"):  # a BIDS data set and its derivatives beside it
        anat = tmp_path / "bids" / subject / "anat"
        derivatives = tmp_path / "derivatives" / subject / "anat"
        anat.mkdir(parents=True)
        derivatives.mkdir(parents=True)
        nib.save(nib.Nifti1Image(t1, np.eye(4)), anat / f"{subject}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(aseg, np.eye(4)), derivatives / f"{subject}_dseg.nii.gz")
    out = tmp_path / "slices"
    assert main(["data", "from-volumes", str(tmp_path / "bids"), "--out", str(out), "--slices", "3",
                 "--labels", str(tmp_path / "derivatives"), "--label-map", "freesurfer"]) == 0
    assert json.loads(capsys.readouterr().out)["label_map"] == "freesurfer"
    for split in ("train", "validate", "test"):
        masks = [path.name for path in (out / f"keras_png_slices_seg_{split}").iterdir()]
        assert sorted(masks) == sorted(path.name.replace("case_", "seg_")
                                       for path in (out / f"keras_png_slices_{split}").iterdir())
        assert len(masks) == 3
    assert main(["data", "check", str(out)]) == 0
    assert "train: 3 slices with masks" in capsys.readouterr().out


def test_evaluate_samples_reads_the_fid_weights_before_sampling(tmp_path, capsys):
    weights = tmp_path / "fid.safetensors"
    weights.write_bytes(b"not safetensors")
    # The run folder does not exist either: the weights are read first, so their error comes first.
    assert main(["evaluate-samples", str(tmp_path / "no_run"), "--fid-weights", str(weights)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"brainvq: error: {weights}: not a valid safetensors") and error.count("\n") == 1
    with pytest.raises(CheckpointError, match=r"absent\.safetensors: checkpoint file does not exist"):
        api.evaluate_samples(tmp_path / "no_run", fid_weights=tmp_path / "absent.safetensors")


def test_a_folder_with_48_slice_positions_per_case_trains_and_samples_end_to_end(tiny_cohort, tmp_path, capsys):
    """The number of slice positions comes from the data (largest slice index + 1) and is recorded in the
    prior's config: nothing assumes OASIS's 32."""
    data = tmp_path / "data48"
    for split_folder in tiny_cohort.iterdir():
        (data / split_folder.name).mkdir(parents=True)
        for image in split_folder.iterdir():
            shutil.copy(image, data / split_folder.name / image.name)
            case, index = image.name.split("_slice_")
            if 16 <= int(index.split(".")[0]) < 32:  # slices 32..47: copies of 16..31
                shutil.copy(image, data / split_folder.name / f"{case}_slice_{int(index.split('.')[0]) + 16}.nii.png")
    assert main(["data", "check", str(data)]) == 0
    run = tmp_path / "run"
    assert main(["train-vqvae", "--data", str(data), "--out", str(run), "--max-steps", "1", "--downsample", "8",
                 *TRAIN_FAST]) == 0
    assert main(["train-prior", str(run), "--max-steps", "1", "--channels", "8", "--layers", "2", *TRAIN_FAST]) == 0
    assert json.loads((run / "prior" / "config.json").read_text())["model"]["positions"] == 48
    assert api.load_prior(run)[0].position_logits.shape == (48, 32, 32, 32)  # [positions, codes, G, G]
    assert main(["sample", str(run), "--n", "1", "--slice", "47", "--out", str(tmp_path / "samples")]) == 0
    assert main(["sample", str(run), "--n", "1", "--slice", "48", "--out", str(tmp_path / "none")]) == 1
    assert "slice position must be in 0..47, not 48" in capsys.readouterr().err
    shutil.rmtree(run / "prior")
    assert main(["train-prior", str(run), "--max-steps", "1", "--channels", "8", "--layers", "2", *TRAIN_FAST,
                 "--no-position-logits"]) == 0
    assert not json.loads((run / "prior" / "config.json").read_text())["model"]["position_logits"]
    assert api.load_prior(run)[0].position_logits.numel() == 0
    shutil.rmtree(run / "prior")
    assert main(["train-prior", str(run), "--max-steps", "1", "--channels", "8", "--layers", "2", *TRAIN_FAST,
                 "--position-template", "8"]) == 0
    assert json.loads((run / "prior" / "config.json").read_text())["model"]["position_template"] == 8
    assert main(["sample", str(run), "--n", "1", "--slice", "47", "--out", str(tmp_path / "templated")]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "1", "--guidance", "2", "--out", str(tmp_path / "unguided")]) == 1
    assert "needs slice positions and a prior trained with position_dropout > 0" in capsys.readouterr().err
    assert not (tmp_path / "unguided").exists()
    shutil.rmtree(run / "prior")
    assert main(["train-prior", str(run), "--max-steps", "1", "--channels", "8", "--layers", "2", *TRAIN_FAST,
                 "--position-dropout", "0.1"]) == 0
    # The no-position row that classifier-free guidance needs, after the 48 positions.
    assert api.load_prior(run)[0].position_logits.shape == (49, 32, 32, 32)
    assert main(["sample", str(run), "--n", "1", "--guidance", "2", "--out", str(tmp_path / "guided")]) == 0


def test_cache_list_and_clear(tiny_cohort, tmp_path, monkeypatch, capsys):
    from brainvq.data.dataset import load_split

    folder = tmp_path / "cache"
    monkeypatch.setenv("BRAINVQ_CACHE_DIR", str(folder))
    keys = {split: load_split(tiny_cohort, split).key for split in ("validate", "test")}
    capsys.readouterr()
    assert main(["cache", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{folder}: 2 entries, 8.0 MiB")  # 32 slices and their masks each
    for split, key in keys.items():
        assert any(line.startswith(key) and f"{split} split of {tiny_cohort.resolve()}, 32 slices" in line
                   for line in lines[1:]), lines

    assert main(["cache", "clear", "--older-than", "1"]) == 0
    assert capsys.readouterr().out.startswith("removed 0 entries")
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out == f"removed 2 entries (8.0 MiB) from {folder}\n"
    assert list(folder.iterdir()) == []
    with pytest.raises(SystemExit) as exited:
        main(["cache", "clear", "--older-than", "-1"])
    assert exited.value.code == 2
