"""The generation half end to end on the tiny cohort: code grids -> prior -> samples -> evaluation -> report."""

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainvq import api
from brainvq.cli import main
from brainvq.codes import encode_dataset, grids_name, slice_outlines
from brainvq.config import (
    OUTLINE_TEMPERATURE,
    PRIOR_OUTLINE_MODES,
    SAMPLING_TEMPERATURE,
    TrainConfig,
    VQVAEConfig,
)
from brainvq.data.dataset import SliceDataset, load_split
from brainvq.data.warp import training_variants, warped_copy
from brainvq.errors import ConfigError
from brainvq.images import load_png
from brainvq.models.outline import fill_holes
from brainvq.models.pixelcnn import POSITION_LOGIT_SMOOTHING, PixelCNNConfig
from brainvq.report import write_report
from brainvq.sampling import sample_fast

QUICK = {"max_minutes": None, "batch_size": 8, "seed": 1}
WARPED_COPIES = 1  # the prior of `trained_run` also learns from one warped copy of each training slice
TILE = 256  # side of a slice, and of each tile of the saved grids
GRID_COLUMNS = 8


def grid_tiles(path: Path, rows: int) -> np.ndarray:
    """The tiles of a saved grid picture (`rows` rows of GRID_COLUMNS slices, 2-pixel gaps) as uint8 [N, 256, 256],
    after checking that the picture has exactly that layout."""
    grid = load_png(path)
    step = TILE + 2
    assert grid.shape == (rows * step - 2, GRID_COLUMNS * step - 2)
    return np.stack([grid[r * step:r * step + TILE, c * step:c * step + TILE]
                     for r in range(rows) for c in range(GRID_COLUMNS)])


@pytest.fixture(scope="module")
def trained_run(tiny_cohort, tmp_path_factory):
    """A VQ-VAE (8x down-sampling: 32x32 code grids) and a small prior, each trained for a few steps (the prior
    on the training grids, their mirror images and a warped copy of each)."""
    run = tmp_path_factory.mktemp("generation") / "run"
    api.train_vqvae(tiny_cohort, run, model_config=VQVAEConfig(downsample=8, channels=32, code_dim=16),
                    train_config=TrainConfig(epochs=2, **QUICK), progress=False)
    # The default prior design (with attention and an outline model), with a short warm-up and a high rate so that
    # 16 steps learn.
    api.train_prior(run, prior_config=PixelCNNConfig(codebook_size=32, channels=16, layers=3, grid_size=32,
                                                     outline_modes=PRIOR_OUTLINE_MODES),
                    train_config=TrainConfig(epochs=2, warmup_steps=4, lr=5e-3, warped_copies=WARPED_COPIES, **QUICK),
                    progress=False)
    return run


def test_code_grids_are_cached_uint8_with_case_and_slice(trained_run):
    codes = np.load(trained_run / "codes" / "train.npy")
    index = json.loads((trained_run / "codes" / "train.json").read_text())
    assert codes.dtype == np.uint8 and codes.shape == (64, 32, 32)
    assert index["slice_indices"][:3] == [0, 1, 2] and len(index["case_ids"]) == 64
    assert codes.max() < 32


