"""Resampling, windowing and named preprocessing chains (ECGFounder's filters, z-score) for ECG tensors.

Every chain is an ``nn.Module`` built from a name or a ``{"name": ..., **kwargs}`` dict, and reports that dict
through ``config()`` so that the exact chain a model was trained with is stored with its checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.fft
import scipy.signal
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecgfm.captured import CapturesArguments
from ecgfm.leads import STANDARD_FS
from ecgfm.registry import PREPROCESSING
from ecgfm.resampling import resample, segment_starts  # noqa: F401  (part of this module's API)

__all__ = [
    "ECGFounderPreprocessing",
    "HuBERTECGPreprocessing",
    "NoPreprocessing",
    "Preprocessing",
    "ZScore",
    "create_preprocessing",
    "ecgfounder_preprocess_numpy",
    "hubert_ecg_preprocess_numpy",
    "resample",
    "segment_starts",
    "to_millivolts",
]

#: Largest number of elements the median filter unfolds at once (rows are processed in chunks below it).
MEDIAN_CHUNK_ELEMENTS = 64 * 1024 * 1024

#: The median filter in a recorded graph (TorchScript, ONNX; see ``_median_filter_graph``): outputs per block that
#: share one selection, and outputs per step, so a step holds ~rows x 1024 x 80 float32 values (batch 64 x 12 leads:
#: ~250 MB) whatever the batch size, which is not known when the graph is recorded. Smaller steps run no faster and
#: make a longer graph (256: 3x the nodes and export time).
MEDIAN_GRAPH_BLOCK = 16
MEDIAN_GRAPH_CHUNK = 1024

#: IIR impulse responses (and start-up transients) are cut once below this fraction of their peak.
IMPULSE_RESPONSE_TOL = 1e-10


# --- Units ---


def to_millivolts(x_int16: Tensor, lsb_uv: float = 1.0) -> Tensor:
    """Stored integer samples (``lsb_uv`` microvolts per step) -> float32 mV, on the batch's device."""
    return x_int16.float() * lsb_uv / 1000.0


# --- ECGFounder's chain, numpy reference ---


def _median_kernel(fs: float, window_s: float) -> int:
    """ECGFounder's baseline kernel ``int(window_s * fs) + 1`` (201 at 500 Hz), made odd for medfilt."""
    kernel = int(window_s * fs) + 1
    return kernel if kernel % 2 == 1 else kernel + 1


def ecgfounder_preprocess_numpy(x: np.ndarray, fs: float = STANDARD_FS) -> np.ndarray:
    """ECGFounder's dataset preprocessing of one record ``x`` [L, T] in mV, with scipy: the reference chain.

    50 Hz notch (Q=30) -> Butterworth band-pass 0.67-40 Hz (order 4), both zero-phase (filtfilt) -> minus a
    0.4 s median-filter baseline per lead -> one z-score over leads x time. Returns float32.
    """
    x = np.asarray(x, dtype=np.float64)
    b, a = scipy.signal.iirnotch(50.0, 30.0, fs=fs)
    x = scipy.signal.filtfilt(b, a, x, axis=-1)
    b, a = scipy.signal.butter(4, [0.67, 40.0], btype="bandpass", fs=fs)
    x = scipy.signal.filtfilt(b, a, x, axis=-1)
    kernel = _median_kernel(fs, 0.4)
    baseline = np.stack([scipy.signal.medfilt(lead, kernel) for lead in x.reshape(-1, x.shape[-1])])
    x = x - baseline.reshape(x.shape)
    x = (x - x.mean()) / (x.std() + 1e-8)
    return x.astype(np.float32)


# --- HuBERT-ECG's chain, numpy reference ---


def hubert_ecg_fir(fs: float, band_hz: Sequence[float], taps: int) -> np.ndarray:
    """HuBERT-ECG's band-pass (biosppy ``filter_signal(ftype="FIR", order=int(0.3 * fs))``): a Hamming-window
    firwin of ``taps`` (odd) taps, applied with filtfilt."""
    return scipy.signal.firwin(taps, [band_hz[0], band_hz[1]], pass_zero=False, fs=fs)


