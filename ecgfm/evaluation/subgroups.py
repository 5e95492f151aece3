"""Subgroups from the metadata a shard folder stores (``ecgfm shard --metadata``): age in bands, sex and any text
column (site, device) as they are, so that the report can show the same metrics per group and a drop in one group
is visible. Missing values form their own group, ``unknown``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["DEFAULT_AGE_BANDS", "UNKNOWN", "band_labels", "bands", "group_order", "is_age", "subgroups"]

#: Edges of the age bands, in years: <40, 40-59, 60-79, >=80.
DEFAULT_AGE_BANDS: tuple[float, ...] = (40.0, 60.0, 80.0)
#: The group of a missing value.
UNKNOWN = "unknown"
#: Text columns with more values than this keep their most frequent ones; the rest are grouped as ``other``.
MAX_GROUPS = 12


def is_age(name: str) -> bool:
    """Whether a metadata column holds age (``age``, ``Age``, ``age_years``): it is then shown in age bands."""
    return name.strip().casefold() in ("age", "age_years", "age (years)", "patient_age")


def band_labels(edges: Sequence[float]) -> list[str]:
    """``<40``, ``40-59``, ``60-79``, ``>=80`` for whole-number edges (``[40, 60)`` otherwise)."""
    edges = [float(edge) for edge in edges]
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"band edges must increase, got {edges}")
    whole = all(edge.is_integer() for edge in edges)

    def show(value: float) -> str:
        return f"{value:g}"

    labels = [f"<{show(edges[0])}"]
    for low, high in zip(edges, edges[1:], strict=False):
        labels.append(f"{show(low)}-{show(high - 1)}" if whole else f"[{show(low)}, {show(high)})")
    labels.append(f">={show(edges[-1])}")
    return labels


def bands(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Each value's band label (:func:`band_labels`); NaN -> ``unknown``."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.array(band_labels(edges), dtype=object)
    out = labels[np.searchsorted(np.asarray(edges, np.float64), np.nan_to_num(values, nan=-np.inf), side="right")]
    return np.where(np.isnan(values), UNKNOWN, out).astype(object)


def _text_groups(values: np.ndarray) -> np.ndarray:
    """Text values as groups (empty -> ``unknown``); beyond MAX_GROUPS values the rarest become ``other``."""
    text = np.array([str(v).strip() or UNKNOWN for v in values], dtype=object)
    names, counts = np.unique(text, return_counts=True)
    if len(names) > MAX_GROUPS:
        keep = set(names[np.argsort(-counts, kind="stable")[: MAX_GROUPS - 1]])
        text = np.array([v if v in keep else "other" for v in text], dtype=object)
    return text


def _quantile_edges(values: np.ndarray) -> list[float]:
    """Tertile edges of a numeric column that is not age, rounded to 2 significant digits (distinct, increasing)."""
    finite = values[np.isfinite(values)]
    if finite.size < 3:
        return [float(np.nanmedian(finite))] if finite.size else [0.0]
    edges = sorted({float(f"{edge:.2g}") for edge in np.quantile(finite, [1 / 3, 2 / 3])})
    return edges


def subgroups(
    metadata: Mapping[str, np.ndarray],
    age_bands: Sequence[float] = DEFAULT_AGE_BANDS,
    columns: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """``{column: group label per row}`` for the metadata ``columns`` (default: all): age in ``age_bands``, other
    numbers in tertiles, text as it is. Groups are ordered as :func:`group_order` gives them."""
    names = list(metadata) if columns is None else list(columns)
    unknown = [name for name in names if name not in metadata]
    if unknown:
        raise KeyError(f"subgroup columns {unknown} are not in the data's metadata ({', '.join(metadata) or 'none'})")
    out = {}
    for name in names:
        values = np.asarray(metadata[name])
        if values.dtype.kind in "fiu":
            numbers = values.astype(np.float64)
            out[name] = bands(numbers, age_bands if is_age(name) else _quantile_edges(numbers))
        else:
            out[name] = _text_groups(values)
    return out


def group_order(groups: np.ndarray) -> list[str]:
    """The distinct groups of one column in reading order: bands from low to high, text alphabetically, ``other``
    and ``unknown`` last."""
    present = sorted({str(g) for g in groups})

    def key(group: str) -> tuple[int, float, str]:
        if group == UNKNOWN:
            return (3, 0.0, group)
        if group == "other":
            return (2, 0.0, group)
        if group.startswith("<"):
            return (0, -np.inf, group)
        if group.startswith(">="):
            return (0, np.inf, group)
        head = group.lstrip("[").split("-")[0].split(",")[0]
        try:
            return (0, float(head), group)
        except ValueError:
            return (1, 0.0, group)

    return sorted(present, key=key)
