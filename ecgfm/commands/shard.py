"""``ecgfm shard``: a folder of records (+ a label table) -> HDF5 shards; ``ecgfm shard verify DIR`` checks them;
``ecgfm shard merge DIR...`` joins the parts of ``ecgfm shard --part K/N``."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser

from ecgfm.commands.recipes import expand_config_names


def shard_parser() -> ArgumentParser:
    from ecgfm.data.convert import convert

    parser = ArgumentParser(
        prog="ecgfm shard", exit_on_error=False, description="Convert a folder of ECG records into HDF5 shards."
    )
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="YAML file (or shipped recipe name) with any of the options"
    )
    parser.add_function_arguments(convert)
    return parser


def verify_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ecgfm shard verify",
        exit_on_error=False,
        description="Check every shard of a folder against its manifest: counts, datasets, attributes and the "
        "checksum of every dataset (which reads every byte; --quick skips it).",
    )
    parser.add_argument("shard_dir", type=str, help="the folder holding manifest.json and the shards")
    parser.add_argument(
        "--quick", action="store_true", help="check the structure only (opens, counts, shapes, targets): no checksums"
    )
    return parser


def merge_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ecgfm shard merge",
        exit_on_error=False,
        description="Join the parts of `ecgfm shard --part K/N` into one manifest.json, after checking that all N "
        "parts are there, come from the same plan, list every shard once, and that every shard matches its checksums.",
    )
    parser.add_argument("dirs", type=str, nargs="+", help="folders holding manifest.part-K-of-N.json (and the shards)")
    parser.add_argument(
        "--out", type=str, default=None, help="the merged folder (default: the first DIR; shards of others are linked)"
    )
    return parser


def run(argv: list[str]) -> int:
    from ecgfm.data.convert import convert

    if argv[:1] == ["verify"]:
        return run_verify(argv[1:])
    if argv[:1] == ["merge"]:
        return run_merge(argv[1:])
    cfg = shard_parser().parse_args(expand_config_names(argv))
    kwargs = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")}
    summary = convert(**kwargs)
    summary.print()
    return 0


def run_verify(argv: list[str]) -> int:
    from ecgfm.data.shards import verify_shards

    cfg = verify_parser().parse_args(argv)
    shard_dir = cfg.shard_dir
    problems = verify_shards(shard_dir, quick=cfg.quick)
    for line in problems:
        print(f"FAILED {line}")
    print(f"{len(problems)} problem(s) in {shard_dir}")
    return 1 if problems else 0


def run_merge(argv: list[str]) -> int:
    from ecgfm.data.parts import merge_parts

    cfg = merge_parser().parse_args(argv)
    summary = merge_parts(cfg.dirs, cfg.out)
    summary.print()
    return 0