def test_prior_reports_validation_and_test_bits_per_code(trained_run):
    results = json.loads((trained_run / "prior" / "eval_prior.json").read_text())
    for split in ("validate", "test"):
        # A trained prior beats the uniform distribution over 32 codes (5 bits) by a wide margin.
        assert 0 < results[f"{split}_nll_bits_per_code"] < 5
    history = [json.loads(line) for line in (trained_run / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in history] == [1, 2]


def test_the_prior_trains_on_the_grids_of_the_training_slices_their_mirror_images_and_warped_copies(
        trained_run, tiny_cohort):
    vqvae, _ = api.load_vqvae(trained_run)
    train = load_split(tiny_cohort, "train")
    variants = {"train_mirrored": SliceDataset(train, mirrored=True)}
    for copy in range(WARPED_COPIES):
        variants[f"train_warped{copy}"] = SliceDataset(warped_copy(train, copy))
        variants[f"train_warped{copy}_mirrored"] = SliceDataset(warped_copy(train, copy, mirrored=True))
    for name, slices in variants.items():
        expected = encode_dataset(vqvae, slices, device=torch.device("cpu"), precision="fp32")
        np.testing.assert_array_equal(np.load(trained_run / "codes" / f"{name}.npy"), expected)
    train_config = json.loads((trained_run / "prior" / "config.json").read_text())["train"]
    assert train_config["mirror"] is True  # the prior's default, recorded
    assert train_config["warped_copies"] == WARPED_COPIES
    history = [json.loads(line) for line in (trained_run / "prior" / "metrics.jsonl").read_text().splitlines()]
    # An epoch: 64 training grids, their mirrors, and a warped copy of each of those per copy.
    assert history[0]["step"] == 2 * (1 + WARPED_COPIES) * 64 // QUICK["batch_size"]


def test_the_prior_starts_from_the_code_frequencies_of_its_training_grids(trained_run, tiny_cohort):
    train = load_split(tiny_cohort, "train")
    variants = [(None, False), *training_variants(True, WARPED_COPIES)]  # the order the prior's training set has
    names = [grids_name("train", mirrored=mirrored, warped=copy) for copy, mirrored in variants]
    codes = np.concatenate([np.load(trained_run / "codes" / f"{name}.npy") for name in names]).astype(np.int64)
    positions = np.array(json.loads((trained_run / "codes" / "train.json").read_text())["slice_indices"] * len(names))
    outlines = np.concatenate([slice_outlines(train.images, 32, mirrored=mirrored) if copy is None
                               else slice_outlines(warped_copy(train, copy, mirrored=mirrored).images, 32)
                               for copy, mirrored in variants])
    # The default prior's logits are framed by the outline: in the grid's frame they count the codes outside
    # the outlines; a place no grid of a position has outside counts as that position's codes outside, pooled.
    counts = np.zeros((32, 32, 32, 32))  # [position, code, row, column]
    rows, columns = np.indices(codes.shape[1:])
    for grid, outline, position in zip(codes, outlines, positions, strict=True):
        np.add.at(counts[position], (grid, rows, columns), outline == 0)
    pooled = counts.sum(axis=(2, 3), keepdims=True)
    unseen = counts.sum(axis=1, keepdims=True) == 0
    counts += unseen * pooled / np.maximum(pooled.sum(axis=1, keepdims=True), 1)
    smoothed = counts + POSITION_LOGIT_SMOOTHING
    initial = torch.from_numpy(np.log(smoothed / smoothed.sum(axis=1, keepdims=True))).float()
    prior, _ = api.load_prior(trained_run)
    assert prior.config.framed_logits and prior.outline_logits.shape == prior.position_logits.shape
    # 16 training steps at a rate of at most 5e-3 move each logit by ~0.08 at most; the initial logits span
    # several nats (a code seen at every grid of a place against codes never seen there).
    assert float(initial.max() - initial.min()) > 3
    torch.testing.assert_close(prior.position_logits.detach(), initial, rtol=0, atol=0.1)
    # Sampling keeps to the background outside the outline: the codes on at least 1 in 10,000 of the training
    # cells outside the outlines (a buffer, not trained).
    outside = np.bincount(codes[outlines == 0], minlength=32)
    assert prior.background_codes.tolist() == (outside >= 1e-4 * outside.sum()).tolist()
    assert 0 < int(prior.background_codes.sum()) < 32


def test_the_prior_draws_each_slices_outline_first_from_a_shape_model_of_the_training_outlines(
        trained_run, tiny_cohort, monkeypatch):
    prior, _ = api.load_prior(trained_run)
    train = load_split(tiny_cohort, "train")
    outlines = np.concatenate([slice_outlines(train.images, 32, mirrored=mirrored) for mirrored in (False, True)])
    positions = np.concatenate([train.slice_indices] * 2)
    training_areas = np.array([outlines[positions == p].sum(axis=(1, 2)).mean() for p in range(32)])
    drawn = prior.draw_outlines(torch.arange(32).repeat(20), 640, torch.Generator().manual_seed(0))
    drawn_areas = drawn.view(20, 32, -1).sum(dim=2).float().mean(dim=0).numpy()
    # The brain's area grows from the lowest slices to the middle ones and shrinks again: so do the drawn ones'.
    assert training_areas.max() > 1.5 * training_areas.min()
    assert np.corrcoef(training_areas, drawn_areas)[0, 1] > 0.95
    assert np.abs(drawn_areas / training_areas - 1).mean() < 0.15

    sampled_with = {}

    def recording_sampler(*args, context=None, **kwargs):
        sampled_with["context"] = context
        return sample_fast(*args, context=context, **kwargs)

    monkeypatch.setattr(api, "sample_fast", recording_sampler)
    for options, temperature in (({}, OUTLINE_TEMPERATURE), ({"outline_temperature": 0.3}, 0.3)):
        generated = api.generate(trained_run, 3, seed=7, slice_position=[5, 16, 27], **options)
        expected = prior.draw_outlines(torch.tensor([5, 16, 27]), 3, torch.Generator().manual_seed(7),
                                       temperature=temperature)
        assert torch.equal(sampled_with["context"], expected) and torch.equal(generated.outlines, expected)
    # At outline temperature 0 every seed draws each position's mean outline.
    means = [api.generate(trained_run, 2, seed=seed, slice_position=[5, 27], outline_temperature=0).outlines
             for seed in (1, 2)]
    assert torch.equal(means[0], means[1])
    assert torch.equal(means[0], fill_holes(prior.outline.mean[[5, 27]] < 0))
    assert not torch.equal(means[0][0], means[0][1])  # two positions, two different means


def test_sample_writes_pngs_and_a_grid_and_fast_equals_naive(trained_run, tmp_path):
    fast = api.sample(trained_run, 3, tmp_path / "fast", seed=5, slice_position=20)
    naive = api.sample(trained_run, 3, tmp_path / "naive", seed=5, slice_position=20, method="naive")
    assert [p.split("/")[-1] for p in fast["files"]] == [f"sample_000{i}_slice_20.png" for i in range(3)]
    assert fast["positions"] == naive["positions"] == [20, 20, 20]
    saved = np.stack([load_png(file) for file in fast["files"]])
    assert saved.shape == (3, TILE, TILE)
    assert np.array_equal(saved, np.stack([load_png(file) for file in naive["files"]]))
    # The grid holds the same three samples in order, padded to a row of 8 with black tiles.
    tiles = grid_tiles(tmp_path / "fast" / "samples_grid.png", rows=1)
    assert np.array_equal(tiles[:3], saved) and not tiles[3:].any()


def test_same_seed_same_samples_and_bad_options_are_refused(trained_run):
    first, second = api.generate(trained_run, 2, seed=3), api.generate(trained_run, 2, seed=3)
    assert np.array_equal(first.images.numpy(), second.images.numpy())
    assert first.positions.tolist() == second.positions.tolist()
    for options, message in (({"temperature": 0}, "temperature"), ({"top_k": 33}, "top_k"),
                             ({"slice_position": 32}, "slice position"), ({"method": "slow"}, "method"),
                             ({"guidance": -1.0}, "guidance"), ({"guidance": 2.0}, "position_dropout"),
                             ({"outline_temperature": -0.5}, "outline temperature")):
        with pytest.raises(ConfigError, match=message):
            api.generate(trained_run, 1, **options)


def test_cli_sample_rejects_invalid_values_with_one_line(trained_run, tmp_path, capsys):
    assert main(["sample", str(trained_run), "--out", str(tmp_path), "--top-k", "40"]) == 1
    assert "top_k must be in 1..32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(trained_run), "--out", str(tmp_path), "--temperature", "0"])


def test_evaluate_samples_draws_with_the_temperatures_top_k_and_guidance_given(trained_run, monkeypatch):
    class Drawn(Exception):
        pass

    def spying_generate(run_dir, n, **options):
        raise Drawn(options["temperature"], options["top_k"], options["guidance"], options["outline_temperature"])

    monkeypatch.setattr(api, "generate", spying_generate)
    with pytest.raises(Drawn) as drawn:
        main(["evaluate-samples", str(trained_run), "--n", "4", "--temperature", "0.8", "--top-k", "5",
              "--guidance", "1.5", "--outline-temperature", "0.3"])
    assert drawn.value.args == (0.8, 5, 1.5, 0.3)


class ImageCounter(HTMLParser):
    def __init__(self):
        super().__init__()
        self.embedded = 0
        self.external = []

    def handle_starttag(self, tag, attrs):
        source = dict(attrs).get("src")
        if tag == "img":
            if source.startswith("data:image/png;base64,"):
                self.embedded += 1
            else:
                self.external.append(source)


def test_evaluate_samples_then_report(trained_run, tiny_cohort):
    results = api.evaluate_samples(trained_run, n=16, seed=0)
    saved = json.loads((trained_run / "eval_samples.json").read_text())
    assert results == saved
    # Every sample measure stands beside the same measure on real slices.
    assert set(results["c2st"]) == {"samples_vs_raw", "samples_vs_reconstructed", "real_vs_raw",
                                    "real_vs_reconstructed"}
    for comparison in results["c2st"].values():
        assert comparison["ci95"][0] <= comparison["auc"] <= comparison["ci95"][1]
        assert comparison["n_candidates"] == 16
    assert results["c2st"]["samples_vs_raw"]["n_real"] == 64  # the validation and test splits: 2 cases each
    assert set(results["position_error"]) == {"samples", "real_test"}
    assert set(results["frechet"]) == {"samples_vs_test", "validation_vs_test", "n_per_side"}
    assert results["frechet"]["n_per_side"] == 16
    assert set(results["diversity_ms_ssim"]) == set(results["nearest_train_ssim"]) == {"samples", "real_test"}
    assert results["prior_nll_bits_per_code"] > 0
    # the sampling settings measured
    assert (results["temperature"], results["top_k"], results["outline_temperature"]) == (
        SAMPLING_TEMPERATURE, None, OUTLINE_TEMPERATURE)
    assert (trained_run / "samples_grid.png").exists()
    # The samples were asked for at positions 0..15 (sample i at i % 32), one of each: samples_by_position.png
    # shows all 16 in two full rows, and each generated row of real_vs_generated_by_position.png sits below the
    # real test slices of the same positions.
    samples = grid_tiles(trained_run / "samples_by_position.png", rows=2)
    pairs = grid_tiles(trained_run / "real_vs_generated_by_position.png", rows=4)
    pairs = pairs.reshape(2, 2, GRID_COLUMNS, TILE, TILE)  # [row pair, real or generated, column]
    assert np.array_equal(pairs[:, 1].reshape(16, TILE, TILE), samples)
    test = load_split(tiny_cohort, "test")
    at_position = [int(np.flatnonzero(test.slice_indices == position)[0]) for position in range(16)]
    assert np.array_equal(pairs[:, 0].reshape(16, TILE, TILE), test.images[at_position])

    api.evaluate(trained_run, tiny_cohort)
    page = write_report(trained_run)
    assert page == trained_run / "report.html"
    text = page.read_text()
    counter = ImageCounter()
    counter.feed(text)
    # real vs generated, sample grid, samples by position, reconstructions, curves, codebook histogram
    assert counter.embedded == 6 and counter.external == []
    assert "No " not in text  # every section found its inputs
    # how the measured samples were drawn
    assert (f"16 samples, temperature {SAMPLING_TEMPERATURE:g}, outlines at temperature {OUTLINE_TEMPERATURE:g}"
            in text)
    # The headline figures come first, the settings last.
    assert text.index("Headline figures") < text.index("Generated slices") < text.index("Settings")


# CI installs chromium (.ci/run), so there the test must run: a skip would hide a report that no browser renders.
@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"),
                    reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    write_report(trained_run)
    screenshot = tmp_path / "report.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.sh"
    subprocess.run(["bash", str(script), str(trained_run), str(screenshot)], check=True, capture_output=True,
                   timeout=120)
    pixels = np.asarray(Image.open(screenshot).convert("L"))
    assert pixels.shape[1] == 1200
    assert pixels.std() > 10  # text, plots and brains, not a blank page


def test_generate_samples_with_tf32_off_and_restores_the_setting(trained_run, monkeypatch):
    """On CUDA, TF32 made fast and naive sampling disagree (benchmarks/RESULTS.md): sampling runs without it."""
    during = []

    def spying_sampler(*args, **kwargs):
        during.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return sample_fast(*args, **kwargs)

    monkeypatch.setattr(api, "sample_fast", spying_sampler)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    api.generate(trained_run, 1, seed=0, slice_position=3)
    assert during == [(False, False)]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
