"""Helpers shared by the benchmark scripts: interleaved timing, the run's environment, tables and JSON output.

Not a benchmark itself. Every script measures its variants side by side in one process, in interleaved rounds
(A, B, C, A, B, C, ...), and reports medians over the rounds: on a small shared machine the noise then hits
every variant alike, and ratios of medians stay meaningful even when absolute figures drift.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from brainvq.runtime import machine_description, reuse_freed_memory

RUNS_DIR = Path("runs")


def seconds(function: Callable[[], Any]) -> float:
    """Wall time of one call of `function`."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved(variants: dict[str, Callable[[], float]], rounds: int,
                progress: bool = True) -> dict[str, list[float]]:
    """Call every variant once per round, in turn; each call returns one measurement (e.g. images/s).

    Returns {variant: [one measurement per round]}."""
    measurements: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name, measure in variants.items():
            measurements[name].append(measure())
        if progress:
            latest = ", ".join(f"{name} {values[-1]:.4g}" for name, values in measurements.items())
            print(f"round {round_index + 1}/{rounds}: {latest}", flush=True)
    return measurements


class CpuShare:
    """CPU seconds this process (all its threads) used per wall second while the block ran, and the load.

    On the 2-core machine a figure near 2 means the benchmark had both cores to itself; well below 2, other
    processes took part of the machine and absolute figures are low (ratios measured side by side still hold
    better). Usage: `with CpuShare() as share: ...`, then `share.record()`."""

    def __enter__(self) -> CpuShare:
        self.wall, self.cpu = time.perf_counter(), _process_cpu_seconds()
        self.load_before = os.getloadavg()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = _process_cpu_seconds() - self.cpu
        self.load_after = os.getloadavg()

    def record(self) -> dict[str, Any]:
        return {"wall_seconds": self.wall, "cpu_seconds": self.cpu, "cpu_per_wall": self.cpu / self.wall,
                "load_average_before": self.load_before, "load_average_after": self.load_after}

    def line(self) -> str:
        return (f"this process used {self.cpu / self.wall:.2f} CPU-seconds per wall second over "
                f"{self.wall:.0f} s of measurement ({os.cpu_count()} CPUs); 1-minute load average "
                f"{self.load_before[0]:.1f} before, {self.load_after[0]:.1f} after")


def _process_cpu_seconds() -> float:
    times = os.times()  # this process and its children that have finished (data_pipeline's training runs)
    return times.user + times.system + times.children_user + times.children_system


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def cpu_identity() -> dict[str, Any]:
    """CPU model name, family and model numbers from /proc/cpuinfo (empty where unavailable)."""
    identity: dict[str, Any] = {}
    keys = {"model name": "model_name", "cpu family": "family", "model": "model"}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and keys[key] not in identity:
                    identity[keys[key]] = value.strip()
                if not line.strip():
                    break  # the first processor's block is enough
    except OSError:
        pass
    return identity


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Set the process up as brainvq's command does (freed memory kept for reuse, unless --malloc-defaults), and
    return what a result needs to be read later: date, machine, torch version and threads, load at the start."""
    kept = False if args.malloc_defaults else reuse_freed_memory()
    return {
        "reuse_freed_memory": kept,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "cpu": cpu_identity(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """--quick (tiny sizes: a smoke check in seconds, figures meaningless) and --json (where the result goes)."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one round: checks that the script runs, its figures mean nothing")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc's malloc as it is (brainvq itself keeps freed memory for reuse): shows "
                             "what brainvq.runtime.reuse_freed_memory gains")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"result file (default {RUNS_DIR}/bench_{name}.json, or _quick.json with --quick)")


def json_path(args: argparse.Namespace, name: str) -> Path:
    if args.json is not None:
        return args.json
    return RUNS_DIR / f"bench_{name}{'_quick' if args.quick else ''}.json"


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (ready for RESULTS.md); floats get 3 significant digits or 1 decimal, whichever is longer."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(holds: bool) -> str:
    return "holds" if holds else "DOES NOT HOLD"
