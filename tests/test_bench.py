"""`ecgfm bench data` runs end to end and reports every measurement with its same-run baselines."""

import json

import pytest

from ecgfm.cli import main


@pytest.mark.slow
def test_bench_data_small(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "data", "--segments", "96", "--wfdb_records", "40", "--index_segments", "200000"]
    args += ["--index_shards", "100", "--workers", "[0, 1]", "--epochs", "1", "--repeats", "1", "--json_out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "raw sequential read" in printed and "wfdb.rdsamp" in printed
    results = json.loads(out.read_text())
    for key in (
        "raw_read_segments_per_s",
        "loader_0_workers_segments_per_s",
        "loader_1_workers_segments_per_s",
        "wfdb_rdsamp_segments_per_s",
        "convert_records_per_s_1_process",
    ):
        assert results[key] > 0, key
    assert results["index"]["segments"] == 200000 and results["index"]["index_mib"] < 300
    assert results["loader_0_workers_vs_wfdb"] > 1  # reading shards beats one WFDB file per sample
