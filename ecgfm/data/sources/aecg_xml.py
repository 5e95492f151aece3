"""Reader for HL7 aECG (``urn:hl7-org:v3`` ``<AnnotatedECG>``), the XML format the FDA takes ECGs of trials in.

A series holds a sequence set: one time sequence (``TIME_ABSOLUTE`` or ``TIME_RELATIVE``, whose ``increment`` is
the sampling interval) and one ``SLIST_PQ`` sequence per lead, ``value = origin + scale * digit``, with the lead
named by its MDC code (``MDC_ECG_LEAD_I``, ``MDC_ECG_LEAD_AVR``, ``MDC_ECG_LEAD_V1``...). The interpretation is a set
of ``MDC_ECG_INTERPRETATION_STATEMENT`` annotations (text values, usually nested in an ``MDC_ECG_INTERPRETATION``
annotation of an ``annotationSet``), which become the multi-label target ``diagnosis`` as in ``muse_xml``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from lxml import etree

from ecgfm.data.sources.base import (
    Record,
    RecordError,
    SourceReader,
    StatementFilter,
    StatementTargets,
    is_voltage,
    mv_per_unit,
)
from ecgfm.data.sources.muse_xml import find_xml_files, named_leads, parse_xml_file
from ecgfm.leads import canonical_lead
from ecgfm.registry import SOURCES

HL7 = "urn:hl7-org:v3"
NS = {"v3": HL7}
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
LEAD_PREFIX = "MDC_ECG_LEAD_"
TIME_CODES = ("TIME_ABSOLUTE", "TIME_RELATIVE")
#: The series code of each waveform the reader can take: the recording or the representative (median) beats.
SERIES_CODES = {"rhythm": "RHYTHM", "median": "REPRESENTATIVE_BEAT"}
#: Seconds per unit of the time increment (UCUM).
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
#: The MDC code of one interpretation statement (a measurement such as ``MDC_ECG_HEART_RATE`` is not one).
STATEMENT_CODE = "MDC_ECG_INTERPRETATION_STATEMENT"


def lead_name(code: str) -> str:
    """The canonical lead of an MDC code (``MDC_ECG_LEAD_AVR`` -> ``aVR``); other codes keep their own name
    (``MDC_ECG_LEAD_V7`` -> ``V7``), so the converter lists them as non-standard signals."""
    short = code[len(LEAD_PREFIX) :] if code.upper().startswith(LEAD_PREFIX) else code
    return canonical_lead(short) or short


def interpretation_statements(root: etree._Element) -> list[str]:
    """The text of every ``MDC_ECG_INTERPRETATION_STATEMENT`` annotation in the document, whitespace collapsed,
    empty ones left out, each once in document order."""
    found: dict[str, None] = {}
    path = f".//v3:annotation[v3:code/@code='{STATEMENT_CODE}']/v3:value"
    for value in root.xpath(path, namespaces=NS):
        text = " ".join("".join(value.itertext()).split())
        if text:
            found[text] = None
    return list(found)


def _quantity(element: etree._Element | None, what: str, path: Path) -> tuple[float, str | None] | None:
    """``(value, unit)`` of a PQ element (``<scale value="5" unit="uV"/>``), None when it is absent."""
    if element is None:
        return None
    text = element.get("value")
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RecordError(f"{path}: {what} value {text!r} is not a finite number")
    return value, element.get("unit")


def _sampling_rate(sequence: etree._Element, path: Path) -> float:
    """The rate from a time sequence's ``increment`` (``0.002 s`` -> 500 Hz)."""
    increment = _quantity(sequence.find("v3:value/v3:increment", NS), "time increment", path)
    if increment is None:
        raise RecordError(f"{path}: the time sequence has no <increment> (sampling interval)")
    value, unit = increment
    if (unit or "").strip() not in _SECONDS:
        raise RecordError(f"{path}: time increment unit {unit!r} is not one of {', '.join(_SECONDS)}")
    seconds = value * _SECONDS[unit.strip()]
    if not seconds > 0:
        raise RecordError(f"{path}: time increment {value:g} {unit} is not a positive interval")
    return 1.0 / seconds