def hubert_ecg_preprocess_numpy(
    x: np.ndarray,
    fs: float = STANDARD_FS,
    band_hz: Sequence[float] = (0.05, 47.0),
    fir_taps: int = 151,
    target_fs: float = 100.0,
    window_s: float = 5.0,
    smooth: float = 1e-8,
) -> np.ndarray:
    """HuBERT-ECG's published preprocessing of one record ``x`` [L, T] in mV, with scipy: the reference chain.

    FIR band-pass (filtfilt) -> per-lead min-max over the record to [-1, 1] -> 5-s windows, each flattened lead after
    lead and ``scipy.signal.decimate``d (order-8 Chebyshev I, zero phase) as one vector, so the filter crosses lead
    boundaries as theirs does -> [L, T * target_fs / fs], the windows one after the other.
    """
    x = np.asarray(x, dtype=np.float64)
    x = scipy.signal.filtfilt(hubert_ecg_fir(fs, band_hz, fir_taps), [1.0], x, axis=-1)
    low, high = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    x = 2 * (x - low) / (high - low + smooth) - 1
    q = round(fs / target_fs)
    width = round(window_s * fs)
    n_leads, n_time = x.shape
    starts = range(0, n_time, width) if n_time >= width else [0]
    windows = [scipy.signal.decimate(x[:, s : s + width].reshape(-1), q).reshape(n_leads, -1) for s in starts]
    return np.concatenate(windows, axis=-1).astype(np.float32)


# --- Base class of the registered chains ---


class Preprocessing(CapturesArguments, nn.Module):
    """A chain ``forward(x [B, L, T] mV, lead_mask [B, L]) -> x``, registered in ``ecgfm.registry.PREPROCESSING``.

    ``config()`` is ``{"name": ..., every constructor argument}``: the exact chain, as checkpoints store it.
    """

    name = "base"

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.captured_arguments()}


def create_preprocessing(spec: str | dict[str, Any] | None) -> Preprocessing:
    """A chain from a name (``"ecgfounder"``), ``{"name": ..., **options}`` or None (the explicit ``none``)."""
    return PREPROCESSING.create("none" if spec is None else spec)


# --- Torch building blocks ---


def _check_input(x: Tensor, lead_mask: Tensor | None) -> None:
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"expected a float tensor [batch, leads, time], got {tuple(x.shape)} {x.dtype}")
    if lead_mask is not None and tuple(lead_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"lead_mask must be [batch, leads] = {tuple(x.shape[:2])}, got {tuple(lead_mask.shape)}")


def _zscore(x: Tensor, lead_mask: Tensor | None, eps: float, per_lead: bool) -> Tensor:
    """(x - mean) / (std + eps), ddof=0, over leads x time (or time only); absent leads become zero."""
    dims = (-1,) if per_lead else (-2, -1)
    if lead_mask is None:
        mean = x.mean(dim=dims, keepdim=True)
        std = (x - mean).square().mean(dim=dims, keepdim=True).sqrt()
        return (x - mean) / (std + eps)
    present = lead_mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1).expand_as(x)
    count = present.sum(dim=dims, keepdim=True).clamp_min(1.0)
    mean = (x * present).sum(dim=dims, keepdim=True) / count
    std = ((x - mean) * present).square().sum(dim=dims, keepdim=True).div(count).sqrt()
    return (x - mean) / (std + eps) * present


