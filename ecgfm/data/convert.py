"""``ecgfm shard``: a folder of records + a label table -> HDF5 shards + manifest.json; every skip is reported."""

from __future__ import annotations

import csv
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ecgfm.data.shards import MANIFEST_NAME, Manifest, ShardWriter, TargetSpec, to_int16_microvolts
from ecgfm.data.sources import Record, RecordError, get_source
from ecgfm.leads import STANDARD_LEADS
from ecgfm.signal import resample, segment_starts

FS = 500.0
N_SAMPLES = 5000
LABEL_SEPARATORS = (";", "\n", "|")


@dataclass
class LabelTable:
    """Targets per record from a CSV: multi-label columns hold label names (``;`` or newline separated)."""

    rows: dict[str, dict[str, Any]]
    targets: dict[str, TargetSpec]
    patient_column: str | None
    multilabel: dict[str, list[str]]
    regression: dict[str, list[str]]

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        record_column: str,
        patient_column: str | None,
        multilabel: dict[str, list[str]],
        regression: dict[str, list[str]],
        units: dict[str, str],
    ) -> LabelTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label table {path} does not exist")
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        used = [record_column, *([patient_column] if patient_column else [])]
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
        return cls(rows, targets, patient_column, multilabel, regression)

    def lookup(self, record: Record, root: Path) -> dict[str, Any] | None:
        """The row of a record, matched by record id or by its path relative to the source folder."""
        relative = record.path.relative_to(root).with_suffix("").as_posix() if root in record.path.parents else None
        for key in (record.record_id, relative):
            if key is not None and key in self.rows:
                return self.rows[key]
        return None

    def values(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        for name, columns in self.multilabel.items():
            present = set(_split_labels(row, columns))
            out[name] = np.array([1.0 if lab in present else 0.0 for lab in self.targets[name].names], np.float32)
        for name, columns in self.regression.items():
            out[name] = np.array([_to_float(row[c]) for c in columns], np.float32)
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


@dataclass
class ConversionSummary:
    """What a conversion did: records read, segments written, and every skipped record with its reason."""

    records_read: int = 0
    segments_written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record path, reason)
    masked_leads: list[tuple[str, str]] = field(default_factory=list)  # (record path, "V2 V4") flat/NaN leads
    notes: list[str] = field(default_factory=list)
    out_dir: Path | None = None

    def print(self, console: Console | None = None) -> None:
        console = console or Console()
        table = Table(title=f"ecgfm shard -> {self.out_dir}")
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_row("records read", str(self.records_read))
        table.add_row("segments written", str(self.segments_written))
        table.add_row("records skipped", str(len(self.skipped)))
        table.add_row("records with flat/NaN leads masked", str(len(self.masked_leads)))
        console.print(table)
        if self.skipped:
            skipped = Table(title="skipped records (also in skipped.csv)")
            skipped.add_column("record")
            skipped.add_column("reason")
            for path, reason in self.skipped:
                skipped.add_row(path, reason)
            console.print(skipped)
        for note in self.notes:
            console.print(f"note: {note}")


@dataclass
class _Converted:
    """One record after reading, lead mapping, resampling and cutting (or the reason it was skipped)."""

    path: Path
    record: Record | None = None
    signal: np.ndarray | None = None  # int16 [12, T] µV at 500 Hz
    lead_mask: np.ndarray | None = None
    starts: list[int] = field(default_factory=list)
    error: str | None = None
    masked_leads: list[str] = field(default_factory=list)


_READERS: dict[tuple, Any] = {}


def _prepare(args: tuple[str, dict, Path, int | None]) -> _Converted:
    """Read one record and bring it to 12 canonical leads, 500 Hz, int16 µV (runs in worker processes)."""
    reader_name, options, path, stride = args
    key = (reader_name, repr(sorted(options.items())))
    if key not in _READERS:  # one reader per process (building one may read mapping tables)
        _READERS[key] = get_source(reader_name, **options)
    try:
        record = _READERS[key].read(path)
    except RecordError as err:
        return _Converted(path, error=str(err))
    except Exception as err:  # a reader bug must not stop a million-record conversion; it is reported
        return _Converted(path, error=f"{path}: unexpected {type(err).__name__}: {err}")
    present = [i for i, name in enumerate(record.lead_names) if name in STANDARD_LEADS]
    if not present:
        return _Converted(path, error=f"{path}: no standard lead among {list(record.lead_names)}")
    signal = np.zeros((len(STANDARD_LEADS), record.signal.shape[1]), np.float32)
    lead_mask = np.zeros(len(STANDARD_LEADS), bool)
    masked: list[str] = []
    for i in present:
        slot = STANDARD_LEADS.index(record.lead_names[i])
        lead = record.signal[i]
        finite = lead[~np.isnan(lead)]
        if finite.size == 0 or finite.min() == finite.max():
            masked.append(record.lead_names[i])  # all-NaN or flat (e.g. a disconnected electrode): missing
            continue
        signal[slot] = np.nan_to_num(lead, nan=0.0)
        lead_mask[slot] = True
    if not lead_mask.any():
        return _Converted(path, error=f"{path}: every lead is NaN or flat")
    if record.fs != FS:
        signal = resample(signal, record.fs, FS)
    starts = segment_starts(signal.shape[1], N_SAMPLES, stride)
    if not starts:
        seconds = signal.shape[1] / FS
        return _Converted(path, error=f"{path}: shorter than 10 s ({seconds:.2f} s at 500 Hz)")
    return _Converted(path, record, to_int16_microvolts(signal), lead_mask, starts, masked_leads=masked)


