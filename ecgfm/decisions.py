"""Decisions (0/1 calls, classes, levels) read off a model's continuous outputs by declared rules, in numpy.

A head declares its rules (:meth:`ecgfm.heads.Head.decision_rules`); they travel in a published model's
``config.yaml`` and an export's ``contract.json``, so that the calls made on a record's *aggregated* probabilities
or values are the ones the model makes on one window, with no torch needed (the ONNX runtime path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["RULE_KINDS", "apply_decisions", "check_rules"]

#: ``compare``: score OP value (0/1); ``argmax``: index of the largest score; ``median_level``: the number of
#: levels k whose P(y > k) = 1 - cumulative category probability exceeds 0.5 (an ordinal head's median level).
RULE_KINDS = ("compare", "argmax", "median_level")
_OPERATORS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}


def check_rules(rules: Sequence[Mapping[str, Any]], outputs: Sequence[str]) -> None:
    """Refuse a rule of an unknown kind or one that reads an output the model does not have (one line each)."""
    known = set(outputs)
    for rule in rules:
        kind = rule.get("kind")
        if kind not in RULE_KINDS:
            raise ValueError(f"decision rule for {rule.get('output')!r}: unknown kind {kind!r}; known: {RULE_KINDS}")
        if kind == "compare" and rule.get("op") not in _OPERATORS:
            raise ValueError(f"decision rule for {rule['output']!r}: op must be one of {sorted(_OPERATORS)}")
        reads = [rule["score"]] if kind == "compare" else list(rule["scores"])
        missing = [name for name in reads if name not in known]
        if missing:
            raise ValueError(f"decision rule for {rule['output']!r} reads outputs the model lacks: {missing}")


def apply_decisions(scores: Mapping[str, np.ndarray], rules: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``{rule output: float array}`` from ``scores`` (``{name: array [N]}``), one entry per rule."""
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        kind = rule["kind"]
        if kind == "compare":
            value = np.asarray(scores[rule["score"]], dtype=np.float64)
            out[rule["output"]] = _OPERATORS[rule["op"]](value, float(rule["value"])).astype(np.float32)
        elif kind == "argmax":
            stacked = np.stack([np.asarray(scores[name], dtype=np.float64) for name in rule["scores"]], axis=-1)
            out[rule["output"]] = stacked.argmax(-1).astype(np.float32)
        elif kind == "median_level":
            probs = np.stack([np.asarray(scores[name], dtype=np.float64) for name in rule["scores"]], axis=-1)
            above = 1.0 - np.cumsum(probs, axis=-1)[..., :-1]  # P(y > k), k = 0 .. K-2
            out[rule["output"]] = (above > 0.5).sum(-1).astype(np.float32)
        else:
            raise ValueError(f"decision rule for {rule.get('output')!r}: unknown kind {kind!r}; known: {RULE_KINDS}")
    return out
