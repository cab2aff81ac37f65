"""Fault injection: kill -9 `brainvq train-vqvae` and `brainvq train-prior` at random moments, resume, check.

Each job, a VQ-VAE run and then a prior on it, runs as real subprocesses (`python -m brainvq ...`). Each process
is killed with SIGKILL at a moment drawn from a seeded RNG, then the job goes on with `--resume`, again and again.
The last process runs to the end. A kill moment is one of two kinds, each drawn half the time:

- "write": the moment the n-th temporary file of an atomic write (checkpoint, metrics.jsonl, config.json, code
  grids) appears in the job's folders, n = 1..5 drawn. The kill then lands in, or just after, that write. A
  checkpoint write makes two: brainvq.atomic's `.<name>.<random>.tmp`, then the `.tmp<random>` into which
  safetensors writes the file before renaming it onto the first. An epoch that improves on the best checkpoint
  makes five: best.safetensors (2), last.safetensors (2), metrics.jsonl (1).
- "timed": u x (S + E) seconds after the process starts, u uniform in [0, 1.2) drawn, where S (start-up: imports,
  data, code grids, loading the checkpoint) and E (one epoch) are medians of what the job's processes took so far.
  Until a first checkpoint has been timed, every kill is a "write" kill.

The main campaigns (`--kills`, and tests/test_faults.py) count both kinds from the moment the job has a checkpoint
to resume from: the start of every resumed process, but the end of the first epoch of a new run (a "timed" kill
then waits u x E). The early kills (`--early-kills`) come from the start of a new run instead, each in a run of
its own, so they also land before the first checkpoint: in start-up, in config.json or code-grid writes, in the
first epoch, or in the first checkpoint write.

After each kill the driver checks:
- every checkpoint file present loads (`brainvq.checkpoint.load_checkpoint`), and every JSON, JSON-lines and
  .npy file parses;
- the history in last.safetensors holds epochs 1..c, and metrics.jsonl holds epochs 1..m, each once and in order;
- nothing finished was lost: finished <= c <= finished + 1, where "finished" is the last epoch known to be saved
  before this kill: the last one a process announced (the loop prints "epoch k: ..." after writing its checkpoint
  and metrics.jsonl), or the checkpoint found after an earlier kill;
- metrics.jsonl is at most the epoch in flight behind: announced <= m <= c and m >= c - 1 (the loop rewrites it
  just after the checkpoint, and a resumed process rewrites it from the checkpoint's history first thing);
- the next process (`--resume`, or a new run where no config.json was written yet) does not fail, and the first
  epoch it announces is c + 1.

Epochs lost by a kill = finished - c: finished epochs whose work has to be redone. The epoch in flight is expected
to be lost and is not counted. At the end each job's metrics.jsonl and checkpoint history must hold epochs 1..N
exactly once. Unless `--no-reference` is given, the final checkpoint must also match, bit for bit, that of one
uninterrupted run of the same job.

When a process fails on its own, the driver records the failure and recovers as a user would: it deletes the
job's folder and starts the job again. Any epochs finished before that count as lost.
A process that finishes the whole run before its kill moment makes the job 2 epochs longer (`--epochs`, which
`--resume` may change), so every requested kill happens.

Run from the repository root (about 6 s per kill on the 2-core development CPU):

    python benchmarks/fault_injection.py [--kills 50] [--early-kills 6] [--seed 0] [--no-reference]
                                         [--work runs/fault_injection] [--json runs/fault_injection.json]

It writes a summary and one record per kill to the JSON file. tests/test_faults.py runs the same driver with
5 kills per job.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainvq.checkpoint import load_checkpoint
from brainvq.errors import CheckpointError

LAST = "checkpoints/last.safetensors"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
# Small and quick: one step of 8 images per epoch, an 8x down-sampling VQ-VAE, a 2-layer PixelCNN.
SLICES_PER_SPLIT = {"train": 8, "validate": 4, "test": 4}
TRAIN_OPTIONS = ["--batch-size", "8", "--max-minutes", "0"]
VQVAE_MODEL = ["--downsample", "8"]
PRIOR_MODEL = ["--channels", "8", "--layers", "2"]
POLL_SECONDS = 0.001
EXTRA_EPOCHS = 2
TIMING_KEYS = ("images_per_second", "epoch_seconds", "elapsed_seconds")
ANNOUNCED = re.compile(r"epoch (\d+): ")


@dataclass
class Job:
    """One training job, and where its files and its atomic writes' temporary files go."""

    name: str
    folder: Path  # holds the job's config.json, metrics.jsonl and checkpoints/
    new_arguments: list[str]  # brainvq arguments that start the run, without --epochs
    resume_arguments: list[str]  # brainvq arguments that continue it, without --epochs
    epochs: int
    watched: tuple[Path, ...]  # folders the job writes into (not recursive)

    def arguments(self, resume: bool) -> list[str]:
        return [*(self.resume_arguments if resume else self.new_arguments), "--epochs", str(self.epochs)]


