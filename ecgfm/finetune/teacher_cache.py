"""``ecgfm distill-cache``: run a teacher checkpoint once over a shard folder and store its raw outputs in the shards.

Each head's output goes to target ``teacher_<head>`` (kind ``regression``, one column per output) of every shard, and
``manifest.json`` records the checkpoint and its sha256 under ``source.teacher_cache``; a student fitted with
``teacher_cache: true`` then reads them (see :class:`ecgfm.finetune.distillation.Distiller`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ecgfm.data.checksums import array_checksum
from ecgfm.data.shards import MANIFEST_NAME, Manifest, ShardError, TargetSpec, open_shard, update_checksums
from ecgfm.finetune.distillation import CACHE_KEY, head_signature, teacher_target
from ecgfm.heads import Head
from ecgfm.io import atomic_path, sha256sum
from ecgfm.tasks import FineTuneTask

__all__ = ["TEACHER_UNITS", "cache_teacher_outputs"]

TEACHER_UNITS = "raw teacher output"


def _column_names(head: Head, width: int) -> list[str]:
    labels = list(head.labels)
    if width == len(labels):
        return labels
    if width == 2 * len(labels):  # a gaussian_nll regression: means, then log-variances
        return [*labels, *(f"{label}_log_var" for label in labels)]
    if width == len(labels) - 1:  # an ordinal head: the logit of P(y > level k)
        return [f"above_{label}" for label in labels[:-1]]
    return [f"output_{i}" for i in range(width)]


@torch.inference_mode()
def _shard_outputs(teacher: FineTuneTask, path: Path, batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    with open_shard(path) as f:
        n = f["signal"].shape[0]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in teacher.heads}
        for start in range(0, n, batch_size):
            signal = torch.from_numpy(f["signal"][start : start + batch_size]).to(device)
            lead_mask = torch.from_numpy(f["lead_mask"][start : start + batch_size]).to(device)
            for name, value in teacher(signal, lead_mask).items():
                parts[name].append(value.float().cpu().numpy())
    return {name: np.concatenate(values) if values else np.zeros((0, 0), np.float32) for name, values in parts.items()}


def _rewrite_shard(
    path: Path, add: dict[str, tuple[TargetSpec, np.ndarray, dict]], drop: set[str]
) -> dict[str, str | None]:
    """Copy the shard with targets ``drop`` left out and ``add`` (spec, values, extra attributes) written, then
    rename it over the original (atomically: a kill leaves the old shard); returns the changed dataset checksums
    (None: dropped), hashed from the values written."""
    changed: dict[str, str | None] = {f"/targets/{name}": None for name in drop}
    with atomic_path(path) as tmp, h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
        dst.attrs.update(dict(src.attrs))
        for key in src:
            if key != "targets":
                src.copy(src[key], dst, name=key)  # H5Ocopy keeps the layout: /signal stays contiguous
        group = dst.create_group("targets")
        group.attrs.update(dict(src["targets"].attrs))
        for key in src["targets"]:
            if key not in drop and key not in add:
                src.copy(src["targets"][key], group, name=key)
        for name, (spec, values, attrs) in add.items():
            values = values.astype(np.float32)
            dset = group.create_dataset(name, data=values)
            dset.attrs.update({"names": spec.names, "units": spec.units, "kind": spec.kind, **attrs})
            changed[f"/targets/{name}"] = array_checksum(values)
    return changed


def cache_teacher_outputs(teacher: str, root: str, batch_size: int = 64, device: str = "auto") -> dict[str, Any]:
    """Run a teacher checkpoint over every segment of a shard folder and store its raw outputs in the shards.

    Each head's output goes to target ``teacher_<head>`` (``[N, outputs]`` float32, kind ``regression``, units
    ``raw teacher output``) of every shard; each shard is rewritten to a temporary file and renamed into place.
    ``manifest.json`` lists the new targets and records the checkpoint, its sha256 and each head's kind, target,
    labels and standardisation under ``source.teacher_cache``. Running it again (e.g. with a new teacher) replaces
    the previous cache; the manifest drops the old one first, so an interrupted run leaves no stale cache behind.

    Args:
        teacher: a FineTuneTask checkpoint (``.ckpt``).
        root: the shard folder (with manifest.json).
        batch_size: segments per teacher forward pass.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
    """
    root_path, ckpt = Path(root), Path(teacher)
    manifest = Manifest.load(root_path)
    model = FineTuneTask.load_frozen(ckpt)
    digest = sha256sum(ckpt)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model.to(dev)
    model.check_data(manifest, root_path / MANIFEST_NAME)  # the teacher's rate, length and leads

    previous = manifest.source.get(CACHE_KEY) or {}
    stale = {teacher_target(h) for h in previous.get("heads", {})}
    wanted = {name: teacher_target(name) for name in model.heads}
    clash = [t for t in wanted.values() if t in manifest.targets and t not in stale]
    if clash:
        raise ShardError(f"{root_path}: targets {clash} exist and are not cached teacher outputs; not overwriting them")
    if previous:  # forget the old cache before touching a shard
        manifest.source.pop(CACHE_KEY)
        for name in stale:
            manifest.targets.pop(name, None)
        manifest.save(root_path)

    n_leads, n_samples = len(manifest.lead_names), int(manifest.n_samples)
    with torch.inference_mode():
        probe = model(torch.zeros(1, n_leads, n_samples, dtype=torch.int16, device=dev))
    specs = {
        wanted[name]: TargetSpec("regression", _column_names(model.heads[name], out.shape[1]), TEACHER_UNITS)
        for name, out in probe.items()
    }
    for entry in manifest.shards:
        path = root_path / entry["path"]
        outputs = _shard_outputs(model, path, batch_size, dev)
        add = {}
        for name, values in outputs.items():
            spec = specs[wanted[name]]
            values = values.reshape(-1, len(spec.names))
            if not np.isfinite(values).all():
                raise ShardError(f"{path}: the teacher's head {name!r} gave non-finite outputs")
            add[wanted[name]] = (spec, values, {"teacher_sha256": digest, "teacher_head": name})
        update_checksums(root_path, entry, _rewrite_shard(path, add, stale))  # the sidecar's too
        if "sha256" in entry:
            entry["sha256"] = sha256sum(path)

    manifest.targets.update(specs)
    manifest.source[CACHE_KEY] = {
        "checkpoint": str(ckpt.resolve()),
        "sha256": digest,
        "heads": {
            name: {**head_signature(head), "reference": head.distillation_reference()}
            for name, head in model.heads.items()
        },
    }
    manifest.save(root_path)
    return manifest.source[CACHE_KEY]
