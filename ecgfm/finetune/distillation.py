"""Distillation: a fine-tuned teacher (e.g. 12-lead) gives soft targets to a student (e.g. lead I) on the same segments.

``FineTuneTask(teacher=CKPT)`` holds a :class:`Distiller`: it loads the frozen teacher once when fitting starts (so a
student checkpoint reloads without it), keeps it out of the student's parameters, state_dict and optimizer, runs it
on the device of each batch, and pairs teacher and student heads by name. Each paired student head adds
``weight * head.distillation_loss(student, teacher, temperature)`` to the training loss. With ``cached=True`` the
teacher's outputs are read from the shards (target ``teacher_<head>``, written by ``ecgfm distill-cache``; see
:mod:`ecgfm.finetune.teacher_cache`) after checking that they come from the same checkpoint (sha256).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ecgfm.data.shards import Manifest, ShardError
from ecgfm.io import sha256sum

if TYPE_CHECKING:
    from ecgfm.heads import Head

__all__ = ["CACHE_KEY", "Distiller", "cache_record", "head_signature", "match_heads", "teacher_target"]

#: ``manifest.source[CACHE_KEY]`` describes the cached teacher outputs: checkpoint, sha256 and heads.
CACHE_KEY = "teacher_cache"


def teacher_target(head: str) -> str:
    """The shard target holding the cached outputs of the teacher's head ``head``."""
    return f"teacher_{head}"


def head_signature(head: Head) -> dict[str, Any]:
    """What a student head and a teacher head must share: kind, target and labels."""
    return {"kind": head.kind, "target": head.target, "labels": list(head.labels or [])}


def _labels(labels: list[str]) -> str:
    return str(labels) if len(labels) <= 6 else f"[{', '.join(map(repr, labels[:5]))}, ... {len(labels)} labels]"


def match_heads(student: Mapping[str, Head], teacher: Mapping[str, dict[str, Any]], source: str) -> list[str]:
    """Names of the student heads that the teacher has, checked to agree in kind, target and labels.

    ``teacher`` maps head names to :func:`head_signature` dicts; ``source`` names the teacher in messages.
    """
    matched = [name for name in student if name in teacher]
    if not matched:
        raise ValueError(
            f"the teacher ({source}) has none of the student's heads {list(student)} (it has {list(teacher)}); "
            "distillation pairs heads by name"
        )
    for name in matched:
        s, t = head_signature(student[name]), {**teacher[name], "labels": list(teacher[name]["labels"])}
        differ = [key for key in ("kind", "target", "labels") if s[key] != t[key]]
        if differ:
            raise ValueError(
                f"head {name!r}: the teacher's head ({source}) is a {t['kind']} head on target {t['target']!r} with "
                f"labels {_labels(list(t['labels']))}, the student's a {s['kind']} head on target {s['target']!r} "
                f"with labels {_labels(s['labels'])}; distillation needs the same {', '.join(differ)}"
            )
    return matched


def cache_record(manifest: Manifest, root: str | Path = "") -> dict[str, Any]:
    """The ``teacher_cache`` entry of a manifest; a clear error when the folder has no cached teacher outputs."""
    record = manifest.source.get(CACHE_KEY)
    if not record or any(teacher_target(h) not in manifest.targets for h in record.get("heads", {})):
        raise ShardError(
            f"{Path(root) / 'manifest.json'} has no cached teacher outputs: run "
            f"`ecgfm distill-cache --teacher CKPT --root {root or 'SHARDS'}` first"
        )
    return record


