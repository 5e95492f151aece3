"""Writers of one ECG recording in each on-disk format that ecgfm reads, as the devices and exports store it.

``ecgfm bench readers`` times every reader on the same recordings written by these functions, and the readers'
tests (tests/test_source_*.py) write their well-formed files with them too: so the benchmark times the readers on
exactly the files the tests show they read correctly, and one writer per format is kept, not two that drift apart.
(A test's deliberately broken files are made there, by editing what these write.)

Every writer is ``write_<format>(path, signal_mv, fs, lead_names, ...)``: ``signal_mv`` is float mV ``[L, T]``, one
row per name in ``lead_names``, written in that order; a name that is no standard lead is written as a channel of
that name (a respiration, a V4R), for the readers' handling of other signals. Keyword options give a format's own
calibration, units and demographics; the defaults are what its usual exports hold.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm.leads import STANDARD_LEADS

#: GE MUSE's usual resolution: 4.88 µV per bit.
MUSE_UV_PER_BIT = 4.88
#: HL7 aECG's namespace and the XML Schema instance namespace of its ``xsi:type`` attributes.
HL7_V3 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
#: DICOM's 12-Lead ECG Waveform Storage SOP class.
DICOM_TWELVE_LEAD = "1.2.840.10008.5.1.4.1.1.9.1.1"
#: The channel source of each lead as GE and Philips write it in DICOM (SCP-ECG code value, meaning).
DICOM_LEAD_SOURCES = {
    "I": ("5.6.3-9-1", "Lead I (Einthoven)"),
    "II": ("5.6.3-9-2", "Lead II"),
    "III": ("5.6.3-9-61", "Lead III"),
    "aVR": ("5.6.3-9-62", "Lead aVR"),
    "aVL": ("5.6.3-9-63", "Lead aVL"),
    "aVF": ("5.6.3-9-64", "Lead aVF"),
    **{f"V{i}": (f"5.6.3-9-{i + 2}", f"Lead V{i}") for i in range(1, 7)},
}
_EDF_TYPES = ("edf", "edf+", "bdf", "bdf+")
#: Physical units per mV in the writers' unit spellings; an unknown unit (mmHg, Ohm) writes the values unscaled.
_PER_MV = {"mV": 1.0, "uV": 1000.0, "V": 1e-3}
_MUSE_PER_MV = {"MICROVOLTS": 1000.0, "MILLIVOLTS": 1.0, "VOLTS": 1e-3}


def _rows(signal_mv: np.ndarray, lead_names: Sequence[str]) -> np.ndarray:
    """``signal_mv`` as float64 ``[L, T]``, checked against the names."""
    signal = np.asarray(signal_mv, dtype=np.float64)
    if signal.ndim != 2 or signal.shape[0] != len(lead_names):
        raise ValueError(f"signal of shape {signal.shape} does not match {len(lead_names)} lead names")
    return signal


def _unit_of(units: str | Mapping[str, str], name: str, default: str) -> str:
    return units if isinstance(units, str) else units.get(name, default)


def write_wfdb(
    path: str | Path, signal_mv: np.ndarray, fs: float, lead_names: Sequence[str], *, adc_gain: float = 1000.0
) -> Path:
    """A WFDB record (``path`` without suffix: ``<path>.hea`` + ``<path>.dat``), format 16 at ``adc_gain`` per mV
    (1 µV per unit by default), as PhysioNet's 500-Hz databases store them; returns the record path."""
    import wfdb

    path = Path(path)
    digital = np.clip(np.rint(_rows(signal_mv, lead_names) * adc_gain), -32767, 32767).astype(np.int16)
    wfdb.wrsamp(
        path.name,
        fs=fs,
        units=["mV"] * len(lead_names),
        sig_name=list(lead_names),
        d_signal=digital.T,
        fmt=["16"] * len(lead_names),
        adc_gain=[adc_gain] * len(lead_names),
        baseline=[0] * len(lead_names),
        write_dir=str(path.parent),
    )
    return path


