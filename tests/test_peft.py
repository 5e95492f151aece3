"""Parameter-efficient fine-tuning (ecgfm.finetune.peft): LoRA on net1d-small trains under 5 % of the parameters, its
checkpoint holds only the adapters and heads plus the base weights' sha256, reloads and resumes from the base file,
and the merged model that publish, export and predict serve gives the unmerged model's outputs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from ecgfm.backbones.checkpoint import CheckpointError, safe_torch_load
from ecgfm.checkpointing import ResumableCheckpoint
from ecgfm.commands import main
from ecgfm.data.convert import convert
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.io import sha256sum
from ecgfm.pretrained import ECGModel, load
from ecgfm.tasks import FineTuneTask

REPO = Path(__file__).resolve().parents[1]
SHIPPED_BASE = REPO / "checkpoints" / "ludb-diagnoses-net1d-small" / "model.safetensors"
HEAD = {"kind": "multilabel", "name": "dx", "target": "dx"}


@pytest.fixture(scope="module")
def challenge_shards(test_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peft-shards")
    summary = convert(test_data / "cinc2021", out, reader="challenge", progress=False)
    assert summary.records_read == 20 and not summary.skipped
    return out


def _data(shards: Path) -> ShardDataModule:
    return ShardDataModule(str(shards), batch_size=4, val_fraction=0.2, test_fraction=0.2)


def _trainer(root: Path, max_epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(root / "logs", name="peft"),
        callbacks=[ResumableCheckpoint(dirpath=root / "checkpoints", save_top_k=0)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _signal(n: int = 3, leads: int = 12) -> torch.Tensor:
    return torch.randn(n, leads, 5000, generator=torch.Generator().manual_seed(1)) * 0.3


@pytest.fixture(scope="module")
def lora_run(challenge_shards, tmp_path_factory) -> dict:
    """LoRA (r=4) on net1d-small from the shipped LUDB net1d-small weights, trained for 2 steps."""
    root = tmp_path_factory.mktemp("lora-run")
    base = root / "base.safetensors"
    shutil.copy(SHIPPED_BASE, base)
    args = {
        "backbone": "net1d-small",
        "pretrained": str(base),
        "heads": [HEAD],
        "lr": 0.02,
        "peft": {"method": "lora", "r": 4, "alpha": 8},
    }
    L.seed_everything(0)
    task = FineTuneTask(**args)
    trainer = _trainer(root, max_epochs=1)
    trainer.fit(task, datamodule=_data(challenge_shards))
    return {"root": root, "base": base, "args": args, "task": task.eval(), "ckpt": root / "checkpoints" / "last.ckpt"}


def test_lora_trains_under_five_percent_and_logs_it(lora_run):
    task = lora_run["task"]
    trainable, total = task.peft.report(task)
    assert trainable / total < 0.05
    names = [n for n, p in task.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("heads.") or ".lora_" in n for n in names), names
    (metrics,) = (lora_run["root"] / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    share = [float(r["peft/trainable_share"]) for r in rows if r.get("peft/trainable_share")]
    assert share == [pytest.approx(trainable / total)]


def test_the_checkpoint_holds_only_adapters_and_heads_and_names_its_base(lora_run):
    stored = safe_torch_load(lora_run["ckpt"])
    keys = list(stored["state_dict"])
    backbone = [k for k in keys if k.startswith("backbone.")]
    assert backbone and all(".lora_A." in k or ".lora_B." in k for k in backbone), backbone
    assert any(k.startswith("heads.dx.") for k in keys)
    peft = stored["ecgfm"]["peft"]
    base = lora_run["base"]
    assert peft["base"] == {"file": str(base), "path": str(base.resolve()), "sha256": sha256sum(base)}
    assert peft["target"] == ["conv1.conv", "conv3.conv"] and stored["hyper_parameters"]["peft"]["r"] == 4
    saved = sum(v.numel() for v in stored["state_dict"].values())
    full = sum(v.numel() for v in lora_run["task"].state_dict().values())
    assert saved < 0.05 * full


def test_reloading_reads_the_base_file_first_and_gives_the_same_outputs(lora_run):
    reloaded = FineTuneTask.load_from_checkpoint(lora_run["ckpt"], map_location="cpu").eval()
    x = _signal()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)["dx"], lora_run["task"](x)["dx"], rtol=0, atol=1e-6)


def test_resuming_continues_the_run_and_keeps_saving_adapters_only(lora_run, challenge_shards):
    root = lora_run["root"] / "resumed"
    shutil.copytree(lora_run["root"] / "checkpoints", root / "checkpoints")
    task = FineTuneTask(**lora_run["args"])
    trainer = _trainer(root, max_epochs=2)
    trainer.fit(task, datamodule=_data(challenge_shards), ckpt_path=root / "checkpoints" / "last.ckpt")
    assert trainer.global_step == 4  # 2 steps restored, 2 more
    stored = safe_torch_load(root / "checkpoints" / "last.ckpt")
    assert stored["global_step"] == 4
    assert all(".lora_" in k for k in stored["state_dict"] if k.startswith("backbone."))


def test_a_recipe_without_peft_evaluates_the_checkpoints_adapters(lora_run, challenge_shards):
    task = FineTuneTask(backbone="net1d-small", heads=[HEAD])  # e.g. `ecgfm validate -c conditions/... --ckpt_path`
    trainer = L.Trainer(logger=False, enable_progress_bar=False, limit_val_batches=1, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="differs from the recipe's: peft"):
        trainer.validate(task, datamodule=_data(challenge_shards), ckpt_path=lora_run["ckpt"], verbose=False)
    assert task.hparams.peft["method"] == "lora" and task.peft.base["file"] == str(lora_run["base"])
    x = _signal()
    with torch.no_grad():
        torch.testing.assert_close(task.eval()(x)["dx"], lora_run["task"](x)["dx"], rtol=0, atol=1e-6)


def test_merged_model_gives_the_unmerged_outputs(lora_run, tmp_path):
    task, x = lora_run["task"], _signal()
    with torch.no_grad():
        unmerged = task(x)["dx"]
        plain = ECGModel.from_checkpoint(lora_run["ckpt"])  # publish, export and predict read a .ckpt this way
        assert not any("lora" in k for k in plain.state_dict())
        assert (plain(x)["dx"] - unmerged).abs().max() <= 1e-5
        assert (ECGModel.from_task(task)(x)["dx"] - unmerged).abs().max() <= 1e-5
        assert (load(lora_run["ckpt"])(x)["dx"] - unmerged).abs().max() <= 1e-5
        published = ECGModel.from_pretrained(task.save_pretrained(tmp_path / "published"))
        assert (published(x)["dx"] - unmerged).abs().max() <= 1e-5
        # the adapters matter: the base weights alone give other outputs
        heads = [h.config() for h in task.heads.values()]
        base_only = FineTuneTask(**{**lora_run["args"], "peft": None, "heads": heads})
        base_only.backbone.load_pretrained(lora_run["base"])
        base_only.heads.load_state_dict(task.heads.state_dict())
        assert (base_only.eval()(x)["dx"] - unmerged).abs().max() > 1e-4
        merged_in_place = FineTuneTask.load_from_checkpoint(lora_run["ckpt"], map_location="cpu").merge_peft().eval()
        assert merged_in_place.peft is None and merged_in_place.hparams.peft is None
        assert (merged_in_place(x)["dx"] - unmerged).abs().max() <= 1e-5


def test_publish_and_export_commands_take_a_lora_checkpoint(lora_run, tmp_path):
    assert main(["publish", str(lora_run["ckpt"]), str(tmp_path / "published"), "--name", "lora-test"]) == 0
    assert main(["export", str(lora_run["ckpt"]), "--format", "torchscript", "--out", str(tmp_path / "ts"),
                 "--check-records", "1"]) == 0  # fmt: skip
    with torch.no_grad():
        x = _signal()
        assert (load(tmp_path / "published")(x)["dx"] - lora_run["task"](x)["dx"]).abs().max() <= 1e-5


def _task_with_base(tmp_path: Path, backbone: str, peft: dict, labels: int = 3) -> tuple[FineTuneTask, Path]:
    """A task whose base weights (random, seeded) are in a file, loaded as setup() loads them, adapters perturbed."""
    from ecgfm.backbones import create_backbone

    torch.manual_seed(0)
    base = tmp_path / f"{backbone}.pt"
    torch.save(create_backbone(backbone).state_dict(), base)
    head = {**HEAD, "labels": [f"l{i}" for i in range(labels)]}
    task = FineTuneTask(backbone=backbone, pretrained=str(base), heads=[head], peft=peft)
    task.peft.load_base(base, task.adapter.adapt_state_dict)
    with torch.no_grad():
        for param in task.backbone.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)  # adapters start as a no-op (one factor zero): make them count
    return task.eval(), base


def _roundtrip(task: FineTuneTask) -> FineTuneTask:
    """What a Lightning save and load do with the model: on_save_checkpoint, then a model from its hyper-parameters,
    on_load_checkpoint and a strict load_state_dict."""
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    loaded = FineTuneTask(**dict(task.hparams))
    loaded.on_load_checkpoint(checkpoint)
    loaded.load_state_dict(checkpoint["state_dict"])
    return loaded.eval()


@pytest.mark.parametrize(
    ("method", "target"),
    [("loha", None), ("lokr", None), ("lokr", ["conv1.conv", "conv2.conv", "conv3.conv", "se_fc1", "se_fc2"])],
    ids=["loha", "lokr", "lokr-grouped-convs"],
)
def test_loha_and_lokr_train_reload_and_merge(method, target, tmp_path):
    task, _ = _task_with_base(tmp_path, "net1d-small", {"method": method, "r": 4, "target": target})
    trainable, total = task.peft.report(task)
    assert trainable / total < 0.25
    x = _signal()
    with torch.no_grad():
        unmerged = task(x)["dx"]
        assert (_roundtrip(task)(x)["dx"] - unmerged).abs().max() <= 1e-6
        assert (ECGModel.from_task(task)(x)["dx"] - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("backbone", ["hubert-ecg-tiny", "ecg-fm-tiny"])
def test_transformers_adapt_their_attention_projections(backbone, tmp_path):
    task, _ = _task_with_base(tmp_path, backbone, {"method": "lora", "r": 2})
    assert task.hparams.peft["target"] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert task.peft.layers and all(name.rsplit(".", 1)[-1].endswith("_proj") for name in task.peft.layers)
    x = _signal()
    with torch.no_grad():
        torch.testing.assert_close(ECGModel.from_task(task)(x)["dx"], task(x)["dx"], rtol=0, atol=1e-5)


def test_wrong_target_names_fail_naming_them():
    with pytest.raises(ValueError, match=r"\['qkv'\] match no module of backbone 'net1d-small'") as err:
        FineTuneTask(backbone="net1d-small", pretrained="base.pt", peft={"target": ["conv1.conv", "qkv"]})
    assert "\n" not in str(err.value) and "conv1.conv, conv2.conv" in str(err.value)  # what it could have named
    with pytest.raises(ValueError, match=r"grouped convolutions \(stage_list\.0\.block_list\.0\.conv2\.conv"):
        FineTuneTask(backbone="net1d-small", pretrained="base.pt", peft={"target": ["conv2.conv"]})
    with pytest.raises(ValueError, match=r"conv1 \(MyConv1dPadSame\)"):
        FineTuneTask(backbone="net1d-small", pretrained="base.pt", peft={"target": ["conv1"]})
    with pytest.raises(ValueError, match=r"no key 'rank' for method 'lora'"):
        FineTuneTask(backbone="net1d-small", pretrained="base.pt", peft={"rank": 4})
    with pytest.raises(ValueError, match=r"peft.method 'adapter' is not one of lora, loha, lokr"):
        FineTuneTask(backbone="net1d-small", pretrained="base.pt", peft={"method": "adapter"})
    with pytest.raises(ValueError, match=r"needs model.pretrained"):
        FineTuneTask(backbone="net1d-small", peft={"method": "lora"})


def test_missing_or_changed_base_weights_fail_naming_the_file(lora_run, tmp_path):
    ckpt = tmp_path / "lora.ckpt"
    shutil.copy(lora_run["ckpt"], ckpt)
    moved = tmp_path / "moved.safetensors"
    shutil.move(lora_run["base"], moved)
    try:
        for loader in (lambda: FineTuneTask.load_from_checkpoint(ckpt), lambda: ECGModel.from_checkpoint(ckpt)):
            with pytest.raises(CheckpointError, match=rf"base weights {lora_run['base']} \(sha256 [0-9a-f]{{64}}\)"):
                loader()
        # a copy elsewhere serves when model.pretrained names it (its sha256 is checked)
        FineTuneTask.load_from_checkpoint(ckpt, pretrained=str(moved))
        torch.save({"w": torch.zeros(1)}, lora_run["base"])  # other weights under the recorded name
        with pytest.raises(CheckpointError, match=rf"base weights {lora_run['base']} have sha256 [0-9a-f]{{64}}, but"):
            ECGModel.from_checkpoint(ckpt)
    finally:
        shutil.move(moved, lora_run["base"])


def test_the_lora_recipe_fine_tunes_one_batch(challenge_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe names the shipped base weights relative to the repository
    argv = ["fit", "--config", str(REPO / "recipes" / "finetune" / "lora.yaml"), f"--data.root={challenge_shards}"]
    argv += [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    argv += ["--trainer.enable_progress_bar=false", "--trainer.fast_dev_run=true", "--data.batch_size=4"]
    assert main(argv) == 0