def vqvae_job(data: Path, run: Path, epochs: int) -> Job:
    return Job("train-vqvae", run, ["train-vqvae", "--data", str(data), "--out", str(run), *VQVAE_MODEL,
                                    *TRAIN_OPTIONS],
               ["train-vqvae", "--out", str(run), "--resume", *TRAIN_OPTIONS], epochs, (run, run / "checkpoints"))


def prior_job(run: Path, epochs: int) -> Job:
    folder = run / "prior"
    return Job("train-prior", folder, ["train-prior", str(run), *PRIOR_MODEL, *TRAIN_OPTIONS],
               ["train-prior", str(run), "--resume", *TRAIN_OPTIONS], epochs,
               (folder, folder / "checkpoints", run / "codes"))


def small_cohort(source: Path, target: Path, sizes: dict[str, int] = SLICES_PER_SPLIT) -> Path:
    """Copy `sizes[split]` evenly spaced slices of each split of the OASIS-layout folder `source` to `target`."""
    for split, count in sizes.items():
        files = sorted((source / f"keras_png_slices_{split}").iterdir())
        folder = target / f"keras_png_slices_{split}"
        folder.mkdir(parents=True)
        for index in np.linspace(0, len(files) - 1, count).round().astype(int):
            shutil.copy2(files[index], folder / files[index].name)
    return target


@dataclass(frozen=True)
class Moment:
    """When to kill: at the `nth_write`-th temporary file ("write"), or `fraction` x (S + E) seconds in ("timed")."""

    trigger: str
    nth_write: int = 1
    fraction: float = 0.0
    target: str = ""  # "write" only: count just the temporary files of this file name (e.g. "last.safetensors")


@dataclass
class Pace:
    """How long the processes of a job took so far: what "timed" kill moments are scaled by."""

    first_saves: list[float] = field(default_factory=list)  # from a process's start to its first checkpoint
    intervals: list[float] = field(default_factory=list)  # from one checkpoint to the next in one process

    @property
    def known(self) -> bool:
        return bool(self.first_saves)

    def epoch(self) -> float:
        return statistics.median(self.intervals or self.first_saves)

    def startup(self) -> float:
        return max(0.0, statistics.median(self.first_saves) - self.epoch())


def draw_moment(rng: random.Random, pace: Pace) -> Moment:
    """A "write" or a "timed" moment, half the time each; "write" while the pace is not known yet."""
    roll, nth_write, fraction = rng.random(), rng.randint(1, 5), rng.uniform(0.0, 1.2)
    if roll < 0.5 or not pace.known:
        return Moment("write", nth_write=nth_write)
    return Moment("timed", fraction=fraction)


