"""What every record reader returns and the shared digital-to-millivolt conversion; readers register in
``ecgfm.registry.SOURCES``."""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm.data.shards import TargetSpec
from ecgfm.leads import canonical_lead


class RecordError(Exception):
    """A record that cannot be read; the message names the file and the reason."""


@dataclass
class Record:
    """One recording in physical units (mV), leads named, ready to be resampled, cut and written to shards."""

    record_id: str
    patient_id: str
    signal: np.ndarray  # float32 [L, T] in millivolts; NaN where the recorder stored an invalid sample
    fs: float
    lead_names: tuple[str, ...]  # canonical names for standard leads, the raw name otherwise
    path: Path
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.signal.ndim != 2 or self.signal.shape[0] != len(self.lead_names):
            raise ValueError(
                f"{self.path}: signal shape {self.signal.shape} does not match {len(self.lead_names)} lead names"
            )
        fs = float(self.fs) if isinstance(self.fs, (int, float, np.number)) else math.nan
        if not (math.isfinite(fs) and fs > 0):
            # a backstop for every reader: resampling with such a rate would stretch or abort, never warn
            raise RecordError(f"{self.path}: sampling rate {self.fs!r} Hz is not a positive finite number")


class SourceReader(ABC):
    """Finds the records of one on-disk format under a folder and reads them one by one.

    A reader whose format carries labels (Challenge ``# Dx:`` codes, PTB-XL's SCP statements) also declares
    them: ``target_specs`` gives the vocabularies over all records, ``targets`` one record's values.
    """

    name: str = ""

    def target_specs(self, paths: list[Path]) -> dict[str, TargetSpec]:
        """Targets this format provides for these records (none by default: labels come from a table)."""
        return {}

    def targets(self, record: Record, specs: dict[str, TargetSpec]) -> dict[str, np.ndarray]:
        """One record's values for ``specs`` (from ``target_specs``): float32 per target, NaN where unknown."""
        return {}

    def find_records(self, root: Path) -> list[Path]:
        """Record paths (header path minus ``.hea``) under ``root``, sorted so every run sees one order."""
        root = Path(root)
        if root.is_file() and root.suffix == ".hea":
            return [root.with_suffix("")]
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        return sorted(header.with_suffix("") for header in root.rglob("*.hea") if header.is_file())

    @abstractmethod
    def read(self, path: Path) -> Record:
        """Read the record at ``path`` (with or without ``.hea``); raises RecordError if it cannot be read."""


#: Statement lines that are no finding about the ECG itself: who confirmed, read or referred it, and comparisons with
#: an earlier ECG (``Confirmed by SMITH, J (123) on 3/14/2015``, ``When compared with ECG of 12-MAR-2015 ...``). They
#: hold names and dates and differ from record to record, so as labels they would only carry who and when into the
#: manifest. Matched case-insensitively at the start of a statement; ``exclude_statements`` replaces the list.
NOT_FINDINGS: tuple[str, ...] = (
    r"confirmed by",
    r"unconfirmed",
    r"(electronically )?signed",
    r"referred by",
    r"reviewed by",
    r"over-?read by",
    r"(when )?compared (with|to)",
)


class StatementFilter:
    """Keeps the findings of a record's interpretation statements and counts the lines left out (``NOT_FINDINGS``,
    or the reader's ``exclude_statements``: regular expressions matched at the start, case-insensitively)."""

    def __init__(self, exclude: Sequence[str] | None, reader: str):
        patterns = NOT_FINDINGS if exclude is None else exclude
        if isinstance(patterns, str):
            patterns = [patterns]
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(str(pattern), re.IGNORECASE))
            except re.error as err:
                raise ValueError(
                    f"{reader}: exclude_statements {pattern!r} is not a regular expression ({err})"
                ) from None
        self.patterns = compiled

    def split(self, statements: Sequence[str]) -> tuple[list[str], int]:
        """``(findings, number of statements left out)``."""
        kept = [s for s in statements if not any(p.match(s) for p in self.patterns)]
        return kept, len(statements) - len(kept)

    def findings(self, statements: Sequence[str], warnings: list[str] | None = None) -> list[str]:
        """The findings; with ``warnings``, a line saying how many statements were left out (not their text: it
        holds names and dates)."""
        kept, left_out = self.split(statements)
        if left_out and warnings is not None:
            warnings.append(
                f"{left_out} interpretation statement{'s' if left_out > 1 else ''} left out of diagnosis: "
                "not a finding (confirmation, referral or comparison line; exclude_statements)"
            )
        return kept


