"""The DICOM ECG reader on real recordings written by pydicom as 12-Lead ECG Waveform Storage files (int16 at a
sensitivity in µV or mV with a correction factor and a baseline), median beats, non-ECG channels, broken files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ecgfm.commands import main
from ecgfm.data.shards import Manifest
from ecgfm.data.sources import DicomReader, RecordError
from ecgfm.data.sources.dicom import channel_name
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

TWELVE_LEAD = "1.2.840.10008.5.1.4.1.1.9.1.1"
#: The channel source of each lead as GE and Philips write it (SCP-ECG code values, meanings with the system).
MEANINGS = {
    "I": ("5.6.3-9-1", "Lead I (Einthoven)"),
    "II": ("5.6.3-9-2", "Lead II"),
    "III": ("5.6.3-9-61", "Lead III"),
    "aVR": ("5.6.3-9-62", "Lead aVR"),
    "aVL": ("5.6.3-9-63", "Lead aVL"),
    "aVF": ("5.6.3-9-64", "Lead aVF"),
    **{f"V{i}": (f"5.6.3-9-{i + 2}", f"Lead V{i}") for i in range(1, 7)},
}
SHUFFLED = ["V3", "I", "aVL", "II", "V1", "III", "aVR", "aVF", "V2", "V4", "V5", "V6"]


@pytest.fixture(scope="module")
def source(test_data: Path):
    """A real 12-lead, 500 Hz, 10-s recording (Georgia, from the Challenge set) in mV."""
    record = SOURCES.create("challenge").read(test_data / "cinc2021" / "E07501")
    assert record.lead_names == STANDARD_LEADS and record.fs == 500
    return record


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def group(
    signal: np.ndarray,
    names: list[str],
    label: str,
    *,
    fs: float | None = 500.0,
    sensitivity: float = 2.5,
    unit: str = "uV",
    correction: float = 0.976,
    baseline: float = 0.0,
    channels: list[tuple[str, str, float]] = (),
) -> Dataset:
    """A multiplex group: int16 samples = (value / unit - baseline) / (sensitivity * correction), interleaved;
    ``channels`` adds non-ECG channels as (meaning, unit, scale of lead I)."""
    item = Dataset()
    item.MultiplexGroupTimeOffset = "0.0"
    item.WaveformOriginality = "ORIGINAL" if label == "RHYTHM" else "DERIVED"
    item.NumberOfWaveformChannels = len(names) + len(channels)
    item.NumberOfWaveformSamples = signal.shape[1]
    if fs is not None:
        item.SamplingFrequency = fs
    item.MultiplexGroupLabel = label
    per_unit = {"uV": 1000.0, "mV": 1.0}
    definitions, columns = [], []
    for name, lead in [*zip(names, signal, strict=True), *((c[0], signal[0] * c[2]) for c in channels)]:
        ch_unit = dict((c[0], c[1]) for c in channels).get(name, unit)
        channel = Dataset()
        channel.ChannelSourceSequence = Sequence(
            [
                code(MEANINGS[name][0], "SCPECG", MEANINGS[name][1])
                if name in MEANINGS
                else code(name.upper(), "99LOCAL", name)
            ]
        )
        channel.ChannelSensitivity = sensitivity
        channel.ChannelSensitivityUnitsSequence = Sequence([code(ch_unit, "UCUM", ch_unit)])
        channel.ChannelSensitivityCorrectionFactor = correction
        channel.ChannelBaseline = baseline
        channel.ChannelSampleSkew = "0"
        channel.WaveformBitsStored = 16
        channel.FilterLowFrequency = "0.05"
        channel.FilterHighFrequency = "150"
        definitions.append(channel)
        columns.append(np.rint((lead * per_unit.get(ch_unit, 1.0) - baseline) / (sensitivity * correction)))
    item.ChannelDefinitionSequence = Sequence(definitions)
    item.WaveformBitsAllocated = 16
    item.WaveformSampleInterpretation = "SS"
    item.WaveformData = np.stack(columns, axis=1).astype("<i2").tobytes()  # C1S1, C2S1, ..., CnS1, C1S2, ...
    return item


def write_dicom(path: Path, signal: np.ndarray, names: list[str] = SHUFFLED, median: bool = True, **options) -> Path:
    """A 12-Lead ECG Waveform Storage file with patient module, a rhythm group and a median-beat group."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = TWELVE_LEAD
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = TWELVE_LEAD, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientAge, ds.PatientSex = "PAT-7", "Test^Patient", "063Y", "M"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer, ds.ContentDate = "ECG", "ecgfm tests", "20240101"
    rows = [STANDARD_LEADS.index(n) if n in STANDARD_LEADS else 0 for n in names]
    groups = [group(signal[rows], names, "RHYTHM", **options)]
    if median:
        groups.append(group(signal[rows, 1000:1600], names, "MEDIAN BEAT"))
    ds.WaveformSequence = Sequence(groups)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_leads_in_standard_order_scaled_by_sensitivity_and_correction(source, tmp_path: Path) -> None:
    record = DicomReader().read(write_dicom(tmp_path / "ecg.dcm", source.signal))
    assert record.lead_names == STANDARD_LEADS and record.fs == 500.0
    assert record.signal.shape == (12, 5000) and record.signal.dtype == np.float32
    step = 2.5 * 0.976 / 1000  # mV per bit
    np.testing.assert_allclose(record.signal, source.signal, atol=step / 2 + 1e-6)
    assert record.patient_id == "PAT-7" and record.record_id == "ecg"
    assert record.metadata["age"] == 63 and record.metadata["sex"] == "M"
    assert record.metadata["sop_class"] == "12-Lead ECG" and record.metadata["multiplex_group"] == "RHYTHM"