@dataclass
class Segment:
    """One process of a job: started, then killed or ended on its own."""

    resumed: bool
    killed: bool
    returncode: int
    seconds: float  # from its start to its kill or end
    announced: list[int]  # epochs it reported as saved, in order
    error: str  # its last stderr line, when it failed on its own
    first_save: float | None = None  # seconds from its start to its first new last.safetensors
    intervals: list[float] = field(default_factory=list)  # seconds between its next checkpoints
    delay: float | None = None  # "timed" kills: the seconds waited after the anchor


def run_segment(job: Job, resume: bool, moment: Moment | None, log: Path, environment: dict[str, str], *,
                pace: Pace | None = None, after_first_checkpoint: bool = False) -> Segment:
    """Start one `python -m brainvq` process of `job`; kill it at `moment` (None: let it finish)."""
    command = [sys.executable, "-m", "brainvq", *job.arguments(resume)]
    started = time.monotonic()
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=environment)
        segment = Segment(resume, False, 0, 0.0, [], "")
        _watch(process, job, moment, pace or Pace(), after_first_checkpoint, segment)
        segment.returncode = process.wait()
    segment.seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    segment.announced = [int(epoch) for epoch in ANNOUNCED.findall(text)]
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    if segment.returncode != 0 and not segment.killed and lines:
        segment.error = lines[-1]
    return segment


def _watch(process: subprocess.Popen, job: Job, moment: Moment | None, pace: Pace, after_first_checkpoint: bool,
           segment: Segment) -> None:
    """Poll the job's folders until `moment` comes, then SIGKILL the process; fill in `segment` as it goes."""
    started = time.monotonic()
    last = job.folder / LAST
    saved = _identity(last)
    anchor = started if saved is not None or not after_first_checkpoint else None
    delay = 0.0
    if moment is not None and moment.trigger == "timed":  # start-up counts where the anchor is the start
        delay = moment.fraction * ((pace.startup() if anchor is not None else 0.0) + pace.epoch())
    seen = _temporaries(job)  # left over from earlier kills: not writes of this process
    writes, last_save = 0, None
    while process.poll() is None:
        now = time.monotonic()
        current = _identity(last)
        if current is not None and current != saved:
            if last_save is None:
                segment.first_save = now - started
            else:
                segment.intervals.append(now - last_save)
            saved, last_save = current, now
        if anchor is None and current is not None:
            anchor, seen = now, _temporaries(job)
        if moment is not None and anchor is not None:
            temporaries = _temporaries(job)
            writes += sum(1 for path in temporaries - seen if path.name.startswith(f".{moment.target}"))
            seen |= temporaries
            if writes >= moment.nth_write if moment.trigger == "write" else now - anchor >= delay:
                os.kill(process.pid, signal.SIGKILL)
                segment.killed = True
                segment.delay = delay if moment.trigger == "timed" else None
                return
        time.sleep(POLL_SECONDS)


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, modification time) of `path`, None if absent: it changes at every atomic replacement."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def is_temporary(name: str) -> bool:
    """Temporary files of atomic writes: brainvq.atomic's `.<name>.<random>.tmp`, and the `.tmp<random>` that
    safetensors' `save_file` writes first (in the same folder) and then renames onto brainvq's temporary path."""
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp"))


def _temporaries(job: Job) -> set[Path]:
    """Temporary files of atomic writes in the job's folders."""
    found = set()
    for folder in job.watched:
        try:
            with os.scandir(folder) as entries:
                found |= {Path(entry.path) for entry in entries if is_temporary(entry.name)}
        except FileNotFoundError:
            pass
    return found


@dataclass
class Inspection:
    """What a job's folders hold after a kill."""

    loaded: dict[str, int] = field(default_factory=dict)  # checkpoint file -> the epoch in its header
    corrupt: dict[str, str] = field(default_factory=dict)  # file -> why it could not be read
    checkpoint_epoch: int = 0  # epoch of last.safetensors; 0: none
    history_epochs: list[int] = field(default_factory=list)  # epochs in last.safetensors' history
    metrics_epochs: list[int] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)


