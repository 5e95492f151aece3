"""Canonical 12-lead names, aliases and lead subsets, and the standard rate, length and lead order, defined once.

Leads are always chosen by name, never by index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: ECGFounder's lead order; every signal tensor in ecgfm uses it.
STANDARD_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
#: Sampling rate of the shards (Hz) and of the models that read them, unless a model's contract says otherwise.
STANDARD_FS: float = 500.0
#: Samples per segment: 10 s at ``STANDARD_FS``.
STANDARD_N_SAMPLES: int = 5000

#: Named subsets users ask for (handheld devices, 6-lead limb devices, ...).
LEAD_SUBSETS: dict[str, tuple[str, ...]] = {
    "12": STANDARD_LEADS,
    "limb": STANDARD_LEADS[:6],
    "precordial": STANDARD_LEADS[6:],
    "I": ("I",),
    "II": ("II",),
    "I+II": ("I", "II"),
}

_ALIASES: dict[str, str] = {}
for _name in STANDARD_LEADS:
    _ALIASES[_name.lower()] = _name
# Spellings met in the wild (MIT/PhysioNet, GE/Philips exports, Roman numerals in lower case, "lead I").
_ALIASES.update(
    {
        "1": "I",
        "2": "II",
        "3": "III",
        "d1": "I",
        "d2": "II",
        "d3": "III",
        "avr": "aVR",
        "avl": "aVL",
        "avf": "aVF",
    }
)


class LeadError(ValueError):
    """A lead name that cannot be mapped, or a lead named twice."""


def canonical_lead(name: str) -> str | None:
    """Return the canonical spelling of a lead name (``"AVR"`` -> ``"aVR"``), or None if it is not a standard lead."""
    key = name.strip().lower().replace(" ", "")
    if key.startswith("lead"):
        key = key[4:].lstrip("_-")
    return _ALIASES.get(key)


def parse_leads(names: str | Iterable[str]) -> tuple[str, ...]:
    """Turn a subset name (``"limb"``), a ``"I,II"`` string or a list of names into canonical lead names.

    Raises:
        LeadError: if a name is unknown or a lead is named twice.
    """
    if isinstance(names, str):
        if names in LEAD_SUBSETS:
            return LEAD_SUBSETS[names]
        names = [n for n in names.replace("+", ",").split(",") if n.strip()]
    out: list[str] = []
    for raw in names:
        lead = canonical_lead(str(raw))
        if lead is None:
            raise LeadError(f"unknown lead name {raw!r}; expected one of {', '.join(STANDARD_LEADS)}")
        if lead in out:
            raise LeadError(f"lead {lead!r} is named twice in {list(names)!r}")
        out.append(lead)
    if not out:
        raise LeadError("no leads given")
    return tuple(out)


def lead_indices(names: str | Iterable[str], order: Sequence[str] = STANDARD_LEADS) -> list[int]:
    """Positions of the named leads in ``order`` (the canonical order unless given)."""
    wanted = parse_leads(names)
    missing = [lead for lead in wanted if lead not in order]
    if missing:
        raise LeadError(f"leads {missing} are not among {list(order)}")
    return [list(order).index(lead) for lead in wanted]
