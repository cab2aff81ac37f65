"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

The new content goes to a temporary file in the same folder, is flushed to disk, and then renamed over the
target; a rename within one file system is atomic. If writing fails (disk full, killed), the temporary file is
removed and the old file is untouched; an OSError (disk full, read-only folder, no permission) becomes an
`OutputError` that says so in one line.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from brainvq.errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on any error it is deleted."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _output_error(error, path) from None
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        with open(temporary_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, path)
    except OSError as error:
        raise _output_error(error, path) from None
    finally:
        temporary_path.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes cut short by a kill left in `folder`; returns what was removed.

    Call it only where no other process is writing into `folder` (a training run owns its run folder)."""
    stale = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _output_error(error: OSError, path: Path) -> OutputError:
    reason = error.strerror or str(error)
    kept = "the previous version is intact" if path.exists() else "nothing was written"
    return OutputError(f"cannot write ({reason}); {kept}", path)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
