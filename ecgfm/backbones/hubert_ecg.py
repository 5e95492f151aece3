"""HuBERT-ECG (Coppola et al.) on ``transformers.HubertModel``: its released weights load without trust_remote_code.

HuBERT-ECG reads 5 s of 12 leads at 100 Hz concatenated lead after lead ([B, 6000]). Here the input contract stays
ecgfm's (10 s, 500 Hz, 12 leads in mV); its chain ``hubert_ecg`` (band-pass, per-lead min-max, decimation by 5,
on the device) gives [B, 12, 1000], two 5-s windows whose features :meth:`HuBERTECGBackbone.forward_features`
pools. Weights: a Hugging Face folder (``config.json`` with model_type ``hubert_ecg`` + ``model.safetensors``) or
an original ``.pt`` (``{model_config, model_state_dict}``); the pretraining heads are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ecgfm.backbones.checkpoint import CheckpointError, load_state_dict_file, load_strict, safe_torch_load
from ecgfm.backbones.config import ContractError, InputContract, ModelConfig
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES
from ecgfm.registry import BACKBONES
from ecgfm.signal import HuBERTECGPreprocessing

if TYPE_CHECKING:  # transformers is imported when a model is built, not when its configs register
    from transformers import HubertConfig

__all__ = ["HUBERT_ARCHITECTURE", "HuBERTECGBackbone", "hubert_config", "hubert_ecg_config"]

#: The HubertConfig fields a HuBERT-ECG network is built from, with HuBERT-ECG's values (their code's defaults:
#: the base size, conv front-end for 100 Hz input, no SpecAugment or layer drop while fine-tuning).
HUBERT_ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout": 0.1,
    "activation_dropout": 0.1,
    "attention_dropout": 0.1,
    "feat_proj_layer_norm": True,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.1,
    "layerdrop": 0.0,
    "layer_norm_eps": 1e-5,
    "feat_extract_norm": "group",
    "feat_extract_activation": "gelu",
    "conv_dim": [512, 512, 512, 512, 512],
    "conv_stride": [4, 2, 2, 2, 2],
    "conv_kernel": [10, 3, 3, 2, 2],
    "conv_bias": False,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "conv_pos_batch_norm": False,
    "do_stable_layer_norm": False,
    "apply_spec_augment": True,
    "mask_time_prob": 0.0,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_feature_prob": 0.0,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
}

#: Fields that change the weights' shapes or what they compute: a checkpoint whose config differs in one is refused.
STRUCTURAL_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "feat_proj_layer_norm",
    "layer_norm_eps",
    "feat_extract_norm",
    "feat_extract_activation",
    "conv_dim",
    "conv_stride",
    "conv_kernel",
    "conv_bias",
    "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups",
    "conv_pos_batch_norm",
    "do_stable_layer_norm",
)

#: ecgfm's own options beside the HubertConfig fields.
ECGFM_OPTIONS: dict[str, Any] = {"window_samples": 500, "window_pooling": "mean", "n_classes": 2}

#: Checkpoint keys of HuBERT-ECG's pretraining (codebook projection and embeddings), dropped for fine-tuning.
PRETRAINING_HEADS = ("final_proj.", "label_embedding.")

#: Prefixes wrappers put before HubertModel's keys (their classification model, DDP, Lightning, ecgfm).
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "hubert_ecg.", "hubert.")

_WEIGHT_NORM = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}


def hubert_config(architecture: Mapping[str, Any]) -> HubertConfig:
    """The ``transformers.HubertConfig`` of an architecture dict (ecgfm's own options left out)."""
    from transformers import HubertConfig  # on build: registering the configs does not import transformers

    return HubertConfig(**{k: v for k, v in architecture.items() if k in HUBERT_ARCHITECTURE})


class HuBERTECGBackbone(nn.Module):
    """A ``HubertModel`` (``hubert``) reading 12 leads x 5 s at 100 Hz flattened, plus a ``classifier`` Linear.

    ``forward_features`` takes the chain's [B, 12, n * window_samples], runs each window as HuBERT-ECG's [6000]
    vector, averages the last hidden state over time and pools the windows (``window_pooling``: mean or max).
    """

    def __init__(self, architecture: Mapping[str, Any]) -> None:
        super().__init__()
        arch = {**HUBERT_ARCHITECTURE, **ECGFM_OPTIONS, **architecture}
        if arch["window_pooling"] not in ("mean", "max"):
            raise ValueError(f"window_pooling must be 'mean' or 'max', got {arch['window_pooling']!r}")
        self.window_samples = int(arch["window_samples"])
        self.window_pooling = str(arch["window_pooling"])
        from transformers import HubertModel

        self.hubert = HubertModel(hubert_config(arch))
        self.num_features = int(arch["hidden_size"])
        self.classifier = nn.Linear(self.num_features, int(arch["n_classes"]))

    def embed_windows(self, x: Tensor) -> Tensor:
        """[N, L * window_samples] (HuBERT-ECG's input) -> [N, hidden], the time-mean of the last hidden state."""
        return self.hubert(x).last_hidden_state.mean(dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, 12, n * window_samples] at 100 Hz -> [B, hidden]: each window flattened lead after lead, pooled."""
        if x.dim() != 3 or x.shape[-1] % self.window_samples:
            raise ContractError(
                f"HuBERT-ECG reads [batch, leads, n * {self.window_samples}] (5-s windows at 100 Hz after the "
                f"hubert_ecg chain), got {tuple(x.shape)}"
            )
        batch, leads, time = x.shape
        n = time // self.window_samples
        windows = x.reshape(batch, leads, n, self.window_samples).transpose(1, 2).reshape(batch * n, -1)
        features = self.embed_windows(windows).reshape(batch, n, -1)
        return features.mean(dim=1) if self.window_pooling == "mean" else features.amax(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))

    def parameters_unused_by_features(self) -> list[nn.Parameter]:
        """The ``classifier`` (a task's heads replace it), so DDP finds no parameter without a gradient."""
        return list(self.classifier.parameters())

    def load_pretrained(
        self, path: Path, state_filter: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    ) -> None:
        """Load HuBERT-ECG weights strictly: a Hugging Face folder, an original ``.pt``, or a state_dict file.

        Their config (when the file has one) must agree with this model's architecture on every structural field;
        pretraining heads are dropped, both weight-norm spellings load, and a classifier loads only when its shape
        is this one's. Missing, unexpected or mis-shaped keys fail, named.
        """
        path = Path(path)
        config, state = read_hubert_ecg_checkpoint(path)
        name = getattr(getattr(self, "model_config", None), "name", "hubert-ecg")
        if config is not None:
            check_architecture(config, {**HUBERT_ARCHITECTURE, **self._architecture()}, source=path, model=name)
        state = self.checkpoint_filter(state)
        if state_filter is not None:
            state = state_filter(state)
        head = {k: v for k, v in state.items() if k.startswith("classifier.")}
        own_head = {k: tuple(v.shape) for k, v in self.classifier.state_dict().items()}
        keep_head = {k[len("classifier.") :]: tuple(v.shape) for k, v in head.items()} == own_head
        if not keep_head:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        load_strict(self, state, source=path, allow_missing=() if keep_head else ("classifier.",))

    def _architecture(self) -> dict[str, Any]:
        config = getattr(self, "model_config", None)
        if config is not None:
            return dict(config.architecture)
        return {k: getattr(self.hubert.config, k) for k in HUBERT_ARCHITECTURE}

    def checkpoint_filter(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """HuBERT-ECG keys -> this module's: wrapper prefixes stripped, pretraining heads dropped, weight norm spelt
        as this torch spells it, HubertModel keys under ``hubert.``, a classifier under ``classifier.``."""
        if any(k.startswith("backbone.") for k in state) and any(k.startswith("heads.") for k in state):
            state = {k: v for k, v in state.items() if k.startswith("backbone.")}  # an ecgfm FineTuneTask checkpoint
        own = set(self.state_dict())
        parametrized = any(".parametrizations.weight.original" in k for k in own)
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            stripped = True
            while stripped:
                stripped = False
                for prefix in WRAPPER_PREFIXES:
                    if key.startswith(prefix):
                        key, stripped = key[len(prefix) :], True
            if key.startswith(PRETRAINING_HEADS):
                continue
            if key == "masked_spec_embed" and "hubert.masked_spec_embed" not in own:
                continue  # SpecAugment's mask vector of pretraining; this model masks nothing
            for old, new in _WEIGHT_NORM.items():
                if parametrized and key.endswith(f".{old}"):
                    key = f"{key[: -len(old)]}{new}"
                elif not parametrized and key.endswith(f".{new}"):
                    key = f"{key[: -len(new)]}{old}"
            out[key if key.startswith("classifier.") else f"hubert.{key}"] = value
        return out


def _plain_config(config: Any, path: Path) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    raise CheckpointError(
        f"{path}: its model_config is a {type(config).__name__}, not a dict; ecgfm reads a .pt whose model_config "
        "is a dict (config.to_dict()), or a Hugging Face folder (config.json + model.safetensors)"
    )


def read_hubert_ecg_checkpoint(path: Path) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    """(config dict or None, state_dict) from a Hugging Face folder, an original ``.pt`` or a state_dict file.

    Only safe formats: safetensors, or torch files read with weights_only. A ``.pt`` whose ``model_config`` is a
    pickled ``HuBERTECGConfig`` object cannot be read that way: the error says what to do.
    """
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} is a folder without config.json; expected a Hugging Face model folder")
        config = json.loads(config_file.read_text())
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return config, load_state_dict_file(path / name)
        raise CheckpointError(f"{path} has config.json but no model.safetensors (or pytorch_model.bin)")
    if path.suffix == ".safetensors":
        return None, load_state_dict_file(path)
    try:
        obj = safe_torch_load(path)
    except CheckpointError as err:
        if "pickles" in str(err):
            raise CheckpointError(
                f"{err}. HuBERT-ECG's original .pt files pickle their HuBERTECGConfig: load the Hugging Face folder "
                "(Edoardo-BS/hubert-ecg-*) instead, or re-save the .pt with model_config=config.to_dict()"
            ) from err
        raise
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        config = _plain_config(obj["model_config"], path) if obj.get("model_config") is not None else None
        state = obj["model_state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        config, state = None, obj["state_dict"]
    else:
        config, state = None, obj
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} holds no state_dict (expected a dict of tensors, or one under 'model_state_dict')"
        )
    return config, dict(state)


def check_architecture(config: Mapping[str, Any], architecture: Mapping[str, Any], source: Path, model: str) -> None:
    """Refuse a checkpoint whose HuBERT-ECG config differs from the model's on a structural field, naming each.

    A field the checkpoint's config leaves out has HubertConfig's default, as ``from_pretrained`` would give it.
    """
    from transformers import HubertConfig

    defaults = HubertConfig().to_dict()
    differ = []
    for key in STRUCTURAL_FIELDS:
        theirs = config.get(key, defaults.get(key))
        ours = architecture[key]
        if isinstance(theirs, (list, tuple)):
            theirs = list(theirs)
        if theirs != (list(ours) if isinstance(ours, (list, tuple)) else ours):
            differ.append(f"{key}={theirs!r} (model: {ours!r})")
    if differ:
        raise CheckpointError(
            f"checkpoint {source} was made for another architecture than {model}: {'; '.join(differ)}; pick the "
            "backbone of that size (hubert-ecg-small, -base or -large)"
        )


def hubert_ecg_input(lead_names: tuple[str, ...] = STANDARD_LEADS) -> InputContract:
    """10 s of 12 leads at 500 Hz in mV through HuBERT-ECG's chain (every parameter written out)."""
    chain = HuBERTECGPreprocessing(fs=STANDARD_FS).config()
    return InputContract(STANDARD_FS, STANDARD_N_SAMPLES, lead_names, "mV", chain)


def hubert_ecg_config(name: str, **architecture: Any) -> ModelConfig:
    """The model config of a registered HuBERT-ECG: its HubertConfig fields and ecgfm's options, spelt out."""
    arch = {**HUBERT_ARCHITECTURE, **ECGFM_OPTIONS, **architecture}
    n_layers = int(arch["num_hidden_layers"])
    return ModelConfig(
        name=name,
        architecture=arch,
        input=hubert_ecg_input(),
        num_features=int(arch["hidden_size"]),
        first_conv="hubert.feature_extractor.conv_layers.0.conv",
        classifier="classifier",
        blocks=(
            "hubert.feature_extractor",
            "hubert.feature_projection",
            "hubert.encoder.pos_conv_embed",
            "hubert.encoder.layer_norm",
            *(f"hubert.encoder.layers.{i}" for i in range(n_layers)),
        ),
    )


def build_hubert_ecg(
    default: ModelConfig, input: InputContract | Mapping[str, Any] | None = None, **options: Any
) -> HuBERTECGBackbone:
    """A HuBERT-ECG from its registered config with architecture ``options`` and the ``input`` contract changed.

    The network reads the 12 leads flattened, so its contract names all 12; fewer leads go through an adapter.
    """
    config = default.with_options(input, **options)
    if len(config.input.lead_names) != 12:
        raise ContractError(
            f"backbone {default.name!r} reads 12 leads flattened into one vector, the contract names "
            f"{len(config.input.lead_names)} ({', '.join(config.input.lead_names)}); give fewer leads with "
            "model.leads and the zero_fill adapter"
        )
    model = HuBERTECGBackbone(config.architecture)
    model.model_config = config
    return model


HUBERT_ECG_SMALL = hubert_ecg_config(
    "hubert-ecg-small", hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048
)
HUBERT_ECG_BASE = hubert_ecg_config("hubert-ecg-base")
HUBERT_ECG_LARGE = hubert_ecg_config(
    "hubert-ecg-large", hidden_size=960, num_hidden_layers=16, num_attention_heads=12, intermediate_size=3840
)
HUBERT_ECG_TINY = hubert_ecg_config(
    "hubert-ecg-tiny",
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    conv_dim=[32, 32, 32, 32, 32],
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)


@BACKBONES.register("hubert-ecg-small")
def hubert_ecg_small(input: InputContract | None = None, **options: Any) -> HuBERTECGBackbone:
    """HuBERT-ECG small (512 hidden, 8 layers; ~30 M parameters). Weights: Edoardo-BS/hubert-ecg-small."""
    return build_hubert_ecg(HUBERT_ECG_SMALL, input, **options)


@BACKBONES.register("hubert-ecg-base")
def hubert_ecg_base(input: InputContract | None = None, **options: Any) -> HuBERTECGBackbone:
    """HuBERT-ECG base (768 hidden, 12 layers; ~93 M parameters). Weights: Edoardo-BS/hubert-ecg-base."""
    return build_hubert_ecg(HUBERT_ECG_BASE, input, **options)


@BACKBONES.register("hubert-ecg-large")
def hubert_ecg_large(input: InputContract | None = None, **options: Any) -> HuBERTECGBackbone:
    """HuBERT-ECG large (960 hidden, 16 layers; ~189 M parameters). Weights: Edoardo-BS/hubert-ecg-large."""
    return build_hubert_ecg(HUBERT_ECG_LARGE, input, **options)


@BACKBONES.register("hubert-ecg-tiny")
def hubert_ecg_tiny(input: InputContract | None = None, **options: Any) -> HuBERTECGBackbone:
    """A ~0.1 M-parameter HuBERT-ECG of the same structure (same conv strides), for tests and CPU recipes."""
    return build_hubert_ecg(HUBERT_ECG_TINY, input, **options)


for _factory in (hubert_ecg_small, hubert_ecg_base, hubert_ecg_large, hubert_ecg_tiny):
    _factory.options = (*HUBERT_ARCHITECTURE, *ECGFM_OPTIONS, "input")  # what `ecgfm list backbones` shows
