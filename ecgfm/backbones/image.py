"""ECG images through timm: each ``image-<model>`` backbone draws the batch as a paper ECG on the device
(:class:`~ecgfm.ecg_paper.PaperECG`) and reads the page with a timm image model, optionally with a spatial-attention
block after each stage (EIANet's ResNet50 + SA).

To add another timm model, register one more config at the bottom of this file, e.g.
``IMAGE_CONVNEXT = image_config("image-convnext_tiny", model_name="convnext_tiny")`` and a three-line factory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ecgfm.backbones.checkpoint import CheckpointError, load_state_dict_file, load_strict
from ecgfm.backbones.config import ContractError, InputContract, ModelConfig
from ecgfm.ecg_paper import PaperECG
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES, parse_leads
from ecgfm.registry import BACKBONES
from ecgfm.signal import ECGFounderPreprocessing

HF_HUB_PREFIX = "hf_hub:"


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: channel mean and max -> 7x7 conv -> sigmoid gate on every position.

    The gate is ``2 * sigmoid`` with a zero-initialised conv, so a new block starts as the identity and pretrained
    features pass unchanged until it learns.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * (2 * torch.sigmoid(self.conv(pooled)))

    def hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        """A forward hook applying the block to a timm stage's output (a bound method: deepcopy keeps it paired)."""
        return self(output)


class ImageECG(nn.Module):
    """Paper ECG renderer -> timm image model -> pooled features.

    ``leads`` is a fixed 1x1 Conv1d placing the contract's leads into the 12 slots of the page (a missing lead is
    a flat line); it is the ``first_conv`` a lead adapter resizes. ``classifier`` is a Linear that
    :meth:`forward_features` never reads (timm's own head loads into it when the shapes match).
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        in_channels: int = 12,
        lead_names: tuple[str, ...] = STANDARD_LEADS,
        pixels_per_mm: float = 2.0,
        grid: bool = True,
        row_mm: float = 30.0,
        line_width_mm: float = 0.3,
        spatial_attention: bool = False,
        n_classes: int = 1000,
        image_preprocessing: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from ecgfm.image_preprocessing import create_image_preprocessing

        #: how an image file becomes a page (``ecgfm.image_preprocessing``); rendered signals never go through it
        self.image_preprocessing = create_image_preprocessing(image_preprocessing)
        lead_names = parse_leads(list(lead_names))
        if in_channels != len(lead_names):
            raise ContractError(f"in_channels={in_channels} but the input contract names {len(lead_names)} leads")
        self.leads = nn.Conv1d(in_channels, len(STANDARD_LEADS), 1, bias=False)
        with torch.no_grad():
            self.leads.weight.zero_()
            for i, lead in enumerate(lead_names):
                self.leads.weight[STANDARD_LEADS.index(lead), i, 0] = 1.0
        self.leads.weight.requires_grad_(False)  # millivolts stay millivolts: 10 mm/mV is the page's scale
        self.paper = PaperECG(pixels_per_mm=pixels_per_mm, grid=grid, row_mm=row_mm, line_width_mm=line_width_mm)
        import timm  # on build: registering the configs does not import timm (and torchvision)

        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=3)
        self.num_features = int(self.model.num_features)
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, 3, 1, 1), persistent=False)
        self.timm_classifier = str(cfg.get("classifier") or "head")
        self.stages = [info["module"] for info in self.model.feature_info[1:]]  # after the stem
        self.attention = nn.ModuleList()
        if spatial_attention:
            for name in self.stages:
                block = SpatialAttention()
                self.model.get_submodule(name).register_forward_hook(block.hook)
                self.attention.append(block)
        self.classifier = nn.Linear(self.num_features, n_classes)

    def render(self, x: Tensor) -> Tensor:
        """[B, k, T] mV -> [B, 3, H, W] page in [0, 1]."""
        return self.paper(self.leads(x.float()))

    @property
    def page_size(self) -> tuple[int, int]:
        """``(H, W)`` of the page in pixels: what rendered signals and image files both become."""
        return self.paper.image_size

    def forward_page_features(self, page: Tensor) -> Tensor:
        """[B, 3, H, W] page in [0, 1] (rendered, or an image file through ``image_preprocessing``) -> features."""
        if page.dim() != 4 or tuple(page.shape[1:]) != (3, *self.page_size):
            raise ContractError(
                f"the image backbone reads pages of [batch, 3, {self.page_size[0]}, {self.page_size[1]}] "
                f"(its pixels_per_mm {self.paper.pixels_per_mm:g}); got {tuple(page.shape)}"
            )
        return self.model((page.float() - self.mean) / self.std)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, k, T] mV -> [B, num_features]: timm's pooled features of the normalised page."""
        return self.forward_page_features(self.render(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))

    def parameters_unused_by_features(self) -> list[nn.Parameter]:
        """The classifier (kept so timm's head can load into it); the task freezes it."""
        return list(self.classifier.parameters())

    def load_pretrained(
        self, path: str | Path, state_filter: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    ) -> None:
        """Load a timm checkpoint (``.safetensors``, ``.pth``/``.bin``, or ``hf_hub:timm/<name>`` from the local
        Hugging Face cache, never downloaded) strictly into the image model; its classifier loads only if it fits."""
        file = resolve_timm_weights(path)
        state = load_state_dict_file(file)
        head = {k: v for k, v in state.items() if k.startswith(f"{self.timm_classifier}.")}
        state = {f"model.{k}": v for k, v in state.items() if k not in head}
        fits = {k[len(self.timm_classifier) + 1 :]: v for k, v in head.items()}
        own = self.classifier.state_dict()
        if fits.keys() == own.keys() and all(fits[k].shape == own[k].shape for k in own):
            state.update({f"classifier.{k}": v for k, v in fits.items()})
        if state_filter is not None:
            state = state_filter(state)
        allow = ("leads.", "attention.") + (() if "classifier.weight" in state else ("classifier.",))
        load_strict(self, state, source=file, allow_missing=allow)


