"""Resuming: checkpoints are never half-written, and a run stopped at any moment (SIGKILL, SIGTERM, SLURM's requeue
signal) and started again with the same command continues from its newest checkpoint, with the global steps, the
learning-rate schedule, the training order and the final weights of a run that was never interrupted; a W&B run
(offline here) continues under the same id."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.demos.boring_classes import BoringModel
from test_distributed import trained_sequence  # the runs here log their batches with test_distributed.SampleLog

from ecgfm import checkpointing
from ecgfm.checkpointing import AtomicCheckpointIO, ResumableCheckpoint
from ecgfm.io import PARTIAL_PREFIX, PARTIAL_SUFFIX, atomic_save_torch, remove_partial_files
from ecgfm.resume import (
    HANDOFF_ENV,
    RECORD,
    RunPlan,
    config_fingerprint,
    hand_off,
    plan_run,
    spell_out_default_logger,
)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "potassium" / "net1d-small.yaml"
TIMEOUT = 300


# ----------------------------------------------------------------------------------------------- the atomic writer
def partial_files(folder: Path) -> list[Path]:
    return list(folder.rglob(f"{PARTIAL_PREFIX}*"))


def test_a_failed_write_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "last.ckpt"
    atomic_save_torch({"global_step": 1}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # an ordinary file, not mkstemp's 0600

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip archive")
        f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        atomic_save_torch({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert not partial_files(tmp_path)

    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_save_torch({"global_step": 3}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert not partial_files(tmp_path)

    # what a SIGKILL during a write leaves behind: the next run removes it, and nothing mistakes it for a checkpoint
    leftover = path.parent / f"{PARTIAL_PREFIX}0123abcd{PARTIAL_SUFFIX}"
    leftover.write_bytes(b"PK\x03\x04")
    assert not leftover.match("*.ckpt") and "hpc_ckpt_" not in leftover.name
    assert remove_partial_files(path.parent) == [leftover] and not partial_files(tmp_path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_lightning_checkpoints_and_slurm_hpc_checkpoints_go_through_the_atomic_writer(tmp_path, monkeypatch):
    written = []
    real = checkpointing.atomic_save_torch

    def spy(obj, path):
        written.append(Path(path))
        return real(obj, path)

    monkeypatch.setattr(checkpointing, "atomic_save_torch", spy)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ResumableCheckpoint(save_top_k=0, save_last_every_n_steps=2)],
    )
    trainer.fit(BoringModel())
    hpc = trainer._checkpoint_connector.hpc_save_path(tmp_path)  # what SLURM's requeue signal handler writes
    trainer.save_checkpoint(hpc)
    assert Path(hpc).name == "hpc_ckpt_1.ckpt"
    assert written == [tmp_path / "checkpoints" / "last.ckpt"] * 2 + [Path(hpc)]  # steps 2 and 3 (epoch end), hpc
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


class ValidatedModel(BoringModel):
    """BoringModel that logs a validation value, so the checkpoint can monitor it."""

    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)["x"]
        self.log("val/loss", loss)
        return loss


@pytest.mark.parametrize("every", [2, 5, 64])  # BoringModel's epoch is 64 steps: a last.ckpt save on its last step
def test_a_step_save_of_last_ckpt_on_an_epochs_last_step_does_not_cost_the_best_checkpoint(tmp_path, every):
    callback = ResumableCheckpoint(monitor="val/loss", filename="best-{epoch:02d}", save_last_every_n_steps=every)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    trainer.fit(ValidatedModel())
    assert callback.best_model_path and Path(callback.best_model_path).name.startswith("best-epoch=")
    assert Path(callback.best_model_path).is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 128


def test_checkpoints_are_read_back_only_with_weights_only(tmp_path):
    from ecgfm.backbones.checkpoint import CheckpointError

    io = AtomicCheckpointIO()
    path = fake_checkpoint(tmp_path / "a.ckpt", step=3)
    assert io.load_checkpoint(path)["global_step"] == 3
    with pytest.raises(CheckpointError, match="only with weights_only=True"):  # `--weights_only false` is refused
        io.load_checkpoint(path, weights_only=False)
    torch.save({"state_dict": {}, "hook": print}, path)
    with pytest.raises(CheckpointError, match=f"refusing to load {path}: it pickles print"):
        io.load_checkpoint(path)


# ----------------------------------------------------------------------------------------------- choosing the run
def fit_config(save_dir: Path, logger: str = "CSVLogger", **logger_args) -> Namespace:
    args = {"save_dir": str(save_dir), "name": "run", "version": None, **logger_args}
    if logger == "WandbLogger":
        args = {"save_dir": str(save_dir), "project": "proj", "id": None, "version": None, **logger_args}
    return Namespace(
        seed_everything=0,
        ckpt_path=None,
        trainer=Namespace(
            logger=Namespace(class_path=f"lightning.pytorch.loggers.{logger}", init_args=Namespace(**args)),
            default_root_dir=str(save_dir / "root"),
            callbacks=[],
            max_epochs=3,
        ),
        model=Namespace(lr=0.001),
    )


def fake_checkpoint(path: Path, step: int = 0) -> Path:
    """The smallest file that ``ecgfm fit`` resumes from: what Lightning's training checkpoints hold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": {"w": torch.zeros(2)}, "global_step": step, "epoch": 0, "loops": {}, "optimizer_states": []}
    torch.save({**state, "pytorch-lightning_version": L.__version__}, path)
    return path


