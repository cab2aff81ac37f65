"""Prior designs side by side: the same VQ-VAE, code grids and data, the same minutes, the same sample metrics.

Each design trains a prior on a copy of a finished run (its VQ-VAE checkpoints and cached code grids; the copy
shares the run's data folder) and is then measured by `brainvq evaluate-samples`. `--continue-prior` copies the
run's own prior too and resumes it to `--minutes` in all; its learning rate then climbs back from the end of
its cool-down, so what a longer budget buys is measured by a fresh design with a larger `--minutes`. The table
compares every design folder under `--out` with the source run itself. Run from the repository root, after
`brainvq demo --out runs/demo`:

    python benchmarks/prior_designs.py --run runs/demo --design plain --attention-layers 0 --minutes 11.7
    python benchmarks/prior_designs.py --run runs/demo --design no-position-logits --no-position-logits
    python benchmarks/prior_designs.py --run runs/demo --design 3x --minutes 25.35
    python benchmarks/prior_designs.py --run runs/demo            # only the table of what is there
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from common import table

from brainvq import api
from brainvq.models.pixelcnn import PixelCNNConfig
from brainvq.run import CODES_FOLDER, CONFIG_FILE, LAST_CHECKPOINT, PRIOR_FOLDER, read_run_config
from brainvq.runtime import machine_description, reuse_freed_memory

FROM_THE_RUN = (CONFIG_FILE, str(Path(LAST_CHECKPOINT).parent), CODES_FOLDER, "eval_test.json")


def copy_run(run: Path, folder: Path, *, with_prior: bool) -> None:
    """The VQ-VAE half of `run` (and its prior, `with_prior`) copied into a new `folder`."""
    folder.mkdir(parents=True)
    for name in FROM_THE_RUN + ((PRIOR_FOLDER,) if with_prior else ()):
        source = run / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, folder / name)


def figures(folder: Path) -> list[str]:
    """One table row: the headline figures of a run folder's eval_samples.json and its prior's config."""
    results = json.loads((folder / "eval_samples.json").read_text())
    prior_model, _ = read_run_config(folder / PRIOR_FOLDER, PixelCNNConfig)
    history = [json.loads(line) for line in (folder / PRIOR_FOLDER / "metrics.jsonl").read_text().splitlines()]
    minutes = history[-1]["elapsed_seconds"] / 60  # config.json keeps the first budget; a resume may extend it
    c2st = results["c2st"]

    def auc(name: str) -> str:
        low, high = c2st[name]["ci95"]
        return f"{c2st[name]['auc']:.3f} [{low:.2f}, {high:.2f}]"

    return [folder.name, f"{prior_model.channels} x {prior_model.layers}", str(prior_model.attention_layers),
            "yes" if prior_model.position_logits else "no", f"{minutes:.1f}", str(history[-1]["epoch"]),
            f"{results['prior_nll_bits_per_code']:.3f}",
            f"{results['position_error']['samples']:.2f} / {results['position_error']['real_test']:.2f}",
            f"{auc('samples_vs_reconstructed')} / {auc('real_vs_reconstructed')}",
            f"{auc('samples_vs_raw')} / {auc('real_vs_raw')}",
            f"{results['frechet']['samples_vs_test']:.3g} / {results['frechet']['validation_vs_test']:.3g}",
            f"{results['diversity_ms_ssim']['samples']:.3f} / {results['diversity_ms_ssim']['real_test']:.3f}",
            f"{results['seconds_per_generated_image']:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished run (default runs/demo)")
    parser.add_argument("--out", type=Path, default=Path("runs/prior_designs"), help="where design folders go")
    parser.add_argument("--design", help="name of the design folder to make (none: only print the table)")
    parser.add_argument("--attention-layers", type=int, help="the design's attention blocks (0: plain gated)")
    parser.add_argument("--channels", type=int, help="the design's PixelCNN channels (default: the run's)")
    parser.add_argument("--layers", type=int, help="the design's gated layers (default: the run's)")
    parser.add_argument("--position-logits", action=argparse.BooleanOptionalAction,
                        help="the design's output bias per slice position, location and code (default: the run's)")
    parser.add_argument("--position-template", type=int,
                        help="the design's position template side (0: none; default: the run's)")
    parser.add_argument("--continue-prior", action="store_true", help="resume the run's own prior instead")
    parser.add_argument("--minutes", type=float, help="prior training minutes in all (default: the run's)")
    parser.add_argument("--n", type=int, default=256, help="samples for evaluate-samples (default 256)")
    args = parser.parse_args()
    reuse_freed_memory()
    if args.design:
        folder = args.out / args.design
        copy_run(args.run, folder, with_prior=args.continue_prior)
        prior_model, prior_train = read_run_config(args.run / PRIOR_FOLDER, PixelCNNConfig)
        minutes = args.minutes or prior_train.max_minutes
        if args.continue_prior:
            api.train_prior(folder, resume=True, resume_overrides={"max_minutes": minutes})
        else:
            given = {"attention_layers": args.attention_layers, "position_logits": args.position_logits,
                     "channels": args.channels, "layers": args.layers, "position_template": args.position_template}
            changes = {key: value for key, value in given.items() if value is not None}
            design = dataclasses.replace(prior_model, **changes)
            api.train_prior(folder, prior_config=design,
                            train_config=dataclasses.replace(prior_train, max_minutes=minutes, data_dir=""))
        api.evaluate_samples(folder, n=args.n, seed=0)
    rows = [figures(folder) for folder in [args.run, *sorted(args.out.glob("*"))]
            if (folder / "eval_samples.json").is_file()]
    print(f"\nprior designs on {args.run}, {machine_description()}; each cell: samples / real")
    print(table(["run", "channels x layers", "attention layers", "position logits", "minutes trained",
                 "epochs (last partial)", "test NLL bits/code", "position error", "C2ST vs reconstructed",
                 "C2ST vs raw", "Fréchet (vs val-test)", "MS-SSIM diversity", "s per sample"], rows))


if __name__ == "__main__":
    main()
