"""Data pipeline and cost growth: does loading keep up with training, and how do time and memory grow with data?

Three measurements on demo cohorts (`brainvq.api.make_demo_data`, written under `--workdir`, with the slice
cache in `--workdir/cache` via BRAINVQ_CACHE_DIR so that nothing outside it is touched):

1. Loading against training, on the largest cohort, interleaved over rounds: images/s that the training loop's
   own DataLoader (`training.loop.epoch_loader` over `SliceDataset`, i.e. the uint8 memmap cache) delivers
   over a whole epoch; images/s that the default VQ-VAE training step (bf16 + channels_last, the loop's own
   step, see train_throughput.py) consumes on batches from that loader; and the two together, one step per
   batch as the loop does.
2. Cost growth: one epoch of real training (`brainvq.api.train_vqvae`, default model and batch size, validation
   and checkpoints included) at 1x, 2x and 4x the training cases (default 4, 8, 16 cases of 32 slices), each in
   a fresh Python process so that peak memory is per size. A control run trains the 1x cohort for as many
   epochs as make the steps of the largest cohort's epoch: memory that grows with the number of steps, not with
   the data, shows there too. Sizes are interleaved over `--repeats`.
3. Peak memory of those runs: the peak resident set (VmHWM of the child's own address space; its ru_maxrss is
   recorded too but not used, because on Linux it carries the parent's peak over fork and exec) and the peaks,
   sampled every 20 ms, of its anonymous part (heap: model, activations, batches) and its file-backed part
   (mapped files, among them the memmap cache, whose pages count as resident once read but belong to the page
   cache and are reclaimable).
   The first (1x) size is the "short training run at the default batch size".

The JSON also records how long `load_split` took per cohort in this run: it decodes the PNGs into the cache when
the cohort is new (the first run on a fresh `--workdir`) and only maps the existing cache otherwise.
Run from the repository root:

    python benchmarks/data_pipeline.py [--train-cases 4 8 16] [--repeats 2] [--rounds 3] [--steps 4]
                                       [--workdir runs/bench_data_pipeline] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    CpuShare,
    add_output_arguments,
    environment,
    interleaved,
    json_path,
    median,
    seconds,
    table,
    write_json,
)
from torch.utils.data import DataLoader
from train_throughput import vqvae_step

from brainvq.api import make_demo_data, train_vqvae
from brainvq.config import VQVAE_BATCH_SIZE, TrainConfig, VQVAEConfig
from brainvq.data.dataset import SliceDataset, load_split
from brainvq.training.loop import epoch_loader

RESULT_PREFIX = "RESULT "
QUICK_MODEL = VQVAEConfig(channels=8, residual_channels=4, code_dim=8)  # --quick: a tiny network, same data


class MemoryWatch:
    """Samples /proc/self/status in a thread; keeps the peak of VmRSS, RssAnon and RssFile (kB)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def read(cls) -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in cls.FIELDS:
                    values[key] = int(value.split()[0])
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in self.read().items():
                self.peaks[key] = max(self.peaks[key], value)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in self.read().items():
            self.peaks[key] = max(self.peaks[key], value)


