"""The slice cache folder: where it is, what it holds, and keeping it bounded.

Each entry is a decoded split, ``<key>.uint8`` with its ``<key>.json`` index (written by
:mod:`brainvq.data.dataset`). An entry's last use is the newest modification time of its files:
:func:`mark_used` touches the index whenever the entry is opened. Entries are never edited, only replaced by
new ones under new keys, so a folder whose slices keep changing would grow without end; :func:`prune` runs after
every new entry is written and removes

* entries unused for more than ``MAX_UNUSED_DAYS`` days, then
* the least recently used entries while the folder holds more than ``MAX_TOTAL_BYTES``,

never the entry just written, and never anything being written by another process: temporary files (of
:mod:`brainvq.atomic`) and images whose index is not there yet are left alone until ``TEMPORARY_GRACE_SECONDS``
old, when they can only be left over from a write that was killed. Files whose names are not cache names are
never touched, whatever folder ``$BRAINVQ_CACHE_DIR`` points at.

Removing an entry that another process has open is harmless on POSIX systems: its map stays valid until
closed, and the next load decodes the split again. Where a file in use cannot be removed (Windows), it is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

_DAY = 24 * 3600
MAX_UNUSED_DAYS = 30  # a month without a load: the data or the project has moved on
MAX_TOTAL_BYTES = 10 * 2**30  # 10 GiB: full OASIS decodes to 0.7 GiB (1.4 with masks): many versions fit
TEMPORARY_GRACE_SECONDS = _DAY  # far beyond the longest decode; anything older was cut short by a kill

IMAGES_SUFFIX, INDEX_SUFFIX = ".uint8", ".json"
# "<key>.uint8", "<key>.json", and their temporaries: ".<key>.uint8.<random>.tmp" (atomic.py), or
# "<key>.uint8.<pid>.tmp" as earlier versions named them; a key is a SHA-1 in hex.
_ENTRY_FILE = re.compile(r"(?P<key>[0-9a-f]{40})\.(uint8|json)")
_TEMPORARY_FILE = re.compile(r"\.?[0-9a-f]{40}\.(uint8|json)\..+\.tmp")


@dataclass(frozen=True)
class CacheEntry:
    """One cached split. ``data_dir``, ``split`` and ``slices`` come from its index: None where the index is
    missing (being written, or left by a killed write) or older than the fields."""

    key: str
    files: tuple[Path, ...]
    size: int
    last_used: float
    complete: bool
    data_dir: str | None
    split: str | None
    slices: int | None


def default_cache_dir() -> Path:
    """``$BRAINVQ_CACHE_DIR`` if set, else ``~/.cache/brainvq``."""
    return Path(os.environ.get("BRAINVQ_CACHE_DIR") or Path.home() / ".cache" / "brainvq")


def entry_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """(images, index) of the entry ``key``."""
    return cache_dir / f"{key}{IMAGES_SUFFIX}", cache_dir / f"{key}{INDEX_SUFFIX}"


def mark_used(index_path: Path) -> None:
    """Record a use of the entry by touching its index (it is what :func:`prune` goes by)."""
    with contextlib.suppress(OSError):  # a read-only shared cache still serves; its entries age as if unused
        os.utime(index_path)


def list_entries(cache_dir: str | Path) -> list[CacheEntry]:
    """The entries of ``cache_dir``, most recently used first (none if the folder does not exist)."""
    stats: dict[str, list[tuple[Path, os.stat_result]]] = {}
    for path in _names(Path(cache_dir)):
        if match := _ENTRY_FILE.fullmatch(path.name):
            try:
                stats.setdefault(match["key"], []).append((path, path.stat()))
            except FileNotFoundError:  # removed by another process since the listing
                continue
    entries = [_entry(Path(cache_dir), key, found) for key, found in stats.items()]
    return sorted(entries, key=lambda entry: entry.last_used, reverse=True)


def clear(cache_dir: str | Path, *, older_than_days: float | None = None) -> list[CacheEntry]:
    """Remove every entry, or those unused for more than ``older_than_days``; return the removed ones.

    Writes in progress are kept (see the module's docstring); their leftovers from killed writes are removed."""
    now = time.time()
    entries = [entry for entry in list_entries(cache_dir) if not _being_written(entry, now)]
    if older_than_days is not None:
        entries = [entry for entry in entries if entry.last_used < now - older_than_days * _DAY]
    return _remove(Path(cache_dir), entries, now)


def prune(cache_dir: str | Path, *, keep: str) -> list[CacheEntry]:
    """Apply the automatic clean-up rule of the module's docstring, keeping the entry ``keep``; return the
    removed entries."""
    now = time.time()
    entries = list_entries(cache_dir)
    removable = [entry for entry in entries if entry.key != keep and not _being_written(entry, now)]
    doomed = {entry.key for entry in removable if entry.last_used < now - MAX_UNUSED_DAYS * _DAY}
    total = sum(entry.size for entry in entries if entry.key not in doomed)
    for entry in reversed(removable):  # least recently used first
        if total <= MAX_TOTAL_BYTES:
            break
        if entry.key not in doomed:
            doomed.add(entry.key)
            total -= entry.size
    return _remove(Path(cache_dir), [entry for entry in removable if entry.key in doomed], now)


def _names(cache_dir: Path) -> list[Path]:
    try:
        return list(cache_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entry(cache_dir: Path, key: str, found: list[tuple[Path, os.stat_result]]) -> CacheEntry:
    index_path = entry_paths(cache_dir, key)[1]
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        made_from = index.get("made_from", {})
        data_dir, split, slices = made_from.get("data_dir"), made_from.get("split"), len(index["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        data_dir = split = slices = None
    return CacheEntry(key=key, files=tuple(path for path, _ in found), size=sum(stat.st_size for _, stat in found),
                      last_used=max(stat.st_mtime for _, stat in found),
                      complete=any(path == index_path for path, _ in found), data_dir=data_dir, split=split,
                      slices=slices)


def _being_written(entry: CacheEntry, now: float) -> bool:
    """Images renamed into place whose index is still to come (dataset.py writes the index last)."""
    return not entry.complete and entry.last_used > now - TEMPORARY_GRACE_SECONDS


def _remove(cache_dir: Path, entries: list[CacheEntry], now: float) -> list[CacheEntry]:
    """Remove ``entries`` (index first: without it the images are not used) and stale temporaries."""
    removed = []
    for entry in entries:
        try:
            for path in sorted(entry.files, key=lambda path: path.suffix != INDEX_SUFFIX):
                path.unlink(missing_ok=True)
        except OSError:  # in use where that forbids removal, or no permission: it stays
            continue
        removed.append(entry)
    for path in _names(cache_dir):
        if _TEMPORARY_FILE.fullmatch(path.name):
            try:
                if path.stat().st_mtime < now - TEMPORARY_GRACE_SECONDS:
                    path.unlink()
            except OSError:
                continue
    return removed
