"""Published models: save_pretrained / ecgfm.load / ecgfm publish round trips, no pickle on load, checksums, decision
rules that give what a window's post-processing gives, and the Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

import ecgfm
from ecgfm.commands import main
from ecgfm.decisions import apply_decisions
from ecgfm.pretrained import CONFIG_NAME, WEIGHTS_NAME, ECGModel, read_config
from ecgfm.tasks import FineTuneTask

HEADS = [
    {"kind": "multilabel", "name": "dx", "labels": ["AF", "SR", "LBBB"]},
    {"kind": "potassium", "labels": ["potassium"]},
    {"kind": "ordinal", "name": "triage", "labels": ["normal", "not acute", "subacute", "acute"]},
    {"kind": "multiclass", "name": "electrolyte", "labels": ["hypo", "normal", "hyper"]},
    {"kind": "binary", "name": "arrest", "labels": ["arrest"]},
]


def _task(**kwargs) -> FineTuneTask:
    torch.manual_seed(0)
    task = FineTuneTask(backbone="net1d-tiny", heads=kwargs.pop("heads", HEADS), **kwargs)
    # thresholds as validation would have calibrated them: not the defaults
    task.heads["dx"].decision_logit.copy_(torch.tensor([-0.3, 0.2, 1.5]))
    task.heads["arrest"].threshold.fill_(0.7)
    with torch.no_grad():
        task.heads["potassium"].mean.fill_(4.6)
        task.heads["potassium"].std.fill_(0.8)
    return task.eval()


def _signal(n: int = 3, leads: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, leads, 5000, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_save_pretrained_writes_the_four_files_and_loads_back_identically(tmp_path):
    task = _task()
    task.save_pretrained(tmp_path / "m", card={"name": "tiny", "licence": "MIT", "training_data": "synthetic"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "card.md",
        "config.yaml",
        "labels.json",
        "model.safetensors",
    ]
    model = ecgfm.load(tmp_path / "m")
    x = _signal()
    with torch.no_grad():
        expected, got = task(x), model(x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    config = read_config(tmp_path / "m")
    assert config["contract"]["input"]["preprocessing"]["name"] == "ecgfounder"
    assert config["contract"]["input"]["preprocessing"]["band_hz"] == [0.67, 40.0]
    assert config["outputs"]["potassium_mmol_l"] == {
        "head": "potassium",
        "key": "potassium_mmol_l",
        "type": "score",
    } | {"unit": "mmol/L"}
    labels = json.loads((tmp_path / "m" / "labels.json").read_text())
    assert labels["dx"]["labels"] == ["AF", "SR", "LBBB"] and labels["potassium"]["units"] == ["mmol/L"]
    card = (tmp_path / "m" / "card.md").read_text()
    for text in ("500 Hz", "I, II, III, aVR", "`ecgfounder`", "potassium_mmol_l > 5.5", "synthetic", "MIT"):
        assert text in card


def test_loading_never_unpickles(tmp_path, monkeypatch):
    _task().save_pretrained(tmp_path / "m")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called to load a published model")

    monkeypatch.setattr(torch, "load", refuse)
    model = ECGModel.from_pretrained(tmp_path / "m")
    assert set(model.heads) == {"dx", "potassium", "triage", "electrolyte", "arrest"}
    # the weights file is plain safetensors: readable by any safetensors reader
    tensors = safetensors.torch.load_file(str(tmp_path / "m" / WEIGHTS_NAME))
    assert "heads.dx.decision_logit" in tensors


def test_calibrated_thresholds_and_statistics_travel_with_the_model(tmp_path):
    _task().save_pretrained(tmp_path / "m")
    model = ecgfm.load(tmp_path / "m")
    assert torch.equal(model.heads["dx"].decision_logit, torch.tensor([-0.3, 0.2, 1.5]))
    assert float(model.heads["arrest"].threshold) == pytest.approx(0.7)
    assert float(model.heads["potassium"].mean) == pytest.approx(4.6)


def test_decision_rules_decide_as_the_heads_post_processing_does():
    """The rules a record's aggregated outputs are decided by give, on one window, what postprocess gives."""
    model = ECGModel.from_task(_task())
    x = _signal(16, seed=3)
    with torch.no_grad():
        predicted = {k: v.numpy() for k, v in model.predict(x).items()}
    scores = {name: predicted[name] for name in model.score_names()}
    decided = apply_decisions(scores, model.decision_rules())
    assert set(decided) == set(predicted) - set(scores)
    for name, values in decided.items():
        np.testing.assert_array_equal(values, predicted[name], err_msg=name)
    assert {"AF", "SR", "LBBB", "hyperkalemia", "level", "class", "arrest"} <= set(decided)


def test_a_tampered_weights_file_is_refused_naming_it(tmp_path):
    _task().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match=f"{weights}.*wrong sha256"):
        ecgfm.load(tmp_path / "m")


def test_a_config_from_a_newer_format_or_another_tool_is_refused(tmp_path):
    _task().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / CONFIG_NAME
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99.*upgrade ecgfm"):
        ecgfm.load(tmp_path / "m")
    path.write_text("format: something-else\n")
    with pytest.raises(ValueError, match="not an ecgfm model config"):
        ecgfm.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        ecgfm.load(tmp_path / "no-such-folder")


def test_a_wrong_input_shape_names_the_contract():
    model = ECGModel.from_task(_task(leads=["I"], adapter="zero_fill"))
    with pytest.raises(ValueError, match=r"reads \[batch, 1 leads \(I\), 5000 samples at 500 Hz\]"):
        model.predict(_signal(1, leads=12))