def test_millivolt_units_a_baseline_eight_leads_and_median_beats(source, tmp_path: Path) -> None:
    eight = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    path = write_dicom(tmp_path / "mv.dcm", source.signal, names=eight, sensitivity=0.005, unit="mV", baseline=0.1)
    record = DicomReader().read(path)
    assert record.lead_names == STANDARD_LEADS and record.metadata["units"] == ["mV"] * 8
    lead = dict(zip(record.lead_names, record.signal, strict=True))
    for name in eight:
        np.testing.assert_allclose(lead[name], source.signal[STANDARD_LEADS.index(name)], atol=0.0025 + 1e-6)
    np.testing.assert_allclose(lead["III"], lead["II"] - lead["I"], atol=1e-6)
    np.testing.assert_allclose(lead["aVR"], -(lead["I"] + lead["II"]) / 2, atol=1e-6)
    np.testing.assert_allclose(lead["aVL"], lead["I"] - lead["II"] / 2, atol=1e-6)
    np.testing.assert_allclose(lead["aVF"], lead["II"] - lead["I"] / 2, atol=1e-6)
    assert record.metadata["warnings"] == ["leads III aVR aVL aVF derived from I and II (not stored in the file)"]
    median = DicomReader(waveform="median").read(path)
    assert median.signal.shape == (12, 600) and median.metadata["multiplex_group"] == "MEDIAN BEAT"
    np.testing.assert_allclose(median.signal[0], source.signal[0, 1000:1600], atol=0.0125 + 1e-6)


def test_pydicom_waveform_array_agrees_in_the_channel_units(source, tmp_path: Path) -> None:
    """pydicom's own scaling (as_raw=False) gives the same values, in µV: the reader's only extra is the unit."""
    import pydicom

    ds = pydicom.dcmread(write_dicom(tmp_path / "ecg.dcm", source.signal))
    record = DicomReader().read(tmp_path / "ecg.dcm")
    theirs = ds.waveform_array(0).T / 1000.0  # [channels, samples] in mV, file order
    ours = record.signal[[STANDARD_LEADS.index(n) for n in SHUFFLED]]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_channels_named_by_meaning_or_by_scp_ecg_and_mdc_code() -> None:
    def channel(value: str, scheme: str, meaning: str) -> Dataset:
        item = Dataset()
        item.ChannelSourceSequence = Sequence([code(value, scheme, meaning)])
        return item

    assert channel_name(channel("5.6.3-9-1", "SCPECG", "Lead I (Einthoven)")) == "I"
    assert channel_name(channel("5.6.3-9-62", "SCPECG", "aVR, augmented voltage, right")) == "aVR"
    assert channel_name(channel("2:64", "MDC", "MDC_ECG_LEAD_AVF")) == "aVF"
    assert channel_name(channel("5.6.3-9-65", "SCPECG", "Lead -aVR")) == "Lead -aVR"  # inverted: not aVR