def write_challenge(
    path: str | Path,
    signal_mv: np.ndarray,
    fs: float,
    lead_names: Sequence[str],
    *,
    dx_codes: Sequence[str] = (),
    age: int | None = None,
    sex: str | None = None,
    adc_gain: float = 1000.0,
) -> Path:
    """A PhysioNet/CinC Challenge 2020/2021 record: ``<path>.mat`` (MAT v4, int16 ``val`` ``[L, T]``) and
    ``<path>.hea`` with the Challenge's record line, checksums and ``# Age/Sex/Dx`` comments; returns the record
    path (``path`` without suffix)."""
    import scipy.io

    path = Path(path)
    val = np.clip(np.rint(_rows(signal_mv, lead_names) * adc_gain), -32767, 32767).astype(np.int16)
    scipy.io.savemat(str(path.parent / f"{path.name}.mat"), {"val": val}, format="4")
    lines = [f"{path.name} {len(lead_names)} {fs:g} {val.shape[1]}"]
    for row, name in zip(val, lead_names, strict=True):
        checksum = (int(row.astype(np.int64).sum()) + 32768) % 65536 - 32768
        lines.append(f"{path.name}.mat 16x1+24 {adc_gain:.1f}(0)/mv 16 0 {int(row[0])} {checksum} 0 {name}")
    sex_text = {"M": "Male", "F": "Female"}.get(sex or "", "Unknown")
    lines += [f"# Age: {age if age is not None else 'Unknown'}", f"# Sex: {sex_text}"]
    lines += [f"# Dx: {','.join(dx_codes)}", "# Rx: Unknown", "# Hx: Unknown", "# Sx: Unknown"]
    (path.parent / f"{path.name}.hea").write_text("\n".join(lines) + "\n")
    return path


def write_cpsc2018(
    path: str | Path,
    signal_mv: np.ndarray,
    fs: float,
    lead_names: Sequence[str],
    *,
    sex: str = "Male",
    age: float = 74,
) -> Path:
    """A CPSC 2018 file: a struct ``ECG`` with ``data`` (12 x T float mV, rows in the standard lead order: the 12
    leads in any order are put in it), ``sex`` and ``age``. The file holds no rate: ``fs`` is the reader's option
    (500 Hz in the challenge)."""
    import scipy.io

    signal = _rows(signal_mv, lead_names)
    if sorted(lead_names) != sorted(STANDARD_LEADS):
        raise ValueError(f"CPSC 2018 files hold the 12 standard leads, got {list(lead_names)}")
    data = signal[[list(lead_names).index(lead) for lead in STANDARD_LEADS]]
    scipy.io.savemat(str(path), {"ECG": {"sex": sex, "age": age, "data": data}})
    return Path(path)


def _edf_bound(value: float, up: bool) -> float | int:
    """``value`` rounded outward (down for a minimum, up for a maximum) to what EDF's 8-character header field
    holds, so the written range still spans every sample and pyedflib need not truncate it."""
    integer = len(str(int(abs(value)))) + (value < 0)
    decimals = max(0, 8 - integer - 1)
    bound = math.ceil(value * 10**decimals) if up else math.floor(value * 10**decimals)
    return round(bound / 10**decimals, decimals) if decimals else bound


def _edf_header(label: str, unit: str, rate: float, values: np.ndarray, bits: int) -> dict[str, Any]:
    """A pyedflib signal header spanning ``values`` with the file's whole digital range."""
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:
        low, high = low - 1, high + 1
    return {
        "label": label,
        "dimension": unit,
        "sample_frequency": rate,
        "physical_min": _edf_bound(low, up=False),
        "physical_max": _edf_bound(high, up=True),
        "digital_min": -(2 ** (bits - 1)),
        "digital_max": 2 ** (bits - 1) - 1,
        "transducer": "",
        "prefilter": "",
    }


