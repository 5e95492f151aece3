"""The ``edf`` reader on EDF, EDF+ and BDF+ files written here by pyedflib from real recordings (Challenge 2021 record
HR06000 of PTB-XL in tests/data): channel labels, lead order, units, rates, metadata and malformed files."""

from __future__ import annotations

import csv
from datetime import date, datetime
from pathlib import Path

import h5py
import numpy as np
import pytest

from ecgfm.bench import record_formats
from ecgfm.data.convert import convert
from ecgfm.data.sources import ChallengeReader, EdfReader, RecordError
from ecgfm.data.sources.edf import edf_lead
from ecgfm.leads import STANDARD_LEADS

#: How a Holter export labels the 12 leads, deliberately mixed, and out of the standard order (aVF before aVL).
LABELS = {
    "I": "ECG I",
    "II": "EKG II",
    "III": "ECG III",
    "aVR": "ECG aVR",
    "aVF": "ECG AVF",
    "aVL": "ECG aVL",
    **{f"V{k}": f"ECG V{k}-REF" for k in range(1, 7)},
}


@pytest.fixture(scope="module")
def source(test_data: Path):
    """The real 12-lead record HR06000 (500 Hz, 10 s) in mV."""
    return ChallengeReader().read(test_data / "cinc2021" / "HR06000")


def write_edf(path: Path, record, file_type: str = "edf+", units=None, extra=True, labels=LABELS):
    """Write ``record``'s leads (in mV) under Holter labels, V1-V6 in µV (or ``units`` per lead), with a
    respiration (Ohm, 25 Hz) and an SpO2 (%, 1 Hz) channel and, in EDF+/BDF+, patient data and one annotation."""
    order = ["I", "II", "III", "aVR", "aVF", "aVL", *[f"V{k}" for k in range(1, 7)]]
    units = units or {lead: ("uV" if lead.startswith("V") else "mV") for lead in order}
    resp = np.interp(np.arange(250) / 25, np.arange(5000) / 500, record.signal[1]) * 100 + 500
    other = [("Resp", "Ohm", 25, resp), ("SpO2", "%", 1, np.full(10, 97.0))] if extra else []
    return record_formats.write_edf(
        path,
        record.signal[[record.lead_names.index(lead) for lead in order]],
        record.fs,
        order,
        file_type=file_type,
        labels=labels,
        units=units,
        other_channels=other,
        patient_code="P0042",
        sex="M",
        birthdate=date(1950, 6, 30),
        start=datetime(2020, 3, 1, 10, 0, 0),
        annotations=[(2.0, "arousal")],
    )


def test_labels_name_the_leads():
    assert [edf_lead(x) for x in ("ECG I", "EKG II", "ECG V1-REF", "ecg_avr", "II", "EKG: V6-AVG")] == [
        "I", "II", "V1", "aVR", "II", "V6"
    ]  # fmt: skip
    assert edf_lead("EEG Fpz-Cz") is None and edf_lead("Resp") is None and edf_lead("ECG") is None
    assert edf_lead("ECG1") is None and edf_lead("ECG1", {"ecg1": "I"}) == "I"


@pytest.mark.parametrize(
    "file_type, suffix, tolerance",
    [
        ("edf+", "edf", 2e-4),
        ("bdf+", "bdf", 2e-5),
        ("edf", "edf", 2e-4),
    ],
    ids=["edf+", "bdf+", "edf"],
)
def test_reads_the_source_values_in_mv(tmp_path, source, file_type, suffix, tolerance):
    """Values agree to the format's resolution: 16 or 24 bits over each channel's range, whose ends EDF writes as
    8-character text (so even BDF is exact to about 1e-5 of the range)."""
    path = write_edf(tmp_path / f"HR06000.{suffix}", source, file_type)
    rec = EdfReader().read(path)
    assert rec.lead_names == ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
    assert rec.fs == 500 and rec.signal.shape == (12, 5000) and rec.record_id == "HR06000"
    for row, lead in enumerate(rec.lead_names):  # V1-V6 were stored in µV: back in mV here
        expected = source.signal[source.lead_names.index(lead)]
        np.testing.assert_allclose(rec.signal[row], expected, atol=tolerance * max(1.0, np.ptp(expected)))
    assert rec.metadata["warnings"] == ["channels ignored, not an ECG lead: Resp (Ohm), SpO2 (%)"]
    if file_type != "edf":
        assert rec.patient_id == "P0042" and rec.metadata["sex"] == "M" and rec.metadata["age"] == 69


