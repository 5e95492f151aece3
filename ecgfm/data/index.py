"""SegmentIndex: segment positions -> (shard, row) and patient-level splits, as integer arrays only.

Built from manifest.json (counts per shard) and patient_keys.npy (one uint64 per segment), so an index over
10 million segments in thousands of shards holds a few arrays and no Python object per segment.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ecgfm.data.shards import Manifest, ShardError, open_shard, patient_key

SPLITS = ("train", "val", "test")
_CHUNK = 1 << 20  # segments hashed per step, to bound temporaries


def _mix64(keys: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 of (key + seed): a fast, well-spread uint64 hash for arrays (wrap-around is intended)."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_codes(keys: np.ndarray, val_fraction: float, test_fraction: float, seed: int = 0) -> np.ndarray:
    """0 train, 1 val, 2 test per patient key: a pure function of key and seed, stable as data grows."""
    out = np.empty(len(keys), dtype=np.uint8)
    for start in range(0, len(keys), _CHUNK):
        u = (_mix64(np.asarray(keys[start : start + _CHUNK]), seed) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        code = np.zeros(len(u), dtype=np.uint8)
        code[u < test_fraction + val_fraction] = 1
        code[u < test_fraction] = 2
        out[start : start + len(u)] = code
    return out


def patient_split(patient_id: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """The split of one patient id (the same rule the index applies to every segment)."""
    code = split_codes(np.array([patient_key(patient_id)], dtype=np.uint64), val_fraction, test_fraction, seed)[0]
    return SPLITS[int(code)]


class SegmentIndex:
    """Global segment positions (manifest order) over a shard folder, and their patient-level splits."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = Manifest.load(self.root)
        counts = np.array([int(s["n_segments"]) for s in self.manifest.shards], dtype=np.int64)
        self.offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])

    @property
    def n_segments(self) -> int:
        return int(self.offsets[-1])

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (shard numbers, rows in those shards), vectorised."""
        positions = np.asarray(positions, dtype=np.int64)
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        return shard, positions - self.offsets[shard]

    def patient_keys(self) -> np.ndarray:
        """One uint64 per segment: patient_keys.npy (memory-mapped), else each shard's /patient_key or ids."""
        path = self.root / "patient_keys.npy"
        if path.is_file():
            keys = np.load(path, mmap_mode="r")
            if len(keys) == self.n_segments:
                return keys
        parts = []
        for shard in self.manifest.shards:
            with open_shard(self.root / shard["path"]) as f:
                if "patient_key" in f:
                    parts.append(f["patient_key"][:])
                else:
                    parts.append(np.array([patient_key(p) for p in f["patient_id"].asstr()[:]], dtype=np.uint64))
        return np.concatenate(parts) if parts else np.zeros(0, np.uint64)

    def split_positions(
        self, val_fraction: float, test_fraction: float, seed: int = 0, split_file: str | Path | None = None
    ) -> dict[str, np.ndarray]:
        """Sorted global positions per split; a patient's segments always share one split."""
        keys = self.patient_keys()
        if split_file is None:
            codes = split_codes(keys, val_fraction, test_fraction, seed)
        else:
            codes = self._codes_from_file(keys, Path(split_file))
        return {split: np.flatnonzero(codes == i).astype(np.int64) for i, split in enumerate(SPLITS)}

    def _codes_from_file(self, keys: np.ndarray, split_file: Path) -> np.ndarray:
        data = json.loads(split_file.read_text())
        listed: dict[str, str] = {}
        for split in SPLITS:
            for pid in data.get(split, []):
                pid = str(pid)
                if pid in listed:
                    raise ValueError(f"patient {pid!r} is in both {listed[pid]} and {split} in {split_file}")
                listed[pid] = split
        codes = np.full(len(keys), 255, dtype=np.uint8)
        for i, split in enumerate(SPLITS):
            split_keys = np.array([patient_key(p) for p, s in listed.items() if s == split], dtype=np.uint64)
            codes[np.isin(keys, split_keys)] = i
        missing = np.flatnonzero(codes == 255)
        if len(missing):
            shard, row = self.locate(missing[:1])
            with open_shard(self.root / self.manifest.shards[int(shard[0])]["path"]) as f:
                example = f["patient_id"].asstr()[int(row[0])]
            raise KeyError(f"{len(missing)} segments belong to patients not in {split_file}, e.g. {example!r}")
        return codes


def check_positions(index: SegmentIndex, positions: np.ndarray) -> None:
    """Raise if positions fall outside the index (e.g. a stale split against a re-converted folder)."""
    if len(positions) and (positions.min() < 0 or positions.max() >= index.n_segments):
        raise ShardError(f"segment positions out of range 0..{index.n_segments - 1} for {index.root}")