def write_edf(
    path: str | Path,
    signal_mv: np.ndarray,
    fs: float,
    lead_names: Sequence[str],
    *,
    file_type: str = "edf+",
    labels: Mapping[str, str] | None = None,
    units: str | Mapping[str, str] = "uV",
    other_channels: Sequence[tuple[str, str, float, np.ndarray]] = (),
    patient_code: str | None = None,
    sex: str | None = None,
    birthdate: date | None = None,
    start: datetime | None = None,
    annotations: Sequence[tuple[float, str]] = (),
) -> Path:
    """An EDF, EDF+, BDF or BDF+ file (``file_type``), 16 or 24 bits over each channel's range, as Holter and
    wearable exports write them.

    Args:
        labels: lead -> channel label (default ``ECG <lead>``).
        units: the physical unit of every lead (``uV``, ``mV``, ``V``), or lead -> unit; an unknown unit (mmHg)
            writes the values as they are.
        other_channels: further channels, each ``(label, unit, rate, values)``: a respiration, an SpO2.
        patient_code, sex, birthdate, start, annotations: EDF+/BDF+ patient fields, recording start and
            ``(onset s, text)`` annotations (a plain EDF/BDF holds none of them).
    """
    import pyedflib

    if file_type not in _EDF_TYPES:
        raise ValueError(f"file_type must be one of {', '.join(_EDF_TYPES)}, got {file_type!r}")
    kinds = {
        "edf": pyedflib.FILETYPE_EDF,
        "edf+": pyedflib.FILETYPE_EDFPLUS,
        "bdf": pyedflib.FILETYPE_BDF,
        "bdf+": pyedflib.FILETYPE_BDFPLUS,
    }
    bits = 24 if file_type.startswith("bdf") else 16
    signals, headers = [], []
    for name, row in zip(lead_names, _rows(signal_mv, lead_names), strict=True):
        unit = _unit_of(units, name, "uV")
        values = row * _PER_MV.get(unit, 1.0)
        signals.append(values)
        headers.append(_edf_header((labels or {}).get(name, f"ECG {name}"), unit, fs, values, bits))
    for label, unit, rate, values in other_channels:
        signals.append(np.asarray(values, dtype=np.float64))
        headers.append(_edf_header(label, unit, rate, signals[-1], bits))
    with pyedflib.EdfWriter(str(path), len(signals), file_type=kinds[file_type]) as writer:
        writer.setSignalHeaders(headers)
        if file_type.endswith("+"):
            if patient_code is not None:
                writer.setPatientCode(patient_code)
            if sex in ("M", "F"):
                writer.setSex(1 if sex == "M" else 0)
            if birthdate is not None:
                writer.setBirthdate(birthdate)
            if start is not None:
                writer.setStartdatetime(start)
            for onset, text in annotations:
                writer.writeAnnotation(onset, -1, text)
        writer.writeSamples(signals)
    return Path(path)


