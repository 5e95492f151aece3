"""``ecgfm shard``: a folder of records + a label table -> HDF5 shards + manifest.json; every skip is reported."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ecgfm.data.label_table import MISSING_MARKERS, LabelTable, parse_number
from ecgfm.data.provenance import describe_changes, display_name, file_stamp, record_files, shared_files, stamp_files
from ecgfm.data.shards import Manifest, ShardWriter, TargetSpec, check_shard, to_int16_microvolts
from ecgfm.data.sources import Record, RecordError
from ecgfm.io import atomic_write, atomic_write_csv, atomic_write_json, remove_partial_files
from ecgfm.leads import MODIFIED_LEADS, STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES
from ecgfm.record_windows import MIN_FS, select_leads
from ecgfm.registry import SOURCES, MissingOptionError
from ecgfm.resampling import resample, segment_starts


@dataclass
class ConversionSummary:
    """What a conversion did: records read, segments written, every skipped record and every warning."""

    records_read: int = 0
    segments_written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (record path, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (record path, what was changed)
    notes: list[str] = field(default_factory=list)
    shards_reused: int = 0
    rebuilt: list[tuple[str, str]] = field(default_factory=list)  # (shard, why an earlier run's shard was not reused)
    out_dir: Path | None = None

    @property
    def shards_rebuilt(self) -> int:
        return len(self.rebuilt)

    def print(self, console: Console | None = None) -> None:
        console = console or Console()
        table = Table(title=f"ecgfm shard -> {self.out_dir}")
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_row("records read", str(self.records_read))
        table.add_row("segments written", str(self.segments_written))
        table.add_row("records skipped (skipped.csv)", str(len(self.skipped)))
        table.add_row("records with warnings (warnings.csv)", str(len(self.warnings)))
        table.add_row("finished shards reused", str(self.shards_reused))
        table.add_row("finished shards rebuilt", str(self.shards_rebuilt))
        console.print(table)
        for shard, reason in self.rebuilt[:50]:
            console.print(f"{shard}: rebuilt, {reason}", highlight=False, markup=False, soft_wrap=True)
        if len(self.rebuilt) > 50:
            console.print(f"... {len(self.rebuilt) - 50} more shards rebuilt")
        for title, rows in (("skipped records", self.skipped), ("warnings", self.warnings)):
            if rows:
                listing = Table(title=title)
                listing.add_column("record")
                listing.add_column("reason" if rows is self.skipped else "warning")
                for path, text in rows[:50]:
                    listing.add_row(path, text)
                console.print(listing)
                if len(rows) > 50:
                    console.print(f"... {len(rows) - 50} more {title}: see the CSV in {self.out_dir}")
        for note in self.notes:
            console.print(f"note: {note}")


@dataclass
class _Converted:
    """One record after reading, lead mapping, resampling and cutting (or the reason it was skipped)."""

    path: Path
    record: Record | None = None
    signal: np.ndarray | None = None  # int16 [12, T] µV at 500 Hz
    lead_mask: np.ndarray | None = None
    pieces: list[tuple[int, int]] = field(default_factory=list)  # (start, valid samples)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


def cut_pieces(n_total: int, stride: int | None = None, last_piece: str = "drop") -> list[tuple[int, int]]:
    """(start, valid samples) of every 10-s piece; ``last_piece="pad"`` keeps a short tail, zero-padded."""
    if last_piece not in ("drop", "pad"):
        raise ValueError(f"last_piece must be 'drop' or 'pad', got {last_piece!r}")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1):
        raise ValueError(f"stride must be a whole number of samples >= 1 (5000: no overlap), got {stride!r}")
    stride = STANDARD_N_SAMPLES if stride is None else int(stride)
    pieces = [(start, STANDARD_N_SAMPLES) for start in segment_starts(n_total, STANDARD_N_SAMPLES, stride)]
    tail = len(pieces) * stride
    if last_piece == "pad" and tail < n_total and (not pieces or pieces[-1][0] + STANDARD_N_SAMPLES < n_total):
        pieces.append((tail, n_total - tail))
    return pieces


def prepare_record(reader: Any, path: Path, stride: int | None, last_piece: str) -> _Converted:
    """Read one record and bring it to 12 canonical leads, 500 Hz, int16 µV, cut into pieces; anything wrong with
    it (including a rate no reader refused) becomes the record's skip reason, so it never stops a conversion."""
    try:
        record = reader.read(path)
    except RecordError as err:
        return _Converted(path, error=str(err))
    except Exception as err:  # a reader bug must not stop a million-record conversion; it is reported
        return _Converted(path, error=f"{path}: unexpected {type(err).__name__}: {err}")
    warnings: list[str] = [str(w) for w in record.metadata.get("warnings", [])]
    fs = float(record.fs)
    if not (math.isfinite(fs) and fs > 0):
        return _Converted(path, error=f"{path}: sampling rate {record.fs!r} Hz is not a positive finite number")
    if fs < MIN_FS:
        return _Converted(path, error=f"{path}: sampling rate {fs:g} Hz is below {MIN_FS:g} Hz, too low for an ECG")
    present = [i for i, name in enumerate(record.lead_names) if name in STANDARD_LEADS]
    other = [name for name in record.lead_names if name not in STANDARD_LEADS]
    if not present:
        modified = [name for name in record.lead_names if name.upper() in MODIFIED_LEADS]
        hint = f" ({', '.join(modified)}: modified leads, mapped only with the reader option lead_aliases)"
        return _Converted(
            path, error=f"{path}: no standard lead among {list(record.lead_names)}{hint * bool(modified)}"
        )
    if other:
        warnings.append(f"non-standard signals ignored: {' '.join(other)}")
    selection = select_leads(record, STANDARD_LEADS)  # flat or all-NaN leads missing, scattered NaN set to 0
    signal, lead_mask = selection.signal, selection.lead_mask
    warnings.extend(selection.warnings)
    if not lead_mask.any():
        return _Converted(path, error=f"{path}: every lead is NaN or flat")
    if selection.flat:
        warnings.append(f"leads {' '.join(selection.flat)} are flat or NaN: stored as missing (lead_mask 0)")
    if record.fs != STANDARD_FS:
        signal = resample(signal, record.fs, STANDARD_FS)
    limit_mv = np.iinfo(np.int16).max / 1000.0  # what int16 µV holds
    for slot in np.flatnonzero(np.abs(signal).max(axis=1) > limit_mv + 0.0005):
        n_clipped = int(np.count_nonzero(np.abs(signal[slot]) > limit_mv + 0.0005))
        warnings.append(f"lead {STANDARD_LEADS[slot]}: {n_clipped} samples beyond ±{limit_mv:g} mV clipped")
    pieces = cut_pieces(signal.shape[1], stride, last_piece)
    if not pieces:
        seconds = signal.shape[1] / STANDARD_FS
        segment_s = STANDARD_N_SAMPLES / STANDARD_FS
        return _Converted(path, error=f"{path}: shorter than {segment_s:g} s ({seconds:.2f} s at {STANDARD_FS:g} Hz)")
    if pieces[-1][1] < STANDARD_N_SAMPLES:
        warnings.append(f"last piece padded: {pieces[-1][1]} real samples of {STANDARD_N_SAMPLES}")
    return _Converted(path, record, to_int16_microvolts(signal), lead_mask, pieces, warnings=warnings)


