"""Readers that turn on-disk ECG records (WFDB, Challenge .mat) into millivolt arrays with named leads."""

from ecgfm.data.sources import challenge, wfdb  # noqa: F401  (importing registers the readers)
from ecgfm.data.sources.base import (
    SOURCES,
    Record,
    RecordError,
    SourceReader,
    get_source,
    register_source,
)
from ecgfm.data.sources.challenge import ChallengeReader, dx_names, load_dx_mapping
from ecgfm.data.sources.wfdb import WfdbReader

__all__ = [
    "SOURCES",
    "ChallengeReader",
    "Record",
    "RecordError",
    "SourceReader",
    "WfdbReader",
    "dx_names",
    "get_source",
    "load_dx_mapping",
    "register_source",
]
