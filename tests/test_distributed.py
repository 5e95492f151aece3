"""Data-parallel training: with 2 ranks every training segment of an epoch is trained on exactly once (less the
documented remainder, ``len % 2``), in real 2-process DDP runs on the CPU (gloo) started by Lightning's launcher from
the ``ecgfm`` script and from ``python -m ecgfm``, and by torchrun; a killed 2-rank run resumes on both ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
ECGFM = Path(sys.executable).parent / "ecgfm"


class SampleLog(Callback):
    """Appends one JSON line per training batch to ``<folder>/samples-rank<R>.jsonl``: process id, epoch, batch
    index, the global step after it, and the batch's record ids (written at once: a killed run's lines are there)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = {
            "pid": os.getpid(),
            "epoch": trainer.current_epoch,
            "batch": batch_idx,
            "step": trainer.global_step,
            "ids": list(batch["record_id"]),
        }
        with open(self.folder / f"samples-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trained_ids(samples: Path, epoch: int) -> list[str]:
    return [i for row in read_samples(samples) if row["epoch"] == epoch for i in row["ids"]]


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory) -> tuple[Path, int]:
    """301 synthetic segments, one per patient, and a split seed that leaves an odd number of training segments
    (so 2 ranks have a remainder to drop)."""
    from ecgfm.data.datamodule import ShardDataModule
    from ecgfm.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("odd-shards")
    write_synthetic_shards(root, 301, seed=1, segments_per_shard=64, segments_per_patient=1, progress=False)
    for split_seed in range(50):
        splits = ShardDataModule(str(root), val_fraction=0.15, test_fraction=0.15, split_seed=split_seed)
        if len(splits.split_indices()["train"]) % 2:
            return root, split_seed
    raise AssertionError("no split seed gives an odd training split")


def training_record_ids(root: Path, split_seed: int) -> list[str]:
    from ecgfm.data.datamodule import ShardDataModule

    data = ShardDataModule(str(root), val_fraction=0.15, test_fraction=0.15, split_seed=split_seed)
    data.setup("fit")
    train = data.datasets["train"]
    return list(train.__getitems__(list(range(len(train))))["record_id"])


def write_ddp_config(folder: Path, save_last_every_n_steps: int = 3) -> Path:
    """The potassium recipe, small, on 2 CPU processes (gloo): 2 epochs of 7 batches of 16 per rank."""
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": "ddp",
            "max_epochs": 2,
            "limit_val_batches": 2,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "ecgfm.checkpointing.ResumableCheckpoint",
                    "init_args": {"save_top_k": 0, "save_last_every_n_steps": save_last_every_n_steps},
                },
                {"class_path": "test_distributed.SampleLog", "init_args": {"folder": str(folder / "samples")}},
            ],
        },
        "model": {"backbone": "net1d-tiny", "preprocessing": "zscore"},
        "data": {"batch_size": 16, "val_fraction": 0.15, "test_fraction": 0.15},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ddp.yaml").write_text(yaml.safe_dump(config))
    return folder / "ddp.yaml"


def ddp_args(folder: Path, root: Path, split_seed: int) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / "recipes" / "potassium" / "net1d-small.yaml"),
        "--config",
        str(write_ddp_config(folder)),
        f"--data.root={root}",
        f"--data.split_seed={split_seed}",
        f"--trainer.default_root_dir={folder / 'out'}",
        f"--trainer.logger.init_args.save_dir={folder / 'logs'}",
    ]


def ddp_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ECGFM_RUN_PLAN"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small machine
    return env


