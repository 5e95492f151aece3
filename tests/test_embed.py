"""``ecgfm embed``: feature folders that mirror their shards, resume, parts, heads trained on them (backbone
``precomputed``) that match a linear probe through the backbone, and those heads published back on the model."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from ecgfm.backbones import ContractError, create_backbone
from ecgfm.checkpointing import read_lightning_checkpoint
from ecgfm.commands import main
from ecgfm.data.convert import convert
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.data.shards import Manifest, verify_shards
from ecgfm.data.synthetic import write_synthetic_shards
from ecgfm.embeddings import embed_shards, feature_model_sha256, resolve_part
from ecgfm.io import sha256sum
from ecgfm.pretrained import ECGModel
from ecgfm.publish import publish_checkpoint
from ecgfm.signal import create_preprocessing, to_millivolts
from ecgfm.tasks import FineTuneTask

REPO = Path(__file__).resolve().parents[1]
HEADS = [
    {"kind": "potassium", "name": "potassium", "target": "potassium", "labels": ["potassium"]},
    {"kind": "binary", "name": "hyperkalemia", "target": "hyperkalemia", "labels": ["hyperkalemia"]},
]
COPIED = ("lead_mask", "patient_key", "segment_start", "valid_samples", "targets/potassium", "targets/hyperkalemia")


def backbone_model(seed: int = 0) -> ECGModel:
    """A net1d-tiny with random weights and a z-score (cheaper on the CPU than ECGFounder's filters), no heads."""
    torch.manual_seed(seed)
    backbone = create_backbone("net1d-tiny")
    config = backbone.model_config
    inputs = {**config.input.to_dict(), "preprocessing": create_preprocessing("zscore").config()}
    contract = {"backbone": config.to_dict(), "input": inputs, "adapter": "identity", "heads": {}}
    model = ECGModel(contract, {"name": f"tiny-{seed}"})
    model.backbone.load_state_dict(backbone.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """96 synthetic segments (24 patients) in 3 shards."""
    out = tmp_path_factory.mktemp("embed-shards")
    write_synthetic_shards(out, 96, seed=0, segments_per_shard=32, progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return backbone_model().save_pretrained(tmp_path_factory.mktemp("embed-model") / "tiny")


@pytest.fixture(scope="module")
def features(shards, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed-features") / "features"
    args = ["embed", "--model", str(model_dir), "--data", str(shards), "--out", str(out), "--batch-size", "10"]
    assert main([*args, "--device", "cpu", "--no-progress"]) == 0
    return out


def read(path: Path, key: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        dset = f[key]
        return dset.asstr()[:] if h5py.check_string_dtype(dset.dtype) else dset[:]


# ------------------------------------------------------------------------------------------------ the feature folder
def test_features_are_the_models_features_of_the_same_segments_with_the_same_ids(shards, model_dir, features):
    model = ECGModel.from_pretrained(model_dir)
    source, stored = Manifest.load(shards), Manifest.load(features)
    assert [s["path"] for s in stored.shards] == [s["path"] for s in source.shards]
    assert [s["n_segments"] for s in stored.shards] == [s["n_segments"] for s in source.shards]
    for entry in source.shards:
        src, feat = shards / entry["path"], features / entry["path"]
        values = read(feat, "features")
        assert values.dtype == np.float16 and values.shape == (entry["n_segments"], model.backbone.num_features)
        with torch.no_grad():
            expected = model.features(
                to_millivolts(torch.from_numpy(read(src, "signal"))), torch.from_numpy(read(src, "lead_mask"))
            )
        torch.testing.assert_close(torch.from_numpy(values).float(), expected, atol=2e-3, rtol=2e-3)
        for key in ("record_id", "patient_id", *COPIED):
            np.testing.assert_array_equal(read(feat, key), read(src, key), err_msg=key)
        with h5py.File(feat, "r") as f:
            assert "signal" not in f and f["targets/potassium"].attrs["units"] == "mmol/L"

    # the manifest names the model and the source; the split by patient is the source's
    assert stored.features["size"] == model.backbone.num_features and stored.features["dtype"] == "float16"
    assert stored.features["model"]["name"] == "tiny-0"
    assert stored.features["model"]["sha256"] == feature_model_sha256(model) == feature_model_sha256(backbone_model())
    assert feature_model_sha256(backbone_model(seed=1)) != feature_model_sha256(model)
    assert stored.source["manifest_sha256"] == sha256sum(shards / "manifest.json")
    assert stored.targets == source.targets and stored.n_segments == source.n_segments
    assert verify_shards(features) == []
    splits = [
        ShardDataModule(str(root), val_fraction=0.25, test_fraction=0.25).split_indices() for root in (shards, features)
    ]
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(splits[0][split], splits[1][split])

    # a loader worker hands over float16 [B, D] batches through its shared-memory ring, as it does int16 signals
    data = ShardDataModule(str(features), batch_size=8, num_workers=1, val_fraction=0.25, test_fraction=0.25)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    first = int(splits[1]["val"][0])
    shard, row = first // 32, first % 32
    assert batch["signal"].dtype == torch.float16 and batch["signal"].shape == (8, model.backbone.num_features)
    np.testing.assert_array_equal(batch["signal"][0].numpy(), read(features / f"shard-{shard:05d}.h5", "features")[row])


def test_a_rerun_keeps_finished_shards_and_redoes_a_truncated_or_corrupted_one(features, shards, model_dir, tmp_path):
    out = tmp_path / "features"
    shutil.copytree(features, out)
    again = embed_shards(str(model_dir), str(shards), str(out), device="cpu", progress=False)
    assert again.computed == {} and len(again.reused) == 3 and again.manifest_written
    kept = (out / "shard-00000.h5").stat().st_mtime_ns

    truncated = out / "shard-00001.h5"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    corrupted = out / "shard-00002.h5"
    with h5py.File(corrupted, "r") as f:
        offset = f["features"].id.get_offset() + 7
    with open(corrupted, "r+b") as handle:  # one flipped byte in the features: still opens, same shape
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x40]))
    assert len(verify_shards(out)) == 2

    redone = embed_shards(str(model_dir), str(shards), str(out), device="cpu", progress=False)
    assert redone.reused == ["shard-00000.h5"] and set(redone.computed) == {"shard-00001.h5", "shard-00002.h5"}
    assert "cannot open shard" in redone.computed["shard-00001.h5"]
    assert "/features differs from its checksum" in redone.computed["shard-00002.h5"]
    assert (out / "shard-00000.h5").stat().st_mtime_ns == kept
    assert verify_shards(out) == []
    for name in ("shard-00001.h5", "shard-00002.h5"):
        np.testing.assert_array_equal(read(out / name, "features"), read(features / name, "features"))
    assert json.loads((out / "manifest.json").read_text()) == json.loads((features / "manifest.json").read_text())

    # another model redoes every shard and never leaves a manifest that lists the old features
    other = backbone_model(seed=1).save_pretrained(tmp_path / "other")
    changed = embed_shards(str(other), str(shards), str(out), device="cpu", progress=False, part="0/2")
    assert not changed.manifest_written and not (out / "manifest.json").exists()
    assert set(changed.computed.values()) == {"written from another model or source shard"}


def test_two_parts_write_the_same_folder_as_one(features, shards, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "features"
    first = embed_shards(str(model_dir), str(shards), str(out), device="cpu", progress=False, part="0/2")
    assert sorted(first.computed) == ["shard-00000.h5", "shard-00002.h5"] and first.other_parts == 1
    assert first.waiting_for == ["shard-00001.h5"] and not (out / "manifest.json").exists()

    monkeypatch.setenv("RANK", "1")  # as torchrun starts the second process
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_part() == (1, 2)
    second = embed_shards(str(model_dir), str(shards), str(out), device="cpu", progress=False)
    assert list(second.computed) == ["shard-00001.h5"] and second.manifest_written

    assert json.loads((out / "manifest.json").read_text()) == json.loads((features / "manifest.json").read_text())
    assert (out / "patient_keys.npy").read_bytes() == (features / "patient_keys.npy").read_bytes()
    for entry in Manifest.load(features).shards:
        np.testing.assert_array_equal(read(out / entry["path"], "features"), read(features / entry["path"], "features"))


def test_parts_and_mistakes_are_refused_in_one_line(features, shards, model_dir, capsys):
    assert resolve_part("3/4") == (3, 4) and resolve_part(None, {}) == (0, 1)
    assert resolve_part(None, {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "3"}) == (2, 3)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--part must be K/N"):
            resolve_part(bad)
    base = ["embed", "--model", str(model_dir), "--no-progress", "--device", "cpu"]
    assert main([*base, "--data", str(shards), "--out", str(shards)]) == 1
    assert "is the source folder" in capsys.readouterr().err
    assert main([*base, "--data", str(features), "--out", str(features) + "-again"]) == 1
    assert "is a feature folder already" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ heads on features
def test_the_precomputed_backbone_reads_its_folder_and_rebuilds_from_its_config(features, shards):
    backbone = create_backbone("precomputed", features_from=str(features))
    config = backbone.model_config
    stored = Manifest.load(features).features
    assert config.architecture == {
        "num_features": stored["size"],
        "model": "tiny-0",
        "model_sha256": stored["model"]["sha256"],
    }
    assert config.input.units == "features" and config.input.preprocessing == {"name": "none"}
    assert create_backbone(json.loads(json.dumps(config.to_dict()))).model_config == config  # as a checkpoint holds it
    x = torch.randn(4, stored["size"]).half()
    torch.testing.assert_close(backbone.forward_features(x), x.float())
    with pytest.raises(ContractError, match=r"reads features \[batch, 32\] of 'tiny-0'"):
        backbone.forward_features(torch.randn(4, 12, 5000))
    with pytest.raises(ContractError, match="needs features_from"):
        create_backbone("precomputed")
    with pytest.raises(ContractError, match="num_features=3 .* disagree"):
        create_backbone("precomputed", features_from=str(features), num_features=3)
    with pytest.raises(ContractError, match="is a folder of signals"):
        create_backbone("precomputed", features_from=str(shards))


def test_data_of_the_wrong_kind_or_model_is_refused_when_a_run_sets_up(features, shards):
    signal_task = FineTuneTask(backbone="net1d-tiny", heads=HEADS)
    with pytest.raises(ContractError, match="holds features that `ecgfm embed` computed with 'tiny-0'"):
        signal_task.check_data(Manifest.load(features), features / "manifest.json")
    feature_task = FineTuneTask(backbone="precomputed", backbone_kwargs={"features_from": str(features)}, heads=HEADS)
    with pytest.raises(ContractError, match="holds signals, but the backbone 'precomputed' reads features"):
        feature_task.check_data(Manifest.load(shards), shards / "manifest.json")
    other = FineTuneTask(
        backbone="precomputed",
        backbone_kwargs={"num_features": 32, "model": "another", "model_sha256": "0" * 64},
        heads=HEADS,
    )
    with pytest.raises(ContractError, match="built for features of 'another'"):
        other.check_data(Manifest.load(features), features / "manifest.json")


def fit(task: FineTuneTask, root: Path, tmp_path: Path) -> tuple[L.Trainer, dict[str, float]]:
    L.seed_everything(0)
    data = ShardDataModule(str(root), batch_size=16, val_fraction=0.25, test_fraction=0.25)
    trainer = L.Trainer(
        max_epochs=3,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    return trainer, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_a_head_on_features_matches_a_linear_probe_through_the_backbone_and_publishes_on_it(
    features, shards, model_dir, tmp_path
):
    L.seed_everything(0)
    probe = FineTuneTask(
        backbone="net1d-tiny", preprocessing="zscore", finetune="linear_probe", heads=HEADS, lr=0.01, scheduler="none"
    )
    probe.backbone.load_state_dict(ECGModel.from_pretrained(model_dir).backbone.state_dict())
    on_features = FineTuneTask(
        backbone="precomputed",
        backbone_kwargs={"features_from": str(features)},
        finetune="linear_probe",
        heads=HEADS,
        lr=0.01,
        scheduler="none",
    )
    # the same initial head weights without copying: a head's init depends on the seed and its name, not on the
    # random numbers the Net1D drew before it (the precomputed backbone draws none)
    for mine, theirs in zip(probe.heads.state_dict().values(), on_features.heads.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)

    _, through = fit(probe, shards, tmp_path / "probe")
    trainer, direct = fit(on_features, features, tmp_path / "features")
    assert through["val/loss"] == pytest.approx(direct["val/loss"], abs=2e-3)
    assert through["val/segment/hyperkalemia/auroc"] == pytest.approx(
        direct["val/segment/hyperkalemia/auroc"], abs=0.02
    )
    for mine, theirs in zip(probe.heads.parameters(), on_features.heads.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=2e-3, rtol=2e-3)

    # the trained heads, published on the model that computed the features, read signals
    ckpt = tmp_path / "probe.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match="--features-model"):
        publish_checkpoint(ckpt, tmp_path / "published")
    other = backbone_model(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(ContractError, match="give the model that `ecgfm embed` used"):
        publish_checkpoint(ckpt, tmp_path / "published", features_model=str(other))
    assert main(["publish", str(ckpt), str(tmp_path / "published"), "--features-model", str(model_dir)]) == 0
    published = ECGModel.from_pretrained(tmp_path / "published")
    assert published.backbone_config.name == "net1d-tiny" and list(published.heads) == ["potassium", "hyperkalemia"]
    with h5py.File(shards / "shard-00000.h5", "r") as f:
        signal, lead_mask = torch.from_numpy(f["signal"][:8]), torch.from_numpy(f["lead_mask"][:8])
    with h5py.File(features / "shard-00000.h5", "r") as f:
        stored = torch.from_numpy(f["features"][:8])
    with torch.no_grad():
        from_signal = published(to_millivolts(signal), lead_mask)
        from_features = on_features.eval()(stored)
    for name in from_signal:
        torch.testing.assert_close(from_signal[name], from_features[name], atol=2e-3, rtol=2e-3)


def test_the_embed_linear_probe_recipe_runs_on_challenge_features(test_data, model_dir, tmp_path):
    shards = tmp_path / "shards"
    convert(test_data / "cinc2021", shards, reader="challenge", progress=False)
    out = tmp_path / "features"
    assert main(["embed", "--model", str(model_dir), "--data", str(shards), "--out", str(out), "--no-progress"]) == 0
    args = [
        "fit",
        "--config",
        str(REPO / "recipes" / "finetune" / "embed-linear-probe.yaml"),
        f"--model.backbone_kwargs.features_from={out}",
        f"--data.root={out}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=1",
    ]
    assert main(args) == 0
    (ckpt,) = (tmp_path / "logs").rglob("best-*.ckpt")
    assert read_lightning_checkpoint(ckpt)["ecgfm"]["backbone"]["name"] == "precomputed"
    assert os.path.getsize(out / "shard-00000.h5") < os.path.getsize(shards / "shard-00000.h5") / 100


def test_bench_embed_times_both_runs_and_reports_matching_metrics(model_dir, tmp_path):
    from rich.console import Console

    from ecgfm.bench.embed import run_embed_benchmark

    console = Console(file=io.StringIO(), width=150)
    result = run_embed_benchmark(
        str(tmp_path), str(model_dir), n_segments=64, epochs=2, batch_size=16, accelerator="cpu", console=console
    )
    through, direct = result["runs"].values()
    assert len(through["epoch_seconds"]) == len(direct["epoch_seconds"]) == 2 and result["embed_seconds"] > 0
    assert result["val_loss_difference"] < 2e-3 and result["feature_size"] == 32
    printed = console.file.getvalue()
    assert "linear probe through the backbone" in printed and "ecgfm embed:" in printed


def test_the_shards_metadata_comes_along_so_reports_on_features_have_subgroups(ludb_shards, model_dir, tmp_path):
    out = tmp_path / "ludb-features"
    args = ["embed", "--model", str(model_dir), "--data", str(ludb_shards), "--out", str(out)]
    assert main([*args, "--device", "cpu", "--no-progress"]) == 0
    source, stored = Manifest.load(ludb_shards), Manifest.load(out)
    assert set(stored.metadata) == {"Age", "Sex"} and stored.metadata == source.metadata
    for entry in source.shards:
        for name in ("metadata/Age", "metadata/Sex"):
            np.testing.assert_array_equal(read(out / entry["path"], name), read(ludb_shards / entry["path"], name))
    assert verify_shards(out) == []  # the copied columns are checksummed like the rest


def test_evaluating_on_a_feature_folder_says_what_to_do_instead(features, shards, model_dir):
    from ecgfm.data.dataset import ShardDataset
    from ecgfm.evaluation.units import predict_segments

    with pytest.raises(ValueError, match="is a feature folder") as caught:
        predict_segments(ECGModel.from_pretrained(model_dir), ShardDataset(str(features)), progress=False)
    assert "--features-model" in str(caught.value) and str(shards.resolve()) in str(caught.value)
