"""HuBERT-ECG through transformers.HubertModel: both checkpoint formats load and equal plain transformers, its chain
matches the published preprocessing, and it fine-tunes through ecgfm."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import HubertConfig, HubertModel

import ecgfm.backbones.hubert_ecg  # noqa: F401  (registers hubert-ecg-* until the package imports it)
from ecgfm.backbones import CheckpointError, create_backbone
from ecgfm.backbones.hubert_ecg import HUBERT_ARCHITECTURE, HUBERT_ECG_TINY
from ecgfm.heads import MultiLabelHead
from ecgfm.registry import ADAPTERS, SOURCES
from ecgfm.signal import HuBERTECGPreprocessing, hubert_ecg_preprocess_numpy
from ecgfm.tasks import FineTuneTask

REPO = Path(__file__).resolve().parents[1]


def _their_config(**changes) -> dict:
    """A HuBERT-ECG config.json as their HuBERTECGConfig writes it, at the tiny size, pretrained with masking."""
    arch = {k: v for k, v in HUBERT_ECG_TINY.architecture.items() if k in HUBERT_ARCHITECTURE}
    config = HubertConfig(**{**arch, "mask_time_prob": 0.3, "layerdrop": 0.1}).to_dict()
    config.update(model_type="hubert_ecg", architectures=["HuBERTECG"], ensemble_length=1, vocab_sizes=[100])
    config.update(changes)
    return config


def _reference(config: dict) -> HubertModel:
    """transformers' own HubertModel for a HuBERT-ECG config (their extras dropped), random weights, eval mode."""
    torch.manual_seed(0)
    hf = HubertConfig(**{k: v for k, v in config.items() if k not in ("ensemble_length", "vocab_sizes", "model_type")})
    return HubertModel(hf).eval()


def _their_state(reference: HubertModel, config: dict, old_weight_norm: bool = False) -> dict:
    """Their HuBERTECG state_dict: HubertModel keys plus the pretraining heads, weight norm in either spelling."""
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    proj = config["classifier_proj_size"]
    state["final_proj.0.weight"] = torch.randn(proj, config["hidden_size"])
    state["final_proj.0.bias"] = torch.randn(proj)
    state["label_embedding.0.weight"] = torch.randn(100, proj)
    if old_weight_norm:
        state = {
            k.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v"
            ): v
            for k, v in state.items()
        }
    return state


