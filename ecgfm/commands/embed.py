"""``ecgfm embed --model M --data SHARDS --out FEATURES``: a model's pooled features of every segment, stored as a
feature folder that heads train on directly (``backbone: precomputed``); see docs/embeddings.md."""

from __future__ import annotations

import argparse


def embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecgfm embed",
        exit_on_error=False,
        description="Run a model over every segment of a shard folder and store its pooled features (float16) as a "
        "feature folder: one feature shard per source shard, same segments, ids and targets, so the patient split is "
        "the same. Finished shards are kept on a rerun; several processes (torchrun, srun, or --part K/N) each take "
        "every N-th shard, and the one that completes the folder writes manifest.json.",
    )
    parser.add_argument("--model", required=True, help="zoo name, published model folder, hf:// address or .ckpt")
    parser.add_argument("--data", required=True, help="the shard folder (with manifest.json)")
    parser.add_argument("--out", required=True, help="the feature folder to write")
    parser.add_argument("--batch-size", type=int, default=64, help="segments per forward pass (default 64)")
    parser.add_argument("--device", default="auto", help="auto (this process's GPU, else CPU), cpu, cuda, cuda:1")
    parser.add_argument(
        "--part",
        metavar="K/N",
        help="compute part K of N (0-based: shards K, K+N, ...); default: RANK/WORLD_SIZE (torchrun), "
        "SLURM_PROCID/SLURM_STEP_NUM_TASKS (srun), else everything",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(argv: list[str]) -> int:
    args = embed_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    from ecgfm.embeddings import embed_shards

    summary = embed_shards(
        args.model,
        args.data,
        args.out,
        batch_size=args.batch_size,
        device=args.device,
        part=args.part,
        progress=not args.no_progress,
    )
    rank, world = summary.part
    part = f" (part {rank}/{world})" if world > 1 else ""
    model = summary.model
    print(
        f"{len(summary.computed)} feature shards computed, {len(summary.reused)} reused{part}: "
        f"{model['name']} (sha256 {model['sha256'][:12]}), {summary.size} float16 features per segment"
    )
    for path, reason in summary.computed.items():
        if reason != "not written yet":
            print(f"{path}: computed again, {reason}")
    if summary.manifest_written:
        print(f"wrote {summary.out / 'manifest.json'}; train heads on it with `backbone: precomputed`")
    else:
        waiting = ", ".join(summary.waiting_for[:3]) + (" ..." if len(summary.waiting_for) > 3 else "")
        print(
            f"{len(summary.waiting_for)} shards of other parts are not finished ({waiting}): the part that finishes "
            "last writes manifest.json (or run `ecgfm embed` again without --part once they are done)"
        )
    return 0
