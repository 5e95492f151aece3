"""Checkpoints that are never half-written, and a ``last.ckpt`` kept current for resuming a killed run.

A job can be killed at any instant (preemption, time limit, node failure). A checkpoint is therefore written to a
temporary file in the same folder, flushed to disk and renamed over the old one: the rename is atomic, so the path
holds either the previous complete checkpoint or the new complete one. The temporary names (``.partial-*.tmp``)
neither end in ``.ckpt`` nor contain ``hpc_ckpt_``, so neither Lightning's ``last``/``hpc`` lookups nor a glob for
checkpoints ever pick one up; a SIGKILL can leave one behind, and the next run removes it.

Checkpoints are read back the way they are everywhere in ecgfm: ``torch.load(weights_only=True)`` with a small
allow-list, whatever ``--weights_only`` says; a file that is refused, truncated or not a checkpoint is a one-line
CheckpointError naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ecgfm.backbones.checkpoint import CheckpointError, load_error, safe_torch_load
from ecgfm.evaluation.log_keys import unit_named_monitor
from ecgfm.io import atomic_save_torch, remove_partial_files

TRAINING_STATE = ("epoch", "loops", "optimizer_states")  # what resuming a run reads besides weights and step


def check_lightning_checkpoint(path: str | Path, resuming: bool = False) -> int:
    """The global step a Lightning checkpoint was saved at, once it has loaded safely (tensors memory-mapped) and
    holds a ``state_dict`` (and, for ``resuming``, the training state); else a CheckpointError naming the file."""
    return int(read_lightning_checkpoint(path, resuming)["global_step"])


def read_lightning_checkpoint(path: str | Path, resuming: bool = False) -> dict[str, Any]:
    """The checkpoint itself (tensors memory-mapped), checked as :func:`check_lightning_checkpoint` checks it."""
    checkpoint = safe_torch_load(path, mmap=True)
    is_dict = isinstance(checkpoint, dict)
    absent = [key for key in ("state_dict", "pytorch-lightning_version") if key not in checkpoint] if is_dict else []
    if not is_dict or absent:
        what = f"no {' or '.join(absent)}" if is_dict else f"it holds a {type(checkpoint).__name__}"
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint ({what}); a backbone's own weights go to --model.pretrained"
        )
    step = checkpoint.get("global_step")
    if not isinstance(step, int):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (its global_step is {step!r})")
    missing = [key for key in TRAINING_STATE if key not in checkpoint] if resuming else []
    if missing:
        raise CheckpointError(f"{path} holds no training state to resume from (no {', '.join(missing)}): weights only?")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on local disks, and its reader, safe everywhere (``ecgfm fit``, ``test``,
    ``validate`` and ``predict`` install it unless a recipe sets another).

    Everything Lightning saves goes through the strategy's CheckpointIO: ModelCheckpoint files, ``last.ckpt``,
    ``trainer.save_checkpoint`` and the ``hpc_ckpt_N.ckpt`` written on SLURM's requeue signal. Remote paths
    (``s3://...``) keep Lightning's own writer. What it loads (``--ckpt_path``, a resumed run) never goes through
    unrestricted pickle: a request for ``weights_only=False`` is refused, not followed.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save_torch(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Callable | Any | None = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(
                f"not loading {path} with weights_only=False: ecgfm loads checkpoints only with weights_only=True "
                "(leave --weights_only unset)"
            )
        if _is_local_file_protocol(path):
            checkpoint = safe_torch_load(path, map_location=map_location)
        else:
            try:
                checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
            except Exception as err:
                raise load_error(path, err) from err
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
        return checkpoint


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also keeps ``<dirpath>/last.ckpt`` current, for resuming a killed run.

    ``last.ckpt`` is written every ``save_last_every_n_steps`` optimizer steps, at the end of every training epoch
    (after validation) and when SIGTERM stops training (Lightning then ends after the current batch); ``ecgfm fit``
    resumes from it when the same command runs again. The monitored checkpoints (``monitor``, ``mode``,
    ``save_top_k``, ``filename``) are ModelCheckpoint's, saved after validation as before; ``save_top_k=0`` keeps
    only ``last.ckpt``. One callback for both, so ``trainer.checkpoint_callback`` has the best and the last path.
    Files are replaced in place (no ``-v1`` copies), and checkpoints hold the full training state.

    Args:
        dirpath: where checkpoints go; default ``<log dir>/checkpoints``, as ModelCheckpoint's.
        filename: name pattern of the monitored checkpoints, e.g. ``best-{epoch:02d}``.
        monitor, mode, save_top_k: which checkpoints besides ``last.ckpt`` to keep (ModelCheckpoint's meaning).
        save_last_every_n_steps: optimizer steps between two ``last.ckpt`` saves within an epoch.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last_every_n_steps: int = 500,
        verbose: bool = False,
    ):
        if save_last_every_n_steps < 1:
            raise ValueError(
                f"ResumableCheckpoint: save_last_every_n_steps must be 1 or more, not {save_last_every_n_steps}"
            )
        monitor, renamed = unit_named_monitor(monitor)
        if renamed:
            rank_zero_warn(
                f"ResumableCheckpoint: the loop logs per-segment metrics as {monitor!r}; monitoring that key"
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_top_k=save_top_k,
            save_last=True,
            verbose=verbose,
            enable_version_counter=False,  # a resumed run replaces its files instead of adding -v1 copies
        )
        self.save_last_every_n_steps = save_last_every_n_steps
        self._last_writes = 0
        self._last_step_written = -1  # the step of the last step-triggered last.ckpt

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and stage == "fit" and self.dirpath and _is_local_file_protocol(self.dirpath):
            remove_partial_files(self.dirpath)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if trainer.fast_dev_run:  # ModelCheckpoint.on_train_end would write last.ckpt of a fast_dev_run
            return
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_writes += 1
        for logger in trainer.loggers:  # e.g. CSVLogger keeps 100 steps in memory: a killed run would lose them
            logger.save()

    def _saving_allowed(self, trainer: L.Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return not trainer.fast_dev_run and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        step = trainer.global_step
        # once per step: with gradient accumulation the batches after an optimizer step still show its number
        if step and step % self.save_last_every_n_steps == 0 and step != self._last_step_written:
            if self._saving_allowed(trainer):
                # ModelCheckpoint skips its monitored save after validation when a file was written at the same
                # step; this one is only last.ckpt, so the epoch's last step keeps its best-*.ckpt
                saved_before = self._last_global_step_saved
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
                self._last_global_step_saved = saved_before
                self._last_step_written = step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint writes last.ckpt here only beside a monitored save; this always does, and replaces a
        # step-triggered save of the same step: the state after validation is the cleaner one to resume from.
        writes = self._last_writes
        super().on_train_epoch_end(trainer, pl_module)
        if self._last_writes == writes and self._saving_allowed(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """SIGTERM (a preemption notice outside SLURM's requeue) stops Lightning after a batch: save that state."""
        if isinstance(exception, SIGTERMException) and self._saving_allowed(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
