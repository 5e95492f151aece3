"""FineTuneTask and the `ecgfm` CLI: recipes run, checkpoints reload with their heads, linear probes stay frozen."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgfm.commands import main
from ecgfm.commands.lightning import run_lightning
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.heads import MultiLabelHead, RegressionHead
from ecgfm.tasks import FineTuneTask

QUICKSTART_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart" / "net1d-small.yaml"


def recipe_args(shards, tmp_path, *extra):
    return [
        "--config",
        str(QUICKSTART_RECIPE),
        f"--data.root={shards}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def test_fit_quickstart_recipe_fast_dev_run(ludb_shards, tmp_path):
    """A fast_dev_run checks a recipe and writes nothing (docs/recipes.md): no last.ckpt a later fit would resume
    from, no one-batch tables over a real run's, no logs."""
    assert main(["fit", *recipe_args(ludb_shards, tmp_path, "--trainer.fast_dev_run=true")]) == 0
    assert main(["test", *recipe_args(ludb_shards, tmp_path, "--trainer.fast_dev_run=true")]) == 0
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_fit_test_predict_and_reload(ludb_shards, tmp_path):
    args = recipe_args(
        ludb_shards,
        tmp_path,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--model.backbone=net1d-tiny",
    )
    cli = run_lightning(["fit", *args])
    metrics = cli.trainer.callback_metrics
    for key in (
        "train/loss",
        "val/loss",
        "val/segment/diagnoses/auroc",
        "val/segment/diagnoses/auprc",
        "val/segment/diagnoses/loss",
    ):
        assert key in metrics, key
    assert "val/segment/diagnoses/auroc/Sinus rhythm" in metrics
    ckpt = cli.trainer.checkpoint_callback.last_model_path

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["ecgfm"]["input"]["preprocessing"]["name"] == "ecgfounder"  # the chain travels with the weights
    assert checkpoint["ecgfm"]["heads"]["diagnoses"]["labels"][0] == "Sinus rhythm"

    # a checkpoint rebuilds its heads and gives the same outputs outside the trainer
    model = FineTuneTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert model.heads["diagnoses"].labels == cli.model.heads["diagnoses"].labels
    x = torch.randint(-500, 500, (2, 12, 5000), dtype=torch.int16)
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["diagnoses"], cli.model.cpu()(x)["diagnoses"])

    test_cli = run_lightning(["test", *args, f"--ckpt_path={ckpt}"])
    assert 0.0 <= float(test_cli.trainer.callback_metrics["test/segment/diagnoses/auroc"]) <= 1.0

    predict_cli = run_lightning(["predict", *args, f"--ckpt_path={ckpt}"])
    writer = next(c for c in predict_cli.trainer.callbacks if type(c).__name__ == "PredictionCSVWriter")
    with open(writer.path) as f:
        rows = list(csv.DictReader(f))
    n_test = len(predict_cli.datamodule.datasets["test"])
    assert len(rows) == n_test
    p = float(rows[0]["diagnoses/p_Sinus rhythm"])
    assert 0.0 <= p <= 1.0 and rows[0]["record_id"]


def test_linear_probe_freezes_backbone(ludb_shards, tmp_path):
    datamodule = ShardDataModule(str(ludb_shards), batch_size=4)
    head = MultiLabelHead(name="dx", target="diagnoses", labels=["Sinus rhythm", "Atrial fibrillation"])
    task = FineTuneTask(backbone="net1d-tiny", heads=[head], finetune="linear_probe", lr=0.05, scheduler="none")
    import lightning as L

    before = {k: v.clone() for k, v in task.backbone.state_dict().items()}
    head_before = task.heads["dx"].classifier[1].weight.clone()
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=datamodule)
    for key, value in task.backbone.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert not torch.equal(task.heads["dx"].classifier[1].weight, head_before)


def test_heads_need_a_known_target(ludb_shards, tmp_path):
    import lightning as L

    task = FineTuneTask(backbone="net1d-tiny", heads=[RegressionHead(name="k", target="potassium")])
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(KeyError, match=r"target 'potassium', which the data does not have.*diagnoses"):
        trainer.fit(task, datamodule=ShardDataModule(str(ludb_shards), batch_size=4))
    bad = FineTuneTask(backbone="net1d-tiny", heads=[MultiLabelHead(name="d", target="diagnoses", labels=["Nope"])])
    with pytest.raises(KeyError, match=r"labels \['Nope'\] are not in target 'diagnoses'"):
        L.Trainer(fast_dev_run=True, logger=False, default_root_dir=tmp_path).fit(
            bad, datamodule=ShardDataModule(str(ludb_shards), batch_size=4)
        )


