"""Canonical 12-lead names, aliases and lead subsets, and the standard rate, length and lead order, defined once.

Leads are always chosen by name, never by index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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


#: Monitoring leads named after the standard lead they approximate (MIT-BIH's ``MLII``: modified lead II, electrodes
#: on the torso instead of the limbs). Their waveforms differ from the standard leads, so they are never mapped by
#: default: a user opts in with ``lead_aliases: modified`` (all of these) or ``lead_aliases: {MLII: II}``.
MODIFIED_LEADS: dict[str, str] = {
    "MLI": "I",
    "MLII": "II",
    "MLIII": "III",
    **{f"MV{k}": f"V{k}" for k in range(1, 7)},
}


class LeadError(ValueError):
    """A lead name that cannot be mapped, or a lead named twice."""


def _lead_key(name: str) -> str:
    """A lead name compared without case, spaces or a leading ``lead`` (``"Lead I"``, ``"lead_i"`` -> ``"i"``)."""
    text = name.strip().lower()
    key = text.replace(" ", "")
    if key.startswith("lead"):
        inverted = text[4:].startswith((" -", "\t-"))  # "Lead -aVR" (DICOM, Cabrera): the inverted lead, not aVR
        key = key[4:].lstrip("_") if inverted else key[4:].lstrip("_-")
    return key


def canonical_lead(name: str, aliases: Mapping[str, str] | None = None) -> str | None:
    """Return the canonical spelling of a lead name (``"AVR"`` -> ``"aVR"``), or None if it is not a standard lead.

    ``aliases`` (from :func:`lead_aliases`) are the user's extra names, looked up before the built-in ones.
    """
    key = _lead_key(name)
    if aliases and key in aliases:
        return aliases[key]
    return _ALIASES.get(key)


def lead_aliases(spec: Mapping[str, str] | Iterable[str] | str | None) -> dict[str, str]:
    """A user's lead-alias table, checked once: ``{MLII: II}``, ``"MLII=II,MV1=V1"``, ``["MLII=II"]`` or
    ``"modified"`` (every entry of :data:`MODIFIED_LEADS`) -> ``{normalised name: canonical lead}``.

    Raises:
        LeadError: an entry that is not ``NAME=LEAD`` or whose target is not one of the 12 standard leads.
    """
    if spec is None:
        return {}
    if isinstance(spec, str):
        spec = [part for part in spec.split(",") if part.strip()]
    if not isinstance(spec, Mapping):
        pairs: dict[str, str] = {}
        for item in spec:
            item = str(item).strip()
            if item.lower() == "modified":
                pairs.update(MODIFIED_LEADS)
                continue
            name, sep, lead = item.partition("=")
            if not sep or not name.strip() or not lead.strip():
                raise LeadError(f"lead alias {item!r}: expected NAME=LEAD (MLII=II) or 'modified'")
            pairs[name.strip()] = lead.strip()
        spec = pairs
    table: dict[str, str] = {}
    for name, lead in spec.items():
        target = canonical_lead(str(lead))
        if target is None:
            raise LeadError(f"lead alias {name}={lead}: {lead!r} is not one of {', '.join(STANDARD_LEADS)}")
        table[_lead_key(str(name))] = target
    return table


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
