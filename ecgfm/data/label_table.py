"""Label tables: the targets of each record from a CSV or Parquet file (one row per record), matched by record id."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecgfm.data.shards import TargetSpec
from ecgfm.data.sources import Record

__all__ = ["LABEL_SEPARATORS", "MISSING_MARKERS", "TABLE_SEPARATORS", "LabelTable", "parse_number"]

LABEL_SEPARATORS = (";", "\n", "|")
#: Cells that exports write for "no value": stored as missing without a warning, like an empty cell (a sparse lab
#: panel is mostly NA: one warning per cell would bury the real problems), and not counted as unparsable.
MISSING_MARKERS = frozenset({"nan", "na", "n/a", "null", "none"})
#: Field separators a table may use, as the command line spells them.
TABLE_SEPARATORS = {",": "','", ";": "';'", "\t": "'\\t'", "|": "'|'"}
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_DECIMAL_COMMA = re.compile(r"[-+]?\d*,\d+")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def parse_number(text: Any, decimal: str = ".") -> tuple[float, str | None]:
    """``(value, problem)`` of a regression cell: NaN and no problem when empty or NA; NaN and what is wrong when it
    is not a finite number float32 can hold (``high``, ``5,2``, ``inf``, ``1e400``), so no such value is ever stored."""
    text = str(text).strip()
    if not text or text.casefold() in MISSING_MARKERS:
        return math.nan, None
    if decimal == "," and "." in text:
        return math.nan, f"{text!r} is not a number with decimal ','"
    number = text.replace(",", ".") if decimal == "," else text
    if _NUMBER.fullmatch(number) is None:
        if decimal == "." and _DECIMAL_COMMA.fullmatch(text):
            return math.nan, f"{text!r} is not a number (a decimal comma? use --decimal ,)"
        if text.casefold().lstrip("+-") in ("inf", "infinity"):
            return math.nan, f"{text!r} is not a finite number"
        return math.nan, f"{text!r} is not a number"
    value = float(number)
    if not abs(value) <= _FLOAT32_MAX:
        return math.nan, f"{text!r} is out of range (beyond float32's ±3.4e38)"
    return value, None


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
    decimal: str = "."

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
        decimal: str = ".",
        separator: str = ",",
    ) -> LabelTable:
        """Read and check the table; a column that is mostly not numbers, or a file read with the wrong separator,
        stops here with one line naming the file and column and the likely cause."""
        path = Path(path)
        if decimal not in (".", ","):
            raise ValueError(f"decimal must be '.' or ',', got {decimal!r}")
        separator = {"\\t": "\t", "tab": "\t"}.get(separator, separator)
        if len(separator) != 1 or separator == '"' or separator.isalnum():
            raise ValueError(f"separator must be one character such as ',', ';' or '\\t', got {separator!r}")
        if not path.is_file():
            raise FileNotFoundError(f"label table {path} does not exist")
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path).astype(object)
            df = df.where(df.notna(), "").astype(str)
        else:
            df = _read_csv(path, separator)
        used = [record_column, *([patient_column] if patient_column else []), *([time_column] if time_column else [])]
        used += [c for cols in (*multilabel.values(), *regression.values()) for c in cols]
        absent = [c for c in used if c not in df.columns]
        if absent:
            hint = _separator_hint(df, separator)
            raise KeyError(f"label table {path} has no column(s) {absent}; it has {list(df.columns)}{hint}")
        if df.empty:
            raise ValueError(f"label table {path} has a header but no rows")
        numeric = [c for cols in regression.values() for c in cols] + ([time_column] if time_column else [])
        for column in dict.fromkeys(numeric):
            _check_numeric_column(path, column, df[column].tolist(), decimal)
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
        return cls(rows, targets, patient_column, multilabel, regression, time_column, max_hours, decimal)

    def lookup(self, record: Record, root: Path) -> tuple[str | None, dict[str, Any] | None]:
        """(key, row) of a record, matched by record id or by its path relative to the source folder."""
        relative = record.path.relative_to(root).with_suffix("").as_posix() if root in record.path.parents else None
        for key in (record.record_id, relative):
            if key is not None and key in self.rows:
                return key, self.rows[key]
        return None, None

    def values(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        """The targets of one row (float32, NaN where missing); ``parse_row`` also says which cells were refused."""
        return self.parse_row(row)[0]

    def parse_row(self, row: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
        """(targets, warnings) of one row: a numeric cell that is not a finite number is stored as missing, and
        named with its column and text in a warning, which the converter writes to warnings.csv."""
        warnings: list[str] = []

        def number(column: str) -> float:
            value, problem = parse_number(row[column], self.decimal)
            if problem is not None:
                warnings.append(f"label column {column!r}: {problem}; stored as missing")
            return value

        out = {}
        for name, columns in self.multilabel.items():
            present = set(_split_labels(row, columns))
            out[name] = np.array([1.0 if lab in present else 0.0 for lab in self.targets[name].names], np.float32)
        hours = number(self.time_column) if self.time_column else float("nan")
        too_far = self.max_hours is not None and not abs(hours) <= self.max_hours  # unknown time counts as too far
        for name, columns in self.regression.items():
            values = np.array([number(c) for c in columns], np.float32)
            out[name] = np.full_like(values, np.nan) if too_far else values  # masked, never dropped
        if self.time_column:
            out["lab_time"] = np.array([hours], np.float32)
        return out, warnings


def _split_labels(row: dict[str, Any], columns: list[str]) -> Iterator[str]:
    for column in columns:
        text = str(row[column])
        for sep in LABEL_SEPARATORS[1:]:
            text = text.replace(sep, LABEL_SEPARATORS[0])
        for label in text.split(LABEL_SEPARATORS[0]):
            label = label.strip().rstrip(".").strip()
            if label:
                yield label


def _read_csv(path: Path, separator: str) -> pd.DataFrame:
    """The table as strings, read so that a bad file fails naming it instead of shifting columns silently."""
    try:
        df = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"label table {path} is empty: no header line") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(
            f"label table {path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())})"
        ) from None
    if not isinstance(df.index, pd.RangeIndex):
        # pandas takes the first field of every row as an index when rows have one field more than the header:
        # the columns would be shifted by one, so record ids would pair with the wrong values
        hint = _separator_hint(df, separator)
        if hint:
            raise ValueError(f"label table {path}: its header {df.columns[0]!r} is one column{hint}")
        with path.open(encoding="utf-8-sig", errors="replace") as handle:
            line = [handle.readline(), handle.readline()][1].rstrip("\r\n")
        raise ValueError(
            f"label table {path}: its rows have one field more than its header (line 2: {line!r}); a decimal comma in "
            "a comma-separated file? quote those cells, or export with ';' and use --separator ';' --decimal ,"
        )
    return df


def _separator_hint(df: pd.DataFrame, separator: str) -> str:
    """A hint when the whole header landed in one column: the file uses another separator."""
    if len(df.columns) != 1:
        return ""
    for sep, spelled in TABLE_SEPARATORS.items():
        if sep != separator and sep in str(df.columns[0]):
            return f"; the header looks {spelled}-separated: use --separator {spelled}"
    return ""


def _check_numeric_column(path: Path, column: str, cells: Sequence[Any], decimal: str) -> None:
    """Stop when most non-empty cells of a numeric column are not numbers: a whole column of NaN is never the
    intended result, and the usual cause (a decimal comma, a wrong column) is named."""
    filled = [text for text in (str(c).strip() for c in cells) if text and text.casefold() not in MISSING_MARKERS]
    bad = [text for text in filled if parse_number(text, decimal)[1] is not None]
    if not filled or 2 * len(bad) <= len(filled):
        return
    examples = ", ".join(repr(text) for text in list(dict.fromkeys(bad))[:3])
    if decimal == "." and 2 * sum(bool(_DECIMAL_COMMA.fullmatch(text)) for text in bad) > len(bad):
        hint = "they look like decimal commas: use --decimal ,"
    elif decimal == "," and 2 * sum(parse_number(text)[1] is None for text in bad) > len(bad):
        hint = "they use a decimal point: leave out --decimal ,"
    else:
        hint = "is it the right column, and is the table read with the right --separator?"
    raise ValueError(
        f"label table {path}: column {column!r} should hold numbers but {len(bad)} of its {len(filled)} "
        f"non-empty cells do not (e.g. {examples}); {hint}"
    )
