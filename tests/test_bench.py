"""`ecgfm bench data` runs end to end and reports every measurement with its same-run baselines."""

import json

import pytest

from ecgfm.commands import main


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


@pytest.mark.slow
def test_bench_metrics_small(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    args = ["bench", "metrics", "--labels", "50", "--samples", "20000", "--baseline_samples", "5000"]
    args += ["--binned_samples", "1000", "--repeats", "1", "--json_out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for text in (
        "peak RSS",
        "metric state",
        "MultilabelAUROC(thresholds=200)",
        "exact state at",
        "AUROC |ours - exact|",
    ):
        assert text in printed, text
    results = json.loads(out.read_text())
    full, small = results["full"], results["small"]
    assert full["table_rows"] == 50 and full["labelled_entries"] > 0.7 * 50 * 20000
    assert full["state_bytes_after"] == small["state_bytes_after"] == 50 * 2 * 1024 * 8
    assert full["peak_kib"] >= full["rss_before_kib"]
    base = results["baselines"]
    assert all(rate > 0 for rate in base["samples_per_s"].values())
    assert base["exact_bytes_per_sample"] >= 50 * 4  # exact AUROC keeps every score
    assert base["auroc_error_ours"]["labels"] >= 40 and base["auroc_error_ours"]["max"] < 0.01
