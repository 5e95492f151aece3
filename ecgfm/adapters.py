"""Lead-subset adapters: carry a backbone trained on some leads (ECGFounder: all 12) to the leads a dataset has.

An adapter is built from a recipe name (``zero_fill``, ``fold_first_conv``, ``projection``, ``identity``) with the
input leads given by name, in any order or spelling, or as a named subset (``"limb"``). It maps
``x [B, k, T]`` (input-lead order) and ``lead_mask [B, k]`` to the ``[B, L_b, T]`` the backbone reads, and may change
the backbone once, at construction (``fold_first_conv`` shrinks its first convolution to k input channels). Weights
in the backbone's native format pass through :meth:`LeadAdapter.adapt_state_dict` before they load, so a 12-lead
checkpoint starts a k-lead model.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ecgfm.captured import CapturesArguments
from ecgfm.leads import LeadError, parse_leads
from ecgfm.registry import ADAPTERS

__all__ = [
    "FoldFirstConv",
    "Identity",
    "LeadAdapter",
    "LeadDropout",
    "Projection",
    "ZeroFill",
    "backbone_leads",
    "create_adapter",
]


def backbone_leads(backbone: nn.Module) -> tuple[str, ...]:
    """The leads a backbone reads, in its channel order (from its model config), canonically spelled."""
    config = getattr(backbone, "model_config", None)
    if config is None:
        raise TypeError(f"{type(backbone).__name__} has no model_config, so its input leads are unknown")
    return parse_leads(list(config.input.lead_names))


def create_adapter(
    spec: str | dict[str, Any] | None, input_leads: str | Iterable[str], backbone: nn.Module
) -> LeadAdapter:
    """Build an adapter from a name or ``{"name": ..., **options}`` for these input leads and this backbone.

    ``spec=None`` picks ``identity`` when the input leads are the backbone's (same leads, same order) and
    ``zero_fill`` otherwise. Some adapters change ``backbone`` in place (``fold_first_conv``).
    """
    leads = parse_leads(input_leads)
    if spec is None:
        spec = "identity" if leads == backbone_leads(backbone) else "zero_fill"
    return ADAPTERS.create(spec, leads, backbone)


class LeadAdapter(CapturesArguments, nn.Module, ABC):
    """Base class: maps ``x [B, k, T]`` in input-lead order (and ``lead_mask [B, k]``) to the backbone's channels.

    Attributes:
        input_leads: the k leads the adapter reads, in order.
        backbone_leads: the leads the backbone read before the adapter was built (its pretrained layout).
        output_leads: the leads of the channels the backbone reads now.
    """

    name = "base"
    skip_arguments = ("input_leads", "backbone")

    def __init__(self, input_leads: str | Iterable[str], backbone: nn.Module) -> None:
        super().__init__()
        self.input_leads: tuple[str, ...] = parse_leads(input_leads)
        self.backbone_leads: tuple[str, ...] = backbone_leads(backbone)
        self.output_leads: tuple[str, ...] = self.backbone_leads

    @abstractmethod
    def forward(self, x: Tensor, lead_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Each adapter maps its input leads to the backbone's channels."""

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Turn a backbone state_dict in its native (pretrained) layout into this adapted backbone's; default as is."""
        return state

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **options}``, as a recipe gives it and a checkpoint stores it."""
        return {"name": self.name, **self.captured_arguments()}

    def _check(self, x: Tensor, lead_mask: Tensor) -> None:
        k = len(self.input_leads)
        if x.dim() != 3 or x.shape[1] != k:
            raise ValueError(
                f"adapter {self.name!r} reads {k} leads ({', '.join(self.input_leads)}) as [batch, {k}, time], "
                f"got {tuple(x.shape)}"
            )
        if tuple(lead_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"lead_mask must be [batch, leads] = {tuple(x.shape[:2])}, got {tuple(lead_mask.shape)}")

    def _slots(self) -> list[int]:
        """Channel of each input lead among the backbone's leads; a lead the backbone lacks fails, named."""
        missing = [lead for lead in self.input_leads if lead not in self.backbone_leads]
        if missing:
            raise LeadError(
                f"adapter {self.name!r}: leads {missing} are not inputs of the backbone "
                f"(its leads: {', '.join(self.backbone_leads)}); the projection adapter can learn them"
            )
        return [self.backbone_leads.index(lead) for lead in self.input_leads]


