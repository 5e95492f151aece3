"""The arrays reader: real recordings exported as .npy / .npz / HDF5 arrays plus a CSV, converted to shards."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest

from ecgfm.data.convert import convert
from ecgfm.data.shards import Manifest, verify_shards
from ecgfm.data.sources import ArrayReader, RecordError
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

DATA = Path(__file__).resolve().parent / "data"  # real recordings shipped with the tests (data/README.md)
RECORDS = ["E07500", "E07501", "HR06000", "HR06001"]
PATIENTS = ["p1", "p1", "p2", "p3"]
EIGHT = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]


@pytest.fixture(scope="module")
def recordings() -> tuple[np.ndarray, list[int]]:
    """Four real 12-lead, 500 Hz, 10-s recordings in mV [4, 12, 5000] and the patients' ages."""
    reader = SOURCES.create("challenge")
    records = [reader.read(DATA / "cinc2021" / name) for name in RECORDS]
    assert all(r.lead_names == STANDARD_LEADS and r.signal.shape == (12, 5000) for r in records)
    return np.stack([r.signal for r in records]), [r.metadata["age"] for r in records]


def write_table(path: Path, ages: list[int], order: list[int] | None = None) -> Path:
    """One row per recording: record id, patient, age (a regression label) and the row in the array."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["record", "patient", "age", "row"])
        for i in order or range(len(RECORDS)):
            writer.writerow([RECORDS[i], PATIENTS[i], ages[i], i])
    return path


def read_shards(out: Path) -> dict[str, np.ndarray]:
    manifest = Manifest.load(out)
    assert len(manifest.shards) == 1
    with h5py.File(out / manifest.shards[0]["path"]) as f:
        return {
            "signal": f["signal"][:],
            "lead_mask": f["lead_mask"][:],
            "record_id": f["record_id"].asstr()[:],
            "patient_id": f["patient_id"].asstr()[:],
            **{name: f[f"targets/{name}"][:] for name in manifest.targets},
        }


def test_npy_export_converts_with_a_regression_label(recordings, tmp_path: Path) -> None:
    signals, ages = recordings
    export = tmp_path / "export"
    export.mkdir()
    np.save(export / "ecg.npy", signals)
    table = write_table(export / "ecg.csv", ages)
    options = {"table": str(table), "patient_column": "patient"}
    summary = convert(
        export, tmp_path / "shards", reader="arrays", reader_options=options, labels=table, regression={"age": ["age"]}
    )
    assert summary.records_read == 4 and summary.segments_written == 4 and not summary.skipped
    assert verify_shards(tmp_path / "shards") == []
    shards = read_shards(tmp_path / "shards")
    assert list(shards["record_id"]) == RECORDS
    assert list(shards["patient_id"]) == PATIENTS  # from the reader's patient column
    assert shards["age"][:, 0].tolist() == ages
    assert shards["lead_mask"].all()
    np.testing.assert_allclose(shards["signal"] / 1000.0, signals, atol=6e-4)

    reader = ArrayReader(**options)
    paths = reader.find_records(export)
    assert paths == [Path(f"{export / 'ecg.npy'}#{i}") for i in range(4)]
    assert isinstance(reader.export(export / "ecg.npy").data, np.memmap)  # rows are read lazily
    record = reader.read(paths[2])
    assert (record.record_id, record.patient_id, record.fs) == ("HR06000", "p2", 500.0)


def test_npz_export_of_eight_leads_in_microvolts(recordings, tmp_path: Path) -> None:
    signals, ages = recordings
    keep = [STANDARD_LEADS.index(name) for name in EIGHT]
    export = tmp_path / "export"
    export.mkdir()
    np.savez_compressed(export / "ecg.npz", waves=np.rint(signals[:, keep] * 1000).astype(np.int32))
    table = write_table(tmp_path / "table.csv", ages)
    options = {"table": str(table), "signal_key": "waves", "units": "µV", "lead_names": EIGHT}
    summary = convert(export, tmp_path / "shards", reader="arrays", reader_options=options, progress=False)
    assert summary.records_read == 4 and not summary.skipped
    shards = read_shards(tmp_path / "shards")
    assert list(shards["patient_id"]) == RECORDS  # no patient column: each record is its own patient
    missing = [STANDARD_LEADS.index(name) for name in ("III", "aVR", "aVL", "aVF")]
    assert not shards["lead_mask"][:, missing].any() and shards["lead_mask"][:, keep].all()
    assert not shards["signal"][:, missing].any()
    np.testing.assert_allclose(shards["signal"][:, keep] / 1000.0, signals[:, keep], atol=6e-4)


def test_hdf5_export_in_volts_with_an_index_column_and_250_hz(recordings, tmp_path: Path) -> None:
    signals, ages = recordings
    export = tmp_path / "export"
    export.mkdir()
    with h5py.File(export / "ecg.h5", "w") as f:
        f.create_dataset("ecg/data", data=signals / 1000.0)  # volts, 5000 samples read as 20 s at 250 Hz
    table = write_table(tmp_path / "table.csv", ages, order=[3, 1, 0, 2])
    options = {"table": str(table), "signal_key": "ecg/data", "units": "V", "fs": 250, "index_column": "row"}
    summary = convert(
        export,
        tmp_path / "shards",
        reader="arrays",
        reader_options=options,
        labels=table,
        regression={"age": ["age"]},
        progress=False,
    )
    assert summary.records_read == 4 and summary.segments_written == 8  # 20 s at 250 Hz -> two 10-s windows
    shards = read_shards(tmp_path / "shards")
    assert list(shards["record_id"]) == [name for name in RECORDS for _ in range(2)]  # array order
    assert shards["age"][::2, 0].tolist() == ages

    reader = ArrayReader(**options)
    first = reader.read(Path(f"{export / 'ecg.h5'}#1"))
    handle = reader.export(export / "ecg.h5").handle
    reader.read(Path(f"{export / 'ecg.h5'}#2"))
    assert reader.export(export / "ecg.h5").handle is handle  # the HDF5 file is opened once
    np.testing.assert_allclose(first.signal, signals[1], atol=1e-6)

    # worker processes open the HDF5 file themselves and give the same shards
    parallel = convert(
        export, tmp_path / "parallel", reader="arrays", reader_options=options, records_per_shard=2, workers=2
    )
    assert parallel.segments_written == 8 and not parallel.skipped
    manifest = Manifest.load(tmp_path / "parallel")
    with h5py.File(tmp_path / "parallel" / manifest.shards[1]["path"]) as f:
        assert list(f["record_id"].asstr()[:]) == ["HR06000", "HR06000", "HR06001", "HR06001"]
        np.testing.assert_array_equal(f["signal"][:], shards["signal"][4:])


def test_nan_rows_and_leads_are_masked_by_the_converter(recordings, tmp_path: Path) -> None:
    signals, ages = recordings
    signals = signals.copy()
    signals[1] = np.nan  # a record the export could not fill
    signals[2, 3] = np.nan  # aVR missing in one record
    np.save(tmp_path / "ecg.npy", signals)
    table = write_table(tmp_path / "table.csv", ages)
    # the source may be the array file itself
    summary = convert(tmp_path / "ecg.npy", tmp_path / "shards", reader="arrays", reader_options={"table": str(table)})
    assert summary.records_read == 3
    assert summary.skipped == [(f"{tmp_path / 'ecg.npy'}#1", f"{tmp_path / 'ecg.npy'}#1: every lead is NaN or flat")]
    assert summary.warnings == [
        (f"{tmp_path / 'ecg.npy'}#2", "leads aVR are flat or NaN: stored as missing (lead_mask 0)")
    ]


def test_table_and_array_of_different_lengths_name_both_files(recordings, tmp_path: Path) -> None:
    signals, ages = recordings
    np.save(tmp_path / "ecg.npy", signals[:3])
    table = write_table(tmp_path / "table.csv", ages)
    with pytest.raises(ValueError, match=r"table\.csv has 4 rows but .*ecg\.npy holds 3 records"):
        convert(tmp_path, tmp_path / "shards", reader="arrays", reader_options={"table": str(table)})
    pointing = write_table(tmp_path / "pointing.csv", ages)  # rows 0..3 of a 3-record array
    with pytest.raises(ValueError, match=r"pointing\.csv: line 5 \('HR06001'\) has row = '3', not a row of .*ecg\.npy"):
        ArrayReader(str(pointing), index_column="row").find_records(tmp_path)


def test_option_and_layout_errors_are_named(recordings, tmp_path: Path) -> None:
    signals, ages = recordings
    table = write_table(tmp_path / "table.csv", ages)
    np.save(tmp_path / "eight.npy", signals[:, :8])
    with pytest.raises(FileNotFoundError, match=r"absent\.csv: table not found"):
        ArrayReader(str(tmp_path / "absent.csv")).find_records(tmp_path / "eight.npy")
    with pytest.raises(ValueError, match="unknown units 'mmHg'"):
        ArrayReader(str(table), units="mmHg")
    with pytest.raises(ValueError, match=r"eight\.npy: 8 leads per record; give their names with lead_names"):
        ArrayReader(str(table)).find_records(tmp_path / "eight.npy")
    with pytest.raises(ValueError, match=r"eight\.npy: 8 leads per record but lead_names has 2"):
        ArrayReader(str(table), lead_names=["I", "II"]).find_records(tmp_path / "eight.npy")
    np.save(tmp_path / "twelve.npy", signals)
    with pytest.raises(FileNotFoundError, match=r"found \['eight\.npy', 'twelve\.npy'\].*'array'"):
        ArrayReader(str(table)).find_records(tmp_path)
    assert len(ArrayReader(str(table), array="twelve.npy").find_records(tmp_path)) == 4
    np.savez(tmp_path / "other.npz", signal=signals)
    with pytest.raises(ValueError, match=r"other\.npz: no array 'waves'"):
        ArrayReader(str(table), signal_key="waves").find_records(tmp_path / "other.npz")
    with pytest.raises(RecordError, match=r"twelve\.npy: row 7 has no line in .*table\.csv"):
        ArrayReader(str(table)).read(Path(f"{tmp_path / 'twelve.npy'}#7"))
    duplicated = tmp_path / "duplicated.csv"
    duplicated.write_text("record\nA\nB\nA\nC\n")
    with pytest.raises(ValueError, match=r"duplicated\.csv: record 'A' on lines 2 and 4"):
        ArrayReader(str(duplicated)).find_records(tmp_path / "twelve.npy")
