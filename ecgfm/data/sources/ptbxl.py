"""Reader for the PTB-XL layout: WFDB records listed in ``ptbxl_database.csv``, SCP-ECG labels, patient folds.

PTB-XL (Wagner et al., PhysioNet 2020) keeps each 10-s recording at 100 Hz (``records100/``) and 500 Hz
(``records500/``); ``scp_codes`` holds ``{code: likelihood}`` and ``scp_statements.csv`` groups the codes into
diagnostic classes, form and rhythm statements. ``strat_fold`` (1-10) keeps each patient in one fold.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ecgfm.data.shards import TargetSpec
from ecgfm.data.sources.base import (
    Record,
    RecordError,
    SourceReader,
    header_path,
    parse_age,
    record_base,
)
from ecgfm.data.sources.wfdb import WfdbReader
from ecgfm.io import atomic_write_json
from ecgfm.registry import SOURCES

DATABASE_CSV = "ptbxl_database.csv"
STATEMENTS_CSV = "scp_statements.csv"
SAMPLING_COLUMNS = {100: "filename_lr", 500: "filename_hr"}
LABEL_SETS = ("statements", "diagnostic", "subclass", "superclass", "form", "rhythm")
# Sets built from diagnostic statements: a record without one is unlabelled (NaN), not negative for every class.
DIAGNOSTIC_SETS = ("diagnostic", "subclass", "superclass")
FOLDS = [str(fold) for fold in range(1, 11)]
_DATABASE_COLUMNS = ("ecg_id", "patient_id", "strat_fold", "scp_codes", "filename_lr", "filename_hr")
_STATEMENT_COLUMNS = ("diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass")


@dataclass
class _Statement:
    """One row of scp_statements.csv: which label sets an SCP code belongs to."""

    diagnostic: bool
    form: bool
    rhythm: bool
    diagnostic_class: str
    diagnostic_subclass: str


@dataclass
class _Row:
    """One row of ptbxl_database.csv, parsed."""

    ecg_id: int
    patient_id: str
    age: int | None
    sex: str | None
    strat_fold: int | None
    scp_codes: dict[str, float]
    files: dict[int, str]  # sampling rate -> record path relative to the root, without .hea


@dataclass
class _Database:
    """Both CSVs of one PTB-XL folder; rows in ecg_id order and by record file."""

    root: Path
    rows: list[_Row]
    by_file: dict[str, _Row]
    statements: dict[str, _Statement]


def _flag(text: str) -> bool:
    """scp_statements.csv marks membership with ``1.0`` and leaves the cell empty otherwise."""
    try:
        return float(text) == 1.0
    except ValueError:
        return False


def _read_csv(path: Path, columns: Sequence[str], **kwargs) -> pd.DataFrame:
    """A CSV as strings (so ids stay exact); FileNotFoundError or ValueError name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a PTB-XL folder holds {DATABASE_CSV} and {STATEMENTS_CSV})")
    df = pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; it has {list(df.columns)}")
    return df


