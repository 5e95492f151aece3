"""Which leads and moments of an ECG drive one model output: gradients, gradient x input and integrated gradients
(through ``captum``), averaged over beats aligned on R peaks, and drawn over a 12-lead ECG on standard paper grid.

Where the attribution is taken. ``ECGModel`` reads raw millivolts and its preprocessing (ECGFounder's notch,
band-pass, running-median baseline and z-score; HuBERT-ECG's filters, min-max and decimation) is made of
differentiable torch ops (FFT convolutions, mean/std, and a running median that passes the gradient to the selected
sample: piecewise linear, exact away from ties, which a filtered signal does not have), so gradients and gradient x
input are taken with respect to the **raw input**, through the preprocessing. Integrated
gradients are too, unless the preprocessing removes the signal's scale (z-score, min-max: ``f(a * x) == f(x)`` for
every ``a > 0``): then the straight path from the flat-ECG baseline ``0`` to ``x`` is flat except within ~1e-8 of
the baseline, no Riemann sum sees the jump, and completeness fails (the attributions sum to ~0, by Euler's theorem).
For such models integrated gradients are taken at the **preprocessed input** (the signal the adapter and backbone
read, same leads and samples), from its flat baseline ``0``, which is what a flat raw ECG preprocesses to.
:func:`attribution_space` says which space a call uses, and ``at=`` forces one. HuBERT-ECG's chain both removes the
scale and decimates (its preprocessed samples are not the record's), so its integrated gradients are refused.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.signal
import torch
from matplotlib.collections import LineCollection
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from ecgfm.ecg_paper import LAYOUT, RHYTHM_LEAD
from ecgfm.io import atomic_write_bytes
from ecgfm.leads import STANDARD_LEADS, canonical_lead

if TYPE_CHECKING:
    from ecgfm.pretrained import ECGModel

__all__ = [
    "METHODS",
    "SPACES",
    "BeatAverage",
    "SaliencyError",
    "attribute",
    "attribution_space",
    "beat_average",
    "detect_r_peaks",
    "output_score",
    "plot_beat_average",
    "plot_saliency",
    "save_figure",
]

#: Attribution methods :func:`attribute` knows.
METHODS = ("integrated_gradients", "gradient", "gradient_x_input")
#: Where an attribution is taken: the raw mV input, or the preprocessed signal the backbone reads.
SPACES = ("input", "preprocessed")

MM_PER_S = 25.0
MM_PER_MV = 10.0
ROW_MM = 30.0  # height of each row band on the page, as ecgfm.ecg_paper draws it
BASELINE = 0.6  # where a row's 0 mV lies, as a fraction of the band from its top
GRID_MINOR = "#f6c9c9"
GRID_MAJOR = "#e58f8f"


class SaliencyError(ValueError):
    """An output, lead, space or array that an attribution or drawing cannot use."""


# ------------------------------------------------------------------------------------------------ attributions


def output_score(model: ECGModel, output: str) -> tuple[str, str]:
    """``(head, key)`` of a public score output (a probability or a value): decisions are 0/1 and have no gradient."""
    keys = {public: (head, key) for public, head, key in model.output_keys()}
    scores = model.score_names()
    if output not in keys:
        raise SaliencyError(f"the model {model.name!r} has no output {output!r}; its scores are: {', '.join(scores)}")
    if output not in scores:
        rule = next((r for r in model.decision_rules() if r["output"] == output), {})
        score = rule.get("score") or ", ".join(rule.get("scores", [])) or ", ".join(scores)
        raise SaliencyError(
            f"output {output!r} of {model.name!r} is a 0/1 decision with no gradient: attribute {score}"
        )
    return keys[output]


def _prepare(model: ECGModel, signal: Tensor, lead_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The signal as float32 on the model's device, checked against its contract, and its [B, L] bool mask."""
    device = next(model.parameters()).device
    signal = torch.as_tensor(signal).detach().to(device=device, dtype=torch.float32)
    mask = None if lead_mask is None else torch.as_tensor(lead_mask).to(device)
    return signal, model._check_signal(signal, mask)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise SaliencyError(f"unknown attribution method {method!r}; expected one of {', '.join(METHODS)}")


