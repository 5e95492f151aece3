"""Which run ``ecgfm fit`` continues: the same command run again resumes its unfinished run from its newest checkpoint.

A run lives in its logger's folder (``<save_dir>/<name>/<version>``; for W&B ``<save_dir>/<project>/<run id>``;
Lightning's default logger is spelled out as the CSV or TensorBoard logger it is), which holds ``ecgfm-run.json``:
a fingerprint of the fit configuration, whether training finished, and who is running it. ``ecgfm fit`` decides
the folder before training starts:

- the logger names its version (``version:``, or W&B ``id:``) or there is no logger: that folder;
- otherwise the newest folder under ``<save_dir>/<name>`` whose record has the same fingerprint (the same recipe
  and options), that did not finish and that no live process is running (on this host, or a SLURM job still
  queued); else a new folder (``version_N``, or a new W&B id).

It resumes from the newest of the folder's ``checkpoints/last*.ckpt`` (and the ``dirpath`` of any checkpoint
callback that sets one) and Lightning's ``hpc_ckpt_N.ckpt``, which SLURM's requeue signal writes into the trainer's
``default_root_dir``: ``ecgfm fit`` points that at the run's folder, so a requeued job finds its own and never an
unrelated job's. A run with neither resumes from its newest other ``.ckpt`` (``best-*.ckpt``). The W&B run id is
the folder's name, so a resumed run logs to the same W&B run (``resume="allow"``, online or offline).

A checkpoint it resumes from must load safely (weights_only=True) as a Lightning training checkpoint. A truncated,
corrupt or foreign ``last*.ckpt`` or ``hpc_ckpt_N.ckpt`` is renamed to ``<name>.corrupt-<time>`` (kept, not deleted,
and never picked again) with a warning, and the run resumes from the newest checkpoint of the run that loads (by
saved global step, then time): an older ``hpc_ckpt``, a ``best-*.ckpt``. When none loads, nothing is moved and
``ecgfm fit`` stops, naming each file and why: it never silently starts the run over.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import secrets
import shutil
import socket
import string
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback

from ecgfm.backbones.checkpoint import CheckpointError
from ecgfm.checkpointing import check_lightning_checkpoint
from ecgfm.io import atomic_write_json, move_aside, remove_partial_files

RECORD = "ecgfm-run.json"
HANDOFF_ENV = "ECGFM_RUN_PLAN"  # rank 0's decision, for the DDP processes Lightning starts (they re-run the command)
UNFINGERPRINTED = ("config", "ckpt_path", "resume", "seed_everything")  # seed: LightningCLI draws one for `true`
LOGGER_KINDS = ("CSVLogger", "TensorBoardLogger", "WandbLogger")


@dataclass
class RunPlan:
    """What ``ecgfm fit`` does: the run folder, the logger version to set (None: as configured) and the checkpoint
    to resume from (None: a new run)."""

    run_dir: str | None
    version: str | None
    ckpt_path: str | None
    fingerprint: str
    note: str
    step: int | None = None  # the global step saved in ckpt_path
    warnings: list[str] = field(default_factory=list)  # checkpoints moved aside or skipped, and why


def resumable_step(path: Path) -> tuple[int | None, str | None]:
    """(the global step it was saved at, None) for a checkpoint a run can resume from, else (None, why not)."""
    try:
        return check_lightning_checkpoint(path, resuming=True), None
    except CheckpointError as err:
        return None, str(err)


def spell_out_default_logger(trainer: Namespace) -> None:
    """Replace ``logger: true`` (or unset: Lightning's default) by the logger Lightning would make, so that
    ``ecgfm fit`` can set its version: TensorBoard's when it is installed, else CSV, in
    ``<default_root_dir>/lightning_logs``."""
    if trainer.get("logger") not in (None, True):
        return
    from importlib.util import find_spec

    kind = "TensorBoardLogger" if find_spec("tensorboard") or find_spec("tensorboardX") else "CSVLogger"
    root = trainer.get("default_root_dir") or os.getcwd()
    args = Namespace(save_dir=str(root), name="lightning_logs", version=None)
    trainer.logger = Namespace(class_path=f"lightning.pytorch.loggers.{kind}", init_args=args)


def config_fingerprint(config: Namespace) -> str:
    """sha256 of the fit configuration, without the settings that do not change what is trained."""
    values = config.clone().as_dict()
    for key in UNFINGERPRINTED:
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _logger_config(trainer: Namespace) -> Any:
    logger = trainer.get("logger")
    if isinstance(logger, list):
        return logger[0] if logger else False  # checkpoints follow the first logger
    return logger


def _layout(trainer: Namespace) -> tuple[str, Path, str | None] | None:
    """(logger kind, folder holding the run folders, fixed run folder name or None); None: a logger we cannot place.

    With ``logger: false`` the run folder is ``default_root_dir`` itself (kind ``none``).
    """
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    logger = _logger_config(trainer)
    if logger is False:
        return "none", root.parent, root.name
    if not isinstance(logger, Namespace) or "class_path" not in logger:
        return None
    kind = logger.class_path.rsplit(".", 1)[-1]
    if kind not in LOGGER_KINDS:
        return None
    args = logger.get("init_args") or Namespace()
    if kind == "WandbLogger":
        save_dir = args.get("save_dir") or args.get("dir") or "."
        name = args.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
        version = args.get("version") or args.get("id")
    else:
        save_dir, name, version = args.get("save_dir") or ".", args.get("name"), args.get("version")
        if isinstance(version, int):
            version = f"version_{version}"
    parent = Path(save_dir) / name if name else Path(save_dir)
    return kind, parent, None if version is None else str(version)


def _checkpoint_dirs(trainer: Namespace, run_dir: Path) -> list[Path]:
    """Where the configured checkpoint callbacks write: their ``dirpath``, else ``<run folder>/checkpoints``."""
    dirs = [run_dir / "checkpoints"]
    for callback in trainer.get("callbacks") or []:
        args = callback.get("init_args") if isinstance(callback, Namespace) else None
        if args is not None and args.get("dirpath"):
            dirs.append(Path(args.dirpath))
    return dirs


def newest_checkpoint(run_dir: Path, checkpoint_dirs: list[Path]) -> Path | None:
    """The most recently written ``last*.ckpt`` or ``hpc_ckpt_N.ckpt`` of a run (what Lightning's ``"last"`` and
    SLURM resumption would each pick, whichever is newer)."""
    candidates = [p for d in checkpoint_dirs if d.is_dir() for p in d.glob("last*.ckpt")]
    candidates += list(run_dir.glob("hpc_ckpt_*.ckpt")) if run_dir.is_dir() else []
    stamped = []
    for path in candidates:
        with contextlib.suppress(FileNotFoundError):
            stamped.append((path.stat().st_mtime_ns, path))
    return max(stamped)[1] if stamped else None


def _aside_name(path: Path) -> str:
    """``<name>.corrupt-<time>``; Lightning's SLURM lookup reads a version from any name containing ``hpc_ckpt_``."""
    return f"{path.name.replace('hpc_ckpt_', 'hpc_ckpt-')}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_point(run_dir: Path, checkpoint_dirs: list[Path]) -> tuple[Path | None, int | None, list[str]]:
    """The checkpoint a run resumes from, its global step, and warnings about the checkpoints that do not load.

    The newest ``last*.ckpt``/``hpc_ckpt_N.ckpt`` when it loads; else the newest (by global step, then time) of every
    checkpoint of the run that loads (so also after an earlier rerun moved a broken ``last.ckpt`` aside), with the
    broken ``last``/``hpc`` files moved aside (they would be picked again). None: the run has no checkpoint.
    Raises CheckpointError naming every file tried when none loads.
    """
    tried: dict[Path, str] = {}
    newest = newest_checkpoint(run_dir, checkpoint_dirs)
    if newest is not None:
        step, problem = resumable_step(newest)
        if problem is None:
            return newest, step, []
        tried[newest] = problem
    loadable = []
    others = [p for d in checkpoint_dirs if d.is_dir() for p in d.glob("*.ckpt")]
    others += list(run_dir.glob("hpc_ckpt_*.ckpt")) if run_dir.is_dir() else []
    if not others:
        return None, None, []
    for path in dict.fromkeys(others):  # a dirpath may be the run's own checkpoints folder
        if path == newest:
            continue
        step, problem = resumable_step(path)
        with contextlib.suppress(FileNotFoundError):  # another process of this launch moved it aside
            mtime = path.stat().st_mtime_ns
            if problem is None:
                loadable.append((step, mtime, path))
            else:
                tried[path] = problem
    if not loadable:
        reasons = "; ".join(tried.values())
        raise CheckpointError(
            f"cannot resume the unfinished run in {run_dir}: none of its checkpoints loads ({reasons}); run the same "
            "command with --resume never to start it over, or give --ckpt_path"
        )
    step, _, chosen = max(loadable)
    notes = []
    for path, problem in tried.items():
        if path.name.startswith(("last", "hpc_ckpt_")):
            try:
                notes.append(f"moved {path} aside to {move_aside(path, _aside_name(path)).name}: {problem}")
            except FileNotFoundError:  # another process of this launch moved it first
                notes.append(f"{path} was moved aside: {problem}")
        else:
            notes.append(f"skipped {path}: {problem}")
    return chosen, step, notes


def read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _slurm_job() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def _owner_alive(record: dict[str, Any]) -> bool:
    """Whether another process is still running this run: a live pid on this host, or another SLURM job in queue."""
    pid, host = record.get("pid"), record.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            pass
        except PermissionError:
            return True
    job = record.get("slurm_job")
    if job and job != _slurm_job() and shutil.which("squeue"):
        try:
            out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return bool(out.strip())
    return False


def _next_version(parent: Path) -> str:
    """``version_N`` after the highest existing one, as Lightning's CSV and TensorBoard loggers number runs."""
    numbers = [-1]
    if parent.is_dir():
        for d in parent.iterdir():
            suffix = d.name.removeprefix("version_")
            if d.is_dir() and d.name.startswith("version_") and suffix.isdigit():
                numbers.append(int(suffix))
    return f"version_{max(numbers) + 1}"


def _new_wandb_id(fingerprint: str, parent: Path) -> str:
    """8 characters, as W&B's own ids. The processes of one torchrun or SLURM launch choose alone, so there the id
    comes from what they share: the launch's id, the configuration and the runs already there."""
    alphabet = string.ascii_lowercase + string.digits
    launch = os.environ.get("TORCHELASTIC_RUN_ID") or _slurm_job()
    if launch is None:
        return "".join(secrets.choice(alphabet) for _ in range(8))
    existing = len(list(parent.iterdir())) if parent.is_dir() else 0
    digest = hashlib.sha256(f"{launch}:{fingerprint}:{existing}".encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:8])


