"""The quickstart's data: 120 LUDB recordings bundled in the package, and their conversion into shards.

``ecgfm quickstart`` (ecgfm/commands/quickstart.py) converts them, fine-tunes a small Net1D and tests it.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "ludb"

#: ludb.csv columns whose cells hold the diagnoses (several per cell, one per line).
LUDB_DIAGNOSIS_COLUMNS = [
    "Rhythms",
    "Electric axis of the heart",
    "Conduction abnormalities",
    "Extrasystolies",
    "Hypertrophies",
    "Cardiac pacing",
    "Ischemia",
    "Non-specific repolarization abnormalities",
    "Other states",
]


#: ludb.csv columns stored per segment (``/metadata/<name>``) for the report's subgroup tables.
LUDB_METADATA_COLUMNS = ["Age", "Sex"]


def convert_bundled(out: Path, progress: bool = True):
    """Convert the bundled LUDB records with their diagnoses (target ``diagnoses``), age and sex (metadata, for the
    report's subgroups) into shards under ``out``."""
    from ecgfm.data.convert import convert

    return convert(
        source=DATA_DIR / "data",
        out=out,
        reader="wfdb",
        labels=DATA_DIR / "ludb.csv",
        record_column="ID",
        multilabel={"diagnoses": LUDB_DIAGNOSIS_COLUMNS},
        metadata=LUDB_METADATA_COLUMNS,
        progress=progress,
    )
