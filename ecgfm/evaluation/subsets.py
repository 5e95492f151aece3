"""One FineTuneTask checkpoint scored on several lead subsets: what a 6-lead device, a wearable with lead I or II, or
a 12-lead cart would give it.

A subset is applied to the data, not to the model: every lead outside it is zeroed in the int16 signal and set
False in the ``lead_mask`` before the batch reaches the model, which is what a recording from a device with only
those leads looks like after ``ecgfm shard``. The model then selects its own leads (``model.leads``) as always, so
a zero_fill or projection model, or one trained with lead dropout, sees the leads it would get from such a device.
A subset that shares no lead with the model's leads is skipped (a lead-I model on ``II``); a subset with leads the
model does not read is evaluated on the leads both have (``leads_used``).

Each subset is one Lightning ``trainer.test`` run with the model's own metrics; every split (``val``, ``test`` or
``all`` segments) goes through the test loop, so validation does not move the heads' decision thresholds. Nothing is
logged and no checkpoint is written; only scalar metrics are reported.
"""

from __future__ import annotations

import csv
import fnmatch
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ecgfm.evaluation.log_keys import LOGGED_UNIT
from ecgfm.io import atomic_write
from ecgfm.leads import STANDARD_LEADS, LeadError, lead_indices, parse_leads

__all__ = [
    "DEFAULT_SUBSETS",
    "SPLITS",
    "TABLE_COLUMNS",
    "SubsetDataModule",
    "SubsetPlan",
    "evaluate_subsets",
    "format_table",
    "mask_leads",
    "plan_subsets",
    "subset_name",
    "write_table",
]

#: What ``ecgfm subsets`` evaluates unless told: 12-lead cart, 6-lead limb device, two-lead and one-lead wearables.
DEFAULT_SUBSETS: tuple[str, ...] = ("12", "limb", "I+II", "I", "II")
#: The segments a subset evaluation can score (``all``: every segment, e.g. an external data set never split).
SPLITS: tuple[str, ...] = ("val", "test", "all")
#: Columns of the table, in order.
TABLE_COLUMNS: tuple[str, ...] = ("subset", "n_leads", "leads_used", "head", "unit", "metric", "value")
#: ``head`` of metrics that belong to no head (the total loss).
ALL_HEADS = "all"


def subset_name(subset: str | int | Iterable[str]) -> str:
    """How a subset is named in the table: as given (``"limb"``, ``"I+II"``), or its leads joined by ``+``."""
    if isinstance(subset, (str, int)):
        return str(subset).strip()
    return "+".join(parse_leads(subset))


@dataclass(frozen=True)
class SubsetPlan:
    """One subset: its name, its leads, and the model's leads among them (in the model's order)."""

    name: str
    leads: tuple[str, ...]
    used: tuple[str, ...]
    model_leads: tuple[str, ...]

    @property
    def skip_reason(self) -> str | None:
        """Why this subset cannot be evaluated, or None."""
        if self.used:
            return None
        return f"it shares no lead with the model's leads ({', '.join(self.model_leads)})"


def plan_subsets(model_leads: Iterable[str], subsets: Iterable[str | int | Iterable[str]]) -> list[SubsetPlan]:
    """Parse the subsets (``"12"``, ``"limb"``, ``"I+II"``, ``["V1", "V2"]``) against the leads a model reads.

    Raises:
        LeadError: an unknown lead or subset name, or a subset given twice.
    """
    model = parse_leads(model_leads if isinstance(model_leads, str) else list(model_leads))
    plans: list[SubsetPlan] = []
    for subset in subsets:
        name = subset_name(subset)
        leads = parse_leads(name if isinstance(subset, (str, int)) else subset)
        if any(plan.leads == leads for plan in plans):
            raise LeadError(f"subset {name!r} is given twice (leads {'+'.join(leads)})")
        plans.append(SubsetPlan(name, leads, tuple(lead for lead in model if lead in leads), model))
    if not plans:
        raise LeadError("no lead subsets given")
    return plans


