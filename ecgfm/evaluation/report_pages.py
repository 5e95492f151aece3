"""A computed report (``ecgfm.evaluation.report.build_report``) as one folder: ``report.html`` (self-contained, every
figure embedded as a base64 PNG), ``report.md`` (figures as files next to it), ``metrics.json`` (every metric with
estimate, low, high, unit and counts) and ``figures/*.png``; optionally the same figures and metrics to wandb.

Both pages are rendered from one list of blocks (heading, paragraph, table, figure, list), so they always say the
same. The folder is written under a temporary name beside ``out`` and renamed into place at the end: a report folder
is either the previous one, complete, or the new one, complete.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ecgfm.evaluation.figures import png_bytes
from ecgfm.io import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_folder

__all__ = ["REPORT_FILES", "blocks_of", "format_interval", "render_html", "render_markdown", "write_report"]

#: What a report folder holds (``figures/`` beside them).
REPORT_FILES = ("report.html", "report.md", "metrics.json")


@dataclass
class Block:
    """One piece of a page: ``kind`` is h1, h2, h3, p, table (``rows`` with ``header``), figure (``name``) or list."""

    kind: str
    text: str = ""
    header: Sequence[str] = ()
    rows: Sequence[Sequence[str]] = ()
    name: str = ""
    items: Sequence[str] = ()


# ----------------------------------------------------------------------------------------------------- formatting


def format_interval(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.912 (0.871-0.948)`` from a metrics.json entry; ``-`` when there is none."""
    if not entry:
        return "-"
    estimate = entry.get("estimate")
    if estimate is None or (isinstance(estimate, float) and math.isnan(estimate)):
        return "-"
    low, high = entry.get("low"), entry.get("high")
    if low is None or high is None or any(isinstance(v, float) and math.isnan(v) for v in (low, high)):
        return f"{estimate:.{digits}f}"
    sep = " to " if low < 0 or high < 0 else "-"
    return f"{estimate:.{digits}f} ({low:.{digits}f}{sep}{high:.{digits}f})"


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------------------------------- blocks


def blocks_of(results: Mapping[str, Any], captions: Mapping[str, str]) -> list[Block]:
    """The page, as blocks, from ``metrics.json``'s content and the figures' captions (``figures/<name>``)."""
    unit, split = results["unit"], results["data"]["split"]
    counts, settings = results["counts"], results["settings"]
    level = f"{settings['level']:.0%}"
    blocks = [
        Block("h1", f"ecgfm report: {results['model']['name']}"),
        Block(
            "table",
            header=("", ""),
            rows=[
                ("model", results["model"]["given"]),
                ("data", f"{results['data']['root']} (split `{split}`)"),
                ("patient split", _split_text(results["data"])),
                ("unit of analysis", f"{unit} ({_unit_text(unit, results['aggregation'])})"),
                (
                    "scored",
                    f"{_plural(counts['units'], unit)} of {_plural(counts['patients'], 'patient')} "
                    f"({_plural(counts['segments'], 'segment')} of 10 s, {_plural(counts['records'], 'record')})",
                ),
                (
                    "intervals",
                    f"{level}: AUROC, AUPRC, MAE by a patient-level bootstrap ({settings['n_resamples']} resamples, "
                    "stratified by patients with a positive); rates at a threshold by Wilson's interval when each "
                    "patient gives one unit, else by the same bootstrap",
                ),
                ("thresholds", f"{settings['threshold_method']}, chosen on: {results['thresholds_from']}"),
                ("subgroups", ", ".join(results["subgroup_columns"]) or "none (the shards store no metadata)"),
                ("written", results.get("created", "")),
            ],
        ),
    ]
    for name, head in results["heads"].items():
        blocks.append(Block("h2", f"Head `{name}` ({head['kind']}, target `{head['target']}`)"))
        if "skipped" in head:
            blocks.append(Block("p", f"Not scored: {head['skipped']}."))
            continue
        classification = "labels" in head
        if classification:
            blocks += _classification_blocks(name, head, unit, split, level)
        else:
            blocks += _regression_blocks(name, head, unit, split, level)
        figures = _figures_of(name, captions, results["heads"])
        blocks += _figure_blocks(figures, MAIN_FIGURES, "Figures")
        if classification:
            blocks += _subgroup_blocks(
                head, unit, ("AUROC", "sensitivity", "specificity"), ("auroc", "sensitivity", "specificity")
            )
        else:
            blocks += _subgroup_blocks(head, unit, ("MAE",), ("mae",))
        blocks += _figure_blocks(figures, ("subgroups",), None)
        blocks += _figure_blocks(figures, ("saliency",), "Saliency examples")
        blocks += [Block("p", f"Saliency not drawn: {note}") for note in head.get("saliency_notes", [])]
    return blocks


