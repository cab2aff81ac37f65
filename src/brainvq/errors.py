"""The project's error types.

Every error a user can cause by what they feed brainvq (data, checkpoints, settings) is one of these. Each
message is a single line that names the file (or setting) and the problem; the CLI prints it and exits non-zero
instead of showing a traceback.
"""

from __future__ import annotations

from pathlib import Path


class BrainVQError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        message = problem if path is None else f"{path}: {problem}"
        super().__init__(" ".join(message.split()))  # one line, whatever the problem text held


class DataError(BrainVQError):
    """A data file or folder that cannot be used (missing, unreadable, wrong size, bad name...)."""


class CheckpointError(BrainVQError):
    """A checkpoint or run folder that cannot be loaded (not safetensors, wrong keys, shapes or dtypes)."""


class ConfigError(BrainVQError):
    """A setting or config file with an invalid value."""


class TrainingError(BrainVQError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is left intact."""


class OutputError(BrainVQError):
    """An output file cannot be written (disk full, read-only folder); any previous version is left intact."""
