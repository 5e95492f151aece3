"""``ecgfm bench data``: shard loader throughput against baselines measured in the same run, conversion speed, and
the memory of a 10-million-segment index. Ratios, not absolute numbers, are what to compare across machines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ecgfm.io import atomic_write, atomic_write_json
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES

SEGMENT_BYTES = len(STANDARD_LEADS) * STANDARD_N_SAMPLES * np.dtype(np.int16).itemsize


def _write_wfdb_records(folder: Path, n: int, seed: int) -> None:
    """n real-format WFDB records (500 Hz, 10 s, 12 leads, format 16) holding synthetic ECGs."""
    from ecgfm.bench.record_formats import write_wfdb
    from ecgfm.data.synthetic import synthesize

    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, 256):
        signals, _ = synthesize(min(256, n - start), seed=seed + start)
        for i, signal in enumerate(signals):
            write_wfdb(folder / f"rec{start + i:06d}", signal, STANDARD_FS, STANDARD_LEADS)


def _read_files(paths: list[Path]) -> int:
    """Read files sequentially into one reused buffer; returns bytes read (also warms the page cache)."""
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total


def _loader_rate(root: Path, workers: int, batch_size: int, epochs: int) -> float:
    """Segments/s through ShardDataset + ShardSampler + DataLoader (shuffled, as in training)."""
    from ecgfm.data.dataset import ShardDataset, collate
    from ecgfm.data.loader import ShardLoader
    from ecgfm.data.sampler import ShardSampler

    dataset = ShardDataset(root)
    sampler = ShardSampler(dataset.indices, dataset.offsets, shuffle=True, buffer_size=1024)
    loader = ShardLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
    )
    best = 0.0
    for epoch in range(epochs + 1):  # the first pass starts the workers and is not counted
        sampler.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["signal"].shape[0]
        if epoch:
            best = max(best, n / (time.perf_counter() - start))
    return best


def _wfdb_rate(folder: Path, n: int) -> float:
    """Segments/s reading one WFDB record per call with wfdb.rdsamp, as other ECG frameworks' datasets do."""
    import wfdb

    names = sorted(p.stem for p in folder.glob("*.hea"))[:n]
    start = time.perf_counter()
    for name in names:
        wfdb.rdsamp(str(folder / name))
    return len(names) / (time.perf_counter() - start)


_INDEX_PROBE = r"""
import json, sys, numpy as np
from pathlib import Path
def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
root = Path(sys.argv[1])
import ecgfm.data.index, ecgfm.data.sampler  # imports before the first reading
from ecgfm.data.index import SegmentIndex
from ecgfm.data.sampler import ShardSampler
before = rss_kib("VmRSS:")
index = SegmentIndex(root)
splits = index.split_positions(0.1, 0.1, seed=0)
sampler = ShardSampler(splits["train"], index.offsets, num_replicas=8, rank=3)
order = sampler.epoch_order()
after = rss_kib("VmRSS:")
result = {"segments": index.n_segments, "shards": len(index.manifest.shards), "train": int(len(splits["train"]))}
result.update(rss_before_kib=before, rss_after_kib=after, peak_kib=rss_kib("VmHWM:"))
print(json.dumps(result))
"""