def test_missing_labels_do_not_move_the_loss():
    task = FineTuneTask(
        backbone="net1d-tiny",
        heads=[MultiLabelHead(name="d", labels=["a", "b"]), RegressionHead(name="k", labels=["k"], target_mean=4.0)],
        preprocessing="none",
    )
    task._label_columns = {"d": None, "k": None}
    task._build_metrics()
    signal = torch.randn(4, 12, 5000)
    batch = {
        "signal": signal,
        "lead_mask": torch.ones(4, 12, dtype=torch.bool),
        "targets": {"d": torch.tensor([[1.0, 0], [0, 1], [0, 0], [1, 1]]), "k": torch.tensor([[4.5], [0], [3.0], [0]])},
        "target_masks": {
            "d": torch.ones(4, 2, dtype=torch.bool),
            "k": torch.tensor([[True], [False], [True], [False]]),
        },
    }
    outputs = task(signal, batch["lead_mask"])
    loss_k = task.heads["k"].loss(outputs["k"], batch["targets"]["k"], batch["target_masks"]["k"])
    changed = {k: dict(v) for k, v in batch.items() if isinstance(v, dict)}
    changed["targets"]["k"] = torch.tensor([[4.5], [99.0], [3.0], [-99.0]])  # values under the mask are ignored
    loss_k2 = task.heads["k"].loss(outputs["k"], changed["targets"]["k"], batch["target_masks"]["k"])
    torch.testing.assert_close(loss_k, loss_k2)
    expected = ((outputs["k"][[0, 2], 0] - (torch.tensor([4.5, 3.0]) - 4.0)) ** 2).mean()
    torch.testing.assert_close(loss_k, expected)


def test_hparams_round_trip_through_plain_dicts():
    head = MultiLabelHead(name="d", labels=["a"], pos_weight=[2.0])
    task = FineTuneTask(backbone="net1d-tiny", heads=[head])
    config = task.hparams["heads"][0]
    assert config["kind"] == "multilabel" and config["pos_weight"] == [2.0]  # by registry name, every argument
    again = FineTuneTask(**{**task.hparams, "heads": [config]})
    assert again.heads["d"].pos_weight.tolist() == [2.0]
    assert np.isclose(again.hparams["lr"], task.hparams["lr"])


def test_wandb_offline_logging_without_an_account(ludb_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb_recipe = QUICKSTART_RECIPE.parents[1] / "_base" / "wandb.yaml"
    args = recipe_args(ludb_shards, tmp_path, "--config", str(wandb_recipe))
    args += [
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
    ]
    args += ["--model.backbone=net1d-tiny"]
    cli = run_lightning(["fit", *args])
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    cli.trainer.logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))


def test_quickstart_recipe_fine_tunes_from_an_ecgfounder_checkpoint(ludb_shards, tmp_path):
    """`ecgfm quickstart --pretrained 12_lead_ECGFounder.pth` runs the same recipe from ECGFounder's weights."""
    import numpy as np

    from ecgfm.backbones import create_backbone
    from ecgfm.commands.quickstart import recipe_overrides

    source = create_backbone("ecgfounder-12lead")
    weights = tmp_path / "12_lead_ECGFounder.pth"
    torch.save({"state_dict": source.state_dict(), "val_auroc": np.float64(0.9)}, weights)
    args = recipe_overrides(QUICKSTART_RECIPE, ludb_shards, tmp_path, pretrained=str(weights))
    cli = run_lightning(["validate", *args, "--trainer.limit_val_batches=1", "--data.batch_size=2"])
    loaded = cli.model.backbone.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("dense."):
            torch.testing.assert_close(loaded[key], value)
    assert cli.model.heads["diagnoses"].classifier[1].in_features == 1024


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code = main(["fit", "--config", str(QUICKSTART_RECIPE), f"--data.root={tmp_path}", "--trainer.fast_dev_run=true"])
    assert code == 1
    assert f"ecgfm: error: no manifest.json at {tmp_path}" in capsys.readouterr().err
    assert main(["nonsense"]) == 2


def test_predict_every_segment_of_an_unsplit_folder(test_data, tmp_path):
    """New recordings (one patient here, never split) are scored with --data.predict_split all."""
    from ecgfm.data.convert import convert

    convert(test_data / "ptbdb-s0010", tmp_path / "new", progress=False)
    head = MultiLabelHead(name="diagnoses", labels=["a", "b"])
    task = FineTuneTask(backbone="net1d-tiny", heads=[head])
    import lightning as L

    trainer = L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    dm = ShardDataModule(str(tmp_path / "new"), batch_size=2, predict_split="all")
    batches = trainer.predict(task, datamodule=dm)
    ids = [rid for batch in batches for rid in batch["record_id"]]
    assert ids == ["s0010_re"] * 3
    assert batches[0]["diagnoses/p_a"].shape == (2,)


def test_weights_the_forward_pass_never_reads_are_frozen():
    from ecgfm.heads import MultiLabelHead
    from ecgfm.tasks import FineTuneTask

    task = FineTuneTask(backbone="net1d-tiny", heads=[MultiLabelHead(name="d", labels=["a"])], preprocessing="zscore")
    frozen = {id(p) for p in task.parameters() if not p.requires_grad}
    assert frozen == {id(p) for p in task.backbone.parameters_unused_by_features()}


def test_a_linear_probe_keeps_the_frozen_backbone_in_eval_mode_while_training(synthetic_shards):
    """Lightning sets submodule modes itself (fit start, after validation) without FineTuneTask.train: the task
    re-applies eval mode to the frozen backbone, or its BatchNorm would train on batch statistics."""
    import lightning as L

    from ecgfm.data.datamodule import ShardDataModule

    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            norms = [m for m in module.backbone.modules() if isinstance(m, torch.nn.BatchNorm1d)]
            seen.append((module.backbone.training, any(m.training for m in norms)))

    task = FineTuneTask(
        backbone="net1d-tiny",
        finetune="linear_probe",
        heads=[{"kind": "potassium", "name": "k", "target": "potassium"}],
    )
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()],
    )  # fmt: skip
    trainer.fit(task, ShardDataModule(str(synthetic_shards), batch_size=8))
    assert seen == [(False, False)] * 4
