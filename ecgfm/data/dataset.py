"""ShardDataset: map-style access to segments across many shards, with one lazily opened file per worker."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ecgfm.data.shards import Manifest, ShardError, open_shard


class ShardDataset(Dataset):
    """Segments ``indices`` (global positions over all shards, in manifest order) of a shard folder.

    The index is two integer arrays (shard offsets and the selected positions), so its size does not grow with
    Python objects per segment. Files open on first use in each worker process and stay open.

    Args:
        root: the folder holding manifest.json and the shards.
        indices: global segment positions to serve (default: all).
        targets: target names to load (default: every target in the manifest).
    """

    def __init__(self, root: str | Path, indices: np.ndarray | None = None, targets: list[str] | None = None):
        self.root = Path(root)
        self.manifest = Manifest.load(self.root)
        counts = np.array([int(s["n_segments"]) for s in self.manifest.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(self.offsets[-1])
        self.indices = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= total):
            raise IndexError(f"segment indices out of range 0..{total - 1} for {self.root}")
        unknown = [t for t in (targets or []) if t not in self.manifest.targets]
        if unknown:
            raise KeyError(f"targets {unknown} are not in {self.root / 'manifest.json'}: {list(self.manifest.targets)}")
        self.targets = list(self.manifest.targets) if targets is None else list(targets)
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def locate(self, position: int) -> tuple[int, int]:
        """Global segment position -> (shard number, row in that shard)."""
        shard = int(np.searchsorted(self.offsets, position, side="right") - 1)
        return shard, int(position - self.offsets[shard])

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never share HDF5 handles across processes
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open_shard(self.root / self.manifest.shards[shard]["path"])
        return self._files[shard]

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, row = self.locate(int(self.indices[i]))
        f = self._file(shard)
        try:
            signal = f["signal"][row]
            targets = {name: f[f"targets/{name}"][row] for name in self.targets}
            item = {
                "signal": torch.from_numpy(signal),  # int16 µV; converted to float mV on the device
                "lead_mask": torch.from_numpy(f["lead_mask"][row]),
                "targets": {k: torch.from_numpy(np.nan_to_num(v, nan=0.0)) for k, v in targets.items()},
                "target_masks": {k: torch.from_numpy(~np.isnan(v)) for k, v in targets.items()},
                "record_id": f["record_id"][row].decode(),
                "patient_id": f["patient_id"][row].decode(),
            }
        except (OSError, KeyError) as err:
            raise ShardError(f"cannot read row {row} of {f.filename}: {err}") from err
        return item

    def patient_ids(self) -> np.ndarray:
        """Patient id of every segment in manifest order (for splitting)."""
        ids = []
        for shard in range(len(self.manifest.shards)):
            ids.append(self._file(shard)["patient_id"].asstr()[:])
        return np.concatenate(ids) if ids else np.array([], dtype=object)

    def target_array(self, name: str) -> np.ndarray:
        """All values of one target over the served segments (NaN = missing), for counts and label selection."""
        parts = [self._file(s)[f"targets/{name}"][:] for s in range(len(self.manifest.shards))]
        return np.concatenate(parts)[self.indices]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # open HDF5 handles never cross a process boundary
        return state
