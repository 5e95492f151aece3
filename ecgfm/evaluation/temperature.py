"""Temperature scaling of a model's classification heads (Guo et al. 2017): the raw per-segment logits of the validation
split, one temperature per head fitted by negative log-likelihood (``calibration.fit_temperature``), stored in the
head's ``temperature`` buffer, so a published folder carries it (``model.safetensors`` and ``config.yaml``).

Only labelled entries count (a NaN target is left out); probabilities become sigmoid or softmax of logit / T while
decisions (thresholds on logits, argmax, the median level) and a sigmoid head's rankings stay those of T = 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm.evaluation.calibration import _nll_function, fit_temperature
from ecgfm.evaluation.units import Segments, predict_segments

__all__ = [
    "DEFAULT_SPLIT",
    "calibratable_heads",
    "calibrate_model",
    "calibrate_on_shards",
    "fit_head_temperature",
    "head_targets",
    "validation_logits",
]

#: ShardDataModule's patient split, used where neither the checkpoint nor the caller gives one.
DEFAULT_SPLIT = {"val_fraction": 0.15, "test_fraction": 0.15, "split_seed": 0, "split_file": None}


def calibratable_heads(model: Any) -> dict[str, Any]:
    """The heads of ``model`` that hold a temperature (binary, multilabel, multiclass, ordinal)."""
    return {name: head for name, head in model.heads.items() if head.temperature_kind is not None}


def head_targets(head: Any, targets: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The columns of the head's labels in its target ``[N, K]`` (``names``: the target's columns; NaN = missing)."""
    if head.target not in targets:
        raise KeyError(f"head {head.name!r}: its target {head.target!r} is not among the targets read")
    missing = [label for label in head.labels if label not in names]
    if missing:
        raise KeyError(f"head {head.name!r}: labels {missing} are not in the data's target {head.target!r}")
    return np.asarray(targets[head.target], dtype=np.float64)[:, [list(names).index(label) for label in head.labels]]


def fit_head_temperature(head: Any, logits: Any, y: Any) -> dict[str, Any]:
    """The temperature of one head from its raw logits and head-aligned targets (NaN = unlabelled), with the number
    of labelled values and the NLL at T = 1 and at the fitted T; sets nothing."""
    if head.temperature_kind is None:
        raise ValueError(f"head {head.name!r} ({head.kind}) has no temperature: only classification heads have one")
    n, nll = _nll_function(logits, y, head.temperature_kind)
    temperature = fit_temperature(logits, y, head.temperature_kind)
    return {
        "temperature": temperature,
        "n_labelled": int(n),
        "nll_uncalibrated": nll(1.0),
        "nll_temperature_scaled": nll(temperature),
    }


def calibrate_model(
    model: Any, logits_by_head: Mapping[str, Any], targets_by_head: Mapping[str, Any]
) -> dict[str, float]:
    """Fit each given head's temperature on its raw logits and head-aligned targets and set it; ``{head: T}``."""
    unknown = sorted(set(logits_by_head) - set(model.heads))
    if unknown:
        raise KeyError(f"heads {unknown} are not in the model (its heads: {', '.join(model.heads)})")
    if set(targets_by_head) != set(logits_by_head):
        raise ValueError("logits_by_head and targets_by_head must name the same heads")
    fitted = {
        name: fit_head_temperature(model.heads[name], logits, targets_by_head[name])["temperature"]
        for name, logits in logits_by_head.items()
    }
    for name, temperature in fitted.items():
        model.heads[name].set_temperature(temperature)
    return fitted


def validation_logits(
    model: Any,
    root: str | Path,
    split: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: Any = "cpu",
    progress: bool = False,
    split_name: str = "val",
) -> Segments:
    """The model's raw logits (and outputs and targets) on every segment of one patient split of ``root``, the
    split drawn as training drew it (``split``: val_fraction, test_fraction, split_seed, split_file)."""
    from ecgfm.data.dataset import ShardDataset
    from ecgfm.data.index import SegmentIndex

    split = {**DEFAULT_SPLIT, **(split or {})}
    index = SegmentIndex(Path(root))
    positions = index.split_positions(
        split["val_fraction"], split["test_fraction"], split["split_seed"], split["split_file"]
    )[split_name]
    if not len(positions):
        raise ValueError(f"the {split_name} split of {root} is empty ({index.n_segments} segments in the folder)")
    present = index.manifest.targets
    targets = sorted({head.target for head in calibratable_heads(model).values() if head.target in present})
    dataset = ShardDataset(Path(root), positions, targets=targets)
    return predict_segments(
        model, dataset, batch_size, device, targets, [], progress, f"logits of {split_name} segments", keep_logits=True
    )


def calibrate_on_shards(
    model: Any,
    root: str | Path,
    split: Mapping[str, Any] | None = None,
    split_from: str = "ShardDataModule's defaults",
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Fit and set every classification head's temperature on the validation split of ``root``, and record in the
    model's card (``calibration``) where, on how many segments, each T and the validation NLL before and after."""
    from ecgfm.embeddings import resolve_device

    heads = calibratable_heads(model)
    if not heads:
        raise ValueError(f"model {model.name!r} has no classification head: there is no temperature to fit")
    split = {**DEFAULT_SPLIT, **(split or {})}
    segments = validation_logits(model, root, split, batch_size, resolve_device(device), progress)
    manifest_targets = {name: spec.names for name, spec in _manifest(root).targets.items()}
    results: dict[str, dict[str, Any]] = {}
    for name, head in heads.items():
        try:
            y = head_targets(head, segments.targets, manifest_targets.get(head.target, []))
            entry = fit_head_temperature(head, segments.logits[name], y)
        except (KeyError, ValueError) as err:
            results[name] = {"skipped": str(err).strip("'\"")}
            continue
        head.set_temperature(entry["temperature"])
        results[name] = {**entry, "n_segments": len(segments)}
    if not any("temperature" in entry for entry in results.values()):
        reasons = "; ".join(f"{name}: {entry['skipped']}" for name, entry in results.items())
        raise ValueError(f"no head of {model.name!r} could be calibrated on the validation split of {root}: {reasons}")
    n_patients = len(np.unique(segments.patient_id.astype(str)))
    fractions = ", ".join(f"{key} {split[key]}" for key in ("val_fraction", "test_fraction", "split_seed"))
    how = f"split file {split['split_file']}" if split["split_file"] else fractions
    model.card["calibration"] = {
        "method": "temperature scaling (NLL on per-segment logits)",
        "data": str(root),
        "split": "val",
        "split_settings": dict(split),
        "split_from": split_from,
        "n_segments": len(segments),
        "n_patients": n_patients,
        "fitted_on": f"the validation split of `{root}`: {len(segments)} segments of {n_patients} patients "
        f"(patient split {how}; from {split_from})",
        "heads": results,
    }
    return model.card["calibration"]


def _manifest(root: str | Path) -> Any:
    from ecgfm.data.shards import Manifest

    return Manifest.load(Path(root))