def _index_memory(workdir: Path, n_segments: int, n_shards: int) -> dict[str, Any]:
    """Resident memory of the index, splits and one rank's epoch order for a large manifest (fresh process)."""
    from ecgfm.data.shards import Manifest

    root = workdir / "index-probe"
    root.mkdir(parents=True, exist_ok=True)
    per = n_segments // n_shards
    Manifest(shards=[{"path": f"shard-{k:05d}.h5", "n_segments": per} for k in range(n_shards)]).save(root)
    with atomic_write(root / "patient_keys.npy") as f:
        np.save(f, (np.arange(per * n_shards, dtype=np.uint64) // 4) * np.uint64(2654435761))
    out = subprocess.run([sys.executable, "-c", _INDEX_PROBE, str(root)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["index_mib"] = (result["rss_after_kib"] - result["rss_before_kib"]) / 1024
    return result


def run_data_benchmark(
    segments: int = 2048,
    wfdb_records: int = 300,
    index_segments: int = 10_000_000,
    index_shards: int = 5000,
    workers: tuple[int, ...] = (0, 1, 2),
    batch_size: int = 256,
    epochs: int = 2,
    repeats: int = 3,
    workdir: str | None = None,
    json_out: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every measurement, print a table with ratios, return (and optionally save) the numbers.

    Raw reads and loader passes are interleaved ``repeats`` times and the medians reported.
    """
    from ecgfm.data.convert import convert

    console = console or Console(width=max(Console().width, 150))  # the table must not wrap in logs
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ecgfm-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"segments": segments, "cpus": os.cpu_count()}
    try:
        wfdb_dir, shard_dir = tmp / "wfdb", tmp / "shards"
        console.print(f"writing {segments} WFDB records (500 Hz, 10 s, 12 leads) to {wfdb_dir}")
        _write_wfdb_records(wfdb_dir, segments, seed=0)
        _read_files(sorted(wfdb_dir.iterdir()))  # hot cache for the conversion as well

        start = time.perf_counter()
        convert(wfdb_dir, shard_dir, records_per_shard=1024, workers=0, progress=False)
        results["convert_records_per_s_1_process"] = segments / (time.perf_counter() - start)

        shard_files = sorted(shard_dir.glob("shard-*.h5"))
        _read_files(shard_files)  # hot page cache
        raw_rates: list[float] = []
        loader_rates: dict[int, list[float]] = {w: [] for w in workers}
        for _ in range(repeats):  # interleaved, so a noisy neighbour slows baseline and loader alike
            start = time.perf_counter()
            raw_bytes = _read_files(shard_files)
            raw_rates.append(raw_bytes / SEGMENT_BYTES / (time.perf_counter() - start))
            for w in workers:
                loader_rates[w].append(_loader_rate(shard_dir, w, batch_size, epochs))
        results["raw_read_segments_per_s"] = float(np.median(raw_rates))
        for w in workers:
            results[f"loader_{w}_workers_segments_per_s"] = float(np.median(loader_rates[w]))
        results["wfdb_rdsamp_segments_per_s"] = _wfdb_rate(wfdb_dir, wfdb_records)
        results["index"] = _index_memory(tmp, index_segments, index_shards)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)

    raw, wfdb_rate = results["raw_read_segments_per_s"], results["wfdb_rdsamp_segments_per_s"]
    table = Table(title=f"ecgfm bench data ({segments} segments, hot page cache, {os.cpu_count()} CPUs)")
    for column in ("measurement", "value", "vs raw read (per worker)", f"vs wfdb.rdsamp ({wfdb_rate:,.0f}/s)"):
        table.add_column(column, justify="right" if column != "measurement" else "left")
    table.add_row("raw sequential read of the shard bytes", f"{raw:,.0f} seg/s", "1.00", f"{raw / wfdb_rate:,.0f}x")
    for w in workers:
        rate = results[f"loader_{w}_workers_segments_per_s"]
        per_worker = rate / max(1, w)
        results[f"loader_{w}_workers_per_worker_vs_raw"] = per_worker / raw
        results[f"loader_{w}_workers_vs_wfdb"] = rate / wfdb_rate
        label = f"ShardDataset loader, {w} workers" if w else "ShardDataset loader, in process"
        table.add_row(label, f"{rate:,.0f} seg/s", f"{per_worker / raw:.2f}", f"{rate / wfdb_rate:,.0f}x")
    table.add_row("wfdb.rdsamp, one record per call", f"{wfdb_rate:,.0f} seg/s", f"{wfdb_rate / raw:.3f}", "1x")
    convert_rate = results["convert_records_per_s_1_process"]
    table.add_row("ecgfm shard, 1 process (500 Hz 10-s WFDB)", f"{convert_rate:,.0f} records/s", "", "")
    index = results["index"]
    table.add_row(
        f"index + split + epoch order, {index['segments']:,} segments in {index['shards']:,} shards",
        f"{index['index_mib']:,.0f} MiB resident",
        "",
        "",
    )
    console.print(table)
    if json_out:
        atomic_write_json(json_out, results)
    return results
