"""``ecgfm bench train``: training samples/s of ``ecgfm fit``'s path against a plain PyTorch loop, in the same run.

Both paths train the same model (FineTuneTask's backbone, preprocessing chain and head, built from the same seed) on
the same batches (shards the benchmark writes with the synthetic generator, read through the same ShardDataModule and
ShardLoader, in the same order) with the same optimizer (AdamW, same lr and weight decay, constant lr), so the ratio
is what ecgfm and Lightning cost per step. The ecgfm path is a Lightning Trainer as a recipe sets it up (CSV logger
every 10 steps, progress bar, ResumableCheckpoint, model summary, AtomicCheckpointIO); a second one with all of those
off ("bare Lightning") and a profiled run of each path say where the difference goes. Runs alternate (ABBA); rates
are medians over ``repeats`` and the ratio is the median of each repeat's ecgfm/plain ratio; warm-up steps are not
timed. On a GPU it also measures bf16-mixed against fp32, ``torch.compile`` on and off, MFU from the model's FLOPs,
and whether the loader keeps up.
"""

from __future__ import annotations

import gc
import math
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.profilers import Profiler
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from ecgfm.adapters import Identity
from ecgfm.checkpointing import AtomicCheckpointIO, ResumableCheckpoint
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.heads import Head
from ecgfm.io import atomic_write_json
from ecgfm.signal import to_millivolts
from ecgfm.tasks import FineTuneTask

DEFAULT_BACKBONES = ("net1d-small", "ecgfounder-12lead")
QUICK_BACKBONES = ("net1d-tiny",)
#: The heads the benchmark can train, on targets the synthetic shards carry (labels given: built before the data).
HEADS: dict[str, dict[str, Any]] = {
    "potassium": {"kind": "potassium", "name": "potassium", "target": "potassium", "labels": ["potassium"]},
    "multilabel": {"kind": "multilabel", "name": "hyperkalemia", "target": "hyperkalemia", "labels": ["hyperkalemia"]},
}
GPU_ONLY = ("bf16-mixed", "torch.compile", "MFU", "GPU idle fraction")
#: Dense peak TFLOP/s per GPU (bf16, tf32, fp32), from the vendors' data sheets; the first name found in the device
#: name wins, so the more specific names come first. ``--peak_tflops`` overrides.
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.5, 378.0, 51.2),
    "H100 NVL": (835.5, 417.8, 59.8),
    "H100": (989.4, 494.7, 66.9),
    "GH200": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.1, 183.0, 91.6),
    "L40": (181.0, 90.5, 90.5),
    "L4": (121.0, 60.0, 30.3),
    "A10": (125.0, 62.5, 31.2),
    "RTX 4090": (165.2, 82.6, 82.6),
}
#: What a recipe's Trainer adds to the training loop, each of which ``run_ecgfm`` can leave out.
COMPONENTS = ("logger", "progress_bar", "checkpointing", "model_summary")
LOG_EVERY_N_STEPS = 10  # as the shipped recipes log
DATA_NEXT = "[_TrainingEpochLoop].train_dataloader_next"  # Lightning's profiler name for fetching the next batch


# ----------------------------------------------------------------- the two paths' model and data
def build_task(backbone: str, head: str, lr: float, weight_decay: float, seed: int) -> FineTuneTask:
    """The FineTuneTask both paths train (the plain loop uses its modules), seeded so every build is the same."""
    torch.manual_seed(seed)
    return FineTuneTask(
        backbone=backbone, heads=[dict(HEADS[head])], lr=lr, weight_decay=weight_decay, scheduler="none"
    )


class PlainModel(nn.Module):
    """What a plain PyTorch user writes: int16 µV -> mV -> the preprocessing chain -> backbone features -> head."""

    def __init__(self, task: FineTuneTask) -> None:
        super().__init__()
        if not isinstance(task.adapter, Identity) or task.leads != task.data_leads:
            raise ValueError(
                f"ecgfm bench train measures backbones that read the data's 12 leads as they are; "
                f"{task.backbone_config.name!r} reads {list(task.leads)} through adapter {task.adapter.config()}"
            )
        (name,) = task.heads
        self.preprocessing, self.backbone, self.head = task.preprocessing, task.backbone, task.heads[name]

    def forward(self, signal: Tensor, lead_mask: Tensor) -> Tensor:
        x = self.preprocessing(to_millivolts(signal), lead_mask)
        return self.head(self.backbone.forward_features(x))