class Distiller:
    """The teacher side of distillation, held by the student task; never a submodule of it.

    Args:
        teacher: a fine-tuned FineTuneTask checkpoint.
        cached: read the teacher's outputs from the shards instead of running it.
        weight: weight of each paired head's distillation loss in the training loss.
        temperature: softmax/sigmoid temperature of the losses (scaled by T^2; not used by regression heads).
    """

    def __init__(self, teacher: str | Path, cached: bool = False, weight: float = 1.0, temperature: float = 1.0):
        if not temperature > 0 or not weight >= 0:
            raise ValueError(f"distill_temperature must be > 0 and distill_weight >= 0, got {temperature}, {weight}")
        self.path = Path(teacher)
        self.cached = bool(cached)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.teacher: nn.Module | None = None
        self.references: dict[str, dict[str, Any]] = {}  # paired head -> the teacher head's distillation_reference()
        self.info: dict[str, Any] | None = None  # provenance stored in the student's checkpoints

    @property
    def heads(self) -> list[str]:
        """The student heads paired with a teacher head (empty until :meth:`setup`)."""
        return list(self.references)

    def setup(
        self,
        student_heads: Mapping[str, Head],
        datamodule: Any,
        target_names: list[str],
        load_teacher: Callable[[Path], nn.Module],
    ) -> None:
        """Load the teacher with ``load_teacher`` (or find its cached outputs) and pair its heads with the student's."""
        if self.info is not None:
            return
        if self.cached:
            digest, matched = self._setup_cached(student_heads, datamodule, target_names)
        else:
            teacher = load_teacher(self.path)
            teacher.requires_grad_(False)
            self.teacher = teacher.eval()
            digest = sha256sum(self.path)
            signatures = {name: head_signature(head) for name, head in teacher.heads.items()}
            matched = match_heads(student_heads, signatures, str(self.path))
            self.references = {name: teacher.heads[name].distillation_reference() for name in matched}
        self.info = {"checkpoint": str(self.path), "sha256": digest, "cached": self.cached, "heads": matched}

    def _setup_cached(
        self, student_heads: Mapping[str, Head], datamodule: Any, target_names: list[str]
    ) -> tuple[str, list[str]]:
        manifest = getattr(datamodule, "manifest", None)
        if manifest is None:
            raise TypeError("teacher_cache reads the teacher's outputs from the shards: fit with a ShardDataModule")
        root = getattr(datamodule, "root", "")
        record = cache_record(manifest, root)
        if self.path.is_file():
            digest = sha256sum(self.path)
            if digest != record["sha256"]:
                raise ValueError(
                    f"the teacher outputs cached in {root} come from {record['checkpoint']} (sha256 "
                    f"{record['sha256'][:12]}), not from {self.path} (sha256 {digest[:12]}): the cache is stale; run "
                    f"`ecgfm distill-cache --teacher {self.path} --root {root}` again"
                )
        else:
            warnings.warn(
                f"teacher checkpoint {self.path} not found: using the outputs cached in {root} from "
                f"{record['checkpoint']} without checking them against it",
                stacklevel=2,
            )
            digest = record["sha256"]
        teachers = record["heads"]
        matched = match_heads(student_heads, teachers, f"cached from {record['checkpoint']}")
        missing = [teacher_target(name) for name in matched if teacher_target(name) not in target_names]
        if missing:
            raise KeyError(f"the data does not load the cached teacher outputs {missing}: add them to data.targets")
        self.references = {name: teachers[name].get("reference") or {} for name in matched}
        return digest, matched

    def outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The teacher's raw outputs of the paired heads for this batch: cached in it, or the teacher run on it."""
        if self.cached:
            return {name: batch["targets"][teacher_target(name)] for name in self.references}
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("the teacher is not loaded: Distiller.setup runs when fitting starts")
        device = batch["signal"].device
        if next(teacher.parameters()).device != device:  # the one place the teacher moves: to each batch's device
            teacher.to(device)
        teacher.eval()
        with torch.no_grad():
            outputs = teacher(batch["signal"], batch["lead_mask"])
        return {name: outputs[name] for name in self.references}

    def loss(self, head: Head, student_output: Tensor, teacher_output: Tensor) -> Tensor:
        """This head's distillation loss against the teacher's output (the weight is applied by the caller)."""
        return head.distillation_loss(student_output, teacher_output, self.temperature, self.references[head.name])
