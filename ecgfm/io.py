"""Atomic file writes and checksums: every file ecgfm writes (shards, sidecars, manifests, CSVs, checkpoints) goes
through here, so a kill at any instant leaves either the old complete file or the new complete one.

A file is written under a temporary name in its own folder (``.partial-<random>.tmp``: no ``.ckpt``/``.h5``/``.json``
suffix, so no glob for real files ever picks one up), flushed and fsynced, renamed over the target (atomic on POSIX),
and the folder is fsynced so the rename survives a power loss. A killed writer can leave a temporary file behind;
:func:`remove_partial_files` sweeps them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "PARTIAL_PREFIX",
    "PARTIAL_SUFFIX",
    "atomic_path",
    "atomic_save_torch",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_folder",
    "move_aside",
    "remove_partial_files",
    "sha256sum",
]

PARTIAL_PREFIX = ".partial-"
PARTIAL_SUFFIX = ".tmp"


def _temporary_name(path: Path) -> Path:
    return path.parent / f"{PARTIAL_PREFIX}{secrets.token_hex(8)}{PARTIAL_SUFFIX}"


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where the file system cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync folders; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path`` through, for libraries that open files by name (h5py).

    On a clean exit the temporary file is fsynced and renamed to ``path``; on an exception it is removed and
    ``path`` is left as it was. Parent folders are created. ``np.save`` adds ``.npy`` to a name: give it the file
    object of :func:`atomic_write` instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` only once the block ends without an exception."""
    if "w" not in mode:
        raise ValueError(f"atomic_write writes files: mode must contain 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like an ordinary file
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (one trailing newline) atomically; returns the path."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV with ``header`` and ``rows`` atomically, streaming the rows; returns the path."""
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically: a checkpoint path is never seen half-written."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def remove_partial_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (call before anything writes there)."""
    removed = []
    for path in Path(folder).glob(f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def move_aside(path: str | os.PathLike, name: str) -> Path:
    """Rename ``path`` to ``name`` in its folder (``name-1``, ``name-2`` ... if taken), keeping a bad file for a
    person to look at instead of deleting it; returns the new path."""
    path = Path(path)
    target, n = path.with_name(name), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{name}-{n}")
    os.rename(path, target)
    fsync_folder(path.parent)
    return target


def sha256sum(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
