"""Distillation: per-kind losses, a lead-I student learning from a 12-lead teacher, and cached teacher outputs."""

from __future__ import annotations

import shutil

import h5py
import lightning as L
import pytest
import torch
import torch.nn.functional as F

from ecgfm.commands import main
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.data.dataset import ShardDataset
from ecgfm.data.shards import Manifest, ShardError, verify_shards
from ecgfm.data.synthetic import write_synthetic_shards
from ecgfm.heads import BinaryHead, MulticlassHead, MultiLabelHead, OrdinalHead, PotassiumHead, RegressionHead
from ecgfm.tasks import FineTuneTask
from ecgfm.zoo import sha256sum


def built(head, labels):
    head.build(8, labels)
    return head


def bernoulli_kl(s, t, temperature):
    p = torch.sigmoid(t / temperature)
    q = torch.sigmoid(s / temperature)
    kl = p * (torch.log(p) - torch.log(q)) + (1 - p) * (torch.log(1 - p) - torch.log(1 - q))
    return kl.mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_losses_equal_hand_computations(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    sigmoid_heads = [
        built(MultiLabelHead(name="d", pos_weight=3.0), ["a", "b", "c"]),
        built(OrdinalHead(name="o"), ["l0", "l1", "l2", "l3"]),  # K-1 = 3 cumulative logits
    ]
    for head in sigmoid_heads:
        torch.testing.assert_close(head.distillation_loss(s, t, temperature), bernoulli_kl(s, t, temperature))
        # 0 when the student matches; the same gradient as the BCE against the teacher's probabilities
        assert head.distillation_loss(t, t, temperature).abs() < 1e-6
        x = s.clone().requires_grad_(True)
        head.distillation_loss(x, t, temperature).backward()
        y = s.clone().requires_grad_(True)
        (
            F.binary_cross_entropy_with_logits(y / temperature, torch.sigmoid(t / temperature)) * temperature**2
        ).backward()
        torch.testing.assert_close(x.grad, y.grad)
    binary = built(BinaryHead(name="b"), ["x"])
    torch.testing.assert_close(
        binary.distillation_loss(s[:, :1], t[:, :1], temperature), bernoulli_kl(s[:, :1], t[:, :1], temperature)
    )

    multiclass = built(MulticlassHead(name="m", class_weights=[1.0, 5.0, 1.0], label_smoothing=0.1), ["a", "b", "c"])
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    torch.testing.assert_close(multiclass.distillation_loss(s, t, temperature), expected)
    assert multiclass.distillation_loss(t, t, temperature).abs() < 1e-6
    assert multiclass.distillation_loss(t + 3.0, t, temperature).abs() < 1e-6  # softmax ignores a shift


def test_regression_distillation_is_an_mse_on_the_students_scale():
    student = built(PotassiumHead(name="k", target_mean=4.5, target_std=0.5, loss="gaussian_nll"), ["potassium"])
    teacher = built(PotassiumHead(name="k", target_mean=4.0, target_std=1.0), ["potassium"])
    g = torch.Generator().manual_seed(1)
    z_teacher = torch.randn(5, 1, generator=g)
    out = torch.randn(5, 2, generator=g)  # mean and log-variance
    reference = teacher.distillation_reference()
    assert reference == {"mean": [4.0], "std": [1.0]}
    in_units = z_teacher * 1.0 + 4.0
    expected = F.mse_loss(out[:, :1], (in_units - 4.5) / 0.5)  # the log-variance column is not distilled
    torch.testing.assert_close(student.distillation_loss(out, z_teacher, 3.0, reference), expected)
    # the same prediction in mmol/L on both scales costs nothing
    matched = torch.cat([(in_units - 4.5) / 0.5, torch.zeros(5, 1)], 1)
    assert student.distillation_loss(matched, z_teacher, 1.0, reference).abs() < 1e-10
    labs = built(RegressionHead(name="labs"), ["a", "b"])
    torch.testing.assert_close(
        labs.distillation_loss(out, z_teacher.expand(5, 2)), F.mse_loss(out, z_teacher.expand(5, 2))
    )


def fit(task, root, tmp_path, **trainer_args):
    args = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False)
    args.update(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer_args)
    trainer = L.Trainer(default_root_dir=tmp_path, **args)
    trainer.fit(task, datamodule=ShardDataModule(str(root), batch_size=8))
    return trainer


