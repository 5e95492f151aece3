"""``ecgfm publish CKPT DIR``: a FineTuneTask checkpoint as a published model folder (config.yaml, model.safetensors,
labels.json, card.md), optionally prepared for (and uploaded to) a Hugging Face model repo."""

from __future__ import annotations

import argparse
from pathlib import Path

from ecgfm.leads import parse_leads


def publish_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecgfm publish",
        exit_on_error=False,
        description="Write a checkpoint's model as a folder that `ecgfm.load(DIR)` and `ecgfm predict --model DIR` "
        "read with no pickle: config.yaml (the model contract, outputs, decision rules, card), model.safetensors, "
        "labels.json and a generated card.md. The card's training data is read from the checkpoint; its metrics "
        "from --metrics (the test run's metrics.csv).",
    )
    parser.add_argument("checkpoint", help="a FineTuneTask .ckpt (e.g. ecgfm-quickstart/checkpoints/best-*.ckpt)")
    parser.add_argument("folder", help="the folder to write (created; files in it are replaced atomically)")
    parser.add_argument("--name", help="the model's name (zoo name); default: the folder's name")
    parser.add_argument("--summary", help="one sentence: what the model does")
    parser.add_argument("--training-data", help="what it was trained on (default: read from the checkpoint)")
    parser.add_argument("--metrics", help="metrics.csv of the test run (or a JSON/YAML {split/head/metric: value})")
    parser.add_argument("--metrics-data", default="held-out test split", help="what the metrics were measured on")
    parser.add_argument("--intended-use", help="who should use it, for what")
    parser.add_argument("--limitations", help="what it is not for, known failure modes")
    parser.add_argument("--licence", help="licence of the weights, e.g. MIT, Apache-2.0, CC-BY-NC-4.0")
    parser.add_argument("--paper", help="citation or URL")
    parser.add_argument(
        "--lead-subsets",
        nargs="*",
        default=None,
        metavar="LEADS",
        help='smaller lead sets the model was validated on, each comma-separated or a subset name ("I", "limb", '
        '"I,II"): `ecgfm predict` zero-fills and masks the other leads only for records holding one of these',
    )
    parser.add_argument(
        "--features-model",
        metavar="NAME_OR_DIR",
        help="for heads trained on a feature folder (backbone precomputed): the model `ecgfm embed` used; the "
        "published model is that model with these heads, and reads signals",
    )
    parser.add_argument(
        "--calibrate-on",
        metavar="SHARDS",
        help="fit each classification head's temperature on the validation split of this shard folder (the "
        "checkpoint's patient split) and store it with the model: probabilities become sigmoid/softmax of logit / T",
    )
    parser.add_argument("--device", default="auto", help="for --calibrate-on: auto (a GPU if there is one), cpu, cuda")
    parser.add_argument("--hub", metavar="REPO", help="also write README.md with Hugging Face metadata for REPO")
    parser.add_argument("--upload", action="store_true", help="upload the folder to --hub REPO (needs the network)")
    return parser


def run(argv: list[str]) -> int:
    from ecgfm.pretrained import read_config
    from ecgfm.publish import prepare_hub_folder, publish_checkpoint, upload_to_hub

    args = publish_parser().parse_args(argv)
    if args.upload and not args.hub:
        raise ValueError("--upload needs --hub REPO: the Hugging Face repo to upload to")
    folder = Path(args.folder)
    card = {
        "name": args.name or folder.resolve().name,
        "summary": args.summary,
        "training_data": args.training_data,
        "intended_use": args.intended_use,
        "limitations": args.limitations,
        "licence": args.licence,
        "paper": args.paper,
    }
    if args.lead_subsets:
        card["lead_subsets"] = [list(parse_leads(text)) for text in args.lead_subsets]
    card = {key: value for key, value in card.items() if value is not None}
    publish_checkpoint(
        args.checkpoint,
        folder,
        card,
        args.metrics,
        args.metrics_data,
        args.features_model,
        args.calibrate_on,
        args.device,
    )
    calibration = read_config(folder)["card"].get("calibration") if args.calibrate_on else None
    for head, entry in (calibration or {}).get("heads", {}).items():
        if "temperature" in entry:
            print(
                f"temperature of {head}: {entry['temperature']:.4g} (validation NLL {entry['nll_uncalibrated']:.4f} "
                f"at T = 1 -> {entry['nll_temperature_scaled']:.4f}; {entry['n_segments']} segments)"
            )
        else:
            print(f"temperature of {head}: not fitted ({entry['skipped']})")
    for name in sorted(p.name for p in folder.iterdir() if p.is_file()):
        print(f"wrote {folder / name}")
    if args.hub:
        readme = prepare_hub_folder(folder, args.hub)
        print(f"wrote {readme} (Hugging Face model card for {args.hub})")
        if args.upload:
            print(f"uploaded: {upload_to_hub(folder, args.hub)}")
        else:
            print(f"to upload: ecgfm publish ... --hub {args.hub} --upload, or `hf upload {args.hub} {folder}`")
    print(f"load it with: ecgfm.load({str(folder)!r})  or  ecgfm predict --model {folder} RECORD")
    return 0