def _scatter(x: Tensor, lead_mask: Tensor, slots: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """Put each input lead in its slot of ``n_out`` channels, zeros (mask False) elsewhere."""
    out = x.new_zeros(x.shape[0], n_out, x.shape[-1])
    out[:, slots] = x
    mask = torch.zeros(x.shape[0], n_out, dtype=torch.bool, device=lead_mask.device)
    mask[:, slots] = lead_mask.bool()
    return out, mask


@ADAPTERS.register("identity")
class Identity(LeadAdapter):
    """No adapter: the input leads are the backbone's leads, in its order (the default when they are)."""

    def __init__(self, input_leads: str | Iterable[str], backbone: nn.Module) -> None:
        super().__init__(input_leads, backbone)
        if self.input_leads != self.backbone_leads:
            raise LeadError(
                f"adapter 'identity' needs the input leads to be the backbone's ({', '.join(self.backbone_leads)}), "
                f"got {', '.join(self.input_leads)}; use zero_fill, fold_first_conv or projection"
            )

    def forward(self, x: Tensor, lead_mask: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, lead_mask)
        return x, lead_mask


@ADAPTERS.register("zero_fill")
class ZeroFill(LeadAdapter):
    """Present leads in their slots of the backbone's leads, zeros elsewhere; absent leads keep mask False.

    ``missing_embedding=True`` adds a learned per-lead signal (``[L_b, n_samples]``, zeros at start) in every
    slot whose mask is False: leads the input lacks and leads absent from a sample.
    """

    def __init__(self, input_leads: str | Iterable[str], backbone: nn.Module, missing_embedding: bool = False) -> None:
        super().__init__(input_leads, backbone)
        self.register_buffer("slots", torch.tensor(self._slots()), persistent=False)
        self.missing_embedding = None
        if missing_embedding:
            n_samples = int(backbone.model_config.input.n_samples)
            self.missing_embedding = nn.Parameter(torch.zeros(len(self.backbone_leads), n_samples))

    def forward(self, x: Tensor, lead_mask: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, lead_mask)
        out, mask = _scatter(x, lead_mask, self.slots, len(self.backbone_leads))
        if self.missing_embedding is not None:
            if out.shape[-1] != self.missing_embedding.shape[-1]:
                raise ValueError(
                    f"missing_embedding is {self.missing_embedding.shape[-1]} samples long, the signal {out.shape[-1]}"
                )
            out = out + self.missing_embedding.to(out.dtype) * (~mask).unsqueeze(-1).to(out.dtype)
        return out, mask


@ADAPTERS.register("projection")
class Projection(LeadAdapter):
    """A learned k -> L_b channel mixing (1x1 conv, no bias) that starts as the selection zero_fill makes.

    Input leads the backbone lacks start with a zero column (they learn a place). The mask passed on marks the
    slots of the present input leads, as zero_fill's.
    """

    def __init__(self, input_leads: str | Iterable[str], backbone: nn.Module) -> None:
        super().__init__(input_leads, backbone)
        own = [i for i, lead in enumerate(self.input_leads) if lead in self.backbone_leads]
        slots = [self.backbone_leads.index(self.input_leads[i]) for i in own]
        self.register_buffer("inputs_with_slot", torch.tensor(own, dtype=torch.long), persistent=False)
        self.register_buffer("slots", torch.tensor(slots, dtype=torch.long), persistent=False)
        self.mix = nn.Conv1d(len(self.input_leads), len(self.backbone_leads), kernel_size=1, bias=False)
        with torch.no_grad():
            self.mix.weight.zero_()
            self.mix.weight[slots, own, 0] = 1.0

    def forward(self, x: Tensor, lead_mask: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, lead_mask)
        mask = torch.zeros(x.shape[0], len(self.backbone_leads), dtype=torch.bool, device=lead_mask.device)
        mask[:, self.slots] = lead_mask.bool()[:, self.inputs_with_slot]
        return self.mix(x), mask


@ADAPTERS.register("fold_first_conv")
class FoldFirstConv(LeadAdapter):
    """The backbone's first convolution becomes a k-input-channel one built from its L_b-lead kernels.

    Input lead i gets the kernel of its own lead, ``W'[:, i] = W[:, slot(i)]``. With ``fold_absent=True`` the
    kernels of the leads the input lacks are shared out equally as well (timm's adapt_input_conv sums RGB kernels
    for one channel; this is that sum spread over k leads):
    ``W'[:, i] = W[:, slot(i)] + (1 / k) * sum(W[:, a] for a absent)``, so the k-lead conv equals the L_b-lead conv
    on a signal whose absent leads are the mean of the present ones. Bias is kept. Without folding it equals the
    L_b-lead conv on the zero-filled signal, with no compute spent on absent leads. The backbone's
    model config's input leads become the input leads; L_b-channel pretrained weights are folded the same way when
    they load (:meth:`adapt_state_dict`).
    """

    def __init__(self, input_leads: str | Iterable[str], backbone: nn.Module, fold_absent: bool = False) -> None:
        super().__init__(input_leads, backbone)
        self.fold_absent = bool(fold_absent)
        self.conv_name = backbone.model_config.first_conv
        slots = self._slots()
        self.register_buffer("slots", torch.tensor(slots), persistent=False)
        self.register_buffer(
            "absent",
            torch.tensor([i for i in range(len(self.backbone_leads)) if i not in slots], dtype=torch.long),
            persistent=False,
        )
        old = backbone.get_submodule(self.conv_name)
        if not isinstance(old, nn.Conv1d) or old.groups != 1 or old.in_channels != len(self.backbone_leads):
            raise TypeError(
                f"fold_first_conv needs {self.conv_name} to be an ungrouped Conv1d over the backbone's "
                f"{len(self.backbone_leads)} leads, got {old}"
            )
        new = nn.Conv1d(
            len(self.input_leads),
            old.out_channels,
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            bias=old.bias is not None,
            padding_mode=old.padding_mode,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(self.fold(old.weight))
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        if old.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        parent_name, _, child = self.conv_name.rpartition(".")
        setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, new)
        config = backbone.model_config
        architecture = dict(config.architecture)
        if "in_channels" in architecture:
            architecture["in_channels"] = len(self.input_leads)
        contract = dataclasses.replace(config.input, lead_names=self.input_leads)
        backbone.model_config = config.replace(input=contract, architecture=architecture)
        self.output_leads = self.input_leads

    def fold(self, weight: Tensor) -> Tensor:
        """``[C, L_b, K]`` kernels of the backbone's leads -> ``[C, k, K]`` for the input leads (see the class)."""
        work = weight.float()
        out = work[:, self.slots.to(weight.device)]
        if self.fold_absent and len(self.absent):
            out = out + work[:, self.absent.to(weight.device)].sum(dim=1, keepdim=True) / len(self.input_leads)
        return out.to(weight.dtype)

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fold an L_b-lead first-conv weight (the backbone's native layout) to k channels; others pass as they are."""
        key = f"{self.conv_name}.weight"
        weight = state.get(key)
        if weight is not None and weight.dim() == 3 and weight.shape[1] == len(self.backbone_leads):
            state = dict(state)
            state[key] = self.fold(weight)
        return state

    def forward(self, x: Tensor, lead_mask: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x, lead_mask)
        return x, lead_mask


class LeadDropout(nn.Module):
    """In training, each present lead of each sample is zeroed and masked out with probability ``p``.

    At least one present lead of every sample is kept, so one model learns to read several lead subsets.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"lead_dropout must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor, lead_mask: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training or self.p == 0.0:
            return x, lead_mask
        present = lead_mask.bool()
        kept = present & (torch.rand(present.shape, device=present.device) >= self.p)
        emptied = present.any(dim=1) & ~kept.any(dim=1)
        if emptied.any():  # put back one present lead, chosen at random, where all were dropped
            score = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0)
            back = torch.zeros_like(present).scatter_(1, score.argmax(dim=1, keepdim=True), True)
            kept = kept | (back & emptied.unsqueeze(1))
        return x * kept.unsqueeze(-1).to(x.dtype), kept
