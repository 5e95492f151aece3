"""ECG-FM (bowang-lab/ECG-FM, MIT): a wav2vec 2.0 encoder over 12-lead ECGs, loadable from fairseq-signals checkpoints.

The network is fairseq-signals' ``ECGTransformerModel`` (the encoder of ``wav2vec2_cmsc``): a 12-channel
convolutional front-end ``[(256, 2, 2)] * 4`` (stride 16, GroupNorm after the first conv in fairseq's "default"
mode), LayerNorm, Linear 256 -> 768, a weight-normed convolutional position encoding added to the features, then
transformers' post-LN :class:`~transformers.models.wav2vec2.modeling_wav2vec2.Wav2Vec2Encoder` (its LayerNorm, then
12 layers). Only the multi-channel front-end is written here: transformers' feature encoder reads one channel.

Checkpoints are fairseq trainer dicts ``{"cfg": ..., "model": {...}}``; pretrained ones hold the encoder keys at top
level beside the pretraining heads (dropped), fine-tuned ones prefix them with ``encoder.`` beside the head ``proj``.
Every key is mapped by the explicit table of :func:`fairseq_key_map`, never by shape.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ecgfm.backbones.checkpoint import CheckpointError, load_state_dict_file, load_strict
from ecgfm.backbones.config import ContractError, InputContract, ModelConfig
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES, parse_leads
from ecgfm.registry import BACKBONES
from ecgfm.signal import ZScore

if TYPE_CHECKING:  # transformers is imported when a model is built, not when its configs register
    from transformers import Wav2Vec2Config

__all__ = ["ECGFM", "ECG_FM", "ECG_FM_TINY", "checkpoint_filter_fn", "fairseq_key_map"]

#: The published ECG-FM architecture (fairseq-signals' defaults with ECG-FM's fine-tuning dropouts).
ECG_FM_ARCHITECTURE: dict[str, Any] = {
    "in_channels": 12,
    "conv_layers": [[256, 2, 2]] * 4,  # (channels, kernel, stride) per layer, fairseq's conv_feature_layers
    "extractor_mode": "default",  # "default": GroupNorm after the first conv only; "layer_norm": after every conv
    "conv_bias": False,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "layer_norm_eps": 1e-5,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.1,
    "dropout_input": 0.0,
    "n_classes": 26,
    "window_samples": 2500,  # 5 s at 500 Hz: what ECG-FM was pretrained on
    "window_pooling": "mean",  # how the windows of a longer segment combine: mean | max
}

#: Keys of the pretraining objectives (wav2vec 2.0 quantizer and projections, mask embedding): never loaded.
PRETRAINING_ONLY = re.compile(
    r"^(mask_emb|quantizer\.|input_quantizer\.|project_q\.|project_inp\.|final_proj\.|target_glu\.)"
)


class ConvFeatureExtractor(nn.Module):
    """fairseq-signals' ``ConvFeatureExtraction`` over ``in_channels`` leads: conv -> (norm) -> GELU per layer."""

    def __init__(self, in_channels: int, conv_layers: list[list[int]], mode: str, conv_bias: bool) -> None:
        super().__init__()
        if mode not in ("default", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'default' or 'layer_norm', got {mode!r}")
        self.mode = mode
        self.conv_layers = nn.ModuleList()
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            layer = nn.Module()
            layer.conv = nn.Conv1d(in_channels, dim, kernel, stride=stride, bias=conv_bias)
            if mode == "layer_norm":
                layer.norm = nn.LayerNorm(dim)
            elif i == 0:
                layer.norm = nn.GroupNorm(dim, dim)
            self.conv_layers.append(layer)
            in_channels = dim

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.conv_layers:
            x = layer.conv(x)
            norm = getattr(layer, "norm", None)
            if isinstance(norm, nn.LayerNorm):
                x = norm(x.transpose(1, 2)).transpose(1, 2)
            elif norm is not None:
                x = norm(x)
            x = nn.functional.gelu(x)
        return x


class FeatureProjection(nn.Module):
    """LayerNorm over the conv features, Linear to the transformer width, input dropout (fairseq's order)."""

    def __init__(self, conv_dim: int, hidden_size: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(conv_dim, eps=eps)
        self.projection = nn.Linear(conv_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Tensor) -> Tensor:
        return self.dropout(self.projection(self.layer_norm(features)))


class ECGFM(nn.Module):
    """ECG-FM's encoder: ``forward_features`` splits a segment into 5-s windows, encodes each, pools time and windows.

    No random lead masking and no time masking: those are pretraining augmentations (ECG-FM issues #8, #9).
    """

    def __init__(self, **architecture: Any) -> None:
        super().__init__()
        arch = {**ECG_FM_ARCHITECTURE, **architecture}
        unknown = sorted(set(arch) - set(ECG_FM_ARCHITECTURE))
        if unknown:
            raise ValueError(f"ECGFM has no option {unknown}; its options: {', '.join(ECG_FM_ARCHITECTURE)}")
        if arch["window_pooling"] not in ("mean", "max"):
            raise ValueError(f"window_pooling must be 'mean' or 'max', got {arch['window_pooling']!r}")
        self.architecture = arch  # the checkpoint key table follows it (also without a registered model_config)
        self.window_samples = int(arch["window_samples"])
        self.window_pooling = str(arch["window_pooling"])
        conv_layers = [list(layer) for layer in arch["conv_layers"]]
        self.feature_extractor = ConvFeatureExtractor(
            arch["in_channels"], conv_layers, arch["extractor_mode"], arch["conv_bias"]
        )
        hidden = int(arch["hidden_size"])
        self.feature_projection = FeatureProjection(
            conv_layers[-1][0], hidden, arch["layer_norm_eps"], arch["dropout_input"]
        )
        from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2Encoder  # on build: registering is fast

        self.encoder = Wav2Vec2Encoder(wav2vec2_config(arch))
        self.num_features = hidden
        self.proj = nn.Linear(hidden, int(arch["n_classes"]))

    def encode(self, x: Tensor) -> Tensor:
        """``[N, in_channels, T]`` -> ``[N, T', hidden]``, the transformer's last hidden state (T' = T // 16)."""
        features = self.feature_extractor(x).transpose(1, 2)
        return self.encoder(self.feature_projection(features)).last_hidden_state

    def windows(self, x: Tensor) -> Tensor:
        """``[B, L, T]`` -> ``[B, n, L, window]``: consecutive non-overlapping windows (a 10-s segment gives two 5-s
        ones); a segment shorter than a window is one window, the tail past the last whole window is not read."""
        n = x.shape[-1] // self.window_samples
        if n == 0:
            return x.unsqueeze(1)
        x = x[..., : n * self.window_samples]
        return x.reshape(x.shape[0], x.shape[1], n, self.window_samples).transpose(1, 2)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, L, T]`` -> ``[B, hidden]``: each window's time-mean of the encoder output, pooled over windows."""
        windows = self.windows(x)
        b, n = windows.shape[:2]
        pooled = self.encode(windows.reshape(b * n, *windows.shape[2:])).mean(dim=1).reshape(b, n, -1)
        return pooled.amax(dim=1) if self.window_pooling == "max" else pooled.mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.forward_features(x))

    def parameters_unused_by_features(self) -> list[nn.Parameter]:
        """The classifier ``proj`` (a fine-tuned ECG-FM's head) is never read by :meth:`forward_features`."""
        return list(self.proj.parameters())

    def load_pretrained(
        self, path: Path, state_filter: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    ) -> None:
        """Load a fairseq-signals ECG-FM checkpoint strictly (or an ecgfm fine-tuned one); the head ``proj`` loads
        only when its shape matches. ``state_filter`` (e.g. a lead adapter's fold) runs on the mapped keys."""
        try:
            raw = load_state_dict_file(path)
        except CheckpointError as err:
            if "omegaconf" in str(err):
                raise CheckpointError(f"{err}. {OMEGACONF_HINT}") from err
            raise
        state = checkpoint_filter_fn(raw, self.architecture, source=path)
        if state_filter is not None:
            state = state_filter(state)
        head = state.get("proj.weight")
        if head is None or tuple(head.shape) != tuple(self.proj.weight.shape):
            state = {k: v for k, v in state.items() if not k.startswith("proj.")}
        load_strict(self, state, source=path, allow_missing=("proj.",))


