"""Distillation: a fine-tuned teacher (e.g. 12-lead) gives soft targets to a student (e.g. lead I) on the same segments.

``FineTuneTask(teacher=CKPT)`` runs the frozen teacher beside the student in training; each student head with a
teacher head of the same name (same kind, target and labels) adds ``distill_weight * head.distillation_loss(...)``.
``ecgfm distill-cache --teacher CKPT --root SHARDS`` instead stores the teacher's raw outputs in the shards once,
as target ``teacher_<head>`` (kind ``regression``, one column per output), and records the checkpoint and its sha256
in ``manifest.json`` under ``source.teacher_cache``; ``FineTuneTask(teacher=CKPT, teacher_cache=True)`` then reads
them instead of running the teacher, after checking that CKPT is the checkpoint they came from.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch

from ecgfm.data.shards import Manifest, ShardError, TargetSpec, open_shard
from ecgfm.zoo import sha256sum

if TYPE_CHECKING:
    from ecgfm.heads import Head
    from ecgfm.tasks import FineTuneTask

__all__ = [
    "CACHE_KEY",
    "cache_record",
    "cache_teacher_outputs",
    "head_signature",
    "load_teacher",
    "match_heads",
    "teacher_target",
]

#: ``manifest.source[CACHE_KEY]`` describes the cached teacher outputs: checkpoint, sha256 and heads.
CACHE_KEY = "teacher_cache"
TEACHER_UNITS = "raw teacher output"


def teacher_target(head: str) -> str:
    """The shard target holding the cached outputs of the teacher's head ``head``."""
    return f"teacher_{head}"


def head_signature(head: Head) -> dict[str, Any]:
    """What a student head and a teacher head must share: kind, target and labels."""
    return {"kind": head.kind, "target": head.target, "labels": list(head.labels or [])}


def load_teacher(path: str | Path) -> FineTuneTask:
    """A FineTuneTask checkpoint on the CPU, frozen and in eval mode (its own teacher, if any, is never loaded)."""
    from ecgfm.tasks import FineTuneTask

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
    teacher = FineTuneTask.load_from_checkpoint(path, map_location="cpu", teacher=None, teacher_cache=False)
    teacher.requires_grad_(False)
    return teacher.eval()


def _labels(labels: list[str]) -> str:
    return str(labels) if len(labels) <= 6 else f"[{', '.join(map(repr, labels[:5]))}, ... {len(labels)} labels]"


def match_heads(student: Mapping[str, Head], teacher: Mapping[str, dict[str, Any]], source: str) -> list[str]:
    """Names of the student heads that the teacher has, checked to agree in kind, target and labels.

    ``teacher`` maps head names to :func:`head_signature` dicts; ``source`` names the teacher in messages.
    """
    matched = [name for name in student if name in teacher]
    if not matched:
        raise ValueError(
            f"the teacher ({source}) has none of the student's heads {list(student)} (it has {list(teacher)}); "
            "distillation pairs heads by name"
        )
    for name in matched:
        s, t = head_signature(student[name]), {**teacher[name], "labels": list(teacher[name]["labels"])}
        differ = [key for key in ("kind", "target", "labels") if s[key] != t[key]]
        if differ:
            raise ValueError(
                f"head {name!r}: the teacher's head ({source}) is a {t['kind']} head on target {t['target']!r} with "
                f"labels {_labels(list(t['labels']))}, the student's a {s['kind']} head on target {s['target']!r} "
                f"with labels {_labels(s['labels'])}; distillation needs the same {', '.join(differ)}"
            )
    return matched


def cache_record(manifest: Manifest, root: str | Path = "") -> dict[str, Any]:
    """The ``teacher_cache`` entry of a manifest; a clear error when the folder has no cached teacher outputs."""
    record = manifest.source.get(CACHE_KEY)
    if not record or any(teacher_target(h) not in manifest.targets for h in record.get("heads", {})):
        raise ShardError(
            f"{Path(root) / 'manifest.json'} has no cached teacher outputs: run "
            f"`ecgfm distill-cache --teacher CKPT --root {root or 'SHARDS'}` first"
        )
    return record


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


def _rewrite_shard(path: Path, add: dict[str, tuple[TargetSpec, np.ndarray, dict]], drop: set[str]) -> None:
    """Copy the shard with targets ``drop`` left out and ``add`` (spec, values, extra attributes) written, then
    rename it over the original."""
    tmp = path.with_name(path.name + ".teacher.tmp")  # ``*.tmp``: a conversion of the folder sweeps leftovers
    try:
        with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
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
                dset = group.create_dataset(name, data=values.astype(np.float32))
                dset.attrs.update({"names": spec.names, "units": spec.units, "kind": spec.kind, **attrs})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    model = load_teacher(ckpt)
    digest = sha256sum(ckpt)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model.to(dev)

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
        _rewrite_shard(path, add, stale)
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


def run_distill_cache(argv: list[str]) -> int:
    """``ecgfm distill-cache --teacher CKPT --root SHARDS [--batch_size N] [--device auto]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="ecgfm distill-cache", description=cache_teacher_outputs.__doc__.split("\n\n")[0].strip()
    )
    parser.add_function_arguments(cache_teacher_outputs)
    cfg = {k: v for k, v in parser.parse_args(argv).as_dict().items() if k != "__path__"}
    record = cache_teacher_outputs(**cfg)
    heads = ", ".join(f"{teacher_target(h)}" for h in record["heads"])
    print(f"cached the outputs of {record['checkpoint']} (sha256 {record['sha256'][:12]}) as {heads} in {cfg['root']}")
    sys.stdout.flush()
    return 0