def _split_text(data: Mapping[str, Any]) -> str:
    split = data["split_settings"]
    if data["split"] == "all":
        return "none: every segment of the folder is scored"
    if split.get("split_file"):
        return f"from {split['split_file']} ({data['split_from']})"
    return (
        f"val {split['val_fraction']:g}, test {split['test_fraction']:g}, seed {split['split_seed']} by patient "
        f"({data['split_from']})"
    )


def _unit_text(unit: str, aggregation: str) -> str:
    if unit == "segment":
        return "each 10-s window counts once"
    if unit == "record":
        return f"a record's windows give one prediction, their {aggregation}; a 20-s record counts once"
    return f"a patient's records give one prediction, their {aggregation}; any positive record makes a positive patient"


def _classification_blocks(name: str, head: Mapping[str, Any], unit: str, split: str, level: str) -> list[Block]:
    blocks = []
    if head.get("macro_auroc"):
        blocks.append(
            Block(
                "p",
                f"**Macro AUROC {format_interval(head['macro_auroc'])}** over {head['n_labels_scored']} labels "
                f"({level} interval of the mean, patient bootstrap); one row per {unit} of the `{split}` split.",
            )
        )
    rows = []
    for e in head["labels"]:
        threshold = e["threshold"]
        rows.append(
            (
                e["label"],
                str(e["n"]),
                f"{e['positives']} ({e['positive_patients']} patients)",
                format_interval(e.get("auroc")),
                format_interval(e.get("auprc")),
                f"{threshold['value']:.3g}",
                format_interval(e.get("sensitivity")),
                format_interval(e.get("specificity")),
                format_interval(e.get("ppv")),
                format_interval(e.get("npv")),
                format_interval(e.get("f1")),
                format_interval(e.get("mcc")),
                format_interval(e["calibration"]["ece"]),
                format_interval(e["calibration"]["brier"]),
            )
        )
    if rows:
        blocks.append(Block("h3", f"Metrics per label ({unit}s, {level} intervals)"))
        header = (
            "label", f"{unit}s", "positives", "AUROC", "AUPRC", "threshold", "sensitivity", "specificity", "PPV",
            "NPV", "F1", "MCC", "ECE", "Brier",
        )  # fmt: skip
        blocks.append(Block("table", header=header, rows=rows))
        sources = sorted({e["threshold"]["chosen_on"] for e in head["labels"]})
        blocks.append(Block("p", f"Thresholds chosen on: {'; '.join(sources)}; applied unchanged to `{split}`."))
    blocks += _temperature_blocks(head, unit)
    matrix = head.get("confusion_matrix")
    if matrix:
        blocks.append(Block("h3", f"Classes: true (rows) against the model's call (columns), {matrix['n']} {unit}s"))
        rows = [
            (
                label,
                *(
                    f"{count} ({share:.0f} %)" if share == share else str(count)
                    for count, share in zip(counts, shares, strict=True)
                ),
            )
            for label, counts, shares in zip(matrix["labels"], matrix["counts"], matrix["row_percent"], strict=True)
        ]
        blocks.append(Block("table", header=("true \\ called", *matrix["labels"]), rows=rows))
    if head["not_scored"]:
        blocks.append(Block("h3", "Labels not scored"))
        blocks.append(Block("list", items=[f"{e['label']}: {e['reason']}" for e in head["not_scored"]]))
    return blocks


