"""Conversion across machines: ``ecgfm shard --part K/N`` writes one part of a conversion's shards and a part
manifest, ``ecgfm shard merge`` checks the parts and joins them into the manifest a single run writes.

Every part plans the whole conversion (the sorted record list cut into shards, as a single run does) and converts
the shards K, K+N, K+2N ...: interleaved rather than contiguous, so records of one kind that sort together (a
database's long Holter recordings) spread over all parts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ecgfm.data.convert import (
    PART_FORMAT,
    PART_PATTERN,
    PART_VERSION,
    ConversionSummary,
    _remove_stale,
    parse_part,
    part_name,
    plan_digest,
    write_part_report,
    write_report,
)
from ecgfm.data.shards import Manifest, ShardError, TargetSpec, check_shard, sidecar_path
from ecgfm.io import atomic_path


def _load_part(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: cannot be read ({err})") from err
    if not isinstance(data, dict) or data.get("format") != PART_FORMAT or data.get("version") != PART_VERSION:
        raise ShardError(f"{path}: not a part manifest of this ecgfm ({PART_FORMAT} v{PART_VERSION})")
    match = PART_PATTERN.fullmatch(path.name)
    if match is None or (int(match[1]), int(match[2])) != (data.get("part"), data.get("parts")):
        raise ShardError(
            f"{path}: its name does not match the part it holds ({data.get('part')} of {data.get('parts')})"
        )
    return data


def _find_parts(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Every part manifest in ``dirs`` (a folder, or a part manifest itself), loaded."""
    found = []
    for folder in dirs:
        if not folder.exists():
            raise FileNotFoundError(f"merge: {folder} does not exist")
        paths = [folder] if folder.is_file() else sorted(folder.glob("manifest.part-*-of-*.json"))
        paths = [p for p in paths if PART_PATTERN.fullmatch(p.name)]
        if not paths:
            raise ShardError(
                f"{folder}: no part manifest (manifest.part-K-of-N.json): run `ecgfm shard --part K/N` first"
            )
        found += [(p, _load_part(p)) for p in paths]
    return found


def _place(source: Path, target: Path) -> None:
    """Put a finished file of another part's folder into the merged folder: a hard link, else an atomic copy."""
    if target.exists() and os.path.samefile(source, target):
        return
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def merge_parts(dirs: list[str | Path] | str | Path, out: str | Path | None = None) -> ConversionSummary:
    """Check that the parts in ``dirs`` are all N parts of one plan, each shard present once and matching its
    checksums, then write the merged manifest.json, patient_keys.npy, skipped.csv and warnings.csv in ``out``.

    ``out`` defaults to the first folder; shards of parts written elsewhere are hard-linked (or copied) into it.
    The result is the folder a single run of the same conversion writes, manifest.json identical byte for byte.
    """
    dirs = [Path(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]
    if not dirs:
        raise ValueError("merge: give at least one folder holding part manifests")
    parts = _find_parts(dirs)
    first_path, first = min(parts, key=lambda item: (item[1]["part"], str(item[0])))
    n = first["parts"]
    by_part: dict[int, Path] = {}
    for path, data in parts:
        if data["parts"] != n:
            raise ShardError(
                f"{path}: part {data['part']} of {data['parts']}, but {first_path} is part {first['part']} of {n}: "
                "parts of different splits (rerun every part with the same N)"
            )
        if data["part"] in by_part:
            raise ShardError(f"{path}: part {data['part']} of {n} is also in {by_part[data['part']]}")
        for key, what in (("fingerprint", "conversion options"), ("plan", "record list"), ("manifest", "targets")):
            if data[key] != first[key]:
                raise ShardError(
                    f"{path}: part {data['part']} of {n} is from another plan ({what} differ from {first_path}): "
                    "rerun it with the same config and source"
                )
        by_part[data["part"]] = path
    missing = [k for k in range(n) if k not in by_part]
    if missing:
        names = ", ".join(part_name(k, n) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        where = " ".join(str(d) for d in dirs)
        raise ShardError(f"part{'s' * (len(missing) > 1)} {missing} of {n} missing: no {names} in {where}")
    out = Path(out) if out is not None else (dirs[0] if dirs[0].is_dir() else dirs[0].parent)
    header = first["manifest"]
    targets = {name: TargetSpec(**spec) for name, spec in header["targets"].items()}
    shards: dict[int, tuple[Path, dict[str, Any]]] = {}
    for path, data in parts:
        for entry in data["shards"]:
            index = entry["index"]
            if index in shards:
                raise ShardError(f"{path}: shard {entry['path']} is also listed in {shards[index][0]}")
            if index % n != data["part"] or not 0 <= index < first["n_shards"]:
                raise ShardError(f"{path}: shard {entry['path']} does not belong to part {data['part']} of {n}")
            shards[index] = (path, entry)
    absent = [k for k in range(first["n_shards"]) if k not in shards]
    if absent:
        owner = by_part[absent[0] % n]
        raise ShardError(f"{owner}: shard-{absent[0]:05d}.h5 is not listed ({len(absent)} shard(s) missing in all)")
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, first["n_shards"])
    results = []
    for index in range(first["n_shards"]):
        path, entry = shards[index]
        source = path.parent / entry["path"]
        if not source.is_file():
            raise ShardError(f"{source}: missing (listed in {path})")
        _place(source, out / entry["path"])
        if sidecar_path(source).is_file():
            _place(sidecar_path(source), sidecar_path(out / entry["path"]))
        problems = check_shard(
            out / entry["path"], entry["n_segments"], targets, entry["checksums"], reference=path.name
        )
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise ShardError(problems[0] + more)
        results.append(entry)
    manifest = Manifest(targets=targets, source=header["source"], metadata=header["metadata"])
    return write_report(out, manifest, results, first["table_rows"], header["source"].get("path"))


__all__ = ["merge_parts", "parse_part", "part_name", "plan_digest", "write_part_report"]
