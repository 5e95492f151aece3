"""`ecgfm shard` converts real PhysioNet records into v1 shards, and reports every record it skips."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest

from ecgfm.commands import main
from ecgfm.data.convert import convert
from ecgfm.data.shards import Manifest, verify_shards
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES
from ecgfm.signal import resample


def read_all(out):
    manifest = Manifest.load(out)
    arrays = {"signal": [], "lead_mask": [], "record_id": [], "segment_start": []}
    for shard in manifest.shards:
        with h5py.File(out / shard["path"]) as f:
            assert f.attrs["format"] == "ecgfm-shard" and f.attrs["version"] == 1
            assert list(f.attrs["lead_names"]) == list(STANDARD_LEADS)
            for key in arrays:
                data = f[key].asstr()[:] if key == "record_id" else f[key][:]
                arrays[key].append(data)
    return manifest, {k: np.concatenate(v) for k, v in arrays.items()}


def test_shard_cli_converts_every_ludb_record(ludb_data, tmp_path, capsys):
    out = tmp_path / "ludb"
    assert main(["shard", "--source", str(ludb_data), "--out", str(out), "--progress", "false"]) == 0
    printed = capsys.readouterr().out
    assert "records read" in printed and "120" in printed
    manifest, arrays = read_all(out)
    assert manifest.n_segments == 120
    assert sorted(set(arrays["record_id"]), key=int) == [str(i) for i in range(1, 121)]
    assert arrays["signal"].dtype == np.int16 and arrays["signal"].shape == (120, 12, 5000)
    assert arrays["lead_mask"].all()
    assert verify_shards(out) == []
    # int16 µV on disk equals the reader's millivolts x 1000
    record = SOURCES.create("wfdb").read(ludb_data / "data" / "1")
    row = list(arrays["record_id"]).index("1")
    np.testing.assert_allclose(arrays["signal"][row] / 1000.0, record.signal, atol=0.0006)


def test_challenge_records_convert_with_named_diagnoses(test_data, tmp_path):
    summary = convert(test_data / "cinc2021", tmp_path / "cinc", reader="challenge", progress=False)
    assert summary.records_read == 20 and summary.segments_written == 20 and not summary.skipped
    # two Ningbo records store V2, V4 and V6 as all zeros: kept, with those leads masked as missing
    flat = "leads V2 V4 V6 are flat or NaN: stored as missing (lead_mask 0)"
    assert sorted(summary.warnings) == [
        (str(test_data / "cinc2021" / "JS20004"), flat),
        (str(test_data / "cinc2021" / "JS20008"), flat),
    ]
    manifest = Manifest.load(tmp_path / "cinc")
    names = manifest.targets["dx"].names
    assert "NSR" in names and not any(n.isdigit() for n in names)  # every code is named by the mapping tables
    with h5py.File(tmp_path / "cinc" / manifest.shards[0]["path"]) as f:
        ids = list(f["record_id"].asstr()[:])
        dx = f["targets/dx"][:]
        mask = f["lead_mask"][ids.index("JS20004")]
    assert [lead for lead, present in zip(STANDARD_LEADS, mask, strict=True) if not present] == ["V2", "V4", "V6"]
    # HR06001 is labelled 426783006 (NSR) and 55930002 (STC) in its header
    row = dx[ids.index("HR06001")]
    assert {names[i] for i in np.flatnonzero(row)} == {"NSR", "STC"}


def test_challenge_mapping_tables_can_be_replaced(test_data, tmp_path):
    table = tmp_path / "my_map.csv"
    table.write_text("Dx,SNOMEDCTCode,Abbreviation\nsinus rhythm,426783006,SR\n")
    convert(test_data / "cinc2021", tmp_path / "cinc", reader="challenge", dx_mapping=[table], progress=False)
    names = Manifest.load(tmp_path / "cinc").targets["dx"].names
    assert "SR" in names and "NSR" not in names and "427084000" in names  # unknown codes keep their number


def test_ptb_1000hz_15_signals_become_three_500hz_segments(test_data, tmp_path):
    summary = convert(test_data / "ptbdb-s0010", tmp_path / "ptb", progress=False)
    assert summary.records_read == 1 and summary.segments_written == 3
    manifest, arrays = read_all(tmp_path / "ptb")
    assert arrays["signal"].shape == (3, 12, 5000)  # vx, vy, vz dropped; 12 standard leads kept
    assert list(arrays["segment_start"]) == [0, 5000, 10000]
    record = SOURCES.create("wfdb").read(test_data / "ptbdb-s0010" / "s0010_re")
    lead_ii = resample(record.signal[record.lead_names.index("II")][None], 1000, 500)[0]
    np.testing.assert_allclose(arrays["signal"][1, 1] / 1000.0, lead_ii[5000:10000], atol=0.0006)


def test_corrupt_record_is_reported_by_name_and_the_rest_kept(ludb_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in (1, 2, 3, 4):
        for ext in ("hea", "dat"):
            shutil.copy(ludb_data / "data" / f"{i}.{ext}", src / f"{i}.{ext}")
    with open(src / "3.dat", "r+b") as f:
        f.truncate(1000)
    (src / "4.dat").unlink()
    summary = convert(src, tmp_path / "out", progress=False)
    assert summary.records_read == 2 and summary.segments_written == 2
    skipped = dict(summary.skipped)
    assert set(skipped) == {str(src / "3"), str(src / "4")}
    assert "3.dat" in skipped[str(src / "3")] and "4.dat" in skipped[str(src / "4")]
    with open(tmp_path / "out" / "skipped.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["record", "reason"] and {r[0] for r in rows[1:]} == set(skipped)


def test_label_table_targets_and_unmatched_records(ludb_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in (1, 2, 3):
        for ext in ("hea", "dat"):
            shutil.copy(ludb_data / "data" / f"{i}.{ext}", src / f"{i}.{ext}")
    table = tmp_path / "labels.csv"
    table.write_text("record,patient,potassium,dx\n1,p1,4.1,AF;LVH\n2,p1,,LVH\n")
    summary = convert(
        src,
        tmp_path / "out",
        labels=table,
        patient_column="patient",
        multilabel={"dx": ["dx"]},
        regression={"potassium": ["potassium"]},
        units={"potassium": "mmol/L"},
        progress=False,
    )
    assert summary.records_read == 2
    assert summary.skipped == [(str(src / "3"), f"{src / '3'}: no row in label table")]
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.targets["dx"].names == ["AF", "LVH"]
    assert manifest.targets["potassium"].units == "mmol/L"
    with h5py.File(tmp_path / "out" / manifest.shards[0]["path"]) as f:
        assert list(f["patient_id"].asstr()[:]) == ["p1", "p1"]
        np.testing.assert_array_equal(f["targets/dx"][:], [[1, 1], [0, 1]])
        k = f["targets/potassium"][:, 0]
        assert k[0] == pytest.approx(4.1) and np.isnan(k[1])  # missing stays missing (NaN), never imputed
        assert list(f["targets/potassium"].attrs["names"]) == ["potassium"]


def test_label_table_with_unknown_column_names_it(ludb_data, tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("record,dx\n1,AF\n")
    with pytest.raises(KeyError, match=r"no column\(s\) \['diagnosis'\]"):
        convert(ludb_data / "data", tmp_path / "o", labels=table, multilabel={"d": ["diagnosis"]})


def test_verify_reports_truncated_shard(test_data, tmp_path, capsys):
    out = tmp_path / "out"
    convert(test_data / "cinc2021", out, reader="challenge", records_per_shard=8, progress=False)
    manifest = Manifest.load(out)
    assert [s["n_segments"] for s in manifest.shards] == [8, 8, 4]
    assert main(["shard", "verify", str(out)]) == 0
    victim = out / manifest.shards[1]["path"]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert main(["shard", "verify", str(out)]) == 1
    assert str(victim) in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["n_segments"] == 20


def test_parallel_workers_give_the_same_shards(test_data, tmp_path):
    serial = convert(test_data / "cinc2021", tmp_path / "a", reader="challenge", progress=False)
    parallel = convert(test_data / "cinc2021", tmp_path / "b", reader="challenge", workers=2, progress=False)
    assert (serial.records_read, serial.segments_written) == (parallel.records_read, parallel.segments_written)
    _, a = read_all(tmp_path / "a")
    _, b = read_all(tmp_path / "b")
    np.testing.assert_array_equal(a["signal"], b["signal"])
    assert list(a["record_id"]) == list(b["record_id"])


def test_killed_conversion_resumes_to_the_same_manifest(ludb_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    source = ludb_data
    args = ["--records_per_shard", "2", "--progress", "false"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ecgfm", "shard", "--source", str(source), "--out", str(killed), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(list(killed.glob("shard-*.json"))) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the conversion finished before it could be killed"
    finished = len(list(killed.glob("shard-*.json")))
    assert not [p for p in killed.glob("shard-*.h5") if not p.with_suffix(".json").exists()][1:]  # <= 1 in flight

    resumed = convert(source, killed, records_per_shard=2, progress=False)
    assert resumed.shards_reused >= finished >= 5
    fresh = convert(source, tmp_path / "fresh", records_per_shard=2, progress=False)
    assert fresh.shards_reused == 0
    assert json.loads((killed / "manifest.json").read_text()) == json.loads(
        (tmp_path / "fresh" / "manifest.json").read_text()
    )
    np.testing.assert_array_equal(
        np.load(killed / "patient_keys.npy"), np.load(tmp_path / "fresh" / "patient_keys.npy")
    )
    assert not list(killed.glob("*.tmp"))  # no half-written file is left behind
    assert (
        (resumed.records_read, resumed.segments_written) == (fresh.records_read, fresh.segments_written) == (120, 120)
    )
    _, a = read_all(killed)
    _, b = read_all(tmp_path / "fresh")
    np.testing.assert_array_equal(a["signal"], b["signal"])


def test_each_bad_input_is_named_and_the_rest_converts(ludb_data, tmp_path):
    """A NaN-filled record, a header that lies about its length, a record shorter than 10 s and a record with
    unknown lead names are each reported by file name; a truncated shard is reported by verify and the reader."""
    import wfdb

    src = tmp_path / "src"
    src.mkdir()
    for i in (1, 2):
        for ext in ("hea", "dat"):
            shutil.copy(ludb_data / "data" / f"{i}.{ext}", src / f"{i}.{ext}")
    good = SOURCES.create("wfdb").read(ludb_data / "data" / "1")
    digital = np.rint(good.signal.T * 1000).astype(np.int16)
    names = [n.lower() for n in good.lead_names]

    def write(name, d_signal, sig_name=names):
        wfdb.wrsamp(
            name,
            fs=500,
            units=["mV"] * d_signal.shape[1],
            sig_name=list(sig_name),
            d_signal=d_signal,
            fmt=["16"] * d_signal.shape[1],
            adc_gain=[1000.0] * d_signal.shape[1],
            baseline=[0] * d_signal.shape[1],
            write_dir=str(src),
        )

    write("nanrec", np.full_like(digital, -32768))  # every sample is WFDB's "no sample" code
    write("short", digital[:3000])  # 6 s
    write("oddleads", digital[:, :3], sig_name=["x1", "x2", "x3"])
    write("liar", digital)
    hea = (src / "liar.hea").read_text().splitlines()
    hea[0] = hea[0].replace("5000", "6000")  # the header claims more samples than the file holds
    (src / "liar.hea").write_text("\n".join(hea) + "\n")

    summary = convert(src, tmp_path / "out", progress=False)
    reasons = dict(summary.skipped)
    assert summary.records_read == 2 and set(reasons) == {str(src / n) for n in ("nanrec", "short", "oddleads", "liar")}
    assert "every lead is NaN or flat" in reasons[str(src / "nanrec")] and "nanrec" in reasons[str(src / "nanrec")]
    assert "shorter than 10 s (6.00 s at 500 Hz)" in reasons[str(src / "short")]
    assert "no standard lead among ['x1', 'x2', 'x3']" in reasons[str(src / "oddleads")]
    assert "liar.dat" in reasons[str(src / "liar")] and "truncated" in reasons[str(src / "liar")]

    padded = convert(src, tmp_path / "padded", last_piece="pad", progress=False)  # the short record is kept
    assert str(src / "short") not in dict(padded.skipped)
    assert (str(src / "short"), "last piece padded: 3000 real samples of 5000") in padded.warnings

    shard = tmp_path / "out" / Manifest.load(tmp_path / "out").shards[0]["path"]
    shard.write_bytes(shard.read_bytes()[:-100_000])
    assert any(str(shard) in line for line in verify_shards(tmp_path / "out"))
    from ecgfm.data.dataset import ShardDataset
    from ecgfm.data.shards import ShardError

    with pytest.raises(ShardError, match="shard-00000.h5"):
        dataset = ShardDataset(tmp_path / "out")
        dataset.__getitems__(list(range(len(dataset))))


def test_parquet_table_with_lab_draw_times(ludb_data, tmp_path):
    import pandas as pd

    src = tmp_path / "src"
    src.mkdir()
    for i in (1, 2, 3):
        for ext in ("hea", "dat"):
            shutil.copy(ludb_data / "data" / f"{i}.{ext}", src / f"{i}.{ext}")
    table = pd.DataFrame(
        {"record": ["1", "2", "3"], "patient": ["a", "b", "c"], "k": [4.2, 6.1, 3.1], "hours": [0.5, -3.0, None]}
    )
    table.to_parquet(tmp_path / "labs.parquet")
    convert(
        src,
        tmp_path / "out",
        labels=tmp_path / "labs.parquet",
        patient_column="patient",
        regression={"potassium": ["k"]},
        units={"potassium": "mmol/L"},
        time_column="hours",
        max_hours=1.0,
        progress=False,
    )
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.targets["lab_time"].units == "h"
    with h5py.File(tmp_path / "out" / manifest.shards[0]["path"]) as f:
        k = f["targets/potassium"][:, 0]
        hours = f["targets/lab_time"][:, 0]
    assert k[0] == pytest.approx(4.2)  # drawn 0.5 h after the ECG: kept
    assert np.isnan(k[1]) and np.isnan(k[2])  # 3 h before, or at an unknown time: masked, the ECG is kept
    assert hours[0] == pytest.approx(0.5) and hours[1] == pytest.approx(-3.0) and np.isnan(hours[2])


def test_a_rerun_sweeps_what_a_killed_writer_left_and_keeps_finished_shards(tmp_path):
    import wfdb

    from ecgfm.data.synthetic import synthesize

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i, signal in enumerate(synthesize(2, seed=0)[0]):
        digital = np.rint(signal.T * 1000).astype(np.int16)
        header = dict(fs=500, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), fmt=["16"] * 12)
        wfdb.wrsamp(f"r{i}", d_signal=digital, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(src), **header)
    convert(src, out, records_per_shard=1, progress=False)
    finished = sorted(p.name for p in out.iterdir())
    leftovers = [out / ".partial-0123abcd.tmp", out / "shard-00001.h5.signal.tmp"]  # a temporary file, a spool
    for path in leftovers:
        path.write_bytes(b"half")
    assert convert(src, out, records_per_shard=1, progress=False).shards_reused == 2
    assert sorted(p.name for p in out.iterdir()) == finished
    shards = ["shard-00000.h5", "shard-00000.json", "shard-00001.h5", "shard-00001.json"]
    assert finished == ["manifest.json", "patient_keys.npy", *shards, "skipped.csv", "warnings.csv"]