def _temperature_blocks(head: Mapping[str, Any], unit: str) -> list[Block]:
    """Calibration before and after temperature scaling: where T came from, and ECE and Brier per label at both."""
    info = head.get("temperature")
    if not info:
        return []
    if info.get("compared") is None:
        return [Block("h3", "Temperature scaling"), Block("p", f"Temperature {info.get('note', 'not fitted')}.")]
    t = info["compared"]
    text = f"Temperature T = {t:.4g}, {info['source']}: probabilities are sigmoid or softmax of logit / T."
    if "fit" in info:
        fit = info["fit"]
        text += (
            f" Validation NLL {fit['nll_uncalibrated']:.4f} at T = 1, {fit['nll_temperature_scaled']:.4f} at T "
            f"({fit['n_labelled']} labelled values, per segment)."
        )
    stored = info.get("stored", 1.0)
    text += (
        f" The other numbers of this report use the model's own temperature ({stored:.4g}); no call depends on T, nor "
        "does a segment's rank (AUROC) under a sigmoid head (binary, multi-label)."
    )
    rows = [
        (
            e["label"],
            format_interval(e["calibration"]["uncalibrated"]["ece"]),
            format_interval(e["calibration"]["temperature_scaled"]["ece"]),
            format_interval(e["calibration"]["uncalibrated"]["brier"]),
            format_interval(e["calibration"]["temperature_scaled"]["brier"]),
        )
        for e in head["labels"]
        if "temperature_scaled" in e["calibration"]
    ]
    header = ("label", "ECE at T = 1", f"ECE at T = {t:.3g}", "Brier at T = 1", f"Brier at T = {t:.3g}")
    return [
        Block("h3", f"Calibration before and after temperature scaling ({unit}s)"),
        Block("p", text),
        *([Block("table", header=header, rows=rows)] if rows else []),
    ]


def _regression_blocks(name: str, head: Mapping[str, Any], unit: str, split: str, level: str) -> list[Block]:
    blocks = []
    rows, cut_rows, not_scored = [], [], [f"{e['label']}: {e['reason']}" for e in head["not_scored"]]
    for e in head["columns"]:
        ba = e["bland_altman"]
        rows.append(
            (
                e["label"],
                e["unit"] or "-",
                str(e["n"]),
                format_interval(e.get("mae")),
                format_interval(e.get("rmse")),
                format_interval(e.get("pearson_r")),
                format_interval(ba["bias"]),
                f"{format_interval(ba['loa_low'])}; {format_interval(ba['loa_high'])}",
            )
        )
        for c in e["cutoffs"]:
            if "reason" in c:
                not_scored.append(f"{c['name']}: {c['reason']}")
                continue
            cut_rows.append(
                (
                    c["name"],
                    str(c["n"]),
                    f"{c['positives']} ({c['positive_patients']} patients)",
                    format_interval(c.get("auroc")),
                    format_interval(c.get("sensitivity")),
                    format_interval(c.get("specificity")),
                    format_interval(c.get("ppv")),
                    format_interval(c.get("npv")),
                )
            )
    if rows:
        blocks.append(Block("h3", f"Agreement ({unit}s, {level} intervals)"))
        header = ("column", "unit", f"{unit}s", "MAE", "RMSE", "Pearson r", "bias", "95 % limits of agreement")
        blocks.append(Block("table", header=header, rows=rows))
    if cut_rows:
        blocks.append(Block("h3", "Classification at clinical cut-offs (the prediction crosses the same cut-off)"))
        header = ("class", f"{unit}s", "positives", "AUROC", "sensitivity", "specificity", "PPV", "NPV")
        blocks.append(Block("table", header=header, rows=cut_rows))
    if not_scored:
        blocks.append(Block("h3", "Not scored"))
        blocks.append(Block("list", items=not_scored))
    return blocks


def _subgroup_blocks(head: Mapping[str, Any], unit: str, titles: Sequence[str], keys: Sequence[str]) -> list[Block]:
    rows = []
    for row in head.get("subgroups", []):
        positives = f"{row['positives']}" if "positives" in row else ""
        rows.append(
            (
                row["column"],
                row["group"],
                row["label"],
                str(row["n"]),
                *([positives] if "positives" in row else []),
                *(format_interval(row.get(key)) for key in keys),
                row.get("note", ""),
            )
        )
    if not rows:
        return []
    has_positives = "positives" in head["subgroups"][0]
    header = ("subgroup", "group", "label", f"{unit}s", *(["positives"] if has_positives else []), *titles, "note")
    return [Block("h3", "Subgroups"), Block("table", header=header, rows=rows)]


