"""report.html: one self-contained page (images embedded) of everything a run folder holds.

It only reads what the other steps wrote (configs, metrics.jsonl, eval_*.json, PNGs, code grids); a missing
piece is shown as the command that makes it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # the object API needs no display backend

from brainvq import __version__
from brainvq.atomic import atomic_write_bytes
from brainvq.run import (
    CODES_FOLDER,
    CONFIG_FILE,
    METRICS_FILE,
    PRIOR_EVALUATION,
    PRIOR_FOLDER,
    REAL_VS_GENERATED,
    REPORT_FILE,
    SAMPLE_EVALUATION,
    SAMPLE_PAIRS,
    SAMPLES_BY_POSITION,
    SAMPLES_GRID,
    evaluation_file,
    reconstruction_grid,
)

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f4f4f4; text-align: left; } img { max-width: 100%; } .missing { color: #a33; }
figure { margin: .8em 0; } figcaption { color: #555; font-size: .9em; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html and return its path."""
    run_dir = Path(run_dir)
    sections = [
        _section("Headline figures: generated slices beside real ones", _headline(run_dir)),
        _section("Generated slices", _samples(run_dir)),
        _section("Reconstruction of held-out slices", _reconstruction(run_dir)),
        _section("Training curves", _curves(run_dir)),
        _section("Codebook usage", _codebook_usage(run_dir)),
        _section("Settings", _settings(run_dir)),
    ]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>brainvq report: {html.escape(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body><h1>brainvq report</h1>"
            f"<p>Run folder <code>{html.escape(str(run_dir.resolve()))}</code>, brainvq {__version__}.</p>"
            + "".join(sections) + "</body></html>")
    path = run_dir / REPORT_FILE
    atomic_write_bytes(path, page.encode())
    return path


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>{body}"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _missing(what: str, command: str) -> str:
    return f"<p class='missing'>No {html.escape(what)} yet: run <code>{html.escape(command)}</code>.</p>"


def _table(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_format(value))}</td></tr>"
                   for key, value in values.items())
    return f"<table>{rows}</table>"


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {_format(item)}" for key, item in value.items())
    return str(value)


