"""Backbones by name: ``@register_backbone`` on a factory, ``create_backbone(name, pretrained=...)`` to build one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ecgfm.leads import STANDARD_LEADS


@dataclass(frozen=True)
class InputSpec:
    """The input contract a backbone was trained with; it travels with every checkpoint made from it."""

    fs: float = 500.0
    n_samples: int = 5000
    lead_names: tuple[str, ...] = STANDARD_LEADS
    preprocessing: dict[str, Any] = field(default_factory=lambda: {"name": "ecgfounder"})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lead_names"] = list(self.lead_names)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        data = dict(data)
        data["lead_names"] = tuple(data.get("lead_names", STANDARD_LEADS))
        return cls(**data)


BackboneFactory = Callable[..., nn.Module]
_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory ``fn(num_classes=None, **kwargs) -> nn.Module`` under ``name``."""

    def decorator(fn: BackboneFactory) -> BackboneFactory:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_BACKBONES)


def create_backbone(
    name: str,
    pretrained: bool | str | Path = False,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered backbone, optionally loading weights, optionally with a new ``num_classes`` head.

    Args:
        name: a name from :func:`list_backbones`.
        pretrained: False for random weights, or the path of a checkpoint in the backbone's native format
            (e.g. ECGFounder's ``12_lead_ECGFounder.pth``). ``True`` looks the file up in the model zoo.
        num_classes: replace the classifier with one for this many outputs (the old head is not loaded).
        **kwargs: constructor overrides (e.g. ``in_channels``).
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    model = _BACKBONES[name](num_classes=num_classes, **kwargs)
    if pretrained is True:
        from ecgfm.zoo import resolve_weights

        pretrained = resolve_weights(name)
    if pretrained:
        model.load_pretrained(Path(pretrained))
    return model