def mask_leads(batch: dict[str, Any], leads: Iterable[str]) -> dict[str, Any]:
    """A copy of ``batch`` in which every lead outside ``leads`` is zero in ``signal`` and False in ``lead_mask``.

    ``signal`` is ``[B, 12, T]`` in the standard lead order (int16 µV as the shards store it, or float); the rest of
    the batch is passed on as it is. The input tensors are not changed.
    """
    signal, lead_mask = batch["signal"], batch["lead_mask"]
    if signal.dim() != 3 or signal.shape[1] != len(STANDARD_LEADS):
        raise ValueError(f"signal must be [batch, 12, time] in the standard lead order, got {tuple(signal.shape)}")
    keep = torch.zeros(len(STANDARD_LEADS), dtype=torch.bool, device=signal.device)
    keep[lead_indices(leads, STANDARD_LEADS)] = True
    out = dict(batch)
    out["signal"] = signal.masked_fill(~keep[None, :, None], 0)
    out["lead_mask"] = lead_mask.bool() & keep.to(lead_mask.device)[None, :]
    return out


class SubsetDataModule(L.LightningDataModule):
    """Serves one split of ``data`` as the test loader, with every batch masked to ``leads`` before it moves to the
    device (``on_before_batch_transfer``); ``target_specs`` are ``data``'s, so the model's heads find their columns.

    Args:
        data: a ShardDataModule (anything with ``target_specs`` and val/test loaders; ``predict_split: all`` and a
            predict loader for split ``all``).
        split: ``val``, ``test`` or ``all``.
        leads: the leads left in the signal.
    """

    def __init__(self, data: L.LightningDataModule, split: str, leads: Iterable[str]) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data = data
        self.split = split
        self.leads = parse_leads(leads if isinstance(leads, str) else list(leads))
        #: batches masked so far (a model that overrides on_before_batch_transfer would bypass the mask)
        self.masked_batches = 0

    @property
    def target_specs(self) -> dict[str, Any]:
        return self.data.target_specs

    @property
    def manifest(self) -> Any:
        """The wrapped data's manifest, so the model checks its rate, length and leads as for any run."""
        return getattr(self.data, "manifest", None)

    @property
    def root(self) -> Any:
        return getattr(self.data, "root", ".")

    def setup(self, stage: str | None = None) -> None:
        self.data.trainer = self.trainer
        self.data.setup("predict" if self.split == "all" else "test")

    def test_dataloader(self) -> Any:
        if self.split == "all":
            return self.data.predict_dataloader()
        return self.data.val_dataloader() if self.split == "val" else self.data.test_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.masked_batches += 1
        return mask_leads(batch, self.leads)


def _load_model(checkpoint: str | Path | L.LightningModule) -> L.LightningModule:
    if isinstance(checkpoint, L.LightningModule):
        return checkpoint
    from ecgfm.checkpointing import check_lightning_checkpoint
    from ecgfm.tasks import FineTuneTask

    path = Path(checkpoint)
    check_lightning_checkpoint(path)  # one line naming the file for a missing, corrupt or unsafe one
    return FineTuneTask.load_from_checkpoint(path, map_location="cpu")


def _for_split(datamodule: L.LightningDataModule, split: str) -> L.LightningDataModule:
    """``all`` reads every segment through the predict loader: a ShardDataModule with ``predict_split: all``."""
    hparams = getattr(datamodule, "hparams", {})
    if split != "all" or hparams.get("predict_split", "all") == "all":
        return datamodule
    return type(datamodule)(**{**dict(hparams), "predict_split": "all"})


def _rows(plan: SubsetPlan, results: dict[str, float], prefix: str, patterns: Sequence[str] | None) -> list[dict]:
    rows = []
    for key, value in results.items():
        if not key.startswith(prefix):
            continue
        head, _, metric = key[len(prefix) :].removeprefix(f"{LOGGED_UNIT}/").partition("/")
        if not metric:  # the total loss, `test/loss`
            head, metric = ALL_HEADS, head
        if patterns and not any(fnmatch.fnmatchcase(metric, p) for p in patterns):
            continue
        rows.append(
            {
                "subset": plan.name,
                "n_leads": len(plan.leads),
                "leads_used": "+".join(plan.used),
                "head": head,
                "unit": LOGGED_UNIT,  # the test loop scores 10-s segments
                "metric": metric,
                "value": float(value),
            }
        )
    rows.sort(key=lambda row: row["head"] != ALL_HEADS)  # stable: the total loss first, then the heads as logged
    return rows


