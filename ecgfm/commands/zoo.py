"""``ecgfm zoo list | info NAME | verify [NAME...] | download NAME | table``: the model zoo's cards, the files on
this machine checked against their sha256, and downloads only when asked for by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from ecgfm import zoo

#: Files at least this big get a "hashing ..." line first: a 370 MB checkpoint takes a few seconds.
ANNOUNCE_BYTES = 64 * 2**20


def zoo_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ecgfm zoo",
        exit_on_error=False,  # ecgfm.commands.main prints one line
        description="The model zoo (the cards of checkpoints/zoo.json): what each model reads and gives, where its "
        "files are on this machine, whether they match their sha256. Nothing is downloaded unless `download` asks.",
    )
    actions = parser.add_subcommands(dest="action")
    actions.add_subcommand("list", ArgumentParser(), help="one line per model, with its status on this machine")
    info = ArgumentParser(description="The full card of a model: contract, heads, source, files, metrics.")
    info.add_argument("name", type=str, help="a zoo name (`ecgfm zoo list`)")
    info.add_argument("--json", action="store_true", help="the card as JSON, with where its copy is")
    actions.add_subcommand("info", info, help="the full card of one model")
    verify = ArgumentParser(
        description="Hash every file of every local copy against the manifest; exit 1 on any "
        "mismatch. Absent models are listed, not failures."
    )
    verify.add_argument("names", type=str, nargs="*", help="zoo names (default: every model)")
    actions.add_subcommand("verify", verify, help="check the local files against their sha256")
    download = ArgumentParser(
        description="Fetch a model through huggingface_hub into the Hugging Face hub cache, "
        "then verify it (HF_HUB_OFFLINE=1 forbids it)."
    )
    download.add_argument("name", type=str, help="a zoo name with a hub source")
    download.add_argument(
        "--revision", type=str | None, default=None, help="a branch, tag or commit (default: the manifest's)"
    )
    download.add_argument("--force", action="store_true", help="download again even when a copy is here")
    actions.add_subcommand("download", download, help="download a model (the only command that uses the network)")
    table = ArgumentParser(description="The zoo table of docs/zoo.md, generated from the manifest.")
    table.add_argument("--write", type=str | None, default=None, help="a page holding the zoo-table markers")
    actions.add_subcommand("table", table, help="print the docs table (or --write it into a page)")
    return parser


def run(argv: list[str]) -> int:
    cfg = zoo_parser().parse_args(argv)
    action = cfg.action
    options = cfg[action]
    if action == "list":
        return _list()
    if action == "info":
        return _info(options.name, options.json)
    if action == "verify":
        return _verify(options.names)
    if action == "download":
        return _download(options.name, options.revision, options.force)
    if options.write:
        changed = zoo.write_zoo_table(options.write)
        print(f"{'updated' if changed else 'unchanged'}: {options.write}")
    else:
        sys.stdout.write(zoo.zoo_markdown_table())
    return 0


def _leads(contract: dict[str, Any]) -> str:
    leads = contract["lead_names"]
    return f"{len(leads)} ({leads[0]}..{leads[-1]})" if len(leads) > 2 else ",".join(leads)


def _heads(heads: list[dict[str, Any]]) -> str:
    return "; ".join(f"{h['name']}: {len(h['labels']) if 'labels' in h else h['n_labels']} labels" for h in heads)


def _list() -> int:
    rows = [("name", "format", "backbone", "leads", "rate/length", "heads", "licence", "local")]
    for entry in zoo.zoo_entries().values():
        contract = entry["input"]
        status, _ = zoo.local_status(entry)
        rate = f"{contract['fs']:g} Hz x {contract['n_samples']}"
        row = (entry["name"], entry["format"], entry["backbone"], _leads(contract), rate, _heads(entry["heads"]))
        rows.append((*row, entry["licence"], status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    searched = ", ".join(f"{where} {root}" for where, root in zoo.search_dirs())
    print(f"\nsearched {searched}, then the Hugging Face hub cache {zoo.hub_cache_dir()}")
    print("`ecgfm zoo info NAME` shows a card, `ecgfm zoo verify` hashes the files, `ecgfm zoo download NAME` fetches")
    return 0


def _info(name: str, as_json: bool) -> int:
    entry = zoo.zoo_entry(name)
    status, path = zoo.local_status(entry)
    if as_json:
        print(json.dumps({**entry, "local": {"status": status, "path": str(path) if path else None}}, indent=2))
        return 0
    contract = entry["input"]
    lines = [
        f"{entry['name']} ({entry['format']})",
        f"  {entry['summary']}",
        "",
        "input contract:",
        f"  leads          {', '.join(contract['lead_names'])}",
        f"  rate, window   {contract['fs']:g} Hz, {contract['n_samples']} samples "
        f"({contract['n_samples'] / contract['fs']:g} s)",
        f"  units          {contract['units']}",
        "  preprocessing  " + ", ".join(f"{k}={v}" for k, v in contract["preprocessing"].items()),
        f"backbone: {entry['backbone']}",
        "heads:",
    ]
    for head in entry["heads"]:
        units = f", units: {head['units']}" if head.get("units") else ""
        if "labels" in head:
            lines.append(f"  {head['name']} ({head['kind']}{units}): {', '.join(map(str, head['labels']))}")
        else:
            lines.append(
                f"  {head['name']} ({head['kind']}{units}): {head['n_labels']} labels, names in {head['labels_source']}"
            )
    lines += ["", f"source: {zoo.describe_source(entry).replace('`', '')}", "files:"]
    for spec in entry["files"]:
        size = "size unknown" if spec.get("bytes") is None else f"{spec['bytes']} bytes"
        lines.append(f"  {spec['path']}  {size}  sha256 {spec.get('sha256') or 'unknown (not recorded)'}")
    lines.append(f"on this machine: {status}" + (f" ({path})" if path else ""))
    lines += ["", f"training data: {entry.get('training_data') or zoo.NOT_STATED}", "metrics:"]
    lines += [f"  {m['metric']} = {m['value']} on {m['data']} ({m['split']})" for m in entry["metrics"]] or [
        "  none recorded"
    ]
    lines += [
        f"licence: {entry['licence']}",
        f"paper: {entry['paper']}",
        f"intended use: {entry['intended_use']}",
        f"limitations: {entry['limitations']}",
    ]
    print("\n".join(lines))
    return 0


def _announce(path: Path) -> None:
    size = path.stat().st_size
    if size >= ANNOUNCE_BYTES:
        print(f"hashing {path} ({size / 1e6:.0f} MB) ...", file=sys.stderr, flush=True)


def _verify(names: list[str]) -> int:
    entries = [zoo.zoo_entry(name) for name in names] if names else list(zoo.zoo_entries().values())
    failures = []
    for entry in entries:
        for check in zoo.verify_entry(entry, progress=_announce):
            if check.status in ("corrupt", "missing"):
                failures.append(check)
                print(f"{check.status.upper():<10}  {check.name}  {check.detail}")
            elif check.path is None:
                print(f"{check.status:<10}  {check.name}  {check.detail}")
            else:
                print(f"{check.status:<10}  {check.name}  {check.path}  ({check.detail})")
    if failures:
        paths = ", ".join(str(check.path) for check in failures)
        print(f"ecgfm zoo verify: {len(failures)} bad file(s): {paths}", file=sys.stderr)
        return 1
    return 0


def _download(name: str, revision: str | None, force: bool) -> int:
    entry = zoo.zoo_entry(name)
    if "hub" not in entry["source"]:
        raise ValueError(f"zoo model {name!r} is already shipped with ecgfm: there is nothing to download")
    if revision is None and not force:
        copies = zoo.locate(entry)
        if copies:
            path = zoo.resolve(name)  # checks it against its sha256
            print(f"{name} is already on this machine: {path} ({copies[0].where}); --force downloads it again")
            return 0
    path = zoo.download(name, revision=revision, force=force)
    print(f"downloaded {name}: {path}")
    return 0