@dataclass
class ShardJob:
    """Everything a worker needs to write one shard from a fixed slice of the sorted record list."""

    index: int
    paths: list[Path]
    out: Path
    source: Path
    reader: str
    options: dict[str, Any]
    table: LabelTable | None
    patient_column: str | None
    targets: dict[str, TargetSpec]
    stride: int | None
    last_piece: str
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)  # what the fingerprint is made of, kept to name a change
    labels: dict[str, Any] | None = None  # the label table's path and stamp (size, mtime_ns, sha256)
    common: dict[str, Any] = field(default_factory=dict)  # stamps of the files every record depends on
    metadata: dict[str, str] = field(default_factory=dict)  # metadata name -> kind (number | string)
    table_metadata: list[str] = field(default_factory=list)  # the metadata names read from the label table

    @property
    def shard_path(self) -> Path:
        return self.out / f"shard-{self.index:05d}.h5"

    @property
    def sidecar_path(self) -> Path:
        return self.out / f"shard-{self.index:05d}.json"


_READERS: dict[str, Any] = {}


def _reader_for(job: ShardJob) -> Any:
    key = f"{job.reader}:{json.dumps(job.options, sort_keys=True, default=str)}"
    if key not in _READERS:  # one reader per process (building one may read mapping tables)
        _READERS[key] = SOURCES.create(job.reader, **job.options)
    return _READERS[key]