def _default_space(model: ECGModel, x: Tensor, mask: Tensor, method: str) -> tuple[str, Tensor | None]:
    """The space ``method`` is taken in by default, and ``x`` preprocessed when deciding needed it (reused)."""
    if method != "integrated_gradients":
        return "input", None
    with torch.no_grad():
        full, half = model.preprocessing(x, mask), model.preprocessing(0.5 * x, mask)
    scale = full.abs().amax().clamp_min(1e-12)
    if not bool(((full - half).abs() <= 1e-4 * scale).all()):
        return "input", full
    if full.shape != x.shape:
        raise SaliencyError(
            f"integrated gradients of {model.name!r} cannot be drawn over the record: its preprocessing removes the "
            f"signal's scale (at the raw input they would sum to ~0) and turns {tuple(x.shape)} into "
            f"{tuple(full.shape)}; use method='gradient', or at='input' knowing they are not complete"
        )
    return "preprocessed", full


def attribution_space(model: ECGModel, signal: Tensor, method: str, lead_mask: Tensor | None = None) -> str:
    """``"input"`` or ``"preprocessed"``: where :func:`attribute` takes ``method`` by default (module docstring);
    integrated gradients go to the preprocessed input when the preprocessing removes the scale of ``signal``."""
    _check_method(method)
    x, mask = _prepare(model, signal, lead_mask)
    return _default_space(model, x, mask, method)[0]


def _score_function(model: ECGModel, head_name: str, key: str, space: str):
    """``f(x [B, L, T], mask [B, L] float) -> [B]``: the output's probability or value from ``x`` in ``space``."""
    head = model.heads[head_name]

    def score(x: Tensor, mask: Tensor) -> Tensor:
        present = mask.to(x.dtype).unsqueeze(-1)
        x = x * present  # an absent lead's attribution is exactly zero
        if space == "input":
            features = model.features(x, mask.bool())
        else:
            adapted, _ = model.adapter(x, mask.bool())
            features = model.backbone.forward_features(adapted)
        return head.postprocess(head(features))[key].float()

    return score


def attribute(
    model: ECGModel,
    signal: Tensor,
    output: str,
    method: str = "integrated_gradients",
    lead_mask: Tensor | None = None,
    *,
    at: str | None = None,
    n_steps: int = 64,
    internal_batch_size: int | None = None,
    absolute: bool = False,
) -> Tensor:
    """Attribution of ``output`` (a public score name: ``"p_Atrial fibrillation"``, ``"potassium_mmol_l"``) to each
    lead and sample of ``signal`` [B, L, T] (raw mV, the model's contract) -> float32 [B, L, T] on the signal's device.

    ``method``: ``"gradient"`` (captum ``Saliency``, signed unless ``absolute``), ``"gradient_x_input"``
    (``InputXGradient``) or ``"integrated_gradients"`` (``IntegratedGradients`` from the flat ECG ``0``, ``n_steps``
    Gauss-Legendre points, ``internal_batch_size`` inputs per forward pass). ``at``: ``"input"`` or
    ``"preprocessed"`` (default: :func:`attribution_space`). Leads with ``lead_mask`` False get zero attribution.
    """
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    head_name, key = output_score(model, output)
    _check_method(method)
    if at is not None and at not in SPACES:
        raise SaliencyError(f"at={at!r}: attributions are taken at one of {', '.join(SPACES)}")
    if n_steps < 2:
        raise SaliencyError(f"integrated gradients need n_steps >= 2, got {n_steps}")
    original_device = torch.as_tensor(signal).device
    x, mask = _prepare(model, signal, lead_mask)
    space, preprocessed = (at, None) if at is not None else _default_space(model, x, mask, method)
    if space == "preprocessed":
        if preprocessed is None:
            with torch.no_grad():
                preprocessed = model.preprocessing(x, mask)
        if preprocessed.shape != x.shape:
            raise SaliencyError(
                f"the preprocessing of {model.name!r} turns {tuple(x.shape)} into {tuple(preprocessed.shape)}: an "
                "attribution there cannot be laid over the record; use at='input'"
            )
        x = preprocessed.float()
    forward = _score_function(model, head_name, key, space)
    extra = (mask.float(),)
    was_training = model.training
    model.eval()
    try:
        if method == "gradient":
            result = Saliency(forward).attribute(x.requires_grad_(), abs=False, additional_forward_args=extra)
        elif method == "gradient_x_input":
            result = InputXGradient(forward).attribute(x.requires_grad_(), additional_forward_args=extra)
        else:
            result = IntegratedGradients(forward).attribute(
                x,
                baselines=torch.zeros_like(x),
                additional_forward_args=extra,
                n_steps=int(n_steps),
                method="gausslegendre",
                internal_batch_size=internal_batch_size,
            )
    finally:
        model.train(was_training)
    result = torch.where(mask.unsqueeze(-1), result.detach().float(), 0.0)
    if absolute:
        result = result.abs()
    return result.to(original_device)


