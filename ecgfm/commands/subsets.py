"""``ecgfm subsets``: one checkpoint scored on each lead subset (12, limb, I+II, I, II), one table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, get_type_hints

from jsonargparse import ActionConfigFile, ArgumentParser

from ecgfm.data.datamodule import ShardDataModule


def _data_options() -> dict[str, object]:
    """The ShardDataModule arguments ``ecgfm subsets`` takes as ``--data.NAME``, with their types."""
    skip = {"return", "predict_split", "shuffle_buffer", "shuffle_seed"}  # --split chooses; scoring does not shuffle
    return {name: hint for name, hint in get_type_hints(ShardDataModule.__init__).items() if name not in skip}


def subsets_parser() -> ArgumentParser:
    from ecgfm.evaluation.subsets import DEFAULT_SUBSETS

    parser = ArgumentParser(
        prog="ecgfm subsets",
        exit_on_error=False,  # ecgfm.commands.main prints one line
        description="Evaluate one FineTuneTask checkpoint on each lead subset and write one table (subset, n_leads, "
        "leads_used, head, metric, value). The data settings default to those the checkpoint was trained with; "
        "--data.* overrides them (e.g. --data.root for another shard folder).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_argument("--ckpt_path", type=str, required=True, help="a Lightning checkpoint of a FineTuneTask")
    parser.add_argument(
        "--subsets",
        type=list[str | int],
        default=list(DEFAULT_SUBSETS),
        help="lead subsets: 12, limb, precordial, I, II, I+II, or leads joined by + (V1+V2)",
    )
    parser.add_argument(
        "--split",
        type=Literal["val", "test", "all"],
        default="test",
        help="the segments scored: val, test (held-out patients) or all (every segment, e.g. an external set)",
    )
    parser.add_argument(
        "--metrics", type=list[str] | None, default=None, help="keep metrics matching these patterns (auroc*)"
    )
    parser.add_argument("--out", type=str | None, default=None, help="write the table to this CSV file")
    parser.add_argument("--accelerator", type=str, default="auto", help="auto, cpu or gpu")
    parser.add_argument("--limit_batches", type=int | float | None, default=None, help="score only this many batches")
    for name, hint in _data_options().items():  # None: as the checkpoint's training run had it
        parser.add_argument(f"--data.{name}", type=hint | None, default=None, help="default: the checkpoint's")
    return parser


def run(argv: list[str]) -> int:
    from ecgfm.backbones.checkpoint import safe_torch_load
    from ecgfm.checkpointing import check_lightning_checkpoint
    from ecgfm.evaluation.subsets import evaluate_subsets, format_table, write_table

    cfg = subsets_parser().parse_args(argv).as_dict()
    checkpoint = Path(cfg["ckpt_path"])
    check_lightning_checkpoint(checkpoint)  # a bad file is one line naming it
    stored = safe_torch_load(checkpoint, mmap=True)
    data_args = dict(stored.get("datamodule_hyper_parameters") or {})
    del stored
    data_args.update({k: v for k, v in (cfg.get("data") or {}).items() if v is not None})
    if not data_args.get("root"):
        print(
            f"ecgfm subsets: {checkpoint} does not record its training data; give the shards with --data.root",
            file=sys.stderr,
        )
        return 2
    known = _data_options()
    datamodule = ShardDataModule(**{k: v for k, v in data_args.items() if k in known})
    rows = evaluate_subsets(
        checkpoint,
        datamodule,
        cfg["subsets"],
        cfg["split"],
        metrics=cfg["metrics"],
        accelerator=cfg["accelerator"],
        limit_batches=cfg["limit_batches"],
    )
    print(format_table(rows))
    if cfg["out"]:
        print(f"wrote {len(rows)} rows to {write_table(rows, cfg['out'])}")
    return 0
