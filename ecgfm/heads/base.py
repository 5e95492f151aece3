"""The head contract: forward, masked loss, metrics, post-processing into named predictions; heads register in
``ecgfm.registry.HEADS``."""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ecgfm.captured import CapturesArguments, plain
from ecgfm.data.shards import TargetSummary
from ecgfm.registry import HEADS, UnknownNameError


def create_head(spec: Head | Mapping[str, Any]) -> Head:
    """A head from an instance, ``{"kind": ..., **arguments}`` (what checkpoints store) or a recipe's
    ``{"class_path": ..., "init_args": ...}``; a class path is matched to a registered head by class name, so moving
    a head's file never breaks an old checkpoint, and nothing outside the registry is imported."""
    if isinstance(spec, Head):
        return spec
    spec = dict(spec)
    if "class_path" in spec:
        class_name = str(spec["class_path"]).rpartition(".")[2]
        kinds = [kind for kind in HEADS.names() if HEADS.get(kind).__name__ == class_name]
        if not kinds:
            known = ", ".join(HEADS.get(kind).__name__ for kind in HEADS.names())
            raise UnknownNameError(f"unknown head class {spec['class_path']!r}; registered head classes: {known}")
        return HEADS.create({"kind": kinds[0], **spec.get("init_args", {})})
    return HEADS.create(spec)


