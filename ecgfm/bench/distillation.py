"""Does a 12-lead teacher help a lead-I student? Synthetic potassium, the potassium recipe, net1d-tiny, on a CPU.

1. ``ecgfm synth``-style shards (``n_segments``) under ``out/shards`` (reused when already there);
2. a 12-lead teacher: ``ecgfm fit --config recipes/potassium/net1d-small.yaml`` with net1d-tiny,
   ``teacher_epochs`` epochs; its test MAE from the checkpoint that is best on validation MAE;
3. with ``label_fraction`` < 1, a copy of the shards in which only that fraction of the segments keeps its
   potassium label (the rest are missing, as in a registry where few ECGs have a lab draw); the teacher's cached
   outputs stay on every segment;
4. for each seed, a lead-I student (``leads: [I]``, ``adapter: fold_first_conv``) trained ``student_epochs`` epochs
   without and with the teacher (``model.teacher``; with ``cache`` (the default) the teacher's outputs are stored in
   the shards first by ``ecgfm distill-cache`` and read with ``model.teacher_cache``), each tested on the fully
   labelled shards from its best checkpoint (on validation MAE) and from its last; ``student_init: teacher``
   starts both students from the teacher's backbone (its first convolution folded to lead I), as a lead-I model
   starts from a 12-lead foundation model;
5. a table of test MAE (mmol/L) per seed, and mean +- sd, also written to ``out/results.json``.

The defaults (3,000 segments, z-score preprocessing in place of the recipe's ECGFounder filter chain, which costs
more than net1d-tiny itself on a CPU) take about 10-15 minutes on 2 CPU cores. Run it as
``ecgfm bench distillation --out ecgfm-distillation`` (``--help`` lists the options).
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ecgfm.io import atomic_write_json, sha256sum

RECIPE = "potassium/net1d-small"  # a shipped recipe: `ecgfm recipes show potassium/net1d-small`


#: Runs one ``ecgfm fit | test`` argument list and returns the LightningCLI object (the command line's
#: ``run_lightning``, which ``ecgfm bench distillation`` passes in: the library does not import the command line).
Runner = Callable[[list[str]], Any]


def _run(run: Runner, command: str, out: Path, name: str, args: list[str]) -> Any:
    return run(
        [
            command,
            "--config",
            RECIPE,
            f"--trainer.default_root_dir={out / 'runs' / name}",
            f"--trainer.logger.init_args.save_dir={out / 'logs'}",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            *args,
        ]
    )


def _fit_and_test(run: Runner, out: Path, name: str, args: list[str], test_args: list[str] = ()) -> dict[str, Any]:
    """Fit, then test the checkpoint that is best on validation MAE; returns test metrics and seconds taken."""
    start = time.perf_counter()
    cli = _run(run, "fit", out, name, args)
    callback = cli.trainer.checkpoint_callback
    best = callback.best_model_path or callback.last_model_path
    result = _test(run, out, name, [*args, *test_args], best, start)
    if callback.last_model_path and callback.last_model_path != result["checkpoint"]:
        # the best checkpoint is chosen on the validation labels, which are few with a small label_fraction
        last = _test(run, out, f"{name} (last)", [*args, *test_args], callback.last_model_path)
        result["test_mae_last"] = last["test_mae"]
    else:
        result["test_mae_last"] = result["test_mae"]
    return result


def _test(
    run: Runner, out: Path, name: str, args: list[str], checkpoint: str, start: float | None = None
) -> dict[str, Any]:
    start = time.perf_counter() if start is None else start
    tested = _run(run, "test", out, name, [*args, f"--ckpt_path={checkpoint}"])
    metrics = tested.trainer.callback_metrics
    result = {
        "test_mae": float(metrics["test/segment/potassium/mae"]),
        "test_mae_of_mean": float(metrics["test/segment/potassium/mae_mean"]),
        "test_pearson": float(metrics["test/segment/potassium/pearson"]),
        "seconds": time.perf_counter() - start,
        "checkpoint": str(checkpoint),
    }
    print(f"{name}: test MAE {result['test_mae']:.4f} mmol/L ({result['seconds']:.0f} s)", flush=True)
    return result


def _keep_labels(shards: Path, out: Path, fraction: float, target: str = "potassium", seed: int = 0) -> Path:
    """A copy of ``shards`` where a random ``fraction`` of the segments keeps its ``target`` label (NaN elsewhere)."""
    import h5py
    import numpy as np

    from ecgfm.data.checksums import array_checksum
    from ecgfm.data.shards import Manifest, update_checksums

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(shards, out)
    manifest = Manifest.load(out)
    rng = np.random.default_rng(seed)
    for entry in manifest.shards:
        path = out / entry["path"]
        with h5py.File(path, "r+") as f:
            values = f["targets"][target][:]
            values[rng.random(len(values)) >= fraction] = np.nan
            f["targets"][target][:] = values
        update_checksums(out, entry, {f"/targets/{target}": array_checksum(values)})
        if "sha256" in entry:
            entry["sha256"] = sha256sum(path)
    manifest.save(out)
    return out


def _summary(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def run_distillation_benchmark(
    run: Runner,
    out: str = "ecgfm-distillation",
    n_segments: int = 3000,
    seeds: list[int] | None = None,
    teacher_epochs: int = 6,
    student_epochs: int = 3,
    batch_size: int = 64,
    backbone: str = "net1d-tiny",
    preprocessing: str = "zscore",
    distill_weight: float = 1.0,
    distill_temperature: float = 1.0,
    cache: bool = True,
    lr: float = 0.003,
    label_fraction: float = 1.0,
    student_init: str = "scratch",
    teacher: str | None = None,
) -> dict[str, Any]:
    """Lead-I students with and without a 12-lead teacher on synthetic potassium: test MAE per seed.

    Args:
        run: runs ``ecgfm fit | test`` from an argument list (the command line's ``run_lightning``).
        out: working folder (shards, runs, logs, results.json).
        n_segments: synthetic segments (4 per patient; 70/15/15 patient split).
        seeds: student seeds (default 0, 1, 2); the teacher uses seed 0.
        teacher_epochs, student_epochs: training epochs.
        batch_size: segments per batch.
        backbone: the backbone of teacher and students.
        preprocessing: ``zscore`` (cheap) or ``ecgfounder`` (the recipe's chain; about 3x slower on a CPU).
        distill_weight, distill_temperature: the students' ``model.distill_weight`` / ``model.distill_temperature``.
        cache: store the teacher's outputs in the shards once (``ecgfm distill-cache``) instead of running the
            teacher beside each student (``--cache false``: on the fly, same losses, about 1.5x the student time).
        lr: learning rate of every run.
        label_fraction: the fraction of segments whose potassium label the students see (the teacher sees all).
        student_init: ``scratch`` (random weights) or ``teacher`` (the teacher's backbone, first conv folded).
        teacher: a teacher checkpoint from an earlier run on the same shards (skips training the teacher).
    """
    from ecgfm.data.shards import Manifest
    from ecgfm.data.synthetic import write_synthetic_shards
    from ecgfm.finetune.teacher_cache import cache_teacher_outputs

    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    if student_init not in ("scratch", "teacher"):
        raise ValueError(f"student_init must be 'scratch' or 'teacher', got {student_init!r}")
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    root = Path(out).resolve()
    shards = root / "shards"
    try:
        reuse = Manifest.load(shards).n_segments == n_segments
    except Exception:  # noqa: BLE001 - no (or another) folder: write it
        reuse = False
    if not reuse:
        write_synthetic_shards(shards, n_segments, seed=0, progress=False)
    common = [
        f"--data.root={shards}",
        f"--data.batch_size={batch_size}",
        f"--model.backbone={backbone}",
        f"--model.preprocessing={preprocessing}",
        f"--model.lr={lr}",
    ]
    teacher_args = [*common, "--seed_everything=0", f"--trainer.max_epochs={teacher_epochs}"]
    if teacher is None:
        teacher_run = _fit_and_test(run, root, "teacher-12lead", teacher_args)
    else:
        teacher_run = _test(run, root, "teacher-12lead", teacher_args, teacher)
    if cache:
        cache_teacher_outputs(teacher_run["checkpoint"], str(shards), batch_size=batch_size)
    train_shards = shards if label_fraction == 1 else _keep_labels(shards, root / "shards-few-labels", label_fraction)
    student = [
        *common,
        f"--data.root={train_shards}",
        "--model.leads=[I]",
        "--model.adapter=fold_first_conv",
        f"--trainer.max_epochs={student_epochs}",
    ]
    if student_init == "teacher":
        student.append(f"--model.pretrained={teacher_run['checkpoint']}")
    tested_on = [f"--data.root={shards}"]
    distill = [
        f"--model.teacher={teacher_run['checkpoint']}",
        f"--model.teacher_cache={str(cache).lower()}",
        f"--model.distill_weight={distill_weight}",
        f"--model.distill_temperature={distill_temperature}",
    ]
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "distilled": []}
    for seed in seeds:
        args = [*student, f"--seed_everything={seed}"]
        runs["plain"].append(_fit_and_test(run, root, f"student-I-plain-seed{seed}", args, tested_on))
        with_teacher = _fit_and_test(run, root, f"student-I-distilled-seed{seed}", [*args, *distill], tested_on)
        runs["distilled"].append(with_teacher)

    results: dict[str, Any] = {"teacher": teacher_run, "students": runs, "seeds": seeds}
    results["settings"] = {
        "n_segments": n_segments,
        "teacher_epochs": teacher_epochs,
        "student_epochs": student_epochs,
        "batch_size": batch_size,
        "backbone": backbone,
        "preprocessing": preprocessing,
        "distill_weight": distill_weight,
        "distill_temperature": distill_temperature,
        "cache": cache,
        "lr": lr,
        "label_fraction": label_fraction,
        "student_init": student_init,
    }
    atomic_write_json(root / "results.json", results)
    print("\ntest MAE, mmol/L (best checkpoint on validation MAE)")
    mean_mae = teacher_run["test_mae_of_mean"]
    print(f"  12-lead teacher             {teacher_run['test_mae']:.4f}  (predicting the mean: {mean_mae:.4f})")
    print(f"  students: {label_fraction:.0%} of the labels, {student_init} start, {student_epochs} epochs")
    print("  seed  lead-I plain  lead-I distilled  (last checkpoints: plain, distilled)")
    for seed, plain, distilled in zip(seeds, runs["plain"], runs["distilled"], strict=True):
        print(
            f"  {seed:>4}  {plain['test_mae']:>12.4f}  {distilled['test_mae']:>16.4f}"
            f"  ({plain['test_mae_last']:.4f}, {distilled['test_mae_last']:.4f})"
        )
    for kind in ("plain", "distilled"):
        best, last = _summary([r["test_mae"] for r in runs[kind]]), _summary([r["test_mae_last"] for r in runs[kind]])
        print(f"  lead-I {kind:<10} {best}  (last: {last})")
    print(f"results: {root / 'results.json'}")
    return results
