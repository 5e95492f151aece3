"""ShardDataModule: deterministic patient-level train/val/test splits over a shard folder, and its loaders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from ecgfm.data.dataset import ShardDataset
from ecgfm.data.shards import Manifest, TargetSpec

SPLITS = ("train", "val", "test")


def patient_split(patient_id: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """The split of a patient from a hash of its id: stable across runs, machines and growing data sets."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


class ShardDataModule(L.LightningDataModule):
    """Loads shards made by ``ecgfm shard``; no patient is ever in two splits.

    Args:
        root: the shard folder (with manifest.json).
        batch_size: segments per batch (per device).
        num_workers: DataLoader worker processes.
        val_fraction, test_fraction: share of patients in validation and test (by hash of the patient id).
        split_seed: changes the hash, hence the split.
        split_file: optional JSON ``{"train": [patient ids], "val": [...], "test": [...]}`` overriding the hash.
        targets: target names to load (default: all in the manifest).
        predict_split: what ``ecgfm predict`` scores: ``test`` (held-out patients) or ``all`` (every segment,
            e.g. a folder of new recordings that was never split).
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        split_file: str | None = None,
        targets: list[str] | None = None,
        pin_memory: bool = False,
        predict_split: str = "test",
    ):
        super().__init__()
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training data")
        if predict_split not in ("test", "all"):
            raise ValueError(f"predict_split must be 'test' or 'all', got {predict_split!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.datasets: dict[str, ShardDataset] = {}

    @property
    def manifest(self) -> Manifest:
        return Manifest.load(self.root)

    @property
    def target_specs(self) -> dict[str, TargetSpec]:
        """Target vocabularies from the manifest, used to build heads."""
        names = self.hparams.targets or list(self.manifest.targets)
        return {name: self.manifest.targets[name] for name in names}

    def split_indices(self) -> dict[str, np.ndarray]:
        """Segment positions per split; raises if a patient would be in two splits or a split is empty."""
        full = ShardDataset(self.root, targets=[])
        patients = full.patient_ids()
        full.close()
        assignment = self._explicit_assignment()
        labels = np.empty(len(patients), dtype="<U5")
        cache: dict[str, str] = {}
        for i, pid in enumerate(patients):
            if pid not in cache:
                if assignment is not None:
                    if pid not in assignment:
                        raise KeyError(f"patient {pid!r} is not in split file {self.hparams.split_file}")
                    cache[pid] = assignment[pid]
                else:
                    cache[pid] = patient_split(
                        pid, self.hparams.val_fraction, self.hparams.test_fraction, self.hparams.split_seed
                    )
            labels[i] = cache[pid]
        out = {split: np.flatnonzero(labels == split) for split in SPLITS}
        for split, idx in out.items():
            if len(idx) == 0 and (split == "train" or getattr(self.hparams, f"{split}_fraction", 1) > 0):
                raise ValueError(
                    f"split {split!r} of {self.root} is empty ({len(cache)} patients); "
                    "use more data or change val_fraction/test_fraction"
                )
        return out

    def _explicit_assignment(self) -> dict[str, str] | None:
        if not self.hparams.split_file:
            return None
        data = json.loads(Path(self.hparams.split_file).read_text())
        assignment: dict[str, str] = {}
        for split in SPLITS:
            for pid in data.get(split, []):
                if pid in assignment:
                    raise ValueError(
                        f"patient {pid!r} is in both {assignment[pid]} and {split} in {self.hparams.split_file}"
                    )
                assignment[str(pid)] = split
        return assignment

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict_split == "all":
            self.datasets.setdefault("all", ShardDataset(self.root, targets=list(self.target_specs)))
            return
        if any(split in self.datasets for split in SPLITS):
            return
        for split, idx in self.split_indices().items():
            self.datasets[split] = ShardDataset(self.root, idx, targets=list(self.target_specs))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.predict_split, shuffle=False)
