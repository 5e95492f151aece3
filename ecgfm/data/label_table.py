"""Label tables: the targets of each record from a CSV or Parquet file (one row per record), matched by record id."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecgfm.data.shards import TargetSpec
from ecgfm.data.sources import Record

__all__ = ["LABEL_SEPARATORS", "LabelTable"]

LABEL_SEPARATORS = (";", "\n", "|")


@dataclass
class LabelTable:
    """Targets per record from a CSV or Parquet table: multi-label cells hold label names (``;`` or newline
    separated), regression cells numbers; an optional column gives hours between the ECG and the lab draw."""

    rows: dict[str, dict[str, Any]]
    targets: dict[str, TargetSpec]
    patient_column: str | None
    multilabel: dict[str, list[str]]
    regression: dict[str, list[str]]
    time_column: str | None = None
    max_hours: float | None = None

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        record_column: str,
        patient_column: str | None,
        multilabel: dict[str, list[str]],
        regression: dict[str, list[str]],
        units: dict[str, str],
        time_column: str | None = None,
        max_hours: float | None = None,
    ) -> LabelTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label table {path} does not exist")
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path).astype(object)
            df = df.where(df.notna(), "").astype(str)
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        used = [record_column, *([patient_column] if patient_column else []), *([time_column] if time_column else [])]
        used += [c for cols in (*multilabel.values(), *regression.values()) for c in cols]
        absent = [c for c in used if c not in df.columns]
        if absent:
            raise KeyError(f"label table {path} has no column(s) {absent}; it has {list(df.columns)}")
        rows = {}
        for row in df.to_dict("records"):
            key = str(row[record_column]).strip()
            if key in rows:
                raise ValueError(f"label table {path}: record {key!r} appears twice")
            rows[key] = row
        targets: dict[str, TargetSpec] = {}
        for name, columns in multilabel.items():
            vocab = sorted({label for row in rows.values() for label in _split_labels(row, columns)})
            targets[name] = TargetSpec("multilabel", vocab)
        for name, columns in regression.items():
            targets[name] = TargetSpec("regression", list(columns), units.get(name, ""))
        if time_column:
            targets["lab_time"] = TargetSpec("regression", [time_column], "h")
        return cls(rows, targets, patient_column, multilabel, regression, time_column, max_hours)

    def lookup(self, record: Record, root: Path) -> tuple[str | None, dict[str, Any] | None]:
        """(key, row) of a record, matched by record id or by its path relative to the source folder."""
        relative = record.path.relative_to(root).with_suffix("").as_posix() if root in record.path.parents else None
        for key in (record.record_id, relative):
            if key is not None and key in self.rows:
                return key, self.rows[key]
        return None, None

    def values(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        for name, columns in self.multilabel.items():
            present = set(_split_labels(row, columns))
            out[name] = np.array([1.0 if lab in present else 0.0 for lab in self.targets[name].names], np.float32)
        hours = _to_float(row[self.time_column]) if self.time_column else float("nan")
        too_far = self.max_hours is not None and not abs(hours) <= self.max_hours  # unknown time counts as too far
        for name, columns in self.regression.items():
            values = np.array([_to_float(row[c]) for c in columns], np.float32)
            out[name] = np.full_like(values, np.nan) if too_far else values  # masked, never dropped
        if self.time_column:
            out["lab_time"] = np.array([hours], np.float32)
        return out


def _split_labels(row: dict[str, Any], columns: list[str]) -> Iterator[str]:
    for column in columns:
        text = str(row[column])
        for sep in LABEL_SEPARATORS[1:]:
            text = text.replace(sep, LABEL_SEPARATORS[0])
        for label in text.split(LABEL_SEPARATORS[0]):
            label = label.strip().rstrip(".").strip()
            if label:
                yield label


def _to_float(text: str) -> float:
    text = str(text).strip()
    try:
        return float(text) if text else float("nan")
    except ValueError:
        return float("nan")