def _hf_folder(path: Path, config: dict, state: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def _inputs() -> torch.Tensor:
    return torch.randn(3, 6000, generator=torch.Generator().manual_seed(1))


def _assert_equal_to_reference(model, reference: HubertModel) -> None:
    x = _inputs()
    with torch.no_grad():
        ours = model.eval().embed_windows(x)
        theirs = reference(x).last_hidden_state.mean(dim=1)
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("old_weight_norm", [False, True], ids=["parametrizations", "weight_g_v"])
def test_a_hugging_face_folder_loads_without_remote_code_and_equals_transformers(tmp_path, old_weight_norm):
    config = _their_config()
    reference = _reference(config)
    folder = _hf_folder(tmp_path / "hubert-ecg", config, _their_state(reference, config, old_weight_norm))
    model = create_backbone("hubert-ecg-tiny", pretrained=folder)
    _assert_equal_to_reference(model, reference)
    assert not any(k.startswith(("final_proj", "label_embedding")) for k in model.state_dict())
    assert "hubert.masked_spec_embed" not in model.state_dict()  # pretraining's mask vector is dropped


@pytest.mark.parametrize("old_weight_norm", [False, True], ids=["parametrizations", "weight_g_v"])
def test_an_original_pt_loads_and_equals_transformers(tmp_path, old_weight_norm):
    config = _their_config()
    reference = _reference(config)
    path = tmp_path / "hubert_ecg_tiny.pt"
    torch.save({"model_config": config, "model_state_dict": _their_state(reference, config, old_weight_norm)}, path)
    model = create_backbone("hubert-ecg-tiny", pretrained=path)
    _assert_equal_to_reference(model, reference)


def test_their_classification_checkpoint_loads_its_backbone_and_a_matching_classifier(tmp_path):
    config = _their_config()
    reference = _reference(config)
    state = {f"hubert_ecg.{k}": v for k, v in reference.state_dict().items()}
    state["classifier.weight"], state["classifier.bias"] = torch.randn(5, 64), torch.randn(5)
    path = tmp_path / "finetuned.pt"
    torch.save({"model_config": config, "model_state_dict": state}, path)
    model = create_backbone("hubert-ecg-tiny", pretrained=path, num_classes=5)
    _assert_equal_to_reference(model, reference)
    torch.testing.assert_close(model.classifier.weight, state["classifier.weight"])
    other = create_backbone("hubert-ecg-tiny", pretrained=path)  # 2 classes: their 5-class head is not loaded
    assert other.classifier.weight.shape == (2, 64)


def test_a_pickled_config_object_is_refused_saying_what_loads(tmp_path):
    config = _their_config()
    reference = _reference(config)
    path = tmp_path / "pickled.pt"
    hf_config = HubertConfig(**{k: v for k, v in config.items() if k not in ("ensemble_length", "vocab_sizes")})
    torch.save({"model_config": hf_config, "model_state_dict": reference.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"HubertConfig.*Hugging Face folder.*model_config=config.to_dict\(\)"):
        create_backbone("hubert-ecg-tiny", pretrained=path)


def test_missing_unexpected_and_misshaped_keys_fail_naming_them(tmp_path):
    config = _their_config()
    reference = _reference(config)
    state = _their_state(reference, config)
    del state["encoder.layers.1.attention.k_proj.weight"]
    state["encoder.layers.2.attention.k_proj.weight"] = torch.zeros(64, 64)
    folder = _hf_folder(tmp_path / "broken", config, state)
    with pytest.raises(CheckpointError) as info:
        create_backbone("hubert-ecg-tiny", pretrained=folder)
    message = str(info.value)
    assert "missing keys (1): hubert.encoder.layers.1.attention.k_proj.weight" in message
    assert "unexpected keys (1): hubert.encoder.layers.2.attention.k_proj.weight" in message

    state = _their_state(reference, config)
    state["encoder.layer_norm.weight"] = torch.ones(32)
    path = tmp_path / "misshaped.pt"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(
        CheckpointError, match=r"shape mismatches: hubert.encoder.layer_norm.weight: checkpoint \(32,\)"
    ):
        create_backbone("hubert-ecg-tiny", pretrained=path)


def test_a_checkpoint_of_another_size_is_refused_naming_the_fields(tmp_path):
    config = _their_config()
    folder = _hf_folder(tmp_path / "tiny", config, _their_state(_reference(config), config))
    with pytest.raises(CheckpointError, match=r"hidden_size=64 \(model: 512\); num_hidden_layers=2 \(model: 8\)"):
        create_backbone("hubert-ecg-small", pretrained=folder)


def test_the_chain_matches_the_published_preprocessing_on_a_real_record(test_data):
    record = SOURCES.create("challenge").read(sorted((test_data / "cinc2021").glob("*.hea"))[0].with_suffix(""))
    assert record.signal.shape == (12, 5000) and record.fs == 500.0
    expected = hubert_ecg_preprocess_numpy(record.signal)
    chain = HuBERTECGPreprocessing()
    got = chain(torch.from_numpy(record.signal).float()[None], torch.ones(1, 12, dtype=torch.bool))[0].numpy()
    assert got.shape == expected.shape == (12, 1000)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert expected.min() >= -1.1 and expected.max() <= 1.1  # min-max scaled, decimation overshoots a little
    config = chain.config()
    assert (config["fir_taps"], config["band_hz"], config["target_fs"], config["window_s"]) == (
        151,
        [0.05, 47.0],
        100.0,
        5.0,
    )


def test_the_chain_zeroes_absent_leads():
    x = torch.randn(2, 12, 5000)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 3] = False
    out = HuBERTECGPreprocessing()(x * mask.unsqueeze(-1), mask)
    assert out.shape == (2, 12, 1000) and (out[0, 3] == 0).all() and (out[1, 3] != 0).any()


def _task(**kwargs) -> FineTuneTask:
    return FineTuneTask(
        backbone="hubert-ecg-tiny", heads=[MultiLabelHead(name="d", labels=["a", "b"])], lr=1e-3, **kwargs
    )


def test_a_task_runs_on_int16_batches_and_pools_two_windows():
    task = _task().eval()
    assert task.preprocessing.config()["name"] == "hubert_ecg"
    signal = torch.randint(-900, 900, (2, 12, 5000), dtype=torch.int16)
    with torch.no_grad():
        out = task(signal)["d"]
        x, _ = task.prepare_signal(signal, torch.ones(2, 12, dtype=torch.bool))
        windows = [task.backbone.embed_windows(x[:, :, i * 500 : (i + 1) * 500].reshape(2, -1)) for i in (0, 1)]
        features = task.backbone.forward_features(x)
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    torch.testing.assert_close(features, (windows[0] + windows[1]) / 2)
    assert all(not p.requires_grad for p in task.backbone.classifier.parameters())


def test_a_lead_I_model_zero_fills_and_fold_first_conv_is_refused():
    task = _task(leads=["I"], adapter="zero_fill").eval()
    signal = torch.randint(-900, 900, (2, 12, 5000), dtype=torch.int16)
    with torch.no_grad():
        x, mask = task.prepare_signal(signal, torch.ones(2, 12, dtype=torch.bool))
        out = task(signal)["d"]
    assert x.shape == (2, 12, 1000) and (x[:, 1:] == 0).all() and mask[:, 0].all() and not mask[:, 1:].any()
    assert torch.isfinite(out).all()
    with pytest.raises(TypeError, match="fold_first_conv needs hubert.feature_extractor.conv_layers.0.conv"):
        ADAPTERS.create("fold_first_conv", ("I",), create_backbone("hubert-ecg-tiny"))


def test_a_fine_tuned_checkpoint_reloads_exactly(tmp_path):
    L.seed_everything(0)
    task = _task()
    batches = [
        {
            "signal": torch.randint(-900, 900, (2, 12, 5000), dtype=torch.int16),
            "lead_mask": torch.ones(2, 12, dtype=torch.bool),
            "targets": {"d": torch.randint(0, 2, (2, 2)).float()},
            "target_masks": {"d": torch.ones(2, 2, dtype=torch.bool)},
        }
    ]
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    signal = batches[0]["signal"]
    with torch.no_grad():
        before = task.eval()(signal)["d"]
        again = FineTuneTask.load_from_checkpoint(tmp_path / "model.ckpt", map_location="cpu").eval()
        torch.testing.assert_close(again(signal)["d"], before)
    assert again.backbone.model_config == task.backbone.model_config
    # and its backbone starts another model
    backbone = create_backbone("hubert-ecg-tiny", pretrained=tmp_path / "model.ckpt")
    torch.testing.assert_close(
        backbone.hubert.encoder.layer_norm.weight, task.backbone.hubert.encoder.layer_norm.weight
    )


def test_the_recipe_fine_tunes_with_fast_dev_run(ludb_shards, tmp_path):
    from ecgfm.commands import main

    code = main(
        [
            "fit",
            "--config",
            str(REPO / "recipes" / "backbones" / "hubert-ecg-tiny.yaml"),
            f"--data.root={ludb_shards}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--trainer.enable_progress_bar=false",
            "--trainer.fast_dev_run=true",
        ]
    )
    assert code == 0