#: The figures shown right after a head's metric tables, in this order (file names end ``-<kind>.png``).
MAIN_FIGURES = ("roc", "pr", "calibration", "confusion", "scatter", "bland-altman", "cutoffs-roc")


def _figures_of(head: str, captions: Mapping[str, str], heads: Iterable[str]) -> dict[str, str]:
    """``{figure: caption}`` of one head: names ``<head>-...png`` that no longer head name claims."""
    longer = [other for other in heads if other != head and other.startswith(f"{head}-")]
    return {
        name: caption
        for name, caption in captions.items()
        if name.startswith(f"{head}-") and not any(name.startswith(f"{other}-") for other in longer)
    }


def _kind(name: str) -> str:
    """``diagnoses-roc.png`` -> ``roc``; ``potassium-k-cutoffs-roc.png`` -> ``cutoffs-roc``; saliency -> saliency."""
    stem = name.removesuffix(".png")
    if "-saliency-" in stem:
        return "saliency"
    return next(
        (kind for kind in sorted(MAIN_FIGURES + ("subgroups",), key=len, reverse=True) if stem.endswith(f"-{kind}")), ""
    )


def _figure_blocks(figures: Mapping[str, str], kinds: Sequence[str], title: str | None) -> list[Block]:
    """The figures of ``kinds`` in that order (then by name), under ``title``."""

    def order(name: str) -> tuple[str, int]:  # per column of a regression head, then in the order of ``kinds``
        kind = _kind(name)
        return name.removesuffix(f"-{kind}.png"), list(kinds).index(kind)

    names = sorted((n for n in figures if _kind(n) in kinds), key=order)
    blocks = [Block("h3", title)] if names and title else []
    return blocks + [Block("figure", text=figures[name], name=name) for name in names]


