"""The `brainvq` command: parse arguments, call `brainvq.api`, turn the project's errors into one line.

Every user mistake the project detects is a `BrainVQError`: it is printed as `brainvq: error: <file>: <problem>`
and the exit code is 1 (argparse's own usage errors exit with 2). Nothing here computes anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from brainvq import __version__
from brainvq.config import (
    DEMO_MINUTES,
    DEMO_VQVAE_SHARE,
    DEVICE_NAMES,
    MAX_SEED,
    MAX_WARPED_COPIES,
    OUTLINE_TEMPERATURE,
    PRIOR_BATCH_SIZE,
    PRIOR_MIRROR,
    PRIOR_OUTLINE_MODES,
    PRIOR_WARPED_COPIES,
    SAMPLES_EVALUATED,
    SAMPLING_GUIDANCE,
    SAMPLING_TEMPERATURE,
    VQVAE_BATCH_SIZE,
    VQVAE_MIRROR,
    VQVAE_WARPED_COPIES,
    PixelCNNConfig,
    TrainConfig,
    VQVAEConfig,
    is_device_name,
)
from brainvq.errors import BrainVQError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


MAX_SAMPLES = 100_000  # 100,000 slices of 256x256 floats are 26 GB: more is a typo, not a plan


def sample_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SAMPLES}, not {text}")
    return value


def non_negative_number(text: str) -> float:
    value = number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED}, not {text}")
    return value


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None


def positive_float(text: str) -> float:
    value = number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, not {text}")
    return value


def cooldown_share(text: str) -> float:
    value = number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {text}")
    return value


def device_name(text: str) -> str:
    if not is_device_name(text):
        raise argparse.ArgumentTypeError(f"must be {DEVICE_NAMES}, not {text!r}")
    return text


DEVICE_HELP = f"{DEVICE_NAMES}; default auto: cuda when present, else cpu"
# The defaults that help texts show are read from the config dataclasses, where they live.
TRAIN_DEFAULTS, VQVAE_DEFAULTS, PRIOR_DEFAULTS = TrainConfig(), VQVAEConfig(), PixelCNNConfig()
CHECKPOINT_CHOICES = ("best", "last")  # run.CHECKPOINTS' keys (a test checks), without importing torch for --help


def minutes(text: str) -> float:
    """--max-minutes: a positive number, or 0 (written any way: 0, 0.0, 0e0) for no time limit."""
    return 0.0 if number(text) == 0 else positive_float(text)


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """--temperature, --outline-temperature, --top-k and --guidance, for `sample` and for `evaluate-samples` (which
    measures samples drawn so)."""
    parser.add_argument("--temperature", type=positive_float, default=SAMPLING_TEMPERATURE,
                        help=f"softmax temperature (> 0; default {SAMPLING_TEMPERATURE:g})")
    parser.add_argument("--outline-temperature", type=non_negative_number, default=OUTLINE_TEMPERATURE, metavar="T",
                        help="temperature of the outline model's draws, for a prior with one (0: each slice "
                             f"position's mean outline; default {OUTLINE_TEMPERATURE:g})")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest codes")
    parser.add_argument("--guidance", type=non_negative_number, default=None, metavar="G",
                        help="classifier-free guidance by the slice position: 1 samples the conditional prior, "
                             "more stresses the position's anatomy; needs a prior trained with position dropout "
                             f"(default {SAMPLING_GUIDANCE:g} for such a prior, 1 for others)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainvq", description=(
        "Learn a VQ-VAE + autoregressive prior of brain MRI slices and make new ones."))
    parser.add_argument("--version", action="version", version=f"brainvq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="make, convert and check slice data sets (OASIS layout)")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    demo = data_commands.add_parser("demo", help="write the embedded MNI152 pseudo-cohort in the OASIS layout")
    demo.add_argument("--out", type=Path, required=True, help="new folder to write (must not exist or be empty)")
    demo.add_argument("--train-cases", type=positive_int, default=None, help="cases in the train split")
    demo.add_argument("--val-cases", type=positive_int, default=None, help="cases in the validate split")
    demo.add_argument("--test-cases", type=positive_int, default=None, help="cases in the test split")
    demo.add_argument("--seed", type=seed, default=0, help="same seed, same bytes (default 0)")
    demo.set_defaults(handler=run_data_demo)

    # Imported here for the defaults shown in the help; brainvq.data.volumes would load nibabel and scipy.
    from brainvq.data.layout import AXIAL_RANGE, SLICES_PER_CASE

    volumes = data_commands.add_parser("from-volumes", help="slice NIfTI/Analyze volumes into the OASIS layout")
    volumes.add_argument("source", type=Path, help="a volume file or a folder searched for .nii/.nii.gz/.hdr; "
                                                   "a BIDS folder gives its sub-*/[ses-*/]anat/*T1w images")
    volumes.add_argument("--out", type=Path, required=True, help="new folder to write")
    volumes.add_argument("--seed", type=seed, default=0, help="seed of the subject -> split assignment")
    volumes.add_argument("--slices", type=int, default=SLICES_PER_CASE, metavar="N",
                         help="axial slices per volume (default %(default)s, the OASIS layout's count)")
    volumes.add_argument("--axial-range", type=number, nargs=2, default=AXIAL_RANGE, metavar=("LOW", "HIGH"),
                         help="part of the foreground's inferior-superior extent the slices span, as fractions "
                              f"from its bottom (default {AXIAL_RANGE[0]} {AXIAL_RANGE[1]})")
    volumes.add_argument("--labels", type=Path, default=None, metavar="LABELS",
                         help="tissue label volumes in the same voxel grids (a file if SOURCE is one, else a folder "
                              "searched like it): LABELS/<volume id>[_seg|_pveseg|_dseg|_aseg|_aparc+aseg] for "
                              "SOURCE/<volume id>, or <id without _T1w>_dseg for a BIDS _T1w image; each slice "
                              "then gets an OASIS mask in keras_png_slices_seg_<split>")
    volumes.add_argument("--label-map", default=None, metavar="fast|freesurfer|JSON",
                         help="label values -> classes: fast (0 background, 1 CSF, 2 grey, 3 white matter; the "
                              "default), freesurfer (aseg/aparc+aseg labels), or a JSON file {\"<value>\": "
                              "\"background|csf|grey_matter|white_matter\"}")
    volumes.set_defaults(handler=run_data_from_volumes)

    check = data_commands.add_parser("check", help="check a data folder: counts, splits, sizes, modes")
    check.add_argument("data_dir", type=Path, help="folder holding keras_png_slices_{train,validate,test}")
    check.add_argument("--manifest", default=None, metavar="TSV|oasis",
                       help="verify every file's size and sha256 against this manifest TSV; 'oasis' uses the "
                            "manifest of the public OASIS keras_png_slices set that ships with brainvq")
    check.set_defaults(handler=run_data_check)

    training = commands.add_parser("train-vqvae", help="train the VQ-VAE (bf16 + channels_last on CPU)")
    training.add_argument("--data", type=Path, help="data folder (OASIS layout); not needed with --resume")
    training.add_argument("--out", type=Path, required=True, help="run folder to create (or resume)")
    _add_training_arguments(training)
    training.add_argument("--downsample", type=int, choices=(4, 8), default=None,
                          help=f"4: 64x64 code grid, 8: 32x32 (default {VQVAE_DEFAULTS.downsample})")
    training.add_argument("--codebook-size", type=positive_int,
                          help=f"number of codes (default {VQVAE_DEFAULTS.codebook_size})")
    training.add_argument("--code-dim", type=positive_int,
                          help=f"dimension of each code (default {VQVAE_DEFAULTS.code_dim})")
    training.add_argument("--no-ema", action="store_true", help="learn the codebook by gradients, not EMA")
    training.add_argument("--no-labels", action="store_true",
                          help="images only, even where the data has segmentation masks (by default the VQ-VAE "
                               "then encodes and decodes each slice's tissue label map with it)")
    training.add_argument("--label-weight", type=number, default=None,
                          help="weight of the label maps' cross-entropy beside the images' squared error "
                               f"(default {VQVAE_DEFAULTS.label_weight})")
    training.add_argument("--ssim-weight", type=number, default=None,
                          help="weight of 1 - SSIM of the images beside their squared error "
                               f"(default {VQVAE_DEFAULTS.ssim_weight})")
    training.set_defaults(handler=run_train_vqvae)

    evaluation = commands.add_parser("evaluate", help="SSIM, PSNR and codebook usage of a run on a split")
    _add_run_arguments(evaluation)
    evaluation.set_defaults(handler=run_evaluate)

    reconstruction = commands.add_parser("reconstruct", help="write each reconstruction of a split as a PNG")
    _add_run_arguments(reconstruction)
    reconstruction.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    reconstruction.set_defaults(handler=run_reconstruct)
    prior = commands.add_parser("train-prior", help="train the PixelCNN prior on the VQ-VAE's code grids")
    prior.add_argument("run", type=Path, help="run folder of a trained VQ-VAE; the prior goes to RUN/prior")
    prior.add_argument("--data", type=Path, help="data folder (default: the one the VQ-VAE was trained on)")
    _add_training_arguments(prior)
    prior.add_argument("--channels", type=positive_int, help=f"PixelCNN channels (default {PRIOR_DEFAULTS.channels})")
    prior.add_argument("--layers", type=positive_int, help=f"gated layers (default {PRIOR_DEFAULTS.layers})")
    prior.add_argument("--unconditional", action="store_true", help="do not condition on the slice position")
    prior.add_argument("--attention-layers", type=non_negative_int,
                       help="causal attention blocks that give each code the whole slice above it (default "
                            f"{PRIOR_DEFAULTS.attention_layers}; 0: the plain gated PixelCNN)")
    prior.add_argument("--no-position-logits", action="store_true",
                       help="leave out the output logit per slice position, place and code that starts as the "
                            "training grids' code frequencies (the design before 2026-12)")
    prior.add_argument("--position-template", type=non_negative_int, metavar="SIDE",
                       help="let every layer read a SIDE x SIDE map of the codes expected at the slice position, "
                            "below and to the right included (default "
                            f"{PRIOR_DEFAULTS.position_template or 'none'}; 16 is measured in benchmarks/RESULTS.md)")
    prior.add_argument("--position-dropout", type=non_negative_number, metavar="SHARE",
                       help="share of training grids shown without their slice position, which --guidance "
                            f"needs at sampling (in [0, 1); default {PRIOR_DEFAULTS.position_dropout:g})")
    prior.add_argument("--outline-modes", type=non_negative_int, metavar="MODES",
                       help="modes of the shape model that draws each slice's outline before the codes inside it "
                            f"(default {PRIOR_OUTLINE_MODES}; 0: none, the codes make the outline as they come)")
    prior.add_argument("--no-outline-frame", action="store_true",
                       help="read the position logits in the grid's own frame inside the outline too, not placed "
                            "by the outline's box (the design before 2026-12-02 afternoon)")
    prior.add_argument("--no-outline-background", action="store_true",
                       help="let sampling draw any code outside the drawn outline, not only the background's "
                            "(the design before 2026-12-02 evening)")
    prior.add_argument("--windowed", action=argparse.BooleanOptionalAction,
                       help="run the network on each batch's window around its outlines instead of the whole grid, "
                            "fewer codes a step (default: windowed where the outline model keeps the background; "
                            "benchmarks/RESULTS.md, \"the prior on windows\")")
    prior.set_defaults(handler=run_train_prior)

    sampling = commands.add_parser("sample", help="sample new brain slices: prior -> code grids -> VQ-VAE decoder "
                                                  "(with a label map beside each where the VQ-VAE is joint)")
    sampling.add_argument("run", type=Path, help="run folder with a trained VQ-VAE and prior")
    sampling.add_argument("--n", type=sample_count, default=16, help="number of samples (default 16)")
    sampling.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    sampling.add_argument("--seed", type=seed, default=0)
    add_sampling_options(sampling)
    sampling.add_argument("--slice", type=non_negative_int, default=None, dest="slice_position", metavar="S",
                          help="slice position of every sample, 0..positions-1 (0..31 for OASIS; default: drawn "
                               "at random)")
    sampling.add_argument("--method", choices=("fast", "naive"), default="fast",
                          help="fast (cached, default) or naive (full network per code): the same samples on a "
                               "CPU, bit for bit (tested); on CUDA both run without TF32 and agreed when measured, "
                               "but GPU kernels may add in other orders, so it is not a guarantee there")
    sampling.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    sampling.set_defaults(handler=run_sample)

    sample_evaluation = commands.add_parser("evaluate-samples",
                                            help="quality, diversity and novelty of generated slices")
    sample_evaluation.add_argument("run", type=Path, help="run folder with a trained VQ-VAE and prior")
    sample_evaluation.add_argument("--data", type=Path, help="data folder (default: the VQ-VAE's)")
    sample_evaluation.add_argument("--n", type=sample_count, default=SAMPLES_EVALUATED,
                                   help=f"samples to generate (default {SAMPLES_EVALUATED}; half face each held-out "
                                        "split)")
    sample_evaluation.add_argument("--seed", type=seed, default=0)
    add_sampling_options(sample_evaluation)
    sample_evaluation.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    sample_evaluation.add_argument("--fid-weights", type=Path, metavar="FILE",
                                   help="FID Inception weights (safetensors, made by scripts/convert_fid_weights.py):"
                                        " adds the FID of samples vs real test slices")
    sample_evaluation.set_defaults(handler=run_evaluate_samples)

    report = commands.add_parser("report", help="write RUN/report.html: curves, pictures and figures")
    report.add_argument("run", type=Path, help="run folder")
    report.set_defaults(handler=run_report)

    demo_run = commands.add_parser("demo", help="the whole job on the embedded default data, end to end")
    demo_run.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    demo_run.add_argument("--minutes", type=positive_float,
                          help=f"training budget in minutes, {DEMO_VQVAE_SHARE * 100:g}%% VQ-VAE and the rest prior "
                               f"(default {DEMO_MINUTES:g}; sampling and evaluation come on top)")
    demo_run.add_argument("--seed", type=seed, default=0)
    demo_run.set_defaults(handler=run_demo)

    cache = commands.add_parser("cache", help="list or clear the decoded-slice cache "
                                              "($BRAINVQ_CACHE_DIR, default ~/.cache/brainvq)")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="CACHE_COMMAND")
    cache_list = cache_commands.add_parser("list", help="each entry: key, size, last use, the data it holds")
    cache_list.set_defaults(handler=run_cache_list)
    cache_clear = cache_commands.add_parser(
        "clear", help="remove cached splits (they are decoded again when next loaded); writes in progress are kept")
    cache_clear.add_argument("--older-than", type=non_negative_number, default=None, metavar="DAYS",
                             help="only entries unused for more than DAYS days (default: all)")
    cache_clear.set_defaults(handler=run_cache_clear)
    return parser


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by train-vqvae and train-prior; unset ones keep TrainConfig's default (or, on --resume,
    the run's own value)."""
    parser.add_argument("--epochs", type=positive_int, help=f"epochs (default {TRAIN_DEFAULTS.epochs})")
    parser.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    parser.add_argument("--max-minutes", type=minutes, help="stop after this many minutes of training in total "
                                                              f"(default {TRAIN_DEFAULTS.max_minutes:g}; 0: no limit)")
    parser.add_argument("--batch-size", type=positive_int,
                        help=f"images per step (default {VQVAE_BATCH_SIZE} for the VQ-VAE, {PRIOR_BATCH_SIZE} "
                             "code grids for the prior; larger on a GPU)")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction,
                        help="also train on each training slice mirrored left-right (default: "
                             f"{'yes' if PRIOR_MIRROR else 'no'} for the prior, {'yes' if VQVAE_MIRROR else 'no'} "
                             "for the VQ-VAE)")
    parser.add_argument("--warped-copies", type=non_negative_int, metavar="N",
                        help="also train on N warped copies of each training slice (and of its mirror image), each "
                             "slice under its own small random rotation, scale and shift (default: "
                             f"{PRIOR_WARPED_COPIES} for the prior, {VQVAE_WARPED_COPIES} for the VQ-VAE; at most "
                             f"{MAX_WARPED_COPIES}; 2 took the demo prior's NLL from 0.968 to 0.929 bits per code)")
    parser.add_argument("--lr", type=positive_float, help=f"Adam learning rate (default {TRAIN_DEFAULTS.lr:g})")
    parser.add_argument("--warmup-steps", type=non_negative_int,
                        help=f"steps of linear learning-rate warm-up (default {TRAIN_DEFAULTS.warmup_steps})")
    parser.add_argument("--cooldown", type=cooldown_share,
                        help="share of the run (of its steps or minutes) over which the learning rate falls "
                             f"linearly to 0 (default {TRAIN_DEFAULTS.cooldown:g}; 0: constant after warm-up)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"),
                        help="bf16 autocast, fp32, or auto (default): bf16 where the GPU or CPU computes it natively")
    parser.add_argument("--device", type=device_name, help=DEVICE_HELP)
    parser.add_argument("--compile", choices=("auto", "on", "off"),
                        help="torch.compile the network (default auto: on CUDA only)")
    parser.add_argument("--seed", type=seed, help=f"random seed (default {TRAIN_DEFAULTS.seed})")
    parser.add_argument("--resume", action="store_true", help="continue the run from its last finished epoch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch line")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run folder written by train-vqvae")
    parser.add_argument("--data", type=Path, help="data folder (OASIS layout; default: the one the run was trained on)")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                        help="the best (by validation) or the last weights (default best)")
    parser.add_argument("--split", choices=("train", "validate", "test"), default="test", help="default test")
    parser.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="default: the precision the run was trained with")


