"""Binary outcomes (cardiac arrest, as EIANet: AUROC 0.896, AUPRC 0.842; or one label of a multilabel target): one
logit, BCE / weighted BCE / soft F-beta loss, binned AUROC and AUPRC, and F1, sensitivity, specificity and precision at
a decision threshold that validation calibrates."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ecgfm.data.shards import TargetSummary
from ecgfm.heads.base import Head, fill_missing, masked_mean, sigmoid_distillation
from ecgfm.metrics import BinnedScores
from ecgfm.registry import HEADS

LOSSES = ("bce", "weighted_bce", "fbeta", "recall")
CRITERIA = ("f1", "balanced_accuracy")


def recall_weighted_bce(logits: Tensor, target: Tensor, known: Tensor, threshold: Tensor) -> Tensor:
    """The binary recall loss (Tian et al. 2021; EIANet's): each sample's BCE weighted by its class's error rate in
    this batch at the current decision threshold, 1 - sensitivity for positives and 1 - specificity for negatives
    (weights carry no gradient), summed over the labelled samples and divided by their number."""
    with torch.no_grad():
        called = logits > threshold
        positive, negative = (target > 0.5) & known, (target <= 0.5) & known
        miss_pos = (positive & ~called).sum() / positive.sum().clamp(min=1)
        miss_neg = (negative & called).sum() / negative.sum().clamp(min=1)
        weight = torch.where(target > 0.5, miss_pos, miss_neg).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return masked_mean(weight * bce, known)


def soft_fbeta(probs: Tensor, target: Tensor, weight: Tensor, beta: float = 1.0, eps: float = 1e-6) -> Tensor:
    """F-beta over a batch with probabilities in place of 0/1 calls: soft tp = sum p y, fp = sum p (1 - y),
    fn = sum (1 - p) y over the samples where ``weight`` is 1; F = (1 + b^2) tp / ((1 + b^2) tp + b^2 fn + fp)."""
    tp = (probs * target * weight).sum()
    fp = (probs * (1 - target) * weight).sum()
    fn = ((1 - probs) * target * weight).sum()
    b2 = beta * beta
    return (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp + eps)


@HEADS.register("binary")
class BinaryHead(Head):
    """One logit for one binary label; missing labels are masked out of the loss and the metrics.

    Args:
        loss: ``bce``; ``weighted_bce`` (positives weighted by ``pos_weight``); ``fbeta``:
            ``fbeta_mix * (1 - soft F-beta) + (1 - fbeta_mix) * BCE``, the soft F-beta taken over the batch; or
            ``recall``: EIANet's binary recall loss, BCE weighted per class by the batch's miss rate of that class.
        pos_weight: weight of positives in the BCE of ``weighted_bce`` (default ``"balanced"``) or of ``fbeta``
            (default 1): a float, or ``"balanced"`` = negatives / positives in the training split.
        beta: F-beta's beta; beta > 1 favours recall (sensitivity), beta < 1 precision.
        fbeta_mix: share of the soft F-beta term in the ``fbeta`` loss (the rest is BCE, which keeps gradients
            flowing in batches without positives).
        threshold_criterion: what ``calibrate`` maximises on validation when it moves the decision threshold:
            ``f1`` or ``balanced_accuracy``.
        dropout: dropout on the features before the linear layer.
        bins: histogram bins over logits in [-16, 16] for AUROC, AUPRC and threshold search.
    """

    target_kinds = ("binary", "multilabel")
    temperature_kind = "binary"

    def __init__(
        self,
        name: str = "outcome",
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
        loss: Literal["bce", "weighted_bce", "fbeta", "recall"] = "bce",
        pos_weight: float | str | None = None,
        beta: float = 1.0,
        fbeta_mix: float = 0.5,
        threshold_criterion: Literal["f1", "balanced_accuracy"] = "f1",
        dropout: float = 0.0,
        bins: int = 1024,
    ):
        super().__init__(name, target, labels, loss_weight)
        if loss not in LOSSES:
            raise ValueError(f"head {name!r}: loss must be one of {LOSSES}, got {loss!r}")
        if threshold_criterion not in CRITERIA:
            raise ValueError(
                f"head {name!r}: threshold_criterion must be one of {CRITERIA}, got {threshold_criterion!r}"
            )
        if loss == "weighted_bce" and pos_weight is None:
            pos_weight = "balanced"
        if pos_weight is not None and loss in ("bce", "recall"):
            raise ValueError(f"head {name!r}: pos_weight needs loss 'weighted_bce' or 'fbeta', not {loss!r}")
        if isinstance(pos_weight, str) and pos_weight != "balanced":
            raise ValueError(f"head {name!r}: pos_weight must be a number or 'balanced', got {pos_weight!r}")
        if pos_weight is not None and not isinstance(pos_weight, str) and not pos_weight > 0:
            raise ValueError(f"head {name!r}: pos_weight must be positive, got {pos_weight}")
        if not beta > 0:
            raise ValueError(f"head {name!r}: beta must be positive, got {beta}")
        if not 0.0 <= fbeta_mix <= 1.0:
            raise ValueError(f"head {name!r}: fbeta_mix must be in [0, 1], got {fbeta_mix}")
        self.loss_name = loss
        self.pos_weight_value = pos_weight
        self.beta = beta
        self.fbeta_mix = fbeta_mix
        self.threshold_criterion = threshold_criterion
        self.dropout = dropout
        self.bins = bins
        self.uses_statistics = pos_weight == "balanced"

    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        if n_outputs != 1:
            raise ValueError(
                f"head {self.name!r}: a binary head predicts one label, got {n_outputs} ({self.labels}); "
                "pick one with labels: [name]"
            )
        self.classifier = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(in_features, 1))
        weight = 1.0 if self.pos_weight_value in (None, "balanced") else float(self.pos_weight_value)
        self.register_buffer("pos_weight", torch.tensor(weight))
        #: decision threshold on the logit (0 = probability 0.5 until validation calibrates it)
        self.register_buffer("threshold", torch.tensor(0.0))

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(features)

    @property
    def label(self) -> str:
        return self.labels[0]

    # ----------------------------------------------------------------- loss
    def loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        logits = output.float().reshape(-1)
        known = mask.reshape(-1)
        y = fill_missing(target.float(), mask).reshape(-1)
        if self.loss_name == "recall":
            return recall_weighted_bce(logits, y, known, self.threshold)
        pos_weight = self.pos_weight if self.pos_weight_value is not None else None
        bce = masked_mean(F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none"), known)
        if self.loss_name != "fbeta":
            return bce
        fbeta = soft_fbeta(torch.sigmoid(logits), y, known.to(logits.dtype), self.beta)
        fbeta_loss = torch.where(known.any(), 1 - fbeta, torch.zeros_like(fbeta))
        return self.fbeta_mix * fbeta_loss + (1 - self.fbeta_mix) * bce

    def distillation_loss(
        self,
        student_output: Tensor,
        teacher_output: Tensor,
        temperature: float = 1.0,
        reference: dict[str, Any] | None = None,
    ) -> Tensor:
        """Bernoulli KL of the tempered logit (BCE against the teacher's probability minus its entropy), times
        T^2, averaged over samples; pos_weight and the F-beta term do not apply."""
        return sigmoid_distillation(student_output, teacher_output, temperature)

    def fit_statistics(self, summary: TargetSummary) -> None:
        """``pos_weight: balanced``: negatives / positives over the training split's known labels."""
        if self.pos_weight_value != "balanced":
            return
        positives = float(summary.total[0])
        negatives = float(summary.count[0]) - positives
        if positives <= 0 or negatives <= 0:
            raise ValueError(
                f"head {self.name!r}: pos_weight 'balanced' needs positives and negatives of {self.label!r} in the "
                f"training split; it has {positives:.0f} positives and {negatives:.0f} negatives"
            )
        self.pos_weight.fill_(negatives / positives)

    # ----------------------------------------------------------------- metrics
    def metrics(self) -> MetricCollection:
        return MetricCollection({"scores": BinnedScores(1, bins=self.bins)})

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        metrics["scores"].update(output.float().reshape(-1, 1), fill_missing(target.float(), mask), mask)

    def _counts_at_threshold(self, metrics: MetricCollection) -> dict[str, float]:
        scores = metrics["scores"]
        hist = scores.compute()[0].double()
        first = int(scores.first_bin_at(self.threshold.reshape(1)).item())
        tp, fp = float(hist[0, first:].sum()), float(hist[1, first:].sum())
        positives, negatives = float(hist[0].sum()), float(hist[1].sum())
        return {"tp": tp, "fp": fp, "fn": positives - tp, "tn": negatives - fp}

    @staticmethod
    def _rates(c: dict[str, float]) -> dict[str, float]:
        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else float("nan")

        return {
            "f1": ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
            "sensitivity": ratio(c["tp"], c["tp"] + c["fn"]),
            "specificity": ratio(c["tn"], c["tn"] + c["fp"]),
            "precision": ratio(c["tp"], c["tp"] + c["fp"]),
        }

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """AUROC, AUPRC, prevalence, and F1 / sensitivity / specificity / precision at the decision threshold
        (``threshold``, as a probability)."""
        hist = metrics["scores"].compute()
        positives, negatives = (float(t[0]) for t in BinnedScores.totals(hist))
        nan = float("nan")
        out = {
            "auroc": float(BinnedScores.auroc(hist)[0]),
            "auprc": float(BinnedScores.average_precision(hist)[0]),
            "prevalence": positives / (positives + negatives) if positives + negatives else nan,
            **self._rates(self._counts_at_threshold(metrics)),
            "threshold": self._probability_at(float(self.threshold)),
        }
        return {key: torch.tensor(value, dtype=torch.float32) for key, value in out.items()}

    def calibrate(self, metrics: MetricCollection) -> None:
        """Move the threshold to the bin edge that maximises ``threshold_criterion`` on this validation epoch."""
        scores = metrics["scores"]
        hist = scores.compute()
        positives, negatives = BinnedScores.totals(hist)
        if int(positives[0]) == 0 or int(negatives[0]) == 0:
            return  # no threshold is better than another without both classes
        best = int(BinnedScores.best_bins(hist, self.threshold_criterion)[0])
        # bin 0 also holds the scores clamped below its edge: "everything is positive" is threshold -inf
        value = float("-inf") if best == 0 else float(scores.edges()[best])
        self.threshold.fill_(value)

    def tables(self, metrics: MetricCollection) -> dict[str, list[dict[str, Any]]]:
        """``operating_point``: counts and rates at the threshold now in effect (after this epoch's calibration);
        ``curve``: the same with the threshold at the left edge of each bin that holds a score (every distinct
        operating point of this epoch), for choosing another one, e.g. the first with sensitivity >= 0.9."""
        scores = metrics["scores"]
        hist = scores.compute()[0].double().cpu()
        if not hist.sum():
            return {}
        threshold = float(self.threshold)
        counts = self._counts_at_threshold(metrics)
        operating = {
            "label": self.label,
            "criterion": self.threshold_criterion,
            "threshold_logit": threshold,
            "threshold_probability": self._probability_at(threshold),
            **{k: int(v) for k, v in counts.items()},
            **self._rates(counts),
        }
        edges = scores.edges().double()
        tp_at = hist[0].flip(0).cumsum(0).flip(0)  # positives in bins >= b
        fp_at = hist[1].flip(0).cumsum(0).flip(0)
        positives, negatives = float(hist[0].sum()), float(hist[1].sum())
        curve = []
        for b in torch.nonzero(hist.sum(0)).reshape(-1).tolist():
            c = {"tp": float(tp_at[b]), "fp": float(fp_at[b])}
            c.update(fn=positives - c["tp"], tn=negatives - c["fp"])
            logit = float(edges[b])
            curve.append(
                {
                    "threshold_logit": logit,
                    "threshold_probability": self._probability_at(logit),
                    **{k: int(v) for k, v in c.items()},
                    **self._rates(c),
                }
            )
        return {"operating_point": [operating], "curve": curve}

    def _probability_at(self, logit: float) -> float:
        """The probability ``p_<label>`` that a logit maps to: sigmoid(logit / temperature)."""
        return float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64) / self.temperature.double()))

    def decision_rules(self) -> list[dict[str, Any]]:
        """``<label>`` = 1 when ``p_<label>`` reaches the calibrated threshold (as a probability, after the
        temperature: the same calls as the logit threshold)."""
        probability = self._probability_at(float(self.threshold))
        return [{"output": self.label, "kind": "compare", "score": f"p_{self.label}", "op": ">=", "value": probability}]

    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        """``p_<label>`` = sigmoid(logit / temperature); ``<label>`` = 1 where the logit reaches the threshold."""
        logits = output.float().reshape(-1)
        return {
            f"p_{self.label}": torch.sigmoid(logits / self.temperature),
            self.label: (logits >= self.threshold).long(),
        }
