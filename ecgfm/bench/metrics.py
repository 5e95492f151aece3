"""``ecgfm bench metrics``: multi-label validation metrics for many labels over many samples in bounded memory.

Streams synthetic validation results through ``MultiLabelHead`` (per-label score histograms) in fresh processes and
reports time, peak resident memory and its growth for the full stream and a 10x smaller one; then, in this process,
compares throughput and AUROC with torchmetrics' binned and exact ``MultilabelAUROC`` on the same samples. Ratios,
not absolute numbers, are what to compare across machines.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ecgfm.io import atomic_write_json

MISSING = 0.2  # share of (sample, label) entries without a label
MIN_PREVALENCE, MAX_PREVALENCE = 5e-4, 0.2
TM_THRESHOLDS = 200
TM_CHUNK_BYTES = 128 << 20  # torchmetrics' binned update builds [chunk, labels, thresholds] int64 tensors


def _label_names(labels: int) -> list[str]:
    return [f"label{i:04d}" for i in range(labels)]


def _label_parameters(labels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label: prevalence log-uniform in [0.05 %, 20 %] and a separation of positives from negatives (in logits,
    unit-variance noise) uniform in [0.5, 3], i.e. AUROCs from about 0.64 to 0.98."""
    g = torch.Generator().manual_seed(seed)
    log_p = torch.empty(labels, dtype=torch.float64).uniform_(
        math.log(MIN_PREVALENCE), math.log(MAX_PREVALENCE), generator=g
    )
    separation = torch.empty(labels).uniform_(0.5, 3.0, generator=g)
    return log_p.exp().float(), separation


