"""ECGFounder's Net1D (a RegNet-style 1-D CNN), module for module, so its published state_dicts load strictly."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ecgfm.backbones.checkpoint import load_state_dict_file, load_strict
from ecgfm.backbones.config import ContractError, InputContract, ModelConfig
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES, parse_leads
from ecgfm.registry import BACKBONES
from ecgfm.signal import ECGFounderPreprocessing


def _same_padding(length: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow-style SAME padding: out = ceil(L / stride); the odd sample goes to the right."""
    out_len = (length + stride - 1) // stride
    pad = max(0, (out_len - 1) * stride + kernel_size - length)
    return pad // 2, pad - pad // 2


class MyConv1dPadSame(nn.Module):
    """Conv1d with SAME padding (the name is ECGFounder's; state_dict keys end in ``.conv.weight``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int = 1):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        left, right = _same_padding(x.shape[-1], self.kernel_size, self.stride)
        return self.conv(F.pad(x, (left, right)))


class MyMaxPool1dPadSame(nn.Module):
    """MaxPool1d(kernel) after SAME padding computed with stride 1 (so kernel 2 pads one zero on the right)."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.max_pool = nn.MaxPool1d(kernel_size=kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        left, right = _same_padding(x.shape[-1], self.kernel_size, 1)
        return self.max_pool(F.pad(x, (left, right)))