def plan_run(config: Namespace, mode: str = "auto") -> RunPlan:
    """Decide the run folder and the checkpoint to resume from (``mode="never"``: always a new run)."""
    fingerprint = config_fingerprint(config)
    inherited = os.environ.get(HANDOFF_ENV)
    if inherited:
        handoff = json.loads(inherited)
        child = os.environ.get("LOCAL_RANK", "0") != "0"
        if child and handoff.get("parent_pid") == os.getppid():  # a DDP process started by the rank-0 process
            return RunPlan(**handoff["plan"])
    trainer = config.trainer
    layout = _layout(trainer)
    if layout is None:
        note = "automatic resumption needs a CSVLogger, TensorBoardLogger or WandbLogger (or logger: false)"
        return RunPlan(None, None, None, fingerprint, note if mode == "auto" else "")
    kind, parent, fixed = layout
    if fixed is not None:
        run_dir = parent / fixed
        record = read_record(run_dir)
        if mode == "auto" and not (record or {}).get("finished"):
            ckpt, step, notes = resume_point(run_dir, _checkpoint_dirs(trainer, run_dir))
            if ckpt is not None:
                return RunPlan(str(run_dir), None, str(ckpt), fingerprint, "resuming", step, notes)
        return RunPlan(str(run_dir), None, None, fingerprint, "new run")
    if mode == "auto" and parent.is_dir():
        runs = []
        for run_dir in parent.iterdir():
            record = read_record(run_dir)
            if record is not None and record.get("fingerprint") == fingerprint:
                runs.append(((run_dir / RECORD).stat().st_mtime_ns, run_dir, record))
        if runs:
            _, run_dir, record = max(runs, key=lambda r: r[0])
            if not record.get("finished") and not _owner_alive(record):
                ckpt, step, notes = resume_point(run_dir, _checkpoint_dirs(trainer, run_dir))
                if ckpt is not None:
                    return RunPlan(str(run_dir), run_dir.name, str(ckpt), fingerprint, "resuming", step, notes)
    version = _new_wandb_id(fingerprint, parent) if kind == "WandbLogger" else _next_version(parent)
    return RunPlan(str(parent / version), version, None, fingerprint, "new run")