def run_data_demo(args: argparse.Namespace) -> None:
    from brainvq import api

    sizes = {"train_cases": args.train_cases, "val_cases": args.val_cases, "test_cases": args.test_cases}
    summary = api.make_demo_data(args.out, seed=args.seed, progress=True,
                                 **{name: value for name, value in sizes.items() if value is not None})
    print(json.dumps(summary, indent=2, default=str))


def run_data_from_volumes(args: argparse.Namespace) -> None:
    from brainvq.data.volumes import volumes_to_layout

    summary = volumes_to_layout(args.source, args.out, n_slices=args.slices, axial_range=tuple(args.axial_range),
                                seed=args.seed, labels=args.labels, label_map=args.label_map, progress=True)
    print(json.dumps(summary, indent=2, default=str))


MAX_PROBLEM_LINES = 200  # a wrong --manifest can give thousands; the first ones tell the story


def run_data_check(args: argparse.Namespace) -> int:
    from brainvq.data.check import check_data
    from brainvq.data.layout import OASIS_MANIFEST

    manifest = OASIS_MANIFEST if args.manifest == "oasis" else args.manifest
    report = check_data(args.data_dir, manifest=manifest)
    for line in report.summaries:
        print(line)
    for line in report.problems[:MAX_PROBLEM_LINES]:
        print(f"brainvq: problem: {line}", file=sys.stderr)
    if len(report.problems) > MAX_PROBLEM_LINES:
        print(f"brainvq: ... and {len(report.problems) - MAX_PROBLEM_LINES} more problems", file=sys.stderr)
    return 0 if report.ok else 1


