"""Readers that turn on-disk ECG records (WFDB, Challenge .mat, PTB-XL, array exports) into millivolt arrays.

Importing this package registers every reader in ``ecgfm.registry.SOURCES``: ``SOURCES.create("wfdb")``.
"""

from ecgfm.data.sources import arrays, challenge, ptbxl, wfdb  # noqa: F401  (importing registers the readers)
from ecgfm.data.sources.arrays import ArrayReader
from ecgfm.data.sources.base import Record, RecordError, SourceReader
from ecgfm.data.sources.challenge import ChallengeReader, dx_names, load_dx_mapping
from ecgfm.data.sources.ptbxl import PtbxlReader, ptbxl_split_file
from ecgfm.data.sources.wfdb import WfdbReader

__all__ = [
    "ArrayReader",
    "ChallengeReader",
    "PtbxlReader",
    "Record",
    "RecordError",
    "SourceReader",
    "WfdbReader",
    "dx_names",
    "load_dx_mapping",
    "ptbxl_split_file",
]
