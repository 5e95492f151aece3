"""Parameter-efficient fine-tuning: LoRA, LoHa or LoKr adapters inside a frozen pretrained backbone, through Hugging
Face ``peft``.

A recipe turns it on with ``model.peft: {method: lora, r: 8, alpha: 16, dropout: 0.0, target: [...]}``. peft injects
the adapters into the backbone's own layers (its ``forward_features`` is unchanged) and freezes every other backbone
weight; the heads and a learned lead adapter train as before. A checkpoint then holds only what trained plus the name
and sha256 of the base weights file (``model.pretrained``), which loading reads first and checks. Publishing, export
and prediction serve the merged model: the adapters folded into the base weights by peft's ``merge_and_unload``, so
the published folder is a plain model that loads with no peft.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ecgfm.backbones.checkpoint import CheckpointError
from ecgfm.backbones.ecg_fm import ECGFM
from ecgfm.backbones.hubert_ecg import HuBERTECGBackbone
from ecgfm.backbones.image import ImageECG
from ecgfm.backbones.net1d import Net1D
from ecgfm.io import sha256sum

__all__ = ["DEFAULT_TARGETS", "METHODS", "BackbonePeft", "PeftSpec", "default_target", "native_layout"]

#: The name peft gives the one adapter set a task trains (it appears in state_dict keys: ``lora_A.default.weight``).
ADAPTER_NAME = "default"
#: Layer types the methods adapt here (peft's LoRA, LoHa and LoKr all support them, merging included).
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: peft config fields ecgfm sets itself (or that make no sense outside a transformers model).
MANAGED_FIELDS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "target_modules",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
    }
)


@dataclass(frozen=True)
class Method:
    """A peft method: its config and tuner class names, and the config fields ecgfm's ``r``/``alpha``/``dropout``
    keys set (peft names them differently per method)."""

    config: str
    tuner: str
    r: str = "r"
    alpha: str = "alpha"
    dropout: str = "rank_dropout"

    def classes(self) -> tuple[type, type]:
        """peft's config and tuner classes (peft is imported on first use: it pulls in transformers)."""
        import peft

        return getattr(peft, self.config), getattr(peft, self.tuner)


#: The methods a recipe can name; all three adapt Linear, Conv1d and Conv2d layers and merge into them.
METHODS: dict[str, Method] = {
    "lora": Method("LoraConfig", "LoraModel", alpha="lora_alpha", dropout="lora_dropout"),
    "loha": Method("LoHaConfig", "LoHaModel"),
    "lokr": Method("LoKrConfig", "LoKrModel"),
}


def _stage_convolutions(backbone: ImageECG) -> tuple[str, ...]:
    """Every ungrouped Conv2d inside the timm model's stages (after the stem): a depthwise conv cannot take LoRA."""
    stages = tuple(f"{name}." for name in backbone.stages)
    return tuple(
        f"model.{name}"
        for name, module in backbone.model.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups == 1 and name.startswith(stages)
    )


#: Default ``target`` per backbone family: module-name suffixes (peft's list form) or a function of the backbone.
#: Net1D: the pointwise convolutions of every block (its grouped kxk convolutions cannot merge a LoRA, its first
#: convolution is the lead adapter's); transformers: the attention projections; image models: the stage convolutions.
DEFAULT_TARGETS: dict[type, tuple[str, ...] | Callable[[Any], tuple[str, ...]]] = {
    Net1D: ("conv1.conv", "conv3.conv"),
    HuBERTECGBackbone: ("q_proj", "k_proj", "v_proj", "out_proj"),
    ECGFM: ("q_proj", "k_proj", "v_proj", "out_proj"),
    ImageECG: _stage_convolutions,
}


def _backbone_name(backbone: nn.Module) -> str:
    config = getattr(backbone, "model_config", None)
    return repr(config.name) if config is not None else type(backbone).__name__


def _layer_kinds(backbone: nn.Module) -> str:
    """The backbone's adaptable layers by short name (``conv1.conv``, ``attention.q_proj``), for error messages."""
    seen: dict[str, None] = {}
    for name, module in backbone.named_modules():
        if isinstance(module, ADAPTABLE):
            parts = name.split(".")
            numbered = [i for i, part in enumerate(parts) if part.isdigit()]
            seen[".".join(parts[numbered[-1] + 1 :] if numbered else parts)] = None
    return ", ".join(seen) or "none"