def _convert_shard(job: ShardJob) -> dict[str, Any]:
    """Reuse the shard an earlier run finished from the same inputs, or convert its slice of records into a new
    shard + sidecar JSON (runs in worker processes).

    The record files are hashed before they are read, so a file changed meanwhile makes the next run rebuild.
    """
    inputs = {
        "labels": job.labels,
        "common": job.common,
        "records": {display_name(path, job.source): stamp_files(record_files(path), job.source) for path in job.paths},
    }
    done, reason = _finished(job, inputs)
    if done is not None:
        return {**done, "reused": True}
    reader = _reader_for(job)
    writer = ShardWriter(
        job.shard_path, job.targets, fs=STANDARD_FS, n_samples=STANDARD_N_SAMPLES, metadata=job.metadata
    )
    result: dict[str, Any] = {"fingerprint": job.fingerprint, "records": [str(p) for p in job.paths]}
    result.update(records_read=0, skipped=[], warnings=[], matched_rows=[])
    try:
        for path in job.paths:
            item = prepare_record(reader, path, job.stride, job.last_piece)
            if item.error:
                result["skipped"].append((str(path), item.error))
                continue
            record = item.record
            row = None
            if job.table is not None:
                key, row = job.table.lookup(record, job.source)
                if row is None:
                    result["skipped"].append((str(path), f"{path}: no row in label table"))
                    continue
                result["matched_rows"].append(key)
                values, cell_warnings = job.table.parse_row(row)  # cells that are not numbers: missing, reported
                result["warnings"].extend((str(path), w) for w in cell_warnings)
                patient = str(row[job.patient_column]).strip() if job.patient_column else record.patient_id
            else:
                values = reader.targets(record, job.targets)
                patient = record.patient_id
            result["records_read"] += 1
            result["warnings"].extend((str(path), w) for w in item.warnings)
            metadata, metadata_warnings = record_metadata(job, record, row)
            result["warnings"].extend((str(path), w) for w in metadata_warnings)
            for start, valid in item.pieces:
                piece = item.signal[:, start : start + valid]
                if valid < STANDARD_N_SAMPLES:
                    piece = np.pad(piece, ((0, 0), (0, STANDARD_N_SAMPLES - valid)))
                writer.append(
                    piece, item.lead_mask, record.record_id, patient or record.record_id, start, values, valid, metadata
                )
        result["n_segments"] = len(writer)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    result.update(path=job.shard_path.name, settings=job.settings, inputs=inputs, checksums=writer.checksums)
    atomic_write_json(job.sidecar_path, result, indent=None)
    return {**result, "rebuilt": reason}