def fake_run(run_dir: Path, fingerprint: str, finished: bool = False, pid: int = 999_999_999, **extra) -> Path:
    fake_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    record = {"fingerprint": fingerprint, "finished": finished, "host": "elsewhere", "pid": pid, **extra}
    (run_dir / RECORD).write_text(json.dumps(record))
    return run_dir / "checkpoints" / "last.ckpt"


def test_the_same_command_resumes_its_newest_unfinished_run_and_anything_else_starts_a_new_one(tmp_path):
    config = fit_config(tmp_path)
    first = plan_run(config)
    assert (first.run_dir, first.version, first.ckpt_path) == (str(tmp_path / "run" / "version_0"), "version_0", None)

    fingerprint = config_fingerprint(config)
    last = fake_run(tmp_path / "run" / "version_0", fingerprint)
    again = plan_run(config)
    assert (again.run_dir, again.version, again.ckpt_path) == (first.run_dir, "version_0", str(last))
    assert plan_run(config, "never").ckpt_path is None and plan_run(config, "never").version == "version_1"

    other = fit_config(tmp_path)
    other.model.lr = 0.01  # another option: another run
    assert plan_run(other).ckpt_path is None and plan_run(other).version == "version_1"
    other.seed_everything, other.ckpt_path = 7, "ignored.ckpt"  # neither changes the fingerprint
    other.model.lr = 0.001
    assert config_fingerprint(other) == fingerprint

    # SLURM's requeue checkpoint, newer than last.ckpt, is the one to resume from
    hpc = fake_checkpoint(tmp_path / "run" / "version_0" / "hpc_ckpt_2.ckpt")
    os.utime(last, (time.time() - 60, time.time() - 60))
    assert plan_run(config).ckpt_path == str(hpc)

    # a finished run is not resumed; a newer unfinished one of the same command is
    fake_run(tmp_path / "run" / "version_1", fingerprint, finished=True)
    assert plan_run(config).version == "version_2"
    newest = fake_run(tmp_path / "run" / "version_2", fingerprint)
    assert plan_run(config).ckpt_path == str(newest)


def test_a_run_that_is_still_going_is_not_taken_over(tmp_path):
    import socket

    config = fit_config(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake_run(tmp_path / "run" / "version_0", config_fingerprint(config), pid=live.pid)
        record = json.loads((tmp_path / "run" / "version_0" / RECORD).read_text())
        (tmp_path / "run" / "version_0" / RECORD).write_text(json.dumps({**record, "host": socket.gethostname()}))
        assert plan_run(config).version == "version_1"  # running elsewhere on this host: a new run
    finally:
        live.kill()
        live.wait()
    assert plan_run(config).version == "version_0"  # its process is gone: resume it


# ----------------------------------------------------------------------------------------------- a bad checkpoint
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a full disk or a copy cut short leaves


def aside(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f"{name}.corrupt-*"))