def default_target(backbone: nn.Module) -> tuple[str, ...]:
    """The layers a backbone family adapts when the recipe gives no ``peft.target``."""
    for kind, target in DEFAULT_TARGETS.items():
        if isinstance(backbone, kind):
            return tuple(target(backbone) if callable(target) else target)
    raise ValueError(
        f"backbone {_backbone_name(backbone)} ({type(backbone).__name__}) has no default peft target: set peft.target "
        f"to module names; its Linear/Conv layers: {_layer_kinds(backbone)}"
    )


@dataclass(frozen=True)
class PeftSpec:
    """The resolved ``peft`` recipe key: what hyper-parameters and ``checkpoint["ecgfm"]["peft"]`` store, so a
    checkpoint rebuilds the same adapters whatever today's defaults are.

    Attributes:
        method: ``lora``, ``loha`` or ``lokr``.
        r: the adapters' rank.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: LoRA's input dropout; LoHa's and LoKr's rank dropout.
        target: module names (a module is adapted when its name is one of them or ends in ``.<name>``) or one
            regular expression matching whole names (peft's ``target_modules``).
        options: further fields of the method's peft config (``use_rslora``, ``decompose_factor``, ...).
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target: tuple[str, ...] | str = ()
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], backbone: nn.Module) -> PeftSpec:
        """The recipe's ``peft`` mapping, checked, with the backbone family's default target when it names none."""
        data = dict(data)
        method = str(data.pop("method", cls.method)).lower()
        if method not in METHODS:
            raise ValueError(f"peft.method {method!r} is not one of {', '.join(METHODS)}")
        r, alpha, dropout = int(data.pop("r", cls.r)), float(data.pop("alpha", cls.alpha)), data.pop("dropout", 0.0)
        target = data.pop("target", None)
        config_class, _ = METHODS[method].classes()
        spec = METHODS[method]
        ours = {spec.r, spec.alpha, spec.dropout}
        allowed = {f.name for f in dataclasses.fields(config_class)} - MANAGED_FIELDS - ours
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(
                f"peft has no key {', '.join(map(repr, unknown))} for method {method!r}: use method, r, alpha, "
                f"dropout, target or a {config_class.__name__} field ({', '.join(sorted(allowed))})"
            )
        if r < 1 or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"peft needs r >= 1 and 0 <= dropout < 1, got r={r}, dropout={dropout}")
        if target is None:
            target = default_target(backbone)
        elif not isinstance(target, str):
            target = tuple(str(t) for t in target)
        return cls(method, r, alpha, float(dropout), target, data)

    def to_dict(self) -> dict[str, Any]:
        target = self.target if isinstance(self.target, str) else list(self.target)
        return {
            "method": self.method,
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target": target,
            **copy.deepcopy(self.options),
        }

    def peft_config(self) -> Any:
        """The method's peft config (``LoraConfig``, ``LoHaConfig``, ``LoKrConfig``)."""
        method = METHODS[self.method]
        config_class, _ = method.classes()
        target = self.target if isinstance(self.target, str) else list(self.target)
        values = {method.r: self.r, method.alpha: self.alpha, method.dropout: self.dropout}
        return config_class(**values, target_modules=target, **copy.deepcopy(self.options))

    def matched_layers(self, backbone: nn.Module) -> list[str]:
        """The backbone's modules this target adapts; names that match nothing, or layers of a kind the method
        cannot adapt (or merge), fail with one line naming them."""
        modules = {name: module for name, module in backbone.named_modules() if name}
        where = f"backbone {_backbone_name(backbone)} (its Linear/Conv layers: {_layer_kinds(backbone)})"
        if isinstance(self.target, str):
            matched = [name for name in modules if re.fullmatch(self.target, name)]
            if not matched:
                raise ValueError(f"peft.target {self.target!r} (a regular expression) matches no module of {where}")
        else:

            def hit(name: str, target: str) -> bool:
                return name == target or name.endswith(f".{target}")

            unmatched = [target for target in self.target if not any(hit(name, target) for name in modules)]
            if unmatched or not self.target:
                raise ValueError(f"peft.target {unmatched or []} match no module of {where}")
            matched = [name for name in modules if any(hit(name, target) for target in self.target)]
        wrong = [f"{n} ({type(modules[n]).__name__})" for n in matched if not isinstance(modules[n], ADAPTABLE)]
        if wrong:
            raise ValueError(
                f"peft.target selects {', '.join(wrong[:8])}, which {self.method} does not adapt here: target the "
                f"Linear/Conv1d/Conv2d layers inside them; {where}"
            )
        grouped = [name for name in matched if getattr(modules[name], "groups", 1) > 1]
        if grouped and self.method == "lora":
            raise ValueError(
                f"peft.target selects grouped convolutions ({', '.join(grouped[:8])}), which a LoRA cannot be merged "
                "into: leave them out of peft.target or use method loha or lokr"
            )
        return matched