def _patient_id(text: str) -> str:
    """``15709.0`` (pandas wrote the ids as floats) -> ``15709``; other ids are kept as written."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if math.isfinite(value) and value == int(value) else text


def _parse_row(row: dict[str, str], csv_path: Path) -> _Row:
    where = f"{csv_path}: ecg_id {row['ecg_id']!r}"
    try:
        ecg_id = int(float(row["ecg_id"]))
    except ValueError:
        raise ValueError(f"{where} is not a number") from None
    try:
        codes = ast.literal_eval(row["scp_codes"]) if row["scp_codes"].strip() else {}
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"{where}: unreadable scp_codes {row['scp_codes']!r} ({err})") from None
    if not isinstance(codes, dict) or not all(isinstance(v, (int, float)) for v in codes.values()):
        raise ValueError(f"{where}: scp_codes {row['scp_codes']!r} is not a {{code: likelihood}} dict")
    try:
        fold = int(float(row["strat_fold"]))
    except ValueError:
        fold = None
    sex = {"0": "M", "1": "F"}.get(row.get("sex", "").strip().removesuffix(".0"))  # PTB-XL: 0 male, 1 female
    return _Row(
        ecg_id=ecg_id,
        patient_id=_patient_id(row["patient_id"]),
        age=parse_age(row.get("age")),
        sex=sex,
        strat_fold=fold,
        scp_codes={str(code).strip(): float(value) for code, value in codes.items()},
        files={rate: row[column].strip() for rate, column in SAMPLING_COLUMNS.items()},
    )


def load_database(root: Path) -> _Database:
    """Parse ``ptbxl_database.csv`` and ``scp_statements.csv`` under ``root``; errors name the file and row."""
    root = Path(root)
    csv_path = root / DATABASE_CSV
    df = _read_csv(csv_path, _DATABASE_COLUMNS)
    statements_df = _read_csv(root / STATEMENTS_CSV, _STATEMENT_COLUMNS, index_col=0)
    rows = sorted((_parse_row(row, csv_path) for row in df.to_dict("records")), key=lambda r: r.ecg_id)
    by_file: dict[str, _Row] = {}
    for i, row in enumerate(rows):
        if i and rows[i - 1].ecg_id == row.ecg_id:
            raise ValueError(f"{csv_path}: ecg_id {row.ecg_id} appears twice")
        for name in row.files.values():
            by_file[name] = row
    statements = {
        str(code).strip(): _Statement(
            diagnostic=_flag(s["diagnostic"]),
            form=_flag(s["form"]),
            rhythm=_flag(s["rhythm"]),
            diagnostic_class=s["diagnostic_class"].strip(),
            diagnostic_subclass=s["diagnostic_subclass"].strip(),
        )
        for code, s in statements_df.to_dict("index").items()
    }
    return _Database(root, rows, by_file, statements)


def _csvs(root: Path) -> tuple[Path, Path]:
    return root / DATABASE_CSV, root / STATEMENTS_CSV


def find_root(path: Path) -> Path | None:
    """The folder above a record that holds ``ptbxl_database.csv`` (records sit two levels below it)."""
    for parent in Path(path).parents:
        if (parent / DATABASE_CSV).is_file():
            return parent
    return None


@SOURCES.register("ptbxl")
class PtbxlReader(SourceReader):
    """PTB-XL records at 100 or 500 Hz, in ecg_id order, with the CSV's patient ids, folds and SCP labels.

    Args:
        sampling: 500 (``records500/``, ``filename_hr``) or 100 (``records100/``, ``filename_lr``; the converter
            resamples to 500 Hz).
        label_sets: multi-label targets ``ptbxl_<set>`` to store, among statements, diagnostic, subclass,
            superclass, form, rhythm.
        min_likelihood: drop diagnostic statements whose likelihood (0-100) is lower; form and rhythm
            statements carry likelihood 0 in PTB-XL and are always kept.
    """

    def __init__(self, sampling: int = 500, label_sets: Sequence[str] = ("superclass",), min_likelihood: float = 0.0):
        if sampling not in SAMPLING_COLUMNS:
            raise ValueError(f"ptbxl: sampling must be 100 or 500 (Hz), got {sampling!r}")
        if isinstance(label_sets, str):
            label_sets = [label_sets]
        unknown = [s for s in label_sets if s not in LABEL_SETS]
        if unknown:
            raise ValueError(f"ptbxl: unknown label set(s) {unknown}; known: {', '.join(LABEL_SETS)}")
        if not 0 <= min_likelihood <= 100:
            raise ValueError(f"ptbxl: min_likelihood must be within 0-100, got {min_likelihood!r}")
        self.sampling = int(sampling)
        self.label_sets = list(dict.fromkeys(label_sets))
        self.min_likelihood = float(min_likelihood)
        self._wfdb = WfdbReader()
        self._databases: dict[Path, tuple[tuple, _Database]] = {}

    def database(self, root: Path) -> _Database:
        """The parsed CSVs of ``root``, read once per process and again only when a CSV changes."""
        root = Path(root)
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None for p in _csvs(root))
        cached = self._databases.get(root)
        if cached is None or cached[0] != stamp:
            cached = (stamp, load_database(root))
            self._databases[root] = cached
        return cached[1]

    def find_records(self, root: Path) -> list[Path]:
        """Record paths of the chosen rate for every CSV row, in ecg_id order; missing files fail in ``read``."""
        root = Path(root)
        db = self.database(root.parent if root.name == DATABASE_CSV else root)
        column = SAMPLING_COLUMNS[self.sampling]
        unnamed = [row.ecg_id for row in db.rows if not row.files[self.sampling]]
        if unnamed:
            raise ValueError(f"{db.root / DATABASE_CSV}: empty {column} for ecg_id {unnamed[:5]}")
        return [db.root / row.files[self.sampling] for row in db.rows]

    def _row(self, path: Path) -> tuple[_Database, _Row]:
        record = record_base(Path(path))
        root = find_root(record)
        if root is None:
            raise RecordError(f"{record}: no {DATABASE_CSV} in any folder above it; not a PTB-XL record")
        try:
            db = self.database(root)
        except (OSError, ValueError) as err:
            raise RecordError(str(err)) from err
        key = record.relative_to(root).as_posix()
        if key not in db.by_file:
            raise RecordError(f"{record}: not listed in {root / DATABASE_CSV}")
        return db, db.by_file[key]

    def read(self, path: Path) -> Record:
        """Read the WFDB record; record id = ecg_id, patient id, fold and SCP codes from the CSV."""
        record = record_base(Path(path))
        db, row = self._row(record)
        if not header_path(record).is_file():
            raise RecordError(f"{header_path(record)}: header file not found (ecg_id {row.ecg_id} in {DATABASE_CSV})")
        if not row.patient_id:
            raise RecordError(f"{db.root / DATABASE_CSV}: ecg_id {row.ecg_id} has no patient_id")
        rec = self._wfdb.read(record)
        metadata = {
            **rec.metadata,
            "ecg_id": row.ecg_id,
            "age": row.age,
            "sex": row.sex,
            "strat_fold": row.strat_fold,
            "scp_codes": dict(row.scp_codes),
            "source": "ptbxl",
        }
        return replace(rec, record_id=str(row.ecg_id), patient_id=row.patient_id, metadata=metadata)

    def labels(self, scp_codes: dict[str, float], statements: dict[str, _Statement]) -> dict[str, set[str] | None]:
        """Label names per requested set for one record's codes; None where a diagnostic set has no statement."""
        kept = {
            code
            for code, likelihood in scp_codes.items()
            if not (code in statements and statements[code].diagnostic) or likelihood >= self.min_likelihood
        }
        diagnostic = [code for code in kept if code in statements and statements[code].diagnostic]
        every = {
            "statements": kept,
            "diagnostic": set(diagnostic),
            "subclass": {statements[c].diagnostic_subclass for c in diagnostic} - {""},
            "superclass": {statements[c].diagnostic_class for c in diagnostic} - {""},
            "form": {code for code in kept if code in statements and statements[code].form},
            "rhythm": {code for code in kept if code in statements and statements[code].rhythm},
        }
        return {s: None if s in DIAGNOSTIC_SETS and not diagnostic else every[s] for s in self.label_sets}

    def target_specs(self, paths: list[Path]) -> dict[str, TargetSpec]:
        """``ptbxl_<set>`` vocabularies over these records, and the ``strat_fold`` target (one-hot, 10 folds)."""
        vocab: dict[str, set[str]] = {s: set() for s in self.label_sets}
        for path in paths:
            try:
                db, row = self._row(path)
            except RecordError:
                continue  # reported when the record is read
            for name, labels in self.labels(row.scp_codes, db.statements).items():
                vocab[name] |= labels or set()
        specs = {f"ptbxl_{s}": TargetSpec("multilabel", sorted(vocab[s])) for s in self.label_sets}
        specs["strat_fold"] = TargetSpec("multiclass", list(FOLDS))
        return specs

    def targets(self, record: Record, specs: dict[str, TargetSpec]) -> dict[str, np.ndarray]:
        """0/1 per label (NaN rows for unlabelled diagnostic sets); ``strat_fold`` one-hot, NaN if unknown."""
        db, _ = self._row(record.path)
        out: dict[str, np.ndarray] = {}
        for name, labels in self.labels(record.metadata["scp_codes"], db.statements).items():
            names = specs[f"ptbxl_{name}"].names
            if labels is None:
                out[f"ptbxl_{name}"] = np.full(len(names), np.nan, np.float32)
            else:
                out[f"ptbxl_{name}"] = np.array([float(n in labels) for n in names], np.float32)
        fold = str(record.metadata.get("strat_fold"))
        folds = specs["strat_fold"].names
        out["strat_fold"] = (
            np.array([float(f == fold) for f in folds], np.float32)
            if fold in folds
            else np.full(len(folds), np.nan, np.float32)
        )
        return out


