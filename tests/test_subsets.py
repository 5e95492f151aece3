"""Fewer leads: the recipes run on their data, and `ecgfm subsets` scores one checkpoint on each lead subset with the
leads outside the subset really zeroed and masked."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from ecgfm.commands import main
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.evaluation.subsets import SubsetDataModule, evaluate_subsets, mask_leads, plan_subsets
from ecgfm.heads import MultiLabelHead
from ecgfm.leads import STANDARD_LEADS, LeadError
from ecgfm.tasks import FineTuneTask

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "fewer-leads"
TINY = ["--model.backbone=net1d-tiny", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]


def fit(recipe: str, shards: Path, out: Path, *extra: str) -> Path:
    """Run a fewer-leads recipe; return its last checkpoint (if it wrote one)."""
    code = main(
        [
            "fit",
            "--config",
            str(RECIPES / recipe),
            f"--data.root={shards}",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out / 'logs'}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )
    assert code == 0
    return next(out.rglob("last.ckpt"), out / "none")


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def batch(n: int = 3, t: int = 50) -> dict:
    g = torch.Generator().manual_seed(0)
    signal = torch.randint(1, 800, (n, 12, t), generator=g, dtype=torch.int16)
    lead_mask = torch.ones(n, 12, dtype=torch.bool)
    lead_mask[0, STANDARD_LEADS.index("II")] = False  # a recording that lacks lead II already
    return {"signal": signal, "lead_mask": lead_mask, "record_id": ["a", "b", "c"]}


# ----------------------------------------------------------------------------------------------- masking, unit


def test_mask_leads_zeroes_and_masks_the_leads_outside_the_subset():
    original = batch()
    kept = mask_leads(original, "I+II")
    i, ii = STANDARD_LEADS.index("I"), STANDARD_LEADS.index("II")
    others = [k for k in range(12) if k not in (i, ii)]
    assert kept["signal"].dtype == torch.int16
    assert torch.equal(kept["signal"][:, [i, ii]], original["signal"][:, [i, ii]])
    assert not kept["signal"][:, others].any()
    assert kept["lead_mask"][:, i].all() and not kept["lead_mask"][:, others].any()
    assert kept["lead_mask"][:, ii].tolist() == [False, True, True]  # absent in the data stays absent
    assert original["signal"][:, others].all() and original["lead_mask"][1:].all()  # the input is not changed
    assert kept["record_id"] is original["record_id"]
    floats = mask_leads({**original, "signal": original["signal"].float()}, ["V1"])
    assert floats["signal"][:, STANDARD_LEADS.index("V1")].all() and floats["signal"].count_nonzero() == 3 * 50


def test_plan_subsets_intersects_with_the_model_leads_and_skips_disjoint_ones():
    plans = {p.name: p for p in plan_subsets(["I"], [12, "limb", "I+II", "I", "II", ["aVF", "ii"]])}
    assert plans["12"].leads == STANDARD_LEADS and plans["12"].used == ("I",)
    assert plans["limb"].used == ("I",) and len(plans["limb"].leads) == 6
    assert plans["I"].skip_reason is None
    assert plans["II"].used == () and "shares no lead" in plans["II"].skip_reason
    assert "II+aVF" not in plans and plans["aVF+II"].used == ()
    limb = {p.name: p.used for p in plan_subsets("limb", ["I+II", "V1+II"])}
    assert limb == {"I+II": ("I", "II"), "V1+II": ("II",)}
    with pytest.raises(LeadError, match="unknown lead name 'V7'"):
        plan_subsets(["I"], ["V7"])
    with pytest.raises(LeadError, match="given twice"):
        plan_subsets(["I"], ["I", "lead I"])


class Spy(FineTuneTask):
    """Records what reaches the model's input selection."""

    seen: list[tuple[torch.Tensor, torch.Tensor]]

    def prepare_signal(self, signal, lead_mask):
        self.seen.append((signal.clone(), lead_mask.clone()))
        return super().prepare_signal(signal, lead_mask)


