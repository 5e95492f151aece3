"""`ecgfm bench readers` writes the same recordings in every format, converts each with its reader and finds every
record converted with WFDB's signal, within the format's resolution; the table and the JSON say so."""

from __future__ import annotations

import json

import pytest

from ecgfm.bench.readers import all_formats, run_readers_benchmark
from ecgfm.commands import main

FORMATS = [fmt.name for fmt in all_formats()]


def test_every_reader_converts_every_record_with_the_same_signal(tmp_path, capsys):
    out = tmp_path / "readers.json"
    work = tmp_path / "work"
    args = ["bench", "readers", "--records", "4", "--repeats", "1", "--workdir", str(work), "--json-out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for text in ("records/s per core", "max |Δ| µV vs wfdb", "MB on disk", *FORMATS):
        assert text in printed, text
    assert "within its format's resolution of the WFDB signal: True" in printed

    results = json.loads(out.read_text())
    assert results["records"] == 4 and results["all_same"] is True
    assert FORMATS[0] == "wfdb" and list(results["readers"]) == FORMATS
    assert {"edf", "muse_xml", "aecg_xml", "dicom", "cpsc2018", "challenge", "ptbxl", "arrays"} <= set(FORMATS)
    for name, row in results["readers"].items():
        assert row["records_read"] == row["segments"] == 4 and row["skipped"] == 0, name
        assert row["same_signal"] and 0 <= row["max_abs_diff_uv"] <= row["tolerance_uv"], name
        assert row["records_per_s"] == row["records_per_s_per_core"] == 4 / row["seconds"] > 0, name
        assert row["files"] >= 1 and row["bytes"] > 0, name
    wfdb = results["readers"]["wfdb"]
    assert wfdb["max_abs_diff_uv"] == 0 and wfdb["vs_wfdb"] == 1.0 and wfdb["files"] == 8  # .hea + .dat each
    assert results["readers"]["challenge"]["max_abs_diff_uv"] == 0  # int16 µV, as WFDB: exact
    assert results["readers"]["muse_xml"]["max_abs_diff_uv"] > 0  # 4.88 µV per bit: not exact, but within it
    assert sorted(p.name for p in (work / "dicom").iterdir()) == [f"rec{i:06d}.dcm" for i in range(4)]


def test_formats_pick_rows_and_wfdb_always_runs(tmp_path):
    results = run_readers_benchmark(records=2, repeats=1, formats=["edf"], workdir=str(tmp_path))
    assert list(results["readers"]) == ["wfdb", "edf"] and results["all_same"]
    with pytest.raises(ValueError, match=r"unknown format\(s\) \['mp3'\]; known: wfdb, challenge"):
        run_readers_benchmark(records=2, formats=["mp3"], workdir=str(tmp_path / "other"))
