"""Per-split tables (one row per label, lab or class) too long for a logger, written as CSV files by a callback.

The task collects each head's tables when an evaluation epoch ends (``FineTuneTask.split_tables``);
:class:`SplitTables` writes them once the evaluation run is over, so the task itself writes no files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from ecgfm.evaluation.log_keys import LOGGED_UNIT
from ecgfm.io import atomic_write_csv

__all__ = ["SplitTables"]


class SplitTables(Callback):
    """Writes ``<log dir>/tables/<split>-segment-<head>-<table>.csv`` after each validation and test run, by rank 0;
    ``segment``: the loop scores 10-s segments, as its logged metrics (``ecgfm.evaluation.log_keys``).

    Validation tables are rewritten each epoch (they follow the thresholds chosen on validation); the sanity check
    and a ``fast_dev_run`` (one batch: a check of the recipe, whose tables would replace real ones) write none.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        tables: dict[str, dict[str, list[dict[str, Any]]]] = getattr(pl_module, "split_tables", {}).pop(split, {})
        log_dir = trainer.log_dir  # every rank asks: some loggers broadcast the directory from rank 0
        if not tables or trainer.global_rank != 0 or trainer.fast_dev_run:
            return
        folder = Path(log_dir or trainer.default_root_dir) / "tables"
        for head, named in tables.items():
            for table, rows in named.items():
                if rows:
                    columns = list(rows[0])
                    atomic_write_csv(
                        folder / f"{split}-{LOGGED_UNIT}-{head}-{table}.csv",
                        columns,
                        ([row[c] for c in columns] for row in rows),
                    )
