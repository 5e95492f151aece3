"""Reader for exports that are already arrays: ``[records, leads, samples]`` in .npy, .npz or HDF5, plus a CSV.

The CSV has one row per record (its id, optionally its patient and its row in the array); the same CSV can be
the converter's label table, since records are matched to label rows by the record id taken from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from ecgfm.data.sources.base import Record, RecordError, SourceReader, map_lead_names, mv_per_unit
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS
from ecgfm.registry import SOURCES

ARRAY_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5")


@dataclass
class _Export:
    """One array file opened for reading, with the table rows that point into it."""

    data: Any  # np.memmap (.npy), np.ndarray (.npz) or h5py.Dataset: indexable [records, leads, samples]
    rows: dict[int, tuple[str, str]]  # array row -> (record id, patient id)
    lead_names: tuple[str, ...]
    handle: h5py.File | None = None


def split_pseudo_path(path: Path) -> tuple[Path, int]:
    """``export.npy#17`` -> (``export.npy``, 17): one record is one row of the array file."""
    file, sep, index = str(path).rpartition("#")
    if not sep or not index.isdigit():
        raise RecordError(f"{path}: not an arrays record path (expected <array file>#<row>)")
    return Path(file), int(index)


@SOURCES.register("arrays")
class ArrayReader(SourceReader):
    """One record per row of a ``[N, L, T]`` array in a .npy, .npz (``signal_key``) or HDF5 file (dataset).

    Args:
        table: CSV with one row per record; its rows follow the array's order unless ``index_column`` is given.
        signal_key: the array's key in an .npz, or the dataset path in an HDF5 file.
        fs: sampling rate in Hz of every record.
        lead_names: names of the L leads, in array order; default the 12 standard leads when L is 12.
        units: unit of the values: mV, uV/µV or V.
        record_column: table column with the record id (match it with ``convert(record_column=...)``).
        patient_column: table column with the patient id; default: the record id.
        index_column: table column with each record's row in the array; default: table order.
        array: the array file's name in the source folder, needed when the folder holds several.
    """

    def __init__(
        self,
        table: str,
        signal_key: str = "signal",
        fs: float = STANDARD_FS,
        lead_names: list[str] | None = None,
        units: str = "mV",
        record_column: str = "record",
        patient_column: str | None = None,
        index_column: str | None = None,
        array: str | None = None,
    ):
        if not (isinstance(fs, (int, float)) and math.isfinite(fs) and fs > 0):
            raise ValueError(f"arrays: fs must be a positive finite sampling rate in Hz, got {fs!r}")
        try:
            self.scale = mv_per_unit(units, Path(table))
        except RecordError:
            raise ValueError(f"arrays: unknown units {units!r} (expected mV, uV/µV or V)") from None
        self.table = Path(table)
        self.signal_key = signal_key
        self.fs = float(fs)
        self.lead_names = list(lead_names) if lead_names is not None else None
        self.units = units
        self.record_column = record_column
        self.patient_column = patient_column
        self.index_column = index_column
        self.array = array
        self._exports: dict[Path, tuple[tuple, _Export]] = {}

    def find_records(self, root: Path) -> list[Path]:
        """``<array file>#<row>`` for each table row, in array order; checks the table against the array."""
        file = self.array_file(Path(root))
        return [Path(f"{file}#{i}") for i in sorted(self.export(file).rows)]

    def array_file(self, root: Path) -> Path:
        """The array file: ``root`` itself, ``root / array``, or the only array file directly in ``root``."""
        if root.is_file():
            return root
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such file or folder")
        if self.array is not None:
            file = root / self.array
            if not file.is_file():
                raise FileNotFoundError(f"{file}: array file not found")
            return file
        found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES)
        if len(found) != 1:
            names = [p.name for p in found] or "none"
            raise FileNotFoundError(
                f"{root}: expected one array file ({', '.join(ARRAY_SUFFIXES)}), found {names}; "
                "name it with the reader option 'array'"
            )
        return found[0]

    def export(self, file: Path) -> _Export:
        """The open array and its table rows, once per process (again only when the array or table changes)."""
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None for p in (file, self.table))
        cached = self._exports.get(file)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if cached is not None and cached[1].handle is not None:
            cached[1].handle.close()
        export = self._open(file)
        self._exports[file] = (stamp, export)
        return export

    def _open(self, file: Path) -> _Export:
        if not self.table.is_file():
            raise FileNotFoundError(f"{self.table}: table not found")
        handle = None
        suffix = file.suffix.lower()
        try:
            if suffix == ".npy":
                data = np.load(file, mmap_mode="r")
            elif suffix == ".npz":
                with np.load(file) as archive:  # compressed members cannot be memory-mapped: load the array once
                    if self.signal_key not in archive.files:
                        raise ValueError(f"{file}: no array {self.signal_key!r} (it holds {archive.files})")
                    data = archive[self.signal_key]
            elif suffix in (".h5", ".hdf5"):
                handle = h5py.File(file, "r")
                data = handle.get(self.signal_key)
                if not isinstance(data, h5py.Dataset):
                    raise ValueError(f"{file}: no dataset {self.signal_key!r} (top level holds {list(handle.keys())})")
            else:
                raise ValueError(f"{file}: unknown array format {suffix!r} (expected {', '.join(ARRAY_SUFFIXES)})")
            if len(data.shape) != 3:
                raise ValueError(f"{file}: array has shape {data.shape}; expected [records, leads, samples]")
            rows = self._table_rows(file, data.shape[0])
            lead_names = self._lead_names(file, data.shape[1])
        except OSError as err:
            if handle is not None:
                handle.close()
            raise ValueError(f"{file}: cannot open ({type(err).__name__}: {err})") from err
        except ValueError as err:
            if handle is not None:
                handle.close()
            if str(file) in str(err) or str(self.table) in str(err):
                raise
            raise ValueError(f"{file}: cannot read the array ({err})") from err
        return _Export(data, rows, lead_names, handle)

    def _table_rows(self, file: Path, n_records: int) -> dict[int, tuple[str, str]]:
        df = pd.read_csv(self.table, dtype=str, keep_default_na=False)
        columns = [self.record_column, self.patient_column, self.index_column]
        missing = [c for c in columns if c is not None and c not in df.columns]
        if missing:
            raise ValueError(f"{self.table}: no column(s) {missing}; it has {list(df.columns)}")
        if self.index_column is None and len(df) != n_records:
            raise ValueError(
                f"{self.table} has {len(df)} rows but {file} holds {n_records} records; "
                "one row per record in array order, or give index_column"
            )
        rows: dict[int, tuple[str, str]] = {}
        seen: dict[str, int] = {}
        for position, row in enumerate(df.to_dict("records")):
            line = position + 2  # 1-based, after the header line
            record = str(row[self.record_column]).strip()
            if not record:
                raise ValueError(f"{self.table}: line {line} has an empty {self.record_column!r}")
            if record in seen:
                raise ValueError(f"{self.table}: record {record!r} on lines {seen[record]} and {line}")
            seen[record] = line
            index = position
            if self.index_column is not None:
                text = str(row[self.index_column]).strip()
                if not text.isdigit() or int(text) >= n_records:
                    raise ValueError(
                        f"{self.table}: line {line} ({record!r}) has {self.index_column} = {text!r}, "
                        f"not a row of {file} (0 to {n_records - 1})"
                    )
                index = int(text)
                if index in rows:
                    raise ValueError(f"{self.table}: line {line} ({record!r}) points at row {index} of {file} again")
            patient = str(row[self.patient_column]).strip() if self.patient_column else ""
            rows[index] = (record, patient or record)
        return rows

    def _lead_names(self, file: Path, n_leads: int) -> tuple[str, ...]:
        names: Sequence[str] | None = self.lead_names
        if names is None:
            if n_leads != len(STANDARD_LEADS):
                raise ValueError(f"{file}: {n_leads} leads per record; give their names with lead_names")
            names = STANDARD_LEADS
        if len(names) != n_leads:
            raise ValueError(f"{file}: {n_leads} leads per record but lead_names has {len(names)}: {list(names)}")
        try:
            return map_lead_names(names, file)
        except RecordError as err:
            raise ValueError(str(err)) from None

    def read(self, path: Path) -> Record:
        """Load one row (from the memory map or the open HDF5 file) and scale it to float32 mV."""
        file, index = split_pseudo_path(Path(path))
        if not file.is_file():
            raise RecordError(f"{file}: array file not found")
        try:
            export = self.export(file)
        except (OSError, ValueError) as err:
            raise RecordError(str(err)) from err
        if index not in export.rows:
            raise RecordError(f"{file}: row {index} has no line in {self.table}")
        record_id, patient_id = export.rows[index]
        try:
            values = np.asarray(export.data[index])
        except (OSError, ValueError) as err:
            raise RecordError(f"{file}: cannot read row {index} ({type(err).__name__}: {err})") from err
        if not np.issubdtype(values.dtype, np.number):
            raise RecordError(f"{file}: row {index} holds {values.dtype} values, not numbers")
        signal = (values.astype(np.float64) * self.scale).astype(np.float32)
        return Record(
            record_id=record_id,
            patient_id=patient_id,
            signal=signal,
            fs=self.fs,
            lead_names=export.lead_names,
            path=Path(path),
            metadata={"array": str(file), "row": index, "units": self.units, "source": "arrays"},
        )