def resolve_timm_weights(path: str | Path) -> Path:
    """A local weight file, or ``hf_hub:timm/<name>``'s file in the Hugging Face cache (no download)."""
    text = str(path)
    if not text.startswith(HF_HUB_PREFIX):
        return Path(path)
    repo = text[len(HF_HUB_PREFIX) :]
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id=repo, filename=filename)
        if isinstance(found, str):
            return Path(found)
    raise CheckpointError(
        f"{text}: no model.safetensors or pytorch_model.bin of {repo} in the local Hugging Face cache; ecgfm never "
        f"downloads: fetch it where there is network (huggingface-cli download {repo}) and copy the cache here"
    )


def image_input(lead_names: tuple[str, ...] = STANDARD_LEADS) -> InputContract:
    """10 s at 500 Hz in mV through ECGFounder's notch, band-pass and baseline steps without its z-score: the
    page draws millivolts (10 mm/mV), and a flat baseline keeps each trace inside its row."""
    chain = ECGFounderPreprocessing(fs=STANDARD_FS, zscore=False).config()
    return InputContract(STANDARD_FS, STANDARD_N_SAMPLES, lead_names, "mV", chain)


#: ImageECG's constructor arguments (``lead_names`` comes from the input contract).
IMAGE_ARCHITECTURE: dict[str, Any] = {
    "model_name": "resnet18",
    "in_channels": 12,
    "pixels_per_mm": 2.0,
    "grid": True,
    "row_mm": 30.0,
    "line_width_mm": 0.3,
    "spatial_attention": False,
    "n_classes": 1000,
    "image_preprocessing": {"name": "none"},
}


def image_config(name: str, num_features: int, **architecture: Any) -> ModelConfig:
    """The model config of a registered image backbone."""
    return ModelConfig(
        name=name,
        architecture={**IMAGE_ARCHITECTURE, **architecture},
        input=image_input(),
        num_features=num_features,
        first_conv="leads",
        classifier="classifier",
        blocks=("leads", "model"),
    )


def build_image(default: ModelConfig, input: InputContract | Mapping[str, Any] | None = None, **options: Any):
    """An ImageECG from its registered config with architecture ``options`` and ``input`` changed."""
    contract = default.input if input is None else input
    if isinstance(contract, Mapping):
        contract = InputContract.from_dict(contract)
    lead_names = options.pop("lead_names", None)
    if lead_names is not None:
        contract = dataclasses.replace(contract, lead_names=parse_leads(lead_names))
    options.setdefault("in_channels", len(contract.lead_names))
    if "image_preprocessing" in options:  # spelled out with every parameter, as the model config stores it
        from ecgfm.image_preprocessing import create_image_preprocessing

        options["image_preprocessing"] = create_image_preprocessing(options["image_preprocessing"]).config()
    config = default.with_options(contract, **options)
    model = ImageECG(**config.architecture, lead_names=config.input.lead_names)
    blocks = ("leads", *(f"model.{name}" for name in model.stages))
    model.model_config = config.replace(num_features=model.num_features, blocks=blocks)
    return model


IMAGE_RESNET18 = image_config("image-resnet18", 512, model_name="resnet18")
IMAGE_RESNET50 = image_config("image-resnet50", 2048, model_name="resnet50")
IMAGE_RESNET50_SA = image_config("image-resnet50-sa", 2048, model_name="resnet50", spatial_attention=True)
IMAGE_EFFICIENTNET_B0 = image_config("image-efficientnet_b0", 1280, model_name="efficientnet_b0")
IMAGE_TINY = image_config("image-tiny", 96, model_name="test_resnet", pixels_per_mm=1.0, n_classes=2)


@BACKBONES.register("image-resnet18")
def image_resnet18(input: InputContract | None = None, **options: Any) -> ImageECG:
    """timm's ResNet-18 reading a paper-ECG page drawn on the device (11 M parameters)."""
    return build_image(IMAGE_RESNET18, input, **options)


@BACKBONES.register("image-resnet50")
def image_resnet50(input: InputContract | None = None, **options: Any) -> ImageECG:
    """timm's ResNet-50 reading a paper-ECG page drawn on the device (24 M parameters)."""
    return build_image(IMAGE_RESNET50, input, **options)


@BACKBONES.register("image-resnet50-sa")
def image_resnet50_sa(input: InputContract | None = None, **options: Any) -> ImageECG:
    """EIANet-style ResNet-50 with a spatial-attention block after each stage, on a paper-ECG page."""
    return build_image(IMAGE_RESNET50_SA, input, **options)


@BACKBONES.register("image-efficientnet_b0")
def image_efficientnet_b0(input: InputContract | None = None, **options: Any) -> ImageECG:
    """timm's EfficientNet-B0 reading a paper-ECG page drawn on the device (4 M parameters)."""
    return build_image(IMAGE_EFFICIENTNET_B0, input, **options)


@BACKBONES.register("image-tiny")
def image_tiny(input: InputContract | None = None, **options: Any) -> ImageECG:
    """timm's 0.4 M-parameter test_resnet on a 1-px/mm page, for unit tests."""
    return build_image(IMAGE_TINY, input, **options)


for _factory in (image_resnet18, image_resnet50, image_resnet50_sa, image_efficientnet_b0, image_tiny):
    _factory.options = (*IMAGE_ARCHITECTURE, "lead_names", "input")  # what `ecgfm list backbones` shows
