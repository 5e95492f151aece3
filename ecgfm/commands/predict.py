"""``ecgfm predict --model NAME_OR_DIR RECORD_OR_FOLDER...``: a published, zoo or exported model on raw records (WFDB,
Challenge ``.mat``, array exports), one prediction per record; ``--runtime onnx`` never imports torch."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ecgfm.data.sources.arrays import ARRAY_SUFFIXES
from ecgfm.data.sources.base import RecordError, SourceReader, header_path
from ecgfm.evaluation.aggregate import AGGREGATIONS, aggregate_windows, window_rows
from ecgfm.io import atomic_write_csv, atomic_write_json
from ecgfm.leads import parse_leads
from ecgfm.record_windows import RecordWindows, model_windows, read_input_contract
from ecgfm.registry import SOURCES, MissingOptionError

#: Output columns the table shows; the rest are in --output.
TABLE_COLUMNS = 6
#: Skipped records and warnings listed on stderr; every one is in the --output's *-skipped.csv or JSON.
LISTED = 50

EPILOG = """\
records:
  Each RECORD_OR_FOLDER is a record (x.hea, or x without a suffix; a Challenge x.mat beside its x.hea), an array
  export (.npy, .npz, .h5, .hdf5; give its CSV with --reader-option table=FILE.csv, and fs=, lead_names=, units=
  where they are not 500 Hz, the 12 standard leads in mV), or a folder: every .hea record under it, sorted.
  --reader auto picks per record: a header whose signal file is .mat -> challenge, another header -> wfdb,
  an array file -> arrays.

what the model sees:
  Leads are taken by name in the model's order; other signals (Frank leads, respiration) are ignored. A lead the
  model reads that the record lacks, or holds flat or all NaN, fails the record, unless the model card lists a
  smaller lead set (lead_subsets) the record covers: then it is zero-filled and masked, with a warning. Scattered
  NaN samples are set to 0 (a warning). The record is resampled to the model's rate and cut into full windows
  (10 s for ECGFounder models); a tail shorter than a window is dropped, a record shorter than one window fails.

