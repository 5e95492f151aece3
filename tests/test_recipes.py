"""Every head's recipe runs end to end (fast_dev_run) on real recordings or the synthetic generator, and heads
trained together report the same metrics as alone."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from ecgfm.commands import main
from ecgfm.data.convert import convert
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.heads import LabsHead, MultiLabelHead, PotassiumHead
from ecgfm.tasks import FineTuneTask

REPO = Path(__file__).resolve().parents[1]


def run_recipe(recipe: str, shards: Path, tmp_path: Path, *extra: str) -> int:
    return main(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / recipe),
            f"--data.root={shards}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def challenge_shards(test_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("challenge-shards")
    summary = convert(test_data / "cinc2021", out, reader="challenge", progress=False)
    assert summary.records_read == 20 and not summary.skipped
    return out


@pytest.mark.parametrize("recipe", ["potassium/net1d-small.yaml", "labs/net1d-small.yaml"])
def test_synthetic_recipes_run(recipe, synthetic_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their side files (reference ranges) relative to the repository
    assert run_recipe(recipe, synthetic_shards, tmp_path, "--trainer.fast_dev_run=true", "--data.batch_size=8") == 0


def test_conditions_recipe_runs_on_challenge_diagnoses(challenge_shards, tmp_path):
    assert run_recipe("conditions/net1d-small.yaml", challenge_shards, tmp_path, "--trainer.fast_dev_run=true") == 0


def test_conditions_recipe_writes_the_per_label_table_and_thresholds(challenge_shards, tmp_path):
    args = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--model.backbone=net1d-tiny"]
    assert run_recipe("conditions/net1d-small.yaml", challenge_shards, tmp_path, *args) == 0
    tables = list((tmp_path / "logs").rglob("val-segment-conditions-per_label.csv"))
    assert len(tables) == 1
    header, *rows = tables[0].read_text().splitlines()
    assert header.split(",")[:5] == ["label", "n", "positives", "prevalence", "auroc"]
    assert len(rows) > 20 and any(row.startswith("NSR,") for row in rows)  # Challenge names, e.g. sinus rhythm


def test_heads_report_the_same_metrics_alone_or_together(synthetic_shards, tmp_path):
    def validate(task: FineTuneTask) -> dict[str, float]:
        data = ShardDataModule(str(synthetic_shards), batch_size=32, val_fraction=0.2, test_fraction=0.1)
        trainer = L.Trainer(
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            limit_val_batches=3,
            default_root_dir=tmp_path,
        )
        return {k: float(v) for k, v in trainer.validate(task, datamodule=data, verbose=False)[0].items()}

    L.seed_everything(0)
    together = FineTuneTask(
        backbone="net1d-tiny",
        preprocessing="zscore",
        heads=[
            PotassiumHead(target="potassium", labels=["potassium"], target_mean=4.5, target_std=1.0),
            LabsHead(target="labs", labels=["calcium", "sodium"], target_mean=[2.3, 139], target_std=[0.2, 4.5]),
            MultiLabelHead(name="hyperk", target="hyperkalemia", labels=["hyperkalemia"]),
        ],
    )
    alone = FineTuneTask(
        backbone="net1d-tiny",
        preprocessing="zscore",
        heads=[PotassiumHead(target="potassium", labels=["potassium"], target_mean=4.5, target_std=1.0)],
    )
    alone.load_state_dict(
        {k: v for k, v in together.state_dict().items() if not k.startswith(("heads.labs", "heads.hyperk"))}
    )
    both, single = validate(together), validate(alone)
    potassium = {k: v for k, v in both.items() if k.startswith("val/segment/potassium/")}
    assert potassium and set(potassium) == {k for k in single if k.startswith("val/segment/potassium/")}
    for key, value in potassium.items():
        assert single[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key
    assert both["val/loss"] > single["val/loss"]  # the total sums the weighted head losses


def test_training_split_statistics_are_learned_once_and_kept_in_the_checkpoint(synthetic_shards, tmp_path):
    data = ShardDataModule(str(synthetic_shards), batch_size=16, val_fraction=0.2, test_fraction=0.1)
    data.setup("fit")
    train_k = data.datasets["train"].target_array("potassium")[:, 0]
    task = FineTuneTask(backbone="net1d-tiny", preprocessing="zscore", heads=[PotassiumHead(target="potassium")])
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(task, datamodule=data)
    head = task.heads["potassium"]
    assert float(head.mean) == pytest.approx(float(train_k.mean()), rel=1e-5)
    assert float(head.std) == pytest.approx(float(train_k.std(ddof=1)), rel=1e-4)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    reloaded = FineTuneTask.load_from_checkpoint(ckpt)
    assert bool(reloaded.heads["potassium"].statistics_fitted)
    torch.testing.assert_close(reloaded.heads["potassium"].mean, head.mean)


def test_a_label_the_data_lacks_is_one_line_naming_it(ludb_shards, tmp_path, capsys):
    code = run_recipe(
        "quickstart/net1d-small.yaml",
        ludb_shards,
        tmp_path,
        "--trainer.fast_dev_run=true",
        '--model.heads=[{"class_path": "ecgfm.heads.MultiLabelHead", '
        '"init_args": {"name": "diagnoses", "labels": ["Sinus rhythm", "Not a diagnosis"]}}]',
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "ecgfm: error: head 'diagnoses': labels ['Not a diagnosis'] are not in target 'diagnoses'" in err
