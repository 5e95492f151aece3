"""The learning-rate structure of fine-tuning: layer-wise lr decay, warm-up before the cosine, gradual unfreezing,
LP-FT in one resumable run (killed in its fine-tuning phase, it resumes there, with the steps and weights of a run
never stopped), and Net1D's stochastic depth; the recipes and the page that show them run."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from test_distributed import trained_sequence
from test_docs import expected_prints, python_blocks
from test_resume import (
    assert_same_as_reference,
    child_env,
    fit_command,
    run_to_end,
    start,
    step_of,
    write_test_config,
)

from ecgfm.backbones import create_backbone
from ecgfm.checkpointing import ResumableCheckpoint
from ecgfm.commands import main
from ecgfm.data.convert import convert
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.finetune.schedule import BlockSchedule, BlockUnfreezing, cosine_with_warmup, param_groups, warmup_length
from ecgfm.heads import MultiLabelHead, PotassiumHead
from ecgfm.tasks import FineTuneTask

REPO = Path(__file__).resolve().parents[1]
KILL_ENV = "ECGFM_TEST_KILL_AT_STEP"
TINY_BLOCKS = ("first_conv", "stage_list.0", "stage_list.1")


def conditions_task(**options) -> FineTuneTask:
    head = MultiLabelHead(name="conditions", target="dx", labels=["a", "b"])
    return FineTuneTask(heads=[head], preprocessing="none", **{"backbone": "net1d-small", **options})


def names_of(task: FineTuneTask, params: list[torch.nn.Parameter]) -> list[str]:
    names = {id(p): n for n, p in task.named_parameters()}
    return [names[id(p)] for p in params]


# ----------------------------------------------------------------------------------------------- layer-wise lr decay
def test_layer_decay_gives_each_net1d_small_block_its_rate():
    task = conditions_task(lr=1e-3, backbone_lr_scale=0.5, layer_decay=0.5)
    groups = param_groups(task)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("heads", 1e-3),
        ("backbone.first_conv", 1.5625e-05),
        ("backbone.stage_list.0", 3.125e-05),
        ("backbone.stage_list.1", 6.25e-05),
        ("backbone.stage_list.2", 1.25e-04),
        ("backbone.stage_list.3", 2.5e-04),
        ("backbone.stage_list.4", 5e-04),  # the last block: lr * backbone_lr_scale
    ]
    assert names_of(task, groups[1]["params"]) == ["backbone.first_conv.conv.weight", "backbone.first_conv.conv.bias"]
    for i, group in enumerate(groups[2:]):
        names = names_of(task, group["params"])
        assert len(names) == 10 and all(n.startswith(f"backbone.stage_list.{i}.") for n in names)  # BNs: unused
    assert names_of(task, groups[0]["params"]) == [
        "heads.conditions.classifier.1.weight",
        "heads.conditions.classifier.1.bias",
    ]
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert sorted(n for g in groups for n in names_of(task, g["params"])) == sorted(trainable)  # each once

    # with BatchNorm used, Net1D's first_bn is in no block: it goes with the first one, at its rate
    with_bn = conditions_task(lr=1e-3, layer_decay=0.5, backbone_kwargs={"use_bn": True})
    first = param_groups(with_bn)[1]
    assert first["lr"] == 1e-3 * 0.5**5
    assert names_of(with_bn, first["params"]) == [
        "backbone.first_conv.conv.weight",
        "backbone.first_conv.conv.bias",
        "backbone.first_bn.weight",
        "backbone.first_bn.bias",
    ]

    plain = conditions_task(lr=1e-3, backbone_lr_scale=0.5)  # no layer_decay: one backbone group, as before
    assert [(g["name"], g["lr"]) for g in param_groups(plain)] == [("heads", 1e-3), ("backbone", 5e-4)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer_decay": 0.0}, r"layer_decay must be in \(0, 1\], got 0.0"),
        ({"layer_decay": 0.5, "finetune": "linear_probe"}, "layer_decay needs a backbone that trains"),
        ({"warmup_steps": 10, "scheduler": "plateau"}, "warmup_steps needs scheduler: cosine"),
        ({"warmup_steps": 1.5}, "warmup_steps must be a whole number of steps >= 0 or a fraction"),
        ({"finetune": "lp_ft"}, "finetune: lp_ft needs lp_epochs >= 1"),
        ({"lp_epochs": 2}, "lp_epochs \\(2\\) needs finetune: lp_ft"),
        ({"finetune": "lp_ft", "lp_epochs": 1, "unfreeze_schedule": [1]}, "give lp_ft or unfreeze_schedule"),
        ({"finetune": "linear_probe", "unfreeze_schedule": [1]}, "unfreeze_schedule needs finetune: full"),
        ({"unfreeze_schedule": {0: 3, 2: 1}}, "epoch 2 trains 1 blocks, fewer than the 3 of an earlier epoch"),
        ({"unfreeze_schedule": {1: 7}}, r"blocks to train must be 0..6 or 'all', got 7"),
        ({"unfreeze_schedule": {-1: 1}}, "an epoch must be a whole number >= 0, got -1"),
        ({"unfreeze_schedule": [2, 1]}, r"the epochs must increase, got \[2, 1\]"),
        ({"unfreeze_schedule": list(range(7))}, "unfreezes 7 blocks; the backbone has 6"),
    ],
)
def test_wrong_options_are_one_line_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        conditions_task(**options)


# ----------------------------------------------------------------------------------------------- warm-up
def test_linear_warmup_then_cosine_per_step():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    scheduler = cosine_with_warmup(optimizer, total_steps=10, warmup_steps=4)
    seen = []
    for _ in range(11):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = [0.0, 0.25, 0.5, 0.75] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]
    assert [a for a, _ in seen] == pytest.approx(expected, abs=1e-12)
    assert [b for _, b in seen] == pytest.approx([0.1 * e for e in expected], abs=1e-12)  # each group its own lr
    assert seen[4][0] == 1.0 and seen[10][0] == pytest.approx(0.0, abs=1e-12)

    plain = cosine_with_warmup(torch.optim.AdamW([params[0]], lr=1.0), total_steps=10, warmup_steps=0)
    assert type(plain) is torch.optim.lr_scheduler.CosineAnnealingLR  # runs from before warm-up resume as they were

    assert warmup_length(0.1, 250) == 25 and warmup_length(5, 250) == 5 and warmup_length(0, 1) == 0
    with pytest.raises(ValueError, match=r"warmup_steps \(250\) must be fewer than the run's 250 optimizer steps"):
        warmup_length(250, 250)


# ----------------------------------------------------------------------------------------------- gradual unfreezing
def test_schedules_count_blocks_from_the_top_by_epoch():
    every = lambda s: [s.trainable(e) for e in range(6)]  # noqa: E731
    assert every(BlockSchedule.from_options("full", 0, {1: 2, 3: "all"}, 6)) == [0, 2, 2, 6, 6, 6]
    assert every(BlockSchedule.from_options("full", 0, {"0": 1, "4": 3}, 6)) == [1, 1, 1, 1, 3, 3]  # keys from JSON
    assert every(BlockSchedule.from_options("full", 0, [1, 2, 4], 6)) == [0, 1, 2, 2, 3, 3]
    assert every(BlockSchedule.from_options("lp_ft", 2, None, 6)) == [0, 0, 6, 6, 6, 6]
    assert BlockSchedule.from_options("full", 0, None, 6) is None


def block_state(task: FineTuneTask) -> tuple[list[bool], list[bool], bool]:
    """(requires_grad of each block's weights, training flag of each block, whether the adapter trains)."""
    blocks = [task.backbone.get_submodule(name) for name in task.backbone_config.blocks]
    grads = [all(p.requires_grad for n, p in b.named_parameters() if ".bn" not in n) for b in blocks]
    return grads, [b.training for b in blocks], task.adapter.training


def test_unfreezing_follows_the_epoch_alone_also_in_a_restored_task():
    def fresh() -> FineTuneTask:
        # a lead adapter with weights: it is frozen (and in eval) while the first block is
        return conditions_task(
            backbone="net1d-tiny", leads=["I", "II"], adapter="projection", unfreeze_schedule=[1, 2, 3]
        )

    task = fresh()
    (callback,) = [c for c in task.configure_callbacks() if isinstance(c, BlockUnfreezing)]
    task.train()
    unused = [p for p in task.backbone.parameters_unused_by_features()]
    states = {}
    for epoch in range(4):
        trainer = SimpleNamespace(current_epoch=epoch, world_size=1)
        callback.on_train_batch_start(trainer, task, None, 0)
        states[epoch] = block_state(task)
        task.train()  # as Lightning's loops do after validation: the frozen blocks stay in eval
        assert block_state(task) == states[epoch]
        adapter_grads = {p.requires_grad for p in task.adapter.parameters()}
        assert adapter_grads == {epoch >= 3}
        assert not any(p.requires_grad for p in unused)  # frozen for good: never unfrozen by the schedule
        assert task.heads.training and all(p.requires_grad for p in task.heads.parameters())
    assert states == {
        0: ([False, False, False], [False, False, False], False),
        1: ([False, False, True], [False, False, True], False),
        2: ([False, True, True], [False, True, True], False),
        3: ([True, True, True], [True, True, True], True),
    }

    restored = fresh()  # a resumed run: the same state straight from the epoch it resumes in
    (again,) = [c for c in restored.configure_callbacks() if isinstance(c, BlockUnfreezing)]
    restored.train()
    again.on_train_start(SimpleNamespace(current_epoch=2, world_size=1), restored)
    assert block_state(restored) == states[2]


def test_in_a_distributed_run_frozen_blocks_keep_requires_grad_and_lose_their_gradients():
    task = conditions_task(backbone="net1d-tiny", finetune="lp_ft", lp_epochs=1)
    (callback,) = [c for c in task.configure_callbacks() if isinstance(c, BlockUnfreezing)]
    used = [p for p in task.backbone.parameters() if p.requires_grad]  # all but the weights the features never read
    callback.on_train_start(SimpleNamespace(current_epoch=0, world_size=2), task)  # DDP wraps what requires grad
    assert all(p.requires_grad for p in used) and not task.backbone.training
    task(torch.zeros(2, 12, 5000))["conditions"].sum().backward()
    assert all(p.grad is not None for p in used)
    callback.on_before_optimizer_step(SimpleNamespace(current_epoch=0, world_size=2), task, None)
    assert all(p.grad is None for p in used) and all(p.grad is not None for p in task.heads.parameters())
    assert len(param_groups(task)) == 2  # heads and backbone, as in a single-process run


class Recorder(Callback):
    """What each training batch sees: the epoch, the block state, the optimizer's groups and lrs."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.epoch_ends: list[dict] = []
        self.epoch_weights: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self._start: dict[str, torch.Tensor] | None = None  # a run resumed mid-epoch has no epoch start

    @staticmethod
    def weights(task: FineTuneTask) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in task.backbone.named_parameters()}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self.weights(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        self.batches.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "state": block_state(pl_module),
                "groups": [(g["name"], [id(p) for p in g["params"]]) for g in optimizer.param_groups],
                "lrs": {g["name"]: g["lr"] for g in optimizer.param_groups},
            }
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        with_state = {id(p) for p in optimizer.state if optimizer.state[p]}
        parts = {"backbone": pl_module.backbone, "heads": pl_module.heads}
        self.epoch_ends.append({k: any(id(p) in with_state for p in m.parameters()) for k, m in parts.items()})
        if self._start is not None:
            self.epoch_weights.append((trainer.current_epoch, self._start, self.weights(pl_module)))


class Crash(RuntimeError):
    """The training process dies here."""


class CrashAtStep(Callback):
    """Raises :class:`Crash` at the start of the batch after global step ``step``: after that step's last.ckpt."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"killed after step {self.step}")


def tiny_fit(task: FineTuneTask, shards: Path, folder: Path, recorder: Callback, ckpt_path=None, **trainer_args):
    trainer = L.Trainer(
        max_epochs=trainer_args.pop("max_epochs", 3),
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
        callbacks=[recorder, ResumableCheckpoint(dirpath=folder / "ckpt", save_top_k=0, save_last_every_n_steps=1)],
        **trainer_args,
    )
    data = ShardDataModule(str(shards), batch_size=8, val_fraction=0.15, test_fraction=0.15)
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def potassium_task(**options) -> FineTuneTask:
    heads = [PotassiumHead(name="potassium", target="potassium")]
    return FineTuneTask(backbone="net1d-tiny", preprocessing="zscore", heads=heads, **options)


def test_unfreeze_schedule_in_training_and_after_a_restore(synthetic_shards, tmp_path):
    L.seed_everything(0)
    recorder = Recorder()
    tiny_fit(potassium_task(unfreeze_schedule={1: 1, 2: "all"}), synthetic_shards, tmp_path / "a", recorder)
    by_epoch = {
        0: ([False] * 3, [False] * 3, False),
        1: ([False, False, True], [False, False, True], False),
        2: ([True] * 3, [True] * 3, True),
    }
    assert [(b["epoch"], b["state"]) for b in recorder.batches] == [(e, by_epoch[e]) for e in range(3) for _ in "abc"]
    for epoch, before, after in recorder.epoch_weights:  # frozen blocks' weights do not move, not even by decay
        for n, value in after.items():
            moved = not torch.equal(value, before[n])
            trains = any(n.startswith(f"{block}.") for block in TINY_BLOCKS[3 - by_epoch[epoch][0].count(True) :])
            assert moved == (trains and ".bn" not in n and not n.startswith("dense")), (epoch, n)
    assert len({str(b["groups"]) for b in recorder.batches}) == 1  # the same groups in every phase

    # killed after step 4 (epoch 1, batch 0) and restored: the batches from there see what the first run saw
    L.seed_everything(0)
    with pytest.raises(Crash):
        tiny_fit(potassium_task(unfreeze_schedule={1: 1, 2: "all"}), synthetic_shards, tmp_path / "b", CrashAtStep(4))
    resumed = Recorder()
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    assert step_of(ckpt) == 4
    tiny_fit(potassium_task(unfreeze_schedule={1: 1, 2: "all"}), synthetic_shards, tmp_path / "b", resumed, ckpt)
    assert [(b["epoch"], b["step"]) for b in resumed.batches] == [(1, 4), (1, 5), (2, 6), (2, 7), (2, 8)]
    original = {b["step"]: b for b in recorder.batches}
    for batch in resumed.batches:
        assert batch["state"] == original[batch["step"]]["state"], batch["step"]
        assert batch["lrs"] == pytest.approx(original[batch["step"]]["lrs"]), batch["step"]


# ----------------------------------------------------------------------------------------------- LP-FT
def test_lp_ft_probes_then_fine_tunes_with_the_same_param_groups(synthetic_shards, tmp_path):
    L.seed_everything(0)
    recorder = Recorder()
    task = potassium_task(finetune="lp_ft", lp_epochs=1, layer_decay=0.5, warmup_steps=2, lr=0.01)
    tiny_fit(task, synthetic_shards, tmp_path, recorder, max_epochs=2)
    assert [(b["epoch"], b["state"]) for b in recorder.batches[::3]] == [
        (0, ([False] * 3, [False] * 3, False)),  # the probe: backbone and adapter frozen, in eval mode
        (1, ([True] * 3, [True] * 3, True)),
    ]
    assert len({str(b["groups"]) for b in recorder.batches}) == 1
    assert [name for name, _ in recorder.batches[0]["groups"]] == ["heads", *(f"backbone.{b}" for b in TINY_BLOCKS)]
    # AdamW keeps no state for frozen weights: after the probe only the heads have any
    assert recorder.epoch_ends == [{"backbone": False, "heads": True}, {"backbone": True, "heads": True}]
    (_, before, after), _ = recorder.epoch_weights
    assert all(torch.equal(before[n], after[n]) for n in before)  # the probe leaves the backbone as it was
    # warm-up over 2 of the 6 steps, then the cosine; each block at its layer-wise rate
    factors = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    for batch, factor in zip(recorder.batches, factors, strict=True):
        assert batch["lrs"]["heads"] == pytest.approx(0.01 * factor)
        assert batch["lrs"]["backbone.first_conv"] == pytest.approx(0.01 * 0.25 * factor)


class KillAtStep(Callback):
    """SIGKILLs its process group at the start of the batch after global step ``$ECGFM_TEST_KILL_AT_STEP`` (if set):
    a run killed at a known moment, right after the ``last.ckpt`` of that step (as test_resume kills from outside)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        at = os.environ.get(KILL_ENV)
        if at and trainer.global_step == int(at):
            os.killpg(os.getpgid(0), signal.SIGKILL)


def lp_ft_config(folder: Path) -> Path:
    """test_resume's small potassium run as LP-FT: 7 batches of probing, then 7 of fine-tuning (an odd number: an
    epoch ending on a step-triggered last.ckpt would write no best-*.ckpt, which assert_same_as_reference counts)."""
    path = write_test_config(folder, save_last_every_n_steps=2)
    config = yaml.safe_load(path.read_text())
    config["model"].update(finetune="lp_ft", lp_epochs=1, layer_decay=0.8, warmup_steps=0.25)
    config["trainer"].update(limit_train_batches=7, limit_val_batches=1)
    config["trainer"]["callbacks"].append({"class_path": "test_lr_structure.KillAtStep"})
    config["data"]["batch_size"] = 8
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow  # a minute on 2 cores: CI runs it once with the slow tests
def test_lp_ft_killed_in_its_fine_tuning_phase_resumes_there(synthetic_shards, tmp_path):
    ref = tmp_path / "reference"
    run_to_end(fit_command(ref, synthetic_shards, lp_ft_config(ref)), child_env(ref), ref, "reference")
    last = ref / "logs" / "potassium" / "version_0" / "checkpoints" / "last.ckpt"
    reference = {
        "checkpoint": torch.load(last, map_location="cpu", weights_only=True),
        "sequence": trained_sequence(ref / "samples" / "samples-rank0.jsonl"),
    }
    assert reference["checkpoint"]["global_step"] == len(reference["sequence"]) == 14

    folder = tmp_path / "killed"
    command = fit_command(folder, synthetic_shards, lp_ft_config(folder))
    proc = start(command, child_env(folder, **{KILL_ENV: "10"}), folder, "killed")
    assert proc.wait(timeout=300) == -signal.SIGKILL
    last = folder / "logs" / "potassium" / "version_0" / "checkpoints" / "last.ckpt"
    assert step_of(last) == 10  # epoch 1, the fine-tuning phase: steps 8-14
    output = run_to_end(command, child_env(folder), folder, "restarted")
    assert f"from {last} (global step 10)" in output
    assert "epoch 1: 3 of 3 backbone blocks train" in output and "0 of 3" not in output
    checkpoint = assert_same_as_reference(folder, reference)  # steps, epoch, lr schedule, batches and weights
    assert checkpoint["global_step"] == 14


# ----------------------------------------------------------------------------------------------- stochastic depth
def test_stochastic_depth_off_is_the_network_itself_and_on_acts_only_in_training():
    torch.manual_seed(0)
    plain = create_backbone("net1d-small")
    off = create_backbone("net1d-small", drop_path=0.0)
    on = create_backbone("net1d-small", drop_path=0.3)
    off.load_state_dict(plain.state_dict())
    on.load_state_dict(plain.state_dict())  # no new weights
    assert off.model_config == plain.model_config and "drop_path" not in plain.model_config.architecture
    assert on.model_config.architecture["drop_path"] == 0.3
    assert create_backbone(on.model_config).model_config == on.model_config  # its stored config rebuilds it
    assert [b.drop_path.p if b.drop_path else 0.0 for s in on.stage_list for b in s.block_list] == pytest.approx(
        [0.0, 0.075, 0.15, 0.225, 0.3]  # linear over depth
    )
    x = torch.randn(8, 12, 5000)
    with torch.no_grad():
        for model in (plain, off, on):
            model.train()
        reference = plain(x)
        assert torch.equal(off(x), reference)
        torch.manual_seed(1)
        assert not torch.allclose(on(x), reference, atol=1e-3)
        for model in (plain, on):
            model.eval()
        assert torch.equal(on(x), plain(x))
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\), got 1.0"):
        create_backbone("net1d-small", drop_path=1.0)


# ----------------------------------------------------------------------------------------------- recipes and docs
@pytest.fixture(scope="module")
def challenge_shards(test_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("challenge-shards")
    summary = convert(test_data / "cinc2021", out, reader="challenge", progress=False)
    assert summary.records_read == 20 and not summary.skipped
    return out


@pytest.mark.parametrize("recipe", ["finetune/llrd.yaml", "finetune/lp-ft.yaml"])
def test_the_recipes_keep_the_conditions_data_and_run(recipe, challenge_shards, tmp_path):
    ours = yaml.safe_load((REPO / "recipes" / recipe).read_text())
    base = yaml.safe_load((REPO / "recipes" / "conditions" / "net1d-small.yaml").read_text())
    assert ours["data"] == base["data"] and ours["model"]["heads"] == base["model"]["heads"]
    args = [
        "fit",
        "--config",
        str(REPO / "recipes" / recipe),
        f"--data.root={challenge_shards}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--model.backbone=net1d-tiny",
        *(["--model.lp_epochs=1"] if "lp-ft" in recipe else []),
    ]
    assert main(args) == 0


def test_the_page_example_runs_and_prints_what_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in python_blocks("learning-rates.md"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "learning-rates.md example", "exec"), {"__name__": "docs_learning_rates"})
        printed, expected = out.getvalue().splitlines(), expected_prints(block)
        assert len(printed) == len(expected), (printed, expected)
        for line, wanted in zip(printed, expected, strict=True):
            assert re.fullmatch(".*".join(re.escape(part) for part in wanted.split("...")), line), (line, wanted)
