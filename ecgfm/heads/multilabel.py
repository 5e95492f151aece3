"""Multi-label conditions (ECGFounder's 150 labels, AnyECG's 1,172): sigmoid outputs, masked BCE or asymmetric loss,
macro/micro AUROC and AUPRC from per-label histograms (memory independent of the number of samples), and per-label
decision thresholds chosen on validation."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ecgfm.data.shards import TargetSummary
from ecgfm.heads.base import Head, fill_missing, masked_mean, sigmoid_distillation
from ecgfm.metrics import BinnedScores
from ecgfm.registry import HEADS


def load_label_file(path: str | Path) -> list[str]:
    """Label names from a text file (one per line; ``#`` comments) or a CSV with a ``label`` column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "label" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: a label CSV needs a 'label' column; found {reader.fieldnames}")
            labels = [(row["label"] or "").strip() for row in reader]
    else:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
        labels = [line for line in lines if line]
    labels = [label for label in labels if label]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"{path}: labels listed more than once: {repeated}")
    if not labels:
        raise ValueError(f"{path}: no labels")
    return labels


def asymmetric_loss(logits: Tensor, target: Tensor, gamma_pos: float, gamma_neg: float, clip: float) -> Tensor:
    """Asymmetric loss (Ridnik et al., ICCV 2021), per element: easy negatives are down-weighted by ``p^gamma_neg``
    and negatives with ``p < clip`` are discarded, which suits labels with a prevalence far below 1 %."""
    p = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    p_shifted = (p - clip).clamp(min=0) if clip > 0 else p
    log_not_p = torch.log((1 - p_shifted).clamp(min=1e-8))
    positive = (1 - p).pow(gamma_pos) * log_p if gamma_pos else log_p
    negative = p_shifted.pow(gamma_neg) * log_not_p if gamma_neg else log_not_p
    return -(target * positive + (1 - target) * negative)


