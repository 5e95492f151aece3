"""Multiclass (electrolyte) and binary (outcome) heads: masked losses, learnt weights, metrics that match hand
computations and torchmetrics, threshold calibration, and their recipes end to end."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAUROC

from ecgfm.commands import main
from ecgfm.commands.lightning import run_lightning
from ecgfm.data.shards import TargetSummary
from ecgfm.heads import BinaryHead, MulticlassHead, create_head
from ecgfm.heads.binary import soft_fbeta
from ecgfm.registry import HEADS
from ecgfm.tasks import FineTuneTask

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ELECTROLYTE_RECIPE = RECIPES / "electrolyte" / "net1d-small.yaml"
OUTCOME_RECIPE = RECIPES / "outcome" / "net1d-small.yaml"
CLASSES = ["normal", "hypokalemia", "hyperkalemia", "hyponatremia"]


def built(head, labels, in_features=8):
    head.build(in_features, labels)
    return head


def onehot(classes, k=4, missing=()):
    """One-hot targets and masks; rows in ``missing`` are all NaN / all False, as the shards store them."""
    target = F.one_hot(torch.as_tensor(classes), k).float()
    mask = torch.ones_like(target, dtype=torch.bool)
    for i in missing:
        target[i], mask[i] = float("nan"), False
    return target, mask


# ----------------------------------------------------------------------------------------------------- multiclass


def test_registry_and_configs():
    assert {"multiclass", "binary"} <= set(HEADS.names())
    head = create_head({"kind": "multiclass", "name": "e", "class_weights": "balanced"})
    assert isinstance(head, MulticlassHead) and head.uses_statistics
    assert not MulticlassHead(name="e", class_weights=[1.0, 2.0, 1.0, 1.0]).uses_statistics
    assert create_head(BinaryHead(name="o", loss="weighted_bce").config()).uses_statistics  # default: balanced
    with pytest.raises(ValueError, match="class_weights must be a list of floats or 'balanced'"):
        MulticlassHead(name="e", class_weights="inverse")
    with pytest.raises(ValueError, match="class_weights needs 4 finite non-negative values"):
        built(MulticlassHead(name="e", class_weights=[1.0, 2.0]), CLASSES)
    with pytest.raises(ValueError, match="loss must be one of"):
        BinaryHead(name="o", loss="focal")
    with pytest.raises(ValueError, match="pos_weight needs loss 'weighted_bce' or 'fbeta'"):
        BinaryHead(name="o", loss="bce", pos_weight=3.0)
    with pytest.raises(ValueError, match="predicts one label, got 2"):
        built(BinaryHead(name="o"), ["a", "b"])


def test_multiclass_loss_ignores_masked_rows_and_weights_classes():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    target, mask = onehot([0, 1, 2, 3, 2, 1], missing=[1, 4])
    known = torch.tensor([0, 2, 3, 5])
    y = torch.tensor([0, 1, 2, 3, 2, 1])
    head = built(MulticlassHead(name="e"), CLASSES)
    torch.testing.assert_close(head.loss(logits, target, mask), F.cross_entropy(logits[known], y[known]))
    changed = target.clone()
    changed[1] = torch.tensor([0.0, 0, 0, 1])  # under the mask: must not move the loss
    torch.testing.assert_close(head.loss(logits, changed, mask), head.loss(logits, target, mask))
    # one missing column makes the whole row unlabelled
    partial = mask.clone()
    partial[0, 3] = False
    torch.testing.assert_close(head.loss(logits, target, partial), F.cross_entropy(logits[[2, 3, 5]], y[[2, 3, 5]]))

    w = [0.5, 2.0, 1.0, 3.0]
    weighted = built(MulticlassHead(name="e", class_weights=w), CLASSES)
    expected = F.cross_entropy(logits[known], y[known], weight=torch.tensor(w))
    torch.testing.assert_close(weighted.loss(logits, target, mask), expected)
    smooth = built(MulticlassHead(name="e", label_smoothing=0.1), CLASSES)
    expected = F.cross_entropy(logits[known], y[known], label_smoothing=0.1)
    torch.testing.assert_close(smooth.loss(logits, target, mask), expected)
    # nothing labelled: 0, with a gradient path
    logits.requires_grad_(True)
    none = head.loss(logits, target, torch.zeros_like(mask))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_balanced_class_weights_from_a_summary():
    classes = np.array([0] * 50 + [1] * 20 + [2] * 25 + [3] * 5)
    values = np.eye(4)[classes]
    values = np.concatenate([values, np.full((7, 4), np.nan)])  # unlabelled rows do not count
    head = built(MulticlassHead(name="e", class_weights="balanced"), CLASSES)
    assert head.class_weight.tolist() == [1.0, 1.0, 1.0, 1.0]  # until the training split is seen
    head.fit_statistics(TargetSummary.of(values))
    n, counts = 100, np.array([50, 20, 25, 5])
    np.testing.assert_allclose(head.class_weight.numpy(), n / (4 * counts), rtol=1e-6)
    assert "class_weight" in head.state_dict()

    absent = built(MulticlassHead(name="e", class_weights="balanced"), CLASSES)
    with pytest.warns(UserWarning, match=r"classes \['hyponatremia'\] do not occur in the training split"):
        absent.fit_statistics(TargetSummary.of(np.eye(4)[[0, 0, 1, 2]]))
    np.testing.assert_allclose(absent.class_weight.numpy(), [4 / 8, 4 / 4, 4 / 4, 0.0])
    with pytest.raises(ValueError, match="no labelled rows"):
        absent.fit_statistics(TargetSummary.of(np.full((3, 4), np.nan)))


def test_multiclass_confusion_statistics_match_hand_computations():
    head = built(MulticlassHead(name="e"), ["a", "b", "c"])
    # true a: 3 rows predicted a, a, b; true b: 2 rows predicted b, b; true c: 3 rows predicted c, a, c
    true = [0, 0, 0, 1, 1, 2, 2, 2]
    predicted = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2])
    logits = F.one_hot(predicted, 3).float() * 3.0
    target, mask = onehot(true + [1], k=3, missing=[8])  # plus one unlabelled row predicted "c"
    logits = torch.cat([logits, torch.tensor([[0.0, 0.0, 5.0]])])
    metrics = head.metrics()
    head.update_metrics(metrics, logits, target, mask)
    out = head.compute_metrics(metrics)
    # confusion [[2, 1, 0], [0, 2, 0], [1, 0, 2]], n = 8
    assert out["accuracy"] == pytest.approx(6 / 8)
    cov_ty = 6 * 8 - (3 * 3 + 3 * 2 + 2 * 3)  # sum_k t_k p_k: true (3, 2, 3), predicted (3, 3, 2)
    mcc = cov_ty / math.sqrt((64 - (9 + 9 + 4)) * (64 - (9 + 4 + 9)))
    assert out["mcc"] == pytest.approx(mcc)
    hand = {  # one-vs-rest tp, fn, fp, tn per class
        "a": (2, 1, 1, 4),
        "b": (2, 0, 1, 5),
        "c": (2, 1, 0, 5),
    }
    for label, (tp, fn, fp, tn) in hand.items():
        assert out[f"sensitivity/{label}"] == pytest.approx(tp / (tp + fn))
        assert out[f"specificity/{label}"] == pytest.approx(tn / (tn + fp))
        assert out[f"ppv/{label}"] == pytest.approx(tp / (tp + fp))
        assert out[f"npv/{label}"] == pytest.approx(tn / (tn + fn))
        assert out[f"f1/{label}"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert out["sensitivity"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    tables = head.tables(metrics)
    assert tables["confusion"][2] == {"true": "c", "n": 3, "pred_a": 1, "pred_b": 0, "pred_c": 2}
    row = tables["per_class"][0]
    assert list(row)[:3] == ["class", "n", "auroc"] and row["class"] == "a" and row["n"] == 3
    assert {"sensitivity", "specificity", "ppv", "npv", "f1"} <= set(row)
    assert row["npv"] == pytest.approx(4 / 5)
    pred = head.postprocess(logits)
    assert set(pred) == {"p_a", "p_b", "p_c", "class"}
    assert pred["class"].tolist() == [0, 0, 1, 1, 1, 2, 0, 2, 2]
    torch.testing.assert_close(pred["p_a"] + pred["p_b"] + pred["p_c"], torch.ones(9))


def test_multiclass_auroc_matches_torchmetrics_and_batches_add_up():
    generator = torch.Generator().manual_seed(0)
    n, k = 600, 4
    y = torch.randint(0, k, (n,), generator=generator)
    logits = torch.randn(n, k, generator=generator) + 1.2 * F.one_hot(y, k)  # informative, not perfect
    target, mask = onehot(y.tolist())
    head = built(MulticlassHead(name="e"), CLASSES)

    exact = MulticlassAUROC(num_classes=k, average=None, thresholds=None)(logits.softmax(-1), y)
    whole = head.metrics()
    head.update_metrics(whole, logits, target, mask)
    out = head.compute_metrics(whole)
    for i, label in enumerate(CLASSES):
        assert out[f"auroc/{label}"] == pytest.approx(float(exact[i]), abs=1e-3)
    assert out["auroc"] == pytest.approx(float(exact.mean()), abs=1e-3)

    split = head.metrics()
    head.update_metrics(split, logits[:250], target[:250], mask[:250])
    head.update_metrics(split, logits[250:], target[250:], mask[250:])
    two = head.compute_metrics(split)
    assert set(two) == set(out)
    for key, value in out.items():
        torch.testing.assert_close(two[key], value, equal_nan=True)


# ----------------------------------------------------------------------------------------------------- binary


def test_binary_losses_ignore_masked_samples():
    logits = torch.tensor([[2.0], [-1.0], [0.3], [4.0], [-2.0]])
    target = torch.tensor([[1.0], [0.0], [float("nan")], [0.0], [1.0]])
    mask = ~target.isnan()
    keep = mask[:, 0]
    y = target.nan_to_num(0.0)
    bce = built(BinaryHead(name="o"), ["arrest"])
    torch.testing.assert_close(bce.loss(logits, y, mask), F.binary_cross_entropy_with_logits(logits[keep], y[keep]))
    weighted = built(BinaryHead(name="o", loss="weighted_bce", pos_weight=3.0), ["arrest"])
    expected = F.binary_cross_entropy_with_logits(logits[keep], y[keep], pos_weight=torch.tensor(3.0))
    torch.testing.assert_close(weighted.loss(logits, y, mask), expected)

    fbeta = built(BinaryHead(name="o", loss="fbeta", beta=2.0, fbeta_mix=0.3), ["arrest"])
    p, t = torch.sigmoid(logits[keep, 0]), y[keep, 0]
    tp, fp, fn = (p * t).sum(), (p * (1 - t)).sum(), ((1 - p) * t).sum()
    f2 = 5 * tp / (5 * tp + 4 * fn + fp)
    expected = 0.3 * (1 - f2) + 0.7 * F.binary_cross_entropy_with_logits(logits[keep], y[keep])
    torch.testing.assert_close(fbeta.loss(logits, y, mask), expected, atol=1e-5, rtol=1e-5)
    recall = built(BinaryHead(name="o", loss="recall"), ["arrest"])
    # labelled: logits 2, -1, 4, -2 with labels 1, 0, 0, 1 at threshold 0: positives 1 of 2 missed (weight 0.5),
    # negatives 1 of 2 called (weight 0.5); (1 - recall_c) x BCE summed over the labelled, / their number
    each = F.binary_cross_entropy_with_logits(logits[keep], y[keep], reduction="none")[:, 0]
    torch.testing.assert_close(recall.loss(logits, y, mask), (0.5 * each).sum() / 4)
    recall.threshold.fill_(3.0)  # both positives missed (weight 1); the negative at 4.0 still called (0.5)
    torch.testing.assert_close(recall.loss(logits, y, mask), (each * torch.tensor([1.0, 0.5, 0.5, 1.0])).sum() / 4)
    recall.threshold.fill_(0.0)
    with pytest.raises(ValueError, match="pos_weight needs loss"):
        BinaryHead(name="o", loss="recall", pos_weight=2.0)
    for head in (bce, weighted, fbeta, recall):  # flipping or moving a masked sample changes nothing
        flipped, moved = y.clone(), logits.clone()
        flipped[2], moved[2] = 1.0, -9.0
        torch.testing.assert_close(head.loss(moved, flipped, mask), head.loss(logits, y, mask))
        nothing = head.loss(logits, y, torch.zeros_like(mask))
        assert nothing.item() == 0.0


def test_soft_f2_prefers_recall_at_equal_bce():
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    ones = torch.ones(4)
    recall = torch.tensor([0.9, 0.9, 0.6, 0.6])  # catches the positives, with false alarms
    precision = torch.tensor([0.4, 0.4, 0.1, 0.1])  # few false alarms, misses positives
    torch.testing.assert_close(F.binary_cross_entropy(recall, y), F.binary_cross_entropy(precision, y))
    assert soft_fbeta(recall, y, ones, beta=2.0) > soft_fbeta(precision, y, ones, beta=2.0)
    assert soft_fbeta(recall, y, ones, beta=0.5) < soft_fbeta(precision, y, ones, beta=0.5)
    head = built(BinaryHead(name="o", loss="fbeta", beta=2.0, fbeta_mix=0.5), ["arrest"])
    logit = torch.logit
    mask = torch.ones(4, 1, dtype=torch.bool)
    assert head.loss(logit(recall)[:, None], y[:, None], mask) < head.loss(logit(precision)[:, None], y[:, None], mask)


def test_binary_balanced_pos_weight():
    head = built(BinaryHead(name="o", loss="weighted_bce"), ["arrest"])
    values = np.array([[1.0]] * 10 + [[0.0]] * 30 + [[np.nan]] * 5)
    head.fit_statistics(TargetSummary.of(values))
    assert head.pos_weight.item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="has 0 positives and 4 negatives"):
        head.fit_statistics(TargetSummary.of(np.zeros((4, 1))))


def test_binary_calibrate_picks_the_f1_best_threshold():
    head = built(BinaryHead(name="o"), ["arrest"])
    # scores, best first: 2.0 P, 1.0 N, 0.5 P, -0.5 P, -1.0 N, -2.0 N (one masked sample at 3.0 N)
    logits = torch.tensor([[2.0], [1.0], [0.5], [-0.5], [-1.0], [-2.0], [3.0]])
    target = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [0.0], [0.0]])
    mask = torch.tensor([[True]] * 6 + [[False]])
    metrics = head.metrics()
    head.update_metrics(metrics, logits[:3], target[:3], mask[:3])
    head.update_metrics(metrics, logits[3:], target[3:], mask[3:])
    before = head.compute_metrics(metrics)  # threshold logit 0: calls 2.0, 1.0, 0.5 -> tp 2, fp 1, fn 1
    assert before["auroc"] == pytest.approx(7 / 9, abs=1e-3)
    assert before["f1"] == pytest.approx(4 / 6) and before["sensitivity"] == pytest.approx(2 / 3)
    assert before["specificity"] == pytest.approx(2 / 3) and before["precision"] == pytest.approx(2 / 3)
    assert before["threshold"] == pytest.approx(0.5) and before["prevalence"] == pytest.approx(0.5)
    # F1 by threshold: (1, 2] 0.5; (0.5, 1] 0.4; (-0.5, 0.5] 0.667; (-1, -0.5] 0.857; (-2, -1] 0.75; <= -2 0.667
    head.calibrate(metrics)
    assert -1.0 < head.threshold.item() <= -0.5
    after = head.compute_metrics(metrics)
    assert after["f1"] == pytest.approx(6 / 7) and after["sensitivity"] == 1.0
    assert after["specificity"] == pytest.approx(2 / 3) and after["precision"] == pytest.approx(3 / 4)
    pred = head.postprocess(logits[:6])
    assert pred["arrest"].tolist() == [1, 1, 1, 1, 0, 0]
    torch.testing.assert_close(pred["p_arrest"], torch.sigmoid(logits[:6, 0]))
    tables = head.tables(metrics)
    assert tables["operating_point"][0]["f1"] == pytest.approx(6 / 7)
    assert max(row["f1"] for row in tables["curve"]) == pytest.approx(6 / 7)
    assert len(tables["curve"]) == 6
    # the threshold is a buffer: it travels in the state dict
    again = built(BinaryHead(name="o"), ["arrest"])
    again.load_state_dict(head.state_dict())
    assert again.threshold.item() == head.threshold.item()
    # no negatives seen: nothing to calibrate against, the threshold stays
    lonely = head.metrics()
    head.update_metrics(lonely, logits[:1], target[:1], mask[:1])
    head.calibrate(lonely)
    assert -1.0 < head.threshold.item() <= -0.5


def test_threshold_criteria_differ_where_f1_ignores_true_negatives():
    # positives 3.0, 3.0, -0.5; negatives 2.0, five at 0.0 and thirty at -2.0
    logits = torch.tensor([3.0, 3.0, -0.5, 2.0] + [0.0] * 5 + [-2.0] * 30)[:, None]
    target = torch.tensor([1.0, 1.0, 1.0] + [0.0] * 36)[:, None]
    mask = torch.ones_like(target, dtype=torch.bool)
    chosen = {}
    for criterion in ("f1", "balanced_accuracy"):
        head = built(BinaryHead(name="o", threshold_criterion=criterion), ["arrest"])
        metrics = head.metrics()
        head.update_metrics(metrics, logits, target, mask)
        head.calibrate(metrics)
        chosen[criterion] = (head.threshold.item(), head.compute_metrics(metrics))
    threshold, out = chosen["f1"]  # F1 4/5 calling only the two at 3.0
    assert 2.0 < threshold <= 3.0 and out["f1"] == pytest.approx(4 / 5)
    threshold, out = chosen["balanced_accuracy"]  # sensitivity 1, specificity 30/36
    assert -2.0 < threshold <= -0.5
    assert out["sensitivity"] == 1.0 and out["specificity"] == pytest.approx(30 / 36)


# ----------------------------------------------------------------------------------------------------- recipes


def recipe_args(recipe, shards, tmp_path, *extra):
    return [
        "--config",
        str(recipe),
        f"--data.root={shards}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false",
        "--data.num_workers=0",
        *extra,
    ]


def test_electrolyte_recipe_fast_dev_run(synthetic_shards, tmp_path):
    args = recipe_args(ELECTROLYTE_RECIPE, synthetic_shards, tmp_path, "--trainer.fast_dev_run=true")
    assert main(["fit", *args, "--data.batch_size=8"]) == 0


def test_outcome_recipe_fast_dev_run(ludb_shards, tmp_path):
    args = recipe_args(OUTCOME_RECIPE, ludb_shards, tmp_path, "--trainer.fast_dev_run=true")
    assert main(["fit", *args]) == 0


def test_electrolyte_fit_keeps_balanced_weights_in_the_checkpoint(synthetic_shards, tmp_path):
    args = recipe_args(
        ELECTROLYTE_RECIPE,
        synthetic_shards,
        tmp_path,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--data.batch_size=8",
        "--model.backbone=net1d-tiny",
    )
    cli = run_lightning(["fit", *args])
    weights = cli.model.heads["electrolyte"].class_weight.cpu()
    counts = cli.datamodule.target_summary("electrolyte").total
    expected = counts.sum() / (4 * counts)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5)
    assert not torch.allclose(weights, torch.ones(4))
    for key in (
        "val/segment/electrolyte/auroc",
        "val/segment/electrolyte/accuracy",
        "val/segment/electrolyte/mcc",
        "val/segment/electrolyte/f1",
    ):
        assert key in cli.trainer.callback_metrics, key
    assert "val/segment/electrolyte/sensitivity/hyperkalemia" in cli.trainer.callback_metrics

    model = FineTuneTask.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu")
    torch.testing.assert_close(model.heads["electrolyte"].class_weight, weights)
    assert model.heads["electrolyte"].labels == CLASSES

    tables = Path(cli.trainer.log_dir) / "tables"
    with open(tables / "val-segment-electrolyte-per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == CLASSES
    assert {"n", "auroc", "sensitivity", "specificity", "ppv", "npv", "f1"} <= set(rows[0])
    assert (tables / "val-segment-electrolyte-confusion.csv").is_file()