class StatementTargets:
    """For readers whose files carry interpretation statements: the findings become the multi-label target
    ``diagnosis``, whose labels are every finding met in the folder. A reader sets ``statements`` (a
    :class:`StatementFilter`) and ``diagnosis`` (falsy: no target), implements :meth:`file_statements`, and puts a
    record's findings in its metadata as ``diagnosis``."""

    statements: StatementFilter
    diagnosis: Any

    @abstractmethod
    def file_statements(self, path: Path) -> list[str]:
        """Every statement of one file, as it stands (a RecordError for a file that cannot be read)."""

    def target_specs(self, paths: list[Path]) -> dict[str, TargetSpec]:
        """The ``diagnosis`` target: every finding met in these files, sorted (none when no file has one)."""
        if not self.diagnosis:
            return {}
        names: set[str] = set()
        for path in paths:
            try:
                names.update(self.statements.findings(self.file_statements(Path(path))))
            except RecordError:
                continue  # reported when the record itself is read
        return {"diagnosis": TargetSpec("multilabel", sorted(names))} if names else {}

    def targets(self, record: Record, specs: dict[str, TargetSpec]) -> dict[str, np.ndarray]:
        """1 for each of the record's findings, 0 for the others; NaN (unlabelled) for a record without any."""
        if "diagnosis" not in specs:
            return {}
        return {"diagnosis": statement_targets(record.metadata.get("diagnosis", []), specs["diagnosis"].names)}


