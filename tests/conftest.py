"""Shared fixtures: the real recordings in ../shared/data and a shard folder converted from the bundled LUDB."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
QUICKSTART_RECIPE = REPO / "recipes" / "quickstart" / "net1d-small.yaml"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real recordings not found at {SHARED_DATA} (CI has ../shared beside the repo)")
    return SHARED_DATA


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
