"""Embeddings at scale: a model's pooled features for every segment of a shard folder, stored once as a feature
folder that heads train on directly (backbone ``precomputed``), and those heads put back on the model afterwards.

A feature folder mirrors its source folder: one feature shard per source shard, with the same file name, segment
order, ids, lead masks and targets, and ``/features`` (float16 ``[N, D]``) in place of ``/signal``, so the patient
split, the targets and every loader work unchanged (docs/embeddings.md). Each shard is written atomically with a
sidecar (checksums and a fingerprint of model and source), so a rerun skips the finished ones; parts of one run
(``--part K/N``, torchrun's or srun's ranks) take every N-th shard, and the part that completes the folder writes
``manifest.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ecgfm.backbones.checkpoint import load_strict
from ecgfm.backbones.config import ContractError
from ecgfm.backbones.precomputed import PRECOMPUTED
from ecgfm.data.checksums import array_checksum
from ecgfm.data.shards import (
    FEATURES_KEY,
    MANIFEST_NAME,
    Manifest,
    ShardError,
    check_shard,
    open_shard,
    patient_key,
    sidecar_path,
)
from ecgfm.io import atomic_path, atomic_write, atomic_write_json, remove_partial_files, sha256sum
from ecgfm.leads import lead_indices
from ecgfm.pretrained import ECGModel, load
from ecgfm.signal import to_millivolts

__all__ = [
    "FEATURE_DTYPE",
    "EmbedSummary",
    "embed_shards",
    "feature_model_sha256",
    "heads_on_features_model",
    "resolve_part",
    "trained_on_features",
]

FEATURE_DTYPE = np.float16
#: Bumped when what a feature shard holds changes; part of every shard's fingerprint, so old shards are redone.
FEATURE_FORMAT_VERSION = 1
#: Per-segment datasets copied from a source shard to its feature shard, as they are (``/signal`` is not).
COPIED = ("lead_mask", "record_id", "patient_id", "patient_key", "segment_start", "valid_samples")
STRINGS = ("record_id", "patient_id")


# ----------------------------------------------------------------------------------------------- the model's identity
def feature_model_sha256(model: ECGModel) -> str:
    """sha256 of what decides a model's features: its backbone config, input contract and adapter, and every
    weight and buffer outside the heads (name, dtype, shape, bytes), however the model was loaded."""
    digest = hashlib.sha256()
    contract = {key: value for key, value in model.contract().items() if key != "heads"}
    digest.update(json.dumps(contract, sort_keys=True, default=str).encode())
    for key, value in sorted(model.state_dict().items()):
        if key.startswith("heads."):
            continue
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"|{key}|{tensor.dtype}|{tuple(value.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _model_record(model: ECGModel, given: str) -> dict[str, Any]:
    """What the feature manifest says of the model: name, what was asked for, sha256, and its contract."""
    path = Path(given)
    contract = model.contract()
    return {
        "name": model.name,
        "given": str(path.resolve()) if path.exists() else given,
        "sha256": feature_model_sha256(model),
        "backbone": contract["backbone"],
        "input": contract["input"],
        "adapter": contract["adapter"],
    }


# ----------------------------------------------------------------------------------------------- parts and devices
def resolve_part(part: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, parts)``: from ``part`` (``"K/N"``), else torchrun's ``RANK``/``WORLD_SIZE``, else an srun step's
    ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``, else ``(0, 1)``."""
    env = os.environ if environ is None else environ
    if part is not None:
        rank_text, _, world_text = str(part).partition("/")
        try:
            rank, world = int(rank_text), int(world_text)
        except ValueError:
            rank, world = -1, 0
        if not 0 <= rank < world:
            raise ValueError(f"--part must be K/N with 0 <= K < N (e.g. 0/4), got {part!r}")
        return rank, world
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        if rank_key in env and world_key in env:
            rank, world = int(env[rank_key]), int(env[world_key])
            if not 0 <= rank < world:
                raise ValueError(f"{rank_key}={rank} is not a rank of {world_key}={world}")
            return rank, world
    return 0, 1


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK``/``SLURM_LOCALID`` among the visible ones) or the CPU."""
    if device != "auto":
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return torch.device("cuda", local % torch.cuda.device_count())


# ----------------------------------------------------------------------------------------------- one feature shard
def _fingerprint(model_sha256: str, size: int, source_root: Path, entry: Mapping[str, Any]) -> str:
    """What decides a feature shard's content: the model, the feature format and the source shard (its manifest
    entry with checksums; the file's sha256 where a folder recorded none)."""
    shard: dict[str, Any] = {"path": entry["path"], "n_segments": int(entry["n_segments"])}
    if entry.get("checksums"):
        shard["checksums"] = entry["checksums"]
    else:
        shard["sha256"] = sha256sum(source_root / entry["path"])
    payload = {
        "format": FEATURE_FORMAT_VERSION,
        "dtype": np.dtype(FEATURE_DTYPE).str,
        "model_sha256": model_sha256,
        "size": size,
        "source_shard": shard,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(sidecar_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _redo_reason(dest: Path, fingerprint: str, n_segments: int, size: int, source: Manifest, quick: bool) -> str | None:
    """Why the feature shard at ``dest`` must be computed (again); None when it is finished and intact: its sidecar
    has this fingerprint and the shard matches it (counts, shapes, targets and, unless ``quick``, checksums)."""
    if not dest.exists():
        return "not written yet"
    sidecar = _read_sidecar(dest)
    if sidecar is None:
        return f"{sidecar_path(dest).name} is missing or unreadable"
    if sidecar.get("fingerprint") != fingerprint:
        return "written from another model or source shard"
    problems = check_shard(
        dest,
        n_segments,
        source.targets,
        sidecar.get("checksums"),
        quick=quick,
        reference=sidecar_path(dest).name,
        data_key=FEATURES_KEY,
        row_shape=(size,),
    )
    return problems[0] if problems else None


@torch.inference_mode()
def _compute_features(
    model: ECGModel,
    source: h5py.File,
    leads: list[int],
    batch_size: int,
    device: torch.device,
    advance: Callable[[int], None],
) -> np.ndarray:
    """The features of every segment of one open source shard, float16 ``[N, D]``; the next block of int16 signal
    is read while the model runs on this one, and converted to millivolts on the device."""
    signal, n = source["signal"], source["signal"].shape[0]
    lead_mask = source["lead_mask"][:]
    out = np.empty((n, model.backbone.num_features), dtype=FEATURE_DTYPE)
    starts = list(range(0, n, batch_size))
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(signal.__getitem__, slice(0, batch_size)) if starts else None
        for i, start in enumerate(starts):
            block = pending.result()
            if i + 1 < len(starts):
                pending = reader.submit(signal.__getitem__, slice(starts[i + 1], starts[i + 1] + batch_size))
            x = to_millivolts(torch.from_numpy(block).to(device, non_blocking=True))[:, leads]
            mask = torch.from_numpy(lead_mask[start : start + len(block)]).to(device)[:, leads]
            features = model.features(x, mask).to(torch.float16)
            if not torch.isfinite(features).all():
                raise ShardError(
                    f"{source.filename}: the features of segments {start}..{start + len(block) - 1} are not finite in "
                    "float16 (NaN, or beyond ±65504)"
                )
            out[start : start + len(block)] = features.cpu().numpy()
            advance(len(block))
    return out


def _write_feature_shard(dest: Path, source: h5py.File, features: np.ndarray, attrs: Mapping[str, Any]) -> dict:
    """The feature shard: ``/features`` and the source's per-segment datasets and targets, written under a temporary
    name and renamed into place; returns the checksums of what was written (hashed from memory, not read back)."""
    n = features.shape[0]
    columns: dict[str, Any] = {}
    for name in COPIED:
        if name in STRINGS:
            columns[name] = list(source[name].asstr()[:])
        elif name in source:
            columns[name] = source[name][:]
    if "patient_key" not in columns:  # a shard of ecgfm 0.1's first writer: key the patients as today's writer does
        columns["patient_key"] = np.array([patient_key(p) for p in columns["patient_id"]], dtype=np.uint64)
    checksums = {f"/{FEATURES_KEY}": array_checksum(features)}
    with atomic_path(dest) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({**dict(source.attrs), **attrs, "n_segments": n})
        f.create_dataset(FEATURES_KEY, data=features)  # contiguous, as /signal: one pread per segment
        for name, values in columns.items():
            if name in STRINGS:
                f.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
                checksums[f"/{name}"] = array_checksum(values, "str")
            else:
                f.create_dataset(name, data=values)
                checksums[f"/{name}"] = array_checksum(values)
        group = f.create_group("targets")
        for name, dset in source["targets"].items():
            values = dset[:]
            group.create_dataset(name, data=values).attrs.update(dict(dset.attrs))
            checksums[f"/targets/{name}"] = array_checksum(values)
        if "metadata" in source:  # age, sex, site...: `ecgfm report` on the features breaks results down by them
            group = f.create_group("metadata")
            for name, dset in source["metadata"].items():
                if dset.attrs.get("kind") == "string":
                    strings = list(dset.asstr()[:])
                    copy = group.create_dataset(name, data=np.array(strings, dtype=object), dtype=h5py.string_dtype())
                    checksums[f"/metadata/{name}"] = array_checksum(strings, "str")
                else:
                    values = dset[:]
                    copy = group.create_dataset(name, data=values)
                    checksums[f"/metadata/{name}"] = array_checksum(values)
                copy.attrs.update(dict(dset.attrs))
    return dict(sorted(checksums.items()))


# ----------------------------------------------------------------------------------------------- the whole folder
@dataclass
class EmbedSummary:
    """What one ``embed_shards`` call did: shards computed (with why) and reused, and whether it wrote the manifest."""

    out: Path
    part: tuple[int, int]
    model: dict[str, Any]
    size: int
    computed: dict[str, str] = field(default_factory=dict)  # shard -> why it was computed
    reused: list[str] = field(default_factory=list)
    other_parts: int = 0  # shards left to the other parts
    manifest_written: bool = False
    waiting_for: list[str] = field(default_factory=list)  # shards of other parts not finished yet


def embed_shards(
    model: str,
    data: str,
    out: str,
    batch_size: int = 64,
    device: str = "auto",
    part: str | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Store a model's pooled features of every segment of a shard folder as a feature folder (float16).

    One feature shard per source shard, same name, same segment order, ids, lead masks and targets; ``/features``
    replaces ``/signal``. Finished shards (fingerprint, row count and checksums as their sidecar records) are kept
    on a rerun; a missing, truncated or changed one is computed again. With several parts (``part="K/N"``, or
    torchrun's or srun's ranks), part K takes shards K, K+N, K+2N, ...; whichever part finds every shard finished
    writes ``manifest.json`` (rerunning with one part writes it too, reusing every shard).

    Args:
        model: a zoo name, a published model folder, an ``hf://`` address in the hub cache, or a ``.ckpt``.
        data: the source shard folder (``ecgfm shard`` or ``ecgfm synth``).
        out: the feature folder to write (created; not ``data``).
        batch_size: segments per forward pass.
        device: ``auto`` (this process's GPU, else the CPU), ``cpu``, ``cuda``, ``cuda:1``, ...
        part: ``K/N``: compute the K-th of N parts (0-based); default from the environment, else all.
        progress: show a progress bar (in the first part only, when the environment gives the parts).
    """
    source_root, out_root = Path(data), Path(out)
    source = Manifest.load(source_root)
    if source.features:
        raise ShardError(f"{source_root / MANIFEST_NAME} is a feature folder already: give the folder of signals")
    if out_root.resolve() == source_root.resolve():
        raise ValueError(f"--out {out_root} is the source folder: feature shards have the source shards' names")
    rank, world = resolve_part(part)
    dev = resolve_device(device)
    net = load(model, map_location=dev)
    data_leads = [lead.strip() for lead in source.lead_names]
    net.input_contract.check_data(
        source.fs, source.n_samples, data_leads, str(source_root / MANIFEST_NAME), repr(net.name)
    )
    leads = lead_indices(net.leads, data_leads)
    record = _model_record(net, model)
    size = int(net.backbone.num_features)
    summary = EmbedSummary(out_root, (rank, world), record, size)
    out_root.mkdir(parents=True, exist_ok=True)
    _drop_stale_manifest(out_root, record["sha256"], source_root)
    if world == 1:
        remove_partial_files(out_root)  # a killed run's temporary files; with several parts another may be writing

    fingerprints = [_fingerprint(record["sha256"], size, source_root, entry) for entry in source.shards]
    attrs = {
        "content": FEATURES_KEY,
        "feature_size": size,
        "feature_model": record["name"],
        "feature_model_sha256": record["sha256"],
        "preprocessing": f"features of {record['name']} (its own preprocessing ran before)",
    }
    mine = [i for i in range(len(source.shards)) if i % world == rank]
    summary.other_parts = len(source.shards) - len(mine)
    todo = []
    for i in mine:
        entry = source.shards[i]
        reason = _redo_reason(out_root / entry["path"], fingerprints[i], int(entry["n_segments"]), size, source, False)
        if reason is None:
            summary.reused.append(entry["path"])
        else:
            todo.append((i, reason))

    shown = progress and bool(todo) and (part is not None or rank == 0)
    columns = TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    total = sum(int(source.shards[i]["n_segments"]) for i, _ in todo)
    with Progress(*columns, disable=not shown) as bar:
        task = bar.add_task(f"embedding with {record['name']}", total=total)
        for i, reason in todo:
            entry = source.shards[i]
            dest = out_root / entry["path"]
            with open_shard(source_root / entry["path"]) as src:
                advance = functools.partial(bar.advance, task)
                features = _compute_features(net, src, leads, batch_size, dev, advance)
                checksums = _write_feature_shard(dest, src, features, {**attrs, "source_shard": entry["path"]})
            sidecar = {
                "path": entry["path"],
                "n_segments": int(features.shape[0]),
                "fingerprint": fingerprints[i],
                "model_sha256": record["sha256"],
                "source": {"folder": str(source_root.resolve()), **entry},
                "checksums": checksums,
            }
            atomic_write_json(sidecar_path(dest), sidecar, indent=None)
            summary.computed[entry["path"]] = reason

    summary.waiting_for = [
        entry["path"]
        for i, entry in enumerate(source.shards)
        if i % world != rank
        and _redo_reason(out_root / entry["path"], fingerprints[i], int(entry["n_segments"]), size, source, True)
    ]
    if not summary.waiting_for:
        _write_manifest(out_root, source_root, source, record, size)
        summary.manifest_written = True
    return summary


def _drop_stale_manifest(out_root: Path, model_sha256: str, source_root: Path) -> None:
    """Remove a manifest of another model or source before any shard is replaced, so none lists a changed shard."""
    path = out_root / MANIFEST_NAME
    if not path.exists():
        return
    try:
        old = Manifest.load(out_root)
    except (ShardError, TypeError):
        old = None
    same = old is not None and [
        (old.features.get("model") or {}).get("sha256"),
        old.source.get("path"),
        old.source.get("manifest_sha256"),
    ] == [model_sha256, str(source_root.resolve()), sha256sum(source_root / MANIFEST_NAME)]
    if not same:
        path.unlink(missing_ok=True)


def _write_manifest(out_root: Path, source_root: Path, source: Manifest, record: dict[str, Any], size: int) -> None:
    """``patient_keys.npy`` and ``manifest.json`` of the finished folder, from the sidecars (the same on every part)."""
    entries, keys = [], []
    for entry in source.shards:
        sidecar = _read_sidecar(out_root / entry["path"])
        if sidecar is None:
            raise ShardError(f"{sidecar_path(out_root / entry['path'])} vanished while the manifest was being written")
        entries.append({"path": entry["path"], "n_segments": sidecar["n_segments"], "checksums": sidecar["checksums"]})
        with open_shard(out_root / entry["path"]) as f:
            keys.append(f["patient_key"][:])
    with atomic_write(out_root / "patient_keys.npy") as handle:
        np.save(handle, np.concatenate(keys) if keys else np.zeros(0, np.uint64))
    manifest = Manifest(
        shards=entries,
        targets=source.targets,
        metadata=source.metadata,
        fs=source.fs,
        n_samples=source.n_samples,
        lead_names=list(source.lead_names),
        source={
            "path": str(source_root.resolve()),
            "reader": "ecgfm embed",
            "manifest_sha256": sha256sum(source_root / MANIFEST_NAME),
            "converted_from": source.source,
        },
        features={
            "dataset": FEATURES_KEY,
            "size": size,
            "dtype": np.dtype(FEATURE_DTYPE).name,
            "format": FEATURE_FORMAT_VERSION,
            "model": record,
        },
    )
    manifest.save(out_root)


# ----------------------------------------------------------------------------------------------- publishing the heads
def trained_on_features(checkpoint: Mapping[str, Any]) -> bool:
    """True for a FineTuneTask checkpoint whose backbone is ``precomputed`` (heads trained on a feature folder)."""
    stored = checkpoint.get("ecgfm") or {}
    return (stored.get("backbone") or {}).get("name") == PRECOMPUTED


def heads_on_features_model(
    checkpoint: Mapping[str, Any],
    features_model: str | ECGModel,
    source: str | Path,
    card: Mapping[str, Any] | None = None,
) -> ECGModel:
    """The model that computed the features, carrying the heads a ``precomputed`` checkpoint trained on them: a
    published model that reads signals. The model must be the one the heads were trained for (same sha256).

    Args:
        checkpoint: the FineTuneTask checkpoint, as read (``ecgfm.checkpointing.read_lightning_checkpoint``).
        features_model: what ``ecgfm embed --model`` was given (zoo name, folder, ``.ckpt``), or the model.
        source: names the checkpoint in messages.
        card: the published model's card.
    """
    stored = checkpoint.get("ecgfm") or {}
    if not trained_on_features(checkpoint):
        name = (stored.get("backbone") or {}).get("name")
        raise ContractError(f"{source} was trained with backbone {name!r}, not on features ({PRECOMPUTED!r})")
    wanted = stored["backbone"]["architecture"]
    base = features_model if isinstance(features_model, ECGModel) else load(features_model)
    sha256 = feature_model_sha256(base)
    if wanted.get("model_sha256") and sha256 != wanted["model_sha256"]:
        raise ContractError(
            f"the heads of {source} were trained on features of {wanted.get('model')!r} (sha256 "
            f"{wanted['model_sha256'][:12]}), but {base.name!r} has sha256 {sha256[:12]}: give the model that "
            "`ecgfm embed` used"
        )
    contract = {**base.contract(), "heads": stored["heads"]}
    model = ECGModel(contract, card)
    state = {key: value for key, value in base.state_dict().items() if not key.startswith("heads.")}
    state.update({key: value for key, value in checkpoint["state_dict"].items() if key.startswith("heads.")})
    load_strict(model, state, source)
    return model.eval()