class Head(CapturesArguments, nn.Module, ABC):
    """Maps backbone features [B, D] to one target's outputs; layers are built once the label names are known.

    Args:
        name: the head's name in logs (``val/<name>/auroc``) and predictions.
        target: the shard target it learns (``/targets/<target>``); defaults to ``name``.
        labels: the target's label (or column) names to use, in order; None = all of them, from the data.
        loss_weight: weight of this head's loss in a multi-task sum.
    """

    kind = "base"
    #: The shard target kinds this head can learn (``TargetSpec.kind``); ``setup`` refuses any other.
    target_kinds: tuple[str, ...] = ()
    #: The logit layout ``ecgfm.evaluation.calibration.fit_temperature`` reads (``binary``, ``multilabel``,
    #: ``multiclass``, ``ordinal``); a head with one holds a ``temperature`` buffer. None: no temperature.
    temperature_kind: str | None = None
    #: Buffers added after models were published, with the value a state_dict without them stands for: an older
    #: checkpoint loads with that value (``_load_from_state_dict``), and ``load_strict`` lets them be missing.
    added_buffers: dict[str, float] = {"temperature": 1.0}

    def __init__(
        self,
        name: str,
        target: str | None = None,
        labels: list[str] | None = None,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        self.name = name
        self.target = target or name
        self.labels = list(labels) if labels is not None else None
        self.loss_weight = loss_weight
        self.in_features: int | None = None

    @property
    def is_built(self) -> bool:
        return self.in_features is not None

    def build(self, in_features: int, labels: list[str]) -> None:
        """Create the layers for ``in_features`` inputs and these label names.

        The initial weights come from the run's seed and the head's name alone, not from how many random numbers the
        backbone drew before: a linear probe through a backbone and a head on that backbone's stored embeddings
        (``backbone: precomputed``) start from the same weights and train alike.
        """
        self.in_features = in_features
        self.labels = list(labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((torch.initial_seed() + zlib.crc32(self.name.encode())) % 2**63)
            self._build_layers(in_features, len(self.labels))
        # Set once fit_statistics has run; saved with the weights, so a reloaded head is never re-standardised.
        self.register_buffer("statistics_fitted", torch.zeros((), dtype=torch.bool))
        if self.temperature_kind is not None:
            # Logits are divided by it where probabilities are made (postprocess), never in the loss; 1 = as trained.
            self.register_buffer("temperature", torch.ones(()))

    def set_temperature(self, value: float) -> None:
        """Store the temperature fitted on validation (``fit_temperature``); probabilities become sigmoid or softmax
        of logits / T, while rankings and decisions stay as they were."""
        if self.temperature_kind is None or not self.is_built:
            raise ValueError(f"head {self.name!r} ({self.kind}) has no temperature to set")
        try:
            temperature = float(value)
        except (TypeError, ValueError):
            temperature = math.nan
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"head {self.name!r}: the temperature must be a positive number, got {value!r}")
        self.temperature.fill_(temperature)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A state_dict saved before a buffer of ``added_buffers`` existed loads with that buffer's neutral value."""
        for name, value in self.added_buffers.items():
            buffer = self._buffers.get(name)
            if buffer is not None and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.full_like(buffer, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @abstractmethod
    def _build_layers(self, in_features: int, n_outputs: int) -> None:
        """Each subclass creates its layers."""

    @abstractmethod
    def loss(self, output: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Each subclass defines its masked loss."""

    @abstractmethod
    def metrics(self) -> MetricCollection:
        """Each subclass defines its metrics."""

    @abstractmethod
    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor, mask: Tensor) -> None:
        """Each subclass feeds its metrics."""

    def compute_metrics(self, metrics: MetricCollection) -> dict[str, Tensor]:
        """Named scalar results, logged as ``{split}/segment/{head}/{name}``."""
        return {key: value for key, value in metrics.compute().items() if value.numel() == 1}

    @abstractmethod
    def postprocess(self, output: Tensor) -> dict[str, Tensor]:
        """Each subclass names and scales its predictions."""

    def decision_rules(self) -> list[dict[str, Any]]:
        """How each decision output of :meth:`postprocess` follows from its continuous outputs (``ecgfm.decisions``):
        a record's calls are made on its aggregated probabilities or values by the same rules, without torch."""
        return []

    def score_names(self) -> list[str]:
        """The continuous outputs of :meth:`postprocess` (probabilities, values): what windows aggregate over."""
        return [key for key in self.output_names() if key not in {rule["output"] for rule in self.decision_rules()}]

    def output_names(self) -> list[str]:
        """The names :meth:`postprocess` gives, in its order (found by running the built head on one zero row)."""
        if not self.is_built:
            raise ValueError(f"head {self.name!r} is not built: it has no label names yet")
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        was_training = self.training
        try:
            with torch.no_grad():
                return list(self.eval().postprocess(self(torch.zeros(1, self.in_features, device=device))))
        finally:
            self.train(was_training)

    #: True when the head learns constants from the training split (standardisation, class weights): the task
    #: then calls ``fit_statistics`` once before a new run starts; the constants are buffers, saved with the weights.
    uses_statistics = False

    def fit_statistics(self, summary: TargetSummary) -> None:
        """Learn constants from the training split's per-column counts, sums and sums of squares."""

    def distillation_loss(
        self,
        student_output: Tensor,
        teacher_output: Tensor,
        temperature: float = 1.0,
        reference: dict[str, Any] | None = None,
    ) -> Tensor:
        """How far this head's outputs are from a teacher head's (same kind, target and labels), over every sample.

        ``teacher_output`` is the teacher head's raw output (what its ``forward`` returns), labelled or not;
        ``reference`` is the teacher head's :meth:`distillation_reference` (its output layout's constants). Each
        kind defines it: sigmoid heads a Bernoulli KL, softmax heads a categorical KL, regressions an MSE.
        """
        raise ValueError(f"head {self.name!r} ({self.kind}) has no distillation loss: leave it out of distillation")

    def distillation_reference(self) -> dict[str, Any]:
        """Constants a student needs to read this head's raw outputs as a teacher's (regression: mean and std)."""
        return {}

    def calibrate(self, metrics: MetricCollection) -> None:
        """After each validation epoch (not the sanity check): choose decision thresholds from validation results."""

    def tables(self, metrics: MetricCollection) -> dict[str, list[dict[str, Any]]]:
        """Per-label or per-category results too long for the logger; the task writes each as a CSV file."""
        return {}

    def config(self) -> dict[str, Any]:
        """``{"kind": ..., **constructor arguments}``: the call that rebuilds this head (saved in checkpoints)."""
        return {"kind": self.kind, **self.captured_arguments(), **plain(self.resolved_arguments())}

    def resolved_arguments(self) -> dict[str, Any]:
        """Arguments whose value the head resolved after it was built: label names from the data or a file, ranges
        read from a CSV, classes filled in from defaults. They override the captured call, so a checkpoint never
        depends on the file still being there or on today's defaults."""
        return {"target": self.target, "labels": self.labels}


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; 0 (with a gradient path) when nothing is labelled."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def row_mask(mask: Tensor) -> Tensor:
    """[B, K] column mask -> [B] rows whose K columns are all known (one-hot classes, ordinal levels)."""
    return mask.all(dim=1) if mask.ndim == 2 else mask


def fill_missing(target: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    """Replace masked-out (NaN) targets with a finite value so losses stay finite; the mask removes them."""
    return torch.where(mask, target, torch.full_like(target, value))


def sigmoid_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over elements of KL(Bernoulli(sigmoid(t / T)) || Bernoulli(sigmoid(s / T))) * T^2 (Hinton et al. 2015).

    That is the BCE of the student's tempered logits against the teacher's tempered probabilities minus the
    teacher's own entropy: the same gradient as the BCE, and 0 when the student's logits equal the teacher's.
    """
    t = float(temperature)
    s, q = student_logits.float() / t, teacher_logits.detach().float() / t
    p = torch.sigmoid(q)
    kl = F.binary_cross_entropy_with_logits(s, p, reduction="none") - F.binary_cross_entropy_with_logits(
        q, p, reduction="none"
    )
    return kl.mean() * t * t


def softmax_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) * T^2, summed over classes and averaged over rows (Hinton et al. 2015)."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * t * t