class Swish(nn.Module):
    """x * sigmoid(x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability ``p`` and scale the kept
    ones by ``1 / (1 - p)``, so that eval needs no rescaling (Huang et al. 2016; timm's ``DropPath``)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class BasicBlock(nn.Module):
    """Pre-activation bottleneck (1x1, grouped kxk, 1x1) with squeeze-excitation and a padded identity.

    ``drop_path`` > 0 adds stochastic depth on the residual branch (no module at 0, so ECGFounder's stays as it is).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ratio: float,
        kernel_size: int,
        stride: int,
        groups: int,
        downsample: bool,
        is_first_block: bool = False,
        use_bn: bool = True,
        use_do: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.downsample = downsample
        self.is_first_block = is_first_block
        self.use_bn = use_bn
        self.use_do = use_do
        middle = int(out_channels * ratio)

        self.bn1 = nn.BatchNorm1d(in_channels)
        self.activation1 = Swish()
        self.do1 = nn.Dropout(p=0.5)
        self.conv1 = MyConv1dPadSame(in_channels, middle, kernel_size=1, stride=1)

        self.bn2 = nn.BatchNorm1d(middle)
        self.activation2 = Swish()
        self.do2 = nn.Dropout(p=0.5)
        self.conv2 = MyConv1dPadSame(middle, middle, kernel_size=kernel_size, stride=stride, groups=groups)

        self.bn3 = nn.BatchNorm1d(middle)
        self.activation3 = Swish()
        self.do3 = nn.Dropout(p=0.5)
        self.conv3 = MyConv1dPadSame(middle, out_channels, kernel_size=1, stride=1)

        self.se_fc1 = nn.Linear(out_channels, out_channels // 2)
        self.se_fc2 = nn.Linear(out_channels // 2, out_channels)
        self.se_activation = Swish()

        if downsample:
            self.max_pool = MyMaxPool1dPadSame(kernel_size=stride)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def _pre(self, x: Tensor, bn: nn.Module, act: nn.Module, do: nn.Module) -> Tensor:
        if self.use_bn:
            x = bn(x)
        x = act(x)
        return do(x) if self.use_do else x

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = x if self.is_first_block else self._pre(x, self.bn1, self.activation1, self.do1)
        out = self.conv1(out)
        out = self.conv2(self._pre(out, self.bn2, self.activation2, self.do2))
        out = self.conv3(self._pre(out, self.bn3, self.activation3, self.do3))

        se = self.se_fc2(self.se_activation(self.se_fc1(out.mean(-1))))
        out = out * torch.sigmoid(se).unsqueeze(-1)
        if self.drop_path is not None:
            out = self.drop_path(out)

        if self.downsample:
            identity = self.max_pool(identity)
        if self.out_channels != self.in_channels:
            front = (self.out_channels - self.in_channels) // 2
            back = self.out_channels - self.in_channels - front
            identity = F.pad(identity, (0, 0, front, back))
        return out + identity


class BasicStage(nn.Module):
    """A run of blocks; the first one downsamples (stride) and changes the channel count.

    ``drop_path`` holds each block's stochastic-depth rate (one number: the same for all).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ratio: float,
        kernel_size: int,
        stride: int,
        groups: int,
        i_stage: int,
        m_blocks: int,
        use_bn: bool = True,
        use_do: bool = True,
        drop_path: float | Sequence[float] = 0.0,
    ):
        super().__init__()
        rates = [float(drop_path)] * m_blocks if isinstance(drop_path, (int, float)) else list(drop_path)
        if len(rates) != m_blocks:
            raise ValueError(f"drop_path has {len(rates)} rates for {m_blocks} blocks")
        self.block_list = nn.ModuleList(
            BasicBlock(
                in_channels=in_channels if i_block == 0 else out_channels,
                out_channels=out_channels,
                ratio=ratio,
                kernel_size=kernel_size,
                stride=stride if i_block == 0 else 1,
                groups=groups,
                downsample=i_block == 0,
                is_first_block=i_stage == 0 and i_block == 0,
                use_bn=use_bn,
                use_do=use_do,
                drop_path=rates[i_block],
            )
            for i_block in range(m_blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block_list:
            x = block(x)
        return x


class Net1D(nn.Module):
    """ECGFounder's backbone. ``forward`` gives logits, ``forward_features`` the time-averaged features.

    The argument names are ECGFounder's, so its constructor calls work unchanged. A registered Net1D (built by
    ``create_backbone``) also carries its ``model_config``. ``drop_path`` (not ECGFounder's; default 0, off) is the
    stochastic-depth rate of the last block, rising linearly from 0 at the first block over all blocks.
    """

    def __init__(
        self,
        in_channels: int = 12,
        base_filters: int = 64,
        ratio: float = 1,
        filter_list: list[int] | tuple[int, ...] = (64, 160, 160, 400, 400, 1024, 1024),
        m_blocks_list: list[int] | tuple[int, ...] = (2, 2, 2, 3, 3, 4, 4),
        kernel_size: int = 16,
        stride: int = 2,
        groups_width: int = 16,
        n_classes: int = 150,
        use_bn: bool = False,
        use_do: bool = False,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if len(filter_list) != len(m_blocks_list):
            raise ValueError(f"filter_list {filter_list} and m_blocks_list {m_blocks_list} differ in length")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        n_blocks = sum(m_blocks_list)
        rates = [drop_path * i / max(1, n_blocks - 1) for i in range(n_blocks)]  # linear over depth, 0 first
        self.use_bn = use_bn
        self.first_conv = MyConv1dPadSame(in_channels, base_filters, kernel_size=kernel_size, stride=2)
        self.first_bn = nn.BatchNorm1d(base_filters)
        self.first_activation = Swish()
        self.stage_list = nn.ModuleList()
        channels = base_filters
        for i_stage, (out_channels, m_blocks) in enumerate(zip(filter_list, m_blocks_list, strict=True)):
            self.stage_list.append(
                BasicStage(
                    in_channels=channels,
                    out_channels=out_channels,
                    ratio=ratio,
                    kernel_size=kernel_size,
                    stride=stride,
                    groups=out_channels // groups_width,
                    i_stage=i_stage,
                    m_blocks=m_blocks,
                    use_bn=use_bn,
                    use_do=use_do,
                    drop_path=rates[sum(m_blocks_list[:i_stage]) : sum(m_blocks_list[: i_stage + 1])],
                )
            )
            channels = out_channels
        self.num_features = channels
        self.dense = nn.Linear(channels, n_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, in_channels, T] -> [B, num_features], the mean over time of the last stage."""
        out = self.first_conv(x)
        if self.use_bn:
            out = self.first_bn(out)
        out = self.first_activation(out)
        for stage in self.stage_list:
            out = stage(out)
        return out.mean(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(self.forward_features(x))

    def parameters_unused_by_features(self) -> list[nn.Parameter]:
        """Weights that :meth:`forward_features` never reads: the classifier ``dense`` and, with ``use_bn=False``
        (ECGFounder's setting), every BatchNorm. They stay so released checkpoints load strictly; a task freezes
        them, so DDP finds no parameter without a gradient."""
        unused = list(self.dense.parameters())
        if not self.use_bn:
            unused += [p for m in self.modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters()]
        return unused

    def load_pretrained(
        self, path: Path, state_filter: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    ) -> None:
        """Load an ECGFounder-format checkpoint strictly; its head is dropped only when its shape differs.

        ``state_filter`` runs after :func:`checkpoint_filter_fn`, e.g. a lead adapter folding the 12-lead first
        convolution into the k leads this model reads.
        """
        state = checkpoint_filter_fn(load_state_dict_file(path))
        if state_filter is not None:
            state = state_filter(state)
        head = state.get("dense.weight")
        new_head = head is not None and tuple(head.shape) != tuple(self.dense.weight.shape)
        if new_head:
            state = {k: v for k, v in state.items() if not k.startswith("dense.")}
        load_strict(self, state, source=path, allow_missing=("dense.",) if new_head else ())


def checkpoint_filter_fn(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adapt a foreign state_dict: strip the ``module.``/``model.``/``backbone.`` prefixes wrappers add.

    An ecgfm FineTuneTask checkpoint (``backbone.*`` beside ``heads.*``) gives its backbone only, so a fine-tuned
    model (e.g. a 12-lead teacher) can start another: its heads and lead adapter are left out.
    """
    if any(k.startswith("backbone.") for k in state_dict) and any(k.startswith("heads.") for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "model.", "backbone.", "net."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


#: Net1D's constructor arguments with ECGFounder's values: a registered config overrides some of them.
NET1D_ARCHITECTURE: dict[str, Any] = {
    "in_channels": 12,
    "base_filters": 64,
    "ratio": 1,
    "filter_list": [64, 160, 160, 400, 400, 1024, 1024],
    "m_blocks_list": [2, 2, 2, 3, 3, 4, 4],
    "kernel_size": 16,
    "stride": 2,
    "groups_width": 16,
    "n_classes": 150,
    "use_bn": False,
    "use_do": False,
}


def ecgfounder_input(lead_names: tuple[str, ...] = STANDARD_LEADS) -> InputContract:
    """ECGFounder's input: 10 s at 500 Hz in mV through its filter chain (every parameter written out)."""
    chain = ECGFounderPreprocessing(fs=STANDARD_FS).config()
    return InputContract(STANDARD_FS, STANDARD_N_SAMPLES, lead_names, "mV", chain)


def net1d_config(name: str, lead_names: tuple[str, ...] = STANDARD_LEADS, **architecture: Any) -> ModelConfig:
    """The model config of a registered Net1D: ECGFounder's architecture with ``architecture`` changed."""
    arch = {**NET1D_ARCHITECTURE, **architecture, "in_channels": len(lead_names)}
    n_stages = len(arch["filter_list"])
    return ModelConfig(
        name=name,
        architecture=arch,
        input=ecgfounder_input(lead_names),
        num_features=int(arch["filter_list"][-1]),
        first_conv="first_conv.conv",
        classifier="dense",
        blocks=("first_conv", *(f"stage_list.{i}" for i in range(n_stages))),
    )


def build_net1d(default: ModelConfig, input: InputContract | Mapping[str, Any] | None = None, **options: Any) -> Net1D:
    """A Net1D from its registered config, with architecture ``options`` and an ``input`` contract changed.

    ``lead_names=("I",)`` is a shortcut for an input contract with those leads (and as many input channels).
    ``drop_path`` (stochastic depth) enters the model config only when it is not 0, so that configs stored before
    the option existed rebuild exactly.
    """
    contract = default.input if input is None else input
    if isinstance(contract, Mapping):
        contract = InputContract.from_dict(contract)
    lead_names = options.pop("lead_names", None)
    drop_path = float(options.pop("drop_path", 0.0))
    if lead_names is not None:
        contract = dataclasses.replace(contract, lead_names=parse_leads(lead_names))
    options.setdefault("in_channels", len(contract.lead_names))  # one input channel per lead unless told
    config = default.with_options(contract, **options)
    if drop_path:
        config = config.replace(architecture={**config.architecture, "drop_path": drop_path})
    arch = config.architecture
    if arch["in_channels"] != len(config.input.lead_names):
        raise ContractError(
            f"backbone {default.name!r}: in_channels={arch['in_channels']} but the input contract names "
            f"{len(config.input.lead_names)} leads ({', '.join(config.input.lead_names)})"
        )
    model = Net1D(**arch)
    model.model_config = config.replace(num_features=model.num_features)
    return model


ECGFOUNDER_12LEAD = net1d_config("ecgfounder-12lead")
ECGFOUNDER_1LEAD = net1d_config("ecgfounder-1lead", lead_names=("I",))
NET1D_SMALL = net1d_config(
    "net1d-small", base_filters=32, filter_list=[32, 64, 64, 128, 128], m_blocks_list=[1, 1, 1, 1, 1]
)
NET1D_TINY = net1d_config("net1d-tiny", base_filters=16, filter_list=[16, 32], m_blocks_list=[1, 1], kernel_size=8)


@BACKBONES.register("ecgfounder-12lead")
def ecgfounder_12lead(input: InputContract | None = None, **options: Any) -> Net1D:
    """ECGFounder's released 12-lead Net1D (30.8 M parameters, 150 labels)."""
    return build_net1d(ECGFOUNDER_12LEAD, input, **options)


@BACKBONES.register("ecgfounder-1lead")
def ecgfounder_1lead(input: InputContract | None = None, **options: Any) -> Net1D:
    """ECGFounder's released single-lead Net1D: lead I only."""
    return build_net1d(ECGFOUNDER_1LEAD, input, **options)


@BACKBONES.register("net1d-small")
def net1d_small(input: InputContract | None = None, **options: Any) -> Net1D:
    """A ~0.25 M-parameter Net1D with the same structure, for CPU demos and fine-tuning from scratch."""
    return build_net1d(NET1D_SMALL, input, **options)


@BACKBONES.register("net1d-tiny")
def net1d_tiny(input: InputContract | None = None, **options: Any) -> Net1D:
    """A few-thousand-parameter Net1D for unit tests."""
    return build_net1d(NET1D_TINY, input, **options)


for _factory in (ecgfounder_12lead, ecgfounder_1lead, net1d_small, net1d_tiny):
    _factory.options = (*NET1D_ARCHITECTURE, "drop_path", "lead_names", "input")  # what `ecgfm list backbones` shows
