"""The model config: what a backbone is and what input it was trained on, stored with every checkpoint made from it.

In the spirit of timm's ``PretrainedCfg`` and torchgeo's weight ``meta``: one frozen :class:`ModelConfig` per
registered backbone holds its architecture (every constructor argument, spelled out), its :class:`InputContract`
(sampling rate, samples per segment, lead names, units and the preprocessing chain with all its parameters), the
names of its first convolution and classifier, its feature size and its blocks from input to output. A checkpoint
stores it and loading rebuilds the model from it, never from today's defaults; data whose rate, length or leads
disagree with the contract is refused with one line naming both sides.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ecgfm.captured import plain
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES, parse_leads

__all__ = ["ContractError", "InputContract", "ModelConfig"]


class ContractError(ValueError):
    """Data or a checkpoint that disagrees with a model's input contract; the message names both sides."""


def _frozen_copy(value: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(plain(dict(value)))


@dataclass(frozen=True)
class InputContract:
    """What a model reads: ``[B, len(lead_names), n_samples]`` in ``units`` at ``fs`` Hz, then ``preprocessing``.

    ``preprocessing`` is the chain's full config (``{"name": ..., every parameter}``), as ``config()`` reports it.
    """

    fs: float = STANDARD_FS
    n_samples: int = STANDARD_N_SAMPLES
    lead_names: tuple[str, ...] = STANDARD_LEADS
    units: str = "mV"
    preprocessing: dict[str, Any] = field(default_factory=lambda: {"name": "none"})

    def __post_init__(self) -> None:
        if not (self.fs > 0 and self.n_samples > 0):
            raise ContractError(
                f"an input contract needs fs > 0 and n_samples > 0, got {self.fs!r}, {self.n_samples!r}"
            )
        object.__setattr__(self, "fs", float(self.fs))
        object.__setattr__(self, "n_samples", int(self.n_samples))
        object.__setattr__(self, "lead_names", parse_leads(list(self.lead_names)))
        object.__setattr__(self, "preprocessing", _frozen_copy(self.preprocessing))

    @property
    def seconds(self) -> float:
        return self.n_samples / self.fs

    def describe(self) -> str:
        """``500 Hz x 5000 samples (10 s), leads I, II, ...``: how messages name the contract."""
        return f"{_rate(self.fs, self.n_samples)}, leads {', '.join(self.lead_names)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "fs": self.fs,
            "n_samples": self.n_samples,
            "lead_names": list(self.lead_names),
            "units": self.units,
            "preprocessing": copy.deepcopy(self.preprocessing),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputContract:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(f"input contract has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def check_data(
        self,
        fs: float,
        n_samples: int,
        lead_names: Iterable[str],
        data: str,
        model: str,
        leads: Iterable[str] | None = None,
    ) -> None:
        """Refuse data of another rate or length, or without the leads the model reads (``leads``, default all).

        Args:
            fs, n_samples, lead_names: what the data holds (a shard manifest's ``fs``, ``n_samples``, ``lead_names``).
            data: names the data in the message (``/path/manifest.json``).
            model: names the model in the message (``net1d-small``).
            leads: the leads the model takes from the data (a lead adapter serves the rest); default ``lead_names``.

        Raises:
            ContractError: one line naming both sides.
        """
        if float(fs) != self.fs or int(n_samples) != self.n_samples:
            raise ContractError(
                f"{data} holds {_rate(fs, n_samples)} segments but the model {model} reads "
                f"{_rate(self.fs, self.n_samples)}; convert the records again for this model or use a model made for "
                "this data"
            )
        wanted = parse_leads(list(leads if leads is not None else self.lead_names))
        have = [lead.strip() for lead in lead_names]
        missing = [lead for lead in wanted if lead not in have]
        if missing:
            raise ContractError(
                f"{data} has leads {', '.join(have) or 'none'} but the model {model} reads {', '.join(wanted)} "
                f"(missing {', '.join(missing)}); train a model on fewer leads (model.leads and a lead adapter)"
            )


def _rate(fs: float, n_samples: int) -> str:
    fs, n_samples = float(fs), int(n_samples)
    seconds = n_samples / fs if fs > 0 else float("nan")
    return f"{fs:g} Hz x {n_samples} samples ({seconds:g} s)"


@dataclass(frozen=True)
class ModelConfig:
    """A backbone's identity and contract; ``create_backbone(config)`` rebuilds exactly this model.

    Attributes:
        name: the registered backbone name (``ecgfm list backbones``).
        architecture: every constructor argument of the network, defaults spelled out.
        input: the input contract the backbone's weights expect.
        num_features: size of ``forward_features``' output.
        first_conv: module name of the convolution that reads the leads (lead adapters resize it).
        classifier: module name of the original classification layer (dropped or replaced when fine-tuning).
        blocks: module names from input to output, for layer-wise learning rates and gradual unfreezing.
    """

    name: str
    architecture: dict[str, Any]
    input: InputContract
    num_features: int
    first_conv: str
    classifier: str
    blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "architecture", _frozen_copy(self.architecture))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if isinstance(self.input, Mapping):
            object.__setattr__(self, "input", InputContract.from_dict(self.input))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (``input=...``, ``architecture=...``)."""
        return dataclasses.replace(self, **changes)

    def with_options(self, input: InputContract | Mapping[str, Any] | None = None, **architecture: Any) -> ModelConfig:
        """This registered config with architecture options and the input contract changed: what a backbone
        factory builds from. An option the architecture does not have fails, naming the ones it has."""
        unknown = sorted(set(architecture) - set(self.architecture))
        if unknown:
            raise ValueError(
                f"backbone {self.name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                f"{', '.join([*self.architecture, 'input'])}"
            )
        contract = self.input if input is None else input
        if isinstance(contract, Mapping):
            contract = InputContract.from_dict(contract)
        return self.replace(architecture={**self.architecture, **architecture}, input=contract)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "architecture": copy.deepcopy(self.architecture),
            "input": self.input.to_dict(),
            "num_features": self.num_features,
            "first_conv": self.first_conv,
            "classifier": self.classifier,
            "blocks": list(self.blocks),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = sorted(k for k in required if k not in data)
        unknown = sorted(set(data) - known)
        if missing or unknown:
            raise ContractError(f"model config has missing fields {missing} / unknown fields {unknown}")
        data = dict(data)
        data["input"] = InputContract.from_dict(data["input"])
        return cls(**data)