def inspect(job: Job) -> Inspection:
    """Read back every file in the job's folders the way brainvq would."""
    found = Inspection(temporaries=sorted(str(path) for path in _temporaries(job)))
    for folder in job.watched:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_file() or is_temporary(path.name):
                continue
            try:
                _read(path, job, found)
            except (CheckpointError, OSError, ValueError, KeyError, TypeError) as error:
                found.corrupt[str(path)] = f"{type(error).__name__}: {error}"
    return found


def _read(path: Path, job: Job, found: Inspection) -> None:
    if path.suffix == ".safetensors":
        _, metadata = load_checkpoint(path)
        found.loaded[str(path)] = int(metadata["epoch"])
        if path == job.folder / LAST:
            found.checkpoint_epoch = int(metadata["epoch"])
            found.history_epochs = [int(record["epoch"]) for record in metadata["history"]]
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines()]
        if path == job.folder / METRICS:
            found.metrics_epochs = [int(record["epoch"]) for record in records]
    elif path.suffix == ".npy":
        np.load(path, allow_pickle=False)


def problems_after_kill(found: Inspection, finished: int, announced: int) -> list[str]:
    """What is wrong with the job's files after a kill, given the last epoch known to be saved before it and the
    last epoch a process announced."""
    problems = [f"{path} does not load: {why}" for path, why in found.corrupt.items()]
    epochs = found.checkpoint_epoch
    if found.history_epochs != list(range(1, epochs + 1)):
        problems.append(f"last.safetensors (epoch {epochs}) has history epochs {found.history_epochs}")
    metrics = found.metrics_epochs
    if metrics != list(range(1, len(metrics) + 1)):
        problems.append(f"metrics.jsonl epochs {metrics} are not 1..m, each once, in order")
    if not (announced <= len(metrics) <= epochs and len(metrics) >= epochs - 1):
        problems.append(f"metrics.jsonl has {len(metrics)} epochs; {announced} were announced and the checkpoint "
                        f"holds {epochs}")
    if not finished <= epochs <= finished + 1:
        problems.append(f"the checkpoint holds epoch {epochs}; {finished} were finished before the kill")
    return problems