def test_the_model_sees_only_the_subset_leads(ludb_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Spy(
        backbone="net1d-tiny",
        leads="limb",
        adapter="zero_fill",
        heads=[MultiLabelHead(name="dx", target="diagnoses", labels=["Sinus rhythm", "Left atrial hypertrophy"])],
    )
    model.seen = []
    data = ShardDataModule(str(ludb_shards), batch_size=8, val_fraction=0.2, test_fraction=0.25)
    rows = evaluate_subsets(model, data, ["I+II", "precordial"], "val", limit_batches=1, report=None)
    assert len(model.seen) == 1  # precordial shares no lead with a limb model: skipped
    signal, lead_mask = model.seen[0]
    keep = [STANDARD_LEADS.index(lead) for lead in ("I", "II")]
    others = [k for k in range(12) if k not in keep]
    assert signal[:, keep].any() and not signal[:, others].any()
    assert not lead_mask[:, others].any() and lead_mask[:, keep].all()
    assert {r["subset"] for r in rows} == {"I+II"} and {r["leads_used"] for r in rows} == {"I+II"}
    assert not list(tmp_path.iterdir())  # no logs, tables or checkpoints

    everything = SubsetDataModule(ShardDataModule(str(ludb_shards), predict_split="all"), "all", ["II"])
    everything.setup("test")
    assert len(everything.test_dataloader().dataset) == 120  # `all`: every segment, not a split
    rows = evaluate_subsets(model, data, ["II"], "all", limit_batches=1, report=None)
    assert {r["leads_used"] for r in rows} == {"II"} and len(model.seen) == 2


# ----------------------------------------------------------------------------------------------- recipes


def test_hyperkalemia_lead_I_recipe_runs_on_synthetic_ecgs(synthetic_shards, tmp_path):
    fit("hyperkalemia-lead-I.yaml", synthetic_shards, tmp_path, "--trainer.fast_dev_run=true", "--data.batch_size=8")


@pytest.mark.parametrize("recipe", ["limb-6-lead.yaml", "lead-I-ludb.yaml"])
def test_ludb_recipes_run(recipe, ludb_shards, tmp_path):
    fit(recipe, ludb_shards, tmp_path, "--trainer.fast_dev_run=true")


# ----------------------------------------------------------------------------------------------- `ecgfm subsets`


@pytest.fixture(scope="module")
def lead_i_checkpoint(ludb_shards, tmp_path_factory) -> Path:
    return fit("lead-I-ludb.yaml", ludb_shards, tmp_path_factory.mktemp("lead-I"), *TINY)


@pytest.fixture(scope="module")
def limb_checkpoint(ludb_shards, tmp_path_factory) -> Path:
    return fit("limb-6-lead.yaml", ludb_shards, tmp_path_factory.mktemp("limb"), *TINY)


def test_subsets_table_of_a_lead_I_model(lead_i_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(lead_i_checkpoint, map_location="cpu", weights_only=True)
    assert (
        checkpoint["ecgfm"]["input"]["lead_names"] == ["I"]
        and checkpoint["ecgfm"]["adapter"]["name"] == "fold_first_conv"
    )
    out = tmp_path / "table.csv"
    # the data settings (root, split fractions) come from the checkpoint: the same held-out patients as training
    assert main(["subsets", f"--ckpt_path={lead_i_checkpoint}", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "subset II: skipped, it shares no lead with the model's leads (I)" in printed
    assert "subset  n_leads  leads_used  head" in printed and "  unit  " in printed
    rows = read_table(out)
    assert list(rows[0]) == ["subset", "n_leads", "leads_used", "head", "unit", "metric", "value"]
    assert {r["subset"] for r in rows} == {"12", "limb", "I+II", "I"}
    assert {r["subset"]: int(r["n_leads"]) for r in rows} == {"12": 12, "limb": 6, "I+II": 2, "I": 1}
    assert {r["leads_used"] for r in rows} == {"I"}  # the model reads lead I of every subset
    value = {(r["subset"], r["head"], r["metric"]): float(r["value"]) for r in rows}
    for subset in ("12", "limb", "I"):
        for metric in ("loss", "auroc", "micro_auroc"):
            assert math.isfinite(value[subset, "diagnoses", metric]), (subset, metric)
        assert value[subset, "all", "loss"] == value[subset, "diagnoses", "loss"]
        assert value[subset, "diagnoses", "auroc/Sinus rhythm"] == value["I", "diagnoses", "auroc/Sinus rhythm"]


def test_subsets_table_of_a_limb_model_with_lead_dropout(limb_checkpoint, ludb_shards, tmp_path, capsys):
    out = tmp_path / "limb.csv"
    args = ["subsets", f"--ckpt_path={limb_checkpoint}", f"--data.root={ludb_shards}", f"--out={out}"]
    assert main([*args, "--subsets=[12, limb, I, precordial]", "--metrics=[loss, auroc]"]) == 0
    assert "subset precordial: skipped" in capsys.readouterr().out
    rows = read_table(out)
    value = {(r["subset"], r["head"], r["metric"]): float(r["value"]) for r in rows}
    used = {r["subset"]: (int(r["n_leads"]), r["leads_used"]) for r in rows}
    assert used == {"12": (12, "I+II+III+aVR+aVL+aVF"), "limb": (6, "I+II+III+aVR+aVL+aVF"), "I": (1, "I")}
    assert {r["metric"] for r in rows} == {"loss", "auroc"}
    assert all(math.isfinite(v) for v in value.values())
    assert value["12", "diagnoses", "loss"] == value["limb", "diagnoses", "loss"]  # V1-V6 are not the model's
    assert value["I", "diagnoses", "loss"] != value["limb", "diagnoses", "loss"]  # five leads zeroed do matter

    # the unmasked subset gives what `trainer.test` gives: the task's own metrics, not a re-implementation
    model = FineTuneTask.load_from_checkpoint(limb_checkpoint, map_location="cpu")
    data = ShardDataModule(str(ludb_shards), batch_size=16, val_fraction=0.2, test_fraction=0.25)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path, enable_checkpointing=False)
    plain = trainer.test(model, datamodule=data, verbose=False)[0]
    assert value["limb", "diagnoses", "auroc"] == pytest.approx(plain["test/segment/diagnoses/auroc"], rel=1e-6)
    assert value["limb", "all", "loss"] == pytest.approx(plain["test/loss"], rel=1e-6)


def test_subsets_cli_errors_in_one_line(lead_i_checkpoint, tmp_path, capsys):
    assert main(["subsets", f"--ckpt_path={lead_i_checkpoint}", "--subsets=[I, V7]"]) == 1
    assert capsys.readouterr().err.strip() == (
        "ecgfm: error: unknown lead name 'V7'; expected one of I, II, III, aVR, aVL, aVF, V1, V2, V3, V4, V5, V6"
    )
    assert main(["subsets", f"--ckpt_path={tmp_path / 'nope.ckpt'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
