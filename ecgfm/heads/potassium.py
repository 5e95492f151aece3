"""Serum potassium from the ECG (ECG12Net: MAE 0.531 mmol/L; hypokalemia AUROC 0.926, hyperkalemia 0.958): a
regression in mmol/L, optionally with its uncertainty, that also reports how well the continuous prediction
detects hypo- and hyperkalemia and their severe forms."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import MetricCollection

from ecgfm.heads.base import fill_missing
from ecgfm.heads.regression import RegressionHead, unit_suffix
from ecgfm.metrics import BinnedScores
from ecgfm.registry import HEADS

#: Clinical classes read off the predicted concentration: name -> (direction, threshold in mmol/L).
POTASSIUM_CLASSES: dict[str, tuple[str, float]] = {
    "hypokalemia": ("<", 3.5),
    "severe_hypokalemia": ("<", 2.5),
    "hyperkalemia": (">", 5.5),
    "severe_hyperkalemia": (">", 6.5),
}
SCORE_RANGE = 10.0  # class scores are (signed) distances to the threshold in training sds, binned over +-10


@HEADS.register("potassium")
class PotassiumHead(RegressionHead):
    """Serum K+ in mmol/L; ``classes`` (``{name: ["<" | ">", threshold]}``) are scored from the continuous
    prediction: AUROC, and sensitivity/specificity of calling the class when the prediction crosses the threshold.

    Takes RegressionHead's arguments (loss ``gaussian_nll`` adds a predicted standard deviation).
    """

    def __init__(
        self,
        name: str = "potassium",
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
        loss: Literal["mse", "huber", "gaussian_nll"] = "mse",
        huber_delta: float = 1.0,
        target_mean: float | list[float] | None = None,
        target_std: float | list[float] | None = None,
        units: str | list[str] = "mmol/L",
        dropout: float = 0.0,
        log_per_column: int = 16,
        classes: dict[str, tuple[str, float]] | None = None,
        bins: int = 2048,
    ):
        super().__init__(
            name,
            target,
            labels,
            loss_weight,
            loss,
            huber_delta,
            target_mean,
            target_std,
            units,
            dropout,
            log_per_column,
        )
        self.classes = {k: (str(d), float(t)) for k, (d, t) in (classes or POTASSIUM_CLASSES).items()}
        for class_name, (direction, _) in self.classes.items():
            if direction not in ("<", ">"):
                raise ValueError(f"head {name!r}: class {class_name!r} needs direction '<' or '>', got {direction!r}")
        self.bins = bins

    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        if n_outputs != 1:
            raise ValueError(f"head {self.name!r}: potassium is one column, got {n_outputs} ({self.labels})")
        super()._build_layers(in_features, n_outputs)
        self.register_buffer("class_sign", torch.tensor([1.0 if d == ">" else -1.0 for d, _ in self.classes.values()]))
        self.register_buffer("class_threshold", torch.tensor([t for _, t in self.classes.values()]))

    def class_scores(self, prediction: Tensor) -> Tensor:
        """[B, classes] signed distance past each threshold, in training sds (> 0: the class is called)."""
        return self.class_sign * (prediction[:, :1] - self.class_threshold) / self.std

    def class_truth(self, target: Tensor) -> Tensor:
        return (self.class_sign * (target[:, :1] - self.class_threshold) > 0).float()

    def metrics(self) -> MetricCollection:
        metrics = super().metrics()
        metrics.add_metrics(
            {"classes": BinnedScores(len(self.classes), bins=self.bins, low=-SCORE_RANGE, high=SCORE_RANGE)}
        )
        return metrics

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        super().update_metrics(metrics, output, target, mask)
        prediction, _ = self.predict(output)
        truth = self.class_truth(fill_missing(target, mask))
        metrics["classes"].update(self.class_scores(prediction), truth, mask[:, :1].expand_as(truth))

    def _class_results(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Per class: cases, non-cases, AUROC, and sensitivity/specificity/PPV of calling it past the threshold."""
        hist = metrics["classes"].compute()
        positives, negatives = BinnedScores.totals(hist)
        at_threshold = torch.full((len(self.classes),), self.bins // 2, device=hist.device)  # bin edge at score 0
        sensitivity, specificity, ppv = BinnedScores.rates_at(hist, at_threshold)
        return {
            "cases": positives,
            "non_cases": negatives,
            "auroc": BinnedScores.auroc(hist),
            "sensitivity": sensitivity,
            "specificity": specificity,
            "ppv": ppv,
        }

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Regression metrics, then ``auroc/<class>``, ``sensitivity/<class>``, ``specificity/<class>`` for each
        class that had cases and non-cases this epoch."""
        out = super().compute_metrics(metrics)
        r = self._class_results(metrics)
        for i, class_name in enumerate(self.classes):
            if r["cases"][i] > 0 and r["non_cases"][i] > 0:
                for key in ("auroc", "sensitivity", "specificity"):
                    out[f"{key}/{class_name}"] = r[key][i]
        return out

    def tables(self, metrics: MetricCollection) -> dict[str, list[dict[str, Any]]]:
        r = self._class_results(metrics)
        rows = [
            {
                "class": class_name,
                "rule": f"{direction} {threshold}",
                "cases": int(r["cases"][i]),
                "non_cases": int(r["non_cases"][i]),
                **{key: float(r[key][i]) for key in ("auroc", "sensitivity", "specificity", "ppv")},
            }
            for i, (class_name, (direction, threshold)) in enumerate(self.classes.items())
        ]
        return {**super().tables(metrics), "classes": rows}

    def decision_rules(self) -> list[dict[str, Any]]:
        """Each class (``hyperkalemia``: K+ > 5.5 mmol/L, ...) is called when the prediction crosses its threshold."""
        score = f"{self.labels[0]}{unit_suffix(self.column_units()[0])}"
        return [
            {"output": name, "kind": "compare", "score": score, "op": direction, "value": threshold}
            for name, (direction, threshold) in self.classes.items()
        ]

    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        """``potassium_mmol_l`` (+ ``potassium_sd_mmol_l``) and a 0/1 column per class."""
        out = super().postprocess(output)
        prediction, _ = self.predict(output)
        called = self.class_scores(prediction) > 0
        for i, class_name in enumerate(self.classes):
            out[class_name] = called[:, i].float()
        return out

    def resolved_arguments(self) -> dict[str, Any]:
        # the classes in force, so a change of POTASSIUM_CLASSES never changes a saved model
        return {**super().resolved_arguments(), "classes": {k: list(v) for k, v in self.classes.items()}}
