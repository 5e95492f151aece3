"""The ``cpsc2018`` reader on files in the original CPSC 2018 layout, written here with scipy.io.savemat from real
recordings in tests/data (Challenge 2021 records HR06000 and JS20002, and 38.4 s of PTB's s0010_re at 500 Hz)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from ecgfm.bench.record_formats import write_cpsc2018
from ecgfm.data.convert import convert
from ecgfm.data.sources import ChallengeReader, Cpsc2018Reader, RecordError, WfdbReader
from ecgfm.data.sources.cpsc2018 import CPSC2018_CLASSES, read_reference
from ecgfm.leads import STANDARD_LEADS
from ecgfm.resampling import resample

REFERENCE = """Recording,First_label,Second_label,Third_label
A0001,1,,
A0002,2,8,
A0003,9,3,7
A0004,12,,
"""


def _in_order(record) -> np.ndarray:
    """The record's 12 leads in CPSC 2018's row order (the standard order), float64 mV."""
    return np.stack([record.signal[record.lead_names.index(lead)] for lead in STANDARD_LEADS]).astype(np.float64)


@pytest.fixture(scope="module")
def recordings(test_data: Path) -> dict[str, np.ndarray]:
    """Three real recordings as CPSC 2018 stores them: 12 x N float mV at 500 Hz, 10 s to 38.4 s."""
    challenge = ChallengeReader()
    ptb = WfdbReader().read(test_data / "ptbdb-s0010" / "s0010_re")  # 1000 Hz, 38.4 s
    return {
        "A0001": _in_order(challenge.read(test_data / "cinc2021" / "HR06000")),
        "A0002": _in_order(challenge.read(test_data / "cinc2021" / "JS20002")),
        "A0003": resample(_in_order(ptb), 1000, 500).astype(np.float64),
        "A0004": _in_order(challenge.read(test_data / "cinc2021" / "HR06001")),
        "A0005": _in_order(challenge.read(test_data / "cinc2021" / "HR06002")),
    }


@pytest.fixture
def folder(tmp_path, recordings) -> Path:
    src = tmp_path / "TrainingSet1"
    src.mkdir()
    for k, (name, data) in enumerate(recordings.items()):
        write_cpsc2018(src / f"{name}.mat", data, 500, STANDARD_LEADS, sex="Female" if k % 2 else "Male", age=40 + k)
    (src / "REFERENCE.csv").write_text(REFERENCE)
    return src


def test_reads_the_struct_in_mv_with_its_labels(folder, recordings):
    reader = Cpsc2018Reader()
    rec = reader.read(folder / "A0002.mat")
    assert rec.lead_names == STANDARD_LEADS and rec.fs == 500 and rec.record_id == "A0002"
    np.testing.assert_array_equal(rec.signal, recordings["A0002"].astype(np.float32))  # float mV as stored
    assert rec.metadata["sex"] == "F" and rec.metadata["age"] == 41
    assert rec.metadata["labels"] == ["AF", "STD"] and rec.metadata["first_label"] == "AF"
    assert reader.read(folder / "A0003").signal.shape == (12, 19200)  # with or without ".mat"
    specs = reader.target_specs(reader.find_records(folder))
    assert specs["dx"].names == list(CPSC2018_CLASSES.values())
    dx = reader.targets(reader.read(folder / "A0003.mat"), specs)["dx"]
    assert [name for name, on in zip(specs["dx"].names, dx, strict=True) if on] == ["I-AVB", "PVC", "STE"]
    unlabelled = reader.read(folder / "A0005.mat")
    assert np.isnan(reader.targets(unlabelled, specs)["dx"]).all()
    assert unlabelled.metadata["warnings"] == [f"A0005 has no row in {folder / 'REFERENCE.csv'}: labels unknown"]


def test_converts_with_labels_and_reasons(folder, tmp_path, recordings):
    (folder / "A0006.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    scipy.io.savemat(str(folder / "A0007.mat"), {"val": recordings["A0001"].astype(np.int16)})
    scipy.io.savemat(str(folder / "A0008.mat"), {"ECG": {"sex": "Male", "age": 74, "data": recordings["A0001"].T}})
    summary = convert(folder, tmp_path / "out", reader="cpsc2018", progress=False)
    reasons = dict(summary.skipped)
    assert summary.records_read == 4 and summary.segments_written == 1 + 1 + 3 + 1
    assert (
        reasons[str(folder / "A0004.mat")]
        == f"{folder / 'REFERENCE.csv'} line 5: class code '12' of A0004 is not one of 1-9"
    )
    assert reasons[str(folder / "A0006.mat")].startswith(f"{folder / 'A0006.mat'}: cannot load .mat file (")
    assert reasons[str(folder / "A0007.mat")] == (
        f"{folder / 'A0007.mat'}: no struct 'ECG' with a field 'data' (found ['val']); not a CPSC 2018 file"
    )
    assert (
        reasons[str(folder / "A0008.mat")]
        == f"{folder / 'A0008.mat'}: ECG.data has shape (5000, 12), expected 12 leads x samples"
    )
    with h5py.File(tmp_path / "out" / "shard-00000.h5") as f:
        ids = [x.decode() if isinstance(x, bytes) else x for x in f["record_id"][:]]
        dx = f["targets/dx"][:]
        assert list(f["targets/dx"].attrs["names"]) == list(CPSC2018_CLASSES.values())
        first = f["signal"][ids.index("A0001")].astype(np.float64) / 1000
    assert dx[ids.index("A0001")].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert dx[ids.index("A0002")].tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 0]
    assert np.isnan(dx[ids.index("A0005")]).all()
    np.testing.assert_allclose(first, recordings["A0001"], atol=6e-4)  # int16 µV rounding


def test_reference_option_and_missing_table(tmp_path, recordings):
    src = tmp_path / "records"
    src.mkdir()
    write_cpsc2018(src / "A0001.mat", recordings["A0001"], 500, STANDARD_LEADS)
    alone = Cpsc2018Reader().read(src / "A0001.mat")
    assert alone.metadata["labels"] is None and "no REFERENCE.csv beside A0001.mat" in alone.metadata["warnings"][0]
    table = tmp_path / "labels" / "REFERENCE.csv"
    table.parent.mkdir()
    table.write_text(REFERENCE)
    assert Cpsc2018Reader(reference=table).read(src / "A0001").metadata["labels"] == ["Normal"]
    with pytest.raises(ValueError, match="reference .* does not exist"):
        Cpsc2018Reader(reference=tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="fs must be a positive"):
        Cpsc2018Reader(fs=0)
    table.write_text("name,label\nA0001,1\n")
    with pytest.raises(RecordError, match="not a CPSC 2018 REFERENCE.csv"):
        Cpsc2018Reader(reference=table).read(src / "A0001.mat")
    table.write_text("Recording,First_label,Second_label,Third_label\nA0001,1,,\nA0001,2,,\n")
    assert read_reference(table)["A0001"] == f"{table} line 3: recording A0001 is listed twice"
    with pytest.raises(RecordError, match="A0009.mat: file not found"):
        Cpsc2018Reader().read(src / "A0009.mat")
