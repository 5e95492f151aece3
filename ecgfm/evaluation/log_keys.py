"""Names of what the training loop logs: ``{split}/segment/{head}/{metric}``. Lightning computes its metrics on the
batches as they come, one row per 10-s segment, so the key says so; record- and patient-level results come from
``ecgfm report`` (``test/record/...``, ``test/patient/...``). The totals ``{split}/loss`` keep their short name."""

from __future__ import annotations

import re

__all__ = ["LOGGED_UNIT", "head_key", "unit_named_monitor"]

#: the unit of every metric the training loop logs (``ecgfm.evaluation.units.UNITS`` has all three)
LOGGED_UNIT = "segment"

# `val/diagnoses/auroc` as recipes wrote it before keys named their unit (ecgfm 0.1 until 2026-12)
_UNNAMED = re.compile(r"^(train|val|test)/(?!segment/|record/|patient/)([^/]+)/(.+)$")


def head_key(split: str, head: str, metric: str) -> str:
    """The logged name of one head's metric (or loss) on a split: ``val/segment/diagnoses/auroc``."""
    return f"{split}/{LOGGED_UNIT}/{head}/{metric}"


def unit_named_monitor(monitor: str | None) -> tuple[str | None, bool]:
    """``(key, renamed)``: a monitor written without the unit (``val/diagnoses/auroc``) as the key the loop logs
    (``val/segment/diagnoses/auroc``), so recipes written before the rename keep working; others unchanged."""
    if monitor is None:
        return None, False
    match = _UNNAMED.match(monitor)
    if match is None:
        return monitor, False
    return head_key(match[1], match[2], match[3]), True
