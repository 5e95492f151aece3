"""``ecgfm bench readers``: records/s of every reader converting the same recordings, each format written from the
same synthetic ECGs, with a check that every reader gave WFDB's segments and signal within its format's resolution."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from rich.console import Console
from rich.table import Table

from ecgfm.bench import record_formats
from ecgfm.bench.data import _read_files
from ecgfm.io import atomic_write_json
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES

#: The leads GE MUSE stores (it derives III, aVR, aVL, aVF from I and II).
MUSE_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
#: Samples 1000-1600 (1.2 s) stand in for the median beats that MUSE, aECG and DICOM exports carry.
MEDIAN = slice(1000, 1600)


@dataclass
class _Format:
    """One row: a format written from the recordings and the reader that converts it."""

    name: str  # the row, and its folder under the work directory
    reader: str  # convert's ``reader``
    stored: str  # how the format stores the samples, for the table
    #: the largest |Δ| µV from the WFDB run that the format's resolution allows: half its step for a stored lead, a
    #: whole step for a lead derived from two stored ones, plus 1 µV for each rounding to whole µV (the shard's, and
    #: the reference's own for a derived lead); 0 for a format that stores the µV exactly
    tolerance_uv: int
    #: writes one record: (folder, record name, index, mV [12, T]); None for ``arrays``, whose one array ``_write``
    #: fills with every record
    write: Callable[[Path, str, int, np.ndarray], None] | None
    finish: Callable[[Path, list[str]], dict[str, Any]] | None = None  # writes the tables, returns reader options
    options: dict[str, Any] = field(default_factory=dict)  # convert's reader_options (set by ``finish``)


def _wfdb(folder: Path, name: str, index: int, mv: np.ndarray) -> None:
    record_formats.write_wfdb(folder / name, mv, STANDARD_FS, STANDARD_LEADS)


def _challenge(folder: Path, name: str, index: int, mv: np.ndarray) -> None:
    record_formats.write_challenge(
        folder / name, mv, STANDARD_FS, STANDARD_LEADS, dx_codes=["426783006"], age=60, sex="M"
    )  # 426783006: sinus rhythm


def _ptbxl_folder(index: int) -> str:
    """``records500/00000/00001_hr``: PTB-XL's layout (ecg_id = index + 1, 1000 records per folder)."""
    ecg_id = index + 1
    return f"records500/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_hr"


