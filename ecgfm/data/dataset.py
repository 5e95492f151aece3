"""ShardDataset: map-style access to segments across many shards; files open lazily, once per worker process.

Signals are read with one ``pread`` per segment from each shard's contiguous ``/signal`` (no HDF5 call per segment),
a batch of indices is read shard by shard in one step (``__getitems__``) and returned already collated; in a worker
the batch is built in shared memory, so handing it to the training process copies nothing.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from ecgfm.data.index import SegmentIndex, check_positions
from ecgfm.data.loader import SlotRef
from ecgfm.data.shards import ShardError, TargetSummary, open_shard


class _OpenShard:
    """One shard opened in one process: a file descriptor on its contiguous ``/signal`` (or, in a feature folder,
    ``/features``) and its small arrays."""

    def __init__(self, path: Path, targets: list[str], key: str = "signal"):
        self.path = path
        self.fd: int | None = None
        self.loaded: np.ndarray | None = None
        try:
            with open_shard(path) as f:
                dset = f[key]
                self.shape = dset.shape
                self.row_bytes = int(np.prod(dset.shape[1:])) * dset.dtype.itemsize
                offset = dset.id.get_offset() if dset.chunks is None and dset.compression is None else None
                if offset is None or dset.shape[0] == 0:  # chunked (older writer) or compressed: via h5py
                    self.loaded = dset[:]
                else:
                    self.offset = offset
                self.lead_mask = f["lead_mask"][:]
                self.record_id = f["record_id"].asstr()[:]
                self.patient_id = f["patient_id"].asstr()[:]
                self.targets = {name: f[f"targets/{name}"][:] for name in targets}
        except (OSError, KeyError) as err:
            raise ShardError(f"cannot read shard {path}: {err}") from err
        if self.loaded is None:
            self.fd = os.open(path, os.O_RDONLY)

    def read_rows(self, rows: np.ndarray, out: np.ndarray, where: np.ndarray) -> None:
        """Copy signal rows into ``out[where]`` with one pread each: one copy from the page cache, no mapping."""
        if self.loaded is not None:
            out[where] = self.loaded[rows]
            return
        for j, row in zip(where.tolist(), rows.tolist(), strict=True):
            n = os.preadv(self.fd, [out[j]], self.offset + row * self.row_bytes)
            if n != self.row_bytes:
                raise ShardError(f"{self.path}: row {row} is truncated ({n} of {self.row_bytes} bytes)")

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def collate(batch: Any) -> Any:
    """Default collation, except for batches ``__getitems__`` already assembled."""
    if isinstance(batch, dict):
        return batch
    return default_collate(batch)


class ShardDataset(Dataset):
    """Segments ``indices`` (sorted global positions over all shards, in manifest order) of a shard folder.

    Args:
        root: the folder holding manifest.json and the shards.
        indices: global segment positions to serve (default: all).
        targets: target names to load (default: every target in the manifest).
        max_open_shards: shards kept open per worker (least recently used ones are closed).
    """

    def __init__(
        self,
        root: str | Path,
        indices: np.ndarray | None = None,
        targets: list[str] | None = None,
        max_open_shards: int = 64,
    ):
        self.root = Path(root)
        self.index = SegmentIndex(self.root)
        self.manifest = self.index.manifest
        self.offsets = self.index.offsets
        n = self.index.n_segments
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        check_positions(self.index, self.indices)
        unknown = [t for t in (targets or []) if t not in self.manifest.targets]
        if unknown:
            raise KeyError(f"targets {unknown} are not in {self.root / 'manifest.json'}: {list(self.manifest.targets)}")
        self.targets = list(self.manifest.targets) if targets is None else list(targets)
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._pid = os.getpid()
        self.ring: torch.Tensor | None = None  # set by ShardLoader: [workers, slots, batch, leads, samples]
        self._next_slot = 0

    def signal_shape(self) -> tuple[int, ...]:
        """(leads, samples) of one segment; (feature size,) in a feature folder (``ecgfm embed``)."""
        return self.manifest.row_shape

    @property
    def signal_dtype(self) -> torch.dtype:
        """What a batch's ``signal`` holds: int16 µV, or float16 features in a feature folder."""
        return torch.float16 if self.manifest.features else torch.int16

    def __len__(self) -> int:
        return len(self.indices)

    def _shard(self, number: int) -> _OpenShard:
        if self._pid != os.getpid():  # forked into a worker: never share handles across processes
            self._open, self._pid = OrderedDict(), os.getpid()
        if number in self._open:
            self._open.move_to_end(number)
        else:
            path = self.root / self.manifest.shards[number]["path"]
            self._open[number] = _OpenShard(path, self.targets, self.manifest.data_key)
            if len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        return self._open[number]

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.__getitems__([i])
        return {
            key: ({k: v[0] for k, v in value.items()} if isinstance(value, dict) else value[0])
            for key, value in batch.items()
        }

    def __getitems__(self, idxs: list[int]) -> dict[str, Any]:
        """Read a whole batch shard by shard; returns the collated batch dict (int16 signal, masks, ids)."""
        shards, rows = self.index.locate(self.indices[np.asarray(idxs, dtype=np.int64)])
        n = len(rows)
        first = self._shard(int(shards[0]))
        worker = get_worker_info()
        ring, signal_out = self.ring, None
        if worker is not None and ring is not None and n <= ring.shape[2]:
            slot = self._next_slot % ring.shape[1]  # see ShardLoader for why cycling through slots is safe
            self._next_slot += 1
            signal = ring[worker.id, slot, :n].numpy()
            signal_out = SlotRef(worker.id, slot, n)
        else:
            signal_tensor = torch.empty((n, *first.shape[1:]), dtype=self.signal_dtype)
            if worker is not None:
                signal_tensor.share_memory_()  # filled in place, then handed over without another copy
            signal = signal_tensor.numpy()
            signal_out = signal_tensor
        lead_mask = np.empty((n, first.lead_mask.shape[1]), dtype=bool)
        targets = {name: np.empty((n, first.targets[name].shape[1]), np.float32) for name in self.targets}
        record_ids: list[str] = [""] * n
        patient_ids: list[str] = [""] * n
        for number in np.unique(shards):
            where = np.flatnonzero(shards == number)
            shard = self._shard(int(number))
            r = rows[where]
            try:
                shard.read_rows(r, signal, where)
            except OSError as err:
                raise ShardError(f"cannot read rows of {shard.path}: {err}") from err
            lead_mask[where] = shard.lead_mask[r]
            for name in self.targets:
                targets[name][where] = shard.targets[name][r]
            for j, row in zip(where.tolist(), r.tolist(), strict=True):
                record_ids[j] = shard.record_id[row]
                patient_ids[j] = shard.patient_id[row]
        # In a ring worker the small arrays stay numpy: pickled inline they cost microseconds, while every tensor
        # would cost a shared-memory allocation and a file-descriptor hand-over; ShardLoader makes them tensors.
        wrap = (lambda a: a) if isinstance(signal_out, SlotRef) else torch.from_numpy
        return {
            "signal": signal_out,  # int16 µV, float16 features (or where a worker left it); float mV only on the device
            "lead_mask": wrap(lead_mask),
            "targets": {k: wrap(np.nan_to_num(v, nan=0.0)) for k, v in targets.items()},
            "target_masks": {k: wrap(~np.isnan(v)) for k, v in targets.items()},
            "record_id": record_ids,
            "patient_id": patient_ids,
        }

    def patient_ids(self) -> np.ndarray:
        """Patient id of every served segment (strings: for inspection and tests, not for splitting)."""
        shards, rows = self.index.locate(self.indices)
        out = np.empty(len(rows), dtype=object)
        for number in np.unique(shards):
            where = np.flatnonzero(shards == number)
            out[where] = self._shard(int(number)).patient_id[rows[where]]
        return out

    def target_array(self, name: str) -> np.ndarray:
        """All values of one target over the served segments (NaN = missing), for counts and label selection."""
        shards, rows = self.index.locate(self.indices)
        out = np.empty((len(rows), len(self.manifest.targets[name].names)), np.float32)
        for number in np.unique(shards):
            where = np.flatnonzero(shards == number)
            with open_shard(self.root / self.manifest.shards[number]["path"]) as f:
                out[where] = f[f"targets/{name}"][:][rows[where]]
        return out

    def column(self, name: str) -> np.ndarray:
        """One per-segment dataset (``segment_start``, ``metadata/age``, ...) over the served segments, read one
        shard at a time for evaluation; batches never carry it, so training reads stay as fast as before."""
        shards, rows = self.index.locate(self.indices)
        out: np.ndarray | None = None
        for number in np.unique(shards):
            where = np.flatnonzero(shards == number)
            path = self.root / self.manifest.shards[number]["path"]
            with open_shard(path) as f:
                if name not in f:
                    raise ShardError(f"shard {path} has no dataset /{name} (convert the folder again to add it)")
                dset = f[name]
                values = dset.asstr()[:] if h5py.check_string_dtype(dset.dtype) is not None else dset[:]
            if out is None:
                out = np.empty(len(rows), dtype=object if values.dtype.kind in "OU" else values.dtype)
            out[where] = values[rows[where]]
        return out if out is not None else np.zeros(0)

    def metadata(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """``{name: [N]}`` metadata of the served segments (``ecgfm shard --metadata``): float with NaN for numbers,
        strings with "" for text; every column the manifest lists unless ``names`` picks some."""
        listed = self.manifest.metadata
        names = list(listed) if names is None else list(names)
        unknown = [name for name in names if name not in listed]
        if unknown:
            raise KeyError(
                f"metadata {unknown} is not in {self.root / 'manifest.json'} (it has: {', '.join(listed) or 'none'}; "
                "convert with `ecgfm shard --metadata COL[,COL]` to store some)"
            )
        out = {}
        for name in names:
            values = self.column(f"metadata/{name}")
            out[name] = values.astype(np.float64) if listed[name].get("kind") == "number" else values.astype(object)
        return out

    def target_summary(self, name: str) -> TargetSummary:
        """Counts, sums and sums of squares of one target over the served segments, read one shard at a time."""
        shards, rows = self.index.locate(self.indices)
        summary = TargetSummary.of(np.zeros((0, len(self.manifest.targets[name].names))))
        for number in np.unique(shards):
            with open_shard(self.root / self.manifest.shards[number]["path"]) as f:
                values = f[f"targets/{name}"][:]
            summary = summary + TargetSummary.of(values[rows[shards == number]])
        return summary

    def close(self) -> None:
        self._open = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # open file descriptors never cross a process boundary
        return state
