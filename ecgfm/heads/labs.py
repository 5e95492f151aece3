"""Lab values from the ECG (AnyECG-Lab: 108 indicators, AUROC > 0.65 for 33): a masked multi-output regression
where most values are missing per ECG, standardised per lab on the training split, scored per lab by MAE, Pearson r
and the AUROC of the prediction for an abnormal value (outside the lab's reference range)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import MetricCollection

from ecgfm.heads.base import fill_missing
from ecgfm.heads.regression import RegressionHead
from ecgfm.metrics import BinnedScores
from ecgfm.registry import HEADS

SCORE_RANGE = 10.0  # abnormality scores are distances outside the range in training sds, binned over +-10


def load_reference_ranges(path: str | Path) -> dict[str, list[float | str | None]]:
    """A CSV with columns ``lab, low, high[, units]`` -> ``{lab: [low, high, units]}``; an empty bound is open."""
    path = Path(path)
    ranges: dict[str, list[float | str | None]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"lab", "low", "high"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)} (need lab, low, high[, units])")
        for line, row in enumerate(reader, start=2):
            lab = (row["lab"] or "").strip()
            try:
                low, high = (float(row[k]) if (row[k] or "").strip() else None for k in ("low", "high"))
            except ValueError as err:
                raise ValueError(f"{path}, line {line} ({lab}): {err}") from err
            if not lab or (low is None and high is None):
                raise ValueError(f"{path}, line {line}: needs a lab name and at least one bound")
            if low is not None and high is not None and not low < high:
                raise ValueError(f"{path}, line {line} ({lab}): low {low} is not below high {high}")
            if lab in ranges:
                raise ValueError(f"{path}, line {line}: lab {lab!r} is listed twice")
            ranges[lab] = [low, high, (row.get("units") or "").strip()]
    return ranges


@HEADS.register("labs")
class LabsHead(RegressionHead):
    """One output per lab; values missing from an ECG's panel are masked out of the loss and every metric.

    Takes RegressionHead's arguments, plus:
        reference_ranges: CSV file ``lab, low, high[, units]`` (units fill in ``units`` when it is left empty).
        ranges: the same as ``{lab: [low, high, units]}`` (what checkpoints store); a lab with no range gets no AUROC.
        auroc_above: ``n_auroc_above`` counts the labs whose abnormal-value AUROC exceeds this (AnyECG-Lab: 0.65).
        bins: histogram bins of the abnormality scores (bounded memory).
    """

    def __init__(
        self,
        name: str = "labs",
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
        loss: Literal["mse", "huber", "gaussian_nll"] = "mse",
        huber_delta: float = 1.0,
        target_mean: float | list[float] | None = None,
        target_std: float | list[float] | None = None,
        units: str | list[str] = "",
        dropout: float = 0.0,
        log_per_column: int = 16,
        reference_ranges: str | None = None,
        ranges: dict[str, list[float | str | None]] | None = None,
        auroc_above: float = 0.65,
        bins: int = 1024,
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
        self.ranges = {**(load_reference_ranges(reference_ranges) if reference_ranges else {}), **(ranges or {})}
        self.auroc_above = auroc_above
        self.bins = bins

    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        if not self.units:
            self.units = [str(self.ranges.get(lab, [None, None, ""])[2] or "") for lab in self.labels]
        super()._build_layers(in_features, n_outputs)
        inf = float("inf")
        low = [
            self.ranges[lab][0] if lab in self.ranges and self.ranges[lab][0] is not None else -inf
            for lab in self.labels
        ]
        high = [
            self.ranges[lab][1] if lab in self.ranges and self.ranges[lab][1] is not None else inf
            for lab in self.labels
        ]
        self.register_buffer("range_low", torch.tensor(low, dtype=torch.float32))
        self.register_buffer("range_high", torch.tensor(high, dtype=torch.float32))
        self.register_buffer("has_range", torch.tensor([lab in self.ranges for lab in self.labels]))

    def abnormality(self, prediction: Tensor) -> Tensor:
        """[B, labs] how far the prediction lies outside the reference range, in training sds (< 0: inside)."""
        below = (self.range_low - prediction).nan_to_num(neginf=-1e6)
        above = (prediction - self.range_high).nan_to_num(neginf=-1e6)
        return torch.maximum(below, above) / self.std

    def metrics(self) -> MetricCollection:
        metrics = super().metrics()
        metrics.add_metrics({"abnormal": BinnedScores(len(self.labels), self.bins, -SCORE_RANGE, SCORE_RANGE)})
        return metrics

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        super().update_metrics(metrics, output, target, mask)
        prediction, _ = self.predict(output)
        target = fill_missing(target, mask)
        truth = ((target < self.range_low) | (target > self.range_high)).float()
        metrics["abnormal"].update(self.abnormality(prediction), truth, mask & self.has_range)

    def _abnormal_auroc(self, metrics: MetricCollection) -> tuple[Tensor, Tensor, Tensor]:
        hist = metrics["abnormal"].compute()
        positives, negatives = BinnedScores.totals(hist)
        scored = (positives > 0) & (negatives > 0)
        return BinnedScores.auroc(hist), positives, scored

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Regression metrics averaged over labs, ``auroc`` (mean abnormal-value AUROC over labs with both normal and
        abnormal values), ``n_auroc_above`` and, for up to ``log_per_column`` labs, ``auroc/<lab>``."""
        out = super().compute_metrics(metrics)
        auroc, _, scored = self._abnormal_auroc(metrics)
        out["auroc"] = auroc[scored].mean() if scored.any() else torch.tensor(float("nan"))
        out["n_auroc_above"] = (auroc[scored] > self.auroc_above).sum().float()
        out["n_labs_scored"] = scored.sum().float()
        if len(self.labels) <= self.log_per_column:
            for i, lab in enumerate(self.labels):
                if scored[i]:
                    out[f"auroc/{lab}"] = auroc[i]
        return out

    def tables(self, metrics: MetricCollection) -> dict[str, list[dict[str, Any]]]:
        rows = super().tables(metrics)["per_column"]
        auroc, positives, scored = self._abnormal_auroc(metrics)
        for i, row in enumerate(rows):
            row["range_low"] = float(self.range_low[i])
            row["range_high"] = float(self.range_high[i])
            row["abnormal"] = int(positives[i])
            row["auroc_abnormal"] = float(auroc[i]) if scored[i] else float("nan")
        return {"per_lab": rows}

    def resolved_arguments(self) -> dict[str, Any]:
        # the file's ranges are in ``ranges``: a checkpoint does not need the file
        return {**super().resolved_arguments(), "reference_ranges": None, "ranges": self.ranges}