def fit_head_statistics(head: Head, datamodule: ShardDataModule) -> None:
    """The constants a head learns from the training split before training, as FineTuneTask.setup fits them."""
    if head.uses_statistics and not bool(head.statistics_fitted):
        names = datamodule.target_specs[head.target].names
        head.fit_statistics(datamodule.target_summary(head.target).select([names.index(x) for x in head.labels]))
        head.statistics_fitted.fill_(True)


def write_bench_shards(folder: Path, batch: int, n_batches: int, seed: int) -> Path:
    """Synthetic shards whose training split holds at least ``n_batches`` batches (10 % each to val and test)."""
    from ecgfm.data.synthetic import write_synthetic_shards

    n_segments = int(math.ceil(n_batches * batch / 0.7)) + 64
    write_synthetic_shards(folder, n_segments, seed=seed, segments_per_shard=512, progress=False)
    dm = datamodule(folder, batch, 0, pin_memory=False)
    dm.setup("fit")
    if len(dm.datasets["train"]) < n_batches * batch:  # the patient split is by hash: check, do not assume
        raise RuntimeError(
            f"the training split holds {len(dm.datasets['train'])} segments, fewer than {n_batches} x {batch}"
        )
    return folder


def datamodule(root: Path, batch: int, num_workers: int, pin_memory: bool) -> ShardDataModule:
    """The same ShardDataModule for both paths (patient split 80/10/10, the training order's default seed)."""
    return ShardDataModule(
        str(root), batch_size=batch, num_workers=num_workers, val_fraction=0.1, test_fraction=0.1, pin_memory=pin_memory
    )


# ----------------------------------------------------------------- measuring
def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class MemoryWindow:
    """Peak CPU RSS (VmHWM, reset at the start where the kernel allows) and peak CUDA memory of one run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> MemoryWindow:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
            self.reset = True
        except OSError:
            self.reset = False
        self.rss_before_mib = _kib("VmRSS:") / 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_rss_mib = _kib("VmHWM:") / 1024
        self.cuda_peak_mib = (
            torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        )

    def numbers(self) -> dict[str, Any]:
        return {
            "peak_rss_mib": self.peak_rss_mib,
            "rss_before_mib": self.rss_before_mib,
            "peak_rss_is_of_this_run": self.reset,
            "cuda_max_allocated_mib": self.cuda_peak_mib,
        }


class StepClock:
    """Wall and CPU time of the timed steps (after ``warmup``), the losses, and on CUDA the GPU's gaps between steps.

    The window runs from the end of the last warm-up step to the end of the last step, both synchronised, so every
    per-step cost (fetching the batch, hooks, logging) is counted once per timed step on either path. The CUDA events
    are recorded at each step's start and end without synchronising: what lies between one step's end and the next
    one's start on the GPU stream is time the GPU had no training work (waiting for the batch, its copy, hooks).
    """

    def __init__(self, warmup: int, n_steps: int, device: torch.device) -> None:
        self.warmup, self.n_steps, self.device = warmup, n_steps, device
        self.cuda = device.type == "cuda"
        self.losses: list[Tensor] = []
        self.events: list[tuple[Any, Any]] = []
        self.t0 = self.t1 = None
        self.cpu0 = self.cpu1 = 0.0
        self.first: float | None = None  # when the first step started: what came before it is start-up
        self.steps = 0
        self.profilers: list[PhaseProfiler] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def step_start(self, index: int) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        if self.cuda and index >= self.warmup:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events.append((start, None))

    def step_end(self, index: int, loss: Tensor) -> None:
        self.steps += 1
        self.losses.append(loss.detach())
        if self.cuda and index >= self.warmup - 1:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if index == self.warmup - 1:
                self.events.append((None, end))
            else:
                self.events[-1] = (self.events[-1][0], end)
        if index == self.warmup - 1:
            self._sync()
            self.t0, self.cpu0 = time.perf_counter(), time.process_time()
            for profiler in self.profilers:
                profiler.active = True
        elif index == self.n_steps - 1:
            self._sync()
            self.t1, self.cpu1 = time.perf_counter(), time.process_time()
            for profiler in self.profilers:
                profiler.active = False

    def numbers(self, batch: int, started: float, ended: float) -> dict[str, Any]:
        """Rates over the timed window; ``started``/``ended``: when the run (``trainer.fit`` or the loop) began and
        returned, for its start-up (before the first step) and its end (epoch end, checkpoint, teardown)."""
        if self.t0 is None or self.t1 is None or self.first is None:
            raise RuntimeError(f"the run stopped after {self.steps} of {self.n_steps} steps")
        seconds = self.t1 - self.t0
        timed = self.n_steps - self.warmup
        losses = [float(x) for x in torch.stack(self.losses).float().cpu()]
        out = {
            "steps": self.steps,
            "timed_steps": timed,
            "seconds": seconds,
            "samples_per_s": timed * batch / seconds,
            "ms_per_step": 1e3 * seconds / timed,
            "cpu_ms_per_step": 1e3 * (self.cpu1 - self.cpu0) / timed,
            "losses": losses,
            "startup_seconds": self.first - started,
            "after_last_step_seconds": ended - self.t1,
        }
        if self.cuda and len(self.events) > 1:
            self._sync()
            total = self.events[0][1].elapsed_time(self.events[-1][1])
            busy = sum(start.elapsed_time(end) for start, end in self.events[1:])
            out["gpu_gap_fraction"] = max(0.0, total - busy) / total if total > 0 else float("nan")
        return out


class PhaseProfiler(Profiler):
    """Seconds per Lightning action over the timed steps only; ``actions=None`` records every action.

    With ``actions={DATA_NEXT}`` it only times fetching the next batch, a string comparison per hook otherwise, so it
    rides along in the measured runs. ``sync`` synchronises CUDA at every start and stop (profiled runs only), so
    that an action's time includes its GPU work.
    """

    def __init__(self, actions: set[str] | None = None, sync: bool = False) -> None:
        super().__init__()
        self.actions, self.sync = actions, sync
        self.active = False
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = defaultdict(float)

    def start(self, action_name: str) -> None:
        if self.actions is None or action_name in self.actions:
            if self.sync and self.active:
                torch.cuda.synchronize()
            self.started[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        if self.actions is None or action_name in self.actions:
            if self.sync and self.active:
                torch.cuda.synchronize()
            start = self.started.pop(action_name, None)
            if start is not None and self.active:
                self.seconds[action_name] += time.perf_counter() - start


class ClockCallback(L.Callback):
    """Feeds a StepClock from Lightning's batch hooks (after ``batch_to_device``, after the optimizer step)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self.clock.step_start(batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.clock.step_end(batch_idx, loss)