def evaluate_subsets(
    checkpoint: str | Path | L.LightningModule,
    datamodule: L.LightningDataModule,
    subsets: Iterable[str | int | Iterable[str]] = DEFAULT_SUBSETS,
    split: str = "test",
    *,
    metrics: Sequence[str] | None = None,
    accelerator: str = "auto",
    limit_batches: int | float | None = None,
    report: Callable[[str], Any] | None = print,
) -> list[dict[str, Any]]:
    """Score one FineTuneTask on each lead subset of one split; returns the table rows (``TABLE_COLUMNS``).

    Args:
        checkpoint: a Lightning checkpoint of a FineTuneTask (``last.ckpt``), or a loaded model.
        datamodule: the data, e.g. ``ShardDataModule(root, ...)`` with the training run's split settings.
        subsets: subset names (``"12"``, ``"limb"``, ``"precordial"``, ``"I"``, ``"II"``, ``"I+II"``), lead lists
            joined by ``+`` or ``,`` (``"V1+V2"``), or lists of lead names.
        split: ``val``, ``test`` (the held-out patients) or ``all`` (every segment of the data).
        metrics: keep only metrics whose name matches one of these shell patterns (``auroc``, ``auroc/*``,
            ``loss``); None keeps every scalar the heads log.
        accelerator: the Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        limit_batches: score only this many batches (or this fraction) of the split, for a quick look.
        report: called with a line for each subset: what it evaluates, or why it is skipped (None: silent).

    Returns:
        One dict per (subset, head, metric): ``subset`` (its name as given), ``n_leads`` (leads in the subset),
        ``leads_used`` (the model's leads among them, ``+``-joined: fewer than ``n_leads`` when the model does not
        read them all), ``head`` (``all`` for the total loss), ``metric`` and ``value`` (a float; NaN where the
        metric is undefined, e.g. AUROC without positives). Skipped subsets have no rows.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    model = _load_model(checkpoint)
    model_leads = getattr(model, "leads", None)
    if model_leads is None:
        raise TypeError(f"{type(model).__name__} does not say which leads it reads (no `leads` attribute)")
    plans = plan_subsets(model_leads, subsets)
    say = report or (lambda line: None)
    data = _for_split(datamodule, split)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ecgfm-subsets-") as scratch:  # tables a head writes land here, then go
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=scratch,
            limit_test_batches=1.0 if limit_batches is None else limit_batches,
        )
        for plan in plans:
            if plan.skip_reason:
                say(f"subset {plan.name}: skipped, {plan.skip_reason}")
                continue
            note = "" if plan.used == plan.leads else f"; the model reads {len(plan.used)} of them"
            n = len(plan.leads)
            say(f"subset {plan.name} ({n} lead{'s' if n > 1 else ''}{note}): {split} split on {'+'.join(plan.used)}")
            wrapped = SubsetDataModule(data, split, plan.leads)
            results = trainer.test(model, datamodule=wrapped, verbose=False)
            if wrapped.masked_batches == 0:
                raise RuntimeError(
                    f"no batch of subset {plan.name!r} went through the lead mask: {type(model).__name__} overrides "
                    "on_before_batch_transfer, which takes the datamodule's place"
                )
            rows.extend(_rows(plan, results[0] if results else {}, "test/", metrics))
    return rows


def _text(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as aligned text columns (values to 4 decimals)."""
    cells = [list(TABLE_COLUMNS)] + [[_text(row[c]) for c in TABLE_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]
    numeric = {"n_leads", "value"}
    lines = []
    for line in cells:
        parts = [
            text.rjust(width) if column in numeric else text.ljust(width)
            for text, width, column in zip(line, widths, TABLE_COLUMNS, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def write_table(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the rows as CSV (``TABLE_COLUMNS``, full-precision values) and return the path."""
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(TABLE_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