def test_padding_samples_are_nan_and_an_uncalibrated_lead_is_refused(source, tmp_path: Path) -> None:
    import pydicom

    path = write_dicom(tmp_path / "pad.dcm", source.signal, median=False)
    ds = pydicom.dcmread(path)
    group = ds.WaveformSequence[0]
    raw = np.frombuffer(group.WaveformData, "<i2").reshape(5000, 12).copy()
    raw[100:110, 1] = -32768  # channel 2 is lead I (SHUFFLED)
    group.WaveformData = raw.tobytes()
    group.add_new("WaveformPaddingValue", "OW", np.array([-32768], "<i2").tobytes())
    ds.save_as(path)
    lead_i = DicomReader().read(path).signal[0]
    assert np.isnan(lead_i[100:110]).all() and np.isfinite(lead_i[:100]).all() and np.isfinite(lead_i[110:]).all()
    del group.ChannelDefinitionSequence[3].ChannelSensitivity  # lead II
    ds.save_as(path)
    with pytest.raises(RecordError, match=r"pad.dcm: channel 4 \(lead II\) has no ChannelSensitivity \(uncalibrated\)"):
        DicomReader().read(path)


def malformed(source, folder: Path) -> dict[str, str]:
    """Broken DICOM files written into ``folder``: file name -> the reason the reader must give."""
    good = write_dicom(folder / "good.dcm", source.signal).read_bytes()
    (folder / "truncated.dcm").write_bytes(good[: len(good) // 2])
    (folder / "not_dicom.dcm").write_bytes(b"\x00" * 200)
    write_dicom(folder / "no_rate.dcm", source.signal, fs=None)
    write_dicom(folder / "mmhg_lead.dcm", source.signal, unit="mm[Hg]")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture: an image, no waveform
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = "PAT-8"
    ds.save_as(folder / "no_waveform.dcm", enforce_file_format=True)
    return {
        "truncated.dcm": "WaveformData has",
        "not_dicom.dcm": "not a DICOM file",
        "no_rate.dcm": "multiplex group 0 has no SamplingFrequency",
        "mmhg_lead.dcm": "(lead V3) is in 'mm[Hg]', not a voltage; cannot convert to mV",
        "no_waveform.dcm": "no WaveformSequence; not a DICOM waveform (SOP class 1.2.840.10008.5.1.4.1.1.7)",
    }


def test_malformed_files_fail_with_a_reason_naming_the_file(source, tmp_path: Path) -> None:
    for name, reason in malformed(source, tmp_path).items():
        with pytest.raises(RecordError) as err:
            DicomReader().read(tmp_path / name)
        message = str(err.value)
        assert message.startswith(str(tmp_path / name)) and reason in message, message
    only_rhythm = write_dicom(tmp_path / "rhythm.dcm", source.signal, median=False)
    with pytest.raises(RecordError, match=r"rhythm.dcm: no median-beat multiplex group \(found: RHYTHM\)"):
        DicomReader(waveform="median").read(only_rhythm)


def test_shard_command_lists_bad_files_unknown_leads_and_units(source, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    reasons = malformed(source, folder)
    channels = [("Respiration", "Ohm", 1.0), ("Lead V4R", "uV", 1.0)]
    write_dicom(folder / "extra.dcm", source.signal, channels=channels)
    out = tmp_path / "out"
    assert main(["shard", "--source", str(folder), "--out", str(out), "--reader", "dicom"]) == 0
    with open(out / "skipped.csv", newline="") as f:
        skipped = {Path(row["record"]).name: row["reason"] for row in csv.DictReader(f)}
    assert set(skipped) == set(reasons)
    for name, reason in reasons.items():
        assert str(folder / name) in skipped[name] and reason in skipped[name]
    with open(out / "warnings.csv", newline="") as f:
        warnings = [(Path(row["record"]).name, row["warning"]) for row in csv.DictReader(f)]
    assert ("extra.dcm", "signals not in a voltage ignored: Respiration (Ohm)") in warnings
    assert ("extra.dcm", "non-standard signals ignored: Lead V4R") in warnings
    assert Manifest.load(out).n_segments == 2
