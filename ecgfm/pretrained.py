"""A trained model outside training: contract, preprocessing, adapter, backbone and heads in one module, saved as a
folder (``config.yaml`` + ``model.safetensors`` + ``labels.json`` + ``card.md``) that loads with no pickle.

``ECGModel`` takes raw millivolts ``[B, L, T]`` in its contract's lead order and rate and gives named, unit-bearing
outputs (``potassium_mmol_l``, ``p_hyperkalemia``): what ``ecgfm predict``, ``ecgfm export`` and ``ecgfm.load`` serve.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
import yaml
from torch import Tensor, nn

from ecgfm.adapters import create_adapter
from ecgfm.backbones import create_backbone
from ecgfm.backbones.checkpoint import CheckpointError, load_strict
from ecgfm.backbones.config import ContractError, InputContract, ModelConfig
from ecgfm.card import render_card
from ecgfm.decisions import check_rules
from ecgfm.heads import create_head
from ecgfm.io import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_folder, sha256sum
from ecgfm.leads import parse_leads
from ecgfm.signal import create_preprocessing

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "LABELS_NAME",
    "WEIGHTS_NAME",
    "ECGModel",
    "is_pretrained_folder",
    "read_config",
]

FORMAT = "ecgfm-pretrained"
FORMAT_VERSION = 1
CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
LABELS_NAME = "labels.json"
CARD_NAME = "card.md"
#: State-dict prefixes of a FineTuneTask checkpoint that are training state, not part of the published model.
TRAINING_ONLY_PREFIXES = ("metrics.", "lead_dropout.")


def is_pretrained_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a published model's ``config.yaml``."""
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(folder: str | Path) -> dict[str, Any]:
    """A published model's ``config.yaml`` through the safe YAML loader, checked to be this format."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a published ecgfm model is a folder holding {CONFIG_NAME})")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ContractError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ContractError(f"{path} is not an ecgfm model config (format {FORMAT!r} expected)")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ContractError(
            f"{path} has format_version {config['format_version']}, newer than this ecgfm reads ({FORMAT_VERSION}): "
            "upgrade ecgfm"
        )
    for key in ("contract", "outputs"):
        if key not in config:
            raise ContractError(f"{path} has no {key!r} section")
    return config


class ECGModel(nn.Module):
    """Preprocessing -> lead adapter -> backbone -> heads, rebuilt from a stored contract (a FineTuneTask's
    ``contract()``: backbone config, input contract, adapter, heads) with no training machinery.

    Args:
        contract: ``{"backbone": ..., "input": ..., "adapter": ..., "heads": {name: config}}``.
        card: what the model card says beyond the contract: name, training data, metrics, intended use,
            limitations, licence, paper, and ``lead_subsets`` (the smaller sets of leads the model was validated on;
            missing leads are zero-filled and masked only for a record holding one of them).
    """

    def __init__(self, contract: Mapping[str, Any], card: Mapping[str, Any] | None = None):
        super().__init__()
        backbone_config = ModelConfig.from_dict(contract["backbone"])
        self.input_contract = InputContract.from_dict(contract["input"])
        self.backbone_config = backbone_config
        self.backbone = create_backbone(backbone_config)
        self.adapter = create_adapter(contract["adapter"], self.input_contract.lead_names, self.backbone)
        self.preprocessing = create_preprocessing(self.input_contract.preprocessing)
        heads = [create_head(dict(config)) for config in contract.get("heads", {}).values()]
        for head in heads:
            head.build(self.backbone.num_features, head.labels)
        self.heads = nn.ModuleDict({head.name: head for head in heads})
        self.card: dict[str, Any] = copy.deepcopy(dict(card or {}))
        self.eval()

    # ----------------------------------------------------------------- what it reads and gives
    @property
    def leads(self) -> tuple[str, ...]:
        return self.input_contract.lead_names

    @property
    def name(self) -> str:
        return str(self.card.get("name") or self.backbone_config.name)

    def contract(self) -> dict[str, Any]:
        """The stored form: rebuilds this model exactly (``ECGModel(model.contract())``)."""
        return {
            "backbone": self.backbone_config.to_dict(),
            "input": self.input_contract.to_dict(),
            "adapter": self.adapter.config(),
            "heads": {name: head.config() for name, head in self.heads.items()},
        }

    def output_keys(self) -> list[tuple[str, str, str]]:
        """``(public name, head, key)`` per output, in order; the head's key is the public name unless two heads
        give the same key, then it is ``<head>/<key>``."""
        return _public_names([(name, key) for name, head in self.heads.items() for key in head.output_names()])

    def output_names(self) -> list[str]:
        return [public for public, _, _ in self.output_keys()]

    def decision_rules(self) -> list[dict[str, Any]]:
        """Every head's decision rules (``ecgfm.decisions``) over the public output names."""
        public = {(head, key): name for name, head, key in self.output_keys()}
        rules = []
        for head_name, head in self.heads.items():
            for rule in head.decision_rules():
                rule = copy.deepcopy(rule)
                rule["output"] = public[(head_name, rule["output"])]
                if "score" in rule:
                    rule["score"] = public[(head_name, rule["score"])]
                if "scores" in rule:
                    rule["scores"] = [public[(head_name, s)] for s in rule["scores"]]
                rules.append(rule)
        return rules

    def score_names(self) -> list[str]:
        """Continuous outputs (probabilities, values): the ones a record's windows are aggregated over."""
        decided = {rule["output"] for rule in self.decision_rules()}
        return [name for name in self.output_names() if name not in decided]

    def outputs_description(self) -> dict[str, dict[str, Any]]:
        """Per public output: its head, the head's key, ``score`` or ``decision``, and the unit where one is known."""
        decided = {rule["output"] for rule in self.decision_rules()}
        out = {}
        for public, head_name, key in self.output_keys():
            head = self.heads[head_name]
            entry: dict[str, Any] = {
                "head": head_name,
                "key": key,
                "type": "decision" if public in decided else "score",
            }
            if key.startswith("p_"):
                entry["unit"] = "probability"
            else:
                units = getattr(head, "column_units", None)
                if units is not None:
                    for label, unit in zip(head.labels, units(), strict=True):
                        if key.startswith(label) and unit:
                            entry["unit"] = unit
            out[public] = entry
        return out

    # ----------------------------------------------------------------- forward
    def _check_signal(self, signal: Tensor, lead_mask: Tensor | None) -> Tensor:
        expected = (len(self.leads), self.input_contract.n_samples)
        if signal.dim() != 3 or tuple(signal.shape[1:]) != expected:
            raise ContractError(
                f"the model {self.name!r} reads [batch, {expected[0]} leads ({', '.join(self.leads)}), {expected[1]} "
                f"samples at {self.input_contract.fs:g} Hz] in {self.input_contract.units}; got {tuple(signal.shape)}"
            )
        if lead_mask is None:
            return torch.ones(signal.shape[:2], dtype=torch.bool, device=signal.device)
        if tuple(lead_mask.shape) != tuple(signal.shape[:2]):
            raise ContractError(
                f"lead_mask must be [batch, leads] = {tuple(signal.shape[:2])}, got {tuple(lead_mask.shape)}"
            )
        return lead_mask.bool()

    def features(self, signal: Tensor, lead_mask: Tensor | None = None) -> Tensor:
        """Raw mV ``[B, L, T]`` -> the backbone's features ``[B, D]`` (preprocessing and adapter included)."""
        lead_mask = self._check_signal(signal, lead_mask)
        x, _ = self.adapter(self.preprocessing(signal.float(), lead_mask), lead_mask)
        return self.backbone.forward_features(x)

    def forward(self, signal: Tensor, lead_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Raw mV ``[B, L, T]`` -> ``{head: raw output}``."""
        features = self.features(signal, lead_mask)
        return {name: head(features) for name, head in self.heads.items()}

    def predict(self, signal: Tensor, lead_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Raw mV ``[B, L, T]`` -> ``{public output name: float [B]}``: probabilities, values and decisions."""
        return self.postprocess(self(signal, lead_mask))

    def postprocess(self, raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{head: raw output}`` (what :meth:`forward` gives) -> ``{public output name: float [B]}``."""
        by_head = {name: head.postprocess(raw[name]) for name, head in self.heads.items()}
        keys = _public_names([(head, key) for head, outputs in by_head.items() for key in outputs])
        return {public: by_head[head][key].float() for public, head, key in keys}

    @torch.no_grad()
    def predict_numpy(self, signal: np.ndarray, lead_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """:meth:`predict` on numpy arrays, on the model's device, in eval mode: what ``ecgfm predict`` runs."""
        device = next(self.parameters()).device
        x = torch.as_tensor(np.asarray(signal, dtype=np.float32), device=device)
        mask = None if lead_mask is None else torch.as_tensor(np.asarray(lead_mask, dtype=bool), device=device)
        return {name: value.cpu().numpy() for name, value in self.eval().predict(x, mask).items()}

    # ----------------------------------------------------------------- image files
    @property
    def reads_images(self) -> bool:
        """Whether the backbone reads pages, so image files (``predict_image_files``) can be given."""
        return hasattr(self.backbone, "forward_page_features")

    def read_image_pages(self, paths: list[str | Path]) -> np.ndarray:
        """Image files -> ``[N, 3, H, W]`` pages at the model's size through its stored image preprocessing."""
        if not self.reads_images:
            raise ContractError(f"the model {self.name!r} reads signals ({self.backbone_config.name}), not images")
        from ecgfm.image_preprocessing import read_page

        size, preprocessing = self.backbone.page_size, self.backbone.image_preprocessing
        return np.stack([read_page(path, size, preprocessing) for path in paths])

    @torch.no_grad()
    def predict_pages_numpy(self, pages: np.ndarray) -> dict[str, np.ndarray]:
        """Pages ``[B, 3, H, W]`` in [0, 1] -> ``{public output name: [B]}``, as :meth:`predict_numpy` for signals."""
        if not self.reads_images:
            raise ContractError(f"the model {self.name!r} reads signals ({self.backbone_config.name}), not images")
        device = next(self.parameters()).device
        features = self.eval().backbone.forward_page_features(torch.as_tensor(pages, device=device))
        by_head = {name: head.postprocess(head(features)) for name, head in self.heads.items()}
        keys = _public_names([(head, key) for head, outputs in by_head.items() for key in outputs])
        return {public: by_head[head][key].float().cpu().numpy() for public, head, key in keys}

    # ----------------------------------------------------------------- publishing
    def published_config(self) -> dict[str, Any]:
        """``config.yaml``: the format, the contract, every output with its unit and the decision rules, the card."""
        rules = self.decision_rules()
        check_rules(rules, self.output_names())
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "ecgfm_version": _ecgfm_version(),
            "contract": self.contract(),
            "outputs": self.outputs_description(),
            "decisions": rules,
            "temperatures": self.temperatures(),
            "aggregation": "mean",
            "card": copy.deepcopy(self.card),
        }

    def temperatures(self) -> dict[str, float]:
        """Per classification head, the temperature its probabilities are divided by (1 = as trained)."""
        return {name: float(head.temperature) for name, head in self.heads.items() if head.temperature_kind}

    def labels(self) -> dict[str, Any]:
        """``labels.json``: per head its kind, target, label names, units and the outputs it gives."""
        out = {}
        described = self.outputs_description()
        for name, head in self.heads.items():
            units = getattr(head, "column_units", None)
            out[name] = {
                "kind": head.kind,
                "target": head.target,
                "labels": list(head.labels),
                "units": units() if units is not None else None,
                "outputs": [public for public, entry in described.items() if entry["head"] == name],
            }
        return out

    def save_pretrained(self, folder: str | Path, card: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.yaml``, ``model.safetensors``, ``labels.json`` and ``card.md`` into ``folder`` (each file
        atomically; ``config.yaml`` last, with the weights' sha256, so a half-written folder never loads)."""
        if card:
            self.card.update(copy.deepcopy(dict(card)))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().cpu().contiguous().clone() for key, value in self.state_dict().items()}
        weights = atomic_write_bytes(
            folder / WEIGHTS_NAME, safetensors.torch.save(tensors, metadata={"format": "pt", "ecgfm": FORMAT})
        )
        config = self.published_config()
        config["weights"] = {"file": WEIGHTS_NAME, "sha256": sha256sum(weights), "bytes": weights.stat().st_size}
        atomic_write_json(folder / LABELS_NAME, self.labels())
        atomic_write_text(folder / CARD_NAME, render_card(config, self.labels()))
        atomic_write_text(folder / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        fsync_folder(folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> ECGModel:
        """Load a published folder: safe YAML, safetensors (no pickle), the weights' sha256 checked, strict keys."""
        folder = Path(folder)
        config = read_config(folder)
        weights = folder / config.get("weights", {}).get("file", WEIGHTS_NAME)
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no such file (the weights of the model in {folder})")
        expected = config.get("weights", {}).get("sha256")
        if expected and sha256sum(weights) != expected:
            raise CheckpointError(
                f"{weights} has the wrong sha256 (config.yaml records {expected}): the file is corrupt or was replaced"
            )
        try:
            model = cls(config["contract"], config.get("card"))
        except (KeyError, TypeError) as err:
            raise ContractError(f"{folder / CONFIG_NAME}: its contract cannot build a model ({err})") from None
        try:
            state = safetensors.torch.load_file(str(weights), device=str(map_location))
        except (safetensors.SafetensorError, OSError) as err:
            raise CheckpointError(f"{weights} is not a readable safetensors file ({err})") from None
        load_strict(model, state, weights)
        return model.to(map_location).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, card: Mapping[str, Any] | None = None) -> ECGModel:
        """A FineTuneTask checkpoint (``.ckpt``) as a published model: its stored contract, its weights (strict)."""
        from ecgfm.checkpointing import read_lightning_checkpoint

        checkpoint = read_lightning_checkpoint(path)
        stored = checkpoint.get("ecgfm") or {}
        if stored.get("version") != 2 or "heads" not in stored:
            raise CheckpointError(
                f"{path} stores no model contract (checkpoint['ecgfm'] version 2): it was written by an older ecgfm; "
                "run `ecgfm test` on it with this version and save it again"
            )
        model = cls({key: stored[key] for key in ("backbone", "input", "adapter", "heads")}, card)
        state = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith(TRAINING_ONLY_PREFIXES)
        }
        peft = None
        if stored.get("peft"):  # peft adapters only: the base weights come from their file, then the adapters merge
            from ecgfm.finetune.peft import BackbonePeft

            peft = BackbonePeft.build(stored["peft"], model.backbone)
            peft.restore_base(state, model.adapter.adapt_state_dict, source=str(path))
        load_strict(model, state, path)
        if peft is not None:
            peft.merge()
        return model.eval()

    @classmethod
    def from_task(cls, task: nn.Module, card: Mapping[str, Any] | None = None) -> ECGModel:
        """The published model of a FineTuneTask in memory (its contract and weights, copied)."""
        stored = task.contract()
        model = cls({key: stored[key] for key in ("backbone", "input", "adapter", "heads")}, card)
        peft = getattr(task, "peft", None)  # peft adapters are folded into a copy of the backbone's weights
        full = task.state_dict() if peft is None else peft.merged_state_dict(task.state_dict())
        state = {k: v for k, v in full.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
        load_strict(model, state, f"the {type(task).__name__} in memory")
        return model.eval()

    def lead_subsets(self) -> list[tuple[str, ...]]:
        """The smaller lead sets the card says this model serves (missing leads zero-filled and masked)."""
        return [parse_leads(subset) for subset in self.card.get("lead_subsets", [])]


def _public_names(keys: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``(head, key)`` pairs -> ``(public name, head, key)``: the key, or ``<head>/<key>`` where two heads share it."""
    seen: dict[str, int] = {}
    for _, key in keys:
        seen[key] = seen.get(key, 0) + 1
    return [(key if seen[key] == 1 else f"{head}/{key}", head, key) for head, key in keys]


def _ecgfm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ecgfm")
    except PackageNotFoundError:
        return "unknown"


def load(name_or_path: str | Path, allow_download: bool = False, map_location: str | torch.device = "cpu") -> ECGModel:
    """A model by zoo name (``ecgfm zoo list``), published folder, ``hf://owner/repo[@revision]`` or FineTuneTask
    ``.ckpt``, ready to predict.

    Zoo files are found locally first (``$ECGFM_HOME``, the user cache, the repository's ``checkpoints/``) and
    checked against their sha256; the Hugging Face hub is asked only with ``allow_download=True``. A zoo entry of
    backbone weights (ECGFounder's ``.pth``) gives a model with no heads: :meth:`ECGModel.features` serves it.
    """
    if str(name_or_path).startswith(HUB_PREFIX):
        return ECGModel.from_pretrained(hub_folder(str(name_or_path), allow_download), map_location)
    path = Path(name_or_path)
    if path.is_dir():
        return ECGModel.from_pretrained(path, map_location)
    if path.is_file() and path.suffix == ".ckpt":
        return ECGModel.from_checkpoint(path).to(map_location)
    if path.exists() or "/" in str(name_or_path) or path.suffix:
        raise FileNotFoundError(
            f"{path}: not a published model folder (no {CONFIG_NAME}) nor a .ckpt checkpoint; a zoo name has no "
            "slash or suffix (`ecgfm zoo list`)"
        )
    from ecgfm.zoo import resolve, zoo_entry  # resolution only: the zoo never builds models

    entry = zoo_entry(str(name_or_path))
    local = resolve(str(name_or_path), allow_download=allow_download)
    if entry.get("format") == FORMAT:
        return ECGModel.from_pretrained(local, map_location)
    from ecgfm.registry import BACKBONES

    backbone = BACKBONES.create(entry["backbone"])
    config = backbone.model_config
    model = ECGModel(
        {"backbone": config.to_dict(), "input": config.input.to_dict(), "adapter": "identity", "heads": {}},
        {key: entry[key] for key in ("name", "licence", "paper", "summary") if key in entry},
    )
    model.backbone.load_pretrained(local)
    return model.to(map_location).eval()


HUB_PREFIX = "hf://"


def hub_folder(address: str, allow_download: bool = False) -> Path:
    """The local snapshot of a published model on the Hugging Face hub (``hf://owner/repo[@revision]``): from the hub
    cache, or downloaded through ``huggingface_hub`` only when ``allow_download`` is true."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = address.removeprefix(HUB_PREFIX).partition("@")
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision or None,
                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME, CARD_NAME],
                local_files_only=not allow_download,
            )
        )
    except LocalEntryNotFoundError:
        if allow_download:
            raise
        raise FileNotFoundError(
            f"{address} is not in the Hugging Face hub cache of this machine; downloads are off: pass "
            "allow_download=True (or --allow-download) to fetch it"
        ) from None
