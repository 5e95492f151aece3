"""Publishing a trained checkpoint: a folder a zoo consumer loads with no pickle and no recipe, its card filled from
what the checkpoint and its run know (training data, test metrics), and the extra files a Hugging Face repo wants."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ecgfm.card import CARD_FIELDS
from ecgfm.io import atomic_write_text, sha256sum
from ecgfm.pretrained import CARD_NAME, ECGModel, read_config

__all__ = [
    "HUB_README",
    "metrics_from_file",
    "prepare_hub_folder",
    "publish_checkpoint",
    "training_data_from_checkpoint",
    "upload_to_hub",
]

HUB_README = "README.md"
#: Licence names as the Hugging Face hub spells them in a model card's metadata.
HUB_LICENCES = {"mit": "mit", "apache-2.0": "apache-2.0", "cc-by-4.0": "cc-by-4.0", "cc-by-nc-4.0": "cc-by-nc-4.0"}


def training_data_from_checkpoint(checkpoint: Mapping[str, Any]) -> str | None:
    """One paragraph on what a FineTuneTask checkpoint was trained on: its shards, their source, segments, split."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    root = data.get("root")
    if not root:
        return None
    text = f"HDF5 shards at `{root}`"
    manifest_path = Path(root) / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        source = manifest.get("source") or {}
        described = source.get("source") or source.get("root") or source.get("reader")
        if described:
            text += f", converted from `{described}`"
        n_segments = manifest.get("n_segments")
        if n_segments is not None:
            text += f": {n_segments} segments of {manifest.get('n_samples')} samples at {manifest.get('fs')} Hz"
    fractions = ", ".join(f"{k} {data[k]}" for k in ("val_fraction", "test_fraction", "split_seed") if k in data)
    if data.get("split_file"):
        fractions = f"split file {data['split_file']}"
    return f"{text}; split by patient ({fractions})." if fractions else f"{text}."


