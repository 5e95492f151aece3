"""What a shard was made from: the size, mtime and sha256 of every source file, so a rerun of ``ecgfm shard`` reuses
a shard only while the files it came from are unchanged, and names the file when one is not.

A record's files are its WFDB header and the data files the header names (``.dat``, ``.mat``); an arrays record
(``export.npy#17``) lives in a file shared by all records. Files every record depends on are kept apart: files named
by reader options, a source given as a file, and files directly in the source folder that belong to no record
(PTB-XL's ``ptbxl_database.csv``). The content hash decides: a file touched or copied without change is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ecgfm.io import sha256sum

__all__ = ["describe_changes", "display_name", "file_stamp", "record_files", "shared_files", "stamp_files"]

Stamp = dict[str, Any]  # {"size": bytes, "mtime_ns": int, "sha256": hex}


def file_stamp(path: Path) -> Stamp | None:
    """Size, mtime and sha256 of a file, or None where there is none."""
    try:
        stat = os.stat(path)
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256sum(path)}
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def display_name(path: Path, source: Path) -> str:
    """A file's path relative to the source folder where it lies inside it (``records/7.dat``), else as given."""
    folder, full = os.path.abspath(source), os.path.abspath(path)
    if full.startswith(folder + os.sep):
        return full[len(folder) + 1 :].replace(os.sep, "/")
    return str(path)


def record_files(record: Path, _segment: bool = False) -> list[Path]:
    """The files one record is read from: its ``.hea`` and the data files the header names (none for an arrays
    record, whose array file is a shared input; the segments' headers and data files for a multi-segment master; the
    file itself for a one-file record). A header that cannot be read names no data file: the record is then
    skipped, and a fixed header changes its hash anyway."""
    if "#" in record.name:
        return []
    header = record.parent / (record.name + ".hea")
    if not header.exists() and record.is_file():
        return [record]  # a one-file record (EDF, CPSC 2018 .mat, XML export): the path is the file
    try:
        text = header.read_text(errors="replace")
    except OSError:
        return [header]
    spec = [line for line in map(str.strip, text.splitlines()) if line and not line.startswith("#")]
    names = dict.fromkeys(line.split()[0] for line in spec[1:])  # signal lines: the file name comes first
    local = [name for name in names if name != "~" and "/" not in name and "\\" not in name]
    if spec and "/" in spec[0].split()[0] and not _segment:  # a multi-segment master: its segments' files too
        return [header, *(path for name in local for path in record_files(record.parent / name, _segment=True))]
    return [header, *(record.parent / name for name in local)]


def shared_files(
    source: Path, records: list[Path], options: dict[str, Any], exclude: Iterable[Path] = ()
) -> list[Path]:
    """Files every record may depend on: the array files of arrays records, files named by reader options, the
    source itself when it is a file, and files directly in the source folder whose name is no record's (hidden
    files and ``exclude``, e.g. the output folder's own files, left out)."""
    found: list[Path] = []
    for record in records:
        if "#" in record.name:
            found.append(record.parent / record.name.rpartition("#")[0])
    for value in _strings(options):
        if Path(value).is_file():
            found.append(Path(value))
    if source.is_file():
        found.append(source)
    elif source.is_dir():
        names = {record.name for record in records if record.parent == source}
        for path in sorted(source.iterdir()):
            own = path.name.rsplit(".", 1)[0] in names or path.name in names
            if not own and not path.name.startswith(".") and path.is_file():
                found.append(path)
    skip = {os.path.abspath(p) for p in exclude}
    unique = dict.fromkeys(Path(os.path.abspath(p)) for p in found if os.path.abspath(p) not in skip)
    return list(unique)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def stamp_files(paths: Iterable[Path], source: Path) -> dict[str, Stamp | None]:
    """``{display name: stamp}`` of each file (None for one that does not exist)."""
    return {display_name(path, source): file_stamp(path) for path in paths}


def describe_changes(recorded: dict[str, Stamp | None], current: dict[str, Stamp | None]) -> list[str]:
    """What differs between two ``stamp_files`` results, one phrase per file (``7.dat changed``); empty if nothing."""
    changes = []
    for name in [*recorded, *(n for n in current if n not in recorded)]:
        old, new = recorded.get(name), current.get(name)
        if name not in recorded:
            changes.append(f"{name} is new")
        elif name not in current:
            changes.append(f"{name} is no longer read")
        elif old is None and new is not None:
            changes.append(f"{name} appeared")
        elif new is None and old is not None:
            changes.append(f"{name} is gone")
        elif old is not None and new is not None and (old["size"], old["sha256"]) != (new["size"], new["sha256"]):
            changes.append(f"{name} changed")
    return changes
