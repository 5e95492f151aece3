"""Reader for GE MUSE XML exports (``<RestingECG>``): base64 int16 leads, per-lead gain, rhythm or median beats.

MUSE stores the eight independent leads (I, II, V1-V6); III, aVR, aVL and aVF are derived from I and II by
Einthoven's and Goldberger's equations (``derive_limb_leads``), and each record says so in ``warnings.csv``.
The XML is parsed without loading the DTD, resolving entities or touching the network.
"""

from __future__ import annotations

import base64
import binascii
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
    digital_to_mv,
    map_lead_names,
    parse_age,
    parse_sex,
)
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

#: MUSE's ``LeadAmplitudeUnits`` spelled as the units ``digital_to_mv`` converts.
MUSE_UNITS = {"MICROVOLTS": "uV", "MILLIVOLTS": "mV", "VOLTS": "V"}
#: MUSE's names of its two waveforms: the continuous 10-s recording and the median (representative) beats.
WAVEFORM_TYPES = {"rhythm": "Rhythm", "median": "Median"}
#: The limb leads that follow from I and II, and how (Einthoven: III = II - I; Goldberger: the augmented leads).
DERIVED_LEADS = {
    "III": lambda i, ii: ii - i,
    "aVR": lambda i, ii: -(i + ii) / 2,
    "aVL": lambda i, ii: i - ii / 2,
    "aVF": lambda i, ii: ii - i / 2,
}


def safe_xml_parser() -> etree.XMLParser:
    """An lxml parser that loads no DTD, resolves no entity and reads nothing from the network (exports are
    untrusted input: XXE and entity expansion must not reach the file system or memory)."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def parse_xml_file(path: Path) -> etree._Element:
    """The root element of an XML file, or a RecordError naming the file (missing, unreadable or malformed)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise RecordError(f"{path}: file not found") from None
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc})") from exc
    if not data.strip():
        raise RecordError(f"{path}: empty file, not XML")
    try:
        return etree.fromstring(data, safe_xml_parser())
    except etree.XMLSyntaxError as exc:
        raise RecordError(f"{path}: malformed XML ({exc})") from None


def find_xml_files(root: Path, pattern: str) -> list[Path]:
    """The files matching ``pattern`` (case-insensitive ``*.xml`` by default) under ``root``, sorted; or ``root``."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    if pattern == "*.xml":  # exports write .XML as often as .xml
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".xml")
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def derive_limb_leads(signal: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...], list[str]]:
    """Add III, aVR, aVL and aVF where missing and I and II are present, and put standard leads in the standard
    order (others after them); returns the signal, the names and the derived leads' names."""
    index = {name: i for i, name in enumerate(names)}
    rows = dict(zip(names, signal, strict=True))
    derived: list[str] = []
    if "I" in index and "II" in index:
        lead_i, lead_ii = signal[index["I"]].astype(np.float64), signal[index["II"]].astype(np.float64)
        for name, formula in DERIVED_LEADS.items():
            if name not in index:
                rows[name] = formula(lead_i, lead_ii).astype(np.float32)
                derived.append(name)
    order = [n for n in STANDARD_LEADS if n in rows] + [n for n in names if n not in STANDARD_LEADS]
    return np.stack([rows[n] for n in order]).astype(np.float32), tuple(order), derived


def named_leads(
    signal: np.ndarray, raw_names: list[str], path: Path, derive: bool
) -> tuple[np.ndarray, tuple[str, ...], list[str], list[str]]:
    """Rows named by their leads (``map_lead_names``), the missing limb leads derived from I and II when ``derive``:
    ``(signal, names, derived lead names, the warning that says so)``, as the XML and DICOM readers all need."""
    names = map_lead_names(raw_names, path)
    if not derive:
        return signal, names, [], []
    signal, names, derived = derive_limb_leads(signal, names)
    warnings = [f"leads {' '.join(derived)} derived from I and II (not stored in the file)"] if derived else []
    return signal, names, derived, warnings


def _text(element: etree._Element, tag: str) -> str | None:
    """The stripped text of the first ``tag`` child, or None when there is none or it is empty."""
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return None
    return child.text.strip()


