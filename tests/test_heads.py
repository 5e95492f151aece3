"""Heads: masked losses, bounded-memory metrics that match hand computations, named predictions."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ecgfm.heads import MultiLabelHead, RegressionHead, create_head
from ecgfm.registry import HEADS


def built(head, labels, in_features=8):
    head.build(in_features, labels)
    return head


def test_registry_and_specs():
    assert {"multilabel", "regression"} <= set(HEADS.names())
    head = create_head({"kind": "regression", "name": "k", "units": "mmol/L"})
    assert isinstance(head, RegressionHead) and head.units == "mmol/L"
    with pytest.raises(ValueError, match="unknown head kind 'nope'"):
        create_head({"kind": "nope"})
    with pytest.raises(ValueError, match="unknown head class .os.system.; registered head classes: BinaryHead"):
        create_head({"class_path": "os.system", "init_args": {}})


def test_multilabel_loss_ignores_masked_labels():
    head = built(MultiLabelHead(name="d"), ["a", "b", "c"])
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    expected = F.binary_cross_entropy_with_logits(logits[mask], target[mask])
    torch.testing.assert_close(head.loss(logits, target, mask), expected)
    target_changed = target.clone()
    target_changed[~mask] = 1 - target_changed[~mask]
    torch.testing.assert_close(head.loss(logits, target_changed, mask), expected)


def test_multilabel_metrics_macro_skips_single_class_labels():
    head = built(MultiLabelHead(name="d"), ["perfect", "inverted", "all_negative"])
    metrics = head.metrics()
    target = torch.tensor([[1.0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    logits = torch.tensor([[3.0, -3, 0], [-3, 3, 0], [2, 2, 0], [-2, -2, 0]])
    mask = torch.ones_like(target, dtype=torch.bool)
    head.update_metrics(metrics, logits[:2], target[:2], mask[:2])  # two batches, as in an epoch
    head.update_metrics(metrics, logits[2:], target[2:], mask[2:])
    out = head.compute_metrics(metrics)
    assert out["auroc/perfect"] == pytest.approx(1.0, abs=1e-3)
    assert out["auroc/inverted"] == pytest.approx(0.0, abs=1e-3)
    assert "auroc/all_negative" not in out and out["n_labels_scored"] == 2
    assert out["auroc"] == pytest.approx(0.5, abs=1e-3)
    names = head.postprocess(logits)
    assert set(names) == {"p_perfect", "p_inverted", "p_all_negative", "perfect", "inverted", "all_negative"}
    torch.testing.assert_close(names["p_perfect"], torch.sigmoid(logits[:, 0]))
    torch.testing.assert_close(names["perfect"], (logits[:, 0] >= 0).float())  # threshold p = 0.5 until calibrated


def test_multilabel_masked_entries_do_not_count_in_metrics():
    head = built(MultiLabelHead(name="d"), ["a"])
    metrics = head.metrics()
    target = torch.tensor([[1.0], [0.0], [0.0]])
    logits = torch.tensor([[3.0], [-3.0], [5.0]])  # the third would make AUROC < 1, but it is masked
    head.update_metrics(metrics, logits, target, torch.tensor([[True], [True], [False]]))
    assert head.compute_metrics(metrics)["auroc"] == pytest.approx(1.0, abs=1e-3)


def test_regression_standardises_and_reports_units():
    head = built(RegressionHead(name="k", target_mean=4.2, target_std=0.5, units="mmol/L"), ["potassium"])
    assert not head.uses_statistics
    target = torch.tensor([[4.7], [3.2], [float("nan")]])
    mask = ~target.isnan()
    target = target.nan_to_num(0.0)
    output = torch.tensor([[1.0], [-1.0], [7.0]])  # standardised predictions: 4.7 and 3.7 mmol/L
    torch.testing.assert_close(head.loss(output, target, mask), torch.tensor((0.0**2 + 1.0**2) / 2))
    metrics = head.metrics()
    head.update_metrics(metrics, output, target, mask)
    result = head.compute_metrics(metrics)
    assert result["mae"] == pytest.approx(0.25)  # |4.7-4.7| and |3.7-3.2|; the NaN target is not counted
    assert result["rmse"] == pytest.approx(0.125**0.5)
    pred = head.postprocess(output)
    torch.testing.assert_close(pred["potassium_mmol_l"], torch.tensor([4.7, 3.7, 7.7]))
    huber = built(RegressionHead(name="h", loss="huber", huber_delta=1.0), ["y"])
    torch.testing.assert_close(
        huber.loss(torch.tensor([[3.0]]), torch.tensor([[0.0]]), torch.tensor([[True]])), torch.tensor(2.5)
    )
    with pytest.raises(ValueError, match="loss must be one of mse, huber, gaussian_nll"):
        RegressionHead(name="x", loss="l1")


# ----------------------------------------------------------------------------- multilabel at scale


def test_multilabel_label_file_and_asymmetric_loss(tmp_path):
    vocab = tmp_path / "labels.txt"
    vocab.write_text("# AnyECG-style vocabulary\nAF\nLBBB  # left bundle branch block\n\nRBBB\n")
    head = MultiLabelHead(name="c", labels_file=str(vocab), loss="asymmetric", gamma_pos=0.0, gamma_neg=4.0, clip=0.05)
    assert head.labels == ["AF", "LBBB", "RBBB"] and head.config()["labels_file"] is None
    head.build(8, head.labels)
    logits = torch.tensor([[2.0, -3.0, 0.3], [-1.0, 0.1, -4.0]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.ones_like(target, dtype=torch.bool)
    p = torch.sigmoid(logits)
    p_m = (p - 0.05).clamp(min=0)
    expected = -(target * torch.log(p) + (1 - target) * p_m.pow(4) * torch.log(1 - p_m))
    torch.testing.assert_close(head.loss(logits, target, mask), expected.mean())
    # with gamma 0 and no clip, the asymmetric loss is the BCE
    plain = built(MultiLabelHead(name="c", loss="asymmetric", gamma_neg=0.0, clip=0.0), ["a", "b", "c"])
    torch.testing.assert_close(plain.loss(logits, target, mask), F.binary_cross_entropy_with_logits(logits, target))
    (tmp_path / "twice.txt").write_text("AF\nAF\n")
    with pytest.raises(ValueError, match="twice.txt: labels listed more than once: \\['AF'\\]"):
        MultiLabelHead(labels_file=str(tmp_path / "twice.txt"))
    with pytest.raises(ValueError, match="pos_weight applies to the bce loss only"):
        MultiLabelHead(loss="asymmetric", pos_weight=[1.0])


def test_multilabel_binned_metrics_match_exact_ones():
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    torch.manual_seed(0)
    n, k = 4000, 5
    logits = torch.randn(n, k) * 2
    target = (torch.rand(n, k) < torch.sigmoid(logits - 1.5)).float()
    mask = torch.rand(n, k) > 0.2
    head = built(MultiLabelHead(name="c"), [f"l{i}" for i in range(k)])
    metrics = head.metrics()
    for chunk in range(4):
        rows = slice(chunk * 1000, (chunk + 1) * 1000)
        head.update_metrics(metrics, logits[rows], target[rows], mask[rows])
    out = head.compute_metrics(metrics)
    exact = [binary_auroc(logits[mask[:, i], i], target[mask[:, i], i].long()) for i in range(k)]
    exact_ap = [binary_average_precision(logits[mask[:, i], i], target[mask[:, i], i].long()) for i in range(k)]
    for i in range(k):
        assert out[f"auroc/l{i}"] == pytest.approx(float(exact[i]), abs=2e-3)
    assert out["auroc"] == pytest.approx(float(torch.stack(exact).mean()), abs=2e-3)
    assert out["auprc"] == pytest.approx(float(torch.stack(exact_ap).mean()), abs=5e-3)
    micro = binary_auroc(logits[mask], target[mask].long())
    assert out["micro_auroc"] == pytest.approx(float(micro), abs=2e-3)
    table = head.tables(metrics)["per_label"]
    assert [row["label"] for row in table] == [f"l{i}" for i in range(k)]
    assert table[0]["n"] == int(mask[:, 0].sum()) and table[0]["positives"] == int(target[mask[:, 0], 0].sum())


def test_multilabel_thresholds_chosen_on_validation_maximise_balanced_accuracy():
    head = built(MultiLabelHead(name="c"), ["rare", "never_positive"])
    metrics = head.metrics()
    # rare: positives have logits 1.5 and 2.5, negatives -1, 0.5 and 2.0 -> calling >= 1.5 gives sens 1, spec 2/3
    logits = torch.tensor([[1.5, 0.0], [2.5, 0.0], [-1.0, 0.0], [0.5, 0.0], [2.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    mask = torch.ones_like(target, dtype=torch.bool)
    head.update_metrics(metrics, logits, target, mask)
    head.calibrate(metrics)
    threshold = float(head.decision_logit[0])
    assert 0.5 < threshold <= 1.5  # any edge in (0.5, 1.5] gives the best balanced accuracy, 5/6
    assert float(head.decision_logit[1]) == 0.0  # no positives: keeps p = 0.5
    out = head.compute_metrics(metrics)
    assert out["sensitivity"] == pytest.approx(1.0) and out["specificity"] == pytest.approx(2 / 3)
    called = head.postprocess(logits)["rare"]
    assert called.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_multilabel_balanced_pos_weight_from_training_counts():
    from ecgfm.data.shards import TargetSummary

    head = built(MultiLabelHead(name="c", pos_weight="balanced", max_pos_weight=50.0), ["common", "rare", "absent"])
    assert head.uses_statistics
    values = torch.zeros(200, 3)
    values[:50, 0] = 1  # 50 of 200
    values[:2, 1] = 1  # 2 of 200 -> 99, clipped to 50
    head.fit_statistics(TargetSummary.of(values.numpy()))
    torch.testing.assert_close(head.pos_weight, torch.tensor([150 / 50, 50.0, 1.0]))


# ----------------------------------------------------------------------------- regression, potassium, labs


def test_regression_learns_standardisation_from_a_summary_and_reports_pearson():
    from ecgfm.data.shards import TargetSummary

    head = built(RegressionHead(name="labs", units=["mmol/L", "g/dL"]), ["sodium", "hemoglobin"])
    train = torch.tensor([[140.0, 12.0], [136.0, float("nan")], [144.0, 16.0]])
    head.fit_statistics(TargetSummary.of(train.numpy()))
    torch.testing.assert_close(head.mean, torch.tensor([140.0, 14.0]))
    torch.testing.assert_close(head.std, torch.tensor([4.0, 8.0**0.5]))
    target = torch.tensor([[138.0, 13.0], [142.0, float("nan")], [146.0, 15.0]])
    mask = ~target.isnan()
    prediction = torch.tensor([[137.0, 13.5], [143.0, 99.0], [145.0, 14.0]])
    output = (prediction - head.mean) / head.std
    metrics = head.metrics()
    head.update_metrics(metrics, output, target.nan_to_num(0), mask)
    out = head.compute_metrics(metrics)
    assert out["mae/sodium"] == pytest.approx(1.0, abs=1e-5)
    assert out["mae/hemoglobin"] == pytest.approx(0.75, abs=1e-5)  # the masked 99 does not count
    assert out["pearson/sodium"] == pytest.approx(
        float(torch.corrcoef(torch.stack([prediction[:, 0], target[:, 0]]))[0, 1])
    )
    # |y - train mean| per column: 10/3 and 1; their units differ, so only the unit-free ratio is averaged
    assert "mae" not in out and "mae_mean" not in out
    assert out["mae_ratio"] == pytest.approx((1.0 / (10 / 3) + 0.75 / 1.0) / 2, abs=1e-5)
    names = head.postprocess(output)
    assert set(names) == {"sodium_mmol_l", "hemoglobin_g_dl"}


def test_gaussian_nll_predicts_a_standard_deviation():
    head = built(RegressionHead(name="k", loss="gaussian_nll", target_mean=4.0, target_std=0.5, units="mmol/L"), ["k"])
    output = torch.tensor([[1.0, 0.0], [0.0, 2 * torch.log(torch.tensor(2.0))]])  # mean z, log-variance
    target = torch.tensor([[4.5], [4.0]])
    mask = torch.ones_like(target, dtype=torch.bool)
    # z = 1 and 0; NLL = 0.5 (log var + (z - mu)^2 / var + log 2 pi)
    expected = 0.5 * (torch.tensor([0.0, 2 * 0.6931472]) + torch.tensor([0.0, 0.0]) + 1.8378771).mean()
    torch.testing.assert_close(head.loss(output, target, mask), expected)
    names = head.postprocess(output)
    torch.testing.assert_close(names["k_mmol_l"], torch.tensor([4.5, 4.0]))
    torch.testing.assert_close(names["k_sd_mmol_l"], torch.tensor([0.5, 1.0]))
    metrics = head.metrics()
    head.update_metrics(metrics, output, torch.tensor([[4.5], [7.0]]), mask)  # 2nd is 3 sds off: outside the 95 %
    assert head.compute_metrics(metrics)["coverage_95"] == pytest.approx(0.5)


def test_potassium_head_scores_clinical_classes_from_the_continuous_prediction():
    from ecgfm.heads import PotassiumHead

    head = built(PotassiumHead(target_mean=4.5, target_std=1.0), ["potassium"])
    truth = torch.tensor([3.0, 3.2, 4.0, 4.5, 5.8, 6.8, 2.3, 5.0])
    prediction = torch.tensor([3.4, 3.6, 4.1, 4.4, 5.6, 6.0, 2.9, 5.7])
    output = (prediction - 4.5)[:, None]
    mask = torch.ones(8, 1, dtype=torch.bool)
    metrics = head.metrics()
    head.update_metrics(metrics, output, truth[:, None], mask)
    out = head.compute_metrics(metrics)
    # hypokalemia (< 3.5): cases 3.0, 3.2, 2.3 predicted 3.4, 3.6, 2.9 -> 2 of 3 called; non-cases none called
    assert out["sensitivity/hypokalemia"] == pytest.approx(2 / 3)
    assert out["specificity/hypokalemia"] == pytest.approx(1.0)
    assert out["auroc/hypokalemia"] == pytest.approx(1.0)  # the ranking is perfect even where the threshold is not
    # hyperkalemia (> 5.5): cases 5.8, 6.8 both called; 5.0 predicted 5.7 is a false positive
    assert out["sensitivity/hyperkalemia"] == pytest.approx(1.0)
    assert out["specificity/hyperkalemia"] == pytest.approx(5 / 6)
    assert out["auroc/hyperkalemia"] == pytest.approx(11 / 12)  # 5.6 ranks below the non-case predicted 5.7
    assert "auroc/severe_hyperkalemia" in out and "auroc/severe_hypokalemia" in out
    assert out["mae"] == pytest.approx(float((prediction - truth).abs().mean()), abs=1e-5)
    names = head.postprocess(output)
    assert names["hyperkalemia"].tolist() == [0, 0, 0, 0, 1, 1, 0, 1]
    assert "potassium_mmol_l" in names
    table = head.tables(metrics)["classes"]
    assert table[0]["class"] == "hypokalemia" and table[0]["cases"] == 3
    with pytest.raises(ValueError, match="potassium is one column"):
        PotassiumHead().build(8, ["k", "na"])
    with pytest.raises(ValueError, match="direction '<' or '>'"):
        PotassiumHead(classes={"odd": ("=", 4.0)})


def test_labs_head_scores_abnormal_values_against_reference_ranges(tmp_path):
    from ecgfm.heads import LabsHead

    ranges = tmp_path / "ranges.csv"
    ranges.write_text("lab,low,high,units\nsodium,135,145,mmol/L\ntroponin,,14,ng/L\n")
    head = built(
        LabsHead(reference_ranges=str(ranges), target_mean=[140, 10, 0], target_std=[5, 10, 1]),
        ["sodium", "troponin", "no_range"],
    )
    assert head.column_units() == ["mmol/L", "ng/L", ""]
    target = torch.tensor([[130.0, 5.0, 1.0], [140.0, 50.0, 2.0], [150.0, float("nan"), 3.0], [138.0, 8.0, 4.0]])
    mask = ~target.isnan()
    prediction = torch.tensor([[134.0, 9.0, 0.0], [139.0, 30.0, 0.0], [141.0, 0.0, 0.0], [137.0, 12.0, 0.0]])
    output = (prediction - head.mean) / head.std
    metrics = head.metrics()
    head.update_metrics(metrics, output, target.nan_to_num(0), mask)
    out = head.compute_metrics(metrics)
    # sodium: abnormal 130 (score 1 below) and 150 (predicted 141: -4 inside); normal 140 (-4), 138 (-2)
    # -> pairs: (1 vs -4, -2) wins 2, (-4 vs -4 tie, -2 lose) 0.5 -> 2.5 / 4
    assert out["auroc/sodium"] == pytest.approx(2.5 / 4)
    assert out["auroc/troponin"] == pytest.approx(1.0)  # one-sided range: only 50 is abnormal, predicted 30
    assert "auroc/no_range" not in out and out["n_labs_scored"] == 2
    assert head.config()["ranges"]["troponin"] == [None, 14.0, "ng/L"]
    table = head.tables(metrics)["per_lab"]
    assert table[0]["abnormal"] == 2 and table[1]["n"] == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("lab,low,high\nsodium,145,135\n")
    with pytest.raises(ValueError, match="bad.csv, line 2 \\(sodium\\): low 145.0 is not below high 135.0"):
        LabsHead(reference_ranges=str(bad))


def test_shipped_reference_ranges_match_the_synthetic_labs():
    from ecgfm.data.synthetic import SYNTHETIC_LABS
    from ecgfm.heads.labs import load_reference_ranges

    ranges = load_reference_ranges(Path(__file__).resolve().parents[1] / "recipes" / "labs" / "reference_ranges.csv")
    assert list(ranges) == list(SYNTHETIC_LABS)
    for lab, spec in SYNTHETIC_LABS.items():
        assert tuple(ranges[lab][:2]) == spec["reference"] and ranges[lab][2] == spec["unit"]


def test_multilabel_scalar_pos_weight_and_a_call_everything_threshold():
    head = built(MultiLabelHead(name="c", pos_weight=5.0), ["a", "b"])
    torch.testing.assert_close(head.pos_weight, torch.tensor([5.0, 5.0]))
    f1 = built(MultiLabelHead(name="c", threshold_criterion="f1"), ["common"])
    metrics = f1.metrics()
    # 4 positives of 5: calling everything positive maximises F1, below the histogram's range included
    f1.update_metrics(
        metrics,
        torch.tensor([[-20.0], [-3.0], [1.0], [2.0], [-1.0]]),
        torch.tensor([[1.0]] * 4 + [[0.0]]),
        torch.ones(5, 1, dtype=torch.bool),
    )
    f1.calibrate(metrics)
    assert float(f1.decision_logit[0]) == float("-inf")
    assert f1.postprocess(torch.tensor([[-30.0]]))["common"].item() == 1.0