def _lead_values(value: etree._Element, code: str, name: str, path: Path) -> tuple[np.ndarray, str] | None:
    """A lead's samples in mV and the unit they were in; None for a non-standard signal in a unit that is not a
    voltage (it is left out and named in a warning), a RecordError for an ECG lead in one."""
    what = f"sequence {code}"
    origin = _quantity(value.find("v3:origin", NS), f"{what} origin", path) or (0.0, None)
    scale = _quantity(value.find("v3:scale", NS), f"{what} scale", path)
    if scale is None:
        raise RecordError(f"{path}: {what} has no <scale>; cannot convert its digits to mV")
    units = [scale[1], origin[1] if origin[1] is not None else scale[1]]
    if not all(unit and is_voltage(unit) for unit in units):
        if canonical_lead(name) is None:
            return None
        bad = next(unit for unit in units if not (unit and is_voltage(unit)))
        where = f"is in {bad!r}, not a voltage" if bad else "has no unit"
        raise RecordError(f"{path}: lead {name} ({code}) {where} (expected uV, mV or V)")
    digits = value.find("v3:digits", NS)
    if digits is None or not (digits.text or "").strip():
        raise RecordError(f"{path}: {what} has no <digits>")
    try:
        numbers = np.array(digits.text.split(), dtype=np.float64)
    except ValueError as exc:
        raise RecordError(f"{path}: {what}: <digits> holds something that is not a number ({exc})") from None
    mv = origin[0] * mv_per_unit(units[1], path) + numbers * scale[0] * mv_per_unit(units[0], path)
    return mv.astype(np.float32), units[0]


def _series(root: etree._Element, code: str, path: Path) -> etree._Element:
    """The first series (or derived series) whose code is ``code``."""
    candidates = root.xpath(".//v3:series | .//v3:derivedSeries", namespaces=NS)
    codes = [(s.find("v3:code", NS).get("code") if s.find("v3:code", NS) is not None else None) for s in candidates]
    for series, found in zip(candidates, codes, strict=True):
        if found == code:
            return series
    listed = ", ".join(c or "(no code)" for c in codes) or "no series"
    raise RecordError(f"{path}: no {code} series (found: {listed})")


