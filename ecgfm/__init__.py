"""ecgfm: fine-tune pretrained ECG foundation models (ECGFounder's Net1D first) on HDF5 shards with Lightning.

The public names below are imported on first use (PEP 562), so ``import ecgfm`` and the torch-free parts (source
readers, resampling, decisions, ``ecgfm predict --runtime onnx``) never import torch. Each registry in
``ecgfm.registry`` imports its built-in entries the first time it is used.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES, parse_leads
from ecgfm.registry import ADAPTERS, BACKBONES, HEADS, PREPROCESSING, REGISTRIES, SOURCES

if TYPE_CHECKING:
    from ecgfm.backbones import ContractError, InputContract, ModelConfig, create_backbone
    from ecgfm.heads import create_head
    from ecgfm.pretrained import ECGModel, load

__version__ = "0.1.0"

#: Public name -> the module it comes from, imported when the name is first read (these import torch).
_LAZY = {
    "ContractError": "ecgfm.backbones.config",
    "InputContract": "ecgfm.backbones.config",
    "ModelConfig": "ecgfm.backbones.config",
    "create_backbone": "ecgfm.backbones",
    "create_head": "ecgfm.heads",
    "ECGModel": "ecgfm.pretrained",
    "load": "ecgfm.pretrained",
}

__all__ = [
    "ADAPTERS",
    "BACKBONES",
    "HEADS",
    "PREPROCESSING",
    "REGISTRIES",
    "SOURCES",
    "STANDARD_FS",
    "STANDARD_LEADS",
    "STANDARD_N_SAMPLES",
    "ContractError",
    "ECGModel",
    "InputContract",
    "ModelConfig",
    "create_backbone",
    "create_head",
    "load",
    "parse_leads",
]


def __getattr__(name: str) -> Any:
    """A lazy public name, or a submodule (``ecgfm.signal``) as ``import ecgfm`` used to bind them all."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