def _finished(job: ShardJob, inputs: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the sidecar, None) of a shard an earlier run made from these very inputs and that still verifies, else
    (None, why it is not reused); the reason is None where no earlier run got as far as this shard."""
    shard, sidecar = job.shard_path, job.sidecar_path
    if not shard.is_file():
        return None, (f"{shard.name} is missing" if sidecar.is_file() else None)
    try:
        done = json.loads(sidecar.read_text())
    except FileNotFoundError:
        return None, f"{sidecar.name} is missing (an interrupted run?)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{sidecar.name} cannot be read ({err})"
    if not isinstance(done, dict) or "inputs" not in done or "checksums" not in done:
        return None, f"{sidecar.name} records no inputs or checksums (made by an older ecgfm)"
    if done.get("fingerprint") != job.fingerprint:
        before = done.get("settings") or {}
        changed = sorted(k for k in {*before, *job.settings} if before.get(k) != job.settings.get(k))
        return None, f"conversion options changed ({', '.join(changed) or 'fingerprint'})"
    if done.get("records") != [str(p) for p in job.paths]:
        return None, "its records changed (records added or removed before them)"
    before = done["inputs"]
    old_labels, new_labels = before.get("labels") or {}, inputs["labels"] or {}
    if (old_labels.get("size"), old_labels.get("sha256")) != (new_labels.get("size"), new_labels.get("sha256")):
        return None, f"label table {new_labels.get('path') or old_labels.get('path')} changed"
    changes = describe_changes(before.get("common") or {}, inputs["common"])
    for record, files in inputs["records"].items():
        changes += describe_changes((before.get("records") or {}).get(record, {}), files)
    if changes:
        more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        return None, ", ".join(changes[:3]) + more
    problems = check_shard(
        shard, int(done.get("n_segments", -1)), job.targets, done["checksums"], reference=sidecar.name
    )
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return None, problems[0].removeprefix(f"{shard}: ") + more
    return done, None


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
    time_column: str | None = None,
    max_hours: float | None = None,
    decimal: str = ".",
    separator: str = ",",
    dx_mapping: list[str | Path] | None = None,
    reader_options: dict[str, Any] | None = None,
    records_per_shard: int = 1024,
    stride: int | None = None,
    last_piece: str = "drop",
    metadata: list[str] | str | None = None,
    workers: int = 0,
    progress: bool = True,
    part: str | None = None,
) -> ConversionSummary:
    """Convert every record under ``source`` into shards in ``out``; a rerun reuses the shards already finished.

    Args:
        source: folder searched for records.
        out: output folder for ``shard-NNNNN.h5`` (+ a ``.json`` sidecar each), ``manifest.json``,
            ``patient_keys.npy``, ``skipped.csv`` and ``warnings.csv``.
        reader: source format (``ecgfm.data.sources.SOURCES``: wfdb, challenge, ...).
        labels: CSV or Parquet table with one row per record; without it, the reader's own labels
            (e.g. Challenge ``# Dx:``).
        record_column: the table column naming the record (its id, or its path relative to ``source``).
        patient_column: the table column with the patient id (patient-level splits); default: the reader's.
        multilabel: target name -> table columns whose cells hold label names.
        regression: target name -> numeric table columns.
        units: target name -> unit of a regression target.
        time_column: table column with the hours between the ECG and the lab draw (negative: lab first); stored
            as the target ``lab_time`` so the pairing window can be chosen later.
        max_hours: regression values of a row whose lab was drawn further than this from the ECG (or at an
            unknown time) are stored as missing (NaN), not dropped.
        decimal: the label table's decimal mark, ``.`` or ``,`` (``4,1`` is 4.1 only with ``,``). A numeric cell
            that is not a finite number is stored as missing and listed in ``warnings.csv``; a column where most
            cells are not numbers stops the conversion, naming the column and the likely cause.
        separator: the label table's field separator (``,``; ``;`` for many European exports; ``\\t``).
        dx_mapping: Challenge mapping CSVs (SNOMED-CT code -> abbreviation) to name ``dx`` labels; default:
            the Challenge 2021 tables that ship with ecgfm.
        reader_options: further keyword arguments of the reader (see ``ecgfm.data.sources``).
        records_per_shard: records per HDF5 file (shard k always holds records k*n ... (k+1)*n - 1 in sorted
            order, which is what lets an interrupted conversion resume shard by shard).
        stride: samples between segment starts, at least 1 (default 5000: no overlap).
        last_piece: ``drop`` a record's tail shorter than 10 s, or ``pad`` it with zeros (``/valid_samples``
            says how much is real; a record shorter than 10 s then gives one padded segment).
        metadata: per-segment metadata to store for evaluation by subgroup (``/metadata/<name>``), as a list or
            ``"Age,Sex"``: a label-table column of that name, else the reader's own field (``age``, ``sex`` from
            WFDB and Challenge headers). A column whose cells are mostly numbers is stored as float (``>89`` as
            89, other text as missing, listed in warnings.csv), any other as text; ``age`` from a reader is a number.
        workers: processes converting shards in parallel (0 = in this process).
        part: ``K/N`` converts only part K (0 ... N-1) of N: the shards K, K+N, K+2N ... of the same plan every part
            computes, and writes ``manifest.part-K-of-N.json`` in place of manifest.json (join the parts with
            ``ecgfm shard merge``); ``slurm`` reads K and N from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT.
    """
    split = parse_part(part) if part is not None else None
    plan = plan_conversion(
        source,
        out,
        reader=reader,
        labels=labels,
        record_column=record_column,
        patient_column=patient_column,
        multilabel=multilabel,
        regression=regression,
        units=units,
        time_column=time_column,
        max_hours=max_hours,
        decimal=decimal,
        separator=separator,
        dx_mapping=dx_mapping,
        reader_options=reader_options,
        records_per_shard=records_per_shard,
        stride=stride,
        last_piece=last_piece,
        metadata=metadata,
    )
    if split is not None:
        return write_part_report(plan, split, run_conversion(plan, workers, progress, split))
    return write_conversion_report(plan, run_conversion(plan, workers, progress))


@dataclass
class ConversionPlan:
    """A conversion decided before any record is read: its inputs, targets, fingerprint and one job per shard."""

    source: Path
    out: Path
    reader: str
    options: dict[str, Any]  # the reader's keyword arguments
    labels: str | None  # the label table as given, or None (the reader's own labels)
    table: LabelTable | None
    targets: dict[str, TargetSpec]
    fingerprint: str  # sha256 of every setting that changes a shard: a finished shard is reused only if it matches
    jobs: list[ShardJob]
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"kind", "source"}: the manifest's

    @property
    def n_records(self) -> int:
        return sum(len(job.paths) for job in self.jobs)


def plan_conversion(
    source: str | Path,
    out: str | Path,
    reader: str = "wfdb",
    labels: str | Path | None = None,
    record_column: str = "record",
    patient_column: str | None = None,
    multilabel: dict[str, list[str]] | None = None,
    regression: dict[str, list[str]] | None = None,
    units: dict[str, str] | None = None,
    time_column: str | None = None,
    max_hours: float | None = None,
    decimal: str = ".",
    separator: str = ",",
    dx_mapping: list[str | Path] | None = None,
    reader_options: dict[str, Any] | None = None,
    records_per_shard: int = 1024,
    stride: int | None = None,
    last_piece: str = "drop",
    metadata: list[str] | str | None = None,
) -> ConversionPlan:
    """Find the records, read the label table and cut the sorted record list into shard jobs; writes nothing.

    The arguments are :func:`convert`'s.
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"source folder {source} does not exist")
    _check_out(out)
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be at least 1, got {records_per_shard}")
    cut_pieces(0, stride, last_piece)  # validates last_piece early
    options = dict(reader_options or {})
    if dx_mapping:
        options["dx_mapping"] = [str(p) for p in dx_mapping]
    try:
        source_reader = SOURCES.create(reader, **options)
    except MissingOptionError as err:  # e.g. --reader arrays without its table: say where the option goes
        example = ", ".join(f"{name}: ..." for name in err.missing)
        raise MissingOptionError(
            f"reader {reader!r} needs the option{'s' if len(err.missing) > 1 else ''} "
            f"{', '.join(map(repr, err.missing))} (reader_options: {{{example}}})",
            err.kind,
            err.name,
            err.missing,
        ) from None
    paths = source_reader.find_records(source)
    if not paths:
        raise FileNotFoundError(f"no {reader} records found under {source}")
    table = labels_stamp = None
    if labels is not None:
        labels_stamp = {"path": str(labels), **(file_stamp(Path(labels)) or {})}  # hashed before it is read
        columns = (multilabel or {}, regression or {}, units or {})
        table = LabelTable.from_file(
            labels, record_column, patient_column, *columns, time_column, max_hours, decimal, separator
        )
    targets = table.targets if table is not None else source_reader.target_specs(paths)
    metadata_plan = plan_metadata(metadata, table, labels)
    settings = {
        "source": str(source),
        "reader": reader,
        "options": options,
        "labels": str(labels) if labels else None,
        "columns": [record_column, patient_column, multilabel, regression],
        "time": [time_column, max_hours],
        "table_format": [decimal, separator],
        "targets": {k: asdict(v) for k, v in targets.items()},
        "stride": stride,
        "last_piece": last_piece,
        "records_per_shard": records_per_shard,
    }
    if metadata_plan:  # only then: folders converted without metadata keep their fingerprint (and are reused)
        settings["metadata"] = metadata_plan
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    shared = dict(source=source, out=out, reader=reader, options=options, table=table, targets=targets)
    shared.update(patient_column=patient_column, stride=stride, last_piece=last_piece, fingerprint=fingerprint)
    shared.update(
        metadata={name: spec["kind"] for name, spec in metadata_plan.items()},
        table_metadata=[name for name, spec in metadata_plan.items() if spec["source"].startswith("label table")],
    )
    same_folder = source.is_dir() and out.is_dir() and os.path.samefile(out, source)  # the outputs are no input
    exclude = [*([Path(labels)] if labels else []), *(out.iterdir() if same_folder else [])]
    common = stamp_files(shared_files(source, paths, options, exclude), source)
    shared.update(settings=json.loads(json.dumps(settings, default=str)), labels=labels_stamp, common=common)
    jobs = [
        ShardJob(index=k, paths=paths[start : start + records_per_shard], **shared)
        for k, start in enumerate(range(0, len(paths), records_per_shard))
    ]
    plan = ConversionPlan(source, out, reader, options, settings["labels"], table, targets, fingerprint, jobs)
    plan.metadata = metadata_plan
    return plan