@contextmanager
def native_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block each peft layer of ``model`` is replaced by the layer it wraps (same weights, the original
    state_dict names), so a backbone's own ``load_pretrained`` reads a native checkpoint into the base weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, module.get_base_layer())
            swapped.append((owner, child, module))
    try:
        yield model
    finally:
        for owner, child, module in swapped:
            setattr(owner, child, module)


class BackbonePeft:
    """The adapters a FineTuneTask trains inside its backbone: the resolved recipe, peft's tuner (which holds the
    backbone it changed in place) and the base weights (file and sha256) the adapters sit on.

    It is held outside the module tree: the adapter weights live in the backbone, where state_dict() finds them.
    """

    def __init__(self, spec: PeftSpec, backbone: nn.Module, base: Mapping[str, Any] | None = None):
        self.spec = spec
        self.layers = spec.matched_layers(backbone)
        _, tuner_class = METHODS[spec.method].classes()
        self.tuner = tuner_class(backbone, spec.peft_config(), adapter_name=ADAPTER_NAME)  # freezes the rest
        self.base: dict[str, Any] | None = dict(base) if base else None

    @classmethod
    def build(cls, config: Mapping[str, Any] | None, backbone: nn.Module) -> BackbonePeft | None:
        """From a recipe's ``peft`` mapping or a stored one (which also names its ``base``); None for none."""
        if not config:
            return None
        config = dict(config)
        base = config.pop("base", None)
        return cls(PeftSpec.from_dict(config, backbone), backbone, base)

    @property
    def backbone(self) -> nn.Module:
        return self.tuner.model

    def stored(self) -> dict[str, Any]:
        """``checkpoint["ecgfm"]["peft"]``: the spec and the base weights' file and sha256."""
        return {**self.spec.to_dict(), "base": copy.deepcopy(self.base)}

    # ----------------------------------------------------------------- what trains, what a checkpoint holds
    def is_adapter_key(self, key: str) -> bool:
        """Whether a backbone state_dict key is an adapter weight (``...conv.lora_A.default.weight``)."""
        return any(part.startswith(self.tuner.prefix) for part in key.split("."))

    def frozen_base_keys(self) -> list[str]:
        """Backbone state_dict keys that come from the base weights file unchanged: checkpoints leave them out."""
        trainable = {name for name, param in self.backbone.named_parameters() if param.requires_grad}
        return [key for key in self.backbone.state_dict() if key not in trainable and not self.is_adapter_key(key)]

    def strip(self, state: dict[str, Tensor], prefix: str = "backbone.") -> dict[str, Tensor]:
        """``state`` without the frozen base weights: what a checkpoint holds."""
        frozen = {prefix + key for key in self.frozen_base_keys()}
        return {key: value for key, value in state.items() if key not in frozen}

    def freeze_statistics(self) -> None:
        """Normalisation layers that track running statistics stay in eval mode: the base's statistics are frozen
        with its weights, so a checkpoint need not carry them."""
        for module in self.backbone.modules():
            if getattr(module, "track_running_stats", False):
                module.eval()

    def report(self, model: nn.Module, loggers: list[Any] = ()) -> tuple[int, int]:
        """Log how many of ``model``'s parameters train (adapters, heads, a learned lead adapter) and their share."""
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        share = trainable / max(total, 1)
        rank_zero_info(
            f"peft {self.spec.method} (r={self.spec.r}) on {len(self.layers)} layers of backbone "
            f"{_backbone_name(self.backbone)}: {trainable:,} of {total:,} parameters train ({share:.2%})"
        )
        for logger in loggers:
            logger.log_metrics({"peft/trainable_params": float(trainable), "peft/trainable_share": share}, step=0)
        return trainable, total

    # ----------------------------------------------------------------- base weights
    def load_base(self, path: str | Path, state_filter: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> None:
        """Read the base weights (the backbone's native format, through ``state_filter``) and record their sha256."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"peft records the sha256 of its base weights, so model.pretrained must be a local file; {path} is not"
            )
        with native_layout(self.backbone):
            self.backbone.load_pretrained(path, state_filter=state_filter)
        self.base = {"file": str(path), "path": str(path.resolve()), "sha256": sha256sum(path)}

    def restore_base(
        self,
        state: dict[str, Tensor],
        state_filter: Callable[[dict[str, Tensor]], dict[str, Tensor]],
        preferred: str | Path | None = None,
        source: str = "the checkpoint",
        prefix: str = "backbone.",
    ) -> None:
        """Load the base weights a checkpoint's adapters were trained on and fill ``state`` (the checkpoint's
        state_dict) with them, so it loads strictly. ``preferred`` (model.pretrained) is tried before the recorded
        file (as named, then its absolute path when recorded); each must have the recorded sha256.

        Raises:
            CheckpointError: one line naming the base file when it is missing or its sha256 differs.
        """
        recorded = self.base or {}
        file, expected = recorded.get("file"), recorded.get("sha256")
        method = self.spec.method
        if not file or not expected:
            raise CheckpointError(f"{source} holds {method} adapters but names no base weights file and sha256")
        mismatch = None
        for candidate in dict.fromkeys(str(c) for c in (preferred, file, recorded.get("path")) if c):
            path = Path(candidate)
            if not path.is_file():
                continue
            digest = sha256sum(path)
            if digest == expected:
                break
            mismatch = mismatch or (path, digest)
        else:
            if mismatch is not None:
                raise CheckpointError(
                    f"base weights {mismatch[0]} have sha256 {mismatch[1]}, but the {method} adapters of {source} "
                    f"were trained on {file} with sha256 {expected}: set model.pretrained to that file"
                )
            raise CheckpointError(
                f"base weights {file} (sha256 {expected}), which the {method} adapters of {source} were trained on, "
                "do not exist: put the file there (or, loading a FineTuneTask, set model.pretrained to a copy of it)"
            )
        with native_layout(self.backbone):
            self.backbone.load_pretrained(path, state_filter=state_filter)
        self.base = {"file": str(path), "path": str(path.resolve()), "sha256": expected}
        own = self.backbone.state_dict()
        for key in self.frozen_base_keys():
            state.setdefault(prefix + key, own[key])

    # ----------------------------------------------------------------- merging
    def merged_backbone(self) -> nn.Module:
        """A copy of the backbone with the adapters folded into its weights (peft's ``merge_and_unload``): the plain
        layers and state_dict names of the base model; the backbone itself keeps training."""
        return copy.deepcopy(self.tuner).merge_and_unload(safe_merge=True)

    def merged_state_dict(self, state: Mapping[str, Tensor], prefix: str = "backbone.") -> dict[str, Tensor]:
        """A task's ``state`` with the backbone's entries replaced by the merged backbone's: what a plain model
        (``ECGModel``) loads strictly."""
        out = {key: value for key, value in state.items() if not key.startswith(prefix)}
        out.update({prefix + key: value for key, value in self.merged_backbone().state_dict().items()})
        return out

    def merge(self) -> nn.Module:
        """Fold the adapters into the backbone in place; the backbone is a plain model afterwards."""
        backbone = self.tuner.merge_and_unload(safe_merge=True)
        if hasattr(backbone, "peft_config"):
            del backbone.peft_config
        return backbone
