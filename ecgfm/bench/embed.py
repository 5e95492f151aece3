"""``ecgfm bench embed``: what precomputed features buy. The same heads, from the same initial weights, in the same data
order, trained as a linear probe through the frozen backbone and on the features ``ecgfm embed`` stored; time per
epoch of each (measured in this run), the one-off cost of embedding, and the validation metrics of both, which agree
to float16 precision.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
from rich.console import Console
from rich.table import Table

from ecgfm.data.datamodule import ShardDataModule
from ecgfm.data.shards import Manifest, ShardError
from ecgfm.data.synthetic import write_synthetic_shards
from ecgfm.embeddings import embed_shards
from ecgfm.io import atomic_write_json
from ecgfm.pretrained import load
from ecgfm.tasks import FineTuneTask

#: The heads of both runs: the synthetic shards' potassium value and hyperkalemia flag.
HEADS = [
    {"kind": "potassium", "name": "potassium", "target": "potassium", "labels": ["potassium"]},
    {"kind": "binary", "name": "hyperkalemia", "target": "hyperkalemia", "labels": ["hyperkalemia"]},
]


class EpochTimer(L.Callback):
    """Wall time of every training epoch, its validation at the epoch end included."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def _fit(task: FineTuneTask, root: Path, epochs: int, batch_size: int, num_workers: int, accelerator: str) -> dict:
    """Train ``task`` on ``root`` with a fixed seed; seconds per epoch and the last validation metrics."""
    L.seed_everything(0, verbose=False)
    timer = EpochTimer()
    data = ShardDataModule(
        str(root), batch_size=batch_size, num_workers=num_workers, val_fraction=0.2, test_fraction=0.2
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(task, datamodule=data)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
    return {"epoch_seconds": timer.seconds, "median_epoch_seconds": statistics.median(timer.seconds), **metrics}


def run_embed_benchmark(
    out: str = "ecgfm-bench-embed",
    model: str = "ludb-diagnoses-net1d-small",
    n_segments: int = 4096,
    epochs: int = 3,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: str = "auto",
    lr: float = 0.003,
    json_out: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Time per epoch of a linear probe through a frozen backbone and of the same heads on its stored features.

    Synthetic shards (``n_segments``, potassium and hyperkalemia targets) are written to ``out/shards`` once, embedded
    to ``out/features`` (timed, every run), and both runs train the same heads from the same initial weights for
    ``epochs`` epochs; the table gives the median seconds per epoch, the ratio, the epochs after which embedding has
    paid for itself, and the validation loss and AUROC of both.

    Args:
        out: working folder (shards are kept between runs, features recomputed).
        model: what ``ecgfm embed`` and the linear probe run: a zoo name, a published folder or a ``.ckpt``.
        n_segments: synthetic segments (10 s, 12 leads).
        epochs: training epochs of each run.
        batch_size: segments per batch, in training and in ``ecgfm embed``.
        num_workers: data loader workers of both runs.
        accelerator: Lightning's accelerator (``auto``, ``cpu``, ``gpu``); ``ecgfm embed`` uses the same device.
        lr: the heads' learning rate (constant, AdamW).
        json_out: also write the numbers to this JSON file.
    """
    if n_segments < 64 or epochs < 1 or batch_size < 1:
        raise ValueError(f"n_segments >= 64, epochs >= 1 and batch_size >= 1, got {n_segments}, {epochs}, {batch_size}")
    console = console or Console(width=max(Console().width, 120))
    root = Path(out)
    shards, features = root / "shards", root / "features"
    try:
        ready = Manifest.load(shards).n_segments == n_segments
    except ShardError:
        ready = False
    if not ready:
        shutil.rmtree(shards, ignore_errors=True)
        write_synthetic_shards(shards, n_segments, seed=0, segments_per_shard=512, progress=False)
    shutil.rmtree(features, ignore_errors=True)
    device = "cpu" if accelerator == "cpu" else "auto"
    start = time.perf_counter()
    summary = embed_shards(model, str(shards), str(features), batch_size=batch_size, device=device, progress=False)
    embed_seconds = time.perf_counter() - start

    base = load(model)
    config = base.backbone_config
    probe = FineTuneTask(
        backbone=config.name,
        backbone_kwargs={**config.architecture, "input": config.input.to_dict()},
        preprocessing=base.input_contract.preprocessing,
        leads=list(base.leads),
        adapter=base.adapter.config(),
        finetune="linear_probe",
        heads=HEADS,
        lr=lr,
        scheduler="none",
    )
    probe.backbone.load_state_dict(base.backbone.state_dict())
    probe.adapter.load_state_dict(base.adapter.state_dict())
    head_task = FineTuneTask(
        backbone="precomputed",
        backbone_kwargs={"features_from": str(features)},
        finetune="linear_probe",
        heads=HEADS,
        lr=lr,
        scheduler="none",
    )
    head_task.heads.load_state_dict(probe.heads.state_dict())  # the same initial heads
    runs = {
        "linear probe through the backbone": _fit(probe, shards, epochs, batch_size, num_workers, accelerator),
        "the same heads on stored features": _fit(head_task, features, epochs, batch_size, num_workers, accelerator),
    }
    through, direct = runs.values()
    saved = through["median_epoch_seconds"] - direct["median_epoch_seconds"]
    result = {
        "model": summary.model["name"],
        "model_sha256": summary.model["sha256"],
        "feature_size": summary.size,
        "n_segments": n_segments,
        "epochs": epochs,
        "batch_size": batch_size,
        "embed_seconds": embed_seconds,
        "runs": runs,
        "speedup_per_epoch": through["median_epoch_seconds"] / direct["median_epoch_seconds"],
        "break_even_epochs": embed_seconds / saved if saved > 0 else None,
        "val_loss_difference": abs(through.get("val/loss", 0.0) - direct.get("val/loss", 0.0)),
    }

    table = Table(title=f"{n_segments} segments, {summary.model['name']} ({summary.size} features), batch {batch_size}")
    for column in (
        "run",
        "s / epoch",
        "ratio",
        "val/loss",
        "val/segment/hyperkalemia/auroc",
        "val/segment/potassium/mae",
    ):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, run in runs.items():
        table.add_row(
            name,
            f"{run['median_epoch_seconds']:.3f}",
            f"{through['median_epoch_seconds'] / run['median_epoch_seconds']:.1f}x",
            f"{run.get('val/loss', float('nan')):.5f}",
            f"{run.get('val/segment/hyperkalemia/auroc', float('nan')):.4f}",
            f"{run.get('val/segment/potassium/mae', float('nan')):.4f}",
        )
    console.print(table)
    break_even = result["break_even_epochs"]
    console.print(
        f"ecgfm embed: {embed_seconds:.2f} s once ({n_segments / embed_seconds:.0f} segments/s); it pays for itself "
        + (f"after {break_even:.2f} epochs" if break_even is not None else "never (no epoch was faster)")
        + f"; val/loss differs by {result['val_loss_difference']:.2e}"
    )
    if json_out:
        atomic_write_json(json_out, result)
    return result
