"""Reader for the original China Physiological Signal Challenge 2018 files: ``A0001.mat`` holding a struct ``ECG``
(``data``: 12 x N float mV at 500 Hz, ``sex``, ``age``; no header) and ``REFERENCE.csv`` with up to three numeric
class codes per recording."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import scipy.io

from ecgfm.data.shards import TargetSpec
from ecgfm.data.sources.base import Record, RecordError, SourceReader, parse_age, parse_sex
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

#: REFERENCE.csv's class codes and the names the challenge gives them.
CPSC2018_CLASSES: dict[str, str] = {
    "1": "Normal",
    "2": "AF",
    "3": "I-AVB",
    "4": "LBBB",
    "5": "RBBB",
    "6": "PAC",
    "7": "PVC",
    "8": "STD",
    "9": "STE",
}
#: The order of the 12 rows of ``ECG.data``, as the challenge documents it.
CPSC2018_LEADS: tuple[str, ...] = STANDARD_LEADS
REFERENCE_NAME = "REFERENCE.csv"
_COLUMNS = ("Recording", "First_label", "Second_label", "Third_label")


def read_reference(path: Path) -> dict[str, list[str] | str]:
    """Recording -> its class names (first label first), or the reason its row is unusable (a code outside 1-9,
    a recording listed twice); a file without the challenge's columns fails whole, named."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except OSError as exc:
        raise RecordError(f"{path}: cannot read the label table ({exc})") from exc
    if not rows or [cell.strip() for cell in rows[0][:1]] != ["Recording"]:
        raise RecordError(f"{path}: not a CPSC 2018 REFERENCE.csv (expected the columns {', '.join(_COLUMNS)})")
    labels: dict[str, list[str] | str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        name = row[0].strip()
        codes = [cell.strip() for cell in row[1:4] if cell.strip()]
        bad = [code for code in codes if code.removesuffix(".0") not in CPSC2018_CLASSES]
        if name in labels:
            labels[name] = f"{path} line {line}: recording {name} is listed twice"
        elif bad:
            labels[name] = f"{path} line {line}: class code {bad[0]!r} of {name} is not one of 1-9"
        elif not codes:
            labels[name] = f"{path} line {line}: recording {name} has no class code"
        else:
            labels[name] = [CPSC2018_CLASSES[code.removesuffix(".0")] for code in codes]
    return labels


@SOURCES.register("cpsc2018")
class Cpsc2018Reader(SourceReader):
    """CPSC 2018 recordings in mV with the multi-label target ``dx`` over the nine classes (Normal, AF, I-AVB, LBBB,
    RBBB, PAC, PVC, STD, STE); ``first_label`` in the metadata is the challenge's primary class.

    Args:
        reference: the ``REFERENCE.csv``; by default the one beside the recordings or in the folder above them. A
            recording with no row has unknown labels (NaN, masked) and a warning.
        fs: the sampling rate, which the files do not store (500 Hz in the challenge).
    """

    def __init__(self, reference: str | Path | None = None, fs: float = 500.0):
        if not (isinstance(fs, (int, float)) and math.isfinite(fs) and fs > 0):
            raise ValueError(f"cpsc2018: fs must be a positive finite sampling rate in Hz, got {fs!r}")
        self.fs = float(fs)
        self.reference = Path(reference) if reference else None
        if self.reference is not None and not self.reference.is_file():
            raise ValueError(f"cpsc2018: reference {self.reference} does not exist")
        self._tables: dict[Path, dict[str, list[str] | str]] = {}

    def _reference_for(self, mat: Path) -> Path | None:
        """The label table of a recording: the ``reference`` option, else REFERENCE.csv beside it or one folder up."""
        if self.reference is not None:
            return self.reference
        for folder in (mat.parent, mat.parent.parent):
            if (folder / REFERENCE_NAME).is_file():
                return folder / REFERENCE_NAME
        return None

    def _labels(self, mat: Path) -> tuple[list[str] | None, str | None]:
        """(class names or None, a warning): the recording's row of its REFERENCE.csv; RecordError for a bad row."""
        table_path = self._reference_for(mat)
        if table_path is None:
            return None, f"no {REFERENCE_NAME} beside {mat.name} or in the folder above: labels unknown"
        if table_path not in self._tables:
            self._tables[table_path] = read_reference(table_path)
        entry = self._tables[table_path].get(mat.stem)
        if isinstance(entry, str):
            raise RecordError(entry)
        if entry is None:
            return None, f"{mat.stem} has no row in {table_path}: labels unknown"
        return entry, None

    def find_records(self, root: Path) -> list[Path]:
        """Every ``.mat`` file under ``root``, sorted; or ``root`` if it is one."""
        root = Path(root)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        return sorted(p for p in root.rglob("*.mat") if p.is_file())

    def target_specs(self, paths: list[Path]) -> dict[str, TargetSpec]:
        """``dx`` over all nine classes, whichever occur: every CPSC 2018 conversion gets the same vocabulary."""
        return {"dx": TargetSpec("multilabel", list(CPSC2018_CLASSES.values()))}

    def targets(self, record: Record, specs: dict[str, TargetSpec]) -> dict[str, np.ndarray]:
        """One record's ``dx``: 1 for each of its classes, 0 for the others, all NaN when it has no labels."""
        names = record.metadata.get("labels")
        if names is None:
            return {"dx": np.full(len(specs["dx"].names), np.nan, np.float32)}
        return {"dx": np.array([float(n in names) for n in specs["dx"].names], np.float32)}

    def read(self, path: Path) -> Record:
        """Read ``ECG.data`` as float32 mV [12, T] with its labels; RecordError names the file and what is wrong."""
        mat = Path(path)
        if mat.suffix.lower() != ".mat":
            mat = mat.parent / (mat.name + ".mat")
        if not mat.is_file():
            raise RecordError(f"{mat}: file not found")
        try:
            contents = scipy.io.loadmat(str(mat), simplify_cells=True)
        except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... on a damaged file
            raise RecordError(f"{mat}: cannot load .mat file ({type(exc).__name__}: {exc})") from exc
        ecg = contents.get("ECG")
        if not isinstance(ecg, dict) or "data" not in ecg:
            found = sorted(k for k in contents if not k.startswith("__"))
            raise RecordError(f"{mat}: no struct 'ECG' with a field 'data' (found {found}); not a CPSC 2018 file")
        data = np.asarray(ecg["data"])
        if data.ndim != 2 or data.shape[0] != len(CPSC2018_LEADS) or data.shape[1] == 0:
            raise RecordError(f"{mat}: ECG.data has shape {data.shape}, expected 12 leads x samples")
        if not np.issubdtype(data.dtype, np.number):
            raise RecordError(f"{mat}: ECG.data holds {data.dtype}, not numbers")
        labels, warning = self._labels(mat)
        return Record(
            record_id=mat.stem,
            patient_id=mat.stem,
            signal=data.astype(np.float32),
            fs=self.fs,
            lead_names=CPSC2018_LEADS,
            path=mat,
            metadata={
                "age": parse_age(str(ecg.get("age", ""))),
                "sex": parse_sex(str(ecg.get("sex", ""))),
                "labels": labels,
                "first_label": labels[0] if labels else None,
                "units": ["mV"] * len(CPSC2018_LEADS),
                "source": "cpsc2018",
                "warnings": [warning] if warning else [],
            },
        )
