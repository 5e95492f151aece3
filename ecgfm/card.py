"""The model card (``card.md``) of a published model, generated from its ``config.yaml``: what it reads, what it
gives, what it was trained and measured on, and what it is not for."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["CARD_FIELDS", "render_card"]

#: What a card may say beyond the contract (``ecgfm publish`` options and ``save_pretrained(card=...)`` keys).
CARD_FIELDS = (
    "name",
    "summary",
    "training_data",
    "metrics",
    "intended_use",
    "limitations",
    "licence",
    "paper",
    "lead_subsets",
    "source_checkpoint",
    "calibration",
)

NOT_STATED = "_not stated by the publisher_"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _preprocessing(chain: Mapping[str, Any]) -> str:
    params = ", ".join(f"{key}={value!r}" for key, value in chain.items() if key != "name")
    return f"`{chain.get('name', 'none')}`" + (f" ({params})" if params else "")


def _thresholds(rules: list[Mapping[str, Any]]) -> dict[str, str]:
    out = {}
    for rule in rules:
        if rule["kind"] == "compare":
            out[rule["output"]] = f"{rule['score']} {rule['op']} {rule['value']:.6g}"
        elif rule["kind"] == "argmax":
            out[rule["output"]] = f"index of the largest of {', '.join(rule['scores'])}"
        else:
            out[rule["output"]] = f"median level from {', '.join(rule['scores'])}"
    return out


def _calibration(temperatures: Mapping[str, float] | None, calibration: Mapping[str, Any] | None) -> list[str]:
    """The card's calibration section: each head's temperature and where it was fitted (none for older configs)."""
    if temperatures is None and not calibration:
        return []
    lines = ["## Calibration", ""]
    fitted = (calibration or {}).get("heads") or {}
    temperatures = dict(temperatures or {}) | {h: e["temperature"] for h, e in fitted.items() if "temperature" in e}
    if not fitted and all(value == 1.0 for value in temperatures.values()):
        return [*lines, "No temperature scaling: probabilities are the sigmoid or softmax of the logits (T = 1).", ""]
    where = calibration.get("fitted_on") if calibration else None
    lines += [
        "Probabilities are temperature-scaled (Guo et al. 2017): sigmoid or softmax of logit / T, T fitted by "
        "negative log-likelihood on per-segment logits; decisions are those of T = 1, and so are a sigmoid head's "
        "rankings (AUROC).",
        "",
        *([f"Fitted on: {where}", ""] if where else []),
        "| head | temperature | segments | labelled values | validation NLL at T = 1 | at T |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for head, value in temperatures.items():
        entry = fitted.get(head) or {}
        if "temperature" not in entry:
            reason = f"not fitted: {entry['skipped']}" if "skipped" in entry else "where it was fitted is not stated"
            lines.append(f"| {_cell(head)} | {value:.4g} | {_cell(reason)} | | | |")
            continue
        lines.append(
            f"| {_cell(head)} | {value:.4g} | {entry.get('n_segments', '')} | {entry.get('n_labelled', '')} | "
            f"{entry.get('nll_uncalibrated', math.nan):.4f} | {entry.get('nll_temperature_scaled', math.nan):.4f} |"
        )
    return [*lines, ""]


def render_card(config: Mapping[str, Any], labels: Mapping[str, Any]) -> str:
    """Markdown for ``card.md`` from a published model's config (``ECGModel.published_config()``) and labels."""
    card = config.get("card") or {}
    contract = config["contract"]
    inputs = contract["input"]
    backbone = contract["backbone"]
    seconds = inputs["n_samples"] / inputs["fs"]
    lines = [f"# {config.get('name') or backbone['name']}", ""]
    if card.get("summary"):
        lines += [str(card["summary"]), ""]
    lines += [
        "## Input contract",
        "",
        "| | |",
        "| --- | --- |",
        f"| sampling rate | {inputs['fs']:g} Hz |",
        f"| window | {inputs['n_samples']} samples ({seconds:g} s); longer records are cut into windows |",
        f"| leads | {', '.join(inputs['lead_names'])} |",
        f"| units | {inputs['units']} |",
        f"| preprocessing (inside the model) | {_cell(_preprocessing(inputs['preprocessing']))} |",
        f"| lead adapter | {_cell(_preprocessing(contract['adapter']))} |",
        f"| backbone | `{backbone['name']}` ({backbone['num_features']} features) |",
    ]
    subsets = card.get("lead_subsets") or []
    lines.append(
        f"| fewer leads | {'; '.join(', '.join(s) for s in subsets)} (missing leads zero-filled and masked) |"
        if subsets
        else "| fewer leads | not served: a record must hold every lead above |"
    )
    lines += [
        "",
        "## Outputs",
        "",
        "| output | head | type | unit | decision rule |",
        "| --- | --- | --- | --- | --- |",
    ]
    rules = _thresholds(config.get("decisions") or [])
    for name, entry in (config.get("outputs") or {}).items():
        lines.append(
            f"| `{_cell(name)}` | {entry['head']} | {entry['type']} | {entry.get('unit', '')} | "
            f"{_cell(rules.get(name, ''))} |"
        )
    lines += [
        "",
        "A record's windows are aggregated into one prediction per record (mean of probabilities and values by "
        "default); its decisions are made on the aggregated values by the rules above.",
        "",
        "## Heads and labels",
        "",
    ]
    for name, head in labels.items():
        lines.append(f"- **{name}** ({head['kind']}, target `{head['target']}`): {', '.join(head['labels'])}")
    lines += ["", "## Training data", "", str(card.get("training_data") or NOT_STATED), "", "## Metrics", ""]
    metrics = card.get("metrics") or []
    if not metrics:
        lines.append(NOT_STATED)
    for data in dict.fromkeys(str(row.get("data", "")) for row in metrics):
        if data:
            lines += [f"Measured on: {data}", ""]
        rows = [r for r in metrics if str(r.get("data", "")) == data]
        with_intervals = any("low" in r for r in rows)
        if with_intervals:
            lines += ["| split | metric | value | interval |", "| --- | --- | --- | --- |"]
        else:
            lines += ["| split | metric | value |", "| --- | --- | --- |"]
        for row in rows:
            value = row.get("value")
            shown = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
            cells = [_cell(row.get("split", "")), _cell(row.get("metric", "")), shown]
            if with_intervals:
                level = row.get("level")
                named = f"{float(level):.0%} " if isinstance(level, (int, float)) else ""
                cells.append(f"{named}{row['low']:.4g}–{row['high']:.4g}" if "low" in row else "")
            lines.append(f"| {' | '.join(cells)} |")
        methods = sorted({str(r["method"]) for r in rows if r.get("method")})
        if methods:
            lines += ["", f"Intervals: {'; '.join(methods)}."]
        lines.append("")
    lines += _calibration(config.get("temperatures"), card.get("calibration"))
    lines += [
        "",
        "## Intended use",
        "",
        str(card.get("intended_use") or NOT_STATED),
        "",
        "## Limitations",
        "",
        str(card.get("limitations") or NOT_STATED),
        "",
        "## Provenance",
        "",
        f"- licence: {card.get('licence') or NOT_STATED}",
        f"- paper: {card.get('paper') or NOT_STATED}",
        f"- written by ecgfm {config.get('ecgfm_version', 'unknown')}",
    ]
    weights = config.get("weights")
    if weights:
        lines.append(f"- `{weights['file']}`: {weights['bytes']} bytes, sha256 `{weights['sha256']}`")
    if card.get("source_checkpoint"):
        lines.append(f"- published from: {card['source_checkpoint']}")
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"ecgfm predict --model {config.get('name') or 'THIS_FOLDER'} record.hea --output predictions.csv",
        "```",
        "",
        "```python",
        "import ecgfm",
        "",
        f"model = ecgfm.load({json.dumps(str(config.get('name') or 'THIS_FOLDER'))})",
        "```",
        "",
    ]
    return "\n".join(lines)
