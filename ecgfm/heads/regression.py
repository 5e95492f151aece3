"""Continuous targets (serum potassium, lab values): masked MSE, Huber or Gaussian NLL on standardised targets;
MAE, RMSE, Pearson r and the MAE of predicting the training mean, in the target's units."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from ecgfm.data.shards import TargetSummary
from ecgfm.heads.base import Head, fill_missing, masked_mean
from ecgfm.metrics import ColumnErrors
from ecgfm.registry import HEADS

LOSSES = ("mse", "huber", "gaussian_nll")
LOG_VAR_RANGE = (-10.0, 10.0)  # standardised units: sd from 0.007 to 150 target sds


def unit_suffix(unit: str) -> str:
    """``mmol/L`` -> ``_mmol_l``, ``µmol/L`` -> ``_umol_l``: a unit as a column-name suffix."""
    key = unit.replace("µ", "u").replace("μ", "u").replace("/", "_").replace(" ", "").lower()
    return f"_{key}" if key else ""


def _column_errors(metrics: MetricCollection) -> dict[str, Tensor]:
    """ColumnErrors' results as [K] vectors (torchmetrics squeezes them to scalars when K = 1)."""
    return {key: value.reshape(-1) for key, value in metrics["errors"].compute().items()}


@HEADS.register("regression")
class RegressionHead(Head):
    """One output per target column (two with ``gaussian_nll``: mean and log-variance); the network predicts
    ``(y - mean) / std`` and post-processing undoes it. Missing values are masked, never imputed.

    Args:
        loss: ``mse``, ``huber`` or ``gaussian_nll`` (predicts an uncertainty too; reports 95 % interval coverage).
        huber_delta: the Huber transition point, in standardised units.
        target_mean, target_std: standardisation constants (one value, or one per column); None (the default)
            learns them per column from the training split before training starts.
        units: the unit of the predictions (``mmol/L``), or one per column; carried into prediction names.
        dropout: dropout on the features before the linear layer.
        log_per_column: log ``mae/<column>`` and ``pearson/<column>`` when there are at most this many columns
            (all of them are always in the ``per_column`` table).
    """

    target_kinds = ("regression",)

    def __init__(
        self,
        name: str = "regression",
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
    ):
        super().__init__(name, target, labels, loss_weight)
        if loss not in LOSSES:
            raise ValueError(f"head {name!r}: loss must be one of {', '.join(LOSSES)}; got {loss!r}")
        self.loss_name = loss
        self.huber_delta = huber_delta
        self.target_mean = target_mean
        self.target_std = target_std
        self.units = units
        self.dropout = dropout
        self.log_per_column = log_per_column

    @property
    def uses_statistics(self) -> bool:
        return self.target_mean is None or self.target_std is None

    @property
    def predicts_uncertainty(self) -> bool:
        return self.loss_name == "gaussian_nll"

    def column_units(self) -> list[str]:
        if isinstance(self.units, str):
            return [self.units] * len(self.labels)
        if len(self.units) != len(self.labels):
            raise ValueError(f"head {self.name!r}: {len(self.units)} units for {len(self.labels)} columns")
        return list(self.units)

    def _constant(self, value: float | list[float] | None, default: float, n: int, what: str) -> Tensor:
        values = torch.as_tensor(default if value is None else value, dtype=torch.float32)
        if values.numel() not in (1, n):
            raise ValueError(f"head {self.name!r}: {what} has {values.numel()} values for {n} columns")
        return values.expand(n).clone()

    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        outputs = 2 * n_outputs if self.predicts_uncertainty else n_outputs
        self.regressor = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(in_features, outputs))
        std = self._constant(self.target_std, 1.0, n_outputs, "target_std")
        if (std <= 0).any():
            raise ValueError(f"head {self.name!r}: target_std must be positive, got {self.target_std}")
        self.register_buffer("mean", self._constant(self.target_mean, 0.0, n_outputs, "target_mean"))
        self.register_buffer("std", std)
        self.column_units()  # fail early on a units list of the wrong length

    def fit_statistics(self, summary: TargetSummary) -> None:
        """Mean and standard deviation per column from the training split (columns given in the recipe stay)."""
        empty = [lab for lab, n in zip(self.labels, summary.count, strict=True) if n < 2]
        if empty:
            warnings.warn(
                f"head {self.name!r}: fewer than 2 training values for {empty}; standardising them with mean 0, sd 1",
                stacklevel=2,
            )
        mean = np.where(summary.count > 0, summary.mean, 0.0)
        std = np.where((summary.count > 1) & (summary.std > 0), summary.std, 1.0)
        if self.target_mean is None:
            self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        if self.target_std is None:
            self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, features: Tensor) -> Tensor:
        return self.regressor(features)

    def split_output(self, output: Tensor) -> tuple[Tensor, Tensor | None]:
        """Standardised mean [B, K] and, with ``gaussian_nll``, log-variance [B, K]."""
        output = output.float()
        if not self.predicts_uncertainty:
            return output, None
        k = len(self.labels)
        return output[:, :k], output[:, k:].clamp(*LOG_VAR_RANGE)

    def predict(self, output: Tensor) -> tuple[Tensor, Tensor | None]:
        """Predictions in the target's units and, with ``gaussian_nll``, their standard deviations."""
        mean, log_var = self.split_output(output)
        sd = None if log_var is None else (0.5 * log_var).exp() * self.std
        return mean * self.std + self.mean, sd

    def loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        mean, log_var = self.split_output(output)
        z = fill_missing((target - self.mean) / self.std, mask)
        if self.loss_name == "huber":
            per = F.huber_loss(mean, z, delta=self.huber_delta, reduction="none")
        elif self.loss_name == "gaussian_nll":
            per = 0.5 * (log_var + (mean - z).square() * (-log_var).exp() + math.log(2 * math.pi))
        else:
            per = F.mse_loss(mean, z, reduction="none")
        return masked_mean(per, mask)

    def distillation_loss(
        self,
        student_output: Tensor,
        teacher_output: Tensor,
        temperature: float = 1.0,
        reference: dict[str, Any] | None = None,
    ) -> Tensor:
        """MSE between the student's standardised means and the teacher's, averaged over columns and samples.

        The teacher standardised with its own training mean and sd (``reference``, its
        :meth:`distillation_reference`); its means are put on this head's scale first,
        ``(z_t sd_t + mean_t - mean) / sd``. Without ``reference`` both scales are taken to be the same. Only the
        means are distilled: a ``gaussian_nll`` student learns its log-variance from the labels, and a teacher's
        log-variance columns (if any) are ignored. ``temperature`` does not apply.
        """
        mean, _ = self.split_output(student_output)
        target = teacher_output.detach().float()[:, : len(self.labels)]
        if reference is not None and "mean" in reference:
            t_mean = torch.as_tensor(reference["mean"], dtype=target.dtype, device=target.device)
            t_std = torch.as_tensor(reference["std"], dtype=target.dtype, device=target.device)
            target = (target * t_std + t_mean - self.mean) / self.std
        return F.mse_loss(mean, target)

    def distillation_reference(self) -> dict[str, Any]:
        """The standardisation constants: ``{"mean": [...], "std": [...]}``, one per column."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def metrics(self) -> MetricCollection:
        metrics: dict[str, Any] = {"errors": ColumnErrors(len(self.labels))}
        if self.predicts_uncertainty:
            metrics["coverage_95"] = MeanMetric()
        return MetricCollection(metrics)

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        prediction, sd = self.predict(output)
        target = fill_missing(target, mask)
        metrics["errors"].update(prediction, target, mask, reference=self.mean)
        if sd is not None and mask.any():
            metrics["coverage_95"].update(((prediction - target).abs() <= 1.96 * sd)[mask].float())

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Means over columns of Pearson r and ``mae_ratio`` (MAE / MAE of predicting the training mean), and of MAE and
        RMSE when every column has the same unit."""
        errors = _column_errors(metrics)
        known = errors["n"] > 0
        out: dict[str, Tensor] = {}
        pairs = [("pearson", "pearson")]
        if len(set(self.column_units())) == 1:  # a mean of MAEs in different units would mean nothing
            pairs += [("mae", "mae"), ("rmse", "rmse"), ("mae_reference", "mae_mean")]
        for key, name in pairs:
            values = errors[key][known]
            values = values[~values.isnan()]
            out[name] = values.mean() if values.numel() else torch.tensor(float("nan"))
        out["mae_ratio"] = (errors["mae"][known] / errors["mae_reference"][known]).nanmean()
        if "coverage_95" in metrics:
            out["coverage_95"] = metrics["coverage_95"].compute()
        if 1 < len(self.labels) <= self.log_per_column:
            for i, label in enumerate(self.labels):
                if known[i]:
                    out[f"mae/{label}"] = errors["mae"][i]
                    out[f"pearson/{label}"] = errors["pearson"][i]
        return out

    def tables(self, metrics: MetricCollection) -> dict[str, list[dict[str, Any]]]:
        errors = _column_errors(metrics)
        rows = []
        for i, (label, unit) in enumerate(zip(self.labels, self.column_units(), strict=True)):
            rows.append(
                {
                    "column": label,
                    "units": unit,
                    "n": int(errors["n"][i]),
                    "train_mean": round(float(self.mean[i]), 6),
                    "train_std": round(float(self.std[i]), 6),
                    "mae": float(errors["mae"][i]),
                    "rmse": float(errors["rmse"][i]),
                    "pearson": float(errors["pearson"][i]),
                    "mae_mean": float(errors["mae_reference"][i]),
                }
            )
        return {"per_column": rows}

    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        prediction, sd = self.predict(output)
        out = {}
        for i, (label, unit) in enumerate(zip(self.labels, self.column_units(), strict=True)):
            out[f"{label}{unit_suffix(unit)}"] = prediction[:, i]
            if sd is not None:
                out[f"{label}_sd{unit_suffix(unit)}"] = sd[:, i]
        return out