def child(data_dir: Path, run_dir: Path, epochs: int, quick: bool) -> None:
    """`epochs` epochs of `train_vqvae` in this (fresh) process; prints time and memory as one JSON line."""
    at_start = MemoryWatch.read()
    config = TrainConfig(epochs=epochs, max_minutes=None, batch_size=VQVAE_BATCH_SIZE, val_images=32)
    with MemoryWatch() as watch:
        started = time.perf_counter()
        history = train_vqvae(data_dir, run_dir, train_config=config, progress=False,
                              model_config=QUICK_MODEL if quick else None)
        total = time.perf_counter() - started
    train_seconds, steps_before = 0.0, 0
    for record in history:  # training time alone: the loop's images/s covers the steps, not the validation
        train_seconds += (record["step"] - steps_before) * config.batch_size / record["images_per_second"]
        steps_before = record["step"]
    result = {"steps": steps_before, "images": steps_before * config.batch_size, "train_seconds": train_seconds,
              "seconds_with_validation": sum(record["epoch_seconds"] for record in history), "call_seconds": total,
              "peak_kb": watch.peaks, "start_kb": at_start,
              "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(data_dir: Path, run_dir: Path, epochs: int, quick: bool, cache_dir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(data_dir), str(run_dir), "--child-epochs", str(epochs)]
    command += ["--quick"] if quick else []
    environment_variables = os.environ | {"BRAINVQ_CACHE_DIR": str(cache_dir)}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment_variables, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise SystemExit(f"training child failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def cohort(workdir: Path, train_cases: int) -> Path:
    """A demo cohort with `train_cases` training cases and one validation and one test case (made once)."""
    folder = workdir / f"cohort_{train_cases}"
    if not (folder / "keras_png_slices_train").is_dir():
        make_demo_data(folder, train_cases=train_cases, val_cases=1, test_cases=1, seed=0)
    return folder


def loading_against_training(data_dir: Path, cache_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: images/s of the loader alone, of training steps alone, and of both as the loop runs them."""
    train_set = SliceDataset(load_split(data_dir, "train", cache_dir=cache_dir))
    batch_size = VQVAE_BATCH_SIZE
    step = vqvae_step("bf16", False, batch_size, QUICK_MODEL if args.quick else VQVAEConfig())
    epochs = itertools.count(1)

    def loader() -> DataLoader:  # the training loop's own loader of one epoch
        return epoch_loader(train_set, TrainConfig(batch_size=batch_size), next(epochs), torch.device("cpu"))

    def loading() -> float:
        delivered = 0

        def run() -> None:
            nonlocal delivered
            for images, _ in loader():
                delivered += len(images)
        elapsed = seconds(run)
        return delivered / elapsed

    def training_only() -> float:
        batches = [batch for batch, _ in zip(loader(), range(args.steps), strict=False)]

        def run() -> None:
            for batch in batches:
                step.batch = batch
                step()
        return len(batches) * batch_size / seconds(run)

    def together() -> float:
        def run() -> None:
            for batch, _ in zip(loader(), range(args.steps), strict=False):
                step.batch = batch
                step()
        return args.steps * batch_size / seconds(run)

    step()  # warm-up: the first step allocates and picks kernels, the first pass faults in the cache's pages
    loading()
    rates = interleaved({"loader": loading, "training step": training_only, "loader + training": together},
                        args.rounds)
    return {"images": len(train_set), "images_per_second": rates,
            "images_per_second_median": {name: median(values) for name, values in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-cases", type=int, nargs="+", default=[4, 8, 16], help="1x, 2x, 4x, ...")
    parser.add_argument("--repeats", type=int, default=2, help="training runs per size (each in a fresh process)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the loading-against-training part")
    parser.add_argument("--steps", type=int, default=4, help="training steps per round in that part")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_data_pipeline"))
    parser.add_argument("--child", nargs=2, type=Path, metavar=("DATA", "RUN"), help=argparse.SUPPRESS)
    parser.add_argument("--child-epochs", type=int, default=1, help=argparse.SUPPRESS)
    add_output_arguments(parser, "data_pipeline")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.child_epochs, quick=args.quick)
        return
    if args.quick:
        args.train_cases, args.repeats, args.rounds, args.steps = [1, 2], 1, 1, 1
        args.workdir = args.workdir.with_name(args.workdir.name + "_quick")
    env = environment(args)
    cache_dir = args.workdir / "cache"

    cohorts, loads = {}, {}
    for cases in args.train_cases:
        cohorts[cases] = cohort(args.workdir, cases)
        started = time.perf_counter()
        slices = load_split(cohorts[cases], "train", cache_dir=cache_dir)  # builds the cache if it is new
        loads[cases] = {"seconds": time.perf_counter() - started, "images": len(slices.images)}
        load_split(cohorts[cases], "validate", cache_dir=cache_dir)

    print("part 1: loading against training", flush=True)
    with CpuShare() as pipeline_share:
        pipeline = loading_against_training(cohorts[args.train_cases[-1]], cache_dir, args)

    print("part 2: one epoch per size, each in a fresh process", flush=True)
    base_cases = args.train_cases[0]
    # (cases, epochs); the control trains the smallest cohort for as many steps as the largest cohort's epoch.
    sizes = [(cases, 1) for cases in args.train_cases] + [(base_cases, args.train_cases[-1] // base_cases)]
    sizes = list(dict.fromkeys(sizes))
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {size: [] for size in sizes}
    with CpuShare() as growth_share:
        for repeat in range(args.repeats):
            for cases, epochs in sizes:
                run_dir = args.workdir / "runs" / f"cases{cases}_epochs{epochs}_repeat{repeat}_{os.getpid()}"
                runs[cases, epochs].append(run_child(cohorts[cases], run_dir, epochs, args.quick, cache_dir))
                latest = runs[cases, epochs][-1]
                print(f"{cases} cases x {epochs} epochs: {latest['images']} images, train "
                      f"{latest['train_seconds']:.1f} s, peak RSS {latest['peak_kb']['VmHWM'] / 1024:.0f} MiB",
                      flush=True)

    rates = pipeline["images_per_second_median"]
    print(f"\ndata pipeline, {env['machine']}, torch {env['torch']}, {env['threads']} threads; "
          f"{pipeline['images']} training slices, medians of {args.rounds} rounds")
    print(table(["what", "images/s"], [[name, rate] for name, rate in rates.items()]))
    print(f"the loader alone is {rates['loader'] / rates['training step']:.0f}x faster than training consumes; "
          f"with loading, training runs at {rates['loader + training'] / rates['training step']:.0%} of its "
          "speed on ready batches")
    print(pipeline_share.line())

    base_seconds = median([run["train_seconds"] for run in runs[base_cases, 1]])
    rows, growth = [], []
    for cases, epochs in sizes:
        done = runs[cases, epochs]
        train_seconds = median([run["train_seconds"] for run in done])
        peak = {key: median([run["peak_kb"][key] for run in done]) / 1024 for key in MemoryWatch.FIELDS}
        start = median([run["start_kb"]["VmRSS"] for run in done]) / 1024
        cache_mib = loads[cases]["images"] * 256 * 256 / 2**20
        images = done[0]["images"]
        growth.append({"train_cases": cases, "epochs": epochs, "images_trained": images,
                       "train_seconds": train_seconds,
                       "seconds_with_validation": median([run["seconds_with_validation"] for run in done]),
                       "peak_mib": peak, "rss_after_imports_mib": start, "cache_mib": cache_mib,
                       "load_split_seconds": loads[cases]["seconds"], "runs": done})
        label = f"{cases // base_cases}x ({cases} cases)" + (f", {epochs} epochs (control)" if epochs > 1 else "")
        rows.append([label, images, train_seconds, f"{train_seconds / base_seconds:.2f}x",
                     1000 * train_seconds / images, growth[-1]["seconds_with_validation"], start, peak["VmHWM"],
                     peak["RssAnon"], peak["RssFile"], cache_mib])
    print(f"\ncost growth: train_vqvae, one epoch per size (the control: the 1x cohort for as many steps as the "
          f"largest), a fresh process each, medians of {args.repeats}")
    print(table(["data", "images trained", "train s", "time vs 1x", "ms per image", "s with validation",
                 "RSS after imports MiB", "peak RSS MiB", "peak anon MiB", "peak file MiB", "cache MiB"], rows))
    print(growth_share.line())
    write_json(json_path(args, "data_pipeline"), {
        "benchmark": "data_pipeline", **env, "quick": args.quick, "batch_size": VQVAE_BATCH_SIZE,
        "loading_against_training": pipeline, "cost_growth": growth,
        "cpu_share": {"loading_against_training": pipeline_share.record(), "cost_growth": growth_share.record()},
        "load_split": {str(cases): value for cases, value in loads.items()}})


if __name__ == "__main__":
    main()