def _number(element: etree._Element, tag: str, what: str, path: Path) -> float | None:
    """The finite number in the first ``tag`` child, None when absent; a RecordError naming it when not a number."""
    text = _text(element, tag)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise RecordError(f"{path}: {what} <{tag}> {text!r} is not a number") from None
    if not math.isfinite(value):
        raise RecordError(f"{path}: {what} <{tag}> {text!r} is not a finite number")
    return value


def diagnosis_statements(root: etree._Element, element: str) -> list[str]:
    """The statements of ``<element>`` (``Diagnosis``, ``OriginalDiagnosis``): each ``DiagnosisStatement``'s
    ``StmtText`` parts joined by a space, empty ones left out, each once in document order."""
    found: dict[str, None] = {}
    for statement in root.findall(f"{element}/DiagnosisStatement"):
        text = " ".join(t.text.strip() for t in statement.findall("StmtText") if t.text and t.text.strip())
        if text:
            found[text] = None
    return list(found)


def _decode_lead(lead: etree._Element, name: str, path: Path) -> np.ndarray:
    """One lead's ``WaveFormData``: base64 of little-endian int16, checked against ``LeadSampleCountTotal``."""
    text = _text(lead, "WaveFormData")
    if text is None:
        raise RecordError(f"{path}: lead {name} has no WaveFormData")
    size = _number(lead, "LeadSampleSize", f"lead {name}", path)
    if size is not None and size != 2:
        raise RecordError(f"{path}: lead {name} has LeadSampleSize {size:g}; only 2-byte (int16) samples are known")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RecordError(f"{path}: lead {name}: WaveFormData is not valid base64 ({exc})") from None
    if len(raw) % 2:
        raise RecordError(f"{path}: lead {name}: WaveFormData decodes to {len(raw)} bytes, not whole int16 samples")
    samples = np.frombuffer(raw, dtype="<i2")
    declared = _number(lead, "LeadSampleCountTotal", f"lead {name}", path)
    if declared is not None and declared != len(samples):
        raise RecordError(
            f"{path}: lead {name}: WaveFormData holds {len(samples)} samples but LeadSampleCountTotal says {declared:g}"
        )
    return samples