def run(command: list[str], folder: Path, name: str, env: dict[str, str] | None = None) -> str:
    with open(folder / f"{name}.log", "w") as log:
        code = subprocess.run(
            command, env=env or ddp_env(), cwd=folder, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    output = (folder / f"{name}.log").read_text()
    assert code == 0, f"{name} ended with {code}:\n{output[-4000:]}"
    return output


def console_script() -> str:
    script = ECGFM if ECGFM.is_file() else shutil.which("ecgfm")
    if not script:
        pytest.skip("the ecgfm console script is not installed (pip install -e .)")
    return str(script)


@pytest.fixture(scope="module")
def ddp_reference(odd_shards, tmp_path_factory) -> Path:
    """A 2-process run started by Lightning's launcher from the `ecgfm` console script (which re-runs it)."""
    root, split_seed = odd_shards
    folder = tmp_path_factory.mktemp("ddp")
    run([console_script(), *ddp_args(folder, root, split_seed)], folder, "ddp")
    return folder


def assert_each_epoch_sees_every_segment_once(folder: Path, expected: list[str], epochs: int) -> None:
    world = 2
    for epoch in range(epochs):
        per_rank = [trained_ids(folder / "samples" / f"samples-rank{r}.jsonl", epoch) for r in range(world)]
        assert [len(ids) for ids in per_rank] == [len(expected) // world] * world
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a segment was trained on twice"
        assert set(seen) <= set(expected)
        assert len(set(expected) - set(seen)) == len(expected) % world == 1  # the documented remainder, dropped


def test_two_ranks_train_on_every_segment_of_an_epoch_once(ddp_reference, odd_shards):
    expected = training_record_ids(*odd_shards)
    assert len(expected) % 2 == 1 and len(set(expected)) == len(expected)
    assert_each_epoch_sees_every_segment_once(ddp_reference, expected, epochs=2)
    rank0 = [trained_ids(ddp_reference / "samples" / "samples-rank0.jsonl", e) for e in (0, 1)]
    assert set(rank0[0]) != set(rank0[1])  # ranks get different parts each epoch
    checkpoint = torch.load(
        ddp_reference / "logs" / "potassium" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert checkpoint["global_step"] == 2 * -(-(len(expected) // 2) // 16)  # 2 epochs of ceil(99 / 16) steps


def test_torchrun_starts_the_same_recipe(odd_shards, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed beside this Python")
    root, split_seed = odd_shards
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", console_script()]
    run([*command, *ddp_args(tmp_path, root, split_seed), "--trainer.max_epochs=1"], tmp_path, "torchrun")
    assert_each_epoch_sees_every_segment_once(tmp_path, training_record_ids(root, split_seed), epochs=1)
    assert [p.name for p in (tmp_path / "logs" / "potassium").iterdir()] == ["version_0"]  # both ranks agreed


def test_a_killed_two_rank_run_resumes_each_rank_where_it_stopped(ddp_reference, odd_shards, tmp_path):
    """Started as `python -m ecgfm` (Lightning's launcher re-runs the module), killed mid-epoch with all its
    processes, restarted with the same command: both ranks continue their own part of the epoch."""
    root, split_seed = odd_shards
    command = [sys.executable, "-m", "ecgfm", *ddp_args(tmp_path, root, split_seed)]
    last = tmp_path / "logs" / "potassium" / "version_0" / "checkpoints" / "last.ckpt"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            command, env=ddp_env(), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while not (last.exists() and torch.load(last, weights_only=True)["global_step"] >= 3):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = torch.load(last, weights_only=True)["global_step"]
    output = run(command, tmp_path, "restarted")
    assert f"(global step {saved})" in output
    final = torch.load(last, weights_only=True)
    reference = torch.load(
        ddp_reference / "logs" / "potassium" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert final["global_step"] == reference["global_step"] and final["lr_schedulers"] == reference["lr_schedulers"]
    for rank in range(2):
        resumed = trained_sequence(tmp_path / "samples" / f"samples-rank{rank}.jsonl")
        assert resumed == trained_sequence(ddp_reference / "samples" / f"samples-rank{rank}.jsonl"), rank


def trained_sequence(samples: Path) -> list[tuple[int, int, list[str]]]:
    """(epoch, step, ids) that count: a restarted process replaces what the killed one did after its checkpoint."""
    sequence: list[tuple[int, int, list[str]]] = []
    pid = None
    for row in read_samples(samples):
        if row["pid"] != pid:
            pid = row["pid"]
            sequence = [s for s in sequence if s[1] < row["step"]]
        sequence.append((row["epoch"], row["step"], row["ids"]))
    return sequence