def _wrap(profiler: PhaseProfiler, name: str, function: Any) -> Any:
    """``function`` timed as the action ``name`` (the profiled run's view inside FineTuneTask._step)."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        profiler.start(name)
        try:
            return function(*args, **kwargs)
        finally:
            profiler.stop(name)

    return timed


# ----------------------------------------------------------------- the ecgfm path
def run_ecgfm(
    cfg: dict[str, Any],
    root: Path,
    workdir: Path,
    precision: str,
    compiled: bool,
    off: tuple[str, ...] = (),
    profiled: bool = False,
) -> dict[str, Any]:
    """One ``ecgfm fit``-style run (FineTuneTask + ShardDataModule + Trainer): steps/s over the timed window, memory.

    ``off`` names what to leave out (COMPONENTS: all of them is bare Lightning); ``profiled`` records every
    Lightning action and, inside the training step, ``forward``, ``self.log`` and the heads' ``update_metrics``.
    """
    device = cfg["device"]
    n_steps = cfg["warmup"] + cfg["steps"]
    clock = StepClock(cfg["warmup"], n_steps, device)
    profiler = PhaseProfiler(None if profiled else {DATA_NEXT}, sync=profiled and device.type == "cuda")
    clock.profilers.append(profiler)
    task = build_task(cfg["backbone"], cfg["head"], cfg["lr"], cfg["weight_decay"], cfg["seed"])
    if profiled:
        task.log = _wrap(profiler, "[ecgfm]FineTuneTask.log", task.log)
        task.forward = _wrap(profiler, "[ecgfm]FineTuneTask.forward", task.forward)
        task.preprocessing.forward = _wrap(profiler, "preprocessing", task.preprocessing.forward)
        for head in task.heads.values():
            head.update_metrics = _wrap(profiler, f"[ecgfm]{type(head).__name__}.update_metrics", head.update_metrics)
    dm = datamodule(root, cfg["batch"], cfg["num_workers"], pin_memory=device.type == "cuda")
    unknown = set(off) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"off names {sorted(unknown)}; it takes {list(COMPONENTS)}")
    callbacks: list[L.Callback] = [ClockCallback(clock)]
    if "checkpointing" not in off:
        callbacks.append(ResumableCheckpoint(save_last_every_n_steps=200))
    options = {
        "logger": False if "logger" in off else CSVLogger(str(workdir / "logs"), name="bench"),
        "enable_progress_bar": "progress_bar" not in off,
        "enable_checkpointing": "checkpointing" not in off,
        "enable_model_summary": "model_summary" not in off,
    }
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=n_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=LOG_EVERY_N_STEPS,
        default_root_dir=str(workdir),
        callbacks=callbacks,
        profiler=profiler,
        **options,
    )
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # as `ecgfm fit` installs it
    model = torch.compile(task) if compiled else task
    with MemoryWindow(device) as memory:
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        fit_seconds = time.perf_counter() - start
    out = {**clock.numbers(cfg["batch"], start, start + fit_seconds), **memory.numbers(), "fit_seconds": fit_seconds}
    out["global_step"] = int(trainer.global_step)
    out["trainable_parameters"] = sum(p.numel() for p in task.parameters() if p.requires_grad)
    out["data_wait_fraction"] = profiler.seconds.get(DATA_NEXT, 0.0) / out["seconds"]
    if profiled:
        out["actions_ms_per_step"] = {k: 1e3 * v / out["timed_steps"] for k, v in profiler.seconds.items()}
    return out


# ----------------------------------------------------------------- the plain PyTorch path
def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True)


def run_plain(
    cfg: dict[str, Any], root: Path, precision: str, compiled: bool, profiled: bool = False
) -> dict[str, Any]:
    """The same model, data and optimizer in a plain loop: next batch, to device, forward + loss, backward, step.

    ``profiled`` times each of those phases and the preprocessing chain (synchronising CUDA at each boundary).
    """
    device = cfg["device"]
    n_steps = cfg["warmup"] + cfg["steps"]
    clock = StepClock(cfg["warmup"], n_steps, device)
    profiler = PhaseProfiler(None if profiled else {DATA_NEXT}, sync=profiled and device.type == "cuda")
    clock.profilers.append(profiler)
    task = build_task(cfg["backbone"], cfg["head"], cfg["lr"], cfg["weight_decay"], cfg["seed"])
    dm = datamodule(root, cfg["batch"], cfg["num_workers"], pin_memory=device.type == "cuda")
    dm.setup("fit")
    plain = PlainModel(task)
    fit_head_statistics(plain.head, dm)
    plain = plain.to(device).train()
    if profiled:
        plain.preprocessing.forward = _wrap(profiler, "preprocessing", plain.preprocessing.forward)
    forward = torch.compile(plain) if compiled else plain
    params = [p for p in plain.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    bf16 = precision == "bf16-mixed"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    target_name = plain.head.target
    with MemoryWindow(device) as memory:
        start = time.perf_counter()
        loader: Iterator[Any] = iter(dm.train_dataloader())
        for index in range(n_steps):
            with profiler.profile(DATA_NEXT):
                batch = next(loader)
            with profiler.profile("to_device"):
                signal, lead_mask = _to(batch["signal"], device), _to(batch["lead_mask"], device)
                target = _to(batch["targets"][target_name], device).float()
                target_mask = _to(batch["target_masks"][target_name], device)
            clock.step_start(index)
            with profiler.profile("forward_loss"), autocast:
                loss = plain.head.loss(forward(signal, lead_mask), target, target_mask)
            with profiler.profile("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with profiler.profile("optimizer"):
                optimizer.step()
            clock.step_end(index, loss)
        del loader
        fit_seconds = time.perf_counter() - start
    out = {**clock.numbers(cfg["batch"], start, start + fit_seconds), **memory.numbers(), "fit_seconds": fit_seconds}
    out["global_step"] = clock.steps
    out["trainable_parameters"] = sum(p.numel() for p in params)
    out["data_wait_fraction"] = profiler.seconds.get(DATA_NEXT, 0.0) / out["seconds"]
    if profiled:
        out["actions_ms_per_step"] = {k: 1e3 * v / out["timed_steps"] for k, v in profiler.seconds.items()}
    return out


# ----------------------------------------------------------------- FLOPs and MFU
def flops_per_sample(backbone: str, head: str, seed: int, batch: int = 2) -> float:
    """Model FLOPs of one training sample (forward + backward, convolutions and matmuls), by FlopCounterMode on the
    CPU; the preprocessing chain's filters are counted where they are convolutions or matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    task = build_task(backbone, head, 1e-3, 0.0, seed)
    model = PlainModel(task).train()
    n_leads, n_samples = len(task.data_leads), task.input_contract.n_samples
    signal = torch.randint(-2000, 2000, (batch, n_leads, n_samples), dtype=torch.int16)
    mask = torch.ones(batch, n_leads, dtype=torch.bool)
    counter = FlopCounterMode(display=False)
    with counter:
        model(signal, mask).float().square().mean().backward()
    return counter.get_total_flops() / batch


