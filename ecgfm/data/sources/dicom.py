"""Reader for DICOM ECG waveforms (12-Lead, General and Ambulatory ECG Waveform Storage), through ``pydicom``.

Samples are taken raw from pydicom and scaled here, channel by channel: ``pydicom``'s ``waveform_array`` assumes a
sensitivity of 1 where a channel has none and leaves values in each channel's own unit (µV or mV), while a shard
needs every lead in mV and a channel without calibration refused. The interpretation statements (the text items of
the ``WaveformAnnotationSequence``) become the multi-label target ``diagnosis`` as in ``muse_xml``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm.data.sources.base import (
    Record,
    RecordError,
    SourceReader,
    StatementFilter,
    StatementTargets,
    is_voltage,
    mv_per_unit,
    parse_sex,
)
from ecgfm.data.sources.muse_xml import named_leads
from ecgfm.leads import canonical_lead
from ecgfm.registry import SOURCES

#: SOP classes of ECG waveforms: 12-Lead, General and Ambulatory ECG Waveform Storage.
ECG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-Lead ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.2": "General ECG",
    "1.2.840.10008.5.1.4.1.1.9.1.3": "Ambulatory ECG",
}
#: Lead numbers shared by the SCP-ECG (``5.6.3-9-N``) and MDC (``2:N``) code values of the channel source.
LEAD_CODES = {
    1: "I",
    2: "II",
    3: "V1",
    4: "V2",
    5: "V3",
    6: "V4",
    7: "V5",
    8: "V6",
    61: "III",
    62: "aVR",
    63: "aVL",
    64: "aVF",
}
_CODE_NUMBER = re.compile(r"^(?:5\.6\.3-9-|2:)(\d+)$")


def channel_name(channel: Any) -> str:
    """A channel's lead from its source's code meaning (``Lead I (Einthoven)`` -> ``I``) or, failing that, its
    SCP-ECG/MDC code value; the meaning as written for anything else (``Respiration``), so it is named."""
    sources = channel.get("ChannelSourceSequence") or []
    if not sources:
        label = str(channel.get("ChannelLabel", "") or "").strip()
        return canonical_lead(label) or label
    source = sources[0]
    meaning = str(source.get("CodeMeaning", "") or "").strip()
    short = re.sub(r"^lead\s*", "", re.sub(r"\(.*?\)", "", meaning).strip(), flags=re.IGNORECASE)
    if short.startswith("-"):  # "Lead -aVR" is inverted aVR: naming it aVR would store the lead upside down
        return meaning
    lead = canonical_lead(short)
    if lead:
        return lead
    match = _CODE_NUMBER.match(str(source.get("CodeValue", "") or "").strip())
    if match and int(match.group(1)) in LEAD_CODES:
        return LEAD_CODES[int(match.group(1))]
    return meaning or str(source.get("CodeValue", "") or "").strip()


def _channel_unit(channel: Any) -> str | None:
    """The UCUM code of a channel's sensitivity unit (``uV``, ``mV``), None when the channel names none."""
    units = channel.get("ChannelSensitivityUnitsSequence") or []
    if not units:
        return None
    return str(units[0].get("CodeValue", "") or "").strip() or None


def _number(value: Any, what: str, path: Path) -> float:
    """``value`` as a finite float, or a RecordError naming the file and the element."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise RecordError(f"{path}: {what} {value!r} is not a finite number")
    return number


def _is_median(group: Any) -> bool:
    """Whether a multiplex group holds median (representative) beats rather than the recording itself."""
    label = str(group.get("MultiplexGroupLabel", "") or "").upper()
    return "MEDIAN" in label or "BEAT" in label or str(group.get("WaveformOriginality", "")).upper() == "DERIVED"


def interpretation_statements(ds: Any) -> list[str]:
    """The statements of a dataset: the ``UnformattedTextValue`` of each ``WaveformAnnotationSequence`` item,
    whitespace collapsed, empty ones left out, each once in file order. Coded items (``ConceptNameCodeSequence``
    with a ``NumericValue``: heart rate, QT...) are measurements, not statements, and have no such text."""
    found: dict[str, None] = {}
    for item in ds.get("WaveformAnnotationSequence") or []:
        text = " ".join(str(item.get("UnformattedTextValue", "") or "").split())
        if text:
            found[text] = None
    return list(found)


def parse_dicom_age(text: str | None) -> int | None:
    """DICOM's ``PatientAge`` (``052Y``; months, weeks and days are under one year) in whole years."""
    match = re.fullmatch(r"(\d{1,3})([YMWD])", (text or "").strip().upper())
    if not match:
        return None
    return int(match.group(1)) if match.group(2) == "Y" else 0