# ------------------------------------------------------------------------------------------------ beats


@dataclass(frozen=True)
class BeatAverage:
    """A record's mean beat: signal (mV) and attribution [L, W] averaged over ``n_beats`` beats aligned on R peaks."""

    signal: np.ndarray
    attribution: np.ndarray
    n_beats: int
    r_peaks: np.ndarray  # every R peak found (sample indices), including those too near an edge to average
    fs: float
    window: tuple[float, float]
    lead: str

    @property
    def times(self) -> np.ndarray:
        """Seconds from the R peak of each of the W samples."""
        return (np.arange(self.signal.shape[-1]) + round(self.window[0] * self.fs)) / self.fs


def detect_r_peaks(lead: np.ndarray, fs: float, refractory_s: float = 0.25) -> np.ndarray:
    """Sample indices of R peaks in one lead (mV): a 5-15 Hz band-pass and a QRS energy envelope found with
    ``scipy.signal.find_peaks`` (refractory distance, threshold from the median of 2-s maxima, so one artefact or a
    tall T wave does not set it), each moved to the extreme of the QRS's dominant polarity."""
    lead = np.nan_to_num(np.asarray(lead, dtype=np.float64))
    n = lead.shape[-1]
    if lead.ndim != 1 or n < int(fs):
        raise SaliencyError(f"R peaks are found in one lead of at least 1 s, got shape {lead.shape} at {fs:g} Hz")
    high = min(15.0, 0.45 * fs)
    qrs = scipy.signal.sosfiltfilt(scipy.signal.butter(2, [5.0, high], btype="bandpass", fs=fs, output="sos"), lead)
    width = max(1, round(0.12 * fs))
    envelope = np.convolve(np.gradient(qrs) ** 2, np.ones(width) / width, mode="same")
    chunk = round(2 * fs)
    maxima = [envelope[i : i + chunk].max() for i in range(0, n - chunk // 2, chunk)] or [envelope.max()]
    threshold = 0.3 * float(np.median(maxima))
    if threshold <= 0:
        return np.zeros(0, dtype=np.int64)
    refractory = max(1, round(refractory_s * fs))
    found, _ = scipy.signal.find_peaks(envelope, height=threshold, distance=refractory)
    if not len(found):
        return found.astype(np.int64)
    band = scipy.signal.sosfiltfilt(
        scipy.signal.butter(2, [0.5, min(40.0, 0.45 * fs)], "bandpass", fs=fs, output="sos"), lead
    )
    reach = round(0.08 * fs)
    spans = [(max(0, p - reach), min(n, p + reach + 1)) for p in found]
    polarity = 1.0 if np.median([band[a:b].max() + band[a:b].min() for a, b in spans]) >= 0 else -1.0
    peaks = np.array([a + int(np.argmax(polarity * band[a:b])) for a, b in spans], dtype=np.int64)
    keep = np.concatenate([[True], np.diff(peaks) >= refractory])  # two envelope peaks on one QRS count once
    return peaks[keep]


def _as_2d(array: np.ndarray | Tensor, what: str) -> np.ndarray:
    """A [L, T] float array from a numpy array or tensor (one record)."""
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise SaliencyError(f"{what} must be one record [leads, samples], got shape {array.shape}")
    return array


def _lead_index(lead_names: Sequence[str], lead: str) -> int:
    """Position of ``lead`` (any spelling) among ``lead_names``."""
    names = [canonical_lead(name) or name for name in lead_names]
    wanted = canonical_lead(lead) or lead
    if wanted not in names:
        raise SaliencyError(f"lead {lead!r} is not among the record's leads ({', '.join(lead_names)})")
    return names.index(wanted)


def beat_average(
    signal: np.ndarray | Tensor,
    attribution: np.ndarray | Tensor,
    fs: float,
    lead: str = "II",
    window: tuple[float, float] = (-0.25, 0.45),
    lead_names: Sequence[str] = STANDARD_LEADS,
) -> BeatAverage:
    """Average one record's signal and attribution [L, T] over its beats, aligned on R peaks found in ``lead``, over
    ``window`` seconds around each peak: a per-beat picture (peaked T waves, wide QRS) a 10-s trace hides."""
    x, a = _as_2d(signal, "signal"), _as_2d(attribution, "attribution")
    if x.shape != a.shape or x.shape[0] != len(lead_names):
        raise SaliencyError(
            f"signal {x.shape} and attribution {a.shape} must both be [{len(lead_names)} leads, samples]"
        )
    if not window[0] < 0 < window[1]:
        raise SaliencyError(f"window {window} must run from before the R peak (< 0 s) to after it (> 0 s)")
    index = _lead_index(lead_names, lead)
    peaks = detect_r_peaks(x[index], fs)
    before, after = round(-window[0] * fs), round(window[1] * fs)
    usable = peaks[(peaks - before >= 0) & (peaks + after <= x.shape[1])]
    if not len(usable):
        raise SaliencyError(
            f"no whole beat in lead {lead}: {len(peaks)} R peaks found, none with {window[0]:g}..{window[1]:g} s "
            "around it inside the record (a flat or absent lead?)"
        )
    offsets = np.arange(-before, after)
    at = usable[:, None] + offsets[None, :]  # [beats, W]
    return BeatAverage(
        signal=x[:, at].mean(axis=1),
        attribution=a[:, at].mean(axis=1),
        n_beats=len(usable),
        r_peaks=peaks,
        fs=float(fs),
        window=(float(window[0]), float(window[1])),
        lead=lead_names[index],
    )


# ------------------------------------------------------------------------------------------------ drawing


def _colour_scale(attribution: np.ndarray, signed: bool, smooth: int) -> tuple[np.ndarray, Normalize, object, str]:
    """Display values (|a| or a, moving-averaged over ``smooth`` samples), their norm (to the 99.5th percentile of
    magnitude, so one spike does not wash the rest out), a colour map that fades to clear at 0, and its label."""
    values = attribution if signed else np.abs(attribution)
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        values = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), -1, values)
    top = float(np.percentile(np.abs(values), 99.5)) if values.size else 0.0
    top = top if top > 0 else 1.0
    if signed:
        cmap = LinearSegmentedColormap.from_list(
            "saliency_signed", [(0.13, 0.40, 0.67, 0.9), (1, 1, 1, 0.0), (0.75, 0.10, 0.15, 0.9)]
        )
        return values, Normalize(-top, top), cmap, "attribution (red raises the output, blue lowers it)"
    cmap = LinearSegmentedColormap.from_list(
        "saliency", [(1.0, 0.85, 0.30, 0.0), (1.0, 0.65, 0.10, 0.55), (0.80, 0.20, 0.05, 0.8), (0.35, 0.0, 0.35, 0.9)]
    )
    return values, Normalize(0, top), cmap, "|attribution| (the colour saturates at the 99.5th percentile)"


