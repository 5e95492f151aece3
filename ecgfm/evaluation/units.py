"""Units of analysis: a model's outputs per 10-s segment of a shard split, and the same outputs per record or per
patient, so that a 20-s record counts once and a patient with ten ECGs does not count ten times.

:func:`predict_segments` runs a model (``ecgfm.pretrained.ECGModel``) over every segment of a split and keeps, per
segment, its record id, patient id, start, targets and metadata. :func:`aggregate` turns those rows into one row per
``record`` or ``patient`` as ``ecgfm.evaluation.aggregate`` does for one record: scores (probabilities, values) are
averaged (``mean``) or their maximum taken (``max``), and every decision is made again on the aggregated scores by
the model's own rules. Targets of a record are its segments' (they are the same); a patient's are any positive
(multi-label, binary), the mean (regression), or the class when all its records agree (multiclass; else missing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ecgfm.decisions import apply_decisions
from ecgfm.evaluation.aggregate import AGGREGATIONS

__all__ = ["UNITS", "Segments", "Units", "aggregate", "predict_segments"]

#: What one row of a metric table is: a 10-s ``segment``, a ``record`` (its windows aggregated; the default) or a
#: ``patient`` (its records aggregated).
UNITS = ("segment", "record", "patient")


@dataclass
class Segments:
    """A model's outputs on every segment of a split, with what identifies each segment and what it is scored on."""

    positions: np.ndarray  # int64 [N]: global positions in the shard folder (to read a segment's signal again)
    record_id: np.ndarray  # object [N]
    patient_id: np.ndarray  # object [N]
    segment_start: np.ndarray  # int64 [N]: first sample in the record, at the folder's rate
    outputs: dict[str, np.ndarray]  # public output name -> float64 [N]
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # target -> float64 [N, K], NaN = missing
    metadata: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float64 (NaN) or object (str) [N]
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # head -> its raw output [N, ...] (keep_logits)

    def __len__(self) -> int:
        return len(self.positions)

    def window_index(self) -> np.ndarray:
        """Each segment's place among its record's windows (0 for the first), from the segments' starts."""
        order = np.lexsort((self.segment_start, self.record_id.astype(str)))
        ranks = np.empty(len(self), dtype=np.int64)
        records = self.record_id[order]
        new = np.r_[True, records[1:] != records[:-1]] if len(order) else np.zeros(0, bool)
        first = np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))
        ranks[order] = np.arange(len(order)) - first
        return ranks


@dataclass
class Units:
    """One row per unit (segment, record or patient): its id, patient, number of segments, outputs, targets and
    metadata; ``members`` maps each segment of the :class:`Segments` it came from to its row."""

    unit: str
    ids: np.ndarray  # object [U]
    patient_id: np.ndarray  # object [U]
    n_segments: np.ndarray  # int64 [U]
    outputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    metadata: dict[str, np.ndarray]
    members: np.ndarray  # int64 [N segments]: the row of each segment
    method: str = "mean"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_patients(self) -> int:
        return len(np.unique(self.patient_id.astype(str))) if len(self) else 0

    def select(self, rows: np.ndarray) -> Units:
        """The rows ``rows`` (a boolean mask or indices) as Units of their own; ``members`` then marks segments of
        rows left out with -1."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        renumber = np.full(len(self), -1, dtype=np.int64)
        renumber[rows] = np.arange(len(rows))
        return Units(
            self.unit,
            self.ids[rows],
            self.patient_id[rows],
            self.n_segments[rows],
            {k: v[rows] for k, v in self.outputs.items()},
            {k: v[rows] for k, v in self.targets.items()},
            {k: v[rows] for k, v in self.metadata.items()},
            np.where(self.members >= 0, renumber[np.maximum(self.members, 0)], -1),
            self.method,
        )


def predict_segments(
    model: Any,
    dataset: Any,
    batch_size: int = 64,
    device: Any = "cpu",
    targets: Sequence[str] | None = None,
    metadata: Sequence[str] | None = None,
    progress: bool = True,
    description: str = "scoring segments",
    keep_logits: bool = False,
) -> Segments:
    """Run ``model`` (an ``ECGModel``) over every segment ``dataset`` (a ``ShardDataset``) serves, in order, and
    keep each segment's outputs, ids, start, ``targets`` (default: the dataset's) and ``metadata`` (default: every
    column the folder stores), and with ``keep_logits`` each head's raw output. The folder's rate, length and leads
    are checked against the model first."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ecgfm.leads import lead_indices
    from ecgfm.signal import to_millivolts

    manifest = dataset.manifest
    source = str(dataset.root / "manifest.json")
    if manifest.features:
        signals = (manifest.source or {}).get("path", "the signal shards it was embedded from")
        raise ValueError(
            f"{source} is a feature folder (ecgfm embed): evaluation reads signal shards (saliency and the figures "
            f"need the ECG). Put the heads on the model that computed the features (ecgfm publish CKPT DIR "
            f"--features-model MODEL) and report on {signals}"
        )
    model.input_contract.check_data(manifest.fs, manifest.n_samples, manifest.lead_names, source, repr(model.name))
    columns = lead_indices(model.leads, [lead.strip() for lead in manifest.lead_names])
    model = model.to(device).eval()
    n = len(dataset)
    outputs: dict[str, list[np.ndarray]] = {}
    logits: dict[str, list[np.ndarray]] = {}
    records: list[str] = []
    patients: list[str] = []
    wanted = list(dataset.targets if targets is None else targets)
    target_rows: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress
    )
    with bar, torch.no_grad():
        task = bar.add_task(description, total=n)
        for start in range(0, n, batch_size):
            batch = dataset.__getitems__(list(range(start, min(n, start + batch_size))))
            signal = to_millivolts(batch["signal"])[:, columns].to(device)
            lead_mask = batch["lead_mask"][:, columns].to(device)
            raw = model(signal, lead_mask)
            for name, value in model.postprocess(raw).items():
                outputs.setdefault(name, []).append(value.double().cpu().numpy())
            for name, value in raw.items() if keep_logits else ():
                logits.setdefault(name, []).append(value.double().cpu().numpy())
            records += batch["record_id"]
            patients += batch["patient_id"]
            for name in wanted:
                values = batch["targets"][name].double().numpy()
                target_rows[name].append(np.where(batch["target_masks"][name].numpy(), values, np.nan))
            bar.advance(task, len(batch["record_id"]))
    listed = manifest.metadata
    names = list(listed) if metadata is None else list(metadata)
    return Segments(
        positions=np.asarray(dataset.indices, dtype=np.int64),
        record_id=np.array(records, dtype=object),
        patient_id=np.array(patients, dtype=object),
        segment_start=np.asarray(dataset.column("segment_start"), dtype=np.int64) if n else np.zeros(0, np.int64),
        outputs={name: np.concatenate(parts) for name, parts in outputs.items()},
        targets={
            name: np.concatenate(parts) if parts else np.zeros((0, len(manifest.targets[name].names)))
            for name, parts in target_rows.items()
        },
        metadata=dataset.metadata(names) if names and n else {},
        logits={name: np.concatenate(parts) for name, parts in logits.items()},
    )