class Campaign:
    """Kills of one job: each process is run, checked after its kill, and checked again by the next one."""

    def __init__(self, job: Job, logs: Path, environment: dict[str, str], after_first_checkpoint: bool) -> None:
        self.job, self.logs, self.environment = job, logs, environment
        self.after_first_checkpoint = after_first_checkpoint
        self.pace = Pace()
        self.records: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.finished = 0  # the last epoch known to be saved: announced, or found in the checkpoint after a kill
        self.announced = 0  # the last epoch a process announced as saved
        self.segments = 0
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, moment: Moment | None) -> Segment:
        """One process: `--resume` where config.json was written, else a new run."""
        job = self.job
        self.segments += 1
        segment = run_segment(job, (job.folder / CONFIG).exists(), moment, self.logs / f"{self.segments:03d}.log",
                              self.environment, pace=self.pace, after_first_checkpoint=self.after_first_checkpoint)
        if segment.first_save is not None:
            self.pace.first_saves.append(segment.first_save)
        self.pace.intervals += segment.intervals
        previous = self.records[-1] if self.records and self.records[-1]["resumed_at"] is None else None
        if previous is not None:  # the process right after a kill
            previous["resume_failed"] = segment.error or None
            previous["resumed_at"] = segment.announced[0] if segment.announced else 0
            if segment.announced and segment.announced[0] != previous["checkpoint_epoch"] + 1:
                previous["problems"].append(f"the next process began with epoch {segment.announced[0]}, "
                                            f"not {previous['checkpoint_epoch'] + 1}")
        if segment.announced != list(range(segment.announced[0], segment.announced[-1] + 1)
                                     if segment.announced else []):
            self.failures.append({"segment": self.segments, "problem": f"announced epochs {segment.announced}"})
        self.announced = max([self.announced, *segment.announced])
        self.finished = max(self.finished, self.announced)
        if segment.returncode != 0 and not segment.killed:  # failed on its own: start the job over
            self.failures.append({"segment": self.segments, "resumed": segment.resumed, "error": segment.error})
            shutil.rmtree(job.folder, ignore_errors=True)
            self.finished = self.announced = 0
            if previous is not None:  # the kill left a run that cannot go on: its epochs are lost
                previous["epochs_lost"] += previous["checkpoint_epoch"]
        elif not segment.killed and moment is not None:  # it finished before its kill moment
            job.epochs += EXTRA_EPOCHS
        return segment

    def kill(self, moment: Moment) -> dict[str, Any] | None:
        """Run a process with a kill at `moment`; the record of the kill, or None if the process ended first."""
        before = _temporaries(self.job)
        segment = self.run(moment)
        if not segment.killed:
            return None
        found = inspect(self.job)
        left = sorted(str(path) for path in _temporaries(self.job) - before)
        finished, self.finished = self.finished, max(self.finished, found.checkpoint_epoch)
        self.records.append({
            "job": self.job.name, "kill": len(self.records) + 1, "moment": dataclasses.asdict(moment),
            "delay_seconds": segment.delay, "resumed_process": segment.resumed,
            "seconds_after_start": round(segment.seconds, 3), "finished": finished, "announced": self.announced,
            "checkpoint_epoch": found.checkpoint_epoch, "metrics_epochs": len(found.metrics_epochs),
            "epochs_lost": max(0, finished - found.checkpoint_epoch),
            "checkpoints_loaded": len(found.loaded), "corrupt": found.corrupt, "temporaries_left": left,
            "temporaries": found.temporaries,
            "config_written": (self.job.folder / CONFIG).exists(),
            "problems": problems_after_kill(found, finished, self.announced), "resumed_at": None, "resume_failed": None,
        })
        return self.records[-1]

    def finish(self) -> dict[str, Any]:
        """Run the job to its end (starting it over after failures) and return everything recorded."""
        started = len(self.failures)
        last = self.run(None)
        while last.returncode != 0:
            if len(self.failures) - started > 2:
                raise RuntimeError(f"{self.job.name} keeps failing: {self.failures[-1]}")
            last = self.run(None)
        final = inspect(self.job)
        return {
            "job": self.job.name, "epochs": self.job.epochs, "records": self.records, "failures": self.failures,
            "final_announced": last.announced, "final_metrics_epochs": final.metrics_epochs,
            "final_history_epochs": final.history_epochs, "final_corrupt": final.corrupt,
            "final_temporaries": final.temporaries,
        }


def campaign(job: Job, kills: int, rng: random.Random, logs: Path, environment: dict[str, str], *,
             after_first_checkpoint: bool = False, pace: Pace | None = None, progress: bool = False) -> dict[str, Any]:
    """Kill `job` `kills` times at moments drawn from `rng`, resuming after each, then let it finish.

    `pace`: what the job's processes took in an earlier campaign (it goes on being measured here)."""
    started = time.monotonic()
    runs = Campaign(job, logs, environment, after_first_checkpoint)
    runs.pace = pace or runs.pace
    while len(runs.records) < kills:
        record = runs.kill(draw_moment(rng, runs.pace))
        if progress and record is not None:
            print(f"{job.name} kill {record['kill']}/{kills}, {_when(record)}: checkpoint epoch "
                  f"{record['checkpoint_epoch']}, finished {record['finished']}, {record['checkpoints_loaded']} "
                  f"checkpoints loaded, {len(record['corrupt'])} corrupt, {len(record['temporaries_left'])} temporary "
                  f"files left", flush=True)
    return runs.finish() | {"seconds": time.monotonic() - started, "pace": runs.pace}