def _grid(ax, x0: float, x1: float, y0: float, y1: float) -> None:
    """The pink 1-mm grid, darker every 5 mm, over [x0, x1] x [y0, y1] mm."""
    for step, colour, width in ((1.0, GRID_MINOR, 0.35), (5.0, GRID_MAJOR, 0.7)):
        xs = np.arange(np.ceil(x0 / step) * step, x1 + 1e-9, step)
        ys = np.arange(np.ceil(y0 / step) * step, y1 + 1e-9, step)
        lines = [((x, y0), (x, y1)) for x in xs] + [((x0, y), (x1, y)) for y in ys]
        ax.add_collection(LineCollection(lines, colors=colour, linewidths=width, zorder=0))


def _heat(ax, values: np.ndarray, norm: Normalize, cmap, extent: tuple[float, float, float, float]) -> None:
    """A band behind a trace coloured by the attribution at each moment."""
    ax.imshow(values[None, :], extent=extent, cmap=cmap, norm=norm, aspect="auto", interpolation="bilinear", zorder=1)


def _trace(ax, x_mm: np.ndarray, y_mm: np.ndarray, clip: tuple[float, float, float, float]) -> None:
    """A black ECG trace clipped to its band (x0, y0, width, height in mm)."""
    (line,) = ax.plot(x_mm, y_mm, color="black", linewidth=0.7, zorder=3)
    line.set_clip_path(Rectangle(clip[:2], clip[2], clip[3], transform=ax.transData))


