"""ImageFileDataModule: ECG images (PNG/JPEG scans or prints) and a label table, split by patient, as batches of pages
for an image backbone; the model says how a file becomes a page (its size and its ``image_preprocessing``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ecgfm.data.index import SPLITS, patient_split
from ecgfm.data.label_table import LabelTable
from ecgfm.data.page_cache import PageCache
from ecgfm.data.shards import TargetSpec, TargetSummary
from ecgfm.image_preprocessing import IMAGE_SUFFIXES, create_image_preprocessing, read_page

__all__ = ["ImageFileDataModule", "ImageFileDataset"]


class ImageFileDataset(Dataset):
    """Image files with their targets; each item is ``{"image": [3, H, W], "targets": ..., "target_masks": ...}``.

    The page size and preprocessing are set by the model (:meth:`ImageFileDataModule.use_image_model`) before the
    first item is read; with a ``page_cache`` each page is computed once and read back afterwards.
    """

    def __init__(
        self, files: list[Path], record_ids: list[str], patient_ids: list[str], targets: dict[str, np.ndarray]
    ):
        self.files = files
        self.record_ids = record_ids
        self.patient_ids = patient_ids
        self.targets = targets
        self.page_size: tuple[int, int] | None = None
        self.preprocessing: Any = None
        self.page_cache: PageCache | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.page_size is None:
            raise RuntimeError("ImageFileDataset has no page size yet: the model sets it (use_image_model)")
        if self.page_cache is not None:
            page = self.page_cache.read(self.files[i], self.page_size, self.preprocessing)
        else:
            page = read_page(self.files[i], self.page_size, self.preprocessing)
        targets = {name: torch.from_numpy(np.nan_to_num(values[i])) for name, values in self.targets.items()}
        masks = {name: torch.from_numpy(np.isfinite(values[i])) for name, values in self.targets.items()}
        return {
            "image": torch.from_numpy(page),
            "targets": targets,
            "target_masks": masks,
            "record_id": self.record_ids[i],
            "patient_id": self.patient_ids[i],
        }


class ImageFileDataModule(L.LightningDataModule):
    """ECG image files under ``root`` with targets from a label table (CSV or Parquet), split by patient.

    Args:
        root: the folder of images.
        labels: the label table; one row per image.
        file_column: the column naming each image, relative to ``root`` (``scans/0001.png``; without a suffix, the
            one image file of that name).
        patient_column: the column of patient ids (None: each image is its own patient).
        multilabel: ``{target: [columns]}`` of label names (``;``-separated), as ``ecgfm shard`` reads them; a binary
            head learns one of the labels.
        regression: ``{target: [columns]}`` of numbers.
        units: ``{target: unit}`` of regression targets.
        batch_size, num_workers: the loaders' (images are decoded and cleaned in the workers).
        val_fraction, test_fraction, split_seed: the patient-level split, by the same hash as shards use.
        predict_split: ``test`` or ``all``.
        cache_dir: a folder to keep finished pages in (None: none). Each image is then decoded and cleaned once, in
            the first epoch, and read back in later epochs and later runs; a page is found by the file's path, size,
            mtime and ctime, the page size, the preprocessing's config and the code that made it, so an edited image
            or another clean-up is computed afresh, never read stale. Pages are stored exactly and compressed (a
            cleaned 780 x 390 page takes about 10 kB). The folder is created and must be writable (checked at setup);
            delete it to reclaim the space.
    """

    def __init__(
        self,
        root: str,
        labels: str,
        file_column: str = "file",
        patient_column: str | None = None,
        multilabel: dict[str, list[str]] | None = None,
        regression: dict[str, list[str]] | None = None,
        units: dict[str, str] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        predict_split: str = "test",
        cache_dir: str | None = None,
    ):
        super().__init__()
        if not multilabel and not regression:
            raise ValueError("ImageFileDataModule needs targets: multilabel and/or regression columns of the table")
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training data")
        if predict_split not in ("test", "all"):
            raise ValueError(f"predict_split must be 'test' or 'all', got {predict_split!r}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.table = LabelTable.from_file(
            labels, file_column, patient_column, dict(multilabel or {}), dict(regression or {}), dict(units or {})
        )
        self.datasets: dict[str, ImageFileDataset] = {}
        self.page_size: tuple[int, int] | None = None
        self.preprocessing: Any = None
        self.page_cache = PageCache(cache_dir) if cache_dir else None

    @property
    def target_specs(self) -> dict[str, TargetSpec]:
        return dict(self.table.targets)

    def _resolve(self, name: str) -> Path:
        """The image a table cell names; one line naming the table row when there is none or several."""
        path = self.root / name
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if not path.is_file():
                raise FileNotFoundError(f"label table {self.hparams.labels}: image {name!r} is not in {self.root}")
            return path
        found = [path.with_suffix(s) for s in IMAGE_SUFFIXES if path.with_suffix(s).is_file()]
        if len(found) != 1:
            what = "no image file" if not found else f"{len(found)} image files ({', '.join(p.name for p in found)})"
            raise FileNotFoundError(f"label table {self.hparams.labels}: {name!r} names {what} in {self.root}")
        return found[0]

    def _all_rows(self) -> tuple[list[Path], list[str], list[str], dict[str, np.ndarray]]:
        keys = sorted(self.table.rows)
        files = [self._resolve(key) for key in keys]
        column = self.hparams.patient_column
        patients = [str(self.table.rows[key][column]).strip() if column else key for key in keys]
        empty = [key for key, patient in zip(keys, patients, strict=True) if not patient]
        if empty:
            raise ValueError(f"label table {self.hparams.labels}: rows {empty[:5]} have no {column!r}")
        values = [self.table.values(self.table.rows[key]) for key in keys]
        targets = {name: np.stack([v[name] for v in values]) for name in self.table.targets}
        return files, keys, patients, targets

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        if self.page_cache is not None:
            self.page_cache.check_writable()
        files, keys, patients, targets = self._all_rows()
        splits = np.array([patient_split(p, hp.val_fraction, hp.test_fraction, hp.split_seed) for p in patients])
        every = np.arange(len(keys))
        for split in (*SPLITS, "all"):
            idx = every if split == "all" else np.flatnonzero(splits == split)
            if split == "train" and len(idx) == 0:
                raise ValueError(f"no image of {hp.labels} falls in the training split; use more patients")
            self.datasets[split] = ImageFileDataset(
                [files[i] for i in idx],
                [keys[i] for i in idx],
                [patients[i] for i in idx],
                {name: values[idx] for name, values in targets.items()},
            )
        self._configure_datasets()

    def use_image_model(self, page_size: tuple[int, int], image_preprocessing: dict[str, Any]) -> None:
        """Read pages at the model's size through the model's preprocessing (the model's contract, not the data's)."""
        self.page_size = tuple(page_size)
        self.preprocessing = create_image_preprocessing(image_preprocessing)
        self._configure_datasets()

    def _configure_datasets(self) -> None:
        for dataset in self.datasets.values():
            dataset.page_size, dataset.preprocessing = self.page_size, self.preprocessing
            dataset.page_cache = self.page_cache

    def target_summary(self, name: str, split: str = "train") -> TargetSummary:
        """Per-column counts and sums of one target over a split (heads standardise and weight with it)."""
        self.setup("fit")
        return TargetSummary.of(self.datasets[split].targets[name])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            self.datasets[split],
            batch_size=hp.batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.predict_split, shuffle=False)