def test_a_broken_last_ckpt_is_moved_aside_and_the_newest_checkpoint_that_loads_is_resumed(tmp_path):
    config = fit_config(tmp_path)
    run_dir = tmp_path / "run" / "version_0"
    last = fake_run(run_dir, config_fingerprint(config))
    fake_checkpoint(last.parent / "best-epoch=00.ckpt", step=17)
    hpc = fake_checkpoint(run_dir / "hpc_ckpt_1.ckpt", step=20)
    os.utime(hpc, (time.time() - 60, time.time() - 60))  # last.ckpt is the newest: the one a rerun would pick

    truncate(last)
    plan = plan_run(config)
    assert (plan.ckpt_path, plan.step, plan.version) == (str(hpc), 20, "version_0")  # the highest step that loads
    moved = aside(last.parent, "last.ckpt")
    assert not last.exists() and len(moved) == 1  # kept for a person to look at, not deleted
    assert plan.warnings == [f"moved {last} aside to {moved[0].name}: cannot read checkpoint {last}: it is truncated "
                             "or corrupt (an interrupted copy or write?)"]  # fmt: skip

    # a foreign file named like a checkpoint: a text file, a plain pickle, a dict torch.save wrote, bare weights
    hpc.write_text("not a checkpoint\n")
    with open(last, "wb") as f:
        pickle.dump({"global_step": 5}, f)
    plan = plan_run(config)
    assert plan.ckpt_path == str(last.parent / "best-epoch=00.ckpt") and plan.step == 17
    assert not hpc.exists() and not last.exists() and len(aside(last.parent, "last.ckpt")) == 2
    hpc_aside = aside(run_dir, "hpc_ckpt-1.ckpt")  # Lightning's SLURM lookup takes any name with "hpc_ckpt_" in it
    assert len(hpc_aside) == 1 and not list(run_dir.glob("*hpc_ckpt_*"))
    assert any(f"{hpc} aside" in w and "not a" in w for w in plan.warnings)  # not a torch checkpoint
    assert any(f"{last} aside" in w and "not a checkpoint written by torch.save" in w for w in plan.warnings)

    torch.save({"global_step": 30, "weights": torch.ones(2)}, last)
    assert "is not a Lightning checkpoint (no state_dict" in plan_run(config).warnings[0]
    torch.save({"state_dict": {}, "global_step": 40, "pytorch-lightning_version": L.__version__}, last)
    assert "holds no training state to resume from" in plan_run(config).warnings[0]
    assert plan_run(config).ckpt_path == str(last.parent / "best-epoch=00.ckpt")


def test_when_no_checkpoint_loads_fit_stops_and_names_each_file_without_moving_any(tmp_path):
    from ecgfm.backbones.checkpoint import CheckpointError

    config = fit_config(tmp_path)
    run_dir = tmp_path / "run" / "version_0"
    last = fake_run(run_dir, config_fingerprint(config))
    best = fake_checkpoint(last.parent / "best-epoch=00.ckpt", step=17)
    truncate(last)
    truncate(best)
    with pytest.raises(CheckpointError) as refused:
        plan_run(config)
    message = str(refused.value)
    assert "\n" not in message and f"cannot resume the unfinished run in {run_dir}" in message
    assert f"{last}: it is truncated" in message and f"{best}: it is truncated" in message
    assert "--resume never" in message and "weights_only=False" not in message
    assert sorted(p.name for p in last.parent.iterdir()) == ["best-epoch=00.ckpt", "last.ckpt"]  # nothing moved
    assert plan_run(config, "never").version == "version_1"  # what the message says to do: a new run


def test_a_named_run_wandb_ids_and_the_ddp_hand_off(tmp_path, monkeypatch):
    named = fit_config(tmp_path, version="exp1")
    assert plan_run(named).run_dir == str(tmp_path / "run" / "exp1") and plan_run(named).version is None
    last = fake_run(tmp_path / "run" / "exp1", "another fingerprint")
    assert plan_run(named).ckpt_path == str(last)  # the named run, whatever its options were

    default = fit_config(tmp_path)
    default.trainer.logger = None  # Lightning's own logger: spelled out, in <default_root_dir>/lightning_logs
    spell_out_default_logger(default.trainer)
    assert plan_run(default).run_dir == str(tmp_path / "root" / "lightning_logs" / "version_0")

    wandb = fit_config(tmp_path / "wb", "WandbLogger")
    fresh = plan_run(wandb)
    assert Path(fresh.run_dir).parent == tmp_path / "wb" / "proj" and len(fresh.version) == 8
    last = fake_run(Path(fresh.run_dir), config_fingerprint(wandb))
    assert plan_run(wandb).version == fresh.version and plan_run(wandb).ckpt_path == str(last)

    # the processes of one torchrun (or SLURM) launch each choose a new run's W&B id alone: they choose the same
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    other_project = fit_config(tmp_path / "wb", "WandbLogger", project="other")
    first_launch = plan_run(other_project).version
    assert plan_run(other_project).version == first_launch
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")
    assert plan_run(other_project).version != first_launch

    plan = RunPlan(str(tmp_path / "x"), "version_9", None, "f", "new run")
    monkeypatch.setenv(HANDOFF_ENV, json.dumps({"parent_pid": os.getppid(), "plan": plan.__dict__}))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert plan_run(named).version is None  # rank 0 (no LOCAL_RANK) decides by itself
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert plan_run(named) == plan  # a DDP process that rank 0 started takes rank 0's decision
    hand_off(plan)  # as this process would for its own children: not its own parent's
    assert plan_run(named).version is None


