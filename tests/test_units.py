"""Units of analysis: a model's windows -> one row per record or patient (a 20-s record counts once), and the
per-segment metadata that shards store for subgroups (``ecgfm shard --metadata``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ecgfm.data.dataset import ShardDataset
from ecgfm.data.shards import Manifest, ShardWriter, TargetSpec, verify_shards
from ecgfm.evaluation.aggregate import aggregate_windows
from ecgfm.evaluation.units import Segments, aggregate, predict_segments
from ecgfm.leads import STANDARD_N_SAMPLES

LABELS = [
    "Sinus rhythm",
    "Atrial fibrillation",
    "Sinus bradycardia",
    "Electric axis of the heart: normal",
    "Electric axis of the heart: left axis deviation",
    "Left ventricular hypertrophy",
    "Left atrial hypertrophy",
    "Incomplete right bundle branch block",
]
#: (record, patient, windows, age, sex, positive labels): a 20-s and a 10-s record of one patient, a 30-s record of
#: another, and a 10-s record of a third with unknown age and sex.
RECORDS = [
    ("r1", "p1", 2, 61.0, "F", [0]),
    ("r2", "p1", 1, 61.0, "F", [0, 5]),
    ("r3", "p2", 3, 35.0, "M", [1]),
    ("r4", "p3", 1, None, None, []),
]


@pytest.fixture(scope="module")
def multi_window_shards(tmp_path_factory, ludb_shards) -> Path:
    """Six segments of real LUDB signal laid out as four records of 1-3 windows, with targets and metadata."""
    root = tmp_path_factory.mktemp("multi-window")
    source = ShardDataset(ludb_shards)
    signals = source.__getitems__(list(range(7)))["signal"].numpy()
    spec = {"diagnoses": TargetSpec("multilabel", LABELS)}
    writer = ShardWriter(root / "shard-00000.h5", spec, metadata={"age": "number", "sex": "string"})
    k = 0
    for record, patient, windows, age, sex, positives in RECORDS:
        target = np.zeros(len(LABELS), np.float32)
        target[positives] = 1
        for w in range(windows):
            writer.append(
                signals[k], np.ones(12, bool), record, patient, w * STANDARD_N_SAMPLES, {"diagnoses": target},
                metadata={"age": age, "sex": sex},
            )  # fmt: skip
            k += 1
    writer.close()
    manifest = Manifest(targets=spec, metadata={"age": {"kind": "number"}, "sex": {"kind": "string"}})
    manifest.shards.append({"path": "shard-00000.h5", "n_segments": k, "checksums": writer.checksums})
    manifest.save(root)
    return root


def test_metadata_is_stored_per_segment_and_verified(multi_window_shards):
    dataset = ShardDataset(multi_window_shards)
    metadata = dataset.metadata()
    assert metadata["age"].dtype == np.float64 and metadata["age"][:3].tolist() == [61.0, 61.0, 61.0]
    assert np.isnan(metadata["age"][-1]) and metadata["sex"].tolist() == ["F", "F", "F", "M", "M", "M", ""]
    assert dataset.column("segment_start").tolist() == [0, 5000, 0, 0, 5000, 10000, 0]
    assert verify_shards(multi_window_shards) == []  # /metadata/* carry checksums like every dataset
    batch = dataset.__getitems__([0, 1])
    assert "metadata" not in batch  # training batches stay as they were
    with pytest.raises(KeyError, match="metadata \\['site'\\] is not in"):
        dataset.metadata(["site"])


def _segments() -> Segments:
    """Seven segments of four records (windows 2, 1, 3, 1) of three patients, with hand-set scores."""
    record = np.array(["r1", "r1", "r2", "r3", "r3", "r3", "r4"], dtype=object)
    patient = np.array(["p1", "p1", "p1", "p2", "p2", "p2", "p3"], dtype=object)
    p = np.array([0.2, 0.6, 0.9, 0.1, 0.3, 0.8, 0.4])
    y = np.array([[0, 1], [0, 1], [1, 0], [1, 1], [1, 1], [1, 1], [0, 0]], dtype=np.float64)
    return Segments(
        positions=np.arange(7),
        record_id=record,
        patient_id=patient,
        segment_start=np.array([0, 5000, 0, 0, 5000, 10000, 0]),
        outputs={"p_A": p, "A": (p >= 0.5).astype(float)},
        targets={"dx": y},
        metadata={"age": np.array([61, 61, 61, 35, 35, 35, np.nan])},
    )


RULES = [{"output": "A", "kind": "compare", "score": "p_A", "op": ">=", "value": 0.5}]


def test_a_multi_window_record_counts_once_with_its_mean_and_a_remade_decision():
    segments = _segments()
    records = aggregate(segments, "record", "mean", ["p_A"], RULES)
    assert records.ids.tolist() == ["r1", "r2", "r3", "r4"] and records.n_segments.tolist() == [2, 1, 3, 1]
    np.testing.assert_allclose(records.outputs["p_A"], [0.4, 0.9, 0.4, 0.4])
    # the decision is made on the mean (0.4 < 0.5), not averaged from the windows' calls (r1: one of two windows)
    assert records.outputs["A"].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert records.targets["dx"].tolist() == [[0, 1], [1, 0], [1, 1], [0, 0]]
    assert records.members.tolist() == [0, 0, 1, 2, 2, 2, 3] and records.n_patients == 3
    for i, name in enumerate(records.ids):  # the same as the one-record reference, record by record
        windows = segments.record_id == name
        reference = aggregate_windows({k: v[windows] for k, v in segments.outputs.items()}, ["p_A"], RULES)
        assert (
            reference["p_A"] == pytest.approx(records.outputs["p_A"][i]) and reference["A"] == records.outputs["A"][i]
        )
    maxima = aggregate(segments, "record", "max", ["p_A"], RULES)
    np.testing.assert_allclose(maxima.outputs["p_A"], [0.6, 0.9, 0.8, 0.4])
    assert maxima.outputs["A"].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_patients_and_segments_as_units():
    segments = _segments()
    patients = aggregate(segments, "patient", "mean", ["p_A"], RULES, {"dx": "multilabel"})
    assert patients.ids.tolist() == ["p1", "p2", "p3"] and patients.n_segments.tolist() == [3, 3, 1]
    np.testing.assert_allclose(patients.outputs["p_A"], [(0.2 + 0.6 + 0.9) / 3, 0.4, 0.4])
    assert patients.targets["dx"].tolist() == [[1, 1], [1, 1], [0, 0]]  # any record positive
    windows = aggregate(segments, "segment")
    assert len(windows) == 7 and windows.ids.tolist()[:3] == ["r1#0", "r1#1", "r2#0"]
    segments.targets = {"k": np.array([[4.0], [4.0], [6.0], [5.0], [5.0], [5.0], [np.nan]])}
    assert aggregate(segments, "patient", target_kinds={"k": "regression"}).targets["k"][:2, 0].tolist() == [
        pytest.approx(14 / 3),
        5.0,
    ]
    segments.targets = {"c": np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [0, 1], [1, 0]], np.float64)}
    classes = aggregate(segments, "patient", target_kinds={"c": "multiclass"}).targets["c"]
    assert np.isnan(classes[0]).all() and classes[1:].tolist() == [[0, 1], [1, 0]]  # p1's records disagree
    with pytest.raises(ValueError, match="unit must be one of"):
        aggregate(segments, "visit")


def test_predict_segments_then_records_on_multi_window_records(multi_window_shards):
    from ecgfm.pretrained import load

    model = load("ludb-diagnoses-net1d-small")
    dataset = ShardDataset(multi_window_shards)
    segments = predict_segments(model, dataset, batch_size=3, progress=False)
    assert len(segments) == 7 and segments.window_index().tolist() == [0, 1, 0, 0, 1, 2, 0]
    assert set(segments.metadata) == {"age", "sex"}
    direct = model.predict_numpy(dataset.__getitems__([3, 4, 5])["signal"].numpy() / 1000.0)
    np.testing.assert_allclose(segments.outputs["p_Sinus rhythm"][3:6], direct["p_Sinus rhythm"], rtol=1e-5)
    records = aggregate(segments, "record", "mean", model.score_names(), model.decision_rules())
    assert len(records) == 4 and records.n_segments.tolist() == [2, 1, 3, 1]
    assert records.targets["diagnoses"][:, 1].tolist() == [0, 0, 1, 0]
    np.testing.assert_allclose(records.outputs["p_Sinus rhythm"][2], direct["p_Sinus rhythm"].mean(), rtol=1e-5)
    assert records.metadata["sex"].tolist() == ["F", "F", "M", ""]


def test_shard_metadata_from_the_label_table(ludb_shards):
    manifest = json.loads((ludb_shards / "manifest.json").read_text())
    assert {name: spec["kind"] for name, spec in manifest["metadata"].items()} == {"Age": "number", "Sex": "string"}
    metadata = ShardDataset(ludb_shards).metadata()
    assert set(metadata["Sex"]) == {"F", "M"} and np.isfinite(metadata["Age"]).all()
    assert 10 <= metadata["Age"].min() and metadata["Age"].max() <= 95


def test_shard_metadata_from_the_reader(tmp_path, test_data):
    from ecgfm.data.convert import convert

    out = tmp_path / "shards"
    summary = convert(test_data / "cinc2021", out, reader="challenge", metadata="age,sex", progress=False)
    assert summary.segments_written > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metadata"]["age"]["kind"] == "number" and "reader" in manifest["metadata"]["age"]["source"]
    metadata = ShardDataset(out).metadata()
    assert np.isfinite(metadata["age"]).any() and set(metadata["sex"]) <= {"F", "M", ""}
    assert verify_shards(out) == []