def metrics_from_file(path: str | Path, splits: Sequence[str] = ("test",), data: str = "") -> list[dict[str, Any]]:
    """Card metric rows from a run's ``metrics.csv`` (Lightning's CSVLogger, per segment: each column's last value),
    an ``ecgfm report`` folder's ``metrics.json`` (per record or patient, each value with its interval: ``low``,
    ``high``, ``level``, ``method``), or a JSON/YAML mapping ``{"test/segment/diagnoses/auroc": 0.71, ...}``; only
    keys under ``splits`` are kept, losses left out. The metric name keeps its unit (``record/diagnoses/auroc``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file")
    values: dict[str, Any] = {}
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key and value not in (None, ""):
                        values[key] = float(value)
    else:
        loaded = yaml.safe_load(path.read_text())  # JSON is YAML
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of metric name to value")
        if loaded.get("format") == "ecgfm-report":
            values = {str(k): v for k, v in (loaded.get("metrics") or {}).items() if isinstance(v, dict)}
        else:
            values = {str(k): float(v) for k, v in loaded.items() if isinstance(v, (int, float))}
    rows = []
    for key, value in values.items():
        split, _, metric = key.partition("/")
        if split not in splits or not metric or metric.endswith("loss"):
            continue
        row: dict[str, Any] = {"data": data, "split": split, "metric": metric}
        if isinstance(value, dict):  # a report's Interval: the estimate, and its interval when it has one
            estimate = value.get("estimate")
            if not isinstance(estimate, (int, float)) or not math.isfinite(estimate):
                continue
            row["value"] = float(estimate)
            low, high = value.get("low"), value.get("high")
            if isinstance(low, (int, float)) and isinstance(high, (int, float)) and math.isfinite(low + high):
                row.update(low=float(low), high=float(high), level=value.get("level"), method=value.get("method"))
        elif math.isfinite(value):
            row["value"] = value
        else:
            continue
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no metrics of split {', '.join(splits)}")
    return rows


def publish_checkpoint(
    checkpoint_path: str | Path,
    folder: str | Path,
    card: Mapping[str, Any] | None = None,
    metrics_file: str | Path | None = None,
    metrics_data: str = "held-out test split",
    features_model: str | None = None,
    calibrate_on: str | Path | None = None,
    device: str = "auto",
) -> Path:
    """Write the checkpoint's model as a published folder; the card's training data is read from the checkpoint
    unless ``card`` gives it, its metrics from ``metrics_file`` (a run's test ``metrics.csv``).

    ``calibrate_on`` (a shard folder): each classification head's temperature is fitted on its validation split,
    drawn as the checkpoint's training run drew it, and stored with the model (weights, config and card).

    Heads trained on a feature folder (backbone ``precomputed``) are published on ``features_model``, the model
    ``ecgfm embed`` computed the features with (checked by sha256), so the published model reads signals.
    """
    from ecgfm.checkpointing import read_lightning_checkpoint
    from ecgfm.embeddings import heads_on_features_model, trained_on_features

    unknown = sorted(set(card or {}) - set(CARD_FIELDS))
    if unknown:
        raise ValueError(f"unknown card fields {unknown}; known: {', '.join(CARD_FIELDS)}")
    checkpoint_path = Path(checkpoint_path)
    card = dict(card or {})
    checkpoint = read_lightning_checkpoint(checkpoint_path)
    card.setdefault("training_data", training_data_from_checkpoint(checkpoint))
    if metrics_file is not None:
        card["metrics"] = metrics_from_file(metrics_file, data=metrics_data)
    card.setdefault("source_checkpoint", f"{checkpoint_path.name} (sha256 {sha256sum(checkpoint_path)})")
    card = {key: value for key, value in card.items() if value is not None}
    if trained_on_features(checkpoint):
        if features_model is None:
            made_by = checkpoint["ecgfm"]["backbone"]["architecture"]
            raise ValueError(
                f"{checkpoint_path} holds heads trained on features of {made_by.get('model')!r} (sha256 "
                f"{str(made_by.get('model_sha256'))[:12]}): publish them on that model with --features-model "
                "NAME_OR_DIR (what `ecgfm embed --model` was given)"
            )
        model = heads_on_features_model(checkpoint, features_model, checkpoint_path, card)
    elif features_model is not None:
        raise ValueError(
            f"{checkpoint_path} was not trained on features: --features-model applies only to heads "
            "trained with backbone 'precomputed'"
        )
    else:
        model = ECGModel.from_checkpoint(checkpoint_path, card)
    if calibrate_on is not None:
        from ecgfm.evaluation.report import ReportSettings, split_settings
        from ecgfm.evaluation.temperature import calibrate_on_shards

        split, split_from = split_settings(checkpoint_path, ReportSettings())
        calibrate_on_shards(model, calibrate_on, split, split_from, device=device)
    return model.save_pretrained(folder)


def prepare_hub_folder(folder: str | Path, repo_id: str) -> Path:
    """Add what a Hugging Face model repo shows: ``README.md`` = the card with hub metadata (licence, library,
    tags). Returns the README's path; upload the folder with :func:`upload_to_hub` where the network is."""
    folder = Path(folder)
    config = read_config(folder)
    card = config.get("card") or {}
    licence = str(card.get("licence") or "").lower()
    metadata = {
        "library_name": "ecgfm",
        "license": HUB_LICENCES.get(licence, "other"),
        "tags": ["ecg", "electrocardiogram", "ecgfm", config["contract"]["backbone"]["name"]],
        "pipeline_tag": "time-series-classification",
    }
    if metadata["license"] == "other" and licence:
        metadata["license_name"] = licence
    body = (folder / CARD_NAME).read_text()
    body = body.replace(f"ecgfm.load({json.dumps(str(config.get('name')))})", f'ecgfm.load("hf://{repo_id}")')
    front = yaml.safe_dump(metadata, sort_keys=False)
    return atomic_write_text(folder / HUB_README, f"---\n{front}---\n\n{body}")


def upload_to_hub(folder: str | Path, repo_id: str, revision: str | None = None) -> str:
    """Upload a published folder to the Hugging Face hub (needs the network and a token); returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    read_config(folder)  # refuse to upload anything that is not a published model
    if not (folder / HUB_README).is_file():
        prepare_hub_folder(folder, repo_id)
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, repo_type="model")
    return str(getattr(info, "commit_url", info))