def gpu_peak_tflops(device: torch.device, precision: str, given: float | None) -> tuple[float | None, str]:
    """The peak MFU is measured against: ``given``, else the table's dense peak for the GPU and precision."""
    if given is not None:
        return float(given), "--peak_tflops"
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32, fp32) in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            if precision.startswith("bf16"):
                return bf16, f"{key} dense bf16"
            if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
                return tf32, f"{key} dense tf32 (cuDNN/matmul TF32 allowed)"
            return fp32, f"{key} fp32"
    return None, f"{name!r} is not in the table: give --peak_tflops"


# ----------------------------------------------------------------- the benchmark
def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [row[key] for row in rows if row.get(key) is not None]
    return float(np.median(values)) if values else float("nan")


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats (rate, memory, fractions) and every repeat's rate."""
    out = {
        "samples_per_s": _median(rows, "samples_per_s"),
        "samples_per_s_repeats": [row["samples_per_s"] for row in rows],
        "ms_per_step": _median(rows, "ms_per_step"),
        "cpu_ms_per_step": _median(rows, "cpu_ms_per_step"),
        "rss_growth_mib": _median([{"g": r["peak_rss_mib"] - r["rss_before_mib"]} for r in rows], "g"),
        "peak_rss_mib": _median(rows, "peak_rss_mib"),
        "fit_seconds": _median(rows, "fit_seconds"),
        "startup_seconds": _median(rows, "startup_seconds"),
        "after_last_step_seconds": _median(rows, "after_last_step_seconds"),
        "data_wait_fraction": _median(rows, "data_wait_fraction"),
        "global_step": rows[0]["global_step"],
        "trainable_parameters": rows[0]["trainable_parameters"],
        "losses": rows[0]["losses"],
    }
    if rows[0].get("cuda_max_allocated_mib") is not None:
        out["cuda_max_allocated_mib"] = _median(rows, "cuda_max_allocated_mib")
    if "gpu_gap_fraction" in rows[0]:
        out["gpu_gap_fraction"] = _median(rows, "gpu_gap_fraction")
    return out


