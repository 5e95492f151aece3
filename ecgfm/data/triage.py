"""ECG triage levels derived from diagnosis codes (van de Leur et al., JAHA 2020): normal < abnormal, not acute
< subacute < acute.

A mapping CSV assigns a level to each diagnosis code; a record's level is the most urgent level among its mapped
codes, and unknown (None) when none of its codes is mapped. ``recipes/triage/snomed_triage.csv`` is an editable
example for the SNOMED-CT codes of the PhysioNet/CinC Challenge 2021.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np

#: The four levels, least to most urgent; the shards store them one-hot in this order.
TRIAGE_LEVELS: tuple[str, ...] = ("normal", "abnormal_not_acute", "subacute", "acute")

#: Columns a mapping CSV must have (others, e.g. an abbreviation, are allowed and ignored).
MAPPING_COLUMNS = ("code", "level", "description")


def parse_level(text: str) -> int:
    """A level name (``acute``, ``Abnormal not acute``, ``abnormal-not-acute``) or number (0..3) -> 0..3."""
    key = str(text).strip().lower().replace("-", "_").replace(" ", "_")
    if key in TRIAGE_LEVELS:
        return TRIAGE_LEVELS.index(key)
    if key.isdigit() and int(key) < len(TRIAGE_LEVELS):
        return int(key)
    raise ValueError(
        f"unknown level {text!r}; expected one of {', '.join(TRIAGE_LEVELS)} or 0..{len(TRIAGE_LEVELS) - 1}"
    )


def load_triage_mapping(path: str | Path) -> dict[str, int]:
    """Diagnosis code -> level index (0..3) from a CSV with columns ``code``, ``level`` and ``description``.

    Raises ValueError naming the file (and the line) for a missing column, an empty code, an unknown level, or a
    code listed twice with different levels (the same code twice with one level is accepted).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"triage mapping {path} does not exist")
    mapping: dict[str, int] = {}
    first_line: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in MAPPING_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the header has {columns}")
        reader.fieldnames = columns
        for row in reader:
            line = reader.line_num
            code = (row["code"] or "").strip()
            if not code:
                raise ValueError(f"{path}, line {line}: empty code")
            try:
                level = parse_level(row["level"] or "")
            except ValueError as err:
                raise ValueError(f"{path}, line {line}: code {code}: {err}") from None
            if code in mapping and mapping[code] != level:
                raise ValueError(
                    f"{path}, line {line}: code {code} is {TRIAGE_LEVELS[level]!r} here but "
                    f"{TRIAGE_LEVELS[mapping[code]]!r} on line {first_line[code]}"
                )
            mapping.setdefault(code, level)
            first_line.setdefault(code, line)
    return mapping


def triage_level(codes: Iterable[str], mapping: dict[str, int]) -> int | None:
    """The most urgent level among the mapped codes (0..3), or None when no code is mapped."""
    levels = [mapping[str(code).strip()] for code in codes if str(code).strip() in mapping]
    return max(levels) if levels else None


def triage_one_hot(level: int | None) -> np.ndarray:
    """float32 one-hot over ``TRIAGE_LEVELS``; all NaN (missing) for None."""
    out = np.full(len(TRIAGE_LEVELS), np.nan if level is None else 0.0, np.float32)
    if level is not None:
        out[level] = 1.0
    return out


__all__ = ["MAPPING_COLUMNS", "TRIAGE_LEVELS", "load_triage_mapping", "parse_level", "triage_level", "triage_one_hot"]