def test_ecgfm_fit_writes_atomically_and_a_finished_run_is_not_resumed(synthetic_shards, tmp_path, monkeypatch):
    from ecgfm.commands.lightning import run_lightning

    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--config",
        str(RECIPE),
        f"--data.root={synthetic_shards}",
        "--model.backbone=net1d-tiny",
        "--model.preprocessing=zscore",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'out'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]
    first = run_lightning(args)
    assert isinstance(first.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    run_dir = tmp_path / "logs" / "potassium" / "version_0"
    assert first.trainer.default_root_dir == str(run_dir)  # SLURM's hpc_ckpt_N.ckpt would go to the run's folder
    assert json.loads((run_dir / RECORD).read_text())["finished"] is True
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    second = run_lightning(args)
    assert second.trainer.ckpt_path is None and Path(second.trainer.logger.log_dir).name == "version_1"


# ----------------------------------------------------------------------------------------------- real runs, killed
def write_test_config(folder: Path, logger: dict | None = None, save_last_every_n_steps: int = 4) -> Path:
    """The potassium recipe made small: net1d-tiny, 2 epochs of 17 batches, last.ckpt every 4 steps, sample log."""
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 2,
            "limit_val_batches": 2,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "ecgfm.checkpointing.ResumableCheckpoint",
                    "init_args": {
                        "monitor": "val/segment/potassium/mae",
                        "mode": "min",
                        "filename": "best-{epoch:02d}",
                        "save_last_every_n_steps": save_last_every_n_steps,
                    },
                },
                {"class_path": "test_distributed.SampleLog", "init_args": {"folder": str(folder / "samples")}},
            ],
        },
        "model": {"backbone": "net1d-tiny", "preprocessing": "zscore"},
        "data": {"batch_size": 32},
    }
    if logger is not None:
        config["trainer"]["logger"] = logger
    path = folder / "test.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def fit_command(folder: Path, shards: Path, config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ecgfm",
        "fit",
        "--config",
        str(RECIPE),
        "--config",
        str(config),
        f"--data.root={shards}",
        f"--trainer.default_root_dir={folder / 'out'}",
        f"--trainer.logger.init_args.save_dir={folder / 'logs'}",
    ]


