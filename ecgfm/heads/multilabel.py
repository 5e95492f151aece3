"""Multi-label conditions (ECGFounder's 150 labels, AnyECG's 1,172): sigmoid outputs, masked BCE, binned AUROC/AUPRC."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    MultilabelAUROC,
    MultilabelAveragePrecision,
)

from ecgfm.heads.base import Head, fill_missing, masked_mean, register_head


class LabelCounts(Metric):
    """Positives and negatives seen per label, so macro averages skip labels with only one class."""

    full_state_update = False

    def __init__(self, num_labels: int):
        super().__init__()
        self.add_state("positives", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negatives", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, target: Tensor, mask: Tensor) -> None:
        self.positives += ((target > 0.5) & mask).sum(0)
        self.negatives += ((target <= 0.5) & mask).sum(0)

    def compute(self) -> Tensor:
        return torch.stack([self.positives, self.negatives])


@register_head("multilabel")
class MultiLabelHead(Head):
    """One logit per label; missing labels (NaN in the shards) are masked out of the loss and the metrics.

    Args:
        pos_weight: optional per-label weight of positives in the BCE (as in BCEWithLogitsLoss).
        dropout: dropout on the features before the linear layer.
        thresholds: bins for AUROC/AUPRC, so memory stays bounded for 1,000+ labels over millions of samples.
    """

    def __init__(
        self,
        name: str = "conditions",
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
        pos_weight: list[float] | None = None,
        dropout: float = 0.0,
        thresholds: int = 200,
    ):
        super().__init__(name, target, labels, loss_weight)
        self.pos_weight_values = pos_weight
        self.dropout = dropout
        self.thresholds = thresholds

    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        self.classifier = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(in_features, n_outputs))
        if self.pos_weight_values is not None:
            if len(self.pos_weight_values) != n_outputs:
                raise ValueError(
                    f"head {self.name!r}: pos_weight has {len(self.pos_weight_values)} values for {n_outputs} labels"
                )
            self.register_buffer("pos_weight", torch.tensor(self.pos_weight_values, dtype=torch.float32))
        else:
            self.pos_weight = None

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(features)

    def loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        per_label = F.binary_cross_entropy_with_logits(
            output.float(), fill_missing(target, mask), pos_weight=self.pos_weight, reduction="none"
        )
        return masked_mean(per_label, mask)

    def metrics(self) -> MetricCollection:
        k = len(self.labels)
        if k == 1:  # torchmetrics' multilabel metrics need two labels or more
            kwargs = dict(thresholds=self.thresholds, ignore_index=-1)
            auroc, auprc = BinaryAUROC(**kwargs), BinaryAveragePrecision(**kwargs)
        else:
            kwargs = dict(num_labels=k, average="none", thresholds=self.thresholds, ignore_index=-1)
            auroc, auprc = MultilabelAUROC(**kwargs), MultilabelAveragePrecision(**kwargs)
        return MetricCollection({"auroc": auroc, "auprc": auprc, "counts": LabelCounts(k)})

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        probs = torch.sigmoid(output.float())
        labels = torch.where(mask, (target > 0.5).long(), torch.full_like(target, -1, dtype=torch.long))
        if len(self.labels) == 1:
            probs, labels = probs[:, 0], labels[:, 0]
        metrics["auroc"].update(probs, labels)
        metrics["auprc"].update(probs, labels)
        metrics["counts"].update(target, mask)

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Macro AUROC/AUPRC over labels that had both classes, plus each label's AUROC and prevalence."""
        counts = metrics["counts"].compute()
        valid = (counts[0] > 0) & (counts[1] > 0)
        out: dict[str, Tensor] = {"n_labels_scored": valid.sum().float()}
        for key in ("auroc", "auprc"):
            per_label = metrics[key].compute().reshape(-1) if valid.any() else torch.zeros(len(self.labels))
            out[key] = per_label[valid].mean() if valid.any() else torch.tensor(float("nan"))
            if key == "auroc":
                for i, label in enumerate(self.labels):
                    if valid[i]:
                        out[f"auroc/{label}"] = per_label[i]
        return out

    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        probs = torch.sigmoid(output.float())
        return {f"p_{label}": probs[:, i] for i, label in enumerate(self.labels)}

    def init_args(self) -> dict:
        return {
            **super().init_args(),
            "pos_weight": self.pos_weight_values,
            "dropout": self.dropout,
            "thresholds": self.thresholds,
        }
