"""`ecgfm bench train` runs both paths on the same model and data and reports every number it promises."""

import json
import math

import pytest
import torch

from ecgfm.bench.train import _breakdown, gpu_peak_tflops
from ecgfm.commands import main
from ecgfm.commands.bench import _underscored

TINY = ["bench", "train", "--backbones", "[net1d-tiny]", "--batch", "4", "--steps", "2", "--warmup", "1"]


def test_bench_train_tiny(tmp_path, capsys):
    out = tmp_path / "train.json"
    args = [*TINY, "--repeats", "1", "--device", "cpu", "--precisions", "[32-true, bf16-mixed]"]
    assert main([*args, "--torch-compile", "[false, true]", "--json_out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ecgfm / plain" in printed and "where a step's time goes" in printed
    results = json.loads(out.read_text())
    assert "GPU-only" in printed and "asked for: bf16-mixed, torch.compile" in results["skipped"][0]  # and said so
    assert results["device"] == "cpu"
    (row,) = results["rows"]  # the GPU-only configurations were not run
    assert (row["backbone"], row["precision"], row["compile"]) == ("net1d-tiny", "32-true", False)
    paths = [row["ecgfm"], row["plain"], row["bare_lightning"]]
    for path in paths:
        assert path["global_step"] == 3 and len(path["losses"]) == 3  # warm-up + timed steps, on every path
        assert path["samples_per_s"] > 0 and path["peak_rss_mib"] > 0 and 0 <= path["data_wait_fraction"] < 1
    assert row["ecgfm"]["trainable_parameters"] == row["plain"]["trainable_parameters"] > 0
    assert row["losses_finite"] and row["max_loss_difference"] < 1e-4  # the same model on the same batches
    assert row["ratio"] > 0 and row["flops_per_sample"] > 0 and row["ecgfm"]["mfu"] is None  # no MFU on a CPU
    phases = row["breakdown"]["ms_per_step"]
    for phase in ("next batch (loader)", "training step (forward + loss)", "  self.log", "total"):
        assert phase in phases
    assert phases["  self.log"]["ecgfm"] > 0 and phases["  self.log"]["plain"] == 0.0


def test_dashed_options_and_peaks():
    assert _underscored(["--peak-tflops", "989", "--json_out=x.json", "--torch-compile=[true]"]) == [
        "--peak_tflops",
        "989",
        "--json_out=x.json",
        "--torch_compile=[true]",
    ]
    assert gpu_peak_tflops(torch.device("cpu"), "32-true", None) == (None, "cpu")
    assert gpu_peak_tflops(torch.device("cpu"), "bf16-mixed", 100.0) == (100.0, "--peak_tflops")


def test_breakdown_adds_up():
    ecgfm = {
        "ms_per_step": 10.0,
        "actions_ms_per_step": {
            "[_TrainingEpochLoop].train_dataloader_next": 1.0,
            "[Strategy]SingleDeviceStrategy.batch_to_device": 0.5,
            "run_training_batch": 7.0,
            "[Strategy]SingleDeviceStrategy.training_step": 4.0,
            "[ecgfm]FineTuneTask.forward": 3.0,
            "[ecgfm]FineTuneTask.log": 0.4,
            "[ecgfm]PotassiumHead.update_metrics": 0.3,
            "[Strategy]SingleDeviceStrategy.backward": 2.0,
            "[LightningModule]FineTuneTask.optimizer_zero_grad": 0.1,
            "[Callback]RichProgressBar.on_train_batch_end": 0.2,
        },
    }
    plain = {"ms_per_step": 8.0, "actions_ms_per_step": {"forward_loss": 3.2, "backward": 2.0, "optimizer": 0.9}}
    phases = _breakdown(ecgfm, plain)["ms_per_step"]
    assert math.isclose(phases["optimizer step"]["ecgfm"], 7.0 - 4.0 - 2.1)
    assert math.isclose(phases["  loss, targets, rest of _step"]["ecgfm"], 4.0 - 3.0 - 0.4 - 0.3)
    for path, total in (("ecgfm", 10.0), ("plain", 8.0)):
        top = sum(v[path] for k, v in phases.items() if not k.startswith(" ") and k != "total")
        assert math.isclose(top, total) and phases["total"][path] == total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_train_gpu(tmp_path):
    out = tmp_path / "train.json"
    args = [*TINY, "--repeats", "1", "--device", "cuda", "--peak-tflops", "100", "--json_out", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["precision"], r["compile"]) for r in rows} == {
        (p, c) for p in ("32-true", "bf16-mixed") for c in (False, True)
    }
    for row in rows:
        assert row["losses_finite"] and row["ecgfm"]["global_step"] == row["plain"]["global_step"] == 3
        assert 0 < row["ecgfm"]["mfu"] < 1 and 0 <= row["ecgfm"]["gpu_gap_fraction"] <= 1
        assert row["ecgfm"]["cuda_max_allocated_mib"] > 0


def test_bench_train_help(capsys):
    assert main(["bench", "train", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "usage: ecgfm bench train" in printed and "--peak_tflops" in printed and "--torch_compile" in printed