def _checkpoint(tmp_path) -> str:
    task = FineTuneTask(backbone="net1d-tiny", heads=[{"kind": "multilabel", "name": "dx", "labels": ["AF", "SR"]}])
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "signal": torch.randint(-900, 900, (4, 12, 5000), generator=g, dtype=torch.int16),
            "lead_mask": torch.ones(4, 12, dtype=torch.bool),
            "targets": {"dx": torch.randint(0, 2, (4, 2), generator=g).float()},
            "target_masks": {"dx": torch.ones(4, 2, dtype=torch.bool)},
        }
        for _ in range(2)
    ]
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_ecgfm_publish_writes_a_folder_with_card_metrics_and_hub_readme(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,test/segment/dx/auroc,test/segment/dx/auroc/AF,val/loss\n0,2,0.81,0.77,\n")
    out = tmp_path / "published"
    code = main(
        [
            "publish",
            ckpt,
            str(out),
            "--name",
            "tiny-dx",
            "--metrics",
            str(metrics),
            "--metrics-data",
            "20 synthetic records",
            "--licence",
            "MIT",
            "--lead-subsets",
            "limb",
            "I,II",
            "--hub",
            "someone/tiny-dx",
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = read_config(out)
    assert config["name"] == "tiny-dx"
    assert config["card"]["metrics"] == [
        {"data": "20 synthetic records", "split": "test", "metric": "segment/dx/auroc", "value": 0.81},
        {"data": "20 synthetic records", "split": "test", "metric": "segment/dx/auroc/AF", "value": 0.77},
    ]
    assert config["card"]["lead_subsets"] == [["I", "II", "III", "aVR", "aVL", "aVF"], ["I", "II"]]
    assert "model.ckpt (sha256 " in config["card"]["source_checkpoint"]
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: ecgfm\nlicense: mit\n")
    assert 'ecgfm.load("hf://someone/tiny-dx")' in readme
    # the published model is the checkpoint's model
    task = FineTuneTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    x = _signal(2)
    with torch.no_grad():
        torch.testing.assert_close(ecgfm.load(out)(x)["dx"], task(x)["dx"], rtol=0, atol=0)
    assert ecgfm.load(ckpt).output_names() == ["p_AF", "AF", "p_SR", "SR"]


def test_a_report_metrics_json_puts_record_level_values_with_intervals_on_the_card(tmp_path):
    from ecgfm.card import render_card
    from ecgfm.publish import metrics_from_file

    interval = {"estimate": 0.91, "low": 0.87, "high": 0.95, "level": 0.95, "method": "stratified patient bootstrap"}
    report = {
        "format": "ecgfm-report",
        "version": 1,
        "metrics": {
            "test/record/dx/auroc": interval,
            "test/record/dx/n_positive/AF": {"estimate": 12},  # a count: no interval
            "test/record/dx/auroc/SR": {"estimate": float("nan"), "low": None, "high": None},  # not scorable
            "val/record/dx/auroc": interval,  # another split
        },
    }
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(report))
    rows = metrics_from_file(path, data="LUDB, 24 held-out patients")
    assert rows == [
        {"data": "LUDB, 24 held-out patients", "split": "test", "metric": "record/dx/auroc", "value": 0.91,
         "low": 0.87, "high": 0.95, "level": 0.95, "method": "stratified patient bootstrap"},
        {"data": "LUDB, 24 held-out patients", "split": "test", "metric": "record/dx/n_positive/AF", "value": 12.0},
    ]  # fmt: skip
    shipped = Path(__file__).parents[1] / "checkpoints" / "ludb-diagnoses-net1d-small"
    config = {**read_config(shipped), "card": {"metrics": rows}}
    card = render_card(config, json.loads((shipped / "labels.json").read_text()))
    assert "| test | record/dx/auroc | 0.91 | 95% 0.87–0.95 |" in card
    assert "| test | record/dx/n_positive/AF | 12 |  |" in card and "Intervals: stratified patient bootstrap." in card


def test_publish_upload_goes_through_huggingface_hub(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return "https://huggingface.co/someone/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    ckpt = _checkpoint(tmp_path)
    assert main(["publish", ckpt, str(tmp_path / "p"), "--hub", "someone/tiny", "--upload"]) == 0
    assert calls[0] == ("create_repo", "someone/tiny")
    assert calls[1][2] == ["README.md", "card.md", "config.yaml", "labels.json", "model.safetensors"]
    assert main(["publish", ckpt, str(tmp_path / "q"), "--upload"]) == 1
    assert "--upload needs --hub" in capsys.readouterr().err


def test_hf_address_is_read_from_the_hub_cache_and_refused_without_downloads(tmp_path, monkeypatch):
    """``ecgfm.load("hf://owner/repo")`` finds a snapshot in a hub cache laid out as huggingface_hub lays it out."""
    _task().save_pretrained(tmp_path / "m")
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in (tmp_path / "m").iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    model = ecgfm.load("hf://someone/tiny")
    assert set(model.heads) == {"dx", "potassium", "triage", "electrolyte", "arrest"}
    assert ecgfm.load(f"hf://someone/tiny@{commit}").name == model.name
    with pytest.raises(
        FileNotFoundError, match="hf://someone/other is not in the Hugging Face hub cache.*downloads are off"
    ):
        ecgfm.load("hf://someone/other")