@HEADS.register("multilabel")
class MultiLabelHead(Head):
    """One logit per label; missing labels (NaN in the shards) are masked out of the loss and the metrics.

    Args:
        labels_file: the label vocabulary (text, one per line, or CSV with a ``label`` column) instead of ``labels``.
        loss: ``bce`` or ``asymmetric``.
        pos_weight: weight of positives in the BCE (a number, or one per label), or ``balanced`` (negatives / positives
            in the training split, at most ``max_pos_weight``).
        gamma_pos, gamma_neg, clip: the asymmetric loss's focusing parameters and probability margin.
        dropout: dropout on the features before the linear layer.
        bins: histogram bins over logits in [-16, 16] for AUROC/AUPRC and thresholds (memory: labels x 2 x bins).
        log_per_label: log ``auroc/<label>`` when there are at most this many labels (all are in the table).
        threshold_criterion: how ``calibrate`` picks each label's threshold on validation.
    """

    target_kinds = ("multilabel", "binary")
    temperature_kind = "multilabel"

    def __init__(
        self,
        name: str = "conditions",
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
        labels_file: str | None = None,
        loss: Literal["bce", "asymmetric"] = "bce",
        pos_weight: list[float] | float | Literal["balanced"] | None = None,
        max_pos_weight: float = 100.0,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        dropout: float = 0.0,
        bins: int = 1024,
        log_per_label: int = 32,
        threshold_criterion: Literal["balanced_accuracy", "f1"] = "balanced_accuracy",
    ):
        if labels_file is not None:
            if labels is not None:
                raise ValueError(f"head {name!r}: give labels or labels_file, not both")
            labels = load_label_file(labels_file)
        super().__init__(name, target, labels, loss_weight)
        if loss not in ("bce", "asymmetric"):
            raise ValueError(f"head {name!r}: loss must be 'bce' or 'asymmetric', got {loss!r}")
        if loss == "asymmetric" and pos_weight is not None:
            raise ValueError(f"head {name!r}: pos_weight applies to the bce loss only")
        if isinstance(pos_weight, str) and pos_weight != "balanced":
            raise ValueError(f"head {name!r}: pos_weight must be a number, a list or 'balanced', got {pos_weight!r}")
        if isinstance(pos_weight, tuple):
            pos_weight = list(pos_weight)
        self.loss_name = loss
        self.pos_weight_values = pos_weight
        self.max_pos_weight = max_pos_weight
        self.gamma_pos, self.gamma_neg, self.clip = gamma_pos, gamma_neg, clip
        self.dropout = dropout
        self.bins = bins
        self.log_per_label = log_per_label
        self.threshold_criterion = threshold_criterion

    @property
    def uses_statistics(self) -> bool:
        return self.pos_weight_values == "balanced"

    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        self.classifier = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(in_features, n_outputs))
        if isinstance(self.pos_weight_values, (int, float)):
            self.register_buffer("pos_weight", torch.full((n_outputs,), float(self.pos_weight_values)))
        elif isinstance(self.pos_weight_values, list):
            if len(self.pos_weight_values) != n_outputs:
                raise ValueError(
                    f"head {self.name!r}: pos_weight has {len(self.pos_weight_values)} values for {n_outputs} labels"
                )
            self.register_buffer("pos_weight", torch.tensor(self.pos_weight_values, dtype=torch.float32))
        elif self.pos_weight_values == "balanced":
            self.register_buffer("pos_weight", torch.ones(n_outputs))
        else:
            self.pos_weight = None
        # Decision thresholds (logits), one per label: 0 (p = 0.5) until calibrated on validation.
        self.register_buffer("decision_logit", torch.zeros(n_outputs))

    def fit_statistics(self, summary: TargetSummary) -> None:
        """``balanced`` pos_weight = negatives / positives per label in the training split (1 without positives)."""
        positives = summary.total
        negatives = summary.count - summary.total
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = np.where(positives > 0, negatives / positives, 1.0)
        self.pos_weight.copy_(torch.as_tensor(np.clip(weight, 1.0 / self.max_pos_weight, self.max_pos_weight)))

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(features)

    def loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        target = fill_missing(target, mask)
        if self.loss_name == "asymmetric":
            per_label = asymmetric_loss(output.float(), target, self.gamma_pos, self.gamma_neg, self.clip)
        else:
            per_label = F.binary_cross_entropy_with_logits(
                output.float(), target, pos_weight=self.pos_weight, reduction="none"
            )
        return masked_mean(per_label, mask)

    def distillation_loss(
        self,
        student_output: Tensor,
        teacher_output: Tensor,
        temperature: float = 1.0,
        reference: dict[str, Any] | None = None,
    ) -> Tensor:
        """Per-label Bernoulli KL of the tempered logits (BCE against the teacher's probabilities minus their
        entropy), times T^2, averaged over labels and samples; pos_weight does not apply."""
        return sigmoid_distillation(student_output, teacher_output, temperature)

    def metrics(self) -> MetricCollection:
        return MetricCollection({"scores": BinnedScores(len(self.labels), bins=self.bins)})

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        metrics["scores"].update(output.float(), target, mask)  # masked entries are dropped, NaN or not

    def _summary(self, scores: BinnedScores) -> dict[str, Tensor]:
        hist = scores.compute()
        positives, negatives = BinnedScores.totals(hist)
        sensitivity, specificity, _ = BinnedScores.rates_at(hist, scores.first_bin_at(self.decision_logit))
        return {
            "positives": positives,
            "negatives": negatives,
            "valid": (positives > 0) & (negatives > 0),
            "auroc": BinnedScores.auroc(hist),
            "auprc": BinnedScores.average_precision(hist),
            "sensitivity": sensitivity,
            "specificity": specificity,
        }

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Macro AUROC/AUPRC over labels with both classes this epoch, micro AUROC/AUPRC over all labelled entries,
        macro sensitivity/specificity/balanced accuracy at the decision thresholds, and per-label AUROC."""
        hist = metrics["scores"].compute()
        s = self._summary(metrics["scores"])
        valid = s["valid"]
        nan = torch.tensor(float("nan"))
        out: dict[str, Tensor] = {"n_labels_scored": valid.sum().float()}
        for key in ("auroc", "auprc", "sensitivity", "specificity"):
            out[key] = s[key][valid].mean() if valid.any() else nan
        out["balanced_accuracy"] = 0.5 * (out["sensitivity"] + out["specificity"])
        micro = hist.sum(0, keepdim=True)
        out["micro_auroc"] = BinnedScores.auroc(micro)[0]
        out["micro_auprc"] = BinnedScores.average_precision(micro)[0]
        if len(self.labels) <= self.log_per_label:
            for i, label in enumerate(self.labels):
                if valid[i]:
                    out[f"auroc/{label}"] = s["auroc"][i]
        return out

    def calibrate(self, metrics: MetricCollection) -> None:
        """Each label's threshold := the histogram edge with the best balanced accuracy (or F1) on validation;
        labels without both classes in validation, or where no threshold beats chance, keep theirs."""
        hist = metrics["scores"].compute()
        positives, negatives = BinnedScores.totals(hist)
        valid = (positives > 0) & (negatives > 0)
        quality = BinnedScores.criterion_by_bin(hist, self.threshold_criterion)
        if self.threshold_criterion == "balanced_accuracy":  # no better than chance (0.5): keep the threshold
            valid &= quality.max(-1).values > 0.5 + 1e-9
        edges = metrics["scores"].edges().to(hist.device)
        best_bin = quality.argmax(-1)
        # calling every bin positive: -inf, so scores below the histogram's range are called in predictions too
        best = torch.where(best_bin == 0, torch.full_like(edges[0], float("-inf")), edges[best_bin])
        self.decision_logit.copy_(torch.where(valid, best, self.decision_logit))

    def tables(self, metrics: MetricCollection) -> dict[str, list[dict[str, Any]]]:
        """``per_label``: n, positives, prevalence, AUROC, AUPRC, threshold and its sensitivity/specificity."""
        s = self._summary(metrics["scores"])
        rows = []
        for i, label in enumerate(self.labels):
            n = int(s["positives"][i] + s["negatives"][i])
            rows.append(
                {
                    "label": label,
                    "n": n,
                    "positives": int(s["positives"][i]),
                    "prevalence": float(s["positives"][i]) / n if n else float("nan"),
                    "auroc": float(s["auroc"][i]),
                    "auprc": float(s["auprc"][i]),
                    "threshold": float(torch.sigmoid(self.decision_logit[i] / self.temperature)),
                    "sensitivity": float(s["sensitivity"][i]),
                    "specificity": float(s["specificity"][i]),
                }
            )
        return {"per_label": rows}

    def decision_rules(self) -> list[dict[str, Any]]:
        """``<label>`` = 1 when ``p_<label>`` reaches that label's calibrated threshold (as a probability, after the
        temperature: the same calls as the logit thresholds)."""
        probabilities = torch.sigmoid(self.decision_logit.double() / self.temperature.double()).tolist()
        return [
            {"output": label, "kind": "compare", "score": f"p_{label}", "op": ">=", "value": p}
            for label, p in zip(self.labels, probabilities, strict=True)
        ]

    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        """``p_<label>`` (probability: sigmoid of logit / temperature) and ``<label>`` (0/1 where the logit reaches the
        label's decision threshold)."""
        output = output.float()
        probs = torch.sigmoid(output / self.temperature)
        called = (output >= self.decision_logit).float()
        out = {}
        for i, label in enumerate(self.labels):
            out[f"p_{label}"] = probs[:, i]
            out[label] = called[:, i]
        return out

    def resolved_arguments(self) -> dict[str, Any]:
        # the file's labels are in ``labels``: a checkpoint does not need the file
        return {**super().resolved_arguments(), "labels_file": None}
