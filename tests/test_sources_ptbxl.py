"""The PTB-XL reader on a small PTB-XL layout built from real PTB-XL recordings (the Challenge's HR records)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.signal
import wfdb

from ecgfm.commands import main
from ecgfm.data.convert import convert
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.data.shards import Manifest, verify_shards
from ecgfm.data.sources import PtbxlReader, RecordError, ptbxl_split_file
from ecgfm.registry import SOURCES

DATA = Path(__file__).resolve().parent / "data"  # real recordings shipped with the tests (data/README.md)
# PTB-XL writes lead names in upper case
LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]

# ecg_id, source record, patient_id, strat_fold, scp_codes; rows deliberately not in ecg_id order
ROWS = [
    (6002, "HR06002", "20372.0", "9", "{'IRBBB': 100.0, 'IMI': 35.0, 'SBRAD': 0.0}"),
    (6000, "HR06000", "15709.0", "3", "{'NORM': 100.0, 'SR': 0.0}"),
    (6001, "HR06001", "15709.0", "3", "{'NDT': 100.0, 'SR': 0.0}"),
    (6003, "HR06003", "9001.0", "10", "{'LVOLT': 0.0, 'STACH': 0.0}"),
    (6004, None, "9001.0", "10", "{'NORM': 80.0, 'SR': 0.0}"),  # listed, but its files are missing
]

# code, diagnostic, form, rhythm, diagnostic_class, diagnostic_subclass, description (as in PTB-XL's table)
STATEMENTS = [
    ("NDT", "1.0", "1.0", "", "STTC", "STTC", "non-diagnostic T abnormalities"),
    ("NORM", "1.0", "", "", "NORM", "NORM", "normal ECG"),
    ("IMI", "1.0", "", "", "MI", "IMI", "inferior myocardial infarction"),
    ("IRBBB", "1.0", "", "", "CD", "IRBBB", "incomplete right bundle branch block"),
    ("LVOLT", "", "1.0", "", "", "", "low QRS voltages in the frontal and horizontal leads"),
    ("SR", "", "", "1.0", "", "", "sinus rhythm"),
    ("SBRAD", "", "", "1.0", "", "", "sinus bradycardia"),
    ("STACH", "", "", "1.0", "", "", "sinus tachycardia"),
]


def record_folder(ecg_id: int) -> str:
    return f"{ecg_id // 1000 * 1000:05d}"


def write_layout(root: Path, rows=ROWS) -> Path:
    """ptbxl_database.csv, scp_statements.csv and records100/ + records500/ written with wfdb.wrsamp."""
    root.mkdir(parents=True, exist_ok=True)
    columns = ["ecg_id", "patient_id", "age", "sex", "scp_codes", "strat_fold", "filename_lr", "filename_hr"]
    with open(root / "ptbxl_database.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for ecg_id, source, patient, fold, codes in rows:
            name = f"{record_folder(ecg_id)}/{ecg_id:05d}"
            writer.writerow(
                [ecg_id, patient, "56.0", "1", codes, fold, f"records100/{name}_lr", f"records500/{name}_hr"]
            )
            if source is None:
                continue
            val = scipy.io.loadmat(str(DATA / "cinc2021" / f"{source}.mat"))["val"]  # int16 µV, gain 1000/mV
            for rate, suffix, digital in (
                (500, "hr", val),
                (100, "lr", np.rint(scipy.signal.resample_poly(val.astype(np.float64), 1, 5, axis=1))),
            ):
                folder = root / f"records{rate}" / record_folder(ecg_id)
                folder.mkdir(parents=True, exist_ok=True)
                wfdb.wrsamp(
                    f"{ecg_id:05d}_{suffix}",
                    fs=rate,
                    units=["mV"] * 12,
                    sig_name=LEADS,
                    d_signal=digital.T.astype(np.int64),
                    fmt=["16"] * 12,
                    adc_gain=[1000.0] * 12,
                    baseline=[0] * 12,
                    write_dir=str(folder),
                )
    with open(root / "scp_statements.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "description", "diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"])
        for code, diagnostic, form, rhythm, klass, subclass, description in STATEMENTS:
            writer.writerow([code, description, diagnostic, form, rhythm, klass, subclass])
    return root


@pytest.fixture(scope="module")
def ptbxl(tmp_path_factory) -> Path:
    return write_layout(tmp_path_factory.mktemp("data") / "ptb-xl")


def read_shards(out: Path) -> dict[str, np.ndarray]:
    manifest = Manifest.load(out)
    parts: dict[str, list] = {}
    for shard in manifest.shards:
        with h5py.File(out / shard["path"]) as f:
            columns = {
                "signal": f["signal"][:],
                "lead_mask": f["lead_mask"][:],
                "record_id": f["record_id"].asstr()[:],
                "patient_id": f["patient_id"].asstr()[:],
                "segment_start": f["segment_start"][:],
                **{f"targets/{name}": f[f"targets/{name}"][:] for name in manifest.targets},
            }
        for key, value in columns.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(value) for key, value in parts.items()}


def test_find_records_follows_the_csv_in_ecg_id_order(ptbxl: Path) -> None:
    assert SOURCES.create("ptbxl").find_records(ptbxl) == [
        ptbxl / f"records500/06000/0600{i}_hr" for i in range(5)
    ]  # 06004 is missing on disk and still listed: read() reports it
    assert SOURCES.create("ptbxl", sampling=100).find_records(ptbxl)[0] == ptbxl / "records100/06000/06000_lr"


def test_500hz_records_convert_with_superclasses_patients_and_folds(ptbxl: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    summary = convert(ptbxl, out, reader="ptbxl", progress=False)
    assert summary.records_read == 4 and summary.segments_written == 4
    [(path, reason)] = summary.skipped
    assert path == str(ptbxl / "records500/06000/06004_hr")
    assert "06004_hr.hea: header file not found" in reason and "ecg_id 6004" in reason
    assert verify_shards(out) == []

    manifest = Manifest.load(out)
    assert manifest.targets["ptbxl_superclass"].kind == "multilabel"
    assert manifest.targets["ptbxl_superclass"].names == ["CD", "MI", "NORM", "STTC"]  # HYP occurs in no record
    assert manifest.targets["strat_fold"].kind == "multiclass"
    assert manifest.targets["strat_fold"].names == [str(f) for f in range(1, 11)]

    shards = read_shards(out)
    assert list(shards["record_id"]) == ["6000", "6001", "6002", "6003"]
    assert list(shards["patient_id"]) == ["15709", "15709", "20372", "9001"]
    superclass = shards["targets/ptbxl_superclass"]
    np.testing.assert_array_equal(superclass[:3], [[0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]])
    assert np.isnan(superclass[3]).all()  # 6003 has only form and rhythm statements: no superclass, masked
    assert [int(np.argmax(row)) + 1 for row in shards["targets/strat_fold"]] == [3, 3, 9, 10]
    assert shards["targets/strat_fold"].sum(axis=1).tolist() == [1, 1, 1, 1]
    assert shards["lead_mask"].all()

    # the stored µV are the real recording's samples (upper-case AVR, AVL, AVF mapped to aVR, aVL, aVF)
    original = SOURCES.create("challenge").read(DATA / "cinc2021" / "HR06002")
    np.testing.assert_allclose(shards["signal"][2] / 1000.0, original.signal, atol=6e-4)


def test_100hz_records_are_resampled_to_500hz_segments(ptbxl: Path, tmp_path: Path) -> None:
    summary = convert(ptbxl, tmp_path / "lr", reader="ptbxl", reader_options={"sampling": 100}, progress=False)
    assert summary.records_read == 4 and summary.segments_written == 4
    assert "06004_lr.hea" in summary.skipped[0][1]
    record = SOURCES.create("ptbxl", sampling=100).read(ptbxl / "records100/06000/06000_lr")
    assert record.fs == 100 and record.signal.shape == (12, 1000) and record.patient_id == "15709"

    low = read_shards(tmp_path / "lr")
    assert low["signal"].shape == (4, 12, 5000) and list(low["segment_start"]) == [0, 0, 0, 0]
    high = SOURCES.create("challenge").read(DATA / "cinc2021" / "HR06000").signal
    # 500 -> 100 -> 500 Hz keeps the ECG below 50 Hz: the waveforms agree closely
    for lead in range(12):
        assert np.corrcoef(low["signal"][0, lead] / 1000.0, high[lead])[0, 1] > 0.95, lead


def test_label_sets_and_min_likelihood(ptbxl: Path) -> None:
    sets = ["statements", "diagnostic", "subclass", "superclass", "form", "rhythm"]
    reader = SOURCES.create("ptbxl", label_sets=sets)
    paths = reader.find_records(ptbxl)
    specs = reader.target_specs(paths)
    assert specs["ptbxl_statements"].names == ["IMI", "IRBBB", "LVOLT", "NDT", "NORM", "SBRAD", "SR", "STACH"]
    assert specs["ptbxl_diagnostic"].names == ["IMI", "IRBBB", "NDT", "NORM"]
    assert specs["ptbxl_subclass"].names == ["IMI", "IRBBB", "NORM", "STTC"]
    assert specs["ptbxl_form"].names == ["LVOLT", "NDT"]
    assert specs["ptbxl_rhythm"].names == ["SBRAD", "SR", "STACH"]

    record = reader.read(paths[2])  # ecg_id 6002: IRBBB 100, IMI 35, SBRAD 0
    assert record.metadata["scp_codes"] == {"IRBBB": 100.0, "IMI": 35.0, "SBRAD": 0.0}
    assert record.metadata["sex"] == "F" and record.metadata["age"] == 56 and record.metadata["strat_fold"] == 9
    values = reader.targets(record, specs)
    assert values["ptbxl_subclass"].tolist() == [1, 1, 0, 0]
    assert values["ptbxl_rhythm"].tolist() == [1, 0, 0]
    assert values["ptbxl_form"].tolist() == [0, 0]  # no form statement: negative, not missing

    # likelihood 35 < 50: IMI is dropped; SBRAD (rhythm, likelihood 0 as always in PTB-XL) is kept
    strict = SOURCES.create("ptbxl", label_sets=sets, min_likelihood=50)
    strict_specs = strict.target_specs(paths)
    assert "IMI" not in strict_specs["ptbxl_statements"].names and "MI" not in strict_specs["ptbxl_superclass"].names
    strict_values = strict.targets(strict.read(paths[2]), strict_specs)
    assert strict_values["ptbxl_superclass"].tolist() == [1, 0, 0]  # CD, NORM, STTC
    assert strict_values["ptbxl_rhythm"].tolist() == [1, 0, 0]


def test_split_file_round_trip_with_the_datamodule(ptbxl: Path, tmp_path: Path) -> None:
    split = ptbxl_split_file(ptbxl, tmp_path / "splits" / "ptbxl.json")
    assert json.loads(split.read_text()) == {"train": ["15709"], "val": ["20372"], "test": ["9001"]}
    convert(ptbxl, tmp_path / "shards", reader="ptbxl", progress=False)
    dm = ShardDataModule(str(tmp_path / "shards"), batch_size=2, split_file=str(split))
    dm.setup("fit")
    indices = dm.split_indices()
    assert {name: len(idx) for name, idx in indices.items()} == {"train": 2, "val": 1, "test": 1}
    batch = next(iter(dm.train_dataloader()))
    assert batch["targets"]["ptbxl_superclass"].shape == (2, 4)

    custom = ptbxl_split_file(ptbxl, tmp_path / "custom.json", val_folds=(3,), test_folds=(9, 10))
    assert json.loads(custom.read_text()) == {"train": [], "val": ["15709"], "test": ["20372", "9001"]}


def test_a_patient_in_two_folds_is_named(tmp_path: Path) -> None:
    rows = [(1, None, "77.0", "1", "{}"), (2, None, "77.0", "2", "{}")]
    root = write_layout(tmp_path / "ptb-xl", rows)
    with pytest.raises(ValueError, match=r"patient 77 is in folds 1 and 2"):
        ptbxl_split_file(root, tmp_path / "split.json")
    with pytest.raises(ValueError, match="both validation and test"):
        ptbxl_split_file(root, tmp_path / "split.json", val_folds=(9,), test_folds=(9, 10))


def test_missing_tables_bad_options_and_bad_rows_are_named(ptbxl: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sampling must be 100 or 500"):
        PtbxlReader(sampling=250)
    with pytest.raises(ValueError, match="unknown label set.*'classes'"):
        PtbxlReader(label_sets=["classes"])
    with pytest.raises(FileNotFoundError, match="ptbxl_database.csv"):
        SOURCES.create("ptbxl").find_records(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(ptbxl / "ptbxl_database.csv", partial)
    with pytest.raises(FileNotFoundError, match="scp_statements.csv"):
        SOURCES.create("ptbxl").find_records(partial)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="ptbxl_database.csv"):
        convert(tmp_path / "empty", tmp_path / "out", reader="ptbxl", progress=False)

    bad = write_layout(tmp_path / "bad", [(1, None, "5.0", "1", "{'NORM': __import__('os')}")])
    with pytest.raises(ValueError, match="ecg_id '1': unreadable scp_codes"):
        SOURCES.create("ptbxl").find_records(bad)
    with pytest.raises(RecordError, match="no ptbxl_database.csv"):
        SOURCES.create("ptbxl").read(tmp_path / "records500" / "00000" / "00001_hr")


def test_shard_cli_takes_reader_options_as_json(ptbxl: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    options = '{"sampling": 100, "label_sets": ["superclass", "rhythm"]}'
    argv = ["shard", "--source", str(ptbxl), "--out", str(out), "--reader", "ptbxl", "--reader_options", options]
    assert main([*argv, "--progress", "false"]) == 0
    assert "records skipped" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert sorted(manifest.targets) == ["ptbxl_rhythm", "ptbxl_superclass", "strat_fold"]
    assert manifest.n_segments == 4


def test_worker_processes_find_the_csv_themselves(ptbxl: Path, tmp_path: Path) -> None:
    options = {"label_sets": ["superclass", "form"]}
    convert(ptbxl, tmp_path / "serial", reader="ptbxl", reader_options=options, progress=False)
    summary = convert(
        ptbxl, tmp_path / "parallel", reader="ptbxl", reader_options=options, records_per_shard=2, workers=2
    )
    assert summary.records_read == 4 and len(summary.skipped) == 1
    serial, parallel = read_shards(tmp_path / "serial"), read_shards(tmp_path / "parallel")
    for key in ("record_id", "patient_id", "targets/ptbxl_superclass", "targets/ptbxl_form", "targets/strat_fold"):
        np.testing.assert_array_equal(parallel[key], serial[key], err_msg=key)