#: Leading comparators of an open-ended number (LUDB's age ``>89``): the number is stored as the bound.
_OPEN_BOUND = (">=", "<=", ">", "<", "≥", "≤")


def metadata_number(value: Any, decimal: str = ".") -> tuple[float, str | None]:
    """``(value, problem)`` of a numeric metadata cell: NaN without a problem when empty; ``>89`` -> 89.0 (an
    open-ended bound keeps the band it belongs to); text that is not a number -> NaN and what is wrong."""
    if value is None or isinstance(value, (int, float, np.integer, np.floating)):
        number = math.nan if value is None else float(value)
        return (number, None) if math.isfinite(number) or math.isnan(number) else (math.nan, f"{value!r} is infinite")
    text = str(value).strip()
    for mark in _OPEN_BOUND:
        if text.startswith(mark):
            text = text[len(mark) :].strip()
            break
    return parse_number(text, decimal)


def plan_metadata(
    names: list[str] | str | None, table: LabelTable | None, labels: str | Path | None
) -> dict[str, dict[str, str]]:
    """``{name: {"kind", "source"}}`` of the metadata to store: a label-table column where the table has one (a
    number when most of its non-empty cells are numbers), else the reader's own field (``age`` a number)."""
    if isinstance(names, str):
        names = names.split(",")
    names = [str(name).strip() for name in names or [] if str(name).strip()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"metadata lists {repeated} more than once")
    columns = set(next(iter(table.rows.values()), {})) if table is not None else set()
    out: dict[str, dict[str, str]] = {}
    for name in names:
        if "/" in name:
            raise ValueError(f"metadata name {name!r} cannot hold '/' (it names the dataset /metadata/<name>)")
        if name in columns:
            cells = [str(row[name]).strip() for row in table.rows.values()]
            filled = [cell for cell in cells if cell and cell.casefold() not in MISSING_MARKERS]
            numbers = sum(metadata_number(cell, table.decimal)[1] is None for cell in filled)
            kind = "number" if filled and 2 * numbers > len(filled) else "string"
            out[name] = {"kind": kind, "source": f"label table {labels} column {name!r}"}
        else:
            kind = "number" if name.casefold() == "age" else "string"
            out[name] = {"kind": kind, "source": f"the reader's {name!r} field"}
    return out