TRAIN_OPTION_NAMES = ("epochs", "max_steps", "max_minutes", "batch_size", "mirror", "warped_copies", "lr",
                      "warmup_steps", "cooldown", "precision", "device", "compile", "seed")


def _given_training_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training options the user set on the command line (0 minutes meaning no limit)."""
    given = {name: getattr(args, name) for name in TRAIN_OPTION_NAMES if getattr(args, name) is not None}
    if given.get("max_minutes") == 0.0:
        given["max_minutes"] = None
    return given


def run_train_vqvae(args: argparse.Namespace) -> None:
    from brainvq import api
    from brainvq.run import read_run_config

    given = _given_training_options(args)
    if args.resume:
        data_dir = args.data or Path(read_run_config(args.out)[1].data_dir)
        api.train_vqvae(data_dir, args.out, resume=True, resume_overrides=given, progress=not args.quiet)
        return
    if args.data is None:
        raise_usage("train-vqvae: --data is required unless --resume is given")
    model_options = {"downsample": args.downsample, "codebook_size": args.codebook_size, "code_dim": args.code_dim,
                     "label_weight": args.label_weight, "ssim_weight": args.ssim_weight}
    model_config = api.default_vqvae_config(args.data, labels=not args.no_labels, ema=not args.no_ema,
                                            **{name: value for name, value in model_options.items()
                                               if value is not None})
    api.train_vqvae(args.data, args.out, model_config=model_config, train_config=TrainConfig(**given),
                    progress=not args.quiet)


def run_train_prior(args: argparse.Namespace) -> None:
    from brainvq import api

    given = _given_training_options(args)
    if args.resume:
        results = api.train_prior(args.run, data_dir=args.data, resume=True, resume_overrides=given,
                                  progress=not args.quiet)
    else:
        model_options = {"channels": args.channels, "layers": args.layers, "attention_layers": args.attention_layers,
                         "position_template": args.position_template, "position_dropout": args.position_dropout,
                         "outline_modes": args.outline_modes, "windowed": args.windowed}
        prior_config = api.default_prior_config(
            args.run, args.data, conditional=not args.unconditional, position_logits=not args.no_position_logits,
            outline_frame=not args.no_outline_frame, outline_background=not args.no_outline_background,
            **{name: value for name, value in model_options.items() if value is not None})
        results = api.train_prior(args.run, data_dir=args.data, prior_config=prior_config,
                                  train_config=TrainConfig(**given), progress=not args.quiet)
    print(json.dumps(results, indent=2))


def run_sample(args: argparse.Namespace) -> None:
    from brainvq import api

    made = api.sample(args.run, args.n, args.out, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                      guidance=args.guidance, outline_temperature=args.outline_temperature,
                      slice_position=args.slice_position, method=args.method, device=args.device)
    what = "samples with their label maps (_seg.png)" if made["labelled"] else "samples"
    print(f"wrote {made['n']} {what} and samples_grid.png to {args.out} in {made['seconds']:.1f} s "
          f"({args.method} sampling)")


def run_evaluate(args: argparse.Namespace) -> None:
    from brainvq import api

    results = api.evaluate(args.run, args.data, split=args.split, device=args.device, precision=args.precision,
                           checkpoint=args.checkpoint)
    print(json.dumps(results, indent=2))


def run_reconstruct(args: argparse.Namespace) -> None:
    from brainvq import api

    count = api.reconstruct(args.run, args.out, data_dir=args.data, split=args.split, device=args.device,
                            precision=args.precision, checkpoint=args.checkpoint)
    print(f"wrote {count} reconstructions to {args.out}")


def run_evaluate_samples(args: argparse.Namespace) -> None:
    from brainvq import api

    print(json.dumps(api.evaluate_samples(args.run, data_dir=args.data, n=args.n, seed=args.seed,
                                          temperature=args.temperature, top_k=args.top_k,
                                          guidance=args.guidance, outline_temperature=args.outline_temperature,
                                          device=args.device,
                                          fid_weights=args.fid_weights), indent=2))


def run_report(args: argparse.Namespace) -> None:
    from brainvq.report import write_report

    print(f"wrote {write_report(args.run)}")


def run_demo(args: argparse.Namespace) -> None:
    from brainvq import api

    options = {} if args.minutes is None else {"minutes": args.minutes}
    results = api.demo(args.out, seed=args.seed, **options)
    print(json.dumps(results, indent=2))
    print(f"open {results['report']} to see the run")


def run_cache_list(args: argparse.Namespace) -> None:
    import time

    from brainvq.data.cache import default_cache_dir, list_entries

    folder = default_cache_dir()
    entries = list_entries(folder)
    print(f"{folder}: {len(entries)} entries, {_mib(sum(entry.size for entry in entries))}")
    for entry in entries:
        made_from = (f"{entry.split} split of {entry.data_dir}, {entry.slices} slices" if entry.split
                     else "unknown (being written, or made by an older brainvq)")
        last_used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        print(f"{entry.key}  {_mib(entry.size):>10}  last used {last_used}  {made_from}")


def run_cache_clear(args: argparse.Namespace) -> None:
    from brainvq.data.cache import clear, default_cache_dir

    folder = default_cache_dir()
    removed = clear(folder, older_than_days=args.older_than)
    print(f"removed {len(removed)} entries ({_mib(sum(entry.size for entry in removed))}) from {folder}")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def raise_usage(message: str) -> None:
    build_parser().error(message)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from brainvq.runtime import reuse_freed_memory  # imports torch: not before --help has been answered

    reuse_freed_memory()  # the whole process is ours: see runtime.reuse_freed_memory
    handler: Callable[[argparse.Namespace], Any] = args.handler
    try:
        return int(handler(args) or 0)
    except BrainVQError as error:
        print(f"brainvq: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("brainvq: interrupted", file=sys.stderr)
        return 130
