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

from ecgfm.bench import record_formats
from ecgfm.bench.record_formats import dicom_code as code
from ecgfm.commands import main
from ecgfm.data.shards import Manifest
from ecgfm.data.sources import DicomReader, RecordError
from ecgfm.data.sources.dicom import channel_name
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

SHUFFLED = ["V3", "I", "aVL", "II", "V1", "III", "aVR", "aVF", "V2", "V4", "V5", "V6"]


@pytest.fixture(scope="module")
def source(test_data: Path):
    """A real 12-lead, 500 Hz, 10-s recording (Georgia, from the Challenge set) in mV."""
    record = SOURCES.create("challenge").read(test_data / "cinc2021" / "E07501")
    assert record.lead_names == STANDARD_LEADS and record.fs == 500
    return record


def write_dicom(
    path: Path,
    signal: np.ndarray,
    names: list[str] = SHUFFLED,
    median: bool = True,
    unit: str = "uV",
    channels: list[tuple[str, str, float]] = (),
    **options,
) -> Path:
    """A 12-Lead ECG Waveform Storage file of ``signal`` (mV, standard order) with the leads ``names`` in that order
    at ``unit``, patient PAT-7 (63, M), a rhythm group and a median-beat group; ``channels`` adds non-ECG channels
    as (meaning, unit, scale of the first lead)."""
    rows = signal[[STANDARD_LEADS.index(n) if n in STANDARD_LEADS else 0 for n in names]]
    rows = np.vstack([rows, *(rows[:1] * scale for _, _, scale in channels)])
    names = [*names, *(meaning for meaning, _, _ in channels)]
    units = {name: unit for name in names} | {meaning: ch_unit for meaning, ch_unit, _ in channels}
    median_mv = rows[:, 1000:1600] if median else None
    return record_formats.write_dicom(
        path, rows, 500.0, names, median_mv=median_mv, units=units, patient_id="PAT-7", age=63, sex="M", **options
    )


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
    import pydicom

    good = write_dicom(folder / "good.dcm", source.signal).read_bytes()
    (folder / "truncated.dcm").write_bytes(good[: len(good) // 2])
    (folder / "not_dicom.dcm").write_bytes(b"\x00" * 200)
    no_rate = pydicom.dcmread(write_dicom(folder / "no_rate.dcm", source.signal))
    del no_rate.WaveformSequence[0].SamplingFrequency
    no_rate.save_as(folder / "no_rate.dcm")
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


# --- interpretation statements: the multi-label target ``diagnosis`` -------------------------------------------------

STATEMENTS = {
    "stmt_a": ["Sinus rhythm", "Left axis deviation"],
    "stmt_b": ["Sinus rhythm", "Left ventricular hypertrophy", "Abnormal ECG"],
    "stmt_none": [],
}


def add_annotations(path: Path, statements: list[str]) -> Path:
    """A ``WaveformAnnotationSequence`` as GE and Philips write it: coded measurements (a ``ConceptNameCodeSequence``
    with a ``NumericValue``), then one ``UnformattedTextValue`` item per statement (and a blank one, no statement)."""
    import pydicom

    ds = pydicom.dcmread(path)
    items = []
    for meaning, value, unit in [("Heart rate", "72", "/min"), ("QTc interval", "412", "ms")]:
        item = Dataset()
        item.ConceptNameCodeSequence = Sequence([code(meaning.upper().replace(" ", "_"), "99LOCAL", meaning)])
        item.NumericValue = value
        item.MeasurementUnitsCodeSequence = Sequence([code(unit, "UCUM", unit)])
        item.AnnotationGroupNumber = 1
        items.append(item)
    for text in [*statements, "   "] if statements else []:
        item = Dataset()
        item.UnformattedTextValue = f" {text} "
        item.AnnotationGroupNumber = 2
        items.append(item)
    ds.WaveformAnnotationSequence = Sequence(items)
    ds.save_as(path)
    return path


def test_interpretation_statements_become_the_diagnosis_target(source, tmp_path: Path) -> None:
    import h5py

    folder = tmp_path / "in"
    folder.mkdir()
    for name, statements in STATEMENTS.items():
        add_annotations(write_dicom(folder / f"{name}.dcm", source.signal, median=False), statements)
    record = DicomReader().read(folder / "stmt_a.dcm")
    assert record.metadata["diagnosis"] == ["Sinus rhythm", "Left axis deviation"]  # no measurement, no blank
    out = tmp_path / "out"
    assert main(["shard", "--source", str(folder), "--out", str(out), "--reader", "dicom"]) == 0
    manifest = Manifest.load(out)
    names = ["Abnormal ECG", "Left axis deviation", "Left ventricular hypertrophy", "Sinus rhythm"]
    assert manifest.targets["diagnosis"].kind == "multilabel" and manifest.targets["diagnosis"].names == names
    with h5py.File(out / manifest.shards[0]["path"]) as f:
        rows = dict(zip(f["record_id"].asstr()[:], f["targets/diagnosis"][:].tolist(), strict=True))
    none = np.array(rows.pop("stmt_none"))
    assert rows == {
        "stmt_a": [0.0, 1.0, 0.0, 1.0],
        "stmt_b": [1.0, 0.0, 1.0, 1.0],
    }
    assert np.isnan(none).all()  # no statement: unlabelled (NaN, masked), not negative for every label
    off = tmp_path / "off"
    assert main(["shard", "--source", str(folder), "--out", str(off), "--reader", "dicom",
                 "--reader_options", "{diagnosis: false}"]) == 0  # fmt: skip
    assert Manifest.load(off).targets == {}