def _breakdown(ecgfm: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """ms per step by phase, the two profiled runs side by side (``{phase: {"ecgfm": ms, "plain": ms or None}}``);
    rows indented by two spaces are parts of the row above them."""
    ours, theirs = ecgfm["actions_ms_per_step"], plain["actions_ms_per_step"]

    def find(prefix: str, suffix: str) -> float:
        return sum(v for k, v in ours.items() if k.startswith(prefix) and k.endswith(suffix))

    training_step = find("[Strategy]", ".training_step")
    backward = find("[Strategy]", ".backward") + find("[LightningModule]", ".optimizer_zero_grad")
    forward = ours.get("[ecgfm]FineTuneTask.forward", 0.0)
    log = ours.get("[ecgfm]FineTuneTask.log", 0.0)
    metrics = sum(v for k, v in ours.items() if k.startswith("[ecgfm]") and k.endswith(".update_metrics"))
    rows = {
        "next batch (loader)": (ours.get(DATA_NEXT, 0.0), theirs.get(DATA_NEXT, 0.0)),
        "batch to device": (find("[Strategy]", ".batch_to_device"), theirs.get("to_device", 0.0)),
        "training step (forward + loss)": (training_step, theirs.get("forward_loss", 0.0)),
        "  forward": (forward, None),
        "    preprocessing chain": (ours.get("preprocessing", 0.0), theirs.get("preprocessing", 0.0)),
        "  self.log": (log, 0.0),
        "  heads' update_metrics": (metrics, 0.0),
        "  loss, targets, rest of _step": (training_step - forward - log - metrics, None),
        "zero_grad + backward": (backward, theirs.get("backward", 0.0)),
        "optimizer step": (
            ours.get("run_training_batch", 0.0) - training_step - backward,
            theirs.get("optimizer", 0.0),
        ),
    }
    top = [value for key, value in rows.items() if not key.startswith(" ")]
    rows["hooks, callbacks, logging, loop"] = (
        ecgfm["ms_per_step"] - sum(a for a, _ in top),
        plain["ms_per_step"] - sum(b for _, b in top),
    )
    rows["total"] = (ecgfm["ms_per_step"], plain["ms_per_step"])
    callbacks = {  # a user's callbacks (not the benchmark's clock), their arguments left out of the name
        re.sub(r"\{.*\}", "", k): v for k, v in ours.items() if k.startswith("[Callback]") and "ClockCallback" not in k
    }
    return {
        "ms_per_step": {key: {"ecgfm": a, "plain": b} for key, (a, b) in rows.items()},
        "largest_callback_actions_ms_per_step": dict(sorted(callbacks.items(), key=lambda kv: -kv[1])[:5]),
    }


def _ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """ecgfm (and bare Lightning) against plain: the headline is the median over repeats of each run's rate over the
    plain run of the same repeat (beside it in time, so a slow stretch of a busy machine hits both)."""

    def paired(path: str) -> list[float]:
        return [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs[path], runs["plain"], strict=False)]

    rates = {path: [run["samples_per_s"] for run in rows] for path, rows in runs.items() if rows}
    cpu = {path: float(np.median([run["cpu_ms_per_step"] for run in rows])) for path, rows in runs.items() if rows}
    out = {
        "ratio": float(np.median(paired("ecgfm"))),
        "ratio_repeats": paired("ecgfm"),
        "ratio_of_medians": float(np.median(rates["ecgfm"]) / np.median(rates["plain"])),
        # a busy machine only ever adds time: the best runs' ratio is the least disturbed estimate
        "ratio_best": max(rates["ecgfm"]) / max(rates["plain"]),
        "cpu_time_ratio": cpu["plain"] / cpu["ecgfm"],
    }
    if runs["bare"]:
        out["bare_ratio"] = float(np.median(paired("bare")))
    return out