def _when(record: dict[str, Any]) -> str:
    moment = record["moment"]
    if moment["trigger"] == "write":
        return f"at temporary file #{moment['nth_write']}, {record['seconds_after_start']:.1f} s in"
    return f"{record['delay_seconds']:.2f} s after the anchor, {record['seconds_after_start']:.1f} s in"


def survived(record: dict[str, Any]) -> bool:
    return not record["problems"] and not record["resume_failed"] and record["epochs_lost"] == 0


def finished_every_epoch_once(result: dict[str, Any]) -> bool:
    every = list(range(1, result["epochs"] + 1))
    return result["final_metrics_epochs"] == every and result["final_history_epochs"] == every


def differences(first: Path, second: Path) -> list[str]:
    """How two last.safetensors differ: tensor names or bits, or the history beyond timing."""
    tensors, metadata = load_checkpoint(first)
    others, other_metadata = load_checkpoint(second)
    if tensors.keys() != others.keys():
        return [f"tensor names differ: {sorted(tensors.keys() ^ others.keys())[:4]}"]
    found = [name for name in tensors if not torch.equal(tensors[name], others[name])]

    def untimed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in history]

    if untimed(metadata["history"]) != untimed(other_metadata["history"]):
        found.append("history")
    return found


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    records = result["records"]
    lost = [record["epochs_lost"] for record in records]
    return {
        "kills": len(records),
        "survived": sum(survived(record) for record in records),
        "kills_in_resumed_processes": sum(record["resumed_process"] for record in records),
        "kills_before_the_first_checkpoint": sum(record["checkpoint_epoch"] == 0 for record in records),
        "kills_leaving_a_temporary_file": sum(bool(record["temporaries_left"]) for record in records),
        "temporary_bytes_left_at_the_end": sum(Path(path).stat().st_size for path in result["final_temporaries"]
                                               if Path(path).exists()),
        "checkpoints_loaded": sum(record["checkpoints_loaded"] for record in records),
        "corrupt_files": sum(len(record["corrupt"]) for record in records),
        "resumes_failed": sum(bool(record["resume_failed"]) for record in records),
        "epochs_lost_total": sum(lost),
        "epochs_lost_max": max(lost, default=0),
        "epochs_lost_per_kill": lost,
        "metrics_one_epoch_behind_checkpoint": sum(record["metrics_epochs"] < record["checkpoint_epoch"]
                                                   for record in records),
        "problems": [problem for record in records for problem in record["problems"]],
        "failures": result["failures"],
        "epochs": result["epochs"],
        "finished_every_epoch_once": finished_every_epoch_once(result),
        "temporary_files_left_at_the_end": len(result["final_temporaries"]),
        "seconds": round(result["seconds"], 1),
    }


