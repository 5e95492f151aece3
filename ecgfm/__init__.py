"""ecgfm: fine-tune pretrained ECG foundation models (ECGFounder's Net1D first) on HDF5 shards with Lightning."""

from ecgfm.backbones import InputSpec, create_backbone, list_backbones, register_backbone
from ecgfm.heads import create_head, list_heads, register_head
from ecgfm.leads import STANDARD_LEADS, parse_leads

__version__ = "0.1.0"

__all__ = [
    "STANDARD_LEADS",
    "InputSpec",
    "create_backbone",
    "create_head",
    "list_backbones",
    "list_heads",
    "parse_leads",
    "register_backbone",
    "register_head",
]