@SOURCES.register("dicom")
class DicomReader(StatementTargets, SourceReader):
    """DICOM ECG waveform files: the rhythm multiplex group (or the median beats) in mV, leads named from each
    channel's source code, the interpretation statements as the multi-label target ``diagnosis``.

    The ``diagnosis`` labels are every statement met in the files, sorted (no target when no file has one); as in
    ``muse_xml``, a record is 1 for each of its own statements and 0 for the others, and a record without any
    statement is unlabelled (NaN), not negative for every label. A label table (``--labels``) replaces it.

    Args:
        waveform: ``rhythm`` (the original recording, default) or ``median`` (a derived median-beat group).
        diagnosis: read the text items of the ``WaveformAnnotationSequence`` as the ``diagnosis`` target
            (default); false (or null) for no target.
        derive_limb_leads: compute III, aVR, aVL, aVF from I and II when the file lacks them.
        pattern: which files under ``--source`` are records (``*.dcm``, any case, by default; ``*`` for files
            without a suffix, as archives often store them).
        exclude_statements: regular expressions (matched at the start, any case) of statements that are not
            findings and stay out of ``diagnosis``; default ``NOT_FINDINGS`` (confirmation, referral and comparison
            lines, which hold names and dates); ``[]`` keeps every statement.
    """

    def __init__(
        self,
        waveform: str = "rhythm",
        diagnosis: bool | None = True,
        derive_limb_leads: bool = True,
        pattern: str = "*.dcm",
        exclude_statements: list[str] | None = None,
    ):
        if str(waveform).lower() not in ("rhythm", "median"):
            raise ValueError(f"dicom: waveform must be rhythm or median, got {waveform!r}")
        if diagnosis not in (True, False, None):
            raise ValueError(f"dicom: diagnosis must be true, false or null, got {diagnosis!r}")
        self.median = str(waveform).lower() == "median"
        self.diagnosis = bool(diagnosis)
        self.derive = bool(derive_limb_leads)
        self.pattern = pattern
        self.statements = StatementFilter(exclude_statements, "dicom")

    def find_records(self, root: Path) -> list[Path]:
        """The DICOM files under ``root`` (or ``root`` itself), sorted; other DICOM objects fail in ``read``."""
        root = Path(root)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such file or folder")
        if self.pattern == "*.dcm":
            return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")
        return sorted(p for p in root.rglob(self.pattern) if p.is_file() and not p.name.startswith("."))

    def file_statements(self, path: Path) -> list[str]:
        return interpretation_statements(self._load(path, ["WaveformAnnotationSequence"]))

    def _load(self, path: Path, tags: list[str] | None = None) -> Any:
        """The dataset of ``path`` (only ``tags`` when given); a RecordError for a missing, non-DICOM or damaged
        file."""
        import pydicom  # here, not at the top: every ecgfm command imports the readers, few read DICOM
        from pydicom.errors import InvalidDicomError

        if not path.is_file():
            raise RecordError(f"{path}: file not found")
        try:
            return pydicom.dcmread(path, specific_tags=tags)
        except InvalidDicomError as exc:
            raise RecordError(f"{path}: not a DICOM file ({exc})") from None
        except Exception as exc:  # pydicom raises many kinds on a damaged file (EOFError, struct.error...)
            raise RecordError(f"{path}: cannot read DICOM ({type(exc).__name__}: {exc})") from None

    def _group(self, ds: Any, path: Path) -> int:
        """Index of the multiplex group to read."""
        groups = list(ds.get("WaveformSequence") or [])
        if not groups:
            sop = str(ds.get("SOPClassUID", "") or "none")
            raise RecordError(f"{path}: no WaveformSequence; not a DICOM waveform (SOP class {sop})")
        for index, group in enumerate(groups):
            if _is_median(group) == self.median:
                return index
        labels = [str(g.get("MultiplexGroupLabel", "") or "(no label)") for g in groups]
        wanted = "median-beat" if self.median else "rhythm"
        raise RecordError(f"{path}: no {wanted} multiplex group (found: {', '.join(labels)})")

    def read(self, path: Path) -> Record:
        """Read one DICOM ECG as float32 mV [L, T]; the patient's id, age and sex come from the dataset, the
        interpretation statements go to the metadata as ``diagnosis``."""
        from pydicom.waveforms.numpy_handler import WAVEFORM_DTYPES, multiplex_array

        path = Path(path)
        ds = self._load(path)
        sop = str(ds.get("SOPClassUID", "") or "")
        index = self._group(ds, path)
        group = ds.WaveformSequence[index]
        fs = group.get("SamplingFrequency")
        if fs is None:
            raise RecordError(f"{path}: multiplex group {index} has no SamplingFrequency")
        fs = _number(fs, "SamplingFrequency", path)
        key = (group.get("WaveformBitsAllocated"), str(group.get("WaveformSampleInterpretation", "")))
        if key not in WAVEFORM_DTYPES:
            raise RecordError(f"{path}: waveform samples of {key[0]} bits, {key[1]!r} are not a known integer type")
        n_channels = int(group.get("NumberOfWaveformChannels") or 0)
        n_samples = int(group.get("NumberOfWaveformSamples") or 0)
        channels = list(group.get("ChannelDefinitionSequence") or [])
        if n_channels <= 0 or n_samples <= 0 or len(channels) != n_channels:
            raise RecordError(
                f"{path}: multiplex group {index} declares {n_channels} channels x {n_samples} samples "
                f"but defines {len(channels)} channels"
            )
        data = group.get("WaveformData")
        needed = n_channels * n_samples * key[0] // 8
        if data is None or len(data) < needed:
            have = 0 if data is None else len(data)
            raise RecordError(
                f"{path}: WaveformData has {have} bytes but {n_channels} x {n_samples} samples need {needed}"
            )
        raw = multiplex_array(ds, index, as_raw=True).T  # [channels, samples]
        padding = group.get("WaveformPaddingValue")
        invalid = np.frombuffer(padding[: key[0] // 8], WAVEFORM_DTYPES[key])[0] if padding else None

        leads, raw_names, units, dropped = [], [], [], []
        for i, channel in enumerate(channels):
            name = channel_name(channel)
            if not name:
                raise RecordError(f"{path}: channel {i + 1} has no source code; leads are selected by name")
            unit = _channel_unit(channel)
            sensitivity = channel.get("ChannelSensitivity")
            if not (unit and is_voltage(unit)) or sensitivity is None:
                if canonical_lead(name) is None:
                    dropped.append(f"{name} ({unit or 'no unit'})")
                    continue
                problem = f"is in {unit!r}, not a voltage" if unit else "has no sensitivity unit"
                if sensitivity is None:
                    problem = "has no ChannelSensitivity (uncalibrated)"
                raise RecordError(f"{path}: channel {i + 1} (lead {name}) {problem}; cannot convert to mV")
            sensitivity = _number(sensitivity, f"channel {i + 1} ChannelSensitivity", path)
            correction = _number(channel.get("ChannelSensitivityCorrectionFactor", 1.0), "correction factor", path)
            baseline = _number(channel.get("ChannelBaseline", 0.0), f"channel {i + 1} ChannelBaseline", path)
            if not sensitivity * correction > 0:
                raise RecordError(
                    f"{path}: channel {i + 1} (lead {name}) has sensitivity {sensitivity:g} x {correction:g}, "
                    "not a positive number; cannot convert to mV"
                )
            values = (raw[i].astype(np.float64) * sensitivity * correction + baseline) * mv_per_unit(unit, path)
            if invalid is not None:
                values[raw[i] == invalid] = np.nan
            leads.append(values.astype(np.float32))
            raw_names.append(name)
            units.append(unit)
        if not leads:
            raise RecordError(f"{path}: no channel in a voltage unit (found {', '.join(dropped)})")
        warnings: list[str] = []
        if dropped:
            warnings.append(f"signals not in a voltage ignored: {' '.join(dropped)}")
        signal, names, derived, derived_warnings = named_leads(np.stack(leads), raw_names, path, self.derive)
        warnings += derived_warnings
        patient = str(ds.get("PatientID", "") or "").strip()
        return Record(
            record_id=path.stem,
            patient_id=patient or path.stem,
            signal=signal,
            fs=fs,
            lead_names=names,
            path=path,
            metadata={
                "age": parse_dicom_age(ds.get("PatientAge")),
                "sex": parse_sex(str(ds.get("PatientSex", "") or "")),
                "diagnosis": self.statements.findings(interpretation_statements(ds), warnings)
                if self.diagnosis
                else [],
                "sop_class": ECG_SOP_CLASSES.get(sop, sop),
                "sop_instance_uid": str(ds.get("SOPInstanceUID", "") or ""),
                "multiplex_group": str(group.get("MultiplexGroupLabel", "") or index),
                "units": units,
                "derived_leads": derived,
                "warnings": warnings,
                "source": "dicom",
            },
        )
