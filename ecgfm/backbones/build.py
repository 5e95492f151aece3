"""``create_backbone``: a registered backbone by name, or rebuilt exactly from a stored model config, with weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ecgfm.backbones.config import ContractError, ModelConfig
from ecgfm.registry import BACKBONES

__all__ = ["create_backbone", "reset_classifier"]


def create_backbone(
    spec: str | Mapping[str, Any] | ModelConfig,
    pretrained: bool | str | Path = False,
    num_classes: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build a backbone, optionally with weights and a new classifier; the result carries its ``model_config``.

    Args:
        spec: a name from ``ecgfm list backbones``, ``{name: ..., **options}``, or a :class:`ModelConfig` (or its
            ``to_dict()``, as checkpoints store it) that is rebuilt exactly, whatever today's defaults are.
        pretrained: False for random weights, the path of a checkpoint in the backbone's native format (e.g.
            ECGFounder's ``12_lead_ECGFounder.pth``), or ``True`` to look the file up in the model zoo.
        num_classes: replace the classifier with one for this many outputs (the old one is not loaded).
        **options: architecture overrides (e.g. ``lead_names=("I",)``, ``in_channels``), or ``input`` (a contract).
    """
    if isinstance(spec, Mapping) and "architecture" in spec:
        spec = ModelConfig.from_dict(spec)
    if isinstance(spec, ModelConfig):
        if options:
            raise ContractError(f"backbone {spec.name!r} is rebuilt from its model config; options {sorted(options)}")
        model = BACKBONES.get(spec.name)(input=spec.input, **spec.architecture)
        rebuilt = model.model_config
        if (rebuilt.architecture, rebuilt.input) != (spec.architecture, spec.input):
            raise ContractError(
                f"backbone {spec.name!r} cannot be rebuilt exactly from its stored config: it gives "
                f"{model.model_config.to_dict()} for {spec.to_dict()}"
            )
        name = spec.name
    else:
        name = BACKBONES.parse(spec)[0]
        model = BACKBONES.create(spec, **options)
    if getattr(model, "model_config", None) is None:
        raise TypeError(f"backbone {name!r} was built without a model_config; its factory must attach one")
    if num_classes is not None:
        reset_classifier(model, num_classes)
    if pretrained is True:
        from ecgfm.zoo import resolve_weights

        pretrained = resolve_weights(name)
    if pretrained:
        model.load_pretrained(Path(pretrained))
    return model


def reset_classifier(model: nn.Module, num_classes: int) -> None:
    """Replace the layer the model config names as ``classifier`` with a fresh ``Linear(num_features, num_classes)``
    and record ``n_classes`` in the config, so the stored config rebuilds the model with that classifier."""
    config: ModelConfig = model.model_config
    if "n_classes" not in config.architecture:
        raise ContractError(f"backbone {config.name!r} has no n_classes option: num_classes cannot be set")
    parent, _, name = config.classifier.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.Linear(model.num_features, num_classes))
    model.model_config = config.replace(architecture={**config.architecture, "n_classes": num_classes})