# ----------------------------------------------------------------------------------------------------- rendering

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1180px; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #e4e4e4; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .82rem; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f4f5f7; }
tr:nth-child(even) td { background: #fafafa; }
.figures { display: flex; flex-wrap: wrap; gap: 0 1rem; align-items: flex-start; }
figure { margin: .6rem 0 1.2rem; flex: 1 1 100%; }
figure.half { flex: 1 1 calc(50% - 1rem); max-width: calc(50% - .5rem); }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; }
code { background: #f4f5f7; padding: 0 .2rem; border-radius: 3px; }
.ci { color: #666; font-size: .74rem; white-space: nowrap; }
"""


def _inline(text: str) -> str:
    """Escape HTML, then `code` and **bold** as the Markdown page writes them."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            bold = part.split("**")
            out.append("".join(f"<strong>{b}</strong>" if j % 2 else b for j, b in enumerate(bold)))
    return "".join(out)


_INTERVAL = re.compile(r"^(-?\d+\.\d+) \((-?\d+\.\d+(?:-| to )-?\d+\.\d+)\)$")


def _html_cell(text: str) -> str:
    """A table cell; an estimate with its interval goes on two lines, the interval small, so columns stay narrow."""
    match = _INTERVAL.match(text)
    if match is None:
        return _inline(text)
    return f'{match.group(1)}<br><span class="ci">({html.escape(match.group(2))})</span>'


def _png_width(data: bytes) -> int:
    """The pixel width in a PNG's header (bytes 16-20 of the IHDR chunk)."""
    return int.from_bytes(data[16:20], "big") if data[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _figure_html(name: str, caption: str, data: bytes) -> str:
    """One embedded figure; a narrow one (ROC, PR) takes half the row, so two stand side by side."""
    half = ' class="half"' if 0 < _png_width(data) <= HALF_WIDTH_PX else ""
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<figure{half}><img src="data:image/png;base64,{encoded}" alt="{html.escape(caption)}" '
        f'data-figure="{html.escape(name)}"><figcaption>{_inline(caption)} '
        f"(<code>figures/{html.escape(name)}</code>)</figcaption></figure>"
    )


#: Figures at most this wide (pixels) are laid out two per row.
HALF_WIDTH_PX = 820


def render_html(blocks: Iterable[Block], images: Mapping[str, bytes], title: str) -> str:
    """A self-contained page: inline CSS, every figure a ``data:image/png;base64`` image, no script, no link."""
    body: list[str] = []
    figures: list[str] = []
    for block in blocks:
        if block.kind == "figure":
            figures.append(_figure_html(block.name, block.text, images[block.name]))
            continue
        if figures:  # consecutive figures share one flowing row
            body.append(f'<div class="figures">{"".join(figures)}</div>')
            figures = []
        if block.kind in ("h1", "h2", "h3"):
            body.append(f"<{block.kind}>{_inline(block.text)}</{block.kind}>")
        elif block.kind == "p":
            body.append(f"<p>{_inline(block.text)}</p>")
        elif block.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>")
        elif block.kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.header) if any(block.header) else ""
            rows = "".join(
                "<tr>" + "".join(f"<td>{_html_cell(str(c))}</td>" for c in row) + "</tr>" for row in block.rows
            )
            body.append(f'<div class="scroll"><table>{f"<tr>{head}</tr>" if head else ""}{rows}</table></div>')
    if figures:
        body.append(f'<div class="figures">{"".join(figures)}</div>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Iterable[Block]) -> str:
    """The same page in Markdown, figures linked as ``figures/<name>`` beside it."""
    lines: list[str] = []
    for block in blocks:
        if block.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(block.kind[1]) + " " + block.text, ""]
        elif block.kind == "p":
            lines += [block.text, ""]
        elif block.kind == "list":
            lines += [f"- {item}" for item in block.items] + [""]
        elif block.kind == "table":
            header = [_cell(h) for h in block.header]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("| " + " | ".join("---" for _ in header) + " |")
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        elif block.kind == "figure":
            lines += [f"![{_cell(block.text)}](figures/{block.name})", "", f"*{block.text}*", ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------- writing


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars and arrays as Python numbers and lists, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def write_report(report: Any, out: str | Path, wandb_project: str | None = None, wandb_name: str | None = None) -> Path:
    """Write ``report`` (a ``Report``) as the folder ``out``; replaces an earlier report folder there in one rename.

    Refuses an ``out`` that exists and is not a report folder (it holds no ``metrics.json``), so nothing else is
    ever overwritten. With ``wandb_project`` the metrics and figures also go to a wandb run (``WANDB_MODE`` applies).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "metrics.json").is_file())):
        raise FileExistsError(f"{out} exists and is not an ecgfm report folder (no metrics.json): choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    images = {name: png_bytes(figure) for name, figure in report.figures.items()}
    results = dict(report.results)
    results["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["figures"] = {name: {"file": f"figures/{name}", "caption": report.captions[name]} for name in images}
    blocks = blocks_of(results, report.captions)
    title = f"ecgfm report: {results['model']['name']}"
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        (staging / "figures").mkdir()
        for name, data in images.items():
            atomic_write_bytes(staging / "figures" / name, data)
        atomic_write_text(staging / "report.md", render_markdown(blocks))
        atomic_write_text(staging / "report.html", render_html(blocks, images, title))
        atomic_write_json(staging / "metrics.json", _plain(results))
        fsync_folder(staging / "figures")
        fsync_folder(staging)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if wandb_project:
        log_to_wandb(results, out, wandb_project, wandb_name)
    return out


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an earlier report there is renamed aside first, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(6)}"
        os.rename(out, old)
    os.rename(staging, out)
    fsync_folder(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def log_to_wandb(results: Mapping[str, Any], out: Path, project: str, name: str | None = None) -> None:
    """One wandb run: every metric under its report key (``test/record/diagnoses/auroc/...``, with ``/low`` and
    ``/high``), every figure as an image under ``<split>/<unit>/<figure>``, and the report's settings as config."""
    import wandb

    split, unit = results["data"]["split"], results["unit"]
    run = wandb.init(
        project=project,
        name=name or f"report-{results['model']['name']}-{split}-{unit}",
        job_type="report",
        config=_plain({"model": results["model"], "data": results["data"], **results["settings"]}),
        dir=str(out),
    )
    try:
        logged: dict[str, Any] = {}
        for key, entry in results["metrics"].items():
            if entry.get("estimate") is None:
                continue
            logged[key] = entry["estimate"]
            for bound in ("low", "high"):
                if entry.get(bound) is not None:
                    logged[f"{key}/{bound}"] = entry[bound]
        for figure, info in results["figures"].items():
            logged[f"{split}/{unit}/{Path(figure).stem}"] = wandb.Image(
                str(out / info["file"]), caption=info["caption"]
            )
        run.log(logged)
    finally:
        run.finish()
