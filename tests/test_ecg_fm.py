"""ECG-FM: a fairseq-signals checkpoint dict loads strictly and gives the features of an independent re-implementation
of fairseq-signals' forward pass; wrong keys and unsafe pickles are refused; lead adapters and the recipe work."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import ecgfm.backbones.ecg_fm  # noqa: F401  (registers ecg-fm, ecg-fm-tiny until the package imports it)
from ecgfm.backbones import CheckpointError, create_backbone
from ecgfm.backbones.ecg_fm import ECG_FM_TINY
from ecgfm.tasks import FineTuneTask

REPO = Path(__file__).resolve().parents[1]

#: fairseq-signals' model cfg for ecg-fm-tiny, as its trainer stores it (a plain dict, as weights_only reads it)
TINY_CFG = {
    "_name": "wav2vec2_cmsc",
    "conv_feature_layers": "[(32, 2, 2)] * 4",
    "in_d": 12,
    "extractor_mode": "default",
    "encoder_embed_dim": 32,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_embed_dim": 64,
    "conv_pos": 8,
    "conv_pos_groups": 4,
}


# ------------------------------------------------------------------------------------------------ fairseq layout
def fairseq_state(cfg: dict, seed: int = 0, weight_norm: str = "new") -> dict[str, Tensor]:
    """Random weights under fairseq-signals' ``wav2vec2_cmsc`` names and shapes (written from its source)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.2, offset: float = 0.0) -> Tensor:
        return offset + scale * torch.randn(*shape, generator=g)

    dim, c_in, d = 32, cfg["in_d"], cfg["encoder_embed_dim"]
    k, groups, ffn = cfg["conv_pos"], cfg["conv_pos_groups"], cfg["encoder_ffn_embed_dim"]
    s: dict[str, Tensor] = {}
    for i in range(4):
        s[f"feature_extractor.conv_layers.{i}.0.weight"] = rnd(dim, c_in if i == 0 else dim, 2, scale=0.5)
    s["feature_extractor.conv_layers.0.2.weight"] = rnd(dim, offset=1.0)
    s["feature_extractor.conv_layers.0.2.bias"] = rnd(dim)
    s["layer_norm.weight"], s["layer_norm.bias"] = rnd(dim, offset=1.0), rnd(dim)
    s["post_extract_proj.weight"], s["post_extract_proj.bias"] = rnd(d, dim), rnd(d)
    g_name, v_name = ("weight_g", "weight_v") if weight_norm == "old" else ("parametrizations.weight.original0",) * 2
    if weight_norm == "new":
        v_name = "parametrizations.weight.original1"
    s[f"conv_pos.pos_conv.0.{g_name}"] = rnd(1, 1, k, scale=0.3, offset=1.0)
    s[f"conv_pos.pos_conv.0.{v_name}"] = rnd(d, d // groups, k)
    s["conv_pos.pos_conv.0.bias"] = rnd(d)
    for n in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[p + f"self_attn.{proj}.weight"], s[p + f"self_attn.{proj}.bias"] = rnd(d, d), rnd(d)
        s[p + "self_attn_layer_norm.weight"], s[p + "self_attn_layer_norm.bias"] = rnd(d, offset=1.0), rnd(d)
        s[p + "fc1.weight"], s[p + "fc1.bias"] = rnd(ffn, d), rnd(ffn)
        s[p + "fc2.weight"], s[p + "fc2.bias"] = rnd(d, ffn), rnd(d)
        s[p + "final_layer_norm.weight"], s[p + "final_layer_norm.bias"] = rnd(d, offset=1.0), rnd(d)
    s["encoder.layer_norm.weight"], s["encoder.layer_norm.bias"] = rnd(d, offset=1.0), rnd(d)
    return s


def pretrained_checkpoint(state: dict[str, Tensor]) -> dict:
    """A pretraining trainer dict: encoder keys at top level beside wav2vec 2.0's pretraining heads."""
    d = TINY_CFG["encoder_embed_dim"]
    extra = {
        "mask_emb": torch.rand(d),
        "quantizer.vars": torch.randn(1, 8, 16),
        "quantizer.weight_proj.weight": torch.randn(8, 32),
        "quantizer.weight_proj.bias": torch.randn(8),
        "project_q.weight": torch.randn(16, 16),
        "project_q.bias": torch.randn(16),
        "final_proj.weight": torch.randn(16, d),
        "final_proj.bias": torch.randn(16),
    }
    return {"cfg": {"model": TINY_CFG}, "model": {**state, **extra}, "optimizer_history": [], "extra_state": {}}


def finetuned_checkpoint(state: dict[str, Tensor], num_labels: int = 5) -> dict:
    """A fine-tuned (classifier) trainer dict: every encoder key under ``encoder.``, the head ``proj`` beside."""
    d = TINY_CFG["encoder_embed_dim"]
    model = {f"encoder.{k}": v for k, v in state.items()}
    model["proj.weight"], model["proj.bias"] = torch.randn(num_labels, d), torch.randn(num_labels)
    return {"cfg": {"model": {**TINY_CFG, "_name": "ecg_transformer_classifier"}}, "model": model, "criterion": None}


# ------------------------------------------------------------------------------------------------ reference forward
def _weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """torch's weight_norm with dim=2: v scaled per kernel tap k by g[k] / ||v[:, :, k]||."""
    return g * v / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()


def reference_features(s: dict[str, Tensor], cfg: dict, x: Tensor) -> Tensor:
    """fairseq-signals' ECGTransformerModel in eval mode, then the classifier's time mean: [N, 12, T] -> [N, D]."""
    for i in range(4):  # ConvFeatureExtraction, mode "default": conv -> (GroupNorm on layer 0) -> GELU
        x = F.conv1d(x, s[f"feature_extractor.conv_layers.{i}.0.weight"], stride=2)
        if i == 0:
            w, b = s["feature_extractor.conv_layers.0.2.weight"], s["feature_extractor.conv_layers.0.2.bias"]
            x = F.group_norm(x, x.shape[1], w, b, eps=1e-5)
        x = F.gelu(x)
    x = x.transpose(1, 2)  # B x T x C
    x = F.layer_norm(x, x.shape[-1:], s["layer_norm.weight"], s["layer_norm.bias"], eps=1e-5)
    x = F.linear(x, s["post_extract_proj.weight"], s["post_extract_proj.bias"])
    pre = "conv_pos.pos_conv.0."
    gk = pre + ("weight_g" if pre + "weight_g" in s else "parametrizations.weight.original0")
    vk = pre + ("weight_v" if pre + "weight_v" in s else "parametrizations.weight.original1")
    k = cfg["conv_pos"]
    pos = F.conv1d(
        x.transpose(1, 2), _weight_norm(s[gk], s[vk]), s[pre + "bias"], padding=k // 2, groups=cfg["conv_pos_groups"]
    )
    if k % 2 == 0:
        pos = pos[:, :, :-1]  # SamePad
    x = x + F.gelu(pos).transpose(1, 2)
    d = x.shape[-1]
    x = F.layer_norm(x, (d,), s["encoder.layer_norm.weight"], s["encoder.layer_norm.bias"], eps=1e-5)
    heads = cfg["encoder_attention_heads"]
    for n in range(cfg["encoder_layers"]):  # post-LN TransformerEncoderLayer
        p = f"encoder.layers.{n}."

        def lin(h: Tensor, name: str, p: str = p) -> Tensor:
            return F.linear(h, s[p + name + ".weight"], s[p + name + ".bias"])

        b, t, _ = x.shape
        q = lin(x, "self_attn.q_proj").view(b, t, heads, d // heads).transpose(1, 2)
        kk = lin(x, "self_attn.k_proj").view(b, t, heads, d // heads).transpose(1, 2)
        v = lin(x, "self_attn.v_proj").view(b, t, heads, d // heads).transpose(1, 2)
        attn = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        x = x + lin(attn.transpose(1, 2).reshape(b, t, d), "self_attn.out_proj")
        x = F.layer_norm(x, (d,), s[p + "self_attn_layer_norm.weight"], s[p + "self_attn_layer_norm.bias"], eps=1e-5)
        x = x + lin(F.gelu(lin(x, "fc1")), "fc2")
        x = F.layer_norm(x, (d,), s[p + "final_layer_norm.weight"], s[p + "final_layer_norm.bias"], eps=1e-5)
    return x.mean(dim=1)


def reference_segment(s: dict[str, Tensor], x: Tensor, pooling: str = "mean") -> Tensor:
    """A 10-s segment [B, 12, 5000] as ECG-FM reads it: two 5-s windows, their features pooled."""
    first, second = reference_features(s, TINY_CFG, x[..., :2500]), reference_features(s, TINY_CFG, x[..., 2500:])
    both = torch.stack([first, second], dim=1)
    return both.amax(dim=1) if pooling == "max" else both.mean(dim=1)


@pytest.fixture(scope="module")
def state() -> dict[str, Tensor]:
    return fairseq_state(TINY_CFG)


@pytest.fixture(scope="module")
def segment() -> Tensor:
    return torch.randn(3, 12, 5000, generator=torch.Generator().manual_seed(1))


def _save(obj: dict, path: Path) -> Path:
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("layout", ["finetuned", "pretrained"])
@pytest.mark.parametrize("weight_norm", ["new", "old"])
def test_a_fairseq_checkpoint_gives_the_reference_features(layout, weight_norm, segment, tmp_path):
    state = fairseq_state(TINY_CFG, seed=3, weight_norm=weight_norm)
    ckpt = finetuned_checkpoint(state) if layout == "finetuned" else pretrained_checkpoint(state)
    path = _save(ckpt, tmp_path / "ecg-fm.pt")
    model = create_backbone("ecg-fm-tiny", pretrained=path).eval()
    with torch.no_grad():
        got = model.forward_features(segment)
        want = reference_segment(state, segment)
        window = model.encode(segment[..., :2500]).mean(dim=1)
    assert got.shape == (3, 32)
    assert (got - want).abs().max().item() <= 1e-5
    assert (window - reference_features(state, TINY_CFG, segment[..., :2500])).abs().max().item() <= 1e-5


def test_window_pooling_max_and_a_fine_tuned_head_that_fits(state, segment, tmp_path):
    path = _save(finetuned_checkpoint(state, num_labels=5), tmp_path / "ft.pt")
    model = create_backbone("ecg-fm-tiny", window_pooling="max", n_classes=5, pretrained=path).eval()
    with torch.no_grad():
        assert (model.forward_features(segment) - reference_segment(state, segment, "max")).abs().max() <= 1e-5
    assert torch.equal(model.proj.weight, torch.load(path, weights_only=True)["model"]["proj.weight"])
    other = create_backbone("ecg-fm-tiny", pretrained=path)  # 26 outputs: the 5-label head is not loaded
    assert other.proj.weight.shape == (26, 32)


def test_a_missing_key_fails_naming_it(state, tmp_path):
    broken = dict(state)
    del broken["encoder.layers.1.fc2.weight"]
    path = _save(finetuned_checkpoint(broken), tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"lacks ECG-FM weights \(1, .*\): encoder\.layers\.1\.fc2\.weight"):
        create_backbone("ecg-fm-tiny", pretrained=path)


def test_an_unexpected_or_misshaped_key_fails_naming_it(state, tmp_path):
    path = _save(finetuned_checkpoint({**state, "encoder.layers.2.fc1.weight": torch.zeros(1)}), tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): encoder\.layers\.2\.fc1\.weight"):
        create_backbone("ecg-fm-tiny", pretrained=path)
    wrong = {**state, "post_extract_proj.weight": torch.zeros(32, 16)}
    path = _save(pretrained_checkpoint(wrong), tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"feature_projection\.projection\.weight: checkpoint \(32, 16\)"):
        create_backbone("ecg-fm-tiny", pretrained=path)
    path = _save(pretrained_checkpoint(state), tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match="lacks ECG-FM weights"):  # a 12-layer model reads a 2-layer checkpoint
        create_backbone("ecg-fm-tiny", num_hidden_layers=3, pretrained=path)


UNPICKLED: list[str] = []


def _record(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class FakeDictConfig:
    """Stands for omegaconf's DictConfig in a fairseq cfg: unpickling it would run ``_record``."""

    def __reduce__(self):
        return (_record, ("ran",))


def test_a_checkpoint_pickling_other_objects_is_refused_unread(state, tmp_path):
    path = tmp_path / "omegaconf.pt"
    torch.save({"cfg": FakeDictConfig(), "model": {k: v for k, v in state.items()}}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load .*not on ecgfm's allow-list"):
        create_backbone("ecg-fm-tiny", pretrained=path)
    assert UNPICKLED == []
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"model": FakeDictConfig()}))
    with pytest.raises(CheckpointError, match="refusing to load"):
        create_backbone("ecg-fm-tiny", pretrained=plain)
    assert UNPICKLED == []


# ------------------------------------------------------------------------------------------------ in a task
def _batch(n: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(-900, 900, (n, 12, 5000), generator=g, dtype=torch.int16), torch.ones(n, 12, dtype=bool)


def test_a_task_fine_tunes_ecg_fm_on_int16_batches():
    task = FineTuneTask(backbone="ecg-fm-tiny", heads=[{"kind": "multilabel", "name": "d", "labels": ["a", "b"]}])
    assert task.preprocessing.config() == {"name": "zscore", "eps": 1e-8, "per_lead": True}
    assert not any(p.requires_grad for p in task.backbone.proj.parameters())  # unused by features: frozen for DDP
    signal, mask = _batch()
    out = task(signal, mask)["d"]
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in task.backbone.parameters() if p.requires_grad)


def test_lead_I_with_fold_first_conv_or_zero_fill_reads_the_12_lead_weights(state, tmp_path):
    path = _save(pretrained_checkpoint(state), tmp_path / "ecg-fm.pt")
    heads = [{"kind": "multilabel", "name": "d", "labels": ["a"]}]
    signal, mask = _batch()
    lead_i = signal[:, :1].float() / 1000
    x_i = (lead_i - lead_i.mean(-1, keepdim=True)) / (lead_i.std(-1, unbiased=False, keepdim=True) + 1e-8)
    zero_filled = torch.cat([x_i, torch.zeros(2, 11, 5000)], dim=1)
    want = reference_segment(state, zero_filled)
    for adapter in ("fold_first_conv", "zero_fill"):
        task = FineTuneTask(backbone="ecg-fm-tiny", leads=["I"], adapter=adapter, heads=heads).eval()
        task.backbone.load_pretrained(path, state_filter=task.adapter.adapt_state_dict)
        with torch.no_grad():
            x, _ = task.prepare_signal(signal, mask)  # the data has 12 leads; the task reads lead I
            got = task.backbone.forward_features(x)
        assert x.shape[1] == (1 if adapter == "fold_first_conv" else 12)
        assert (got - want).abs().max().item() <= 1e-5, adapter
    config = FineTuneTask(backbone="ecg-fm-tiny", leads=["I"], adapter="fold_first_conv").backbone.model_config
    assert config.architecture["in_channels"] == 1 and config.input.lead_names == ("I",)
    assert create_backbone(config.to_dict()).model_config == config


def test_the_registered_configs():
    full = create_backbone("ecg-fm")
    encoder = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("proj."))
    assert 90.3e6 < encoder < 90.5e6  # 90.9 M published includes the pretraining quantizer and projections
    assert full.model_config.input.n_samples == 5000 and full.model_config.input.fs == 500
    assert ECG_FM_TINY.num_features == 32
    with torch.no_grad():
        assert full.eval().encode(torch.randn(1, 12, 2500)).shape == (1, 156, 768)


def test_an_ecgfm_checkpoint_round_trips_and_starts_another_model(tmp_path):
    import lightning as L

    L.seed_everything(0)
    heads = [{"kind": "multilabel", "name": "d", "labels": ["a", "b"]}]
    task = FineTuneTask(backbone="ecg-fm-tiny", heads=heads, leads=["I", "II"], adapter="fold_first_conv", lr=1e-2)
    signal, mask = _batch(4)
    batches = [
        {
            "signal": signal,
            "lead_mask": mask,
            "targets": {"d": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])},
            "target_masks": {"d": torch.ones(4, 2, dtype=torch.bool)},
        }
    ] * 2
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    with torch.no_grad():
        before = task.eval()(signal, mask)["d"]
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["ecgfm"]["backbone"]
    assert stored["name"] == "ecg-fm-tiny" and stored["architecture"]["in_channels"] == 12  # native, before the adapter
    reloaded = FineTuneTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(signal, mask)["d"], before)
    # its backbone (backbone.* beside heads.*, ecgfm's own keys) starts another model on the same leads
    other = FineTuneTask(backbone="ecg-fm-tiny", heads=heads, leads=["I", "II"], adapter="fold_first_conv").eval()
    other.backbone.load_pretrained(ckpt, state_filter=other.adapter.adapt_state_dict)
    with torch.no_grad():
        x, _ = task.prepare_signal(signal, mask)
        torch.testing.assert_close(other.backbone.forward_features(x), task.backbone.forward_features(x))


# ------------------------------------------------------------------------------------------------ the recipe
def test_the_recipe_fine_tunes_on_ludb(ludb_shards, tmp_path):
    from ecgfm.commands import main

    code = main(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / "backbones" / "ecg-fm-tiny.yaml"),
            f"--data.root={ludb_shards}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--trainer.enable_progress_bar=false",
            "--trainer.fast_dev_run=true",
        ]
    )
    assert code == 0


@pytest.mark.slow
def test_a_short_real_run_on_ludb_learns(ludb_shards, tmp_path):
    import csv

    from ecgfm.commands import main

    args = ["fit", "--config", str(REPO / "recipes" / "backbones" / "ecg-fm-tiny.yaml"), f"--data.root={ludb_shards}"]
    args += [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    assert main([*args, "--trainer.enable_progress_bar=false", "--trainer.max_epochs=5"]) == 0
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    val = [float(row["val/loss"]) for row in csv.DictReader(metrics.open()) if row.get("val/loss")]
    assert len(val) == 5 and val[-1] < val[0], val
