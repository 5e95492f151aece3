"""Temperature scaling fitted on the validation split and stored with the model: on the bundled LUDB shards and the
zoo's ludb-diagnoses-net1d-small, T lowers the validation NLL, travels in the published folder (weights, config,
card), changes probabilities but not decisions or AUROC, and ``ecgfm report --fit-temperature`` shows ECE and Brier
score at T = 1 and at T."""

from __future__ import annotations

import json
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

import ecgfm
from ecgfm.commands import main
from ecgfm.data.dataset import ShardDataset
from ecgfm.decisions import apply_decisions
from ecgfm.evaluation.calibration import temperature_nll
from ecgfm.evaluation.temperature import calibrate_model, calibrate_on_shards, head_targets, validation_logits
from ecgfm.pretrained import read_config
from ecgfm.signal import to_millivolts

ZOO = "ludb-diagnoses-net1d-small"
#: The quickstart's patient split (recipes/quickstart/net1d-small.yaml), which trained the zoo model: 76 / 20 / 24.
SPLIT = {"val_fraction": 0.2, "test_fraction": 0.25, "split_seed": 0}


@pytest.fixture(scope="module")
def validation(ludb_shards):
    """The zoo model's raw validation logits and the head-aligned diagnoses (NaN = missing)."""
    model = ecgfm.load(ZOO)
    segments = validation_logits(model, ludb_shards, SPLIT)
    names = ShardDataset(ludb_shards).manifest.targets["diagnoses"].names
    return segments, head_targets(model.heads["diagnoses"], segments.targets, names)


@pytest.fixture(scope="module")
def calibrated(ludb_shards, tmp_path_factory):
    """The zoo model calibrated on the validation split and published; (folder, card's calibration entry)."""
    model = ecgfm.load(ZOO)
    info = calibrate_on_shards(model, ludb_shards, SPLIT, "the quickstart recipe")
    folder = model.save_pretrained(tmp_path_factory.mktemp("calibrated") / "model")
    return folder, info


def _signals(root: Path, n: int = 12) -> torch.Tensor:
    batch = ShardDataset(root).__getitems__(list(range(n)))
    return to_millivolts(batch["signal"])


def test_the_fitted_temperature_lowers_validation_nll(validation, calibrated):
    segments, y = validation
    logits = segments.logits["diagnoses"]
    assert logits.shape == (20, 8) and len(segments) == 20  # the 20 validation patients, one segment each
    entry = calibrated[1]["heads"]["diagnoses"]
    t = entry["temperature"]
    assert t != pytest.approx(1.0, abs=0.05)
    before, after = temperature_nll(logits, y, "multilabel", 1.0), temperature_nll(logits, y, "multilabel", t)
    assert after < before
    assert entry["nll_uncalibrated"] == pytest.approx(before)
    assert entry["nll_temperature_scaled"] == pytest.approx(after)
    assert entry["n_segments"] == 20 and entry["n_labelled"] == int(np.isfinite(y).sum())
    # the library call on the same logits gives the same T and sets it
    model = ecgfm.load(ZOO)
    assert calibrate_model(model, {"diagnoses": logits}, {"diagnoses": y}) == {"diagnoses": pytest.approx(t)}
    assert float(model.heads["diagnoses"].temperature) == pytest.approx(t)


def test_missing_labels_are_left_out_of_the_fit(validation):
    segments, y = validation
    logits = segments.logits["diagnoses"]
    masked = y.copy()
    masked[:5, :] = np.nan  # five segments with no labels: the same fit as without them
    model = ecgfm.load(ZOO)
    with_nan = calibrate_model(model, {"diagnoses": logits}, {"diagnoses": masked})["diagnoses"]
    without = calibrate_model(model, {"diagnoses": logits[5:]}, {"diagnoses": y[5:]})["diagnoses"]
    assert with_nan == pytest.approx(without, rel=1e-6)


def test_the_published_folder_reloads_with_its_temperature(calibrated, ludb_shards):
    folder, info = calibrated
    t = info["heads"]["diagnoses"]["temperature"]
    model, plain = ecgfm.load(folder), ecgfm.load(ZOO)
    assert float(model.heads["diagnoses"].temperature) == pytest.approx(t)
    config = read_config(folder)
    assert config["temperatures"] == {"diagnoses": pytest.approx(t)}
    assert config["card"]["calibration"]["heads"]["diagnoses"]["temperature"] == pytest.approx(t)
    card = (folder / "card.md").read_text()
    assert "## Calibration" in card and f"| diagnoses | {t:.4g} | 20 |" in card
    assert "validation split" in card and "20 segments of 20 patients" in card
    x = _signals(ludb_shards)
    with torch.no_grad():
        logits = model(x)["diagnoses"]
        torch.testing.assert_close(logits, plain(x)["diagnoses"], rtol=0, atol=0)  # the weights are the zoo's
        got, before = model.predict(x), plain.predict(x)
    labels = model.heads["diagnoses"].labels
    for i, label in enumerate(labels):
        torch.testing.assert_close(got[f"p_{label}"], torch.sigmoid(logits[:, i] / t), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[label], before[label], rtol=0, atol=0)  # thresholds are on logits
    # the decision rules (as probabilities after T) decide as post-processing does
    scores = {name: got[name].numpy() for name in model.score_names()}
    for name, values in apply_decisions(scores, model.decision_rules()).items():
        np.testing.assert_array_equal(values, got[name].numpy(), err_msg=name)


