"""``ecgfm bench eval``: the patient-level bootstrap of AUROC, vectorised, against the loop everyone writes first.

The loop draws a resample, copies the resampled rows and ranks them (scipy's ``rankdata``, the Mann-Whitney U);
``ecgfm.evaluation.bootstrap`` sorts the scores once and evaluates chunks of resamples as weighted cumulative sums
over a ``[resamples, rows]`` matrix of draw counts. Both see the same draws, so their AUROCs must agree; the loop is
timed on a few resamples and its time per resample scaled to the full count. Ratios, not absolute times, are what
to compare across machines.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import stats

from ecgfm.evaluation.bootstrap import bootstrap_ci, bootstrap_indices
from ecgfm.evaluation.metrics_np import auroc
from ecgfm.io import atomic_write_json


def synthetic_predictions(
    n: int, records_per_patient: int = 1, prevalence: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y, score, patient)`` for ``n`` records: patients with ``records_per_patient`` records sharing their label;
    scores are probabilities, sigmoid of a unit normal shifted by 1 for positives (AUROC about 0.76), stored as
    float32 as predictions are written (so some scores tie)."""
    rng = np.random.default_rng(seed)
    patient = np.arange(n) // max(1, records_per_patient)
    positive = rng.random(patient.max() + 1) < prevalence
    y = positive[patient].astype(np.int64)
    score = (1 / (1 + np.exp(-(rng.normal(size=n) + y)))).astype(np.float32)
    return y, score, patient


def benchmark_bootstrap(
    n: int = 100_000, n_resamples: int = 2000, records_per_patient: int = 1, seed: int = 0
) -> float:
    """Seconds for a 95 % interval of AUROC from ``n_resamples`` patient-level resamples of ``n`` predictions
    (stratified by whether the patient has a positive record), data preparation included."""
    y, score, patient = synthetic_predictions(n, records_per_patient, seed=seed)
    strata = y  # a patient's records share their label
    start = time.perf_counter()
    bootstrap_ci(auroc, y, score, groups=patient, strata=strata, n_resamples=n_resamples, seed=seed)
    return time.perf_counter() - start


def _reference_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of one resampled copy from midranks (the Mann-Whitney U), as a per-resample loop computes it."""
    ranks = stats.rankdata(score)
    positives = int(y.sum())
    negatives = len(y) - positives
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def reference_loop(
    y: np.ndarray, score: np.ndarray, patient: np.ndarray, n_resamples: int, seed: int = 0
) -> tuple[float, np.ndarray]:
    """Seconds per resample of the copy-and-rank loop over the first ``n_resamples`` of the same draws, and its
    AUROCs (the draws themselves are not timed: both methods share them)."""
    rows = np.arange(len(y))
    counts = np.concatenate(list(bootstrap_indices(patient, n_resamples, seed, strata=y)))
    start = time.perf_counter()
    values = []
    for row_counts in counts:
        index = np.repeat(rows, row_counts)
        values.append(_reference_auroc(y[index], score[index]))
    return (time.perf_counter() - start) / n_resamples, np.asarray(values)


def run_eval_benchmark(
    n: int = 100_000,
    n_resamples: int = 2000,
    records_per_patient: int = 4,
    reference_resamples: int = 20,
    seed: int = 0,
    json_out: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """2,000 patient-level bootstrap AUROCs over 100,000 predictions: the vectorised bootstrap's time, one record per
    patient and ``records_per_patient`` per patient, against a copy-and-rank loop timed on ``reference_resamples``
    of the same draws and scaled up; prints a table, checks both agree, and returns (optionally saves) the numbers.

    Args:
        n: predictions (records).
        n_resamples: bootstrap resamples.
        records_per_patient: records per patient in the patient-level run.
        reference_resamples: resamples the loop is timed on (its time per resample is scaled to ``n_resamples``).
        seed: seed of the synthetic data and of the draws.
        json_out: also write the numbers to this JSON file.
    """
    console = console or Console(width=max(Console().width, 120))
    results: dict[str, Any] = {"n": n, "n_resamples": n_resamples, "cpus": os.cpu_count(), "runs": []}
    results["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for per_patient in (1, records_per_patient):
        y, score, patient = synthetic_predictions(n, per_patient, seed=seed)
        console.print(f"{n:,} predictions, {per_patient} per patient: {n_resamples:,} vectorised resamples ...")
        cpu = time.process_time()
        seconds = benchmark_bootstrap(n, n_resamples, per_patient, seed)
        cpu = time.process_time() - cpu
        loop_per_resample, loop_values = reference_loop(y, score, patient, reference_resamples, seed)
        prepared_counts = next(
            bootstrap_indices(patient, reference_resamples, seed, strata=y, chunk=reference_resamples)
        )
        ours = auroc(y, score, prepared_counts)
        results["runs"].append(
            {
                "records_per_patient": per_patient,
                "patients": int(patient.max()) + 1,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "reference_seconds_per_resample": loop_per_resample,
                "reference_seconds_scaled": loop_per_resample * n_resamples,
                "speedup": loop_per_resample * n_resamples / seconds,
                "max_abs_difference": float(np.max(np.abs(ours - loop_values))),
            }
        )
    table = Table(title=f"bootstrap AUROC: {n_resamples:,} resamples of {n:,} predictions ({os.cpu_count()} CPUs)")
    columns = ("records / patient", "patients", "vectorised s", "its CPU s", "loop s (scaled)", "speedup", "max |diff|")
    for column in columns:
        table.add_column(column, justify="right")
    for run in results["runs"]:
        table.add_row(
            str(run["records_per_patient"]),
            f"{run['patients']:,}",
            f"{run['seconds']:.2f}",
            f"{run['cpu_seconds']:.2f}",
            f"{run['reference_seconds_scaled']:.1f}",
            f"{run['speedup']:.1f}x",
            f"{run['max_abs_difference']:.1e}",
        )
    console.print(table)
    console.print(
        f"loop: copy the resampled rows and rank them, timed on {reference_resamples} resamples of the same draws; "
        f"CPU s: both threads' CPU time (wall time above it means other processes held the CPUs: load average "
        f"{results['load_average']:.1f})"
    )
    if json_out:
        atomic_write_json(json_out, results)
    return results