@SOURCES.register("aecg_xml")
class AecgXmlReader(StatementTargets, SourceReader):
    """HL7 aECG files: the rhythm series (or the representative beats) in mV, leads named from their MDC codes,
    the interpretation statements as the multi-label target ``diagnosis``.

    The ``diagnosis`` labels are every statement met in the files, sorted (no target when no file has one); as in
    ``muse_xml``, a record is 1 for each of its own statements and 0 for the others, and a record without any
    statement is unlabelled (NaN), not negative for every label. A label table (``--labels``) replaces it.

    Args:
        waveform: ``rhythm`` (the ``RHYTHM`` series, default) or ``median`` (the ``REPRESENTATIVE_BEAT`` series).
        diagnosis: read the ``MDC_ECG_INTERPRETATION_STATEMENT`` annotations as the ``diagnosis`` target
            (default); false (or null) for no target.
        derive_limb_leads: compute III, aVR, aVL, aVF from I and II when the file lacks them.
        pattern: which files under ``--source`` are records (``*.xml``, any case, by default).
        exclude_statements: regular expressions (matched at the start, any case) of statements that are not
            findings and stay out of ``diagnosis``; default ``NOT_FINDINGS`` (confirmation, referral and comparison
            lines, which hold names and dates); ``[]`` keeps every statement.
    """

    def __init__(
        self,
        waveform: str = "rhythm",
        diagnosis: bool | None = True,
        derive_limb_leads: bool = True,
        pattern: str = "*.xml",
        exclude_statements: list[str] | None = None,
    ):
        if str(waveform).lower() not in SERIES_CODES:
            raise ValueError(f"aecg_xml: waveform must be one of {sorted(SERIES_CODES)}, got {waveform!r}")
        if diagnosis not in (True, False, None):
            raise ValueError(f"aecg_xml: diagnosis must be true, false or null, got {diagnosis!r}")
        self.series_code = SERIES_CODES[str(waveform).lower()]
        self.diagnosis = bool(diagnosis)
        self.derive = bool(derive_limb_leads)
        self.pattern = pattern
        self.statements = StatementFilter(exclude_statements, "aecg_xml")

    def find_records(self, root: Path) -> list[Path]:
        """Every XML file under ``root`` (or ``root`` itself); files of other XML formats fail in ``read``."""
        return find_xml_files(root, self.pattern)

    def file_statements(self, path: Path) -> list[str]:
        root = parse_xml_file(path)
        return interpretation_statements(root) if root.tag == f"{{{HL7}}}AnnotatedECG" else []

    def read(self, path: Path) -> Record:
        """Read one aECG file as float32 mV [L, T]; the trial subject's id is the patient id, the interpretation
        statements go to the metadata as ``diagnosis``."""
        path = Path(path)
        root = parse_xml_file(path)
        if root.tag != f"{{{HL7}}}AnnotatedECG":
            raise RecordError(f"{path}: root element {root.tag} is not HL7 v3 <AnnotatedECG>; not an aECG file")
        series = _series(root, self.series_code, path)
        sets = series.findall("v3:component/v3:sequenceSet", NS)
        if not sets:
            raise RecordError(f"{path}: the {self.series_code} series has no sequenceSet")
        warnings: list[str] = []
        if len(sets) > 1:
            warnings.append(f"{len(sets)} sequence sets in the {self.series_code} series: only the first read")

        fs: float | None = None
        codes: list[str] = []
        raw_names: list[str] = []
        leads: list[np.ndarray] = []
        units: list[str] = []
        dropped: list[str] = []
        for sequence in sets[0].findall("v3:component/v3:sequence", NS):
            code_element = sequence.find("v3:code", NS)
            code = code_element.get("code", "") if code_element is not None else ""
            if code in TIME_CODES:
                if fs is None:
                    fs = _sampling_rate(sequence, path)
                continue
            value = sequence.find("v3:value", NS)
            if not code or value is None:
                raise RecordError(f"{path}: a sequence has no code or no value; leads are selected by their code")
            name = lead_name(code)
            values = _lead_values(value, code, name, path)
            if values is None:
                dropped.append(f"{name} ({value.find('v3:scale', NS).get('unit')})")
                continue
            codes.append(code)
            raw_names.append(name)
            leads.append(values[0])
            units.append(values[1])
        if fs is None:
            raise RecordError(f"{path}: no TIME_ABSOLUTE or TIME_RELATIVE sequence, so no sampling rate")
        if not leads:
            raise RecordError(f"{path}: the {self.series_code} series has no lead sequences")
        lengths = sorted({len(lead) for lead in leads})
        if len(lengths) != 1:
            raise RecordError(f"{path}: lead sequences hold different numbers of samples {lengths}")
        if dropped:
            warnings.append(f"signals not in a voltage ignored: {' '.join(dropped)}")
        signal, names, derived, derived_warnings = named_leads(np.stack(leads), raw_names, path, self.derive)
        warnings += derived_warnings

        subject = root.xpath("string(.//v3:trialSubject/v3:id/@extension)", namespaces=NS).strip()
        sex = root.xpath("string(.//v3:administrativeGenderCode/@code)", namespaces=NS).strip().upper()
        return Record(
            record_id=path.stem,
            patient_id=subject or path.stem,
            signal=signal,
            fs=fs,
            lead_names=names,
            path=path,
            metadata={
                "sex": sex if sex in ("M", "F") else None,
                "diagnosis": self.statements.findings(interpretation_statements(root), warnings)
                if self.diagnosis
                else [],
                "codes": codes,
                "units": units,
                "waveform": self.series_code,
                "derived_leads": derived,
                "warnings": warnings,
                "source": "aecg_xml",
            },
        )
