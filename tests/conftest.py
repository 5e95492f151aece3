"""Shared fixtures: the real recordings in tests/data, the bundled LUDB, and shard folders converted from them."""

from __future__ import annotations

from pathlib import Path

# Lightning adds its log handler, on the stderr of the moment, when it is first imported: import it here, at session
# start, not inside a test whose captured stderr is closed afterwards ("--- Logging error ---" in later tests).
import lightning.pytorch  # noqa: F401
import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"
QUICKSTART_RECIPE = REPO / "recipes" / "quickstart" / "net1d-small.yaml"


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The real PhysioNet recordings shipped with the tests: cinc2021/, ptbdb-s0010/, specs/ (see data/README.md)."""
    assert (TEST_DATA / "cinc2021").is_dir(), f"{TEST_DATA} is incomplete: it ships with the tests"
    return TEST_DATA


@pytest.fixture(scope="session")
def ludb_data() -> Path:
    """LUDB records 1-120 (data/1 ... data/120) and ludb.csv, bundled with the package for the quickstart."""
    from ecgfm.quickstart import DATA_DIR

    assert len(list((DATA_DIR / "data").glob("*.hea"))) == 120, DATA_DIR
    return DATA_DIR


@pytest.fixture(scope="session")
def ludb_shards(tmp_path_factory) -> Path:
    """The bundled LUDB records with their diagnoses, converted once per test session."""
    from ecgfm.quickstart import convert_bundled

    out = tmp_path_factory.mktemp("ludb-shards")
    summary = convert_bundled(out, progress=False)
    assert summary.records_read == 120 and not summary.skipped
    return out


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """768 synthetic segments (192 patients) with potassium, labs, electrolyte and hyperkalemia targets."""
    from ecgfm.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("synthetic-shards")
    write_synthetic_shards(out, 768, seed=0, segments_per_shard=256, progress=False)
    return out
