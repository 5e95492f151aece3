"""Continuous targets (serum potassium, lab values): masked MSE or Huber loss, MAE and RMSE in the target's units."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from ecgfm.heads.base import Head, fill_missing, masked_mean, register_head


@register_head("regression")
class RegressionHead(Head):
    """One output per target column; the network predicts ``(y - mean) / std`` and post-processing undoes it.

    Args:
        loss: ``mse`` or ``huber``.
        huber_delta: the Huber transition point, in standardised units.
        target_mean, target_std: standardisation constants (one value, or one per column); 0 and 1 by default.
        units: the unit of the predictions (e.g. ``mmol/L``), carried into post-processing names.
    """

    def __init__(
        self,
        name: str = "regression",
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
        loss: str = "mse",
        huber_delta: float = 1.0,
        target_mean: float | list[float] = 0.0,
        target_std: float | list[float] = 1.0,
        units: str = "",
    ):
        super().__init__(name, target, labels, loss_weight)
        if loss not in ("mse", "huber"):
            raise ValueError(f"head {name!r}: loss must be 'mse' or 'huber', got {loss!r}")
        self.loss_name = loss
        self.huber_delta = huber_delta
        self.target_mean = target_mean
        self.target_std = target_std
        self.units = units

    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        self.regressor = nn.Linear(in_features, n_outputs)
        mean = torch.as_tensor(self.target_mean, dtype=torch.float32).expand(n_outputs).clone()
        std = torch.as_tensor(self.target_std, dtype=torch.float32).expand(n_outputs).clone()
        if (std <= 0).any():
            raise ValueError(f"head {self.name!r}: target_std must be positive, got {self.target_std}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, features: Tensor) -> Tensor:
        return self.regressor(features)

    def loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        z = fill_missing((target - self.mean) / self.std, mask)
        if self.loss_name == "huber":
            per = F.huber_loss(output.float(), z, delta=self.huber_delta, reduction="none")
        else:
            per = F.mse_loss(output.float(), z, reduction="none")
        return masked_mean(per, mask)

    def metrics(self) -> MetricCollection:
        return MetricCollection({"mae": MeanMetric(), "mse": MeanMetric()})

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        prediction = output.float() * self.std + self.mean
        error = (prediction - fill_missing(target, mask))[mask]
        if error.numel():
            metrics["mae"].update(error.abs())
            metrics["mse"].update(error.square())

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        mse = metrics["mse"].compute()
        return {"mae": metrics["mae"].compute(), "rmse": mse.sqrt()}

    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        prediction = output.float() * self.std + self.mean
        suffix = f"_{self.units.replace('/', '_').lower()}" if self.units else ""
        return {f"{label}{suffix}": prediction[:, i] for i, label in enumerate(self.labels)}

    def init_args(self) -> dict:
        return {
            **super().init_args(),
            "loss": self.loss_name,
            "huber_delta": self.huber_delta,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            "units": self.units,
        }
