"""Atomic writes: a file ecgfm writes is either the old complete file or the new complete one, never half of either,
and nothing a killed writer leaves behind is mistaken for a real file."""

from __future__ import annotations

import csv
import json
import os

import h5py
import numpy as np
import pytest

from ecgfm.io import (
    PARTIAL_PREFIX,
    PARTIAL_SUFFIX,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    remove_partial_files,
    sha256sum,
)


def test_an_error_inside_the_block_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_text(path, '{"n_segments": 1}\n')
    with pytest.raises(OSError, match="No space left"):
        with atomic_write(path, "w") as f:
            f.write('{"n_segments": 2, "sha')  # half of the new file
            f.flush()
            raise OSError(28, "No space left on device")
    assert path.read_text() == '{"n_segments": 1}\n'
    assert sorted(tmp_path.iterdir()) == [path]  # no .partial-*.tmp beside it


def test_a_completed_write_replaces_the_file_as_an_ordinary_file(tmp_path):
    path = tmp_path / "sub" / "table.bin"  # missing folders are created
    atomic_write_bytes(path, b"old")
    assert atomic_write_bytes(path, b"new contents") == path
    assert path.read_bytes() == b"new contents"
    assert sorted(path.parent.iterdir()) == [path]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by others as open() would make it, not 0600


def test_atomic_write_refuses_a_read_mode(tmp_path):
    with pytest.raises(ValueError, match="mode must contain 'w'"):
        with atomic_write(tmp_path / "x", "rb"):
            pass


def test_remove_partial_files_sweeps_only_what_a_killed_writer_left(tmp_path):
    leftover = tmp_path / f"{PARTIAL_PREFIX}0123abcd{PARTIAL_SUFFIX}"
    leftover.write_bytes(b"half a shard")
    kept = [tmp_path / "shard-00000.h5", tmp_path / "notes.tmp", tmp_path / "last.ckpt"]
    for path in kept:
        path.write_bytes(b"real")
    assert not leftover.match("*.h5") and not leftover.match("*.json") and not leftover.match("*.ckpt")
    assert remove_partial_files(tmp_path) == [leftover]
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_partial_files(tmp_path / "missing") == []


def test_csv_and_json_read_back_as_written(tmp_path):
    rows = [("rec/1", "no row in label table"), ("rec,2", 'quoted "reason"\non two lines'), ("é", 3)]
    path = atomic_write_csv(tmp_path / "skipped.csv", ("record", "reason"), iter(rows))  # a generator is streamed
    with open(path, newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [["record", "reason"], *[[str(a), str(b)] for a, b in rows]]

    data = {"shards": [{"path": "shard-00000.h5", "n_segments": 2}], "fs": 500.0, "source": None}
    path = atomic_write_json(tmp_path / "manifest.json", data)
    assert json.loads(path.read_text()) == data
    assert path.read_text().endswith("}\n")
    written = atomic_write_json(tmp_path / "path.json", {"out": tmp_path})  # a Path is written as its text
    assert json.loads(written.read_text()) == {"out": str(tmp_path)}


def test_atomic_path_gives_h5py_a_name_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "shard-00000.h5"
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        assert tmp.parent == tmp_path and tmp.name.startswith(PARTIAL_PREFIX)
        f["signal"] = np.arange(6, dtype=np.int16).reshape(2, 3)
    with pytest.raises(KeyError):
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f["signal"] = np.zeros((2, 3), np.int16)
            raise KeyError("target 'potassium' missing")
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["signal"][:], np.arange(6).reshape(2, 3))
    assert sorted(tmp_path.iterdir()) == [path]


def test_sha256sum_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom((1 << 20) + 17)  # more than one read block
    path = atomic_write_bytes(tmp_path / "weights.pt", data)
    assert sha256sum(path) == hashlib.sha256(data).hexdigest()