def ptbxl_split_file(root: Path, out: Path, val_folds: Sequence[int] = (9,), test_folds: Sequence[int] = (10,)) -> Path:
    """Write ``{"train", "val", "test"}`` patient lists from PTB-XL's ``strat_fold`` for ShardDataModule(split_file=).

    Folds 9 and 10 hold the validated labels, hence the defaults; a patient in two folds raises ValueError.
    """
    overlap = set(val_folds) & set(test_folds)
    if overlap:
        raise ValueError(f"fold(s) {sorted(overlap)} are both validation and test folds")
    db = load_database(Path(root))
    fold_of: dict[str, int] = {}
    for row in db.rows:
        if not row.patient_id or row.strat_fold is None:
            raise ValueError(f"{db.root / DATABASE_CSV}: ecg_id {row.ecg_id} has no patient_id or strat_fold")
        if row.patient_id in fold_of and fold_of[row.patient_id] != row.strat_fold:
            raise ValueError(
                f"{db.root / DATABASE_CSV}: patient {row.patient_id} is in folds "
                f"{fold_of[row.patient_id]} and {row.strat_fold} (ecg_id {row.ecg_id}); folds must be patient-disjoint"
            )
        fold_of[row.patient_id] = row.strat_fold
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for patient, fold in fold_of.items():
        split = "val" if fold in val_folds else "test" if fold in test_folds else "train"
        splits[split].append(patient)
    return atomic_write_json(out, splits, indent=1)