def _first_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: each group's first row, groups in order of first appearance, and each row's group."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.reshape(-1)]


def _reduce(values: np.ndarray, groups: np.ndarray, n_groups: int, how: str) -> np.ndarray:
    """Per group, the ``mean``, ``max``, ``nanmean``, ``nanmax`` or ``nanmin`` of ``values`` ([N] or [N, K])."""
    values = np.asarray(values, dtype=np.float64)
    shape = (n_groups, *values.shape[1:])
    if how in ("mean", "nanmean"):
        known = np.isfinite(values) if how == "nanmean" else np.ones(values.shape, bool)
        total, count = np.zeros(shape), np.zeros(shape)
        np.add.at(total, groups, np.where(known, values, 0.0))
        np.add.at(count, groups, known)
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / count
    out = np.full(shape, np.nan if how.startswith("nan") else -np.inf)
    ufunc = {"max": np.maximum, "nanmax": np.fmax, "nanmin": np.fmin}[how]
    ufunc.at(out, groups, values)
    return out


def aggregate(
    segments: Segments,
    unit: str = "record",
    method: str = "mean",
    score_names: Sequence[str] | None = None,
    rules: Sequence[Mapping[str, Any]] = (),
    target_kinds: Mapping[str, str] | None = None,
) -> Units:
    """``segments`` -> one row per ``unit``: scores aggregated with ``method`` (``mean`` or ``max``; decisions of
    ``rules`` made again on the aggregate, as ``ecgfm.evaluation.aggregate.aggregate_windows`` does for one record),
    targets per record as stored, per patient by ``target_kinds`` (``multilabel``/``binary``: any positive,
    ``regression``: mean, ``multiclass``: the class all records agree on, else missing); metadata from the first
    segment. ``score_names`` default: every output no rule decides."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if method not in AGGREGATIONS or method == "none":
        raise ValueError(f"aggregation must be 'mean' or 'max', got {method!r}")
    n = len(segments)
    if unit == "segment":
        window = segments.window_index()
        ids = np.array([f"{r}#{w}" for r, w in zip(segments.record_id, window, strict=True)], dtype=object)
        return Units(
            unit,
            ids,
            segments.patient_id.copy(),
            np.ones(n, np.int64),
            dict(segments.outputs),
            dict(segments.targets),
            dict(segments.metadata),
            np.arange(n, dtype=np.int64),
            method,
        )
    if unit == "record":  # a record id names one record of one patient; the pair guards against reused names
        keys = np.array([f"{p}\x00{r}" for p, r in zip(segments.patient_id, segments.record_id, strict=True)])
    else:
        keys = segments.patient_id.astype(str)
    first, groups = _first_rows(keys) if n else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    n_units = len(first)
    decided = {rule["output"] for rule in rules}
    scores = set(score_names) if score_names is not None else {k for k in segments.outputs if k not in decided}
    outputs = {
        name: _reduce(value, groups, n_units, method)
        for name, value in segments.outputs.items()
        if name in scores or name not in decided
    }
    outputs.update(apply_decisions(outputs, rules) if n_units else {rule["output"]: np.zeros(0) for rule in rules})
    outputs = {name: np.asarray(outputs[name], dtype=np.float64) for name in segments.outputs}
    targets = {}
    for name, values in segments.targets.items():
        kind = (target_kinds or {}).get(name, "multilabel")
        if unit == "record":
            targets[name] = _reduce(values, groups, n_units, "nanmean")  # a record's windows share its targets
        elif kind == "regression":
            targets[name] = _reduce(values, groups, n_units, "nanmean")
        elif kind == "multiclass":
            high, low = _reduce(values, groups, n_units, "nanmax"), _reduce(values, groups, n_units, "nanmin")
            agree = np.all((high == low) | np.isnan(high), axis=-1, keepdims=True)
            targets[name] = np.where(agree, high, np.nan)
        else:
            targets[name] = _reduce(values, groups, n_units, "nanmax")
    return Units(
        unit,
        (segments.record_id if unit == "record" else segments.patient_id)[first].copy(),
        segments.patient_id[first].copy(),
        np.bincount(groups, minlength=n_units).astype(np.int64),
        outputs,
        targets,
        {name: values[first] for name, values in segments.metadata.items()},
        groups.astype(np.int64),
        method,
    )