def test_converts_in_the_standard_lead_order(tmp_path, source):
    src = tmp_path / "src"
    src.mkdir()
    write_edf(src / "a.edf", source)
    write_edf(src / "b.BDF", source, "bdf+")
    (src / "notes.txt").write_text("not a recording")
    summary = convert(src, tmp_path / "out", reader="edf", progress=False)
    assert summary.records_read == 2 and summary.segments_written == 2 and not summary.skipped
    with h5py.File(tmp_path / "out" / "shard-00000.h5") as f:
        stored = f["signal"][0].astype(np.float64) / 1000  # int16 µV -> mV
        assert f["lead_mask"][0].all()
    for slot, lead in enumerate(STANDARD_LEADS):
        expected = source.signal[source.lead_names.index(lead)]
        np.testing.assert_allclose(stored[slot], expected, atol=2e-3)
    with (tmp_path / "out" / "warnings.csv").open() as f:
        warned = [row[1] for row in list(csv.reader(f))[1:]]
    assert warned.count("channels ignored, not an ECG lead: Resp (Ohm), SpO2 (%)") == 2


def test_leads_at_different_rates_meet_at_the_fastest(tmp_path, source):
    lead_ii = source.signal[1].astype(np.float64)
    fast = np.interp(np.arange(10000) / 1000, np.arange(5000) / 500, lead_ii)
    path = record_formats.write_edf(
        tmp_path / "rates.edf", source.signal[:1], 500, ["I"], units="mV", other_channels=[("ECG II", "mV", 1000, fast)]
    )
    rec = EdfReader().read(path)
    assert rec.fs == 1000 and rec.signal.shape == (2, 10000)
    assert "channel ECG I: 500 Hz resampled to 1000 Hz, the rate of the fastest ECG lead" in rec.metadata["warnings"]
    np.testing.assert_allclose(rec.signal[0, 200:-200:2], source.signal[0, 100:-100], atol=0.02)


def test_problems_name_the_file_and_channel(tmp_path, source):
    src = tmp_path / "src"
    src.mkdir()
    (src / "garbage.edf").write_bytes(b"this is not an EDF header" * 20)
    write_edf(src / "pressure.edf", source, units={lead: "mmHg" if lead == "II" else "mV" for lead in LABELS})
    write_edf(src / "nolead.edf", source, labels={lead: f"CH{k}" for k, lead in enumerate(LABELS)})
    write_edf(src / "twice.edf", source, labels={**LABELS, "III": "ECG II"})
    good = write_edf(src / "good.edf", source)
    truncated = src / "truncated.edf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    summary = convert(src, tmp_path / "out", reader="edf", progress=False)
    reasons = dict(summary.skipped)
    assert summary.records_read == 1 and len(reasons) == 5
    assert reasons[str(src / "garbage.edf")].startswith(f"{src / 'garbage.edf'}: not a readable EDF/EDF+/BDF file (")
    assert reasons[str(truncated)].startswith(f"{truncated}: not a readable EDF/EDF+/BDF file (")
    assert reasons[str(src / "pressure.edf")] == (
        f"{src / 'pressure.edf'}: channel 'EKG II' (lead II) is in 'mmHg', not a voltage (expected uV, mV or V)"
    )
    assert reasons[str(src / "nolead.edf")].startswith(f"{src / 'nolead.edf'}: no ECG lead among channels ['CH0', ")
    assert reasons[str(src / "twice.edf")] == f"{src / 'twice.edf'}: channels 'EKG II' and 'ECG II' are both lead II"
    with pytest.raises(RecordError, match="missing.edf: file not found"):
        EdfReader().read(src / "missing.edf")
    aliased = EdfReader(lead_aliases={f"CH{k}": lead for k, lead in enumerate(LABELS)}).read(src / "nolead.edf")
    assert aliased.lead_names[:3] == ("I", "II", "III")
    with pytest.raises(ValueError, match="edf: lead alias"):
        EdfReader(lead_aliases="CH0=chest")
