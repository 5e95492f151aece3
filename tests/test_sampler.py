"""The epoch order at scale: disjoint per DDP rank, reshuffled per epoch, local to shards, resumable."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from ecgfm.data.dataset import ShardDataset, collate
from ecgfm.data.index import SegmentIndex
from ecgfm.data.sampler import ShardSampler
from ecgfm.data.shards import Manifest, ShardWriter, TargetSpec
from ecgfm.leads import STANDARD_LEADS


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """1,000 real (tiny) shard files with 1 to 3 segments of 8 samples each: 2,000 segments."""
    root = tmp_path_factory.mktemp("tiny")
    targets = {"y": TargetSpec("regression", ["y"])}
    manifest = Manifest(targets=targets, n_samples=8)
    counts = np.tile([1, 3, 2, 2], 250)
    n = 0
    for k, count in enumerate(counts):
        writer = ShardWriter(root / f"shard-{k:05d}.h5", targets, n_samples=8)
        for _ in range(count):
            signal = np.full((12, 8), n % 30000, dtype=np.int16)
            writer.append(signal, np.ones(12, bool), f"seg{n}", f"p{n // 2}", 0, {"y": np.array([n], np.float32)})
            n += 1
        writer.close()
        manifest.shards.append({"path": f"shard-{k:05d}.h5", "n_segments": int(count)})
    manifest.save(root)
    assert manifest.n_segments == 2000 and len(STANDARD_LEADS) == 12
    return root


def rank_orders(index, positions, epoch, world=4, **kwargs):
    orders = []
    for rank in range(world):
        sampler = ShardSampler(positions, index.offsets, num_replicas=world, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    return orders


def test_four_ranks_see_disjoint_quarters_and_epochs_differ(tiny_shards):
    index = SegmentIndex(tiny_shards)
    positions = np.arange(index.n_segments)
    epoch0 = rank_orders(index, positions, 0, buffer_size=16)
    epoch1 = rank_orders(index, positions, 1, buffer_size=16)
    for orders in (epoch0, epoch1):
        assert [len(o) for o in orders] == [500] * 4  # 2,000 / 4: no remainder to drop here
        seen = [i for o in orders for i in o]
        assert len(seen) == len(set(seen)) == 2000  # disjoint, and together every segment once
    assert epoch0 != epoch1  # the order changes with the epoch
    for rank in range(4):
        assert set(epoch0[rank]) != set(epoch1[rank])  # ranks get different segments each epoch
    assert sorted(i for o in epoch0 for i in o) == sorted(i for o in epoch1 for i in o)  # same content
    # the same seed and epoch give the same order (every rank computes its part independently)
    assert epoch0 == rank_orders(index, positions, 0, buffer_size=16)


def test_order_keeps_locality(tiny_shards):
    index = SegmentIndex(tiny_shards)
    positions = np.arange(index.n_segments)
    by_shard = rank_orders(index, positions, 3, world=1, buffer_size=1)[0]
    shards, _ = index.locate(np.array(by_shard))
    changes = np.flatnonzero(np.diff(shards)) + 1
    assert len(changes) == 999  # each shard's segments come as one block: shards are read one after another
    buffered = rank_orders(index, positions, 3, world=1, buffer_size=8)[0]
    assert buffered != by_shard
    for start in range(0, 2000, 8):  # shuffling only moves segments within a window of 8
        assert set(buffered[start : start + 8]) == set(by_shard[start : start + 8])


def test_remainder_is_dropped_in_training_and_padded_in_evaluation(tiny_shards):
    index = SegmentIndex(tiny_shards)
    positions = np.arange(1, 2000, 2)  # 1,000 segments, 3 ranks
    train = rank_orders(index, positions, 0, world=3)
    assert [len(o) for o in train] == [333] * 3 and len({i for o in train for i in o}) == 999
    evaluation = rank_orders(index, positions, 0, world=3, shuffle=False, drop_last=False)
    assert [len(o) for o in evaluation] == [334] * 3 and len({i for o in evaluation for i in o}) == 1000


def test_resume_mid_epoch_continues_the_same_order(tiny_shards):
    index = SegmentIndex(tiny_shards)
    positions = np.arange(index.n_segments)
    sampler = ShardSampler(positions, index.offsets, seed=7, num_replicas=2, rank=1)
    sampler.set_epoch(5)
    full = list(sampler)
    state = sampler.state_dict(consumed=123)
    restarted = ShardSampler(positions, index.offsets, seed=7, num_replicas=2, rank=1)
    restarted.load_state_dict(state)
    assert len(restarted) == len(full)  # the epoch's length: Lightning counts a resumed epoch on from its saved batch
    assert list(restarted) == full[123:]
    assert list(restarted) == full  # the next pass starts from the beginning again
    with pytest.raises(ValueError, match="cannot resume"):
        ShardSampler(positions, index.offsets, seed=8, num_replicas=2, rank=1).load_state_dict(state)


def test_two_ranks_resumed_mid_epoch_still_see_each_segment_once(tiny_shards):
    """What a 2-rank run killed mid-epoch relies on: each rank restarts after the same count of its own part (rank
    0's checkpoint serves both), and the epoch still covers every segment once, less ``len % 2``."""
    index = SegmentIndex(tiny_shards)
    positions = np.arange(0, 2000, 3)  # 667 segments: one is left out of each training epoch
    before = rank_orders(index, positions, 4, world=2, seed=3)
    states = []
    for rank in range(2):
        sampler = ShardSampler(positions, index.offsets, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(4)
        states.append(sampler.state_dict(consumed=96))
    assert states[0] == states[1]
    after = []
    for rank in range(2):
        sampler = ShardSampler(positions, index.offsets, seed=3, num_replicas=2, rank=rank)
        sampler.load_state_dict(states[0])
        sampler.set_epoch(4)  # Lightning sets the epoch again after restoring: the position is kept
        after.append(before[rank][:96] + list(sampler))
    assert after == before
    seen = after[0] + after[1]
    assert len(seen) == len(set(seen)) == 666 and set(seen) <= set(range(667))
    with pytest.raises(ValueError, match="cannot resume: saved with seed 3 on 2 ranks, now seed 3 on 3"):
        ShardSampler(positions, index.offsets, seed=3, num_replicas=3, rank=0).load_state_dict(states[0])


def test_loader_reads_batches_across_shards(tiny_shards):
    dataset = ShardDataset(tiny_shards, indices=np.arange(0, 2000, 3))
    sampler = ShardSampler(dataset.indices, dataset.offsets, num_replicas=2, rank=0, buffer_size=32)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, collate_fn=collate, num_workers=2)
    values = []
    for batch in loader:
        assert batch["signal"].dtype.is_floating_point is False and batch["signal"].shape[1:] == (12, 8)
        # the signal, ids and targets of each row belong together
        ids = [int(r.removeprefix("seg")) for r in batch["record_id"]]
        assert batch["targets"]["y"][:, 0].tolist() == [float(i) for i in ids]
        assert batch["signal"][:, 0, 0].tolist() == [i % 30000 for i in ids]
        values += ids
    assert len(values) == len(set(values)) == len(dataset) // 2


def test_index_for_many_segments_is_integer_arrays(tmp_path):
    manifest = Manifest(shards=[{"path": f"s{k}.h5", "n_segments": 2000} for k in range(1000)])
    manifest.save(tmp_path)
    np.save(tmp_path / "patient_keys.npy", np.arange(2_000_000, dtype=np.uint64) // 4)
    index = SegmentIndex(tmp_path)
    splits = index.split_positions(0.1, 0.1, seed=0)
    assert sum(len(v) for v in splits.values()) == 2_000_000
    assert all(v.dtype == np.int64 for v in splits.values())
    keys = np.load(tmp_path / "patient_keys.npy", mmap_mode="r")
    patients = {split: np.unique(keys[positions]) for split, positions in splits.items()}
    assert not np.intersect1d(patients["train"], patients["test"]).size  # no patient in two splits
    assert not np.intersect1d(patients["train"], patients["val"]).size
    assert not np.intersect1d(patients["val"], patients["test"]).size
    assert 0.08 < len(splits["test"]) / 2_000_000 < 0.12


@pytest.mark.parametrize("persistent", [True, False])
def test_shard_loader_ring_gives_the_right_rows_across_epochs(tiny_shards, persistent):
    """Workers reuse preallocated shared-memory slots; every row still matches its ids, also after an epoch that
    was abandoned midway (as limit_train_batches does)."""
    from ecgfm.data.loader import ShardLoader

    dataset = ShardDataset(tiny_shards)
    sampler = ShardSampler(dataset.indices, dataset.offsets, buffer_size=64)
    loader = ShardLoader(
        dataset, batch_size=16, sampler=sampler, collate_fn=collate, num_workers=2, persistent_workers=persistent
    )
    for epoch, stop_after in ((0, 5), (1, None), (2, 3), (3, None)):
        sampler.set_epoch(epoch)
        seen = []
        for i, batch in enumerate(loader):
            ids = [int(r.removeprefix("seg")) for r in batch["record_id"]]
            assert batch["signal"][:, 0, 0].tolist() == [k % 30000 for k in ids]
            assert batch["signal"][:, 11, 7].tolist() == [k % 30000 for k in ids]
            seen += ids
            if stop_after is not None and i + 1 == stop_after:
                break
        if stop_after is None:
            assert sorted(seen) == list(range(2000))
    assert dataset.ring is not None and dataset.ring.shape[:3] == (2, 4, 16)
