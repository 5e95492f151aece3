"""Readers that turn on-disk ECG records (WFDB, Challenge .mat, PTB-XL, array exports) into millivolt arrays.

Importing this package registers every reader in ``ecgfm.registry.SOURCES``: ``SOURCES.create("wfdb")``.
"""

from ecgfm.data.sources import (  # noqa: F401  (importing registers the readers)
    aecg_xml,
    arrays,
    challenge,
    cpsc2018,
    dicom,
    edf,
    muse_xml,
    ptbxl,
    wfdb,
)
from ecgfm.data.sources.aecg_xml import AecgXmlReader
from ecgfm.data.sources.arrays import ArrayReader
from ecgfm.data.sources.base import Record, RecordError, SourceReader
from ecgfm.data.sources.challenge import ChallengeReader, dx_names, load_dx_mapping
from ecgfm.data.sources.cpsc2018 import Cpsc2018Reader
from ecgfm.data.sources.dicom import DicomReader
from ecgfm.data.sources.edf import EdfReader
from ecgfm.data.sources.muse_xml import MuseXmlReader
from ecgfm.data.sources.ptbxl import PtbxlReader, ptbxl_split_file
from ecgfm.data.sources.wfdb import WfdbReader

__all__ = [
    "AecgXmlReader",
    "ArrayReader",
    "ChallengeReader",
    "Cpsc2018Reader",
    "DicomReader",
    "EdfReader",
    "MuseXmlReader",
    "PtbxlReader",
    "Record",
    "RecordError",
    "SourceReader",
    "WfdbReader",
    "dx_names",
    "load_dx_mapping",
    "ptbxl_split_file",
]