def apply_plan(config: Namespace, plan: RunPlan) -> None:
    """Set the logger version, ``default_root_dir`` (where SLURM's ``hpc_ckpt_N.ckpt`` go) and ``ckpt_path``."""
    trainer = config.trainer
    if plan.version is not None:
        logger = _logger_config(trainer)
        if logger.class_path.endswith("WandbLogger"):
            logger.init_args.id, logger.init_args.version = plan.version, None
        else:
            logger.init_args.version = plan.version
    if plan.run_dir is not None:
        trainer.default_root_dir = plan.run_dir
    if plan.ckpt_path is not None:
        config.ckpt_path = plan.ckpt_path


def hand_off(plan: RunPlan) -> None:
    """Let the DDP processes that Lightning's launcher starts from this one use the same plan."""
    os.environ[HANDOFF_ENV] = json.dumps({"parent_pid": os.getpid(), "plan": asdict(plan)})


def keep_csv_metrics(trainer: L.Trainer, before_step: int) -> None:
    """A CSVLogger deletes the ``metrics.csv`` of a folder it opens: a resumed run keeps the rows logged before its
    checkpoint (``step < before_step``; later ones it logs again). Call it before ``fit``, which opens the folder."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        path = Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
        if path is None or not path.is_file():
            continue
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row.get("step") or before_step) < before_step]
        experiment = logger.experiment  # opening the folder deletes the file: write the rows back at once
        experiment.metrics[:0] = rows
        experiment.save()


class RunRecord(Callback):
    """Writes ``<run folder>/ecgfm-run.json`` when fitting starts (after every DDP process has chosen its run, so no
    process sees another's record while choosing) and marks it finished when training ends normally."""

    def __init__(self, run_dir: str, fingerprint: str, resumed_from: str | None = None):
        self.run_dir = Path(run_dir)
        self.fingerprint = fingerprint
        self.resumed_from = resumed_from

    def _write(self, finished: bool, trainer: L.Trainer) -> None:
        record = {
            "fingerprint": self.fingerprint,
            "finished": finished,
            "global_step": trainer.global_step,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": _slurm_job(),
            "resumed_from": self.resumed_from,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(self.run_dir / RECORD, record, indent=1)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            remove_partial_files(self.run_dir)  # a half-written hpc_ckpt of a killed run
            self._write(False, trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(True, trainer)