def _recording_graph() -> bool:
    """True while ``torch.jit.trace`` or ``torch.export`` (torch.onnx's exporter) records the forward pass: numpy
    calls would be baked in as constants or fail there, and nothing made then may be cached for eager runs."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.jit.is_tracing() or bool(is_exporting is not None and is_exporting())


def _median_filter_graph(x: Tensor, kernel: int) -> Tensor:
    """The median filter as ops ONNX has (Gather, TopK, compare, CumSum, ReduceMin), equal to scipy's medfilt.

    A TopK per window costs ~150 ms per 12 x 5000 record in ONNX Runtime; this selects once per block of
    ``MEDIAN_GRAPH_BLOCK`` outputs instead (~30 ms). The windows of a block lie in one span ``U`` of
    kernel + B - 1 samples, each missing B - 1 of them, so each median is one of the values ranked h+1 .. h+B in
    ``U`` (the candidates): the smallest candidate that at least h+1 of its window's samples do not exceed, counted
    as (count in ``U``) - (count in the left and right parts of ``U`` outside that window), ties included. Taken
    in float32: rounding keeps the order, so the result is exactly float32(the float64 median). Steps of
    ``MEDIAN_GRAPH_CHUNK`` outputs bound the memory a graph holds at once, whatever its batch size.
    """
    half, block = kernel // 2, MEDIAN_GRAPH_BLOCK
    n_time = x.shape[-1]
    n_blocks = -(-n_time // block)
    padded = F.pad(x.float(), (half, half + n_blocks * block - n_time))
    per_step = max(1, MEDIAN_GRAPH_CHUNK // block)
    steps = []
    for first in range(0, n_blocks, per_step):
        last = min(n_blocks, first + per_step)
        span = padded[..., first * block : last * block + kernel - 1].unfold(-1, kernel + block - 1, block)
        # the values ranked h+1 .. h+B: the B largest of the h+B smallest (unsorted selections, no sort)
        cand = span.topk(half + block, dim=-1, largest=False, sorted=False).values
        cand = cand.topk(block, dim=-1, sorted=False).values  # [N, blocks, B]
        top = cand.amax(dim=-1, keepdim=True)
        # samples of the span <= each candidate: the h below all candidates, the candidates up to it, and for the
        # largest candidate its ties ranked past h+B too
        up_to = (cand.unsqueeze(-1) <= cand.unsqueeze(-2)).float().sum(-2) + half
        up_to_top = (span <= top).float().sum(-1, keepdim=True)
        in_span = torch.where(cand == top, up_to_top, up_to).unsqueeze(-2)  # [N, blocks, 1, B]
        # minus those before window r (span[:r]) and after it (span[r + kernel:]), for r = 0 .. B-1
        left = (span[..., : block - 1].unsqueeze(-1) <= cand.unsqueeze(-2)).float().cumsum(-2)
        right = (span[..., kernel:].unsqueeze(-1) <= cand.unsqueeze(-2)).float().flip(-2).cumsum(-2).flip(-2)
        count = in_span - F.pad(left, (0, 0, 1, 0)) - F.pad(right, (0, 0, 0, 1))  # [N, blocks, r, B]
        median = torch.where(count >= half + 1, cand.unsqueeze(-2), torch.inf).amin(dim=-1)
        steps.append(median.flatten(-2))
    return torch.cat(steps, dim=-1)[..., :n_time].to(x.dtype)


@torch.compiler.disable  # torch.compile runs it as it is, instead of tracing into scipy and breaking the graph there
def _median_filter_scipy(x: Tensor, kernel: int) -> Tensor:
    """scipy's 1-D medfilt, row by row: the same zero-padded medians as unfold+median, ~20x faster on the CPU."""
    rows = x.numpy()
    return torch.from_numpy(np.stack([scipy.signal.medfilt(row, kernel) for row in rows]).astype(rows.dtype))