output:
  One row per record: record_id, path, n_windows and every output under its public name, the unit in the name
  (p_<label> probabilities, <label> decisions 0/1 at the model's stored thresholds, potassium_mmol_l).
  --aggregate mean (default) averages the windows' probabilities and values and decides again on the average;
  max takes the largest; none gives one row per window with its start in seconds. Without --output a table is
  printed; --output FILE.csv or FILE.json writes them all (JSON adds the model's input contract), and
  FILE-skipped.csv beside it lists the records that could not be predicted, with the reason.

exit status:
  0 when every record was predicted; 1 when any could not be read or served (the others are still predicted
  and written) or on an error; 2 for a mistake in the options.

To predict with a training recipe over shards instead: ecgfm predict -c RECIPE --ckpt_path CKPT (Lightning's CLI;
`ecgfm predict -c RECIPE --help` lists its options).
"""


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecgfm predict",
        exit_on_error=False,  # ecgfm.commands.main prints one line
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a published, zoo or exported model on raw ECG records: one prediction per record.",
        epilog=EPILOG,
    )
    parser.add_argument("inputs", nargs="+", metavar="RECORD_OR_FOLDER", help="records, array files or folders")
    parser.add_argument(
        "--model",
        required=True,
        help="a zoo name (`ecgfm zoo list`), a published model folder or a .ckpt; with --runtime onnx an exported "
        "folder (model.onnx + contract.json)",
    )
    parser.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default="torch",
        help="torch (default) or onnx: ONNX Runtime on an exported model, with no torch import",
    )
    parser.add_argument(
        "--reader", choices=("auto", "wfdb", "challenge", "arrays"), default="auto", help="record format (auto)"
    )
    parser.add_argument(
        "--reader-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the reader (the arrays reader with --reader auto), value in YAML: table=x.csv, fs=250",
    )
    parser.add_argument(
        "--aggregate",
        choices=AGGREGATIONS,
        default=None,
        help="windows -> record: mean (the model's default), max, or none (one row per window)",
    )
    parser.add_argument("--output", type=Path, default=None, help="FILE.csv or FILE.json; default: print a table")
    parser.add_argument("--batch-size", type=int, default=64, help="windows per forward pass, across records (64)")
    parser.add_argument("--device", default="cpu", help="torch device with --runtime torch (cpu, cuda, cuda:1)")
    parser.add_argument(
        "--allow-download", action="store_true", help="let a zoo name download from the Hugging Face hub"
    )
    return parser


# ----------------------------------------------------------------------------------------------- the model


@dataclass
class ServedModel:
    """What predict needs of a model, read from its published config: the same for ECGModel and OnnxModel."""

    model: Any  # predict_numpy(signal [B, L, T] float32, lead_mask [B, L] bool) -> {output: [B]}
    name: str
    input_contract: dict[str, Any]
    outputs: dict[str, dict[str, Any]]  # public name -> {head, key, type, unit}
    output_names: list[str]
    rules: list[dict[str, Any]]
    lead_subsets: list[tuple[str, ...]]
    aggregation: str

    @classmethod
    def of(cls, model: Any, source: str) -> ServedModel:
        config = model.published_config()
        names = list(model.output_names())
        if not names:
            raise ValueError(
                f"the model {source} has no outputs (a backbone without task heads): ecgfm predict needs a model "
                "with heads; ECGModel.features gives a backbone's features"
            )
        input_contract = dict((config.get("contract") or {}).get("input") or config.get("input") or {})
        if not input_contract:
            raise ValueError(f"the model {source} publishes no input contract (contract.input): cannot cut windows")
        read_input_contract(input_contract)  # units, rate and length checked before any record is read
        subsets = [parse_leads(list(s)) for s in (config.get("card") or {}).get("lead_subsets") or []]
        return cls(
            model=model,
            name=str(config.get("name") or source),
            input_contract=input_contract,
            outputs=dict(config.get("outputs") or {}),
            output_names=names,
            rules=list(config.get("decisions") or []),
            lead_subsets=subsets,
            aggregation=str(config.get("aggregation") or "mean"),
        )

    @property
    def decisions(self) -> set[str]:
        return {rule["output"] for rule in self.rules}

    @property
    def score_names(self) -> list[str]:
        return [name for name in self.output_names if name not in self.decisions]


def load_model(name_or_dir: str, runtime: str, device: str = "cpu", allow_download: bool = False) -> Any:
    """The model behind ``--model``: ``ecgfm.pretrained.load`` (torch), or ``ecgfm.onnx_model.OnnxModel`` (no torch)."""
    if runtime == "onnx":
        if device != "cpu":
            raise ValueError(f"--device {device} is for --runtime torch; --runtime onnx runs on the CPU")
        if allow_download:
            raise ValueError("--allow-download is for zoo names with --runtime torch; an exported model is a folder")
        try:
            from ecgfm.onnx_model import OnnxModel  # here: the torch runtime never needs onnxruntime
        except ModuleNotFoundError as err:
            if err.name == "onnxruntime":
                raise ValueError("--runtime onnx needs onnxruntime: pip install onnxruntime") from None
            raise
        return OnnxModel(name_or_dir)
    from ecgfm.pretrained import load  # here: the ONNX path never imports torch

    return load(name_or_dir, allow_download=allow_download, map_location=device)


# ----------------------------------------------------------------------------------------------- the records


@dataclass
class RecordInput:
    """One record to predict: the path its reader reads (a header path minus ``.hea``, or ``<array>#<row>``)."""

    path: Path
    reader: str


class Readers:
    """One reader per format, made on first use; ``options`` go to the reader named by ``--reader`` (the arrays
    reader under ``auto``: the others need none to predict)."""

    def __init__(self, choice: str, options: Mapping[str, Any]) -> None:
        self.choice = choice
        self.options = dict(options)
        self._made: dict[str, SourceReader] = {}

    def get(self, name: str) -> SourceReader:
        if name not in self._made:
            takes_options = name == self.choice or (self.choice == "auto" and name == "arrays")
            options = self.options if takes_options else {}
            try:
                self._made[name] = SOURCES.create(name, **options)
            except MissingOptionError as err:
                example = " ".join(f"--reader-option {option}=..." for option in err.missing)
                raise MissingOptionError(
                    f"reader {name!r} needs the option{'s' if len(err.missing) > 1 else ''} "
                    f"{', '.join(map(repr, err.missing))} ({example})",
                    err.kind,
                    err.name,
                    err.missing,
                ) from None
        return self._made[name]


def parse_reader_options(items: Sequence[str]) -> dict[str, Any]:
    """``["table=x.csv", "fs=250", "lead_names=[I, II]"]`` -> options, each value read as YAML."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--reader-option {item!r}: expected KEY=VALUE (table=records.csv, fs=250)")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def auto_reader(record: Path) -> str:
    """``challenge`` for a header whose signal file is a ``.mat``, else ``wfdb`` (which names what is wrong)."""
    try:
        lines = header_path(record).read_text(errors="replace").splitlines()
    except OSError:
        return "wfdb"
    body = [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(body) > 1 and body[1] and body[1][0].lower().endswith(".mat"):
        return "challenge"
    return "wfdb"


def find_inputs(arguments: Sequence[str], readers: Readers) -> tuple[list[RecordInput], list[tuple[str, str]]]:
    """Each argument as records to read, in order (a folder's sorted), and ``(argument, reason)`` for those that name
    no record; a record named twice is read once."""
    found: list[RecordInput] = []
    problems: list[tuple[str, str]] = []
    choice = readers.choice
    for argument in arguments:
        path = Path(argument)
        is_array = path.suffix.lower() in ARRAY_SUFFIXES or _is_array_row(argument)
        if path.is_dir():
            name = "wfdb" if choice == "auto" else choice
            reader = readers.get(name)  # outside the try: a reader's wrong options stop the run
            try:
                records = reader.find_records(path)
            except (OSError, ValueError, RecordError) as err:
                problems.append((argument, str(err)))
                continue
            if not records:
                what = "array file" if name == "arrays" else ".hea record"
                problems.append((argument, f"{path}: no {what} under this folder"))
            found += [RecordInput(r, choice if choice != "auto" else auto_reader(r)) for r in records]
        elif choice == "arrays" or (choice == "auto" and is_array):
            if _is_array_row(argument):
                found.append(RecordInput(path, "arrays"))
                continue
            reader = readers.get("arrays")
            try:
                found += [RecordInput(r, "arrays") for r in reader.find_records(path)]
            except (OSError, ValueError, RecordError) as err:
                problems.append((argument, str(err)))
        else:
            record = _record_base(path)
            if record is None:
                reason = "no header beside it and not an array file" if path.exists() else "no such file or folder"
                problems.append((argument, f"{path}: {reason} (a record is x.hea, x or a .mat beside its .hea)"))
                continue
            found.append(RecordInput(record, choice if choice != "auto" else auto_reader(record)))
    unique: dict[str, RecordInput] = {}
    for item in found:
        unique.setdefault(str(item.path), item)
    return list(unique.values()), problems


def _is_array_row(argument: str) -> bool:
    file, sep, row = argument.rpartition("#")
    return bool(sep) and row.isdigit() and Path(file).suffix.lower() in ARRAY_SUFFIXES


def _record_base(path: Path) -> Path | None:
    """The record (header path minus ``.hea``) ``path`` names: ``x.hea``, ``x``, or a data file beside ``x.hea``."""
    if path.suffix == ".hea" and path.is_file():
        return path.with_suffix("")
    if header_path(path).is_file():
        return path
    if path.suffix and header_path(path.with_suffix("")).is_file():
        return path.with_suffix("")
    return None


# ----------------------------------------------------------------------------------------------- batches


class WindowBatches:
    """Windows of many records through the model ``batch_size`` at a time (a record may span batches, a batch
    several records); a record comes out once all its windows have outputs."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.windows: dict[int, RecordWindows] = {}
        self.parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self.pending: list[tuple[int, int, int]] = []  # (record key, first window, end) waiting for a batch
        self.n_pending = 0
        self.finished: list[int] = []

    def add(self, key: int, windows: RecordWindows) -> None:
        self.windows[key] = windows
        self.parts[key] = []
        self.pending.append((key, 0, windows.n_windows))
        self.n_pending += windows.n_windows
        while self.n_pending >= self.batch_size:
            self._run()

    def flush(self) -> None:
        while self.n_pending:
            self._run()

    def done(self) -> list[tuple[int, RecordWindows, dict[str, np.ndarray]]]:
        """The records finished since the last call: (key, windows, {output: [W]})."""
        out = []
        for key in self.finished:
            parts = self.parts.pop(key)
            outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
            out.append((key, self.windows.pop(key), outputs))
        self.finished = []
        return out

    def _run(self) -> None:
        taken: list[tuple[int, int, int]] = []
        n = 0
        while self.pending and n < self.batch_size:
            key, first, end = self.pending[0]
            stop = min(end, first + self.batch_size - n)
            taken.append((key, first, stop))
            n += stop - first
            if stop == end:
                self.pending.pop(0)
            else:
                self.pending[0] = (key, stop, end)
        self.n_pending -= n
        signal = np.concatenate([self.windows[k].signal[a:b] for k, a, b in taken]).astype(np.float32, copy=False)
        mask = np.concatenate([self.windows[k].lead_mask[a:b] for k, a, b in taken]).astype(bool, copy=False)
        outputs = {name: np.asarray(value).reshape(n) for name, value in self.model.predict_numpy(signal, mask).items()}
        offset = 0
        for key, first, stop in taken:
            self.parts[key].append({name: value[offset : offset + stop - first] for name, value in outputs.items()})
            offset += stop - first
            if stop == self.windows[key].n_windows:
                self.finished.append(key)


# ----------------------------------------------------------------------------------------------- predicting


@dataclass
class RecordPrediction:
    """One record's prediction: one row (aggregated) or one per window (``--aggregate none``)."""

    record_id: str
    path: str
    n_windows: int
    rows: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def predict_records(
    served: ServedModel,
    inputs: Sequence[RecordInput],
    readers: Readers,
    method: str = "mean",
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[list[RecordPrediction], list[tuple[str, str]]]:
    """Read, window, batch, run and aggregate every record; ``(predictions in input order, (path, reason) of the
    records that could not be read or served)``. One bad record never stops the others."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    batches = WindowBatches(served.model, batch_size)
    results: dict[int, RecordPrediction] = {}
    skipped: list[tuple[str, str]] = []

    def collect() -> None:
        for key, windows, outputs in batches.done():
            if method == "none":
                rows = window_rows(outputs, windows.start_seconds())
            else:
                rows = [aggregate_windows(outputs, served.score_names, served.rules, method)]
            rows = [{k: v for k, v in row.items() if k != "n_windows"} for row in rows]
            results[key] = RecordPrediction(
                windows.record_id, str(windows.path), windows.n_windows, rows, windows.warnings
            )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    with bar:
        task = bar.add_task(f"predicting with {served.name}", total=len(inputs))
        for key, item in enumerate(inputs):
            reader = readers.get(item.reader)  # outside the try: a reader missing its options stops the run
            try:
                record = reader.read(item.path)
                windows = model_windows(record, served.input_contract, served.lead_subsets)
            except RecordError as err:
                skipped.append((str(item.path), str(err)))
            except Exception as err:  # a reader bug must not stop a batch of records; it is reported, as shard does
                skipped.append((str(item.path), f"{item.path}: unexpected {type(err).__name__}: {err}"))
            else:
                batches.add(key, windows)
                collect()
            bar.advance(task)
        batches.flush()
        collect()
    return [results[key] for key in sorted(results)], skipped


def image_inputs(arguments: Sequence[str]) -> list[Path] | None:
    """The image files the arguments name (a folder's, sorted), or None when they name records: an argument list
    is all images (files, or folders holding images and no .hea record) or all records."""
    from ecgfm.image_preprocessing import IMAGE_SUFFIXES

    def images_in(folder: Path) -> list[Path]:
        if any(folder.rglob("*.hea")):
            return []
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    found = [
        [Path(a)] if Path(a).suffix.lower() in IMAGE_SUFFIXES else images_in(Path(a)) if Path(a).is_dir() else []
        for a in arguments
    ]
    if not any(found):
        return None
    others = [a for a, images in zip(arguments, found, strict=True) if not images]
    if others:
        raise ValueError(f"give image files or records, not both: {', '.join(others[:3])} are not images")
    return list(dict.fromkeys(path for images in found for path in images))


def predict_images(
    served: ServedModel, paths: Sequence[Path], batch_size: int = 64, progress: bool = False
) -> tuple[list[RecordPrediction], list[tuple[str, str]]]:
    """Each image file as one page through the model's own image preprocessing: one row per image."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ecgfm.image_preprocessing import ImageFileError

    model = served.model
    if not getattr(model, "reads_images", False):
        raise ValueError(
            f"the model {served.name} reads signals, not images (image files need a model with an image-* backbone "
            "and --runtime torch)"
        )
    predictions: list[RecordPrediction] = []
    skipped: list[tuple[str, str]] = []
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    with bar:
        task = bar.add_task(f"predicting with {served.name}", total=len(paths))
        for start in range(0, len(paths), batch_size):
            pages, read = [], []
            for path in paths[start : start + batch_size]:
                try:
                    pages.append(model.read_image_pages([path])[0])
                    read.append(path)
                except ImageFileError as err:
                    skipped.append((str(path), str(err)))
                bar.advance(task)
            if not pages:
                continue
            outputs = model.predict_pages_numpy(np.stack(pages))
            for i, path in enumerate(read):
                row = {name: float(np.asarray(outputs[name]).reshape(-1)[i]) for name in served.output_names}
                predictions.append(RecordPrediction(path.stem, str(path), 1, [row]))
    return predictions, skipped


# ----------------------------------------------------------------------------------------------- writing


def _value(value: float, decision: bool) -> float | int | None:
    if not math.isfinite(value):
        return None
    return int(value) if decision else value


def record_rows(served: ServedModel, predictions: Sequence[RecordPrediction], method: str) -> tuple[list[str], list]:
    """CSV header and rows: record_id, path, n_windows (or window, start_s), then every output."""
    decisions = served.decisions
    first = ["record_id", "path", "window", "start_s"] if method == "none" else ["record_id", "path", "n_windows"]
    rows = []
    for prediction in predictions:
        for row in prediction.rows:
            lead = [prediction.record_id, prediction.path]
            lead += [row["window"], row["start_s"]] if method == "none" else [prediction.n_windows]
            values = [_value(row[name], name in decisions) for name in served.output_names]
            rows.append([*lead, *("" if v is None else v for v in values)])
    return [*first, *served.output_names], rows


def write_json(
    path: Path,
    served: ServedModel,
    predictions: Sequence[RecordPrediction],
    skipped: Sequence[tuple[str, str]],
    method: str,
    runtime: str,
) -> None:
    decisions = served.decisions

    def outputs(row: Mapping[str, Any]) -> dict[str, Any]:
        return {name: _value(row[name], name in decisions) for name in served.output_names}

    records = []
    for p in predictions:
        entry: dict[str, Any] = {"record_id": p.record_id, "path": p.path, "n_windows": p.n_windows}
        if method == "none":
            entry["windows"] = [{"window": r["window"], "start_s": r["start_s"], **outputs(r)} for r in p.rows]
        else:
            entry["outputs"] = outputs(p.rows[0])
        entry["warnings"] = list(p.warnings)
        records.append(entry)
    atomic_write_json(
        path,
        {
            "model": served.name,
            "runtime": runtime,
            "aggregate": method,
            "input": served.input_contract,
            "outputs": served.outputs,
            "records": records,
            "skipped": [{"path": p, "reason": reason} for p, reason in skipped],
        },
    )


def skipped_path(output: Path) -> Path:
    """``out.csv`` -> ``out-skipped.csv`` beside it."""
    return output.with_name(f"{output.stem}-skipped.csv")


def print_table(served: ServedModel, predictions: Sequence[RecordPrediction], method: str) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = served.output_names[:TABLE_COLUMNS]
    more = len(served.output_names) - len(shown)
    table = Table(title=f"ecgfm predict: {served.name}", caption=f"{more} more columns in --output" if more else None)
    table.add_column("record")
    for column in ("window", "start_s") if method == "none" else ("windows",):
        table.add_column(column, justify="right")
    for name in shown:
        table.add_column(name, justify="right")
    decisions = served.decisions
    for p in predictions:
        for row in p.rows:
            lead = [str(row["window"]), f"{row['start_s']:g}"] if method == "none" else [str(p.n_windows)]
            cells = [_value(row[name], name in decisions) for name in shown]
            table.add_row(p.record_id, *lead, *("nan" if c is None else f"{c:.4g}" for c in cells))
    Console().print(table)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _reason(path: str, reason: str) -> str:
    return reason if path in reason else f"{path}: {reason}"


def report(predictions: Sequence[RecordPrediction], skipped: Sequence[tuple[str, str]], where: Path | None) -> None:
    """Warnings, then the records that could not be predicted, on stderr."""
    warnings = [(p.path, w) for p in predictions for w in p.warnings]
    for path, warning in warnings[:LISTED]:
        print(f"warning: {path}: {warning}", file=sys.stderr)
    if len(warnings) > LISTED:
        print(f"warning: ... {len(warnings) - LISTED} more warnings", file=sys.stderr)
    if skipped:
        total = len(predictions) + len(skipped)
        listed = f" (all in {skipped_path(where)})" if where is not None else ""
        print(
            f"ecgfm predict: {len(skipped)} of {_plural(total, 'record')} could not be predicted{listed}:",
            file=sys.stderr,
        )
        for path, reason in skipped[:LISTED]:
            print(f"  {_reason(path, reason)}", file=sys.stderr)
        if len(skipped) > LISTED:
            print(f"  ... {len(skipped) - LISTED} more", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- the command


def run(argv: list[str]) -> int:
    args = predict_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    output: Path | None = args.output
    if output is not None and output.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--output {output}: write a .csv or a .json file")
    readers = Readers(args.reader, parse_reader_options(args.reader_option))
    served = ServedModel.of(load_model(args.model, args.runtime, args.device, args.allow_download), args.model)
    images = image_inputs(args.inputs)
    method = args.aggregate or served.aggregation
    if method not in AGGREGATIONS:
        raise ValueError(f"the model's config asks for aggregation {method!r}; choose one with --aggregate")
    if images is not None:  # one page per image: nothing to aggregate
        method, skipped = "mean", []
        predictions, failed = predict_images(served, images, args.batch_size, sys.stderr.isatty())
    else:
        inputs, skipped = find_inputs(args.inputs, readers)
        predictions, failed = predict_records(served, inputs, readers, method, args.batch_size, sys.stderr.isatty())
    skipped = [*skipped, *failed]
    if not predictions:  # nothing to show: one error line (the list above it when there are several)
        if len(skipped) == 1:
            raise ValueError(f"no record could be predicted with {served.name}: {_reason(*skipped[0])}")
        report(predictions, skipped, None)
        raise ValueError(f"no record could be predicted with {served.name}: all {len(skipped)} failed (listed above)")
    if output is None:
        print_table(served, predictions, method)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix.lower() == ".json":
            write_json(output, served, predictions, skipped, method, args.runtime)
        else:
            atomic_write_csv(output, *record_rows(served, predictions, method))
        atomic_write_csv(skipped_path(output), ("record", "reason"), skipped)
    report(predictions, skipped, output)
    n_windows = sum(p.n_windows for p in predictions)
    written = f"; wrote {output}" if output is not None else ""
    counts = f"{_plural(len(predictions), 'record')} ({_plural(n_windows, 'window')})"
    print(f"predicted {counts} with {served.name}{written}", file=sys.stderr)
    return 1 if skipped else 0
