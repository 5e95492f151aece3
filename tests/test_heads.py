"""Heads: masked losses, bounded-memory metrics that match hand computations, named predictions."""

import pytest
import torch
import torch.nn.functional as F

from ecgfm.heads import MultiLabelHead, RegressionHead, create_head, list_heads


def built(head, labels, in_features=8):
    head.build(in_features, labels)
    return head


def test_registry_and_specs():
    assert {"multilabel", "regression"} <= set(list_heads())
    head = create_head({"kind": "regression", "name": "k", "units": "mmol/L"})
    assert isinstance(head, RegressionHead) and head.units == "mmol/L"
    with pytest.raises(ValueError, match="unknown head kind 'nope'"):
        create_head({"kind": "nope"})
    with pytest.raises(ValueError, match="outside ecgfm"):
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
    assert set(names) == {"p_perfect", "p_inverted", "p_all_negative"}
    torch.testing.assert_close(names["p_perfect"], torch.sigmoid(logits[:, 0]))


def test_multilabel_masked_entries_do_not_count_in_metrics():
    head = built(MultiLabelHead(name="d"), ["a"])
    metrics = head.metrics()
    target = torch.tensor([[1.0], [0.0], [0.0]])
    logits = torch.tensor([[3.0], [-3.0], [5.0]])  # the third would make AUROC < 1, but it is masked
    head.update_metrics(metrics, logits, target, torch.tensor([[True], [True], [False]]))
    assert head.compute_metrics(metrics)["auroc"] == pytest.approx(1.0, abs=1e-3)


def test_regression_standardises_and_reports_units():
    head = built(RegressionHead(name="k", target_mean=4.2, target_std=0.5, units="mmol/L"), ["potassium"])
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
    with pytest.raises(ValueError, match="loss must be 'mse' or 'huber'"):
        RegressionHead(name="x", loss="l1")