def statement_targets(statements: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """A record's interpretation statements as a multi-label row over ``names``: 1 for each of its statements, 0 for
    the others; a record without any statement is unlabelled (a NaN row), since an uninterpreted ECG is not a normal
    one (as PTB-XL's diagnostic sets treat a record without a statement)."""
    if not statements:
        return np.full(len(names), np.nan, np.float32)
    present = set(statements)
    return np.array([float(name in present) for name in names], np.float32)


def record_base(path: Path) -> Path:
    """The record path without a ``.hea`` suffix, so users may pass either form."""
    path = Path(path)
    return path.with_suffix("") if path.suffix == ".hea" else path


#: A WFDB gain field: "1000.0(0)/mV", "1000/mv", "200(-5)", "500" -> gain, optional baseline, optional unit.
GAIN_FIELD = re.compile(r"^([-+]?[0-9.]+(?:[eE][-+]?\d+)?)(?:\((-?\d+)\))?(?:/(\S+))?$")


def parse_fs(field: str, hea: Path) -> float:
    """The sampling frequency of a header's record line (``500``, ``500/1000(0)``), read from the raw text.

    wfdb's parser reads ``-500`` as counter frequency -500 and WFDB's default 250 Hz, which stretched records 2x:
    anything but a positive finite number is refused here, naming the header.
    """
    text = re.split(r"[/(]", field.strip(), maxsplit=1)[0]
    try:
        fs = float(text)
    except ValueError:
        fs = math.nan
    if not (math.isfinite(fs) and fs > 0):
        raise RecordError(f"{hea}: sampling frequency {field!r} on the record line is not a positive number of Hz")
    return fs


def parse_gain(field: str, signal: int, hea: Path) -> tuple[float, int | None, str | None]:
    """``(gain, baseline or None, unit or None)`` of a signal line's gain field, read from the raw text because wfdb
    substitutes 200 for a gain of 0; ``digital_to_mv`` judges the value, only an unreadable field fails here."""
    match = GAIN_FIELD.match(field)
    try:
        gain = float(match.group(1)) if match else math.nan
    except ValueError:  # "1.2.3" passes the pattern
        match = None
    if match is None:
        raise RecordError(f"{hea}: signal line {signal + 1} has an unreadable gain field {field!r}")
    return gain, int(match.group(2)) if match.group(2) is not None else None, match.group(3)


def check_gain(gain: float, signal: int, hea: Path, lead: str | None = None) -> None:
    """Refuse a gain that cannot turn stored integers into millivolts: 0 or missing means uncalibrated, a negative
    one would store the lead inverted, and NaN or infinity would store nothing."""
    what = f"signal {signal + 1}" + (f" (lead {lead})" if lead else "")
    if gain == 0:
        raise RecordError(f"{hea}: {what} has ADC gain 0 (uncalibrated); cannot convert to mV")
    if not math.isfinite(gain):
        raise RecordError(f"{hea}: {what} has ADC gain {gain!r}, not a finite number; cannot convert to mV")
    if gain < 0:
        raise RecordError(f"{hea}: {what} has a negative ADC gain {gain:g}; it would store the lead inverted")


def header_path(record: Path) -> Path:
    """The ``.hea`` file of a record path (record names may contain dots, so no ``with_suffix``)."""
    return record.parent / (record.name + ".hea")


# Millivolts per unit; keys are case-folded (Challenge headers write "mv", some exports "µV" or "uV").
# casefold() turns both the micro sign and the Greek mu into "\u03bc".
_MV_PER_UNIT: dict[str, float] = {"mv": 1.0, "uv": 1e-3, "\u03bcv": 1e-3, "v": 1e3}


def is_voltage(unit: str | None) -> bool:
    """Whether a header's unit is one ``mv_per_unit`` converts (a missing unit is mV, as in the WFDB spec)."""
    return (unit or "mV").strip().casefold() in _MV_PER_UNIT


def mv_per_unit(unit: str | None, path: Path) -> float:
    """Scale from a header's physical unit to millivolts; a missing unit is mV as in the WFDB spec."""
    key = (unit or "mV").strip().casefold()
    if key not in _MV_PER_UNIT:
        raise RecordError(f"{path}: unknown signal unit {unit!r} (expected mV, uV/µV or V)")
    return _MV_PER_UNIT[key]


def digital_to_mv(
    digital: np.ndarray,
    gains: Sequence[float],
    baselines: Sequence[float],
    units: Sequence[str | None],
    invalid: Sequence[int | None],
    path: Path,
    names: Sequence[str | None] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> np.ndarray:
    """Convert stored integers [L, T] to float32 millivolts per lead; each lead's invalid code becomes NaN.

    With ``names``, a signal that is not an ECG lead and cannot be converted (a respiration channel in ohms, an
    uncalibrated marker) is all NaN instead of failing the record; an ECG lead in such a state fails it, named.
    ``aliases`` (``ecgfm.leads.lead_aliases``) are the user's extra lead names, so an aliased lead is judged as one.
    """
    n_leads = digital.shape[0]
    if not (len(gains) == len(baselines) == len(units) == len(invalid) == n_leads):
        raise RecordError(f"{path}: header describes {len(gains)} signals but the data has {n_leads}")
    out = np.empty(digital.shape, dtype=np.float32)
    for i in range(n_leads):
        name = (names[i] or "").strip() if names is not None else ""
        lead_name = canonical_lead(name, aliases) if name else None
        gain = float(gains[i])
        usable = is_voltage(units[i]) and math.isfinite(gain) and gain > 0
        if names is not None and not lead_name and not usable:
            out[i] = np.nan  # not an ECG lead (the converter ignores it), and not convertible to millivolts
            continue
        if not is_voltage(units[i]):
            what = f"signal {i + 1}" + (f" (lead {lead_name})" if lead_name else "")
            raise RecordError(f"{path}: {what} is in {units[i]!r}, not a voltage (expected mV, uV/µV or V)")
        check_gain(gain, i, path, lead_name)
        lead = (digital[i].astype(np.float64) - float(baselines[i])) / gain * mv_per_unit(units[i], path)
        if invalid[i] is not None:
            lead[digital[i] == invalid[i]] = np.nan
        out[i] = lead
    return out


def map_lead_names(
    raw_names: Sequence[str | None], path: Path, aliases: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """Canonical names for standard leads (the user's ``aliases`` included), raw names for the rest; two signals
    with one name are an error."""
    names: list[str] = []
    first_raw: dict[str, str] = {}
    for i, raw in enumerate(raw_names):
        raw = (raw or "").strip()
        if not raw:
            raise RecordError(f"{path}: signal {i} has no name; leads are selected by name")
        name = canonical_lead(raw, aliases) or raw
        if name in first_raw:
            raise RecordError(f"{path}: signals {first_raw[name]!r} and {raw!r} are both lead {name!r}")
        first_raw[name] = raw
        names.append(name)
    return tuple(names)


def parse_comment_fields(comments: Sequence[str]) -> dict[str, str]:
    """``Key: value`` header comments as a dict with lower-case keys (``<age>: 51`` and ``Age: 51`` alike)."""
    fields: dict[str, str] = {}
    for line in comments:
        key, sep, value = line.partition(":")
        key = key.strip().strip("<>").strip().lower()
        if sep and key and key not in fields:
            fields[key] = value.strip()
    return fields


def parse_age(text: str | None) -> int | None:
    """Age in whole years, or None for a missing, ``NaN`` or ``Unknown`` entry."""
    if text is None:
        return None
    try:
        age = float(text.strip())
    except ValueError:
        return None
    if not math.isfinite(age) or age < 0:
        return None
    return int(round(age))


def parse_sex(text: str | None) -> str | None:
    """``"M"``, ``"F"`` or None, whichever spelling the header uses (``Male``, ``F``, ``female``)."""
    key = (text or "").strip().lower()
    if key in ("m", "male"):
        return "M"
    if key in ("f", "female"):
        return "F"
    return None
