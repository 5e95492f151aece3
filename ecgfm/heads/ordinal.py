"""Ordered categories (ECG triage: normal < abnormal, not acute < subacute < acute; van de Leur et al. 2020):
one shared score against K-1 ordered cutpoints, cumulative-logit or CORAL loss, concordance, PDI and per-level
confusion statistics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ecgfm.heads.base import Head, fill_missing, masked_mean, row_mask, sigmoid_distillation
from ecgfm.metrics import (
    ConfusionCounts,
    StoredScores,
    confusion_statistics,
    ordinal_concordance,
    polytomous_discrimination_index,
)
from ecgfm.registry import HEADS

LINKS = ("cumulative_logit", "coral")
_MIN_GAP = 1e-6  # smallest distance between two cutpoints the loss relies on (log P(y = k) stays finite)


@HEADS.register("ordinal")
class OrdinalHead(Head):
    """K ordered levels from one linear score f(x) and K-1 increasing cutpoints c_0 < ... < c_{K-2}.

    The output is [B, K-1]: the logits f(x) - c_k of P(y > k). Keeping the cutpoints ordered (c_0 plus a
    cumulative sum of softplus gaps) makes P(y > k) fall with k, so the category probabilities
    P(y = k) = P(y > k-1) - P(y > k) are never negative and the predicted level (the number of P(y > k) > 0.5,
    i.e. the median) is consistent. The target is the one-hot [B, K] of the shards (levels in ``labels`` order,
    least to most severe); a row with a missing entry, or with no 1 among the head's labels, is left out.

    Args:
        link: ``cumulative_logit`` (proportional-odds model: NLL of P(y = k)) or ``coral`` (Cao et al. 2020: mean
            binary cross-entropy of the K-1 tasks "y > k").
        class_weights: optional weight per level, applied to each row by its true level (the loss is then the
            weighted mean, as in ``nn.CrossEntropyLoss(weight=...)``).
        dropout: dropout on the features before the linear score.
    """

    target_kinds = ("multiclass",)
    temperature_kind = "ordinal"

    def __init__(
        self,
        name: str = "triage",
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
        link: str = "cumulative_logit",
        class_weights: list[float] | None = None,
        dropout: float = 0.0,
    ):
        super().__init__(name, target, labels, loss_weight)
        if link not in LINKS:
            raise ValueError(f"head {name!r}: link must be one of {', '.join(LINKS)}, got {link!r}")
        self.link = link
        self.class_weight_values = list(class_weights) if class_weights is not None else None
        self.dropout = dropout

    # ----------------------------------------------------------------- layers
    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        if n_outputs < 2:
            raise ValueError(f"head {self.name!r}: an ordinal head needs at least 2 levels, got {self.labels}")
        # no bias: the cutpoints hold the offset, so the score and the cutpoints are identifiable
        self.score = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(in_features, 1, bias=False))
        # cutpoints start evenly spaced one logit apart and centred on 0: -1, 0, 1 for four levels
        self.first_cutpoint = nn.Parameter(torch.tensor([-(n_outputs - 2) / 2.0]))
        unit_gap = math.log(math.expm1(1.0))  # softplus(unit_gap) == 1
        self.cutpoint_gaps = nn.Parameter(torch.full((n_outputs - 2,), unit_gap))
        if self.class_weight_values is not None:
            if len(self.class_weight_values) != n_outputs:
                raise ValueError(
                    f"head {self.name!r}: class_weights has {len(self.class_weight_values)} values "
                    f"for {n_outputs} levels {self.labels}"
                )
            weights = torch.tensor(self.class_weight_values, dtype=torch.float32)
            if not (weights > 0).all():
                raise ValueError(f"head {self.name!r}: class_weights must be positive, got {self.class_weight_values}")
            self.register_buffer("class_weights", weights)
        else:
            self.class_weights = None

    def cutpoints(self) -> Tensor:
        """The K-1 cutpoints, strictly increasing."""
        gaps = F.softplus(self.cutpoint_gaps)
        return torch.cat([self.first_cutpoint, self.first_cutpoint + torch.cumsum(gaps, 0)])

    def forward(self, features: Tensor) -> Tensor:
        return self.score(features) - self.cutpoints()[None, :].to(features.dtype)

    # ----------------------------------------------------------------- probabilities
    @staticmethod
    def exceedance_probs(output: Tensor) -> Tensor:
        """[B, K-1] P(y > k)."""
        return torch.sigmoid(output.float())

    @staticmethod
    def category_probs(output: Tensor) -> Tensor:
        """[B, K] P(y = k) = P(y > k-1) - P(y > k), with P(y > -1) = 1 and P(y > K-1) = 0; rows sum to 1."""
        above = torch.sigmoid(output.float())
        ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
        return (torch.cat([ones, above], 1) - torch.cat([above, zeros], 1)).clamp(min=0.0)

    @staticmethod
    def log_category_probs(output: Tensor) -> Tensor:
        """[B, K] log P(y = k), computed without subtracting probabilities.

        With z_k = f - c_k: log P(y = 0) = log sigma(-z_0), log P(y = K-1) = log sigma(z_{K-2}), and in between
        sigma(z_{k-1}) - sigma(z_k) = sigma(z_{k-1}) sigma(-z_k) (1 - exp(-(z_{k-1} - z_k))), where the gap
        z_{k-1} - z_k = c_k - c_{k-1} is clamped away from 0.
        """
        z = output.float()
        first = F.logsigmoid(-z[:, :1])
        last = F.logsigmoid(z[:, -1:])
        upper, lower = z[:, :-1], z[:, 1:]
        gap = (upper - lower).clamp(min=_MIN_GAP)
        middle = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(-gap))
        return torch.cat([first, middle, last], 1)

    @staticmethod
    def predicted_level(output: Tensor) -> Tensor:
        """[B] the number of P(y > k) > 0.5: the median level."""
        return (output > 0).sum(1)

    def _rows(self, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Rows with a known level (all K entries present and one of them 1), and each row's level."""
        filled = fill_missing(target, mask)
        rows = row_mask(mask) & (filled.max(1).values > 0.5)
        return rows, filled.argmax(1)

    # ----------------------------------------------------------------- loss
    def loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        rows, level = self._rows(target, mask)
        output = output.float()
        if self.link == "coral":
            tasks = (level[:, None] > torch.arange(output.shape[1], device=output.device)[None, :]).float()
            per_row = F.binary_cross_entropy_with_logits(output, tasks, reduction="none").mean(1)
        else:
            per_row = -self.log_category_probs(output).gather(1, level[:, None])[:, 0]
        if self.class_weights is None:
            return masked_mean(per_row, rows)
        weights = torch.where(rows, self.class_weights[level], torch.zeros_like(per_row))
        return (weights * per_row).sum() / weights.sum().clamp(min=1e-12)

    def distillation_loss(
        self,
        student_output: Tensor,
        teacher_output: Tensor,
        temperature: float = 1.0,
        reference: dict[str, Any] | None = None,
    ) -> Tensor:
        """Bernoulli KL of each of the K-1 tempered cumulative logits (P(y > k)) against the teacher's, times
        T^2, averaged over cutpoints and samples (as the multilabel head; any link)."""
        return sigmoid_distillation(student_output, teacher_output, temperature)

    # ----------------------------------------------------------------- metrics
    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {"scores": StoredScores(), "confusion": ConfusionCounts(len(self.labels))}, compute_groups=False
        )

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        rows, level = self._rows(target, mask)
        if not rows.any():
            return
        output, level = output[rows].float(), level[rows]
        metrics["scores"].update(self.category_probs(output), level)
        metrics["confusion"].update(self.predicted_level(output), level)

    def _results(self, metrics: MetricCollection) -> dict[str, Any] | None:
        """Everything the metrics and tables need, from the epoch's stored probabilities and confusion counts."""
        if not metrics["scores"].update_called:
            return None
        probs, labels = (x.detach().cpu().numpy() for x in metrics["scores"].compute())
        confusion = metrics["confusion"].compute().detach().cpu().numpy()
        k = len(self.labels)
        expected = probs.astype(np.float64) @ np.arange(k, dtype=np.float64)
        counts = confusion.sum(1)
        if (counts > 0).all():
            pdi, pdi_terms = polytomous_discrimination_index(probs, labels)
        else:  # the PDI needs a case of every level
            pdi, pdi_terms = float("nan"), [float("nan")] * k
        return {
            "n": counts,
            "confusion": confusion,
            "stats": confusion_statistics(confusion),
            "pdi": pdi,
            "pdi_terms": pdi_terms,
            "concordance": ordinal_concordance(expected, labels, average="pairs"),
            "ordinal_c_index": ordinal_concordance(expected, labels, average="categories"),
        }

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Concordance and ORC of the expected level, PDI, accuracy, MCC and one-vs-rest statistics per level."""
        results = self._results(metrics)
        nan = float("nan")
        stats = results["stats"] if results else {}
        values: dict[str, float] = {
            "concordance": results["concordance"] if results else nan,
            "ordinal_c_index": results["ordinal_c_index"] if results else nan,
            "pdi": results["pdi"] if results else nan,
            "accuracy": stats.get("accuracy", nan),
            "mcc": stats.get("mcc", nan),
        }
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            for i, label in enumerate(self.labels):
                values[f"{key}/{label}"] = float(stats[key][i]) if results else nan
        return {key: torch.tensor(value, dtype=torch.float32) for key, value in values.items()}

    def tables(self, metrics: MetricCollection) -> dict[str, list[dict[str, Any]]]:
        """``confusion``: counts, true level by row, predicted level by column; ``per_level``: n, one-vs-rest
        sensitivity, specificity, PPV, NPV, F1 and the level's PDI term."""
        results = self._results(metrics)
        if results is None:
            return {}
        confusion, stats = results["confusion"], results["stats"]
        confusion_rows = [
            {"true_level": label, **{f"pred_{p}": int(confusion[i, j]) for j, p in enumerate(self.labels)}}
            for i, label in enumerate(self.labels)
        ]
        per_level = [
            {
                "level": label,
                "n": int(results["n"][i]),
                **{key: float(stats[key][i]) for key in ("sensitivity", "specificity", "ppv", "npv", "f1")},
                "pdi": float(results["pdi_terms"][i]),
            }
            for i, label in enumerate(self.labels)
        ]
        return {"confusion": confusion_rows, "per_level": per_level}

    # ----------------------------------------------------------------- predictions
    def decision_rules(self) -> list[dict[str, Any]]:
        """``level`` = the median level: how many P(y > k), from the category probabilities, exceed 0.5."""
        return [{"output": "level", "kind": "median_level", "scores": [f"p_{label}" for label in self.labels]}]

    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        """``p_<level>`` from the cumulative logits / temperature, their ``expected_level``, and ``level``: the median
        level, which the temperature does not change (a logit's sign does not change when it is divided)."""
        probs = self.category_probs(output.float() / self.temperature)
        levels = torch.arange(probs.shape[1], dtype=probs.dtype, device=probs.device)
        out = {f"p_{label}": probs[:, i] for i, label in enumerate(self.labels)}
        out["expected_level"] = probs @ levels
        out["level"] = self.predicted_level(output).long()
        return out