def _checkpoint(tmp_path: Path, shards: Path) -> Path:
    """The zoo model as a FineTuneTask checkpoint that records the quickstart's data settings."""
    model = ecgfm.load(ZOO)
    checkpoint = {
        "state_dict": model.state_dict(),
        "pytorch-lightning_version": lightning.__version__,
        "global_step": 0,
        "ecgfm": {"version": 2, **model.contract()},
        "datamodule_hyper_parameters": {"root": str(shards), **SPLIT},
    }
    path = tmp_path / "best.ckpt"
    torch.save(checkpoint, path)
    return path


def test_ecgfm_publish_calibrate_on_fits_on_the_checkpoints_validation_split(calibrated, ludb_shards, tmp_path, capsys):
    out = tmp_path / "published"
    code = main(["publish", str(_checkpoint(tmp_path, ludb_shards)), str(out), "--calibrate-on", str(ludb_shards)])
    printed = capsys.readouterr().out
    assert code == 0
    t = calibrated[1]["heads"]["diagnoses"]["temperature"]
    assert f"temperature of diagnoses: {t:.4g}" in printed
    config = read_config(out)
    assert config["temperatures"] == {"diagnoses": pytest.approx(t)}
    calibration = config["card"]["calibration"]
    assert calibration["split"] == "val" and calibration["n_segments"] == 20
    assert calibration["split_settings"] == {**SPLIT, "split_file": None}
    assert "best.ckpt" in calibration["split_from"]
    assert float(ecgfm.load(out).heads["diagnoses"].temperature) == pytest.approx(t)


def _report(model: str | Path, shards: Path, out: Path, *extra: str) -> dict:
    split = ["--val-fraction", "0.2", "--test-fraction", "0.25", "--split-seed", "0"]
    common = ["--n-resamples", "200", "--saliency", "0", "--min-positives", "5", "--no-progress"]
    code = main(["report", "--model", str(model), "--data", str(shards), "--out", str(out), *split, *common, *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_report_fit_temperature_shows_ece_and_brier_before_and_after(calibrated, ludb_shards, tmp_path, capsys):
    t = calibrated[1]["heads"]["diagnoses"]["temperature"]
    results = _report(ZOO, ludb_shards, tmp_path / "fitted", "--fit-temperature")
    head = results["heads"]["diagnoses"]
    assert head["temperature"]["compared"] == pytest.approx(t)  # per-segment logits of the same validation split
    assert head["temperature"]["source"].startswith("fitted on the validation split (20 segments")
    metrics = results["metrics"]
    for entry in head["labels"]:
        label = entry["label"]
        for key in ("ece_uncalibrated", "ece_temperature_scaled", "brier_uncalibrated", "brier_temperature_scaled"):
            assert f"test/record/diagnoses/{key}/{label}" in metrics
        # T = 1 is the model as it is: the report's own ECE
        assert metrics[f"test/record/diagnoses/ece_uncalibrated/{label}"]["estimate"] == pytest.approx(
            metrics[f"test/record/diagnoses/ece/{label}"]["estimate"]
        )
    assert metrics["test/record/diagnoses/temperature"]["estimate"] == pytest.approx(t)
    page = (tmp_path / "fitted" / "report.md").read_text()
    assert "Calibration before and after temperature scaling" in page and f"ECE at T = {t:.3g}" in page
    assert f"diagnoses: temperature {t:.4g} fitted on the validation split" in capsys.readouterr().out


def test_a_stored_temperature_is_reported_and_leaves_auroc_unchanged(calibrated, ludb_shards, tmp_path):
    folder, info = calibrated
    t = info["heads"]["diagnoses"]["temperature"]
    scaled = _report(folder, ludb_shards, tmp_path / "scaled", "--unit", "segment")
    plain = _report(ZOO, ludb_shards, tmp_path / "plain", "--unit", "segment")
    assert "temperature" not in plain["heads"]["diagnoses"]  # T = 1 and nothing fitted: nothing to compare
    assert scaled["heads"]["diagnoses"]["temperature"]["source"] == f"stored with the model (T = {t:.4g})"
    aurocs = {key: value["estimate"] for key, value in plain["metrics"].items() if "/auroc" in key}
    assert aurocs and all(
        scaled["metrics"][key]["estimate"] == pytest.approx(value, abs=1e-12) for key, value in aurocs.items()
    )
    # the model's own (scaled) probabilities are the comparison's temperature_scaled ones
    label = scaled["heads"]["diagnoses"]["labels"][0]["label"]
    assert scaled["metrics"][f"test/segment/diagnoses/ece/{label}"]["estimate"] == pytest.approx(
        scaled["metrics"][f"test/segment/diagnoses/ece_temperature_scaled/{label}"]["estimate"]
    )
