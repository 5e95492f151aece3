"""Resampling to a model's rate and cutting records into windows, in numpy: shared by conversion, ``ecgfm predict``
and the ONNX runtime path, none of which needs torch for it."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import scipy.signal

from ecgfm.leads import STANDARD_FS, STANDARD_N_SAMPLES

__all__ = ["resample", "segment_starts"]


def resample(x: np.ndarray, fs_in: float, fs_out: float = STANDARD_FS) -> np.ndarray:
    """Resample ``x`` [..., T] from ``fs_in`` to ``fs_out`` Hz along the last axis with a polyphase filter.

    The rate ratio is turned into an exact fraction (denominator <= 1000) so that 360 -> 500 Hz is 25/18.
    """
    bad = [f"{name}={fs!r}" for name, fs in (("fs_in", fs_in), ("fs_out", fs_out)) if not (0 < fs < math.inf)]
    if bad:
        raise ValueError(
            f"resample: sampling rates must be positive finite numbers of Hz, got {' and '.join(bad)} "
            f"for an array of shape {np.shape(x)}"
        )
    if fs_in == fs_out:
        return np.asarray(x, dtype=np.float32)
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    y = scipy.signal.resample_poly(np.asarray(x, dtype=np.float64), ratio.numerator, ratio.denominator, axis=-1)
    return y.astype(np.float32)


def segment_starts(n_total: int, n_samples: int = STANDARD_N_SAMPLES, stride: int | None = None) -> list[int]:
    """Start offsets of the full ``n_samples`` windows in a record of ``n_total`` samples.

    A short last piece is dropped, so a record shorter than one window gives ``[]``.
    """
    stride = n_samples if stride is None else stride
    if n_samples <= 0 or stride <= 0:
        raise ValueError(f"n_samples and stride must be positive, got n_samples={n_samples}, stride={stride}")
    return list(range(0, n_total - n_samples + 1, stride))
