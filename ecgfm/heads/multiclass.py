"""Mutually exclusive classes (electrolyte groups: normal / hypokalemia / hyperkalemia / hyponatremia): softmax
outputs, masked and optionally class-weighted cross-entropy, one-vs-rest AUROC in bounded memory, and the confusion
matrix statistics (accuracy, MCC, per-class sensitivity, specificity, PPV, NPV, F1)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ecgfm.data.shards import TargetSummary
from ecgfm.heads.base import Head, fill_missing, row_mask, softmax_distillation
from ecgfm.metrics import BinnedScores, ConfusionCounts, confusion_statistics
from ecgfm.registry import HEADS

#: Per-class statistics of the confusion matrix, logged as ``<stat>`` (macro mean) and ``<stat>/<class>``.
CLASS_STATS = ("sensitivity", "specificity", "ppv", "npv", "f1")


def one_vs_rest_logits(logits: Tensor) -> Tensor:
    """[B, K] logits -> [B, K] logit(p_k) = z_k - logsumexp_{j != k} z_j, exact even where p_k rounds to 1."""
    k = logits.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=logits.device)
    others = logits.unsqueeze(-2).masked_fill(eye, float("-inf"))  # [B, K, K]: row k holds every class but k
    return logits - torch.logsumexp(others, dim=-1)


def _float(value: Any) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else float("nan")


@HEADS.register("multiclass")
class MulticlassHead(Head):
    """One logit per class; the target is one-hot (one column per class), a row with any column missing is unlabelled.

    Args:
        class_weights: None (every class weighs 1), a list of K positive floats, or ``"balanced"``: ``n / (K n_k)``
            learnt from the training split before the run starts (``n_k`` rows of class k out of ``n``). The weights
            are a buffer, so checkpoints keep them. A class absent from the training split gets weight 0 and a warning.
        label_smoothing: share of each row's target spread evenly over the K classes (0 = plain cross-entropy).
        dropout: dropout on the features before the linear layer.
        bins: histogram bins of the one-vs-rest AUROC (scores are logit(p_k), binned over [-16, 16]).
    """

    target_kinds = ("multiclass",)
    temperature_kind = "multiclass"

    def __init__(
        self,
        name: str = "electrolyte",
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
        class_weights: list[float] | str | None = None,
        label_smoothing: float = 0.0,
        dropout: float = 0.0,
        bins: int = 1024,
    ):
        super().__init__(name, target, labels, loss_weight)
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise ValueError(
                f"head {name!r}: class_weights must be a list of floats or 'balanced', got {class_weights!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"head {name!r}: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.class_weights = list(class_weights) if isinstance(class_weights, list | tuple) else class_weights
        self.label_smoothing = label_smoothing
        self.dropout = dropout
        self.bins = bins
        self.uses_statistics = class_weights == "balanced"

    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        if n_outputs < 2:
            raise ValueError(f"head {self.name!r}: a multiclass target needs two classes or more, got {self.labels}")
        self.classifier = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(in_features, n_outputs))
        if isinstance(self.class_weights, list):
            weights = torch.tensor(self.class_weights, dtype=torch.float32)
            if weights.shape != (n_outputs,) or not torch.isfinite(weights).all() or (weights < 0).any():
                raise ValueError(
                    f"head {self.name!r}: class_weights needs {n_outputs} finite non-negative values "
                    f"(one per class of {self.labels}), got {self.class_weights}"
                )
        else:  # None, or "balanced" until fit_statistics replaces these
            weights = torch.ones(n_outputs)
        self.register_buffer("class_weight", weights)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(features)

    # ----------------------------------------------------------------- targets and loss
    def _classes(self, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """[B] true class index and [B] labelled rows (every column known and one class set)."""
        filled = fill_missing(target.float(), mask)
        known = row_mask(mask) & (filled.sum(-1) > 0.5)
        return filled.argmax(-1), known

    def loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """sum_i w_{y_i} CE_i / sum_i w_{y_i} over labelled rows, CE_i smoothed by ``label_smoothing``."""
        classes, known = self._classes(target, mask)
        log_p = F.log_softmax(output.float(), dim=-1)
        nll = -log_p.gather(-1, classes[:, None])[:, 0]
        if self.label_smoothing > 0:
            nll = (1 - self.label_smoothing) * nll - self.label_smoothing * log_p.mean(-1)
        weight = self.class_weight[classes] * known.to(log_p.dtype)
        return (weight * nll).sum() / weight.sum().clamp(min=1e-12)

    def distillation_loss(
        self,
        student_output: Tensor,
        teacher_output: Tensor,
        temperature: float = 1.0,
        reference: dict[str, Any] | None = None,
    ) -> Tensor:
        """KL(softmax(teacher / T) || softmax(student / T)) * T^2 per row, averaged over rows; class weights and
        label smoothing do not apply."""
        return softmax_distillation(student_output, teacher_output, temperature)

    def fit_statistics(self, summary: TargetSummary) -> None:
        """``"balanced"``: weight_k = n / (K n_k) from the training split's one-hot column sums."""
        if self.class_weights != "balanced":
            return
        counts = np.asarray(summary.total, dtype=np.float64)
        n, k = counts.sum(), len(counts)
        if n <= 0:
            raise ValueError(f"head {self.name!r}: the training split has no labelled rows of {self.target!r}")
        absent = [label for label, c in zip(self.labels, counts, strict=True) if c <= 0]
        if absent:
            warnings.warn(
                f"head {self.name!r}: classes {absent} do not occur in the training split; their weight is 0",
                stacklevel=2,
            )
        with np.errstate(divide="ignore"):
            weights = np.where(counts > 0, n / (k * counts), 0.0)
        self.class_weight.copy_(torch.as_tensor(weights, dtype=torch.float32))

    # ----------------------------------------------------------------- metrics
    def metrics(self) -> MetricCollection:
        k = len(self.labels)
        return MetricCollection({"scores": BinnedScores(k, bins=self.bins), "confusion": ConfusionCounts(k)})

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        classes, known = self._classes(target, mask)
        output = output.float()
        onehot = F.one_hot(classes, len(self.labels)).float()
        metrics["scores"].update(one_vs_rest_logits(output), onehot, known[:, None].expand_as(onehot))
        metrics["confusion"].update(output.argmax(-1)[known], classes[known])

    def _results(self, metrics: MetricCollection) -> dict[str, Any]:
        hist = metrics["scores"].compute()
        confusion = metrics["confusion"].compute().cpu().numpy()
        stats = confusion_statistics(confusion) if confusion.sum() else None
        return {
            "confusion": confusion,
            "n": confusion.sum(1),
            "auroc": BinnedScores.auroc(hist).cpu().numpy(),
            "auprc": BinnedScores.average_precision(hist).cpu().numpy(),
            "stats": stats,
        }

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Macro means (over classes where a value is defined) and ``<stat>/<class>`` for each class."""
        r = self._results(metrics)
        nan = float("nan")
        per_class = {"auroc": r["auroc"], "auprc": r["auprc"]}
        if r["stats"] is not None:
            per_class.update({stat: r["stats"][stat] for stat in CLASS_STATS})
        out = {
            "accuracy": r["stats"]["accuracy"] if r["stats"] else nan,
            "mcc": r["stats"]["mcc"] if r["stats"] else nan,
        }
        for stat in ("auroc", "auprc", *CLASS_STATS):
            values = np.asarray(per_class.get(stat, np.full(len(self.labels), nan)), dtype=np.float64)
            out[stat] = float(np.nanmean(values)) if np.isfinite(values).any() else nan
            if stat != "auprc":
                for label, value in zip(self.labels, values, strict=True):
                    if np.isfinite(value):
                        out[f"{stat}/{label}"] = float(value)
        return {key: torch.tensor(value, dtype=torch.float32) for key, value in out.items()}

    def tables(self, metrics: MetricCollection) -> dict[str, list[dict[str, Any]]]:
        """``confusion``: one row per true class, one column per predicted class; ``per_class``: one-vs-rest results."""
        r = self._results(metrics)
        if not r["n"].sum():
            return {}
        confusion = [
            {
                "true": label,
                "n": int(r["n"][i]),
                **{f"pred_{p}": int(r["confusion"][i, j]) for j, p in enumerate(self.labels)},
            }
            for i, label in enumerate(self.labels)
        ]
        per_class = [
            {
                "class": label,
                "n": int(r["n"][i]),
                "auroc": _float(r["auroc"][i]),
                "auprc": _float(r["auprc"][i]),
                **{stat: _float(r["stats"][stat][i]) for stat in CLASS_STATS},
            }
            for i, label in enumerate(self.labels)
        ]
        return {"confusion": confusion, "per_class": per_class}

    def decision_rules(self) -> list[dict[str, Any]]:
        """``class`` = the index (in ``labels``) of the most probable class."""
        return [{"output": "class", "kind": "argmax", "scores": [f"p_{label}" for label in self.labels]}]

    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        """``p_<class>`` = softmax(logits / temperature); ``class`` = the most probable (the temperature does not
        change which)."""
        probs = torch.softmax(output.float() / self.temperature, dim=-1)
        out = {f"p_{label}": probs[:, i] for i, label in enumerate(self.labels)}
        out["class"] = probs.argmax(-1)
        return out