def convert(
    source: str | Path,
    out: str | Path,
    reader: str = "wfdb",
    labels: str | Path | None = None,
    record_column: str = "record",
    patient_column: str | None = None,
    multilabel: dict[str, list[str]] | None = None,
    regression: dict[str, list[str]] | None = None,
    units: dict[str, str] | None = None,
    dx_mapping: list[str | Path] | None = None,
    reader_options: dict[str, Any] | None = None,
    segments_per_shard: int = 1024,
    stride: int | None = None,
    workers: int = 0,
    progress: bool = True,
) -> ConversionSummary:
    """Convert every record under ``source`` into shards in ``out``.

    Args:
        source: folder searched recursively for records.
        out: output folder for ``shard-NNNNN.h5``, ``manifest.json`` and ``skipped.csv``.
        reader: source format (``wfdb``, ``challenge``).
        labels: CSV with one row per record; without it, Challenge ``# Dx:`` codes become the ``dx`` target.
        record_column: the table column naming the record (its id, or its path relative to ``source``).
        patient_column: the table column with the patient id (patient-level splits); default: the record id.
        multilabel: target name -> table columns whose cells hold label names.
        regression: target name -> numeric table columns.
        units: target name -> unit of a regression target.
        dx_mapping: Challenge mapping CSVs (SNOMED-CT code -> abbreviation) to name ``dx`` labels; default:
            the Challenge 2021 tables that ship with ecgfm.
        reader_options: further keyword arguments of the reader (see ``ecgfm.data.sources``).
        segments_per_shard: segments per HDF5 file.
        stride: samples between segment starts (default 5000: no overlap).
        workers: processes reading records in parallel (0 = in this process).
    """
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"source folder {source} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    summary = ConversionSummary(out_dir=out)
    options = dict(reader_options or {})
    if dx_mapping:
        options["dx_mapping"] = [str(p) for p in dx_mapping]
    source_reader = get_source(reader, **options)
    paths = source_reader.find_records(source)
    if not paths:
        raise FileNotFoundError(f"no {reader} records found under {source}")

    table = None
    if labels is not None:
        table = LabelTable.from_csv(
            labels, record_column, patient_column, multilabel or {}, regression or {}, units or {}
        )
        targets = table.targets
    else:
        targets = source_reader.target_specs(paths)

    manifest = Manifest(
        targets=targets,
        source={"path": str(source), "reader": reader, "labels": str(labels) if labels else None},
    )
    writer: ShardWriter | None = None
    matched_rows: set[int] = set()
    jobs = [(reader, options, p, stride) for p in paths]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
    results = pool.imap(_prepare, jobs, chunksize=4) if pool else map(_prepare, jobs)
    try:
        with _progress(progress) as bar:
            task = bar.add_task(f"converting {source}", total=len(paths))
            for item in results:
                bar.advance(task)
                if item.error:
                    summary.skipped.append((str(item.path), item.error))
                    continue
                record = item.record
                if table is not None:
                    row = table.lookup(record, source)
                    if row is None:
                        summary.skipped.append((str(item.path), f"{item.path}: no row in label table {labels}"))
                        continue
                    matched_rows.add(id(row))
                    values = table.values(row)
                    patient = str(row[patient_column]).strip() if patient_column else record.patient_id
                else:
                    values = source_reader.targets(record, targets)
                    patient = record.patient_id
                summary.records_read += 1
                if item.masked_leads:
                    summary.masked_leads.append((str(item.path), " ".join(item.masked_leads)))
                for start in item.starts:
                    if writer is None:
                        writer = _new_writer(out, len(manifest.shards), targets)
                    writer.append(
                        item.signal[:, start : start + N_SAMPLES],
                        item.lead_mask,
                        record.record_id,
                        patient or record.record_id,
                        start,
                        values,
                    )
                    summary.segments_written += 1
                    if len(writer) >= segments_per_shard:
                        _close(writer, manifest, out)
                        writer = None
        if writer is not None:
            _close(writer, manifest, out)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.terminate()

    if table is not None and len(matched_rows) < len(table.rows):
        summary.notes.append(f"{len(table.rows) - len(matched_rows)} label-table rows have no record in {source}")
    manifest.save(out)
    with open(out / "skipped.csv", "w", newline="") as f:
        csv.writer(f).writerows([("record", "reason"), *summary.skipped])
    with open(out / "masked_leads.csv", "w", newline="") as f:
        csv.writer(f).writerows([("record", "leads"), *summary.masked_leads])
    return summary


def _new_writer(out: Path, index: int, targets: dict[str, TargetSpec]) -> ShardWriter:
    return ShardWriter(out / f"shard-{index:05d}.h5", targets, fs=FS, n_samples=N_SAMPLES)


def _close(writer: ShardWriter, manifest: Manifest, out: Path) -> None:
    path = writer.close()
    manifest.shards.append({"path": path.name, "n_segments": writer.n})


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


__all__ = ["ConversionSummary", "LabelTable", "MANIFEST_NAME", "convert"]
