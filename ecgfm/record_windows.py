"""A record as a model reads it: its leads picked by name in the model's order, resampled to the model's rate and cut
into full windows, in numpy (no torch). ``ecgfm predict`` feeds models with it; conversion picks leads with it too,
so a flat, NaN or absent lead is treated the same way in a shard and at prediction."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ecgfm.data.sources.base import Record, RecordError
from ecgfm.leads import parse_leads
from ecgfm.resampling import resample, segment_starts

__all__ = [
    "MIN_FS",
    "LeadSelection",
    "RecordWindows",
    "model_windows",
    "read_input_contract",
    "select_leads",
]

#: The lowest sampling rate accepted for a record, in Hz: below it no QRS complex survives, and a header rate of 5
#: (a typo for 500) would be upsampled 100-fold into a hundred windows of nothing.
MIN_FS = 25.0


@dataclass
class LeadSelection:
    """A record's signal in the leads asked for, in their order, at the record's rate."""

    signal: np.ndarray  # float32 [L, T]: zeros where a lead is absent, flat or all NaN
    lead_mask: np.ndarray  # bool [L]: False where the lead is absent, flat or all NaN
    absent: list[str]  # asked leads the record does not hold
    flat: list[str]  # asked leads the record holds flat or all NaN (a disconnected electrode), in record order
    warnings: list[str] = field(default_factory=list)  # scattered NaN set to 0, per lead

    @property
    def missing(self) -> list[str]:
        """Absent and flat leads: the ones stored as zeros with mask 0."""
        return [*self.absent, *self.flat]


def select_leads(record: Record, lead_names: Sequence[str]) -> LeadSelection:
    """Pick ``lead_names`` (canonical) from ``record`` by name; other signals are ignored.

    A lead that is flat or all NaN carries nothing and is missing, like an absent one; scattered NaN or infinite
    samples (a recorder's invalid code) are set to 0 and reported, since one dropout must not lose a whole lead.
    """
    asked = tuple(lead_names)
    signal = np.zeros((len(asked), record.signal.shape[1]), np.float32)
    lead_mask = np.zeros(len(asked), bool)
    flat: list[str] = []
    warnings: list[str] = []
    for i, name in enumerate(record.lead_names):
        if name not in asked:
            continue
        lead = record.signal[i]
        valid = np.isfinite(lead)
        finite = lead[valid]
        if finite.size == 0 or finite.min() == finite.max():
            flat.append(name)
            continue
        if finite.size < lead.size:
            warnings.append(f"lead {name}: {lead.size - finite.size} NaN or infinite samples set to 0")
        slot = asked.index(name)
        signal[slot] = np.where(valid, lead, 0.0)
        lead_mask[slot] = True
    absent = [name for name in asked if name not in record.lead_names]
    return LeadSelection(signal, lead_mask, absent, flat, warnings)


def read_input_contract(input_contract: Mapping[str, Any]) -> tuple[float, int, tuple[str, ...]]:
    """``(fs, n_samples, lead names)`` of a model's input contract; refuses units other than mV, the readers' unit."""
    units = input_contract.get("units", "mV")
    if units != "mV":
        raise ValueError(f"the model reads {units!r}; ecgfm's record readers give millivolts (mV) and nothing else")
    fs = float(input_contract["fs"])
    n_samples = int(input_contract["n_samples"])
    if not (math.isfinite(fs) and fs > 0) or n_samples < 1:
        raise ValueError(f"the model's input contract has fs={fs!r} Hz and n_samples={n_samples}: not a window")
    return fs, n_samples, parse_leads(list(input_contract["lead_names"]))


@dataclass
class RecordWindows:
    """One record cut into the windows a model reads: float32 mV in the contract's lead order and rate."""

    record_id: str
    path: Path
    signal: np.ndarray  # float32 [W, L, T]
    lead_mask: np.ndarray  # bool [W, L]
    starts: list[int]  # each window's first sample, at the model's rate
    fs: float  # the model's rate
    warnings: list[str] = field(default_factory=list)

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    def start_seconds(self) -> list[float]:
        return [start / self.fs for start in self.starts]


def model_windows(
    record: Record,
    input_contract: Mapping[str, Any],
    lead_subsets: Iterable[Sequence[str]] = (),
    stride: int | None = None,
) -> RecordWindows:
    """Every full window of ``record`` as the model with ``input_contract`` (``fs``, ``n_samples``, ``lead_names``,
    ``units``) reads it.

    Leads are mapped by name and extra signals ignored. A record lacking a lead the model reads (or holding it flat
    or NaN) is refused, unless its usable leads cover one of ``lead_subsets`` (the smaller lead sets the model card
    says the model serves): then the missing leads are zeros with mask 0, and a warning says so. The signal is
    resampled to the model's rate and cut every ``stride`` samples (default: one window, no overlap); a short tail
    is dropped, and a record shorter than one window is refused with its length.

    Raises:
        RecordError: one line naming the record and what the model cannot serve.
    """
    fs, n_samples, leads = read_input_contract(input_contract)
    path = record.path
    if record.fs < MIN_FS:
        raise RecordError(f"{path}: sampling rate {record.fs:g} Hz is below {MIN_FS:g} Hz, too low for an ECG")
    selection = select_leads(record, leads)
    warnings = [*(str(w) for w in record.metadata.get("warnings", [])), *selection.warnings]
    if selection.missing:
        subsets = [parse_leads(list(subset)) for subset in lead_subsets]
        usable = {lead for lead, ok in zip(leads, selection.lead_mask, strict=True) if ok}
        served = [subset for subset in subsets if set(subset) <= usable]
        if not served:
            raise RecordError(_missing_leads_message(record, leads, selection, subsets))
        largest = max(served, key=len)
        warnings.append(
            f"leads {' '.join(selection.missing)} {_why_missing(selection)}: zero-filled and masked, as the model "
            f"card allows for a record holding {' '.join(largest)}"
        )
    signal = resample(selection.signal, record.fs, fs)
    starts = segment_starts(signal.shape[1], n_samples, stride)
    if not starts:
        seconds = record.signal.shape[1] / record.fs
        raise RecordError(
            f"{path}: {seconds:.2f} s long, shorter than the {n_samples / fs:g}-s window the model reads "
            f"({n_samples} samples at {fs:g} Hz)"
        )
    step = n_samples if stride is None else stride
    view = sliding_window_view(signal, n_samples, axis=1)[:, : starts[-1] + 1 : step]  # [L, W, T], no copy yet
    windows = np.ascontiguousarray(view.transpose(1, 0, 2))  # one copy, the size of the record without overlap
    lead_mask = np.repeat(selection.lead_mask[None], len(starts), axis=0)
    return RecordWindows(record.record_id, path, windows, lead_mask, starts, fs, warnings)


def _why_missing(selection: LeadSelection) -> str:
    if selection.absent and selection.flat:
        return f"missing ({' '.join(selection.flat)} flat or NaN)"
    return "flat or NaN" if selection.flat else "absent"


def _missing_leads_message(
    record: Record, leads: tuple[str, ...], selection: LeadSelection, subsets: list[tuple[str, ...]]
) -> str:
    parts = []
    if selection.absent:
        parts.append(f"lacks {' '.join(selection.absent)}")
    if selection.flat:
        parts.append(f"has {' '.join(selection.flat)} flat or NaN")
    if subsets:
        allowed = "; ".join(" ".join(subset) for subset in subsets)
        card = f"the model card serves missing leads only for records holding one of: {allowed}"
    else:
        card = "the model card lists no smaller lead set it serves"
    return (
        f"{record.path}: the record {' and '.join(parts)} (its signals: {' '.join(record.lead_names)}); the model "
        f"reads {' '.join(leads)}, and {card}"
    )