@pytest.fixture(scope="module")
def teacher_ckpt(synthetic_shards, tmp_path_factory):
    """A 12-lead net1d-tiny teacher for potassium and the electrolyte classes, trained one step."""
    tmp = tmp_path_factory.mktemp("teacher")
    L.seed_everything(0)
    heads = [PotassiumHead(name="potassium"), MulticlassHead(name="electrolyte")]
    teacher = FineTuneTask(backbone="net1d-tiny", heads=heads, scheduler="none")
    fit(teacher, synthetic_shards, tmp, max_steps=1, limit_val_batches=0)
    path = tmp / "teacher.ckpt"
    teacher.trainer.save_checkpoint(path)
    return path


def student(**kwargs):
    heads = [
        PotassiumHead(name="potassium", target_mean=4.5, target_std=0.8),  # not the teacher's standardisation
        MulticlassHead(name="electrolyte"),
        BinaryHead(name="hyperkalemia"),  # the teacher has no such head: labels only
    ]
    return FineTuneTask(
        backbone="net1d-tiny", leads=["I"], adapter="fold_first_conv", heads=heads, scheduler="none", **kwargs
    )


def test_lead_i_student_learns_from_a_12_lead_teacher(synthetic_shards, teacher_ckpt, tmp_path, monkeypatch):
    ckpt = tmp_path / "teacher.ckpt"
    shutil.copy(teacher_ckpt, ckpt)
    L.seed_everything(0)
    task = student(teacher=str(ckpt), distill_weight=0.5, distill_temperature=2.0)
    trainer = fit(task, synthetic_shards, tmp_path)
    metrics = trainer.callback_metrics
    for key in (
        "train/segment/potassium/distill_loss",
        "train/segment/electrolyte/distill_loss",
        "val/segment/potassium/distill_loss",
    ):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert not any("hyperkalemia/distill" in key for key in metrics)
    val_labels = sum(float(metrics[f"val/segment/{h}/loss"]) for h in ("potassium", "electrolyte", "hyperkalemia"))
    assert float(metrics["val/loss"]) == pytest.approx(val_labels, rel=1e-5)  # val/loss stays the label loss

    # the teacher: frozen, unchanged, not part of the student or its optimizer
    teacher = task.distiller.teacher
    assert not teacher.training and teacher.input_leads.numel() == 12
    for key, value in FineTuneTask.load_frozen(ckpt).state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[key], value)
    assert {key.split(".")[0] for key in task.state_dict()} == {"backbone", "heads"}
    assert task.state_dict()["backbone.first_conv.conv.weight"].shape[1] == 1
    own = [*task.backbone.parameters(), *task.adapter.parameters(), *task.heads.parameters()]
    assert {id(p) for p in task.parameters()} == {id(p) for p in own}
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}

    # the training loss = label losses + distill_weight * distillation losses
    batch = ShardDataset(synthetic_shards).__getitems__(list(range(8)))
    task.eval()
    monkeypatch.setattr(task, "log", lambda *args, **kwargs: None)  # outside the fit loop
    with torch.no_grad():
        total = task._step(batch, "train")
        out, t_out = task(batch["signal"], batch["lead_mask"]), teacher(batch["signal"], batch["lead_mask"])
        expected = sum(task.heads[h].loss(out[h], *task._head_targets(batch, h)) for h in task.heads)
        for h in ("potassium", "electrolyte"):
            ref = teacher.heads[h].distillation_reference()
            expected += 0.5 * task.heads[h].distillation_loss(out[h], t_out[h], 2.0, ref)
    torch.testing.assert_close(total, expected)

    # the student checkpoint records the teacher but reloads without it
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["ecgfm"]["teacher"]["sha256"] == sha256sum(ckpt)
    assert saved["ecgfm"]["teacher"]["heads"] == ["potassium", "electrolyte"]
    assert not any("teacher" in key for key in saved["state_dict"])
    ckpt.unlink()
    reloaded = FineTuneTask.load_from_checkpoint(path, map_location="cpu").eval()
    assert reloaded.distiller.teacher is None  # loaded only when fitting
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch["signal"])["potassium"], task(batch["signal"])["potassium"])


