"""Backbones; importing this package registers every built-in backbone."""

from ecgfm.backbones import net1d  # noqa: F401  (registers the Net1D configs)
from ecgfm.backbones.checkpoint import CheckpointError, load_state_dict_file, safe_torch_load
from ecgfm.backbones.registry import InputSpec, create_backbone, list_backbones, register_backbone

__all__ = [
    "CheckpointError",
    "InputSpec",
    "create_backbone",
    "list_backbones",
    "load_state_dict_file",
    "register_backbone",
    "safe_torch_load",
]
