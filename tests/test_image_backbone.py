"""ECG images through timm: the device renderer against a golden page and an independent matplotlib drawing, its
geometry (25 mm/s, 10 mm/mV), and the ``image-*`` backbones: training, timm weights from a file or the HF cache."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import ecgfm.backbones.image as image  # registers the image-* backbones until ecgfm.backbones imports it
from ecgfm.backbones import CheckpointError, create_backbone
from ecgfm.ecg_paper import LAYOUT, RHYTHM_LEAD, PaperECG
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden" / "paper-ecg-E07500-4ppm.png"
RECORD = REPO / "tests" / "data" / "cinc2021" / "E07500"
PPM = 4.0


def record_mv() -> torch.Tensor:
    """E07500 in mV [1, 12, 5000], each lead less its median (the golden page's input)."""
    signal = torch.from_numpy(SOURCES.create("challenge").read(RECORD).signal)[None]
    return signal - signal.median(-1, keepdim=True).values


def render_golden() -> np.ndarray:
    """The page the golden PNG holds: [H, W, 3] in [0, 1]."""
    with torch.no_grad():
        return PaperECG(pixels_per_mm=PPM)(record_mv())[0].permute(1, 2, 0).numpy()


def write_golden() -> None:
    """Regenerate the golden page after a deliberate change to the renderer (run by hand, not a test)."""
    import matplotlib.pyplot as plt

    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(GOLDEN, render_golden())


# ------------------------------------------------------------------------------------------------ the renderer


def test_the_renderer_draws_a_real_record_as_the_golden_page():
    import matplotlib.image

    golden = matplotlib.image.imread(GOLDEN)[..., :3]  # RGBA in [0, 1]
    page = render_golden()
    assert page.shape == golden.shape == (520, 1040, 3)
    diff = np.abs(page - golden)
    assert diff.mean() < 0.01
    assert (diff <= 1.5 / 255).mean() > 0.995


def _matplotlib_traces(paper: PaperECG, x: torch.Tensor) -> np.ndarray:
    """Dark-pixel mask of the same layout drawn by matplotlib's Agg lines, clipped to the row bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    H, W, m, band, ppm = paper.height, paper.width, paper.margin_px, paper.band_px, paper.pixels_per_mm
    dpi = 100
    fig = plt.figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.axis("off")
    signal = x[0].numpy()
    t = np.arange(signal.shape[-1]) / paper.fs
    panels = [(r, k, lead) for r, row in enumerate(LAYOUT) for k, lead in enumerate(row)] + [(3, None, RHYTHM_LEAD)]
    for row, column, lead in panels:
        keep = slice(None) if column is None else (t >= 2.5 * column) & (t < 2.5 * (column + 1))
        top = m + row * band
        xs = m + t[keep] * 25 * ppm
        ys = top + paper.baseline * band - signal[STANDARD_LEADS.index(lead)][keep] * 10 * ppm
        (line,) = ax.plot(xs, ys, color="black", linewidth=2 * paper.half_width_px * 72 / dpi, antialiased=True)
        line.set_clip_path(Rectangle((0, top), W, band, transform=ax.transData))
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3].mean(-1) / 255
    plt.close(fig)
    return rgba < 0.5


def _dilate(mask: np.ndarray) -> torch.Tensor:
    return F.max_pool2d(torch.from_numpy(mask).float()[None, None], 3, 1, 1)[0, 0] > 0


def test_the_page_matches_an_independent_matplotlib_drawing():
    paper = PaperECG(pixels_per_mm=PPM, grid=False)
    x = record_mv()
    with torch.no_grad():
        ours = paper.traces(x)[0].numpy() > 0.5
    theirs = _matplotlib_traces(paper, x)
    a, b = _dilate(ours), _dilate(theirs)
    iou = (a & b).sum().item() / (a | b).sum().item()
    assert iou > 0.6, iou


def _flat(value_others: float = 100.0) -> torch.Tensor:
    """Lead I and II at 0 mV, every other lead far outside its band (so it draws nothing)."""
    x = torch.full((1, 12, 5000), value_others)
    x[:, STANDARD_LEADS.index("I")] = 0
    x[:, STANDARD_LEADS.index("II")] = 0
    return x


def _band(paper: PaperECG, ink: torch.Tensor, row: int) -> torch.Tensor:
    top = paper.margin_px + row * paper.band_px
    return ink[0, top : top + paper.band_px]


@pytest.mark.parametrize("ppm", [2.0, 4.0])
def test_25_mm_per_s_and_10_mm_per_mv(ppm):
    paper = PaperECG(pixels_per_mm=ppm, grid=False)
    x = _flat()
    x[0, 0, 625:1250] = 1.0  # lead I steps up by 1 mV at 1.25 s
    ink = paper.traces(x)
    row0 = _band(paper, ink, 0)
    columns = (row0.sum(0) > 0.5).nonzero().flatten()  # a column's ink adds up to the line's width
    assert abs(len(columns) - 62.5 * ppm) <= 1  # 2.5 s of lead I = 62.5 mm; the other panels are empty
    assert columns[0].item() == paper.margin_px
    rows = torch.arange(paper.band_px, dtype=torch.float32)[:, None]

    def level(col: int) -> float:  # the ink's centre row in one pixel column
        weight = row0[:, col]
        return (weight[:, None] * rows).sum().item() / weight.sum().item()

    before, after = paper.margin_px + round(0.6 * 25 * ppm), paper.margin_px + round(1.9 * 25 * ppm)
    assert level(before) - level(after) == pytest.approx(10 * ppm, abs=0.01)  # up the page by 10 mm
    rhythm = (_band(paper, ink, 3).sum(0) > 0.5).nonzero().flatten()
    assert abs(len(rhythm) - 250 * ppm) <= 1 and rhythm[0].item() == paper.margin_px


def test_the_renderer_is_batched_differentiable_and_float32_on_the_input_device():
    paper = PaperECG(pixels_per_mm=1.0)
    x = record_mv().repeat(3, 1, 1).double()
    x[1] *= -1
    x.requires_grad_(True)
    page = paper(x)
    assert page.dtype == torch.float32 and page.device == x.device and page.shape == (3, 3, 130, 260)
    torch.testing.assert_close(page[1:2], paper(x[1:2].detach()))  # each page depends on its own record only
    page.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert 0 <= page.min() and page.max() <= 1


def test_traces_are_clipped_to_their_band_and_a_zero_lead_draws_a_flat_line():
    paper = PaperECG(pixels_per_mm=1.0, grid=False)
    x = torch.zeros(1, 12, 5000)
    x[:, STANDARD_LEADS.index("V4")] = 50.0  # far above its band: only the band's top row may be touched
    ink = paper.traces(x)
    assert ink[0, : paper.margin_px].sum() == 0 and ink[0, -paper.margin_px :].sum() == 0
    row0 = _band(paper, ink, 0)
    baseline = int(paper.baseline * paper.band_px)
    assert (row0[baseline - 1 : baseline + 1].sum(0)[paper.margin_px : paper.margin_px + 185] > 0.5).all()


# ------------------------------------------------------------------------------------------------ the backbones


def _batch(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "signal": torch.randint(-900, 900, (n, 12, 5000), generator=g, dtype=torch.int16),
        "lead_mask": torch.ones(n, 12, dtype=torch.bool),
        "targets": {"dx": torch.randint(0, 2, (n, 2), generator=g).float()},
        "target_masks": {"dx": torch.ones(n, 2, dtype=torch.bool)},
    }


def test_an_image_backbone_fine_tunes_on_int16_batches():
    from ecgfm.tasks import FineTuneTask

    task = FineTuneTask(backbone="image-tiny", heads=[{"kind": "multilabel", "name": "dx", "labels": ["AF", "SR"]}])
    assert task.hparams["preprocessing"]["zscore"] is False  # the page draws millivolts
    batch = _batch()
    out = task(batch["signal"], batch["lead_mask"])
    assert out["dx"].shape == (2, 2) and torch.isfinite(out["dx"]).all()
    loss = task.heads["dx"].loss(out["dx"], batch["targets"]["dx"], batch["target_masks"]["dx"])
    loss.backward()
    assert task.backbone.model.conv1[0].weight.grad is not None
    assert not task.backbone.classifier.weight.requires_grad and not task.backbone.leads.weight.requires_grad


def _timm_reference(tmp_path: Path, suffix: str) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(1)
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    path = tmp_path / f"test_resnet{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference.state_dict(), path)
    return reference, path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_timm_weight_file_loads_and_gives_timms_own_features(tmp_path, suffix):
    reference, path = _timm_reference(tmp_path, suffix)
    model = create_backbone("image-tiny", pretrained=path).eval()
    x = record_mv()
    with torch.no_grad():
        page = (model.render(x) - model.mean) / model.std
        expected = reference.forward_head(reference.forward_features(page), pre_logits=True)
        torch.testing.assert_close(model.forward_features(x), expected)
        torch.testing.assert_close(model(x), reference(page))  # timm's 2-class head fits the classifier


def test_a_timm_file_with_a_missing_or_unexpected_key_fails_naming_it(tmp_path):
    from safetensors.torch import save_file

    reference, _ = _timm_reference(tmp_path, ".pth")
    state = reference.state_dict()
    missing = {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.layer1\.0\.conv1\.weight"):
        create_backbone("image-tiny", pretrained=tmp_path / "missing.safetensors")
    save_file({**state, "extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): model\.extra\.weight"):
        create_backbone("image-tiny", pretrained=tmp_path / "extra.safetensors")
    # timm's 1000-class head does not fit a 2-class classifier: it is dropped, the features still load
    big = timm.create_model("test_resnet", pretrained=False).state_dict()
    save_file(big, str(tmp_path / "in1k.safetensors"))
    create_backbone("image-tiny", pretrained=tmp_path / "in1k.safetensors")


def test_hf_hub_names_resolve_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="never downloads"):
        create_backbone("image-tiny", pretrained="hf_hub:timm/test_resnet.r160_in1k")
    reference, path = _timm_reference(tmp_path, ".safetensors")
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    path.rename(repo / "snapshots" / "abc123" / "model.safetensors")
    model = create_backbone("image-tiny", pretrained="hf_hub:timm/test_resnet.r160_in1k")
    torch.testing.assert_close(model.model.conv1[0].weight, reference.conv1[0].weight)


def test_spatial_attention_after_each_stage_starts_as_the_identity_and_survives_a_copy():
    plain = create_backbone("image-tiny").eval()
    attended = create_backbone("image-tiny", spatial_attention=True).eval()
    assert len(attended.attention) == len(attended.stages) == 4  # layer1..layer4
    attended.load_state_dict(plain.state_dict(), strict=False)
    x = record_mv()
    with torch.no_grad():
        torch.testing.assert_close(attended.forward_features(x), plain.forward_features(x))
        twin = copy.deepcopy(attended)
        for block in twin.attention:
            block.conv.weight.fill_(1.0)
        torch.testing.assert_close(attended.forward_features(x), plain.forward_features(x))  # the original's hooks
        assert not torch.allclose(twin.forward_features(x), plain.forward_features(x))  # the copy's own blocks


def test_a_lead_subset_places_its_leads_and_leaves_the_rest_flat():
    model = create_backbone("image-tiny", lead_names=("II", "V1"))
    assert model.model_config.architecture["in_channels"] == 2
    x = torch.zeros(1, 2, 5000)
    x[:, 0] = 1.0
    placed = model.leads(x)
    assert placed[0, STANDARD_LEADS.index("II")].eq(1).all() and placed[0].abs().sum() == 5000


def test_the_image_recipe_fine_tunes_one_batch(ludb_shards, tmp_path):
    from ecgfm.commands import main

    recipe = REPO / "recipes" / "backbones" / "image-resnet18.yaml"
    argv = ["fit", "--config", str(recipe), f"--data.root={ludb_shards}", f"--trainer.default_root_dir={tmp_path}"]
    argv += [f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.enable_progress_bar=false"]
    argv += ["--trainer.fast_dev_run=true", "--data.batch_size=2"]
    assert main(argv) == 0
    assert image.IMAGE_RESNET18.architecture["pixels_per_mm"] == 2.0
