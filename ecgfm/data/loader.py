"""ShardLoader: a DataLoader whose workers write batches into a ring of shared-memory slots allocated once.

PyTorch hands a worker's batch to the training process through shared memory that it allocates per batch;
on kernels without huge pages for shared memory that allocation costs several times the read itself. Here each
worker cycles through ``prefetch_factor + 2`` preallocated slots, and the training process copies a batch out
of its slot the moment it arrives, before asking for another.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader


class SlotRef(NamedTuple):
    """Where a worker left a batch's signal: ring row (worker id), slot, and number of segments."""

    worker: int
    slot: int
    n: int


def _numpy_to_tensors(value: Any) -> Any:
    """Small arrays come from ring workers as numpy (cheap to pickle); the training step wants tensors."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: _numpy_to_tensors(v) for k, v in value.items()}
    return value


class ShardLoader(DataLoader):
    """A DataLoader for ``ShardDataset`` that moves worker batches through a preallocated shared-memory ring.

    Why it is safe to reuse a slot: PyTorch sends a worker a new batch of indices only after the training process
    has taken an earlier batch, so at most ``prefetch_factor + 1`` of a worker's batches are not yet copied out;
    with ``prefetch_factor + 2`` slots per worker, the slot a worker writes was already copied. A ring serves one
    set of workers: persistent workers keep theirs, otherwise every epoch gets a new ring.
    """

    def __iter__(self) -> Iterator[Any]:
        ring = self._ring_for_this_epoch()
        if ring is None:
            yield from super().__iter__()
            return
        for batch in super().__iter__():
            ref = batch.get("signal") if isinstance(batch, dict) else None
            if isinstance(ref, SlotRef):
                pin = self.pin_memory and torch.cuda.is_available()
                signal = torch.empty((ref.n, *ring.shape[3:]), dtype=ring.dtype, pin_memory=pin)
                signal.copy_(ring[ref.worker, ref.slot, : ref.n])
                batch["signal"] = signal
                batch = _numpy_to_tensors(batch)
            yield batch

    def _ring_for_this_epoch(self) -> torch.Tensor | None:
        dataset = self.dataset
        if self.num_workers == 0 or self.batch_size is None or not hasattr(dataset, "signal_shape"):
            return None
        ring = getattr(dataset, "ring", None)
        if ring is None or not self.persistent_workers:
            slots = (self.prefetch_factor or 2) + 2
            shape = (self.num_workers, slots, self.batch_size, *dataset.signal_shape())
            dtype = getattr(dataset, "signal_dtype", torch.int16)  # float16 in a feature folder (`ecgfm embed`)
            ring = torch.zeros(shape, dtype=dtype).share_memory_()  # pages are allocated here, once
            dataset.ring = ring  # travels to the workers with the dataset when they start
        return ring