def _muse_element(parent: Any, tag: str, text: object = None) -> Any:
    from lxml import etree

    element = etree.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def _muse_waveform(
    root: Any, kind: str, signal: np.ndarray, fs: float, names: Sequence[str], per_bit: float, units: str
) -> None:
    """One ``<Waveform>``: a ``<LeadData>`` per lead, its int16 samples base64 in 76-character lines."""
    sub = _muse_element
    wave = sub(root, "Waveform")
    sub(wave, "WaveformType", kind)
    sub(wave, "WaveformStartTime", 0)
    sub(wave, "NumberofLeads", len(names))
    sub(wave, "SampleType", "CONTINUOUS_SAMPLES")
    sub(wave, "SampleBase", f"{fs:g}")
    sub(wave, "SampleExponent", 0)
    for name, lead in zip(names, signal, strict=True):
        digital = np.rint(lead * _MUSE_PER_MV.get(units, 1000.0) / per_bit).astype("<i2")
        data = sub(wave, "LeadData")
        sub(data, "LeadByteCountTotal", 2 * len(digital))
        sub(data, "LeadSampleCountTotal", len(digital))
        sub(data, "LeadAmplitudeUnitsPerBit", per_bit)
        sub(data, "LeadAmplitudeUnits", units)
        sub(data, "LeadID", name)
        sub(data, "LeadSampleSize", 2)
        encoded = base64.b64encode(digital.tobytes()).decode()
        sub(data, "WaveFormData", "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)))


def write_muse(
    path: str | Path,
    signal_mv: np.ndarray,
    fs: float,
    lead_names: Sequence[str],
    *,
    median_mv: np.ndarray | None = None,
    amplitude_per_bit: float = MUSE_UV_PER_BIT,
    amplitude_units: str = "MICROVOLTS",
    patient_id: str | None = None,
    age: int | None = None,
    sex: str | None = None,
    statements: Sequence[str] = (),
    acquisition: tuple[str, str] = ("11-22-2019", "09:10:00"),
) -> Path:
    """A GE MUSE XML export (``<RestingECG>``): demographics, the diagnosis statements, the median beats
    (``median_mv``, same leads, if given) and the rhythm, each lead int16 base64 at ``amplitude_per_bit``
    ``amplitude_units`` per bit. MUSE stores 8 leads (I, II, V1-V6): pass those for a file like its exports."""
    from lxml import etree

    signal = _rows(signal_mv, lead_names)
    sub = _muse_element
    root = etree.Element("RestingECG")
    sub(sub(root, "MuseInfo"), "MuseVersion", "8.0.2.10132")
    demographics = sub(root, "PatientDemographics")
    if patient_id is not None:
        sub(demographics, "PatientID", patient_id)
    if age is not None:
        sub(demographics, "PatientAge", age)
        sub(demographics, "AgeUnits", "YEARS")
    if sex in ("M", "F"):
        sub(demographics, "Gender", {"M": "MALE", "F": "FEMALE"}[sex])
    test = sub(root, "TestDemographics")
    sub(test, "AcquisitionDate", acquisition[0])
    sub(test, "AcquisitionTime", acquisition[1])
    diagnosis = sub(root, "Diagnosis")
    sub(diagnosis, "Modality", "RESTING")
    for text in statements:
        statement = sub(diagnosis, "DiagnosisStatement")
        sub(statement, "StmtFlag", "ENDSLINE")
        sub(statement, "StmtText", text)
    if median_mv is not None:
        median = _rows(median_mv, lead_names)
        _muse_waveform(root, "Median", median, fs, lead_names, amplitude_per_bit, amplitude_units)
    _muse_waveform(root, "Rhythm", signal, fs, lead_names, amplitude_per_bit, amplitude_units)
    header = b'<?xml version="1.0" encoding="ISO-8859-1"?>\n<!DOCTYPE RestingECG SYSTEM "restecg.dtd">\n'
    Path(path).write_bytes(header + etree.tostring(root, pretty_print=True))
    return Path(path)


def hl7_element(parent: Any, tag: str, **attrs: object) -> Any:
    """A child ``tag`` in the HL7 v3 namespace with ``attrs`` (as text)."""
    from lxml import etree

    return etree.SubElement(parent, f"{{{HL7_V3}}}{tag}", {k: str(v) for k, v in attrs.items()})


def _aecg_sequence(sequence_set: Any, code: str, xsi_type: str) -> Any:
    el = hl7_element
    sequence = el(el(sequence_set, "component"), "sequence")
    el(sequence, "code", code=code, codeSystem="2.16.840.1.113883.6.24", codeSystemName="MDC")
    value = el(sequence, "value")
    value.set(f"{{{XSI}}}type", xsi_type)
    return value


def _aecg_series(
    parent: Any,
    code: str,
    signal: np.ndarray,
    fs: float,
    names: Sequence[str],
    *,
    tag: str,
    time_code: str,
    increment_unit: str,
    scale: tuple[float, str],
    origin: tuple[float, str],
    units: Mapping[str, str],
) -> Any:
    """A series of ``signal`` (mV ``[L, T]``): a time sequence, then digits = (value - origin) / scale per lead,
    named by MDC code (``MDC_ECG_LEAD_<NAME>`` for a standard lead, the name itself otherwise)."""
    el = hl7_element
    series = el(parent, tag)
    el(series, "code", code=code, codeSystem="2.16.840.1.113883.5.4")
    sequence_set = el(el(series, "component"), "sequenceSet")
    time = _aecg_sequence(sequence_set, time_code, "GLIST_TS" if time_code == "TIME_ABSOLUTE" else "GLIST_PQ")
    el(time, "head", value="20021122091000.000" if time_code == "TIME_ABSOLUTE" else "0", unit="s")
    seconds = {"s": 1.0, "ms": 1e-3, "us": 1e-6}[increment_unit]
    el(time, "increment", value=f"{1.0 / fs / seconds:g}", unit=increment_unit)
    to_unit = {"uV": 1000.0, "mV": 1.0}
    for name, lead in zip(names, signal, strict=True):
        mdc = f"MDC_ECG_LEAD_{name.upper()}" if name in STANDARD_LEADS else name
        unit = units.get(name, scale[1])
        value = _aecg_sequence(sequence_set, mdc, "SLIST_PQ")
        el(value, "origin", value=origin[0], unit=unit if unit not in to_unit else origin[1])
        el(value, "scale", value=scale[0], unit=unit)
        factor = to_unit.get(scale[1], 1000.0)
        digits = np.rint((lead * factor - origin[0] * factor / to_unit.get(origin[1], 1000.0)) / scale[0])
        el(value, "digits").text = " ".join(str(int(d)) for d in digits)
    return series


def write_aecg(
    path: str | Path,
    signal_mv: np.ndarray,
    fs: float,
    lead_names: Sequence[str],
    *,
    median_mv: np.ndarray | None = None,
    scale: tuple[float, str] = (5.0, "uV"),
    origin: tuple[float, str] = (0.0, "uV"),
    units: Mapping[str, str] | None = None,
    time_code: str = "TIME_ABSOLUTE",
    increment_unit: str = "s",
    subject_id: str | None = None,
    sex: str | None = None,
) -> Path:
    """An HL7 aECG document (``<AnnotatedECG>``): the trial subject, a ``RHYTHM`` series and, in its derivation,
    the ``REPRESENTATIVE_BEAT`` series of ``median_mv`` (same leads) if given. Each lead is digits at ``scale``
    above ``origin``, in its unit (``units``: name -> unit, e.g. ``mm[Hg]`` for a pressure; default the scale's);
    the sampling interval is the time sequence's ``increment`` in ``increment_unit`` (s, ms, us)."""
    from lxml import etree

    signal = _rows(signal_mv, lead_names)
    el = hl7_element
    root = etree.Element(f"{{{HL7_V3}}}AnnotatedECG", nsmap={None: HL7_V3, "xsi": XSI})
    el(root, "id", root="728989ec-b8ba-4d2a-9c9c-111111111111")
    el(root, "code", code="93000", codeSystem="2.16.840.1.113883.6.12")
    assignment = el(el(el(el(root, "componentOf"), "timepointEvent"), "componentOf"), "subjectAssignment")
    subject = el(el(assignment, "subject"), "trialSubject")
    el(subject, "id", root="2.16.840.1.113883.3.1", **({"extension": subject_id} if subject_id else {}))
    person = el(subject, "subjectDemographicPerson")
    if sex is not None:
        el(person, "administrativeGenderCode", code=sex, codeSystem="2.16.840.1.113883.5.1")
    options = dict(time_code=time_code, increment_unit=increment_unit, scale=scale, origin=origin, units=units or {})
    series = _aecg_series(el(root, "component"), "RHYTHM", signal, fs, lead_names, tag="series", **options)
    if median_mv is not None:
        median = _rows(median_mv, lead_names)
        derivation = el(series, "derivation")
        _aecg_series(derivation, "REPRESENTATIVE_BEAT", median, fs, lead_names, tag="derivedSeries", **options)
    Path(path).write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))
    return Path(path)