def summarise_early(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Kills of new runs: what became of each (its next process resumed it, started it anew, or failed)."""
    records = [record for result in results for record in result["records"]]
    return {
        "kills": len(records),
        "before_the_first_checkpoint": sum(record["checkpoint_epoch"] == 0 for record in records),
        "with_config_json_but_no_checkpoint": sum(record["checkpoint_epoch"] == 0 and record["config_written"]
                                                  for record in records),
        "resumes_failed": sum(bool(record["resume_failed"]) for record in records),
        "errors": sorted({record["resume_failed"].split(": ", 2)[-1] for record in records
                          if record["resume_failed"]}),
        "corrupt_files": sum(len(record["corrupt"]) for record in records),
        "problems": [problem for record in records for problem in record["problems"]],
        "finished_every_epoch_once": all(finished_every_epoch_once(result) for result in results),
    }


def reference_differences(job: Job, reference: Job, logs: Path, environment: dict[str, str]) -> list[str]:
    """Train `reference` (the same job in another folder) without kills; how its checkpoint differs from `job`'s."""
    reference.epochs = job.epochs
    segment = run_segment(reference, False, None, logs / "reference.log", environment)
    if segment.returncode != 0:
        return [f"the uninterrupted run failed: {segment.error}"]
    return differences(job.folder / LAST, reference.folder / LAST)


def copy_of_vqvae(run: Path, target: Path) -> Path:
    """A copy of the VQ-VAE run `run` (with its code grids, without its prior) to train another prior on."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("prior", ".*.tmp"))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50,
                        help="kills once a run has a checkpoint, half per job (default 50)")
    parser.add_argument("--early-kills", type=int, default=6,
                        help="kills of new runs from their start, half per job, each in a new run (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--no-reference", action="store_true", help="skip the uninterrupted reference runs")
    parser.add_argument("--work", type=Path, default=Path("runs/fault_injection"), help="work folder (emptied)")
    parser.add_argument("--json", type=Path, default=Path("runs/fault_injection.json"))
    args = parser.parse_args(argv)

    import brainvq
    from brainvq.data.demo import make_demo_cohort
    from brainvq.runtime import machine_description

    shutil.rmtree(args.work, ignore_errors=True)
    work = args.work.resolve()
    environment = os.environ | {"BRAINVQ_CACHE_DIR": str(work / "cache")}
    make_demo_cohort(work / "cohort", train_cases=2, val_cases=1, test_cases=1, seed=3)
    data = small_cohort(work / "cohort", work / "data")
    rng = random.Random(args.seed)
    run = work / "run"
    names = ("train-vqvae", "train-prior")

    def split(total: int) -> dict[str, int]:
        return dict(zip(names, (total // 2, total - total // 2), strict=True))

    def make_job(name: str, folder: Path, epochs: int) -> Job:
        if name == "train-vqvae":
            return vqvae_job(data, folder, epochs)
        return prior_job(copy_of_vqvae(run, folder) if folder != run else run, epochs)

    kills, early_kills = split(args.kills), split(args.early_kills)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        job = make_job(name, run, kills[name] + 3)
        logs = work / "logs" / name
        results[name] = campaign(job, kills[name], rng, logs, environment, after_first_checkpoint=True,
                                 progress=True)
        early = [campaign(make_job(name, work / "early" / f"{name}-{index}", 2), 1, rng, logs / f"early-{index}",
                          environment, pace=results[name]["pace"], progress=True)
                 for index in range(early_kills[name])]
        results[name]["early"] = early
        if not args.no_reference:
            results[name]["differs_from_uninterrupted"] = reference_differences(
                job, make_job(name, work / "reference" / name, 0), logs, environment)

    summaries = {}
    for name, result in results.items():
        summaries[name] = summarise(result) | {
            "early": summarise_early(result["early"]),
            "differs_from_uninterrupted": result.get("differs_from_uninterrupted"),
            "pace_seconds": {"start_up": round(result["pace"].startup(), 2), "epoch": round(result["pace"].epoch(), 2)},
        }
    totals = {key: sum(summary[key] for summary in summaries.values())
              for key in ("kills", "survived", "kills_leaving_a_temporary_file", "checkpoints_loaded",
                          "corrupt_files", "resumes_failed", "epochs_lost_total")}
    totals["epochs_lost_max"] = max(summary["epochs_lost_max"] for summary in summaries.values())
    totals["early_kills"] = sum(summary["early"]["kills"] for summary in summaries.values())
    totals["early_kills_leaving_a_run_that_cannot_go_on"] = sum(summary["early"]["resumes_failed"]
                                                                 for summary in summaries.values())
    summary = {
        "benchmark": "fault_injection",
        "command": "python benchmarks/fault_injection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "torch": torch.__version__,
        "brainvq_source": str(Path(brainvq.__file__).parent),  # which checkout the training processes ran
        "seed": args.seed,
        "totals": totals,
        "jobs": summaries,
        "kills": [record for result in results.values()
                  for record in [*result["records"], *(r for early in result["early"] for r in early["records"])]],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"totals": totals} | {name: {key: value for key, value in job.items()
                                                   if key not in ("epochs_lost_per_kill", "problems")}
                                            for name, job in summaries.items()}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
