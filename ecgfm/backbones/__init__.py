"""Backbones; importing this package registers every built-in backbone in ``ecgfm.registry.BACKBONES``."""

from ecgfm.backbones import (  # noqa: F401  (importing registers each family's configs)
    ecg_fm,
    hubert_ecg,
    image,
    net1d,
    precomputed,
)
from ecgfm.backbones.build import create_backbone
from ecgfm.backbones.checkpoint import CheckpointError, load_state_dict_file, safe_torch_load
from ecgfm.backbones.config import ContractError, InputContract, ModelConfig

__all__ = [
    "CheckpointError",
    "ContractError",
    "InputContract",
    "ModelConfig",
    "create_backbone",
    "load_state_dict_file",
    "safe_torch_load",
]