def dicom_code(value: str, scheme: str, meaning: str) -> Any:
    """A DICOM code item (code value, coding scheme designator, code meaning)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _dicom_group(
    signal: np.ndarray,
    fs: float,
    names: Sequence[str],
    label: str,
    *,
    sensitivity: float,
    units: str | Mapping[str, str],
    correction: float,
    baseline: float,
) -> Any:
    """A multiplex group: int16 samples = (value in the channel's unit - baseline) / (sensitivity * correction),
    interleaved (C1S1, C2S1, ..., CnS1, C1S2, ...)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    item = Dataset()
    item.MultiplexGroupTimeOffset = "0.0"
    item.WaveformOriginality = "ORIGINAL" if label == "RHYTHM" else "DERIVED"
    item.NumberOfWaveformChannels = len(names)
    item.NumberOfWaveformSamples = signal.shape[1]
    item.SamplingFrequency = fs
    item.MultiplexGroupLabel = label
    definitions, columns = [], []
    for name, lead in zip(names, signal, strict=True):
        unit = _unit_of(units, name, "uV")
        channel = Dataset()
        source = DICOM_LEAD_SOURCES.get(name)
        channel.ChannelSourceSequence = DicomSequence(
            [dicom_code(source[0], "SCPECG", source[1]) if source else dicom_code(name.upper(), "99LOCAL", name)]
        )
        channel.ChannelSensitivity = sensitivity
        channel.ChannelSensitivityUnitsSequence = DicomSequence([dicom_code(unit, "UCUM", unit)])
        channel.ChannelSensitivityCorrectionFactor = correction
        channel.ChannelBaseline = baseline
        channel.ChannelSampleSkew = "0"
        channel.WaveformBitsStored = 16
        channel.FilterLowFrequency = "0.05"
        channel.FilterHighFrequency = "150"
        definitions.append(channel)
        columns.append(np.rint((lead * _PER_MV.get(unit, 1.0) - baseline) / (sensitivity * correction)))
    item.ChannelDefinitionSequence = DicomSequence(definitions)
    item.WaveformBitsAllocated = 16
    item.WaveformSampleInterpretation = "SS"
    item.WaveformData = np.stack(columns, axis=1).astype("<i2").tobytes()
    return item


def write_dicom(
    path: str | Path,
    signal_mv: np.ndarray,
    fs: float,
    lead_names: Sequence[str],
    *,
    median_mv: np.ndarray | None = None,
    sensitivity: float = 2.5,
    units: str | Mapping[str, str] = "uV",
    correction: float = 0.976,
    baseline: float = 0.0,
    patient_id: str | None = None,
    age: int | None = None,
    sex: str | None = None,
) -> Path:
    """A DICOM 12-Lead ECG Waveform Storage file: the patient module, a ``RHYTHM`` multiplex group and, if
    ``median_mv`` (same leads) is given, a ``MEDIAN BEAT`` group, both int16 at ``sensitivity`` x ``correction``
    per bit in each channel's unit (``units``: one for all, or name -> unit) above ``baseline``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    signal = _rows(signal_mv, lead_names)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DICOM_TWELVE_LEAD
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DICOM_TWELVE_LEAD, meta.MediaStorageSOPInstanceUID
    if patient_id is not None:
        ds.PatientID = patient_id
    if age is not None:
        ds.PatientAge = f"{int(age):03d}Y"
    if sex in ("M", "F"):
        ds.PatientSex = sex
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer, ds.ContentDate = "ECG", "ecgfm", "20240101"
    calibration = dict(sensitivity=sensitivity, units=units, correction=correction, baseline=baseline)
    groups = [_dicom_group(signal, fs, lead_names, "RHYTHM", **calibration)]
    if median_mv is not None:
        groups.append(_dicom_group(_rows(median_mv, lead_names), fs, lead_names, "MEDIAN BEAT", **calibration))
    ds.WaveformSequence = DicomSequence(groups)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