@SOURCES.register("muse_xml")
class MuseXmlReader(StatementTargets, SourceReader):
    """GE MUSE XML files: the 10-s rhythm leads (or the median beats) in mV, limb leads derived, MUSE's
    diagnosis statements as the multi-label target ``diagnosis``.

    Args:
        waveform: ``rhythm`` (the recording, default) or ``median`` (MUSE's representative beats, ~1.2 s).
        diagnosis: the element whose statements become the ``diagnosis`` target: ``Diagnosis`` (the confirmed
            read, default), ``OriginalDiagnosis`` (the machine's read), or None for no target.
        derive_limb_leads: compute III, aVR, aVL, aVF from I and II when the file lacks them (as MUSE does).
        pattern: which files under ``--source`` are records (``*.xml``, any case, by default).
        exclude_statements: regular expressions (matched at the start, any case) of statements that are not
            findings and stay out of ``diagnosis``; default ``NOT_FINDINGS`` (confirmation, referral and comparison
            lines, which hold names and dates); ``[]`` keeps every statement.
    """

    def __init__(
        self,
        waveform: str = "rhythm",
        diagnosis: str | None = "Diagnosis",
        derive_limb_leads: bool = True,
        pattern: str = "*.xml",
        exclude_statements: list[str] | None = None,
    ):
        if str(waveform).lower() not in WAVEFORM_TYPES:
            raise ValueError(f"muse_xml: waveform must be one of {sorted(WAVEFORM_TYPES)}, got {waveform!r}")
        if diagnosis is not None and diagnosis not in ("Diagnosis", "OriginalDiagnosis"):
            raise ValueError(f"muse_xml: diagnosis must be Diagnosis, OriginalDiagnosis or null, got {diagnosis!r}")
        self.waveform = WAVEFORM_TYPES[str(waveform).lower()]
        self.diagnosis = diagnosis
        self.derive = bool(derive_limb_leads)
        self.pattern = pattern
        self.statements = StatementFilter(exclude_statements, "muse_xml")

    def find_records(self, root: Path) -> list[Path]:
        """Every XML file under ``root`` (or ``root`` itself); files of other XML formats fail in ``read``."""
        return find_xml_files(root, self.pattern)

    def file_statements(self, path: Path) -> list[str]:
        return diagnosis_statements(parse_xml_file(path), self.diagnosis)

    def read(self, path: Path) -> Record:
        """Read one MUSE file as float32 mV [L, T]; ``diagnosis``, age and sex go to the metadata."""
        path = Path(path)
        root = parse_xml_file(path)
        if root.tag != "RestingECG":
            raise RecordError(f"{path}: root element <{root.tag}> is not <RestingECG>; not a GE MUSE XML file")
        waveforms = root.findall("Waveform")
        types = [(_text(w, "WaveformType") or "?") for w in waveforms]
        chosen = [w for w, kind in zip(waveforms, types, strict=True) if kind.lower() == self.waveform.lower()]
        if not chosen:
            raise RecordError(f"{path}: no {self.waveform} waveform (found: {', '.join(types) or 'no <Waveform>'})")
        waveform = chosen[0]
        base = _number(waveform, "SampleBase", f"{self.waveform} waveform", path)
        if base is None:
            raise RecordError(f"{path}: {self.waveform} waveform has no SampleBase (sampling rate)")
        exponent = _number(waveform, "SampleExponent", f"{self.waveform} waveform", path) or 0.0
        fs = base * 10.0**exponent
        if not fs > 0:
            raise RecordError(f"{path}: sampling rate {fs:g} Hz (SampleBase {base:g}) is not a positive number")

        leads = waveform.findall("LeadData")
        if not leads:
            raise RecordError(f"{path}: {self.waveform} waveform has no LeadData")
        raw_names, samples, gains, units = [], [], [], []
        for i, lead in enumerate(leads):
            name = _text(lead, "LeadID")
            if name is None:
                raise RecordError(f"{path}: LeadData {i + 1} has no LeadID")
            samples.append(_decode_lead(lead, name, path))
            per_bit = _number(lead, "LeadAmplitudeUnitsPerBit", f"lead {name}", path)
            unit = _text(lead, "LeadAmplitudeUnits")
            if per_bit is None or unit is None:
                missing = "LeadAmplitudeUnitsPerBit" if per_bit is None else "LeadAmplitudeUnits"
                raise RecordError(f"{path}: lead {name} has no {missing}; cannot convert to mV")
            raw_names.append(name)
            gains.append(1.0 / per_bit if per_bit > 0 else per_bit)  # digital_to_mv refuses 0 and negatives
            units.append(MUSE_UNITS.get(unit.upper(), unit))
        lengths = sorted({len(s) for s in samples})
        if len(lengths) != 1:
            raise RecordError(f"{path}: leads hold different numbers of samples {lengths}")
        signal = digital_to_mv(
            np.stack(samples), gains, [0] * len(leads), units, [None] * len(leads), path, names=raw_names
        )
        signal, names, derived, warnings = named_leads(signal, raw_names, path, self.derive)

        demographics = root.find("PatientDemographics")
        patient = _text(demographics, "PatientID") if demographics is not None else None
        age = parse_age(_text(demographics, "PatientAge")) if demographics is not None else None
        age_units = (_text(demographics, "AgeUnits") or "YEARS").upper() if demographics is not None else "YEARS"
        test = root.find("TestDemographics")
        when = [_text(test, "AcquisitionDate"), _text(test, "AcquisitionTime")] if test is not None else []
        acquisition = " ".join(part for part in when if part)
        return Record(
            record_id=path.stem,
            patient_id=patient or path.stem,
            signal=signal,
            fs=fs,
            lead_names=names,
            path=path,
            metadata={
                "age": age if age_units == "YEARS" else None,  # an infant's age in months or days is not years
                "sex": parse_sex(_text(demographics, "Gender")) if demographics is not None else None,
                "diagnosis": self.statements.findings(diagnosis_statements(root, self.diagnosis), warnings)
                if self.diagnosis
                else [],
                "acquisition": acquisition,
                "waveform": self.waveform,
                "units": units,
                "derived_leads": derived,
                "warnings": warnings,
                "source": "muse_xml",
            },
        )
