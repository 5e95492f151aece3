"""``precomputed``: a backbone whose input is already another model's pooled features, read from a feature folder
that ``ecgfm embed`` wrote, so heads train at the cost of reading ``[B, D]`` floats instead of running the model.

Its model config names the model that computed the features (name and the sha256 of its weights and config): data
from another model is refused, and ``ecgfm publish --features-model`` puts the trained heads back on that model
(docs/embeddings.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ecgfm.backbones.config import ContractError, InputContract, ModelConfig
from ecgfm.data.shards import Manifest
from ecgfm.registry import BACKBONES

__all__ = ["PRECOMPUTED", "PrecomputedFeatures", "check_feature_data", "precomputed"]

PRECOMPUTED = "precomputed"
#: The units of a precomputed backbone's input contract: what it reads is features, not millivolts.
FEATURE_UNITS = "features"


def _describe(model: str, sha256: str) -> str:
    """``'net1d-small' (sha256 0123456789ab)``: how messages name the model that computed features."""
    name = repr(model) if model else "an unnamed model"
    return f"{name} (sha256 {sha256[:12]})" if sha256 else name


class PrecomputedFeatures(nn.Module):
    """The identity on ``[B, D]`` float features: no weights, no preprocessing; the heads are the whole model."""

    reads_features = True  # FineTuneTask hands it the batch as it comes, with no lead selection or preprocessing

    def __init__(self, num_features: int, model: str = "", model_sha256: str = ""):
        super().__init__()
        if int(num_features) < 1:
            raise ContractError(f"backbone {PRECOMPUTED!r} needs num_features >= 1, got {num_features!r}")
        self.num_features = int(num_features)
        self.model = model
        self.model_sha256 = model_sha256

    def describe_model(self) -> str:
        return _describe(self.model, self.model_sha256)

    def forward_features(self, x: Tensor) -> Tensor:
        """Features ``[B, D]`` (float16 as stored) -> float32 ``[B, D]``, unchanged otherwise."""
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ContractError(
                f"backbone {PRECOMPUTED!r} reads features [batch, {self.num_features}] of {self.describe_model()} "
                f"(a folder `ecgfm embed` wrote), got a batch of shape {tuple(x.shape)}"
            )
        return x.float()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def load_pretrained(self, path: Path, state_filter: Callable[[dict], dict] | None = None) -> None:
        """There is nothing to load: the weights that matter were in the model that computed the features."""
        raise ContractError(
            f"backbone {PRECOMPUTED!r} has no weights to load from {path}: its features were computed by "
            f"{self.describe_model()}; set model.pretrained to null"
        )

    def check_data(self, manifest: Manifest, source: str) -> None:
        """Refuse a folder of signals, or of features of another size or from another model; one line each."""
        features = manifest.features
        if not features:
            raise ContractError(
                f"{source} holds signals, but the backbone {PRECOMPUTED!r} reads features of "
                f"{self.describe_model()}: compute them with `ecgfm embed` and train on the folder it writes"
            )
        made_by = features.get("model") or {}
        theirs = _describe(str(made_by.get("name", "")), str(made_by.get("sha256", "")))
        if int(features["size"]) != self.num_features:
            raise ContractError(
                f"{source} holds features of size {features['size']} from {theirs}, but this model reads "
                f"{self.num_features} from {self.describe_model()}"
            )
        if self.model_sha256 and made_by.get("sha256") != self.model_sha256:
            raise ContractError(
                f"{source} holds features of {theirs}, but this model was built for features of "
                f"{self.describe_model()}: embed the data with that model, or train on a folder it made"
            )


def check_feature_data(backbone: nn.Module, manifest: Manifest, source: str | Path) -> bool:
    """True when ``manifest`` is a feature folder or ``backbone`` reads one (then checked here: size and model);
    False for signals and a signal backbone, which the input contract checks. Each mismatch is one line."""
    reads_features = getattr(backbone, "reads_features", False)
    if not reads_features and not manifest.features:
        return False
    if not reads_features:
        made_by = manifest.features.get("model") or {}
        raise ContractError(
            f"{source} holds features that `ecgfm embed` computed with "
            f"{_describe(str(made_by.get('name', '')), str(made_by.get('sha256', '')))}, not signals: train heads "
            f"on them with backbone {PRECOMPUTED!r} (recipes/finetune/embed-linear-probe.yaml)"
        )
    backbone.check_data(manifest, str(source))
    return True


def _from_folder(folder: str | Path) -> tuple[int, str, str, InputContract]:
    """Feature size, model name, model sha256 and the model's input contract, from a feature folder's manifest."""
    manifest = Manifest.load(folder)
    features = manifest.features
    if not features:
        raise ContractError(
            f"{Path(folder) / 'manifest.json'} is a folder of signals, not of features: features_from names a "
            "folder `ecgfm embed` wrote"
        )
    made_by = features.get("model") or {}
    contract = made_by.get("input") or {}
    leads = contract.get("lead_names", manifest.lead_names)
    fs, n_samples = contract.get("fs", manifest.fs), contract.get("n_samples", manifest.n_samples)
    inputs = InputContract(fs, n_samples, tuple(leads), FEATURE_UNITS, {"name": "none"})
    return int(features["size"]), str(made_by.get("name", "")), str(made_by.get("sha256", "")), inputs


@BACKBONES.register(PRECOMPUTED)
def precomputed(
    input: InputContract | Mapping[str, Any] | None = None,
    features_from: str | None = None,
    num_features: int | None = None,
    model: str | None = None,
    model_sha256: str | None = None,
) -> PrecomputedFeatures:
    """Heads on features stored by ecgfm embed: the identity on [B, D], no weights, no preprocessing.

    Args:
        input: the input contract (a checkpoint's; by default the embedding model's rate, length and leads, with
            units ``features`` and no preprocessing).
        features_from: a feature folder; its manifest gives the feature size and the model (name, sha256). A
            checkpoint stores those three, not the folder, so it rebuilds anywhere.
        num_features, model, model_sha256: the same, given directly (they must agree with ``features_from``).
    """
    given = {"num_features": num_features, "model": model, "model_sha256": model_sha256}
    contract: InputContract | None = None
    if features_from is not None:
        size, name, sha256, contract = _from_folder(features_from)
        found = {"num_features": size, "model": name, "model_sha256": sha256}
        differ = [f"{k}={v!r} (folder: {found[k]!r})" for k, v in given.items() if v is not None and v != found[k]]
        if differ:
            raise ContractError(f"backbone {PRECOMPUTED!r}: {', '.join(differ)} disagree with {features_from}")
        given = found
    if given["num_features"] is None:
        raise ContractError(
            f"backbone {PRECOMPUTED!r} needs features_from (a folder `ecgfm embed` wrote) or num_features"
        )
    if input is not None:
        contract = InputContract.from_dict(input) if isinstance(input, Mapping) else input
    contract = contract or InputContract(units=FEATURE_UNITS)
    if contract.units != FEATURE_UNITS or contract.preprocessing != {"name": "none"}:
        raise ContractError(
            f"backbone {PRECOMPUTED!r} reads {FEATURE_UNITS} with no preprocessing; its input contract says "
            f"{contract.units} and {contract.preprocessing}"
        )
    backbone = PrecomputedFeatures(
        int(given["num_features"]), str(given["model"] or ""), str(given["model_sha256"] or "")
    )
    backbone.model_config = ModelConfig(
        name=PRECOMPUTED,
        architecture={
            "num_features": backbone.num_features,
            "model": backbone.model,
            "model_sha256": backbone.model_sha256,
        },
        input=contract,
        num_features=backbone.num_features,
        first_conv="",
        classifier="",
    )
    return backbone


precomputed.reads_features = True  # `ecgfm list backbones`: its size comes from a feature folder, not a default
