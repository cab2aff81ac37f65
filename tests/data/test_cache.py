"""The slice cache folder: listing, clearing and the automatic clean-up."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from brainvq.data import cache
from brainvq.data.cache import CacheEntry, clear, list_entries
from brainvq.data.dataset import load_split

DAY = 24 * 3600


def fake_entry(folder: Path, name: str, *, days_unused: float, size: int = 10, index: bool = True) -> str:
    """An entry named after `name` (its key: `name` repeated to 40 hex digits), last used `days_unused` ago."""
    key = (name * 40)[:40]
    images, index_path = cache.entry_paths(folder, key)
    folder.mkdir(parents=True, exist_ok=True)
    images.write_bytes(bytes(size))
    paths = [images]
    if index:
        index_path.write_text(json.dumps({"made_from": {"data_dir": "/data", "split": "train"}, "files": ["a.png"]}))
        paths.append(index_path)
    aged(*paths, days=days_unused)
    return key


def aged(*paths: Path, days: float) -> None:
    moment = time.time() - days * DAY
    for path in paths:
        os.utime(path, (moment, moment))


def keys(folder: Path) -> set[str]:
    return {entry.key for entry in list_entries(folder)}


def test_list_entries_says_what_each_entry_holds_most_recently_used_first(oasis_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    test, validate = (load_split(oasis_dir, split, cache_dir=folder) for split in ("test", "validate"))
    aged(*cache.entry_paths(folder, validate.key), days=2)
    entries = list_entries(folder)
    assert [entry.key for entry in entries] == [test.key, validate.key]
    assert entries[0] == CacheEntry(key=test.key, files=entries[0].files, size=entries[0].size,
                                    last_used=entries[0].last_used, complete=True, data_dir=str(oasis_dir.resolve()),
                                    split="test", slices=len(test.files))
    assert entries[0].size == sum(path.stat().st_size for path in entries[0].files) > 32 * 256 * 256
    assert list_entries(tmp_path / "no such folder") == []


def test_opening_an_entry_records_its_use(oasis_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    key = load_split(oasis_dir, "test", cache_dir=folder).key
    aged(*cache.entry_paths(folder, key), days=40)
    load_split(oasis_dir, "test", cache_dir=folder)
    assert list_entries(folder)[0].last_used > time.time() - DAY


def test_a_new_entry_removes_the_entries_unused_for_too_long_and_stale_temporaries(
    oasis_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "cache"
    old = fake_entry(folder, "a", days_unused=cache.MAX_UNUSED_DAYS + 1)
    recent = fake_entry(folder, "b", days_unused=cache.MAX_UNUSED_DAYS - 1)
    being_written = fake_entry(folder, "c", days_unused=0, index=False)  # images renamed, index yet to come
    stale, fresh = folder / f".{old}.uint8.x1.tmp", folder / f".{recent}.uint8.x2.tmp"
    stale.write_bytes(b"killed"), fresh.write_bytes(b"being written")
    aged(stale, days=2)
    (folder / "notes.txt").write_text("not ours")
    aged(folder / "notes.txt", days=400)

    new = load_split(oasis_dir, "test", cache_dir=folder).key
    assert keys(folder) == {recent, being_written, new}
    assert not stale.exists() and fresh.exists() and (folder / "notes.txt").exists()


def test_beyond_the_size_cap_the_least_recently_used_entries_go_but_never_the_new_one(
    oasis_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cache"
    oldest, older, newer = (fake_entry(folder, name, days_unused=days, size=100_000) for name, days in
                            (("a", 3), ("b", 2), ("c", 1)))
    # Room for the new entry (32 slices and an index of a few KB) and one fake one: the other two must go.
    monkeypatch.setattr(cache, "MAX_TOTAL_BYTES", 32 * 256 * 256 + 150_000)
    new = load_split(oasis_dir, "test", cache_dir=folder).key
    assert keys(folder) == {newer, new} and not {oldest, older} & keys(folder)

    monkeypatch.setattr(cache, "MAX_TOTAL_BYTES", 0)
    assert load_split(oasis_dir, "validate", cache_dir=folder).images.shape[0] == 32  # kept, though over the cap
    assert len(keys(folder)) == 1


def test_clear_removes_all_entries_or_the_unused_ones_but_no_write_in_progress(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    old = fake_entry(folder, "a", days_unused=10)
    recent = fake_entry(folder, "b", days_unused=1)
    being_written = fake_entry(folder, "c", days_unused=0, index=False)
    killed = fake_entry(folder, "d", days_unused=3, index=False)  # its build died between images and index
    temporary = folder / f".{recent}.json.x1.tmp"
    temporary.write_bytes(b"being written")
    (folder / "notes.txt").write_text("not ours")

    assert {entry.key for entry in clear(folder, older_than_days=5)} == {old}
    assert keys(folder) == {recent, being_written, killed}
    assert {entry.key for entry in clear(folder)} == {recent, killed}
    assert keys(folder) == {being_written}
    assert temporary.exists() and (folder / "notes.txt").exists()
    assert clear(tmp_path / "no such folder") == []
