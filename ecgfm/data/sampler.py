"""ShardSampler: an epoch order that keeps disk locality (shards shuffled, then segments within a buffer), gives
each DDP rank a disjoint part, changes with a seed per epoch, and can resume in the middle of an epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import DistributedSampler


class ShardSampler(DistributedSampler):
    """Yields dataset indices (0..len(positions)-1) for one rank.

    Subclassing DistributedSampler tells Lightning this sampler already splits work across ranks, so it is not
    wrapped again. Each epoch: shards in a seeded random order, concatenated; rank r takes the r-th contiguous
    block (whole runs of shards: locality); within the block, segments are shuffled inside windows of
    ``buffer_size``. With ``drop_last`` the last ``len % num_replicas`` segments of the epoch's order are left
    out (a different few each epoch); without it the order is padded with its first segments so every rank gets
    the same count (evaluation).

    Args:
        positions: sorted global segment positions of the split (``ShardDataset.indices``).
        offsets: the index's shard offsets (``SegmentIndex.offsets``).
    """

    def __init__(
        self,
        positions: np.ndarray,
        offsets: np.ndarray,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        buffer_size: int = 1024,
        drop_last: bool = True,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        # DistributedSampler.__init__ needs a process group; the attributes it would set are set here.
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, shuffle
        self.seed, self.drop_last = seed, drop_last
        self.epoch = 0
        self.buffer_size = max(1, buffer_size)
        positions = np.asarray(positions, dtype=np.int64)
        shard = np.searchsorted(np.asarray(offsets), positions, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard)) + 1
        self._runs = np.stack([np.concatenate([[0], cuts]), np.concatenate([cuts, [len(positions)]])], axis=1)
        self._n = len(positions)
        if drop_last:
            self.num_samples = self._n // num_replicas
        else:
            self.num_samples = -(-self._n // num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._start = 0  # segments of this epoch already consumed (for mid-epoch resumption)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def epoch_order(self) -> np.ndarray:
        """This rank's indices for the current epoch, in order (including those already consumed)."""
        runs = self._runs
        if self.shuffle and len(runs):
            rng = np.random.default_rng([self.seed, self.epoch])
            runs = runs[rng.permutation(len(runs))]
        lengths = runs[:, 1] - runs[:, 0]
        order = np.repeat(runs[:, 0] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        order += np.arange(int(lengths.sum()), dtype=np.int64)
        if self.total_size > len(order) and len(order):
            order = np.concatenate([order, order[: self.total_size - len(order)]])
        mine = order[self.rank * self.num_samples : (self.rank + 1) * self.num_samples].copy()
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
            for start in range(0, len(mine), self.buffer_size):
                window = mine[start : start + self.buffer_size]
                mine[start : start + self.buffer_size] = window[rng.permutation(len(window))]
        return mine

    def __iter__(self):
        order = self.epoch_order()[self._start :]
        self._start = 0
        return iter(order.tolist())

    def __len__(self) -> int:
        # The whole epoch, also when resumed in its middle: Lightning counts a resumed epoch's batches from the
        # saved batch index up to this length, so the iterator then yields only the rest.
        return self.num_samples

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """What resuming needs after ``consumed`` segments of the current epoch went to training."""
        return {"epoch": self.epoch, "seed": self.seed, "consumed": int(consumed), "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch after its consumed segments (same seed, same number of ranks)."""
        if state["num_replicas"] != self.num_replicas or state["seed"] != self.seed:
            raise ValueError(
                f"cannot resume: saved with seed {state['seed']} on {state['num_replicas']} ranks, "
                f"now seed {self.seed} on {self.num_replicas}"
            )
        self.epoch = int(state["epoch"])
        self._start = min(int(state["consumed"]), self.num_samples)
