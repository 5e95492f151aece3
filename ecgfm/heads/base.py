"""The head contract: forward, masked loss, metrics, post-processing into named predictions; and the head registry."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ecgfm.data.shards import TargetSummary

_HEADS: dict[str, type[Head]] = {}


def register_head(kind: str) -> Callable[[type[Head]], type[Head]]:
    """Register a Head subclass under a short name usable in recipes (``kind: multilabel``)."""

    def decorator(cls: type[Head]) -> type[Head]:
        if kind in _HEADS:
            raise ValueError(f"head kind {kind!r} is already registered")
        cls.kind = kind
        _HEADS[kind] = cls
        return cls

    return decorator


def list_heads() -> list[str]:
    """Registered head kinds, sorted."""
    return sorted(_HEADS)


def create_head(spec: Head | dict[str, Any]) -> Head:
    """Build a head from an instance, ``{"kind": ..., **kwargs}`` or ``{"class_path": ..., "init_args": ...}``."""
    if isinstance(spec, Head):
        return spec
    spec = dict(spec)
    if "class_path" in spec:
        module_name, _, cls_name = spec["class_path"].rpartition(".")
        if not module_name.startswith("ecgfm."):
            raise ValueError(f"head class {spec['class_path']!r} is outside ecgfm; refusing to import it")
        cls = getattr(importlib.import_module(module_name), cls_name)
        return cls(**spec.get("init_args", {}))
    kind = spec.pop("kind", None)
    if kind not in _HEADS:
        raise ValueError(f"unknown head kind {kind!r}; registered: {', '.join(list_heads())}")
    return _HEADS[kind](**spec)


class Head(nn.Module, ABC):
    """Maps backbone features [B, D] to one target's outputs; layers are built once the label names are known.

    Args:
        name: the head's name in logs (``val/<name>/auroc``) and predictions.
        target: the shard target it learns (``/targets/<target>``); defaults to ``name``.
        labels: the target's label (or column) names to use, in order; None = all of them, from the data.
        loss_weight: weight of this head's loss in a multi-task sum.
    """

    kind = "base"

    def __init__(
        self,
        name: str,
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        self.name = name
        self.target = target or name
        self.labels = list(labels) if labels is not None else None
        self.loss_weight = loss_weight
        self.in_features: int | None = None

    @property
    def is_built(self) -> bool:
        return self.in_features is not None

    def build(self, in_features: int, labels: list[str]) -> None:
        """Create the layers for ``in_features`` inputs and these label names."""
        self.in_features = in_features
        self.labels = list(labels)
        self._build_layers(in_features, len(self.labels))
        # Set once fit_statistics has run; saved with the weights, so a reloaded head is never re-standardised.
        self.register_buffer("statistics_fitted", torch.zeros((), dtype=torch.bool))

    @abstractmethod
    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        """Each subclass creates its layers."""

    @abstractmethod
    def loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Each subclass defines its masked loss."""

    @abstractmethod
    def metrics(self) -> MetricCollection:
        """Each subclass defines its metrics."""

    @abstractmethod
    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        """Each subclass feeds its metrics."""

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Named scalar results, logged as ``{split}/{head}/{name}``."""
        return {key: value for key, value in metrics.compute().items() if value.numel() == 1}

    @abstractmethod
    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        """Each subclass names and scales its predictions."""

    #: True when the head learns constants from the training split (standardisation, class weights): the task
    #: then calls ``fit_statistics`` once before a new run starts; the constants are buffers, saved with the weights.
    uses_statistics = False

    def fit_statistics(self, summary: TargetSummary) -> None:
        """Learn constants from the training split's per-column counts, sums and sums of squares."""

    def calibrate(self, metrics: MetricCollection) -> None:
        """After each validation epoch (not the sanity check): choose decision thresholds from validation results."""

    def tables(self, metrics: MetricCollection) -> dict[str, list[dict[str, Any]]]:
        """Per-label or per-category results too long for the logger; the task writes each as a CSV file."""
        return {}

    def config(self) -> dict[str, Any]:
        """The constructor call that rebuilds this head (saved in checkpoints)."""
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "init_args": self.init_args(),
        }

    def init_args(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "labels": self.labels,
            "loss_weight": self.loss_weight,
        }


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; 0 (with a gradient path) when nothing is labelled."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def row_mask(mask: Tensor) -> Tensor:
    """[B, K] column mask -> [B] rows whose K columns are all known (one-hot classes, ordinal levels)."""
    return mask.all(dim=1) if mask.ndim == 2 else mask


def fill_missing(target: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    """Replace masked-out (NaN) targets with a finite value so losses stay finite; the mask removes them."""
    return torch.where(mask, target, torch.full_like(target, value))
