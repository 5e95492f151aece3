"""ecgfm: fine-tune pretrained ECG foundation models (ECGFounder's Net1D first) on HDF5 shards with Lightning.

Importing ``ecgfm`` registers every built-in backbone, head, lead adapter, preprocessing chain and source reader in
``ecgfm.registry``.
"""

from ecgfm import adapters, signal  # noqa: F401  (register the adapters and preprocessing chains)
from ecgfm.backbones import ContractError, InputContract, ModelConfig, create_backbone
from ecgfm.data import sources  # noqa: F401  (registers the source readers)
from ecgfm.heads import create_head
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES, parse_leads
from ecgfm.registry import ADAPTERS, BACKBONES, HEADS, PREPROCESSING, REGISTRIES, SOURCES

__version__ = "0.1.0"

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
    "InputContract",
    "ModelConfig",
    "create_backbone",
    "create_head",
    "parse_leads",
]