def run_train_benchmark(
    backbones: list[str] | None = None,
    head: Literal["potassium", "multilabel"] = "potassium",
    batch: int = 16,
    steps: int = 10,
    warmup: int = 3,
    repeats: int = 3,
    num_workers: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    device: str = "auto",
    precisions: list[str] | None = None,
    torch_compile: list[bool] | None = None,
    peak_tflops: float | None = None,
    breakdown: bool = True,
    threads: int | None = None,
    seed: int = 0,
    quick: bool = False,
    json_out: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Training samples/s of ecgfm's fit path (FineTuneTask + ShardDataModule + Trainer) against a plain PyTorch
    loop over the same model, batches and optimizer, measured in the same run; prints the ratio, peak memory and
    where the difference goes, and returns (optionally saves) the numbers.

    Args:
        backbones: registered backbones (random weights) reading the 12 standard leads. Default: net1d-small and
            ecgfounder-12lead (ECGFounder's 30.8 M-parameter Net1D); quick: net1d-tiny.
        head: ``potassium`` (PotassiumHead on synthetic serum K+) or ``multilabel`` (MultiLabelHead on hyperkalemia).
        batch: segments per step, the same on both paths.
        steps: timed steps per run, after ``warmup`` untimed ones (which also absorb torch.compile's compilation).
        repeats: runs of each path, alternating (ABBA); medians are reported.
        num_workers: loader worker processes on both paths (default: 0 on the CPU, 4 on a GPU).
        lr, weight_decay: AdamW's, on both paths (constant learning rate).
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
        precisions: Lightning precisions to measure, ``32-true`` and/or ``bf16-mixed`` (GPU only); default both on a
            GPU, ``32-true`` on the CPU.
        torch_compile: ``torch.compile`` off and/or on (GPU only); default both on a GPU, off on the CPU.
        peak_tflops: the GPU's peak TFLOP/s for MFU (default: a table of known GPUs by name and precision).
        breakdown: also run bare Lightning (no logger, progress bar, checkpointing, summary) in the repeats, and one
            profiled run of each path, for the per-phase breakdown (first precision, no compile).
        threads: CPU threads for torch (default: torch's).
        seed: weights, data and training order.
        quick: a smoke run: net1d-tiny unless backbones are given, batch 4, 2 timed steps after 1, one repeat.
        json_out: also write the numbers to this JSON file.
    """
    console = console or Console(width=max(Console().width, 150))
    if quick:
        batch, steps, warmup, repeats = min(batch, 4), min(steps, 2), 1, 1
    if batch < 1 or steps < 1 or warmup < 1 or repeats < 1:
        raise ValueError(
            f"batch, steps, warmup and repeats must be at least 1, got {batch}, {steps}, {warmup}, {repeats}"
        )
    if head not in HEADS:
        raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
    backbones = list(backbones or (QUICK_BACKBONES if quick else DEFAULT_BACKBONES))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") or device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be cpu, cuda (with a CUDA device torch sees) or auto, got {device!r}")
    on_gpu = device == "cuda"
    precisions = list(precisions or (["32-true", "bf16-mixed"] if on_gpu else ["32-true"]))
    unknown = [p for p in precisions if p not in ("32-true", "bf16-mixed")]
    if unknown:
        raise ValueError(f"precisions must be among 32-true and bf16-mixed, got {unknown}")
    compile_modes = [
        bool(c) for c in (torch_compile if torch_compile is not None else [False, True] if on_gpu else [False])
    ]
    skipped: list[str] = []
    if not on_gpu:
        asked = [p for p in precisions if p != "32-true"] + (["torch.compile"] if any(compile_modes) else [])
        precisions, compile_modes = ["32-true"], [False]
        skipped = [
            f"{', '.join(GPU_ONLY)} are GPU-only: measured with --device cuda on a machine with CUDA; skipped on "
            f"the CPU{' (asked for: ' + ', '.join(asked) + ')' if asked else ''}"
        ]
        console.print(f"[yellow]{skipped[0]}[/yellow]")
    if threads:
        torch.set_num_threads(int(threads))
    workers = num_workers if num_workers is not None else (min(4, max(1, (os.cpu_count() or 2) - 1)) if on_gpu else 0)
    torch_device = torch.device(device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(torch_device) if on_gpu else "cpu",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "head": head,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "num_workers": workers,
        "lr": lr,
        "weight_decay": weight_decay,
        "skipped": skipped,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="ecgfm-bench-train-") as tmp:
        start = time.perf_counter()
        root = write_bench_shards(Path(tmp) / "shards", batch, warmup + steps, seed)
        results["shards_seconds"] = time.perf_counter() - start
        console.print(f"wrote synthetic shards in {results['shards_seconds']:.1f} s")
        for backbone in backbones:
            flops = flops_per_sample(backbone, head, seed)
            for c_index, (precision, compiled) in enumerate((p, c) for c in compile_modes for p in precisions):
                cfg = {
                    "backbone": backbone,
                    "head": head,
                    "batch": batch,
                    "steps": steps,
                    "warmup": warmup,
                    "num_workers": workers,
                    "lr": lr,
                    "weight_decay": weight_decay,
                    "seed": seed,
                    "device": torch_device,
                }
                label = f"{backbone}, {precision}{', compiled' if compiled else ''}"
                with_bare = breakdown and c_index == 0
                runs: dict[str, list[dict[str, Any]]] = {"ecgfm": [], "plain": [], "bare": []}
                for r in range(repeats):
                    order = ["ecgfm", "plain"] if r % 2 == 0 else ["plain", "ecgfm"]
                    if with_bare:
                        order.append("bare")
                    for path in order:
                        console.print(f"{label}: repeat {r + 1}/{repeats}, {path} ...")
                        workdir = Path(tmp) / f"run-{backbone}-{c_index}-{r}-{path}"
                        if path == "plain":
                            runs[path].append(run_plain(cfg, root, precision, compiled))
                        else:
                            off = COMPONENTS if path == "bare" else ()
                            runs[path].append(run_ecgfm(cfg, root, workdir, precision, compiled, off=off))
                row: dict[str, Any] = {
                    "backbone": backbone,
                    "precision": precision,
                    "compile": compiled,
                    "flops_per_sample": flops,
                    "ecgfm": _summary(runs["ecgfm"]),
                    "plain": _summary(runs["plain"]),
                }
                if runs["bare"]:
                    row["bare_lightning"] = _summary(runs["bare"])
                row.update(_ratios(runs))
                losses = np.array([run["losses"] for run in runs["ecgfm"] + runs["plain"] + runs["bare"]])
                row["max_loss_difference"] = float(np.abs(losses - losses[0]).max())
                row["losses_finite"] = bool(np.isfinite(losses).all())
                peak, source = gpu_peak_tflops(torch_device, precision, peak_tflops)
                row["peak_tflops"], row["peak_source"] = peak, source
                for path in ("ecgfm", "plain"):
                    achieved = flops * row[path]["samples_per_s"]
                    row[path]["achieved_tflops"] = achieved / 1e12
                    row[path]["mfu"] = achieved / (peak * 1e12) if peak else None
                if with_bare:
                    console.print(f"{label}: profiled runs for the breakdown ...")
                    workdir = Path(tmp) / f"run-{backbone}-{c_index}-profiled"
                    profiled_ecgfm = run_ecgfm(cfg, root, workdir, precision, compiled, profiled=True)
                    profiled_plain = run_plain(cfg, root, precision, compiled, profiled=True)
                    row["breakdown"] = _breakdown(profiled_ecgfm, profiled_plain)
                results["rows"].append(row)
    _print(results, console)
    if json_out:
        atomic_write_json(json_out, results)
    return results


# ----------------------------------------------------------------- printing
def _print(results: dict[str, Any], console: Console) -> None:
    """The rates and their ratio per backbone and configuration, then the per-phase breakdown."""
    gpu = results["device"] != "cpu"
    table = Table(
        title=f"ecgfm bench train: {results['head']} head, batch {results['batch']}, {results['steps']} timed steps "
        f"after {results['warmup']}, median of {results['repeats']} alternating runs, {results['num_workers']} loader "
        f"workers, {results['device']}, {results['threads']} thread(s)"
    )
    columns = ["model", "config", "path", "samples/s", "x plain", "ms/step", "CPU ms/step", "peak RSS MiB", "data wait"]
    if gpu:
        columns += ["CUDA peak MiB", "GPU gap", "TFLOP/s", "MFU"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "config", "path") else "right")
    names = {
        "ecgfm": "ecgfm fit (logger, bar, ckpt)",
        "bare_lightning": "ecgfm, bare Lightning",
        "plain": "plain PyTorch",
    }
    for row in results["rows"]:
        config = f"{row['precision']}{' compiled' if row['compile'] else ''}"
        ratios = {"plain": 1.0, "ecgfm": row["ratio"], "bare_lightning": row.get("bare_ratio")}
        for path in ("plain", "ecgfm", "bare_lightning"):
            if path not in row:
                continue
            s = row[path]
            cells = [
                row["backbone"],
                config,
                names[path],
                f"{s['samples_per_s']:.1f}",
                f"{ratios[path]:.3f}",
                f"{s['ms_per_step']:.1f}",
                f"{s['cpu_ms_per_step']:.1f}",
                f"{s['peak_rss_mib']:.0f} (+{s['rss_growth_mib']:.0f})",
                f"{s['data_wait_fraction']:.1%}",
            ]
            if gpu:
                mfu = s.get("mfu")
                cells += [
                    f"{s.get('cuda_max_allocated_mib', float('nan')):.0f}",
                    f"{s.get('gpu_gap_fraction', float('nan')):.1%}",
                    f"{s['achieved_tflops']:.1f}" if "achieved_tflops" in s else "",
                    f"{mfu:.1%}" if mfu is not None else "n/a",
                ]
            table.add_row(*cells)
    console.print(table)
    for row in results["rows"]:
        verdict = "target >= 0.95 met" if row["ratio"] >= 0.95 else "target >= 0.95 NOT met"
        if row["ratio"] > 1.05:  # ecgfm does all the plain loop does and more: this is the machine's noise
            verdict += ", but faster than plain: noise exceeds the difference, use more --repeats"
        console.print(
            f"{row['backbone']} {row['precision']}{' compiled' if row['compile'] else ''}: ecgfm / plain = "
            f"{row['ratio']:.3f} ({verdict}; per repeat {', '.join(f'{x:.3f}' for x in row['ratio_repeats'])}; "
            f"of the medians {row['ratio_of_medians']:.3f}; of the best runs {row['ratio_best']:.3f}; "
            f"by CPU time {row['cpu_time_ratio']:.3f}); "
            f"both paths {row['ecgfm']['global_step']} steps, {row['ecgfm']['trainable_parameters']:,} trainable "
            f"parameters (plain {row['plain']['trainable_parameters']:,}), max |loss difference| "
            f"{row['max_loss_difference']:.1e}; {row['flops_per_sample'] / 1e9:.2f} GFLOP per training sample"
            + (f", MFU vs {row['peak_source']}" if gpu else "")
        )
        wait = row["ecgfm"]["data_wait_fraction"]
        keeps_up = "keeps up" if wait < 0.05 else "does NOT keep up (raise --num_workers)"
        gap = (
            f"; the GPU had no training work {row['ecgfm'].get('gpu_gap_fraction', float('nan')):.1%} of the time"
            if gpu
            else ""
        )
        console.print(f"  the loader {keeps_up}: the ecgfm path waited for batches {wait:.1%} of the time{gap}")
        e, p = row["ecgfm"], row["plain"]
        console.print(
            f"  outside the timed steps: start-up {e['startup_seconds']:.2f} s (plain {p['startup_seconds']:.2f} s), "
            f"after the last step {e['after_last_step_seconds']:.2f} s (epoch-end metrics, last.ckpt, teardown; "
            f"plain {p['after_last_step_seconds']:.2f} s)"
        )
    for row in results["rows"]:
        if "breakdown" not in row:
            continue
        b = row["breakdown"]
        table = Table(title=f"where a step's time goes: {row['backbone']} {row['precision']} (profiled runs, ms/step)")
        for column in ("phase", "plain PyTorch", "ecgfm fit", "difference"):
            table.add_column(column, justify="left" if column == "phase" else "right")
        for phase, cell in b["ms_per_step"].items():
            ours, theirs = cell["ecgfm"], cell["plain"]
            table.add_row(
                phase,
                "" if theirs is None else f"{theirs:.2f}",
                f"{ours:.2f}",
                "" if theirs is None else f"{ours - theirs:+.2f}",
            )
        console.print(table)
        largest = "; ".join(f"{k} {v:.2f}" for k, v in b["largest_callback_actions_ms_per_step"].items())
        console.print(f"largest callback hooks (ms/step): {largest}")
    for line in results["skipped"]:
        console.print(line)
