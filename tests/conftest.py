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


@pytest.fixture(scope="session")
def ludb_scans(ludb_shards: Path, tmp_path_factory) -> Path:
    """The bundled LUDB segments printed as paper ECGs (4 px/mm) and 'scanned': tinted paper, blur, sensor noise and
    dark specks, every other one a JPEG; with labels.csv (file, patient, diagnoses) as a hospital's export has it."""
    import numpy as np
    import torch
    from PIL import Image, ImageFilter

    from ecgfm.data.dataset import ShardDataset
    from ecgfm.ecg_paper import PaperECG
    from ecgfm.signal import ECGFounderPreprocessing, to_millivolts

    out = tmp_path_factory.mktemp("ludb-scans")
    dataset = ShardDataset(ludb_shards)
    names = dataset.manifest.targets["diagnoses"].names
    batch = dataset.__getitems__(list(range(len(dataset))))
    signal = to_millivolts(batch["signal"])
    with torch.no_grad():
        mv = ECGFounderPreprocessing(zscore=False)(signal, batch["lead_mask"])
        pages = torch.cat([PaperECG(pixels_per_mm=4.0)(part) for part in mv.split(16)])
    rng = np.random.default_rng(0)
    rows = ["file,patient,diagnoses"]
    for i, page in enumerate(pages.permute(0, 2, 3, 1).numpy()):
        scan = page * np.array([0.97, 0.95, 0.88], np.float32) + rng.normal(0, 0.03, page.shape[:2])[..., None]
        ys, xs = rng.integers(0, page.shape[0], 60), rng.integers(0, page.shape[1], 60)
        for y, x in zip(ys, xs, strict=True):  # specks of dust and toner, 1-2 px
            scan[y : y + 2, x : x + 2] = 0.1
        image = Image.fromarray((scan.clip(0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
        name = f"{batch['record_id'][i].replace('/', '_')}-{i}.{'jpg' if i % 2 else 'png'}"
        image.save(out / name, quality=90)
        labels = ";".join(n for n, v in zip(names, batch["targets"]["diagnoses"][i].tolist(), strict=True) if v > 0.5)
        rows.append(f'{name},{batch["patient_id"][i]},"{labels}"')
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    return out