def _colour_bar(fig: Figure, norm: Normalize, cmap, label: str, axes) -> None:
    """A horizontal colour bar under ``axes`` naming what the colour means."""
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, orientation="horizontal", fraction=0.04, pad=0.03)
    bar.set_label(label, fontsize=9)
    bar.ax.tick_params(labelsize=8)


def plot_saliency(
    signal: np.ndarray | Tensor,
    attribution: np.ndarray | Tensor,
    fs: float,
    lead_names: Sequence[str] = STANDARD_LEADS,
    title: str = "",
    beat_averaged: bool = False,
    *,
    signed: bool = False,
    smooth_s: float = 0.04,
    lead: str = RHYTHM_LEAD,
    window: tuple[float, float] = (-0.25, 0.45),
) -> Figure:
    """One record [L, T] (mV) and its attribution as a paper ECG (3 x 4 panels and a lead II rhythm strip, 25 mm/s,
    10 mm/mV, pink grid) with the attribution as a heat band behind each trace; ``beat_averaged`` draws the mean
    beat of each lead instead (:func:`beat_average` on ``lead``). A clinician reads where the model looked."""
    x, a = _as_2d(signal, "signal"), _as_2d(attribution, "attribution")
    if x.shape != a.shape or x.shape[0] != len(lead_names):
        raise SaliencyError(
            f"signal {x.shape} and attribution {a.shape} must both be [{len(lead_names)} leads, samples]"
        )
    if beat_averaged:
        average = beat_average(x, a, fs, lead=lead, window=window, lead_names=lead_names)
        return plot_beat_average(average, lead_names, title, signed=signed, smooth_s=smooth_s)
    names = [canonical_lead(name) or name for name in lead_names]
    values, norm, cmap, label = _colour_scale(a, signed, max(1, round(smooth_s * fs)))
    seconds = x.shape[1] / fs
    panel_s = min(seconds, 10.0) / 4
    width_mm, height_mm = 4 * panel_s * MM_PER_S, 4 * ROW_MM
    fig = Figure(figsize=(13.0, 8.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlim(0, width_mm)
    ax.set_ylim(0, height_mm)
    ax.set_aspect("equal")
    ax.axis("off")
    _grid(ax, 0, width_mm, 0, height_mm)
    rhythm = canonical_lead(lead) or lead
    rows = [*LAYOUT, (rhythm,)]
    for r, row in enumerate(rows):
        top = height_mm - r * ROW_MM
        base = top - BASELINE * ROW_MM
        for c, name in enumerate(row):
            span = 4 * panel_s if r == len(rows) - 1 else panel_s
            start = 0.0 if r == len(rows) - 1 else c * panel_s
            x0 = start * MM_PER_S
            i0, i1 = round(start * fs), min(x.shape[1], round((start + span) * fs))
            ax.text(x0 + 1.0, top - 2.0, name, fontsize=10, fontweight="bold", va="top", zorder=4)
            if c:
                ax.plot([x0, x0], [base - 3, base + 3], color="black", linewidth=1.0, zorder=4)
            if name not in names:
                ax.text(x0 + 1.0, top - 7.0, "(not read by the model)", fontsize=7, color="grey", va="top", zorder=4)
                continue
            lead_x = x[names.index(name), i0:i1]
            if not len(lead_x):
                continue
            t_mm = (np.arange(i0, i1) / fs) * MM_PER_S
            _heat(ax, values[names.index(name), i0:i1], norm, cmap, (t_mm[0], t_mm[-1], top - ROW_MM, top))
            y = base + (lead_x - np.median(lead_x)) * MM_PER_MV
            _trace(ax, t_mm, y, (x0, top - ROW_MM, span * MM_PER_S, ROW_MM))
    ax.text(width_mm, -1.5, "25 mm/s   10 mm/mV", fontsize=8, ha="right", va="top")
    if title:
        fig.suptitle(title, fontsize=12)
    _colour_bar(fig, norm, cmap, label, ax)
    return fig


def plot_beat_average(
    average: BeatAverage,
    lead_names: Sequence[str] = STANDARD_LEADS,
    title: str = "",
    *,
    signed: bool = False,
    smooth_s: float = 0.02,
) -> Figure:
    """The mean beat of every lead in the 3 x 4 layout on paper grid (25 mm/s, 10 mm/mV, one amplitude scale for all
    leads) with its beat-averaged attribution as a heat band, the R peak dotted: where in the beat the model looked."""
    if average.signal.shape[0] != len(lead_names):
        raise SaliencyError(f"the beat average has {average.signal.shape[0]} leads, lead_names {len(lead_names)}")
    names = [canonical_lead(name) or name for name in lead_names]
    values, norm, cmap, label = _colour_scale(average.attribution, signed, max(1, round(smooth_s * average.fs)))
    t_mm = average.times * MM_PER_S
    centred = average.signal - np.median(average.signal, axis=-1, keepdims=True)
    y_lo = 5 * np.floor((centred.min() * MM_PER_MV - 2) / 5)
    y_hi = 5 * np.ceil((centred.max() * MM_PER_MV + 2) / 5)
    fig = Figure(
        figsize=(11.0, 3 * (y_hi - y_lo) / (t_mm[-1] - t_mm[0]) * 11.0 / 4 + 1.6), dpi=100, layout="constrained"
    )
    axes = fig.subplots(3, 4)
    for r, row in enumerate(LAYOUT):
        for c, name in enumerate(row):
            ax = axes[r, c]
            ax.set_xlim(t_mm[0], t_mm[-1])
            ax.set_ylim(y_lo, y_hi)
            ax.set_aspect("equal")
            ax.axis("off")
            _grid(ax, t_mm[0], t_mm[-1], y_lo, y_hi)
            ax.text(t_mm[0] + 0.8, y_hi - 0.8, name, fontsize=10, fontweight="bold", va="top", zorder=4)
            if name not in names:
                ax.text(t_mm[0] + 0.8, y_hi - 5, "(not read)", fontsize=7, color="grey", va="top", zorder=4)
                continue
            i = names.index(name)
            _heat(ax, values[i], norm, cmap, (t_mm[0], t_mm[-1], y_lo, y_hi))
            ax.axvline(0.0, color="#444444", linestyle=":", linewidth=0.9, zorder=2)
            _trace(ax, t_mm, centred[i] * MM_PER_MV, (t_mm[0], y_lo, t_mm[-1] - t_mm[0], y_hi - y_lo))
    beats = f"mean of {average.n_beats} beats aligned on lead {average.lead} R peaks (dotted), 25 mm/s, 10 mm/mV"
    fig.suptitle(f"{title}\n{beats}" if title else beats, fontsize=11)
    _colour_bar(fig, norm, cmap, label, axes.ravel().tolist())
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: float | None = None) -> Path:
    """Write ``fig`` as a PNG atomically (a killed run never leaves half an image); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SaliencyError(f"{path}: figures are written as PNG, name the file *.png")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())
