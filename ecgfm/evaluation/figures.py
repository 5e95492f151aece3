"""The report's figures, readable at a glance: ROC and precision-recall curves with each label's interval in the
legend, reliability curves, confusion matrices with counts and row percentages, Bland-Altman and scatter plots for
regression heads, and a forest plot of one metric per subgroup.

Each function takes plain arrays and returns a ``matplotlib.figure.Figure`` built without pyplot (no global state, no
display needed); :func:`png_bytes` renders one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "Curve",
    "bland_altman_figure",
    "calibration_figure",
    "confusion_figure",
    "forest_figure",
    "png_bytes",
    "pr_figure",
    "pr_points",
    "roc_figure",
    "roc_points",
    "scatter_figure",
    "wrap_label",
]

#: Most curves drawn on one axes; beyond, the labels with the most positives are drawn and the title says so.
MAX_CURVES = 10
DPI = 110


@dataclass
class Curve:
    """One label's truth (0/1) and scores, with the legend text (``AF: 0.91 (0.85-0.96)``)."""

    label: str
    y: np.ndarray
    score: np.ndarray
    legend: str


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (what the HTML page embeds and figures/*.png hold)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def _figure(width: float = 6.4, height: float = 5.2) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _shown(curves: Sequence[Curve]) -> tuple[list[Curve], str]:
    """The curves to draw (at most MAX_CURVES, those with the most positives) and a title note if some are left out."""
    if len(curves) <= MAX_CURVES:
        return list(curves), ""
    order = sorted(curves, key=lambda c: -float(np.sum(c.y)))
    return order[:MAX_CURVES], f" ({MAX_CURVES} of {len(curves)} labels, most positives)"


def roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(false positive rate, true positive rate)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    y, score = np.asarray(y, bool), np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    ordered = score[order]
    last = np.r_[ordered[1:] != ordered[:-1], True]  # the last row of each run of tied scores
    tp, fp = np.cumsum(y[order])[last], np.cumsum(~y[order])[last]
    positives, negatives = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]


def pr_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(recall, precision)`` at every distinct threshold, highest threshold first (as a step curve)."""
    y, score = np.asarray(y, bool), np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    ordered = score[order]
    last = np.r_[ordered[1:] != ordered[:-1], True]
    tp, called = np.cumsum(y[order])[last], np.cumsum(np.ones(len(y)))[last]
    recall = tp / max(int(y.sum()), 1)
    precision = tp / called
    return np.r_[0.0, recall], np.r_[precision[0] if len(precision) else 1.0, precision]


def roc_figure(curves: Sequence[Curve], title: str, level: float = 0.95) -> Figure:
    """ROC curves of several labels on one axes, the chance diagonal, and AUROC (interval) per label in the legend."""
    shown, note = _shown(curves)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance (AUROC 0.5)")
    for curve in shown:
        fpr, tpr = roc_points(curve.y, curve.score)
        ax.step(fpr, tpr, where="post", linewidth=1.8, label=curve.legend)
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title=f"{title}{note}",
        aspect="equal",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5, title=f"AUROC ({level:.0%} CI)", title_fontsize=8)
    return fig


def pr_figure(curves: Sequence[Curve], title: str, level: float = 0.95) -> Figure:
    """Precision-recall curves, each label's prevalence as a dotted line (what a random score gets), AUPRC in the
    legend."""
    shown, note = _shown(curves)
    fig = _figure()
    ax = fig.add_subplot()
    for curve in shown:
        recall, precision = pr_points(curve.y, curve.score)
        (line,) = ax.step(recall, precision, where="post", linewidth=1.8, label=curve.legend)
        ax.axhline(float(np.mean(curve.y)), color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title=f"{title}{note}",
        aspect="equal",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=7.5, title=f"AUPRC ({level:.0%} CI); dotted: prevalence", title_fontsize=8)
    return fig


def calibration_figure(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], title: str, note: str = ""
) -> Figure:
    """Reliability curves: per label ``(legend, mean predicted probability, observed fraction, count)`` per bin,
    the diagonal of perfect calibration, and below, how many cases fall in each bin."""
    fig = _figure(6.4, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for legend, predicted, observed, count in curves[:MAX_CURVES]:
        keep = np.asarray(count) > 0
        (line,) = top.plot(
            np.asarray(predicted)[keep], np.asarray(observed)[keep], marker="o", markersize=4, label=legend
        )
        bottom.plot(
            np.asarray(predicted)[keep], np.asarray(count)[keep], marker="o", markersize=3, color=line.get_color()
        )
    top.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), ylabel="observed fraction positive", title=title)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=7.5, title=note or None, title_fontsize=8)
    bottom.set(xlabel="predicted probability (bin mean)", ylabel="cases per bin", yscale="log")
    bottom.grid(alpha=0.3)
    return fig


def confusion_figure(matrices: Sequence[tuple[str, np.ndarray, Sequence[str]]], title: str) -> Figure:
    """Confusion matrices ``(title, counts [K, K] with rows = truth, class names)`` side by side, each cell with its
    count and its row percentage (sensitivity / specificity on the diagonal of a 2x2)."""
    n = len(matrices)
    columns = min(n, 4)
    rows = (n + columns - 1) // columns
    size = max(2.6, 0.55 * max(len(names) for _, _, names in matrices) + 1.4)
    fig = Figure(figsize=(size * columns + 0.4, size * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).reshape(-1)
    for ax, (name, counts, names) in zip(axes, matrices, strict=False):
        counts = np.asarray(counts, dtype=np.int64)
        totals = counts.sum(1, keepdims=True)
        share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                colour = "white" if share[i, j] > 0.6 else "black"
                ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(len(names)), names, fontsize=7.5, rotation=30 if len(names) > 2 else 0)
        ax.set_yticks(range(len(names)), names, fontsize=7.5)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(wrap_label(name), fontsize=8.5)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\ncount and row % (true class = 100 %)", fontsize=10)
    return fig


def bland_altman_figure(
    y: np.ndarray, pred: np.ndarray, bias: float, low: float, high: float, title: str, unit: str
) -> Figure:
    """Difference (prediction - truth) against the mean of both, with the bias and the 95 % limits of agreement."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot()
    ax.scatter((y + pred) / 2, pred - y, s=10, alpha=0.5, edgecolors="none")
    for value, text, style in ((bias, "bias", "-"), (low, "lower LoA", "--"), (high, "upper LoA", "--")):
        ax.axhline(value, color="C3", linestyle=style, linewidth=1.2)
        ax.annotate(
            f"{text} {value:+.2f}",
            (1.0, value),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=8,
            color="C3",
        )
    suffix = f" ({unit})" if unit else ""
    ax.set(xlabel=f"mean of prediction and truth{suffix}", ylabel=f"prediction - truth{suffix}", title=title)
    ax.grid(alpha=0.3)
    return fig


def scatter_figure(
    y: np.ndarray, pred: np.ndarray, title: str, unit: str, cutoffs: Sequence[float] = (), note: str = ""
) -> Figure:
    """Prediction against truth with the identity line and the clinical cut-offs on both axes."""
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    fig = _figure(5.6, 5.2)
    ax = fig.add_subplot()
    low = float(np.nanmin(np.r_[y, pred])) if len(y) else 0.0
    high = float(np.nanmax(np.r_[y, pred])) if len(y) else 1.0
    pad = 0.05 * (high - low or 1.0)
    ax.plot(
        [low - pad, high + pad], [low - pad, high + pad], color="0.6", linestyle="--", linewidth=1, label="identity"
    )
    ax.scatter(y, pred, s=10, alpha=0.5, edgecolors="none")
    for i, cut in enumerate(cutoffs):
        ax.axvline(cut, color="C3", linestyle=":", linewidth=1, label="cut-offs" if i == 0 else None)
        ax.axhline(cut, color="C3", linestyle=":", linewidth=1)
    suffix = f" ({unit})" if unit else ""
    ax.set(
        xlim=(low - pad, high + pad),
        ylim=(low - pad, high + pad),
        xlabel=f"truth{suffix}",
        ylabel=f"prediction{suffix}",
        title=title,
        aspect="equal",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, title=note or None, title_fontsize=8)
    return fig


def forest_figure(
    rows: Sequence[tuple[str, float, float, float]], title: str, xlabel: str, reference: float | None
) -> Figure:
    """One metric per subgroup as a point with its interval (``(group, estimate, low, high)``), with the overall
    value as a vertical line: a group whose interval lies off it stands out."""
    fig = _figure(6.4, 0.9 + 0.32 * max(len(rows), 1))
    ax = fig.add_subplot()
    for i, (_, estimate, low, high) in enumerate(rows):
        ax.errorbar(estimate, i, xerr=[[estimate - low], [high - estimate]], fmt="o", color="C0", capsize=3)
    if reference is not None:
        ax.axvline(reference, color="C3", linestyle="--", linewidth=1, label=f"all: {reference:.3f}")
        ax.legend(loc="best", fontsize=8)
    ax.set_yticks(range(len(rows)), [wrap_label(group, 40) for group, *_ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    ax.grid(alpha=0.3, axis="x")
    return fig


def wrap_label(text: str, width: int = 34) -> str:
    """Long label names on two lines, so titles and tick labels stay inside the figure."""
    if len(text) <= width:
        return text
    cut = text.rfind(" ", 0, width)
    cut = cut if cut > 0 else width
    return f"{text[:cut]}\n{text[cut:].strip()}"