def test_cached_teacher_outputs_equal_the_teachers_and_train(synthetic_shards, teacher_ckpt, tmp_path):
    root = tmp_path / "shards"  # a small folder of its own: caching rewrites the shards
    write_synthetic_shards(root, 120, seed=1, segments_per_shard=48, progress=False)
    assert main(["distill-cache", "--teacher", str(teacher_ckpt), "--root", str(root), "--batch_size", "100"]) == 0
    assert verify_shards(root) == []
    manifest = Manifest.load(root)
    record = manifest.source["teacher_cache"]
    assert record["sha256"] == sha256sum(teacher_ckpt)
    assert record["heads"]["electrolyte"]["labels"] == manifest.targets["electrolyte"].names
    assert manifest.targets["teacher_potassium"].names == ["potassium"]
    with h5py.File(root / manifest.shards[0]["path"]) as f:
        assert f["signal"].chunks is None and f["targets/teacher_potassium"].attrs["teacher_head"] == "potassium"

    rows = [0, 47, 48, 100, 119]  # across the three shards
    batch = ShardDataset(root, targets=["teacher_potassium", "teacher_electrolyte"]).__getitems__(rows)
    with torch.no_grad():
        on_the_fly = FineTuneTask.load_frozen(teacher_ckpt)(batch["signal"], batch["lead_mask"])
    for head in ("potassium", "electrolyte"):
        torch.testing.assert_close(batch["targets"][f"teacher_{head}"], on_the_fly[head], atol=1e-5, rtol=1e-5)

    assert main(["distill-cache", "--teacher", str(teacher_ckpt), "--root", str(root)]) == 0  # again: replaced
    assert verify_shards(root) == [] and len(Manifest.load(root).targets) == len(manifest.targets)

    task = student(teacher=str(teacher_ckpt), teacher_cache=True)
    trainer = fit(task, root, tmp_path)
    assert task.distiller.teacher is None and "train/segment/potassium/distill_loss" in trainer.callback_metrics

    other = tmp_path / "other.ckpt"  # a different teacher: the cache is stale
    torch.save({**torch.load(teacher_ckpt, weights_only=False), "global_step": 99}, other)
    with pytest.raises(ValueError, match="the cache is stale"):
        fit(student(teacher=str(other), teacher_cache=True), root, tmp_path)
    with pytest.raises(ShardError, match="no cached teacher outputs"):
        fit(student(teacher=str(teacher_ckpt), teacher_cache=True), synthetic_shards, tmp_path)


def test_a_head_that_does_not_match_the_teacher_fails_naming_it(synthetic_shards, teacher_ckpt, tmp_path):
    wrong_kind = FineTuneTask(
        backbone="net1d-tiny", heads=[RegressionHead(name="potassium")], teacher=str(teacher_ckpt)
    )
    with pytest.raises(
        ValueError,
        match=r"head 'potassium': the teacher's head .* is a potassium head .* the "
        r"student's a regression head .* needs the same kind",
    ):
        fit(wrong_kind, synthetic_shards, tmp_path)
    labels = ["normal", "hypokalemia"]
    wrong_labels = FineTuneTask(
        backbone="net1d-tiny", heads=[MulticlassHead(name="electrolyte", labels=labels)], teacher=str(teacher_ckpt)
    )
    with pytest.raises(ValueError, match=r"head 'electrolyte'.*needs the same labels"):
        fit(wrong_labels, synthetic_shards, tmp_path)
    unrelated = FineTuneTask(backbone="net1d-tiny", heads=[BinaryHead(name="hyperkalemia")], teacher=str(teacher_ckpt))
    with pytest.raises(ValueError, match=r"has none of the student's heads \['hyperkalemia'\]"):
        fit(unrelated, synthetic_shards, tmp_path)