def _median_filter(x: Tensor, kernel: int) -> Tensor:
    """Running median of each row of ``x`` [N, T] with zero-padded edges, as scipy.signal.medfilt."""
    if _recording_graph():
        return _median_filter_graph(x, kernel)
    if x.device.type == "cpu" and not x.requires_grad:
        return _median_filter_scipy(x, kernel)
    half = kernel // 2
    padded = F.pad(x, (half, half))
    out = torch.empty_like(x)
    rows = max(1, MEDIAN_CHUNK_ELEMENTS // (x.shape[-1] * kernel))
    for start in range(0, x.shape[0], rows):
        windows = padded[start : start + rows].unfold(-1, kernel, 1)
        out[start : start + rows] = windows.median(dim=-1).values
    return out


def _next_fast_len(target: int) -> int:
    """The smallest 2^a 3^b 5^c >= ``target``: ``scipy.fft.next_fast_len(target, real=True)`` in plain Python, which
    torch.compile traces (scipy's is a C function behind an lru_cache, a graph break in every filter pass)."""
    best = 1 << max(target - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            quotient = -(-target // p35)
            best = min(best, p35 << max(quotient - 1, 0).bit_length())
            p35 *= 3
        p5 *= 5
    return best


def _steady_state_responses(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Impulse response ``h`` of IIR filter (b, a) and its start-up transient ``r``, cut once decayed.

    ``r`` is what scipy's lfilter adds for a unit first sample when started in steady state (zi = lfilter_zi),
    so that lfilter(b, a, x, zi=lfilter_zi(b, a) * x[0]) == h * x + x[0] * r.
    """
    radius = float(np.abs(np.roots(a)).max()) if len(a) > 1 else 0.0
    if radius >= 1.0:
        raise ValueError(f"unstable filter (largest pole radius {radius:.6f})")
    # an FIR filter (no poles) has exactly len(b) taps: all of them must stay
    n = max(len(a), len(b)) + 64 if radius == 0.0 else int(np.log(IMPULSE_RESPONSE_TOL) / np.log(radius)) * 2 + 64
    impulse = np.zeros(n)
    impulse[0] = 1.0
    h = scipy.signal.lfilter(b, a, impulse)
    r, _ = scipy.signal.lfilter(b, a, np.zeros(n), zi=scipy.signal.lfilter_zi(b, a))
    both = np.maximum(np.abs(h), np.abs(r))
    keep = int(np.nonzero(both > IMPULSE_RESPONSE_TOL * both.max())[0][-1]) + 1
    return h[:keep], r[:keep]


class _FiltFilt:
    """scipy.signal.filtfilt(b, a, x) (odd padding, steady-state start) as FFT convolutions in torch.

    Float64 master copies stay here rather than in buffers, so casting the surrounding model to half precision
    (or moving it to a device without float64) cannot spoil the taps; device copies are cached on first use.
    """

    def __init__(self, b: np.ndarray, a: np.ndarray) -> None:
        self.padlen = 3 * max(len(a), len(b))
        self.h, self.r = _steady_state_responses(b, a)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_sos(cls, sos: np.ndarray) -> _FiltFilt:
        """scipy.signal.sosfiltfilt(sos, x): responses taken through the sections (a high-order IIR's (b, a) loses
        precision), padding as sosfiltfilt's default (3 * (2 * sections + 1 - trailing zero taps))."""
        self = cls.__new__(cls)
        n_sections = sos.shape[0]
        trailing = min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
        self.padlen = 3 * (2 * n_sections + 1 - trailing)
        poles = np.concatenate([np.roots(section[3:]) for section in sos])
        radius = float(np.abs(poles).max())
        if radius >= 1.0:
            raise ValueError(f"unstable filter (largest pole radius {radius:.6f})")
        n = int(np.log(IMPULSE_RESPONSE_TOL) / np.log(radius)) * 2 + 64 if radius > 0 else 64
        impulse = np.zeros(n)
        impulse[0] = 1.0
        h = scipy.signal.sosfilt(sos, impulse)
        r, _ = scipy.signal.sosfilt(sos, np.zeros(n), zi=scipy.signal.sosfilt_zi(sos))
        both = np.maximum(np.abs(h), np.abs(r))
        keep = int(np.nonzero(both > IMPULSE_RESPONSE_TOL * both.max())[0][-1]) + 1
        self.h, self.r = h[:keep], r[:keep]
        self._cache = {}
        return self

    def _taps(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (device, dtype)
        taps = self._cache.get(key)
        if taps is None:
            taps = (
                torch.from_numpy(self.h).to(device=device, dtype=dtype),
                torch.from_numpy(self.r).to(device=device, dtype=dtype),
            )
            if not _recording_graph():  # an exporter's fake tensors must not reach the cache eager runs read
                self._cache[key] = taps
        return taps

    def _lfilter(self, x: Tensor) -> Tensor:
        """One causal pass over rows of ``x`` [N, T], started in steady state for the first sample."""
        h, r = self._taps(x.device, x.dtype)
        n = x.shape[-1]
        k = min(h.shape[0], n)  # taps beyond n never reach an output sample
        if _recording_graph():  # ONNX Runtime's DFT is a fast radix-2 FFT only for powers of two (~20x faster)
            n_fft = 1 << int(n + k - 2).bit_length()
        else:
            n_fft = _next_fast_len(n + k - 1)  # no circular wrap into the first n outputs
        y = torch.fft.irfft(torch.fft.rfft(x, n_fft) * torch.fft.rfft(h[:k], n_fft), n_fft)[..., :n]
        transient = r[:n] if r.shape[0] >= n else F.pad(r, (0, n - r.shape[0]))
        return y + x[..., :1] * transient

    def __call__(self, x: Tensor) -> Tensor:
        p = self.padlen
        if x.shape[-1] <= p:
            raise ValueError(f"filtfilt needs more than {p} samples, got {x.shape[-1]}")
        left = 2 * x[..., :1] - x[..., 1 : p + 1].flip(-1)
        right = 2 * x[..., -1:] - x[..., -p - 1 : -1].flip(-1)
        y = self._lfilter(torch.cat([left, x, right], dim=-1))
        y = self._lfilter(y.flip(-1)).flip(-1)
        return y[..., p:-p]


# --- Named chains ---


@PREPROCESSING.register("none")
class NoPreprocessing(Preprocessing):
    """Pass the signal through unchanged: an explicit "no preprocessing" that still records itself."""

    def forward(self, x: Tensor, lead_mask: Tensor | None = None) -> Tensor:
        return x


@PREPROCESSING.register("zscore")
class ZScore(Preprocessing):
    """Standardise each record (one mean/std over leads x time, or per lead); absent leads stay zero."""

    def __init__(self, eps: float = 1e-8, per_lead: bool = False) -> None:
        super().__init__()
        self.eps = float(eps)
        self.per_lead = bool(per_lead)

    def forward(self, x: Tensor, lead_mask: Tensor | None = None) -> Tensor:
        _check_input(x, lead_mask)
        return _zscore(x, lead_mask, self.eps, self.per_lead)


@PREPROCESSING.register("ecgfounder")
class ECGFounderPreprocessing(Preprocessing):
    """ECGFounder's dataset chain, batched on the signal's device: notch -> band-pass -> baseline -> z-score.

    Matches ``ecgfounder_preprocess_numpy`` (scipy filtfilt/medfilt) to ~1e-6 on standardised output, edges
    included. Set ``notch_hz``, ``band_hz`` or ``baseline_window_s`` to None to skip that step.
    """

    def __init__(
        self,
        fs: float = STANDARD_FS,
        notch_hz: float | None = 50.0,
        notch_q: float = 30.0,
        band_hz: Sequence[float] | None = (0.67, 40.0),
        order: int = 4,
        baseline_window_s: float | None = 0.4,
        zscore: bool = True,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if fs <= 0:
            raise ValueError(f"fs must be positive, got {fs}")
        self.fs = float(fs)
        self.notch_hz = None if notch_hz is None else float(notch_hz)
        self.notch_q = float(notch_q)
        self.band_hz = None if band_hz is None else (float(band_hz[0]), float(band_hz[1]))
        self.order = int(order)
        self.baseline_window_s = None if baseline_window_s is None else float(baseline_window_s)
        self.zscore = bool(zscore)
        self.eps = float(eps)

        self.notch = None
        if self.notch_hz is not None:
            if not 0 < self.notch_hz < self.fs / 2:
                raise ValueError(f"notch_hz={self.notch_hz} must lie in (0, fs/2 = {self.fs / 2})")
            self.notch = _FiltFilt(*scipy.signal.iirnotch(self.notch_hz, self.notch_q, fs=self.fs))
        self.bandpass = None
        if self.band_hz is not None:
            low, high = self.band_hz
            if not 0 < low < high < self.fs / 2:
                raise ValueError(f"band_hz={self.band_hz} must satisfy 0 < low < high < fs/2 = {self.fs / 2}")
            ba = scipy.signal.butter(self.order, [low, high], btype="bandpass", fs=self.fs)
            self.bandpass = _FiltFilt(*ba)
        self.median_kernel = None
        if self.baseline_window_s is not None:
            self.median_kernel = _median_kernel(self.fs, self.baseline_window_s)

    def forward(self, x: Tensor, lead_mask: Tensor | None = None) -> Tensor:
        _check_input(x, lead_mask)
        # The band-pass has poles within 0.004 of the unit circle: its taps need float64 (MPS has none).
        work = torch.float32 if x.device.type == "mps" else torch.float64
        batch, leads, time = x.shape
        y = x.to(work).reshape(batch * leads, time)
        if self.notch is not None:
            y = self.notch(y)
        if self.bandpass is not None:
            y = self.bandpass(y)
        if self.median_kernel is not None:
            y = y - _median_filter(y, self.median_kernel)
        y = y.reshape(batch, leads, time)
        if self.zscore:
            y = _zscore(y, lead_mask, self.eps, per_lead=False)
        elif lead_mask is not None:
            y = y * lead_mask.to(device=y.device, dtype=y.dtype).unsqueeze(-1)
        return y.to(x.dtype)


@PREPROCESSING.register("hubert_ecg")
class HuBERTECGPreprocessing(Preprocessing):
    """HuBERT-ECG's offline preprocessing, batched on the signal's device: [B, L, T] mV at ``fs`` -> [B, L, T / q].

    FIR band-pass (filtfilt) -> per-lead min-max to [-1, 1] over the segment -> each ``window_s`` window flattened
    lead after lead and decimated by q = fs / target_fs as one vector (order-8 Chebyshev I, zero phase, as
    ``scipy.signal.decimate``; the filter crosses lead boundaries, as in their code) -> back to leads, windows one
    after the other (a 10-s segment gives [B, L, 1000]: two 5-s windows the backbone reads one by one). A segment
    shorter than a window is one window. Absent leads (mask False) become zero. Matches
    ``hubert_ecg_preprocess_numpy`` to ~1e-6.
    """

    def __init__(
        self,
        fs: float = STANDARD_FS,
        band_hz: Sequence[float] = (0.05, 47.0),
        fir_taps: int = 151,
        target_fs: float = 100.0,
        window_s: float = 5.0,
        decimate_order: int = 8,
        smooth: float = 1e-8,
    ) -> None:
        super().__init__()
        self.fs = float(fs)
        self.band_hz = (float(band_hz[0]), float(band_hz[1]))
        self.fir_taps = int(fir_taps)
        self.target_fs = float(target_fs)
        self.window_s = float(window_s)
        self.decimate_order = int(decimate_order)
        self.smooth = float(smooth)
        if not 0 < self.band_hz[0] < self.band_hz[1] < self.fs / 2:
            raise ValueError(f"band_hz={self.band_hz} must satisfy 0 < low < high < fs/2 = {self.fs / 2}")
        if self.fir_taps % 2 == 0:
            raise ValueError(f"fir_taps must be odd (a type I band-pass), got {self.fir_taps}")
        q = self.fs / self.target_fs
        if q < 1 or abs(q - round(q)) > 1e-9:
            raise ValueError(f"fs / target_fs must be a whole number, got {self.fs:g} / {self.target_fs:g}")
        self.q = round(q)
        self.window = round(self.window_s * self.fs)
        if self.window % self.q:
            raise ValueError(f"a {self.window_s:g}-s window ({self.window} samples) is not a multiple of q={self.q}")
        self.bandpass = _FiltFilt(hubert_ecg_fir(self.fs, self.band_hz, self.fir_taps), np.ones(1))
        self.decimation = None
        if self.q > 1:
            sos = scipy.signal.cheby1(self.decimate_order, 0.05, 0.8 / self.q, output="sos")
            self.decimation = _FiltFilt.from_sos(sos)

    def forward(self, x: Tensor, lead_mask: Tensor | None = None) -> Tensor:
        _check_input(x, lead_mask)
        batch, leads, time = x.shape
        width = self.window if time >= self.window else time
        if time % width or width % self.q:
            raise ValueError(
                f"hubert_ecg: {time} samples are not whole {self.window_s:g}-s windows of {self.window} samples "
                f"(or one shorter window whose length is a multiple of {self.q})"
            )
        work = torch.float32 if x.device.type == "mps" else torch.float64
        y = self.bandpass(x.to(work).reshape(batch * leads, time)).reshape(batch, leads, time)
        low, high = y.amin(dim=-1, keepdim=True), y.amax(dim=-1, keepdim=True)
        y = 2 * (y - low) / (high - low + self.smooth) - 1
        present = None
        if lead_mask is not None:
            present = lead_mask.to(device=y.device, dtype=y.dtype).unsqueeze(-1)
            y = y * present
        if self.decimation is not None:
            n = time // width
            flat = y.reshape(batch, leads, n, width).permute(0, 2, 1, 3).reshape(batch * n, leads * width)
            flat = self.decimation(flat)[..., :: self.q]
            y = flat.reshape(batch, n, leads, width // self.q).permute(0, 2, 1, 3).reshape(batch, leads, -1)
            if present is not None:
                y = y * present
        return y.to(x.dtype)