OMEGACONF_HINT = (
    "Its 'cfg' holds omegaconf objects, which ecgfm does not unpickle. Convert it once where fairseq-signals is "
    "installed and the file is trusted: ckpt = torch.load(path, weights_only=False); torch.save({'cfg': "
    "OmegaConf.to_container(ckpt['cfg']), 'model': ckpt['model']}, 'ecg-fm.pt') (docs/backbones.md, ECG-FM)"
)


def wav2vec2_config(arch: Mapping[str, Any]) -> Wav2Vec2Config:
    """transformers' config for the post-LN wav2vec 2.0 encoder with fairseq-signals' settings (no layer drop)."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        hidden_size=int(arch["hidden_size"]),
        num_hidden_layers=int(arch["num_hidden_layers"]),
        num_attention_heads=int(arch["num_attention_heads"]),
        intermediate_size=int(arch["intermediate_size"]),
        hidden_act="gelu",
        feat_extract_activation="gelu",
        num_conv_pos_embeddings=int(arch["conv_pos"]),
        num_conv_pos_embedding_groups=int(arch["conv_pos_groups"]),
        do_stable_layer_norm=False,
        layer_norm_eps=float(arch["layer_norm_eps"]),
        hidden_dropout=float(arch["dropout"]),
        attention_dropout=float(arch["attention_dropout"]),
        activation_dropout=float(arch["activation_dropout"]),
        layerdrop=0.0,
        attn_implementation="sdpa",  # the module is used standalone, outside a PreTrainedModel's dispatch
    )


def fairseq_key_map(architecture: Mapping[str, Any]) -> dict[str, str]:
    """fairseq-signals ``ECGTransformerModel`` key -> this module's key, for every weight of ``architecture``.

    Weight norm of the position conv appears in both spellings: ``weight_g``/``weight_v`` (torch's old
    ``weight_norm``) and ``parametrizations.weight.original0``/``original1`` (the new one).
    """
    arch = {**ECG_FM_ARCHITECTURE, **architecture}
    table: dict[str, str] = {}
    for i in range(len(arch["conv_layers"])):
        src, dst = f"feature_extractor.conv_layers.{i}", f"feature_extractor.conv_layers.{i}"
        table[f"{src}.0.weight"] = f"{dst}.conv.weight"
        if arch["conv_bias"]:
            table[f"{src}.0.bias"] = f"{dst}.conv.bias"
        if arch["extractor_mode"] == "layer_norm":  # Sequential(conv, dropout, Sequential(T, LayerNorm, T), GELU)
            for p in ("weight", "bias"):
                table[f"{src}.2.1.{p}"] = f"{dst}.norm.{p}"
        elif i == 0:  # Sequential(conv, dropout, Fp32GroupNorm, GELU)
            for p in ("weight", "bias"):
                table[f"{src}.2.{p}"] = f"{dst}.norm.{p}"
    for p in ("weight", "bias"):
        table[f"layer_norm.{p}"] = f"feature_projection.layer_norm.{p}"
        table[f"post_extract_proj.{p}"] = f"feature_projection.projection.{p}"
        table[f"encoder.layer_norm.{p}"] = f"encoder.layer_norm.{p}"
        table[f"proj.{p}"] = f"proj.{p}"
    pos, own_pos = "conv_pos.pos_conv.0", "encoder.pos_conv_embed.conv"
    table[f"{pos}.bias"] = f"{own_pos}.bias"
    for g, v in (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1")):
        table[f"{pos}.{g}"] = f"{own_pos}.parametrizations.weight.original0"
        table[f"{pos}.{v}"] = f"{own_pos}.parametrizations.weight.original1"
    layer_names = {
        "self_attn.q_proj": "attention.q_proj",
        "self_attn.k_proj": "attention.k_proj",
        "self_attn.v_proj": "attention.v_proj",
        "self_attn.out_proj": "attention.out_proj",
        "self_attn_layer_norm": "layer_norm",
        "fc1": "feed_forward.intermediate_dense",
        "fc2": "feed_forward.output_dense",
        "final_layer_norm": "final_layer_norm",
    }
    for n in range(int(arch["num_hidden_layers"])):
        for src, dst in layer_names.items():
            for p in ("weight", "bias"):
                table[f"encoder.layers.{n}.{src}.{p}"] = f"encoder.layers.{n}.{dst}.{p}"
    return table


def checkpoint_filter_fn(
    state_dict: Mapping[str, Tensor], architecture: Mapping[str, Any], source: str | Path = "checkpoint"
) -> dict[str, Tensor]:
    """A fairseq-signals state dict (pretrained, or fine-tuned with ``encoder.`` prefix and head ``proj``) in this
    module's keys. Pretraining-only keys are dropped; a key the table lacks is kept as it is, so the strict load
    names it as unexpected; a weight the table expects and the checkpoint lacks fails here, named as fairseq names it.

    An ecgfm FineTuneTask checkpoint (``backbone.*`` beside ``heads.*``) already uses this module's keys.
    """
    if any(k.startswith("backbone.") for k in state_dict) and any(k.startswith("heads.") for k in state_dict):
        return {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    state = dict(state_dict)
    if any(k.startswith("encoder.feature_extractor.") for k in state):  # fine-tuned: the encoder is a submodule
        state = {(k[len("encoder.") :] if k.startswith("encoder.") else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not PRETRAINING_ONLY.match(k)}
    table = fairseq_key_map(architecture)
    out = {table.get(k, k): v for k, v in state.items()}
    inverse: dict[str, str] = {}
    for src, dst in table.items():
        inverse.setdefault(dst, src)
    missing = [src for dst, src in inverse.items() if dst not in out and not dst.startswith("proj.")]
    if missing:
        raise CheckpointError(
            f"checkpoint {source} lacks ECG-FM weights ({len(missing)}, fairseq-signals names): "
            f"{', '.join(missing[:20])}"
        )
    return out


def ecg_fm_input(lead_names: tuple[str, ...] = STANDARD_LEADS) -> InputContract:
    """ECG-FM's input: 500 Hz mV, each lead z-scored over the whole 10-s record (fairseq-signals' preprocess.py
    standardises the record, then cuts 5-s segments; constant leads become zero)."""
    chain = ZScore(per_lead=True).config()
    return InputContract(STANDARD_FS, STANDARD_N_SAMPLES, lead_names, "mV", chain)


def ecg_fm_config(name: str, lead_names: tuple[str, ...] = STANDARD_LEADS, **architecture: Any) -> ModelConfig:
    """The model config of a registered ECG-FM: the published architecture with ``architecture`` changed."""
    arch = {**ECG_FM_ARCHITECTURE, **architecture, "in_channels": len(lead_names)}
    n_layers = int(arch["num_hidden_layers"])
    return ModelConfig(
        name=name,
        architecture=arch,
        input=ecg_fm_input(lead_names),
        num_features=int(arch["hidden_size"]),
        first_conv="feature_extractor.conv_layers.0.conv",
        classifier="proj",
        blocks=(
            "feature_extractor",
            "feature_projection",
            "encoder.pos_conv_embed",
            "encoder.layer_norm",
            *(f"encoder.layers.{i}" for i in range(n_layers)),
        ),
    )


def build_ecg_fm(default: ModelConfig, input: InputContract | Mapping[str, Any] | None = None, **options: Any) -> ECGFM:
    """An ECGFM from its registered config, with architecture ``options`` and an ``input`` contract changed;
    ``lead_names=("I",)`` is a shortcut for a contract with those leads (and as many input channels)."""
    contract = default.input if input is None else input
    if isinstance(contract, Mapping):
        contract = InputContract.from_dict(contract)
    lead_names = options.pop("lead_names", None)
    if lead_names is not None:
        contract = dataclasses.replace(contract, lead_names=parse_leads(lead_names))
    options.setdefault("in_channels", len(contract.lead_names))
    if "conv_layers" in options:  # a JSON round trip gives lists; keep one spelling so configs compare equal
        options["conv_layers"] = [list(layer) for layer in options["conv_layers"]]
    config = default.with_options(contract, **options)
    arch = config.architecture
    if arch["in_channels"] != len(config.input.lead_names):
        raise ContractError(
            f"backbone {default.name!r}: in_channels={arch['in_channels']} but the input contract names "
            f"{len(config.input.lead_names)} leads ({', '.join(config.input.lead_names)})"
        )
    model = ECGFM(**arch)
    model.model_config = config.replace(num_features=model.num_features)
    return model


ECG_FM = ecg_fm_config("ecg-fm")
ECG_FM_TINY = ecg_fm_config(
    "ecg-fm-tiny",
    conv_layers=[[32, 2, 2]] * 4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_pos=8,
    conv_pos_groups=4,
)


@BACKBONES.register("ecg-fm")
def ecg_fm(input: InputContract | None = None, **options: Any) -> ECGFM:
    """ECG-FM's published encoder (90.9 M parameters): load ``mimic_iv_ecg_physionet_pretrained.pt`` into it."""
    return build_ecg_fm(ECG_FM, input, **options)


@BACKBONES.register("ecg-fm-tiny")
def ecg_fm_tiny(input: InputContract | None = None, **options: Any) -> ECGFM:
    """A ~28 k-parameter ECG-FM with the same structure and strides, for tests and CPU demos."""
    return build_ecg_fm(ECG_FM_TINY, input, **options)


for _factory in (ecg_fm, ecg_fm_tiny):
    _factory.options = (*ECG_FM_ARCHITECTURE, "lead_names", "input")  # what `ecgfm list backbones` shows