def _batch(
    g: torch.Generator, n: int, prevalence: torch.Tensor, separation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, targets (NaN where missing, as in the shards) and the mask of labelled entries, [n, labels] each.

    A labelled entry is positive with its label's prevalence; its logit is the prevalence's logit, shifted up by
    the label's separation for positives, plus standard normal noise, so rare labels score low as a trained model's.
    """
    u = torch.rand(n, len(prevalence), generator=g)
    mask = u >= MISSING
    positive = u < MISSING + (1 - MISSING) * prevalence  # given labelled, positive with probability = prevalence
    positive &= mask
    logits = torch.randn(n, len(prevalence), generator=g)
    logits += torch.logit(prevalence) - separation * prevalence
    logits += positive * separation
    target = positive.float().masked_fill_(~mask, float("nan"))
    return logits, target, mask


def _head(labels: int, bins: int):
    from ecgfm.heads.multilabel import MultiLabelHead

    names = _label_names(labels)
    head = MultiLabelHead(labels=names, bins=bins)
    head.build(8, names)
    return head


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stream(labels: int, samples: int, batch: int, bins: int, seed: int) -> dict[str, Any]:
    """Stream ``samples`` synthetic results through MultiLabelHead.update_metrics, then compute_metrics + tables;
    meant for a fresh process (see ``_probe``), so VmHWM is the peak of this stream alone."""
    prevalence, separation = _label_parameters(labels, seed)
    head = _head(labels, bins)
    metrics = head.metrics()
    g = torch.Generator().manual_seed(seed + 1)
    state_before = metrics["scores"].hist.numel() * metrics["scores"].hist.element_size()
    gc.collect()
    peak_reset = _reset_peak()
    rss_before = _kib("VmRSS:")
    update_s = 0.0
    n_batches = -(-samples // batch)
    checkpoints = {max(1, round(n_batches * k / 10)) for k in range(1, 11)}
    trace = []  # (samples so far, RSS growth, peak RSS growth) in KiB at every 10 % of the stream
    start = time.perf_counter()
    for i, first in enumerate(range(0, samples, batch), 1):
        logits, target, mask = _batch(g, min(batch, samples - first), prevalence, separation)
        t = time.perf_counter()
        head.update_metrics(metrics, logits, target, mask)
        update_s += time.perf_counter() - t
        del logits, target, mask
        if i in checkpoints:
            trace.append((min(i * batch, samples), _kib("VmRSS:") - rss_before, _kib("VmHWM:") - rss_before))
    t = time.perf_counter()
    summary = head.compute_metrics(metrics)
    rows = head.tables(metrics)["per_label"]
    compute_s = time.perf_counter() - t
    total_s = time.perf_counter() - start
    hist = metrics["scores"].hist
    return {
        "samples": samples,
        "labels": labels,
        "batch": batch,
        "update_s": update_s,
        "compute_s": compute_s,
        "total_s": total_s,
        "samples_per_s": samples / (update_s + compute_s),
        "rss_before_kib": rss_before,
        "rss_after_kib": _kib("VmRSS:"),
        "peak_kib": _kib("VmHWM:"),
        "peak_reset": peak_reset,
        "trace_kib": trace,
        "state_bytes_before": state_before,
        "state_bytes_after": hist.numel() * hist.element_size(),
        "labelled_entries": int(hist.sum()),
        "macro_auroc": float(summary["auroc"]),
        "micro_auroc": float(summary["micro_auroc"]),
        "macro_auprc": float(summary["auprc"]),
        "labels_scored": int(summary["n_labels_scored"]),
        "table_rows": len(rows),
    }


_PROBE = (
    "import json, sys\nfrom ecgfm.bench.metrics import stream\n"  # imports before the first reading
    "print(json.dumps(stream(**json.loads(sys.argv[1]))))\n"
)


def _probe(**kwargs: Any) -> dict[str, Any]:
    """``stream`` in a fresh process: its peak RSS is not hidden by this process's earlier high-water mark."""
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(kwargs)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"metrics stream probe failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["growth_kib"] = result["peak_kib"] - result["rss_before_kib"]
    return result


def _ours(head, batches, n: int) -> tuple[float, list[dict[str, Any]]]:
    """Seconds for update_metrics over the first n samples + compute_metrics + tables, and the per-label rows."""
    metrics = head.metrics()
    start = time.perf_counter()
    for logits, target, mask in batches:
        take = min(len(logits), n)
        head.update_metrics(metrics, logits[:take], target[:take], mask[:take])
        n -= take
        if n == 0:
            break
    head.compute_metrics(metrics)
    rows = head.tables(metrics)["per_label"]
    return time.perf_counter() - start, rows


def _torchmetrics(logits: torch.Tensor, target: torch.Tensor, thresholds: int | None, chunk: int):
    """Seconds for torchmetrics MultilabelAUROC (average none, ignore_index -1) over chunks + compute, the per-label
    AUROCs and the bytes of its state."""
    from torchmetrics.classification import MultilabelAUROC

    metric = MultilabelAUROC(logits.shape[1], average="none", thresholds=thresholds, ignore_index=-1)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # labels without positives in a chunk or in all
        for first in range(0, len(logits), chunk):
            metric.update(logits[first : first + chunk], target[first : first + chunk])
        auroc = metric.compute()
    seconds = time.perf_counter() - start
    state = 0
    for name in metric._defaults:
        value = getattr(metric, name)
        for tensor in value if isinstance(value, list) else [value]:
            state += tensor.numel() * tensor.element_size()
    return seconds, auroc.double().numpy(), state


def _errors(rows: list[dict[str, Any]], exact: np.ndarray) -> dict[str, float]:
    """Max and mean |AUROC - exact| over labels with both classes."""
    valid = np.array([0 < row["positives"] < row["n"] for row in rows])
    ours = np.array([row["auroc"] for row in rows])
    diff = np.abs(ours - exact)[valid]
    return {"labels": int(valid.sum()), "max": float(diff.max()), "mean": float(diff.mean())}


def run_metrics_benchmark(
    labels: int = 1200,
    samples: int = 1_000_000,
    batch: int = 4096,
    bins: int = 1024,
    baseline_samples: int = 20_000,
    binned_samples: int = 2_000,
    repeats: int = 3,
    seed: int = 0,
    json_out: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Multi-label validation metrics (MultiLabelHead's per-label histograms) over many samples in bounded memory:
    time and peak RSS for the full stream and a 10x smaller one, and throughput and AUROC against torchmetrics
    measured in the same run; prints a table with ratios and returns (optionally saves) the numbers.

    Args:
        labels: number of labels.
        samples: validation samples streamed through update_metrics in a fresh process.
        batch: samples per update_metrics call.
        bins: histogram bins per label and class (state: labels x 2 x bins int64).
        baseline_samples: samples for the comparisons with torchmetrics (ours and exact MultilabelAUROC).
        binned_samples: the first this many of them also go through torchmetrics' binned MultilabelAUROC
            (200 thresholds), which is about 100x slower at 1,200 labels.
        repeats: the comparisons are interleaved this many times and the medians reported.
        seed: seed of the synthetic labels and scores.
        json_out: also write the numbers to this JSON file.
    """
    console = console or Console(width=max(Console().width, 150))  # the table must not wrap in logs
    small = max(batch, samples // 10)
    results: dict[str, Any] = {"labels": labels, "samples": samples, "bins": bins, "cpus": os.cpu_count()}

    console.print(f"streaming {small:,} and {samples:,} samples x {labels:,} labels in fresh processes")
    args = {"labels": labels, "batch": batch, "bins": bins, "seed": seed}
    results["small"] = _probe(samples=small, **args)
    results["full"] = _probe(samples=samples, **args)

    console.print(f"comparing with torchmetrics on {baseline_samples:,} samples ({repeats} interleaved repeats)")
    prevalence, separation = _label_parameters(labels, seed)
    g = torch.Generator().manual_seed(seed + 2)
    batches = [
        _batch(g, min(batch, baseline_samples - f), prevalence, separation) for f in range(0, baseline_samples, batch)
    ]
    logits = torch.cat([b[0] for b in batches])
    tm_target = torch.cat([torch.where(b[2], b[1], -1.0) for b in batches]).long()  # -1 = missing
    binned_n = min(binned_samples, baseline_samples)
    tm_chunk = max(1, TM_CHUNK_BYTES // (labels * TM_THRESHOLDS * 8))
    head = _head(labels, bins)
    times: dict[str, list[float]] = {"ours": [], "binned": [], "exact": []}
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows every contender alike
        seconds, rows = _ours(head, batches, baseline_samples)
        times["ours"].append(seconds)
        seconds, binned_auroc, binned_state = _torchmetrics(
            logits[:binned_n], tm_target[:binned_n], TM_THRESHOLDS, tm_chunk
        )
        times["binned"].append(seconds)
        seconds, exact_auroc, exact_state = _torchmetrics(logits, tm_target, None, batch)
        times["exact"].append(seconds)
    _, subset_rows = _ours(head, batches, binned_n)
    _, subset_exact, _ = _torchmetrics(logits[:binned_n], tm_target[:binned_n], None, batch)
    del batches, logits, tm_target

    rates = {
        "ours": baseline_samples / float(np.median(times["ours"])),
        "binned": binned_n / float(np.median(times["binned"])),
        "exact": baseline_samples / float(np.median(times["exact"])),
    }
    state = results["full"]["state_bytes_after"]
    exact_per_sample = exact_state / baseline_samples
    results["baselines"] = {
        "baseline_samples": baseline_samples,
        "binned_samples": binned_n,
        "torchmetrics_chunk": tm_chunk,
        "samples_per_s": rates,
        "binned_vs_ours": rates["binned"] / rates["ours"],
        "exact_vs_ours": rates["exact"] / rates["ours"],
        "binned_state_bytes": binned_state,
        "exact_state_bytes": exact_state,
        "exact_bytes_per_sample": exact_per_sample,
        "exact_state_bytes_at_samples": exact_per_sample * samples,
        "auroc_error_ours": _errors(rows, exact_auroc),
        "auroc_error_ours_subset": _errors(subset_rows, subset_exact),
        "auroc_error_binned_subset": _errors(
            [{**row, "auroc": float(a)} for row, a in zip(subset_rows, binned_auroc, strict=True)], subset_exact
        ),
    }

    full, part, base = results["full"], results["small"], results["baselines"]
    mib = 1 / 1024
    full_growth, small_growth = full["growth_kib"], part["growth_kib"]
    results["growth_ratio_full_vs_small"] = full_growth / max(small_growth, 1)
    table = Table(
        title=f"ecgfm bench metrics ({labels:,} labels, {bins:,} bins, batch {batch:,}, {os.cpu_count()} CPUs)"
    )
    for column in ("measurement", "value", "ratio"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for run, other, name in ((full, part, "full"), (part, part, "small")):
        table.add_row(
            f"ours: stream {run['samples']:,} samples (update + compute + tables)",
            f"{run['update_s'] + run['compute_s']:,.1f} s, {run['samples_per_s']:,.0f} samples/s "
            f"({run['total_s']:,.0f} s with data generation)",
            f"{(run['update_s'] + run['compute_s']) / (other['update_s'] + other['compute_s']):.2f}x time"
            if name == "full"
            else "1.00",
        )
    table.add_row(
        f"metric state ({labels:,} x 2 x {bins:,} int64)",
        f"{state / 1e6:,.1f} MB before and after {part['samples']:,} and {full['samples']:,} samples",
        f"{full['state_bytes_after'] / part['state_bytes_after']:.2f}x",
    )
    table.add_row(
        f"peak RSS of the process, {full['samples']:,} samples",
        f"{full['peak_kib'] * mib:,.0f} MiB ({full['rss_before_kib'] * mib:,.0f} MiB before streaming)",
        "",
    )
    for run in (full, part):
        retained = run["rss_after_kib"] - run["rss_before_kib"]
        table.add_row(
            f"peak RSS growth while streaming {run['samples']:,} samples",
            f"{run['growth_kib'] * mib:,.0f} MiB (retained after: {retained * mib:,.0f} MiB)",
            f"{run['growth_kib'] / max(small_growth, 1):.2f}x",
        )
    trace = {k: full["trace_kib"][k - 1] for k in (1, 5, 10) if len(full["trace_kib"]) >= k}
    if trace:
        table.add_row(
            "peak RSS growth after " + " / ".join(f"{t[0]:,}" for t in trace.values()) + " samples",
            " / ".join(f"{t[2] * mib:,.0f}" for t in trace.values()) + " MiB",
            " / ".join(f"{t[2] / max(trace[min(trace)][2], 1):.2f}" for t in trace.values()) + "x",
        )
    table.add_row(
        f"ours (MultiLabelHead histograms), {baseline_samples:,} samples, batch {batch:,}",
        f"{rates['ours']:,.0f} samples/s",
        "1.00",
    )
    table.add_row(
        f"torchmetrics MultilabelAUROC(thresholds={TM_THRESHOLDS}), first {binned_n:,}, chunks of {tm_chunk}",
        f"{rates['binned']:,.0f} samples/s, state {binned_state / 1e6:,.1f} MB",
        f"{base['binned_vs_ours']:.3g}x ours",
    )
    table.add_row(
        f"torchmetrics MultilabelAUROC(thresholds=None), exact, {baseline_samples:,} samples",
        f"{rates['exact']:,.0f} samples/s",
        f"{base['exact_vs_ours']:.3g}x ours",
    )
    table.add_row(
        f"exact state at {samples:,} samples (extrapolated from {baseline_samples:,})",
        f"{exact_per_sample * samples / 1e9:,.1f} GB ({exact_per_sample:,.0f} bytes/sample)",
        f"{exact_per_sample * samples / state:,.0f}x ours",
    )
    for key, what in (
        ("auroc_error_ours", f"AUROC |ours - exact|, {baseline_samples:,} samples"),
        ("auroc_error_ours_subset", f"AUROC |ours - exact|, first {binned_n:,} samples"),
        (
            "auroc_error_binned_subset",
            f"AUROC |torchmetrics {TM_THRESHOLDS} thresholds - exact|, first {binned_n:,} samples",
        ),
    ):
        err = base[key]
        table.add_row(
            what,
            f"max {err['max']:.4f}, mean {err['mean']:.5f} over {err['labels']:,} labels",
            f"{err['mean'] / max(base['auroc_error_ours_subset']['mean'], 1e-12):,.0f}x ours (mean)"
            if key == "auroc_error_binned_subset"
            else "",
        )
    console.print(table)
    if json_out:
        atomic_write_json(json_out, results)
    return results
