"""slurm/train.sbatch and slurm/sweep.sbatch on a real Slurm: the quickstart recipe with 2 CPU ranks (gloo), and a
2-task job array. Needs a running cluster (`slurm/local-cluster.sh start`); jobs run as the user running pytest and
use the ecgfm executable in $ECGFM (default: the one beside this Python)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/quickstart/net1d-small.yaml"
JOB_TIMEOUT_S = 600

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# A callback the jobs load from tmp_path (PYTHONPATH): each rank writes what Lightning made of the Slurm allocation.
PROBE = """
import json, os
from pathlib import Path

import lightning as L
import torch.distributed as dist


class SlurmProbe(L.Callback):
    def __init__(self, out: str):
        self.out, self.batches, self.records = out, 0, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1
        if trainer.current_epoch == 0:
            self.records += [str(r) for r in batch["record_id"]]

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        info = {
            "global_rank": rank,
            "world_size": trainer.world_size,
            "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
            "strategy": type(trainer.strategy).__name__,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "slurm_procid": os.environ.get("SLURM_PROCID"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "batches": self.batches,
            "records": self.records,
        }
        Path(self.out, f"rank-{rank}.json").write_text(json.dumps(info))
"""


def _ecgfm() -> str:
    exe = os.environ.get("ECGFM") or str(Path(sys.executable).with_name("ecgfm"))
    if not os.access(exe, os.X_OK):
        pytest.fail(f"ecgfm executable {exe} not found: set ECGFM=/path/to/.venv/bin/ecgfm")
    return exe


@pytest.fixture(scope="module")
def slurm() -> None:
    """A Slurm that takes jobs: fail in CI (the CI script starts one), skip elsewhere."""
    problem = None
    if shutil.which("sbatch") is None:
        problem = "sbatch not found"
    else:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
        if "is UP" not in ping.stdout:
            problem = f"no Slurm controller answers: {ping.stdout.strip()} {ping.stderr.strip()}"
    if problem:
        message = f"{problem} (start one with: slurm/local-cluster.sh start)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def quickstart_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm") / "shards"
    cmd = [_ecgfm(), "shard", "--config", "recipes/quickstart/shard.yaml", "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return out


def _job_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "slurm_probe.py").write_text(PROBE)
    env = dict(os.environ, ECGFM=_ecgfm(), PYTHONPATH=str(tmp_path), PYTHONUNBUFFERED="1")
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}  # a job of its own, even inside salloc


def _submit(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"sbatch failed: {done.stderr}"
    return done.stdout.strip().split(";")[0]


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _job_states(job_id: str) -> dict[str, tuple[str, str]]:
    """{job id, or ARRAYID_TASK for array tasks: (state, exit code)} from scontrol (no accounting needed)."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    states = {}
    for line in shown.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        name = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}" if "ArrayTaskId" in fields else fields["JobId"]
        states[name] = (fields["JobState"], fields["ExitCode"])
    return states