def child_env(folder: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != HANDOFF_ENV and not k.startswith(("SLURM_", "WANDB_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env.update(WANDB_MODE="offline", WANDB_DIR=str(folder), WANDB_CONFIG_DIR=str(folder / ".wandb-config"))
    env.update(WANDB_CACHE_DIR=str(folder / ".wandb-cache"), WANDB_DATA_DIR=str(folder / ".wandb-data"))
    env.update(extra)
    return env


def start(command: list[str], env: dict[str, str], folder: Path, name: str) -> subprocess.Popen:
    log = open(folder / f"{name}.log", "w")  # the child writes to it until it ends
    return subprocess.Popen(command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(command: list[str], env: dict[str, str], folder: Path, name: str) -> str:
    proc = start(command, env, folder, name)
    code = proc.wait(timeout=TIMEOUT)
    output = (folder / f"{name}.log").read_text()
    assert code == 0, f"{name} ended with {code}:\n{output[-4000:]}"
    return output


def load_every_checkpoint(folder: Path) -> int:
    """Load each *.ckpt under ``folder`` (a half-written one would fail); no temporary file may look like one."""
    loaded = 0
    for path in folder.rglob("*.ckpt"):
        with contextlib.suppress(FileNotFoundError):  # an old best-epoch file removed between glob and open
            torch.load(path, map_location="cpu", weights_only=True)
            loaded += 1
    return loaded


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def wait_until(proc: subprocess.Popen, folder: Path, done, name: str) -> None:
    """Poll (loading every checkpoint each time) until ``done()``; fail if the run ends first."""
    deadline = time.monotonic() + TIMEOUT
    while not done():
        load_every_checkpoint(folder)
        if proc.poll() is not None:
            pytest.fail(f"{name} ended ({proc.returncode}) before it could be stopped:\n{read_log(folder, name)}")
        assert time.monotonic() < deadline, f"{name} did not get there in {TIMEOUT} s"
        time.sleep(0.1)


def read_log(folder: Path, name: str) -> str:
    return (folder / f"{name}.log").read_text()[-4000:]


def last_ckpt_at_least(path: Path, step: int):
    def done() -> bool:
        try:
            return step_of(path) >= step
        except FileNotFoundError:
            return False

    return done


def samples_logged(folder: Path, n: int):
    path = folder / "samples" / "samples-rank0.jsonl"
    return lambda: path.exists() and len(path.read_text().splitlines()) >= n


@pytest.fixture(scope="module")
def reference(synthetic_shards, tmp_path_factory) -> dict:
    """The same training, never interrupted."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_test_config(folder)
    run_to_end(fit_command(folder, synthetic_shards, config), child_env(folder), folder, "reference")
    last = folder / "logs" / "potassium" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    sequence = trained_sequence(folder / "samples" / "samples-rank0.jsonl")
    assert checkpoint["global_step"] == len(sequence) == 34  # 2 epochs of 17 batches
    return {"checkpoint": checkpoint, "sequence": sequence}


def assert_same_as_reference(folder: Path, reference: dict, run: str = "potassium/version_0") -> dict:
    run_dir = folder / "logs" / run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    expected = reference["checkpoint"]
    assert checkpoint["global_step"] == expected["global_step"]
    assert checkpoint["epoch"] == expected["epoch"]
    assert checkpoint["lr_schedulers"] == expected["lr_schedulers"]  # cosine position, T_max and last lr
    assert trained_sequence(folder / "samples" / "samples-rank0.jsonl") == reference["sequence"]
    for name, value in expected["state_dict"].items():  # the same batches in the same order: the same weights
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert json.loads((run_dir / RECORD).read_text())["finished"] is True
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]  # one run folder across the restart
    if (run_dir / "metrics.csv").exists():  # CSVLogger: the rows logged before the restart are still there
        steps = [int(row["step"]) for row in csv.DictReader((run_dir / "metrics.csv").open())]
        assert steps[0] == 0 and steps == sorted(steps) and steps[-1] >= expected["global_step"] - 1
    assert load_every_checkpoint(folder) >= 2 and not partial_files(folder)
    return checkpoint


def test_a_killed_run_resumes_from_its_last_checkpoint(reference, synthetic_shards, tmp_path):
    command = fit_command(tmp_path, synthetic_shards, write_test_config(tmp_path))
    env = child_env(tmp_path)
    last = tmp_path / "logs" / "potassium" / "version_0" / "checkpoints" / "last.ckpt"
    proc = start(command, env, tmp_path, "killed")
    wait_until(proc, tmp_path, last_ckpt_at_least(last, 5), "killed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = step_of(last)
    assert 5 <= saved < 34
    output = run_to_end(command, env, tmp_path, "restarted")
    assert f"ecgfm fit: resuming {last.parents[1]} from {last} (global step {saved})" in output
    assert_same_as_reference(tmp_path, reference)


def test_a_truncated_last_ckpt_resumes_from_the_previous_good_checkpoint(reference, synthetic_shards, tmp_path):
    """Killed in the second epoch, and last.ckpt cut short (a full disk, a copy that did not finish): the rerun moves
    it aside, resumes from best-epoch=00.ckpt and ends where the uninterrupted run ended."""
    command = fit_command(tmp_path, synthetic_shards, write_test_config(tmp_path))
    env = child_env(tmp_path)
    last = tmp_path / "logs" / "potassium" / "version_0" / "checkpoints" / "last.ckpt"
    best = last.with_name("best-epoch=00.ckpt")
    proc = start(command, env, tmp_path, "killed")
    wait_until(proc, tmp_path, last_ckpt_at_least(last, 21), "killed")  # epoch 1 is 17 batches: past best-epoch=00
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert step_of(best) == 17 and step_of(last) > 17
    truncate(last)
    output = run_to_end(command, env, tmp_path, "restarted")
    moved = aside(last.parent, "last.ckpt")
    assert len(moved) == 1
    assert f"ecgfm fit: warning: moved {last} aside to {moved[0].name}: cannot read checkpoint {last}" in output
    assert f"ecgfm fit: resuming {last.parents[1]} from {best} (global step 17)" in output
    assert_same_as_reference(tmp_path, reference)  # the same final global step, epoch, schedule and weights


def test_a_run_whose_checkpoints_all_fail_to_load_is_one_line_naming_them(synthetic_shards, tmp_path, capsys):
    from ecgfm.commands import main

    args = [
        "fit",
        "--config",
        str(RECIPE),
        f"--data.root={synthetic_shards}",
        "--model.backbone=net1d-tiny",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'out'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]
    assert main(args) == 0
    run_dir = tmp_path / "logs" / "potassium" / "version_0"
    record = json.loads((run_dir / RECORD).read_text())
    (run_dir / RECORD).write_text(json.dumps({**record, "finished": False}))  # as if killed
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["best-epoch=00.ckpt", "last.ckpt"]
    for path in checkpoints:
        truncate(path)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ecgfm: error:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1] and "Traceback" not in err
    assert all(str(path) in errors[0] for path in checkpoints) and "--resume never" in errors[0]
    assert sorted((run_dir / "checkpoints").iterdir()) == checkpoints  # nothing moved: a rerun says the same
    assert main([*args, "--resume", "never"]) == 0  # what the message says: a new run beside it
    assert (tmp_path / "logs" / "potassium" / "version_1" / "checkpoints" / "last.ckpt").is_file()


def test_sigterm_saves_the_current_step_and_the_same_command_resumes(reference, synthetic_shards, tmp_path):
    command = fit_command(tmp_path, synthetic_shards, write_test_config(tmp_path))
    env = child_env(tmp_path)
    proc = start(command, env, tmp_path, "terminated")
    wait_until(proc, tmp_path, samples_logged(tmp_path, 6), "terminated")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
    assert "ecgfm: stopped by SIGTERM" in read_log(tmp_path, "terminated")
    trained = len((tmp_path / "samples" / "samples-rank0.jsonl").read_text().splitlines())
    last = tmp_path / "logs" / "potassium" / "version_0" / "checkpoints" / "last.ckpt"
    assert step_of(last) == trained  # saved after the batch it was training, whatever save_last_every_n_steps says
    output = run_to_end(command, env, tmp_path, "restarted")
    assert f"(global step {trained})" in output
    assert_same_as_reference(tmp_path, reference)


def test_slurm_requeue_signal_checkpoint_is_the_one_resumed(reference, synthetic_shards, tmp_path):
    """SIGUSR1 on SLURM: Lightning writes hpc_ckpt_1.ckpt (into the run folder) and requeues the job (a stand-in
    scontrol here); the requeued job (same id, same command) resumes from it rather than from an older last.ckpt."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "resume-test", "SLURM_PROCID": "0"}
    slurm.update(SLURM_LOCALID="0", SLURM_NODEID="0", PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    # last.ckpt only at epoch ends here, so that the requeue checkpoint is the newest when the job is killed
    command = fit_command(tmp_path, synthetic_shards, write_test_config(tmp_path, save_last_every_n_steps=100))
    env = child_env(tmp_path, **slurm)
    run_dir = tmp_path / "logs" / "potassium" / "version_0"
    proc = start(command, env, tmp_path, "requeued")
    wait_until(proc, tmp_path, samples_logged(tmp_path, 6), "requeued")
    proc.send_signal(signal.SIGUSR1)
    wait_until(proc, tmp_path, lambda: (run_dir / "hpc_ckpt_1.ckpt").exists(), "requeued")
    os.killpg(proc.pid, signal.SIGKILL)  # SLURM ends the job it requeued
    proc.wait()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved = step_of(run_dir / "hpc_ckpt_1.ckpt")
    output = run_to_end(command, env, tmp_path, "restarted")
    assert f"from {run_dir / 'hpc_ckpt_1.ckpt'} (global step {saved})" in output
    assert_same_as_reference(tmp_path, reference)


def test_a_resumed_wandb_run_keeps_its_id(reference, synthetic_shards, tmp_path):
    logger = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "resume-test", "offline": True},
    }
    command = fit_command(tmp_path, synthetic_shards, write_test_config(tmp_path, logger))
    env = child_env(tmp_path)
    project = tmp_path / "logs" / "resume-test"
    proc = start(command, env, tmp_path, "killed")
    wait_until(proc, tmp_path, lambda: any(project.glob("*/checkpoints/last.ckpt")), "killed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_id = next(project.iterdir()).name
    output = run_to_end(command, env, tmp_path, "restarted")
    assert f"ecgfm fit: resuming {project / run_id} from" in output
    offline_runs = sorted(p.name for p in (tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(f"-{run_id}") for name in offline_runs)  # one W&B run
    assert_same_as_reference(tmp_path, reference, run=f"resume-test/{run_id}")
