"""``ecgfm bench shard``: conversion records/s per core, and the speed-up of an N-part conversion (N processes on this
machine, as ``ecgfm shard --part K/N`` runs on N nodes) over one process, both measured in the same run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ecgfm.bench.data import _read_files, _write_wfdb_records
from ecgfm.io import atomic_write_json

_PART = (
    "import sys, time; from ecgfm.data.convert import convert; start = time.perf_counter(); "
    "convert(sys.argv[1], sys.argv[2], records_per_shard=int(sys.argv[3]), progress=False, part=sys.argv[4]); "
    "print(time.perf_counter() - start)"
)


def _run_parts(source: Path, out: Path, n: int, records_per_shard: int) -> tuple[float, float]:
    """(wall seconds, conversion seconds) of N ``--part K/N`` processes started together, then the merge; the
    conversion seconds leave out Python's start and imports (the slowest part's conversion + the merge)."""
    from ecgfm.data.parts import merge_parts

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PART, str(source), str(out), str(records_per_shard), f"{k}/{n}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(n)
    ]
    outputs = [proc.communicate()[0] for proc in procs]
    failed = [k for k, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        raise RuntimeError(f"bench shard: part(s) {failed} of {n} failed (see the output above)")
    merge_start = time.perf_counter()
    merge_parts(out)
    end = time.perf_counter()
    slowest = max(float(text.strip().splitlines()[-1]) for text in outputs)
    return end - start, slowest + end - merge_start


def run_shard_benchmark(
    records: int = 2048,
    parts: int = 0,
    records_per_shard: int = 64,
    repeats: int = 1,
    workdir: str | None = None,
    json_out: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Convert the same synthetic WFDB records (500 Hz, 10 s, 12 leads) with 1 process and with ``parts``
    processes (0: one per CPU, at least 2), each part its own ``--part K/N`` process, then the merge.

    Prints records/s, records/s per core and the speed-up; the best of ``repeats`` runs of each.
    """
    console = console or Console(width=max(Console().width, 120))
    n = parts or max(2, os.cpu_count() or 1)
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ecgfm-bench-shard-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"records": records, "parts": n, "cpus": os.cpu_count()}
    try:
        source = tmp / "wfdb"
        console.print(f"writing {records} WFDB records (500 Hz, 10 s, 12 leads) to {source}")
        _write_wfdb_records(source, records, seed=0)
        _read_files(sorted(source.iterdir()))  # hot page cache for both runs
        one, many = [], []
        for _ in range(repeats):  # interleaved: a noisy neighbour slows both alike
            one.append(_run_parts(source, tmp / "one", 1, records_per_shard))
            many.append(_run_parts(source, tmp / "many", n, records_per_shard))
        same = (tmp / "one" / "manifest.json").read_bytes() == (tmp / "many" / "manifest.json").read_bytes()
        results["manifests_equal"] = same
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"ecgfm bench shard ({records} WFDB records, {os.cpu_count()} CPUs, hot page cache)")
    for column in ("run", "timing", "seconds", "records/s", "records/s per core", "speed-up"):
        table.add_column(column, justify="left" if column in ("run", "timing") else "right")
    for which, column in (("wall", 0), ("conversion", 1)):
        t_one, t_many = min(t[column] for t in one), min(t[column] for t in many)
        rate_one, rate_many = records / t_one, records / t_many
        results[which] = {
            "seconds_1_process": t_one,
            "seconds_n_parts": t_many,
            "records_per_s_1_process": rate_one,
            "records_per_s_n_parts": rate_many,
            "records_per_s_per_core_n_parts": rate_many / n,
            "speedup": rate_many / rate_one,
        }
        label = "wall (with Python start)" if which == "wall" else "conversion + merge"
        table.add_row("1 process (--part 0/1)", label, f"{t_one:.2f}", f"{rate_one:,.0f}", f"{rate_one:,.0f}", "1.00x")
        table.add_row(
            f"{n} parts, {n} processes (--part K/{n})",
            label,
            f"{t_many:.2f}",
            f"{rate_many:,.0f}",
            f"{rate_many / n:,.0f}",
            f"{rate_many / rate_one:.2f}x",
        )
    console.print(table)
    console.print(f"merged manifest of {n} parts equals the 1-process one: {same}")
    if json_out:
        atomic_write_json(json_out, results)
    return results
