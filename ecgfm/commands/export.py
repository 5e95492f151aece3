"""``ecgfm export MODEL --format onnx|torchscript --out DIR``: one graph with the preprocessing and the heads'
post-processing inside, ``contract.json`` beside it, and a parity check against PyTorch on shipped recordings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_parser() -> argparse.ArgumentParser:
    from ecgfm.export import EXPORT_FORMATS, PARITY_TOLERANCE

    parser = argparse.ArgumentParser(
        prog="ecgfm export",
        exit_on_error=False,  # ecgfm.commands.main prints one line
        description="Export a model as one graph (raw mV [batch, leads, samples] in, named outputs out) with "
        "contract.json beside it, then check it against the PyTorch model on the LUDB recordings that ship with "
        f"ecgfm: any output further than {PARITY_TOLERANCE:g} (max abs) fails the command.",
    )
    parser.add_argument("model", help="a published model folder, a FineTuneTask .ckpt or a zoo name")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="onnx or torchscript")
    parser.add_argument("--out", required=True, help="the folder to write the model file and contract.json into")
    parser.add_argument(
        "--check-records", type=int, default=8, help="shipped LUDB recordings the parity check runs (0: skip it)"
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--allow-download", action="store_true", help="fetch a zoo model from the hub if not local")
    return parser


def run(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from ecgfm.export import export_model, load_exported, parity_check, shipped_records
    from ecgfm.onnx_model import CONTRACT_NAME
    from ecgfm.pretrained import load

    args = export_parser().parse_args(argv)
    if args.check_records < 0:
        raise ValueError(f"--check-records must be 0 or more, got {args.check_records}")
    if args.opset is not None and args.format != "onnx":
        raise ValueError("--opset is for --format onnx")
    console = Console(highlight=False, width=max(Console().width, 120))  # the table must not wrap in logs
    model = load(args.model, allow_download=args.allow_download)
    out = Path(args.out)
    console.print(f"exporting {model.name!r} ({', '.join(model.leads)}) as {args.format} ...")
    file = export_model(model, out, args.format, args.opset)
    contract = out / CONTRACT_NAME
    console.print(f"wrote {file} ({_size(file)}) and {contract} ({_size(contract)})")
    if args.check_records == 0:
        console.print("parity check skipped (--check-records 0): the export is not verified")
        return 0
    records = shipped_records(args.check_records)
    result = parity_check(model, load_exported(out), records)
    table = Table(
        title=f"{args.format} vs PyTorch on {result['windows']} windows of {len(records)} shipped LUDB recordings "
        f"(tolerance {result['tolerance']:g})"
    )
    for column in ("output", "type", "max abs diff", "decisions flipped", "borderline"):
        table.add_column(column, justify="left" if column in ("output", "type") else "right")
    for name, entry in result["outputs"].items():
        flipped = str(entry.get("mismatches", "")) if entry["type"] == "decision" else ""
        borderline = str(entry.get("borderline", "")) if entry["type"] == "decision" else ""
        table.add_row(name, entry["type"], f"{entry['max_abs_diff']:.2e}", flipped, borderline)
    console.print(table)
    if not result["passed"]:
        message = f"export parity: {result['failure']} (the files in {out} are not verified)"
        print(f"ecgfm: error: {message}", file=sys.stderr)
        return 1
    borderline = sum(entry.get("borderline", 0) for entry in result["outputs"].values())
    note = f"; {borderline} decision(s) flipped at a score within tolerance of its threshold" if borderline else ""
    console.print(f"parity passed: every output within {result['tolerance']:g} of PyTorch{note}")
    return 0


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