def _wait(job_id: str) -> dict[str, tuple[str, str]]:
    """Poll until the job (every task of an array) has finished; returns its states."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        states = _job_states(job_id)
        if states and all(state in FINAL_STATES for state, _ in states.values()):
            return states
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} not finished after {JOB_TIMEOUT_S} s ({states}); cancelled")
        time.sleep(1)


def _common(shards: Path, run_dir: Path | None = None) -> list[str]:
    args = [
        f"--data.root={shards}",
        "--model.backbone=net1d-tiny",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
    ]
    if run_dir is not None:
        args += [f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir / 'logs'}"]
    return args


def test_train_sbatch_runs_the_quickstart_recipe_on_two_cpu_ranks(slurm, quickstart_shards, tmp_path):
    from ecgfm.tasks import FineTuneTask

    log = tmp_path / "train.out"
    args = [
        "--gres=none",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--time=15:00",
        f"--output={log}",
        "slurm/train.sbatch",
        RECIPE,
        "--config",
        "recipes/_base/ddp-cpu.yaml",
        *_common(quickstart_shards, tmp_path / "run"),
        "--trainer.callbacks+="
        + json.dumps({"class_path": "slurm_probe.SlurmProbe", "init_args": {"out": str(tmp_path)}}),
    ]
    job = _submit(args, _job_env(tmp_path))
    states = _wait(job)
    text = log.read_text()
    assert states[job] == ("COMPLETED", "0:0"), f"job {job}: {states[job]}\n{text[-4000:]}"

    # the script's header and Lightning's own lines: both ranks, gloo, and the Slurm signal handlers
    assert f"== ecgfm train.sbatch: job {job}" in text
    assert "tasks: 2 (2 per node)" in text and f"recipe: {RECIPE}" in text
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in text
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert "distributed_backend=gloo" in text
    assert text.count("SLURM auto-requeueing enabled. Setting signal handlers.") == 2
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in text
    assert "Traceback" not in text and f"job {job} finished with exit code 0" in text

    # each rank: Lightning took the allocation from Slurm, and trained on its half of the batches
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for rank, info in enumerate(ranks):
        assert info["global_rank"] == rank and info["world_size"] == 2
        assert info["slurm_procid"] == str(rank) and info["slurm_job_id"] == job
        assert info["cluster_environment"] == "SLURMEnvironment"
        assert info["strategy"] == "DDPStrategy" and info["backend"] == "gloo"
        assert info["batches"] > 0
    assert ranks[0]["batches"] == ranks[1]["batches"]
    first, second = (set(info["records"]) for info in ranks)  # the first epoch's training records
    assert len(first) == len(second) > 0 and not first & second, "the ranks must train on disjoint halves"

    checkpoints = sorted((tmp_path / "run" / "logs").rglob("last.ckpt"))
    assert len(checkpoints) == 1
    task = FineTuneTask.load_from_checkpoint(checkpoints[0], map_location="cpu")
    assert task.hparams.backbone == "net1d-tiny" and "diagnoses" in task.heads
    config = yaml.safe_load(checkpoints[0].parents[1].joinpath("config.yaml").read_text())
    assert config["trainer"]["num_nodes"] == 1 and int(config["trainer"]["devices"]) == 2


def test_sweep_array_runs_each_line_in_its_own_run_directory(slurm, quickstart_shards, tmp_path):
    import torch

    sweep = REPO / "slurm" / "sweeps" / "quickstart-lr.txt"
    lines = [x for x in sweep.read_text().splitlines() if x.strip() and not x.lstrip().startswith("#")]
    assert len(lines) == 2
    env = _job_env(tmp_path)
    env["ECGFM_SWEEP_DIR"] = str(tmp_path / "sweep")
    args = [
        "--array=0-2",  # task 2 is past the file's 2 lines: it must fail and say so
        "--gres=none",
        "--cpus-per-task=1",
        "--time=15:00",
        f"--output={tmp_path}/sweep-%a.out",
        "slurm/sweep.sbatch",
        RECIPE,
        str(sweep.relative_to(REPO)),
        "--config",
        "recipes/_base/cpu.yaml",
        *_common(quickstart_shards),
        "--trainer.max_epochs=1",
    ]
    job = _submit(args, env)
    states = _wait(job)
    logs = [(tmp_path / f"sweep-{i}.out").read_text() for i in range(3)]
    for i in (0, 1):
        assert states[f"{job}_{i}"] == ("COMPLETED", "0:0"), f"task {i}: {states}\n{logs[i][-4000:]}"
        assert f"line {i}: {lines[i]}" in logs[i] and "SLURM auto-requeueing enabled" in logs[i]
    assert states[f"{job}_2"][0] == "FAILED"
    assert "array task 2, but slurm/sweeps/quickstart-lr.txt has 2 override line(s)" in logs[2]

    learning_rates = set()
    for i in (0, 1):
        run_dir = tmp_path / "sweep" / f"task-{i}"
        assert (run_dir / "overrides.txt").read_text().strip() == lines[i]
        (config_file,) = run_dir.rglob("config.yaml")
        config = yaml.safe_load(config_file.read_text())
        lr = float(re.search(r"--model\.lr=(\S+)", lines[i]).group(1))
        assert config["model"]["lr"] == pytest.approx(lr)
        (checkpoint,) = run_dir.rglob("last.ckpt")
        stored = torch.load(checkpoint, map_location="cpu", weights_only=False)
        assert stored["hyper_parameters"]["lr"] == pytest.approx(lr)
        learning_rates.add(lr)
    assert len(learning_rates) == 2