def record_metadata(job: ShardJob, record: Record, row: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """``(values, warnings)``: each metadata value of one record, from its label-table row or the reader's fields;
    a numeric cell that is not a number is stored as missing and named in a warning."""
    values: dict[str, Any] = {}
    warnings: list[str] = []
    fields = {str(key).casefold(): value for key, value in (record.metadata or {}).items()}
    for name, kind in job.metadata.items():
        if name in job.table_metadata:
            raw = row.get(name) if row is not None else None
        else:
            raw = (record.metadata or {}).get(name, fields.get(name.casefold()))
        if kind == "number":
            number, problem = metadata_number(raw, job.table.decimal if job.table is not None else ".")
            if problem is not None:
                warnings.append(f"metadata {name!r}: {problem}; stored as missing")
            values[name] = number
        else:
            values[name] = "" if raw is None else " ".join(str(raw).split())
    return values, warnings


def _check_out(out: Path) -> None:
    """Fail in one line naming ``out`` when no shard could be written there: it, or a folder above it, is a file,
    or the nearest existing folder is not writable."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == out else f" ({existing} is a file)"
        raise ValueError(f"out {out} is not a folder{where}: shards are written into a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out {out}: cannot write into {existing} (permission denied)")


def run_conversion(
    plan: ConversionPlan, workers: int = 0, progress: bool = True, part: tuple[int, int] | None = None
) -> dict[int, dict[str, Any]]:
    """Write every shard of the plan (of its part ``(K, N)``: shards K, K+N, ...) that no earlier run finished from
    the same inputs; returns each shard's sidecar by index.

    Sidecars of shards finished by an earlier run from the same inputs, which still verify, carry
    ``"reused": True``; shards converted again carry ``"rebuilt"``: why the earlier one was not reused (None for
    a shard no earlier run finished).
    """
    plan.out.mkdir(parents=True, exist_ok=True)
    pending = plan.jobs  # each worker decides whether its shard can be reused: the hashing runs in parallel too
    if part is not None:
        pending = [job for job in plan.jobs if job.index % part[1] == part[0]]
    _remove_stale(plan.out, len(plan.jobs), None if part is None else {job.index for job in pending})
    results: dict[int, dict[str, Any]] = {}
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 and len(pending) > 1 else None
    try:
        with _progress(progress) as bar:
            task = bar.add_task(f"converting {plan.source}", total=sum(len(job.paths) for job in pending))
            stream = pool.imap_unordered(_convert_shard, pending) if pool else map(_convert_shard, pending)
            for result in stream:
                index = int(result["path"].split("-")[1].split(".")[0])
                results[index] = result
                bar.advance(task, len(plan.jobs[index].paths))
    finally:
        if pool is not None:
            pool.terminate()
    return results


def manifest_header(plan: ConversionPlan) -> Manifest:
    """The manifest of a conversion before its shards are listed: targets, source and metadata."""
    return Manifest(
        targets=plan.targets,
        source={"path": str(plan.source), "reader": plan.reader, "labels": plan.labels},
        metadata=dict(plan.metadata),
    )


def write_conversion_report(plan: ConversionPlan, results: dict[int, dict[str, Any]]) -> ConversionSummary:
    """Gather the shards' sidecars into patient_keys.npy, skipped.csv, warnings.csv and, last, manifest.json."""
    rows = None if plan.table is None else len(plan.table.rows)
    ordered = [results[index] for index in range(len(plan.jobs))]
    return write_report(plan.out, manifest_header(plan), ordered, rows, plan.source)


def write_report(
    out: Path, manifest: Manifest, results: list[dict[str, Any]], table_rows: int | None, source: Path | str
) -> ConversionSummary:
    """Write the shards' results (in shard order) as patient_keys.npy, skipped.csv, warnings.csv and, last,
    manifest.json; ``table_rows``: the label table's row count (None without one)."""
    summary = ConversionSummary(out_dir=out)
    matched: set[str] = set()
    for result in results:
        entry = {"path": result["path"], "n_segments": int(result["n_segments"]), "checksums": result["checksums"]}
        manifest.shards.append(entry)
        if result.get("rebuilt"):
            summary.rebuilt.append((Path(result["path"]).stem, result["rebuilt"]))
        summary.records_read += int(result["records_read"])
        summary.segments_written += int(result["n_segments"])
        summary.skipped.extend(tuple(x) for x in result["skipped"])
        summary.warnings.extend(tuple(x) for x in result["warnings"])
        summary.shards_reused += bool(result.get("reused"))
        matched.update(result["matched_rows"])
    if table_rows is not None and len(matched) < table_rows:
        summary.notes.append(f"{table_rows - len(matched)} label-table rows have no record in {source}")
    _write_patient_keys(out, manifest)
    atomic_write_csv(out / "skipped.csv", ("record", "reason"), summary.skipped)
    atomic_write_csv(out / "warnings.csv", ("record", "warning"), summary.warnings)
    manifest.save(out)  # last: once it names the shards, everything beside them is in place
    return summary


def _remove_stale(out: Path, n_jobs: int, own: set[int] | None = None) -> None:
    """Delete shards this conversion will not produce and the temporary files a killed conversion left behind;
    a part (``own``: its shard numbers) leaves the other parts' temporary files alone, as they may be running."""
    if own is None:
        remove_partial_files(out)
    for path in out.glob("shard-*"):
        stem = path.name.split(".")[0]
        number = stem.removeprefix("shard-")
        mine = own is None or (number.isdigit() and int(number) in own)
        if (path.name.endswith(".tmp") and mine) or (number.isdigit() and int(number) >= n_jobs):
            path.unlink(missing_ok=True)


def _write_patient_keys(out: Path, manifest: Manifest) -> None:
    """patient_keys.npy: one uint64 per segment in manifest order, so splits need no per-segment strings."""
    parts = []
    for shard in manifest.shards:
        with h5py.File(out / shard["path"], "r") as f:
            parts.append(f["patient_key"][:])
    keys = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    with atomic_write(out / "patient_keys.npy") as f:
        np.save(f, keys.astype(np.uint64))


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


__all__ = [
    "ConversionPlan",
    "ConversionSummary",
    "LabelTable",
    "ShardJob",
    "convert",
    "cut_pieces",
    "manifest_header",
    "plan_conversion",
    "prepare_record",
    "run_conversion",
    "write_conversion_report",
    "write_report",
]


# ----------------------------------------------------------------------------------------------- one part of N
# (here, not in parts.py, which merges: convert() writes a part, and parts.py builds on convert, never the reverse)

PART_FORMAT = "ecgfm-shard-part"
PART_VERSION = 1
PART_PATTERN = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json")


def part_name(k: int, n: int) -> str:
    """The part manifest's file name, ``manifest.part-K-of-N.json``."""
    return f"manifest.part-{k}-of-{n}.json"


def parse_part(part: str) -> tuple[int, int]:
    """``(K, N)`` from ``K/N`` (0 <= K < N), or from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT for ``slurm``."""
    text = str(part).strip()
    if text.lower() == "slurm":
        task, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if not task or not count:
            raise ValueError(
                "--part slurm: SLURM_ARRAY_TASK_ID or SLURM_ARRAY_TASK_COUNT is not set (not an array task)"
            )
        text = f"{task}/{count}"
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--part {part!r}: expected K/N (part K of N, counting from 0, e.g. 0/4) or slurm")
    k, n = int(match[1]), int(match[2])
    if n < 1 or k >= n:
        raise ValueError(f"--part {part!r}: K must be 0 ... N-1 and N at least 1 (got K={k}, N={n})")
    return k, n


def plan_digest(plan: ConversionPlan) -> str:
    """sha256 of the fingerprint and every shard's record list: equal only for parts of the very same plan."""
    digest = hashlib.sha256(plan.fingerprint.encode())
    for job in plan.jobs:
        digest.update(json.dumps([job.index, [str(p) for p in job.paths]]).encode())
    return digest.hexdigest()


def write_part_report(
    plan: ConversionPlan, part: tuple[int, int], results: dict[int, dict[str, Any]]
) -> ConversionSummary:
    """Write ``manifest.part-K-of-N.json`` (atomically, last): the part's shards with their counts, checksums,
    skipped records and warnings, and what the merge checks (the plan's fingerprint and digest)."""
    k, n = part
    header = manifest_header(plan)
    shards = []
    for index in sorted(results):
        result = results[index]
        shards.append(
            {
                "index": index,
                "path": result["path"],
                "n_segments": int(result["n_segments"]),
                "checksums": result["checksums"],
                "records_read": int(result["records_read"]),
                "skipped": [list(x) for x in result["skipped"]],
                "warnings": [list(x) for x in result["warnings"]],
                "matched_rows": sorted(result["matched_rows"]),
            }
        )
    data = {
        "format": PART_FORMAT,
        "version": PART_VERSION,
        "part": k,
        "parts": n,
        "n_shards": len(plan.jobs),
        "fingerprint": plan.fingerprint,
        "plan": plan_digest(plan),
        "table_rows": None if plan.table is None else len(plan.table.rows),
        "manifest": {
            "targets": {name: asdict(spec) for name, spec in header.targets.items()},
            "source": header.source,
            "metadata": header.metadata,
        },
        "shards": shards,
    }
    summary = ConversionSummary(out_dir=plan.out)
    for result in results.values():
        if result.get("rebuilt"):
            summary.rebuilt.append((Path(result["path"]).stem, result["rebuilt"]))
        summary.records_read += int(result["records_read"])
        summary.segments_written += int(result["n_segments"])
        summary.skipped.extend(tuple(x) for x in result["skipped"])
        summary.warnings.extend(tuple(x) for x in result["warnings"])
        summary.shards_reused += bool(result.get("reused"))
    _remove_other_splits(plan.out, n)
    atomic_write_json(plan.out / part_name(k, n), data)
    summary.notes.append(
        f"part {k} of {n}: {len(shards)} of {len(plan.jobs)} shards in {part_name(k, n)}; when every part has "
        f"finished, join them with `ecgfm shard merge {plan.out}`"
    )
    return summary


def _remove_other_splits(out: Path, n: int) -> None:
    """Delete part manifests of an earlier split into another number of parts: they can never be merged again."""
    for path in out.glob("manifest.part-*-of-*.json"):
        match = PART_PATTERN.fullmatch(path.name)
        if match and int(match[2]) != n:
            path.unlink(missing_ok=True)
