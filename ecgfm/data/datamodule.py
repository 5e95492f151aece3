"""ShardDataModule: deterministic patient-level train/val/test splits over a shard folder, and its loaders."""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from ecgfm.data.dataset import ShardDataset, collate
from ecgfm.data.index import SPLITS, SegmentIndex, patient_split
from ecgfm.data.loader import ShardLoader
from ecgfm.data.sampler import ShardSampler
from ecgfm.data.shards import MANIFEST_NAME, Manifest, TargetSpec, TargetSummary

__all__ = ["ShardDataModule", "patient_split"]


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
        shuffle_buffer: training order = shards shuffled, then segments shuffled within windows of this size
            (bigger mixes more, smaller reads more sequentially).
        shuffle_seed: seed of the training order; each epoch uses (seed, epoch).
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
        shuffle_buffer: int = 1024,
        shuffle_seed: int = 0,
    ):
        super().__init__()
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training data")
        if predict_split not in ("test", "all"):
            raise ValueError(f"predict_split must be 'test' or 'all', got {predict_split!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.datasets: dict[str, ShardDataset] = {}
        self._train_sampler: ShardSampler | None = None
        self._train_order_to_load: dict[str, Any] | None = None

    @cached_property
    def manifest(self) -> Manifest:
        """manifest.json, read once."""
        return Manifest.load(self.root)

    @property
    def target_specs(self) -> dict[str, TargetSpec]:
        """Target vocabularies from the manifest, used to build heads."""
        names = self.hparams.targets or list(self.manifest.targets)
        unknown = [name for name in names if name not in self.manifest.targets]
        if unknown:
            raise KeyError(
                f"data.targets names {unknown}, which {self.root / MANIFEST_NAME} does not have "
                f"(its targets: {', '.join(self.manifest.targets) or 'none'})"
            )
        return {name: self.manifest.targets[name] for name in names}

    def split_indices(self) -> dict[str, np.ndarray]:
        """Sorted segment positions per split; raises if a split the fractions ask for comes out empty."""
        hp = self.hparams
        index = SegmentIndex(self.root)
        out = index.split_positions(hp.val_fraction, hp.test_fraction, hp.split_seed, hp.split_file)
        for split, idx in out.items():
            wanted = split == "train" or hp.split_file is None and getattr(hp, f"{split}_fraction") > 0
            if len(idx) == 0 and wanted:
                raise ValueError(
                    f"split {split!r} of {self.root} is empty ({index.n_segments} segments); "
                    "use more data or change val_fraction/test_fraction"
                )
        return out

    def target_summary(self, name: str, split: str = "train") -> TargetSummary:
        """Per-column counts and sums of one target over a split (heads standardise and weight with it)."""
        if split not in self.datasets:
            self.setup("fit")
        return self.datasets[split].target_summary(name)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.hparams.predict_split == "all":
            self.datasets.setdefault("all", ShardDataset(self.root, targets=list(self.target_specs)))
            return
        if any(split in self.datasets for split in SPLITS):
            return
        for split, idx in self.split_indices().items():
            self.datasets[split] = ShardDataset(self.root, idx, targets=list(self.target_specs))

    def state_dict(self) -> dict[str, Any]:
        """Where the training order stands, saved in every checkpoint (also SLURM's) for a mid-epoch resume.

        The count is of batches Lightning will treat as done when it restores this checkpoint, not of batches
        the loader handed out (it fetches ahead): those it finished, plus the one whose ``on_train_batch_end`` is
        running (where step-triggered checkpoints are saved), which Lightning then counts as finished too. Every
        rank consumes the same number of segments of its own part, so rank 0's state serves all ranks.
        """
        sampler, trainer = self._train_sampler, self.trainer
        if sampler is None or trainer is None:
            return {}
        current = trainer.fit_loop.epoch_loop.batch_progress.current
        in_batch_end = current.ready == current.started == current.processed == current.completed + 1
        batches = current.completed + int(in_batch_end)
        if batches >= trainer.num_training_batches:  # the epoch is over: the next one starts from its beginning
            state = sampler.state_dict(consumed=0)
            state["epoch"] += 1
        else:
            state = sampler.state_dict(consumed=batches * self.hparams.batch_size)
        return {"train_order": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved training order for ``train_dataloader``, which Lightning calls after restoring."""
        self._train_order_to_load = state_dict.get("train_order")
        # ShardLoader is not "stateful" to Lightning (this datamodule restores the order), so its warning that a
        # mid-epoch resume repeats data does not apply
        warnings.filterwarnings("ignore", message=".*ended before the epoch ended and your dataloader is not resumable")

    def _loader(self, split: str, shuffle: bool) -> ShardLoader:
        hp = self.hparams
        dataset = self.datasets[split]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ShardSampler(
            dataset.indices,
            dataset.offsets,
            shuffle=shuffle,
            seed=hp.shuffle_seed,
            num_replicas=world,
            rank=rank,
            buffer_size=hp.shuffle_buffer,
            drop_last=shuffle,  # training drops the remainder; evaluation pads so every segment counts
        )
        return ShardLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            persistent_workers=hp.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> ShardLoader:
        loader = self._loader("train", shuffle=True)
        self._train_sampler = loader.sampler
        if self._train_order_to_load is not None:
            loader.sampler.load_state_dict(self._train_order_to_load)
            self._train_order_to_load = None
        return loader

    def val_dataloader(self) -> ShardLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> ShardLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> ShardLoader:
        return self._loader(self.hparams.predict_split, shuffle=False)