def _ptbxl(folder: Path, name: str, index: int, mv: np.ndarray) -> None:
    path = folder / _ptbxl_folder(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    record_formats.write_wfdb(path, mv, STANDARD_FS, [lead.upper() for lead in STANDARD_LEADS])  # PTB-XL's AVR


def _ptbxl_tables(folder: Path, names: list[str]) -> dict[str, Any]:
    """ptbxl_database.csv (one row per record, every one normal sinus rhythm) and scp_statements.csv."""
    with open(folder / "ptbxl_database.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ecg_id", "patient_id", "age", "sex", "scp_codes", "strat_fold", "filename_lr", "filename_hr"])
        for index in range(len(names)):
            hr = _ptbxl_folder(index)
            lr = hr.replace("records500", "records100").replace("_hr", "_lr")
            writer.writerow(
                [index + 1, f"{index}.0", "60.0", "0", "{'NORM': 100.0, 'SR': 0.0}", index % 10 + 1, lr, hr]
            )
    with open(folder / "scp_statements.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "description", "diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"])
        writer.writerow(["NORM", "normal ECG", "1.0", "", "", "NORM", "NORM"])
        writer.writerow(["SR", "sinus rhythm", "", "", "1.0", "", ""])
    return {}


def _arrays_table(folder: Path, names: list[str]) -> dict[str, Any]:
    """The CSV beside ``ecgs.npy`` (one row per record, in array order) that the arrays reader needs."""
    (folder / "records.csv").write_text("record\n" + "".join(f"{name}\n" for name in names))
    return {"table": str(folder / "records.csv"), "units": "uV"}


def _cpsc2018(folder: Path, name: str, index: int, mv: np.ndarray) -> None:
    record_formats.write_cpsc2018(folder / f"{name}.mat", mv, STANDARD_FS, STANDARD_LEADS, sex="Male", age=60)


def _cpsc2018_reference(folder: Path, names: list[str]) -> dict[str, Any]:
    (folder / "REFERENCE.csv").write_text(
        "Recording,First_label,Second_label,Third_label\n" + "".join(f"{name},1,,\n" for name in names)
    )
    return {}


def _edf(folder: Path, name: str, index: int, mv: np.ndarray) -> None:
    record_formats.write_edf(
        folder / f"{name}.edf", mv, STANDARD_FS, STANDARD_LEADS, file_type="edf+", patient_code=name
    )


def _bdf(folder: Path, name: str, index: int, mv: np.ndarray) -> None:
    record_formats.write_edf(
        folder / f"{name}.bdf", mv, STANDARD_FS, STANDARD_LEADS, file_type="bdf+", patient_code=name
    )


def _muse(folder: Path, name: str, index: int, mv: np.ndarray) -> None:
    rows = mv[[STANDARD_LEADS.index(lead) for lead in MUSE_LEADS]]
    record_formats.write_muse(
        folder / f"{name}.xml", rows, STANDARD_FS, MUSE_LEADS, median_mv=rows[:, MEDIAN], patient_id=name,
        age=60, sex="M", statements=["Sinus rhythm", "Normal ECG"],
    )  # fmt: skip


def _aecg(folder: Path, name: str, index: int, mv: np.ndarray) -> None:
    record_formats.write_aecg(
        folder / f"{name}.xml", mv, STANDARD_FS, STANDARD_LEADS, median_mv=mv[:, MEDIAN], subject_id=name, sex="M"
    )


def _dicom(folder: Path, name: str, index: int, mv: np.ndarray) -> None:
    record_formats.write_dicom(
        folder / f"{name}.dcm", mv, STANDARD_FS, STANDARD_LEADS, median_mv=mv[:, MEDIAN], patient_id=name, age=60,
        sex="M",
    )  # fmt: skip


def all_formats() -> list[_Format]:
    """Every row, WFDB (the baseline) first."""
    return [
        _Format("wfdb", "wfdb", "WFDB 16, 1 µV", 0, _wfdb),
        _Format("challenge", "challenge", "MAT v4 int16, 1 µV", 0, _challenge),
        _Format("ptbxl", "ptbxl", "WFDB 16 + 2 CSVs", 0, _ptbxl, finish=_ptbxl_tables),
        _Format("arrays", "arrays", ".npy int16 µV + CSV", 0, None, finish=_arrays_table),
        _Format("cpsc2018", "cpsc2018", ".mat float64 mV", 0, _cpsc2018, finish=_cpsc2018_reference),
        _Format("edf", "edf", "EDF+ 16 bit", 1, _edf),
        _Format("bdf", "edf", "BDF+ 24 bit", 1, _bdf),
        _Format("muse_xml", "muse_xml", "int16 x 4.88 µV, 8 leads", 7, _muse),
        _Format("aecg_xml", "aecg_xml", "digits x 5 µV", 3, _aecg),
        _Format("dicom", "dicom", "int16 x 2.44 µV", 2, _dicom),
    ]


def _write(root: Path, chosen: list[_Format], n: int, seed: int) -> None:
    """The same ``n`` synthetic recordings (500 Hz, 10 s, 12 leads, whole µV) in every chosen format."""
    from ecgfm.data.synthetic import synthesize

    names = [f"rec{i:06d}" for i in range(n)]
    for fmt in chosen:
        (root / fmt.name).mkdir(parents=True, exist_ok=True)
    shape = (n, len(STANDARD_LEADS), STANDARD_N_SAMPLES)
    stacked = None
    if any(fmt.name == "arrays" for fmt in chosen):
        stacked = np.lib.format.open_memmap(root / "arrays" / "ecgs.npy", mode="w+", dtype=np.int16, shape=shape)
    for start in range(0, n, 256):
        signals, _ = synthesize(min(256, n - start), seed=seed + start)
        for offset, signal in enumerate(signals):
            index = start + offset
            uv = np.clip(np.rint(signal.astype(np.float64) * 1000.0), -32767, 32767)
            mv = uv / 1000.0  # whole µV: every format starts from the values WFDB stores exactly
            for fmt in chosen:
                if fmt.write is not None:
                    fmt.write(root / fmt.name, names[index], index, mv)
            if stacked is not None:
                stacked[index] = uv.astype(np.int16)
    if stacked is not None:
        stacked.flush()
        del stacked
    for fmt in chosen:
        if fmt.finish is not None:
            fmt.options = fmt.finish(root / fmt.name, names)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _shard_signals(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every segment's int16 µV signal and lead mask, in manifest order."""
    from ecgfm.data.shards import Manifest

    signals, masks = [], []
    for shard in Manifest.load(out).shards:
        with h5py.File(out / shard["path"], "r") as f:
            signals.append(f["signal"][:])
            masks.append(f["lead_mask"][:])
    if not signals:
        leads = len(STANDARD_LEADS)
        return np.zeros((0, leads, STANDARD_N_SAMPLES), np.int16), np.zeros((0, leads), bool)
    return np.concatenate(signals), np.concatenate(masks)


def run_readers_benchmark(
    records: int = 256,
    repeats: int = 2,
    formats: list[str] | None = None,
    records_per_shard: int = 1024,
    workdir: str | None = None,
    json_out: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Write the same synthetic recordings (500 Hz, 10 s, 12 leads) in every format ecgfm reads and convert each
    with its reader, in this one process (``ecgfm shard``'s ``convert``, workers=0), on a hot page cache.

    Prints files, MB on disk, seconds (best of ``repeats``), records/s, records/s per core (= records/s: one process),
    the ratio to WFDB and the largest |Δ| µV of the shards' signal from the WFDB run's; ``formats`` picks rows
    (``wfdb``, the baseline, always runs).
    """
    from ecgfm.data.convert import convert
    from ecgfm.registry import SOURCES

    console = console or Console(width=max(Console().width, 150))
    every = all_formats()
    known = [fmt.name for fmt in every]
    unknown = sorted(set(formats or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; known: {', '.join(known)}")
    chosen = [fmt for fmt in every if formats is None or fmt.name in formats or fmt.name == "wfdb"]
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ecgfm-bench-readers-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"records": records, "repeats": repeats, "cpus": os.cpu_count(), "readers": {}}
    try:
        console.print(f"writing {records} recordings (500 Hz, 10 s, 12 leads) in {len(chosen)} formats to {tmp}")
        _write(tmp, chosen, records, seed=0)
        for fmt in chosen:  # imports, reader caches and the page cache warm before any timing
            _read_files(_files(tmp / fmt.name))
            reader = SOURCES.create(fmt.reader, **fmt.options)
            reader.read(reader.find_records(tmp / fmt.name)[0])
        seconds: dict[str, list[float]] = {fmt.name: [] for fmt in chosen}
        summaries: dict[str, Any] = {}
        for _ in range(repeats):  # interleaved: a noisy neighbour slows every reader alike
            for fmt in chosen:
                out = tmp / "out" / fmt.name
                shutil.rmtree(out, ignore_errors=True)  # a rerun would reuse the finished shards
                start = time.perf_counter()
                summaries[fmt.name] = convert(
                    tmp / fmt.name,
                    out,
                    reader=fmt.reader,
                    reader_options=fmt.options or None,
                    records_per_shard=records_per_shard,
                    workers=0,
                    progress=False,
                )
                seconds[fmt.name].append(time.perf_counter() - start)
        reference, reference_mask = _shard_signals(tmp / "out" / "wfdb")
        for fmt in chosen:
            files = _files(tmp / fmt.name)
            summary = summaries[fmt.name]
            signal, mask = _shard_signals(tmp / "out" / fmt.name)
            same_shape = signal.shape == reference.shape
            diff = (
                int(np.abs(signal.astype(np.int32) - reference.astype(np.int32)).max())
                if same_shape and signal.size
                else None
            )
            best = min(seconds[fmt.name])
            results["readers"][fmt.name] = {
                "reader": fmt.reader,
                "stored": fmt.stored,
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
                "seconds": best,
                "seconds_all": seconds[fmt.name],
                "records_per_s": records / best,
                "records_per_s_per_core": records / best,  # convert ran in one process
                "records_read": summary.records_read,
                "segments": summary.segments_written,
                "skipped": len(summary.skipped),
                "max_abs_diff_uv": diff,
                "tolerance_uv": fmt.tolerance_uv,
                "same_signal": bool(
                    same_shape and diff is not None and diff <= fmt.tolerance_uv and (mask == reference_mask).all()
                ),
            }
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = results["readers"]
    baseline = rows["wfdb"]["records_per_s"]
    for row in rows.values():
        row["vs_wfdb"] = row["records_per_s"] / baseline
    results["all_same"] = all(
        row["same_signal"] and row["records_read"] == records and row["segments"] == records for row in rows.values()
    )
    title = (
        f"ecgfm bench readers ({records} recordings, 500 Hz, 10 s, 12 leads; {os.cpu_count()} CPUs, hot page cache; "
        "convert in one process, so records/s per core = records/s)"
    )
    table = Table(title=title)
    columns = ("format", "reader", "stored as", "files", "MB on disk", "seconds", "records/s", "records/s per core")
    for column in (*columns, "vs wfdb", "max |Δ| µV vs wfdb"):
        table.add_column(column, justify="left" if column in columns[:3] else "right", no_wrap=column in columns[:3])
    for name, row in rows.items():
        diff = "n/a" if row["max_abs_diff_uv"] is None else f"{row['max_abs_diff_uv']} (≤ {row['tolerance_uv']})"
        table.add_row(
            name,
            row["reader"],
            row["stored"],
            f"{row['files']:,}",
            f"{row['bytes'] / 1e6:,.1f}",
            f"{row['seconds']:.2f}",
            f"{row['records_per_s']:,.0f}",
            f"{row['records_per_s_per_core']:,.0f}",
            f"{row['vs_wfdb']:.2f}x",
            diff if row["same_signal"] else f"[red]{diff}[/red]",
        )
    console.print(table)
    bad = [name for name, row in rows.items() if not (row["same_signal"] and row["segments"] == records)]
    console.print(
        f"every reader converted the {records} recordings into {records} segments within its format's resolution "
        f"of the WFDB signal: {results['all_same']}" + (f" (not: {', '.join(bad)})" if bad else "")
    )
    if json_out:
        atomic_write_json(json_out, results)
    return results
