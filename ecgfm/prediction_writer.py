"""Writes ``ecgfm predict`` outputs to a CSV: one row per segment, one column per named, unit-bearing prediction."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from ecgfm.io import atomic_write_csv


class PredictionCSVWriter(BasePredictionWriter):
    """Collects ``predict_step`` dicts and writes ``output`` (default: ``<log_dir>/predictions.csv``) at the end."""

    def __init__(self, output: str | None = None):
        super().__init__(write_interval="epoch")
        self.output = output
        self.path: Path | None = None

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches or trainer.fast_dev_run:  # a fast_dev_run writes nothing, as for checkpoints and tables
            return
        columns = list(batches[0])
        log_dir = trainer.log_dir or trainer.default_root_dir
        path = Path(self.output) if self.output else Path(log_dir) / "predictions.csv"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        self.path = atomic_write_csv(path, columns, _rows(batches, columns))


def _rows(batches: list[dict[str, Any]], columns: list[str]) -> Iterator[tuple]:
    """One row per segment, batch by batch (a tensor column becomes a list first)."""
    for batch in batches:
        values = [batch[c] if isinstance(batch[c], list) else batch[c].tolist() for c in columns]
        yield from zip(*values, strict=True)