def _image(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _image_file(path: Path, caption: str, command: str) -> str:
    return _image(path.read_bytes(), caption) if path.is_file() else _missing(caption, command)


def _figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _settings(run_dir: Path) -> str:
    parts = []
    for name, folder in (("VQ-VAE", run_dir), ("PixelCNN prior", run_dir / PRIOR_FOLDER)):
        config = _read_json(folder / CONFIG_FILE)
        if config is not None:
            parts.append(f"<h3>{name}</h3>{_table(config['model'])}{_table(config['train'])}")
    return "".join(parts) or _missing("configuration", "brainvq train-vqvae")


def _reconstruction(run_dir: Path) -> str:
    results = _read_json(run_dir / evaluation_file("test"))
    if results is None:
        return _missing("test evaluation", f"brainvq evaluate {run_dir}")
    joint = "dice_mean" in results
    caption = "test slices (top) and their reconstructions (below)" + (
        ", then their masks and the decoded label maps" if joint else "")
    return _table(results) + _image_file(run_dir / reconstruction_grid("test"), caption, f"brainvq evaluate {run_dir}")


def _history(folder: Path) -> list[dict[str, Any]]:
    path = folder / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _curves(run_dir: Path) -> str:
    vqvae, prior = _history(run_dir), _history(run_dir / PRIOR_FOLDER)
    if not vqvae:
        return _missing("training history", "brainvq train-vqvae")
    panels = [("VQ-VAE training loss", vqvae, lambda r: r["train"]["loss"], True),
              ("VQ-VAE validation SSIM", vqvae, lambda r: r["val"]["ssim"], False),
              ("VQ-VAE codes used per epoch", vqvae, lambda r: r["train"]["codebook_used"], False)]
    if prior:
        panels += [("prior training bits/code", prior, lambda r: r["train"]["bits_per_code"], False),
                   ("prior validation bits/code", prior, lambda r: r["val"]["nll_bits_per_code"], False)]
    figure = Figure(figsize=(4 * len(panels), 3), layout="tight")
    axes = figure.subplots(1, len(panels))
    for axis, (title, history, value, log_scale) in zip(np.atleast_1d(axes), panels, strict=True):
        axis.plot([record["epoch"] for record in history], [value(record) for record in history], marker="o")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        if log_scale:
            axis.set_yscale("log")
    return _image(_figure_png(figure), "per-epoch figures from metrics.jsonl")


def _codebook_usage(run_dir: Path) -> str:
    path = run_dir / CODES_FOLDER / "test.npy"
    if not path.is_file():
        return _missing("test code grids", f"brainvq train-prior {run_dir}")
    codes = np.load(path, allow_pickle=False)
    config = _read_json(run_dir / CONFIG_FILE)
    counts = np.bincount(codes.ravel(), minlength=config["model"]["codebook_size"])
    figure = Figure(figsize=(8, 2.8), layout="tight")
    axis = figure.subplots()
    axis.bar(np.arange(len(counts)), counts / counts.sum())
    axis.set_xlabel("code")
    axis.set_ylabel("share of test positions")
    axis.set_yscale("log")
    used = int((counts > 0).sum())
    return _image(_figure_png(figure), f"{used} of {len(counts)} codes used on the test split")


def _headline(run_dir: Path) -> str:
    """Each sample measure of eval_samples.json beside the same measure on real slices."""
    results = _read_json(run_dir / SAMPLE_EVALUATION)
    if results is None or "c2st" not in results:  # absent, or written before the measures had real rows
        return _missing("sample evaluation with real rows", f"brainvq evaluate-samples {run_dir}")
    c2st = results["c2st"]

    def auc(name: str) -> str:
        return f"{c2st[name]['auc']:.3f} [{c2st[name]['ci95'][0]:.3f}, {c2st[name]['ci95'][1]:.3f}]"

    rows = [
        ("C2ST AUC against VQ-VAE reconstructions of unseen subjects (0.5: indistinguishable)",
         auc("samples_vs_reconstructed"), auc("real_vs_reconstructed")),
        ("C2ST AUC against raw slices of unseen subjects", auc("samples_vs_raw"), auc("real_vs_raw")),
        ("slice-position error (mean absolute, slices)", f"{results['position_error']['samples']:.2f}",
         f"{results['position_error']['real_test']:.2f}"),
        ("Fréchet distance to test slices (position-regressor features)",
         f"{results['frechet']['samples_vs_test']:.3g}", f"{results['frechet']['validation_vs_test']:.3g}"),
        ("diversity: mean MS-SSIM between pairs", f"{results['diversity_ms_ssim']['samples']:.3f}",
         f"{results['diversity_ms_ssim']['real_test']:.3f}"),
        ("SSIM to the nearest training slice (mean)", f"{results['nearest_train_ssim']['samples']['mean']:.3f}",
         f"{results['nearest_train_ssim']['real_test']['mean']:.3f}"),
    ]
    if agreement := results.get("label_agreement"):
        rows.append(("label maps: tissue pixels inside their tissue's intensity range (of training pairs)",
                     _format(agreement["samples"]["all"]), _format(agreement["real_test"]["all"])))
    body = "".join(f"<tr><td>{html.escape(name)}</td><td>{generated}</td><td>{real}</td></tr>"
                   for name, generated, real in rows)
    reconstruction = _read_json(run_dir / evaluation_file("test"))
    recon = (f"<p>Reconstruction of the test split: SSIM {reconstruction['ssim']:.3f}"
             + (f", label maps' mean Dice {reconstruction['dice_mean']:.3f}" if "dice_mean" in reconstruction else "")
             + ".</p>" if reconstruction and "ssim" in reconstruction else "")
    # Evaluations written before evaluate-samples took a temperature sampled at 1.
    drawn = f"{results['n_generated']} samples, temperature {results.get('temperature', 1.0):g}"
    drawn += f", top-k {results['top_k']}" if results.get("top_k") else ""
    drawn += f", guidance {results['guidance']:g}" if results.get("guidance", 1.0) != 1.0 else ""
    drawn += (f", outlines at temperature {results['outline_temperature']:g}"
              if results.get("outline_temperature") is not None else "")
    return (f"<table><tr><th>measure ({drawn})</th><th>generated</th>"
            f"<th>real (same measure)</th></tr>{body}</table>{recon}"
            "<p>C2ST: trained on samples against one held-out split's subjects, scored on other samples against the "
            "other split's subjects, and back; the real column puts training-split slices in the samples' place. "
            "Brackets: bootstrap 95% intervals.</p>")


def _samples(run_dir: Path) -> str:
    command = f"brainvq evaluate-samples {run_dir}"
    results = _read_json(run_dir / SAMPLE_EVALUATION)
    prior = _read_json(run_dir / PRIOR_FOLDER / PRIOR_EVALUATION)
    parts = [_image_file(run_dir / REAL_VS_GENERATED, "each slice position 0..31 in order: a row "
                         "of real test slices above a row of generated slices of the same positions", command),
             _image_file(run_dir / SAMPLES_GRID, "generated slices (random slice positions)", command),
             _image_file(run_dir / SAMPLES_BY_POSITION, "one generated slice per position 0..31 "
                         "(left to right, top to bottom)", command)]
    if (run_dir / SAMPLE_PAIRS).exists():  # a joint VQ-VAE's generated label maps
        parts.append(_image_file(run_dir / SAMPLE_PAIRS, "real test slices and their masks (top two rows) above "
                                 "generated slices of the same positions and their generated label maps "
                                 "(black background, dark grey CSF, light grey grey matter, white white matter)",
                                 command))
    parts.append(_table(prior) if prior else _missing("prior evaluation", f"brainvq train-prior {run_dir}"))
    parts.append(_table(results) if results else _missing("sample evaluation", command))
    return "".join(parts)
