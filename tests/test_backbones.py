"""Net1D reproduces ECGFounder exactly, and checkpoints load safely and strictly."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import ecgfm
from ecgfm.backbones import CheckpointError
from ecgfm.backbones.net1d import Net1D

SPEC = Path(__file__).resolve().parent / "data" / "specs" / "ecgfounder_12lead_state_dict.tsv"


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_released_and_small_configs():
    names = ecgfm.BACKBONES.names()
    for name in ("ecgfounder-12lead", "ecgfounder-1lead", "net1d-small", "net1d-tiny"):
        assert name in names
    with pytest.raises(ValueError, match="unknown backbone name 'nope'.*ecgfounder-12lead"):
        ecgfm.create_backbone("nope")


def test_ecgfounder_12lead_matches_published_state_dict():
    model = ecgfm.create_backbone("ecgfounder-12lead")
    assert n_params(model) == 30_819_014
    expected = []
    for line in SPEC.read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        expected.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    actual = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert actual == expected  # same keys, same order, same shapes (509 keys incl. unused BatchNorms)


def test_ecgfounder_1lead_parameters_and_forward_shapes():
    model = ecgfm.create_backbone("ecgfounder-1lead")
    assert n_params(model) == 30_807_750
    assert model.first_conv.conv.weight.shape == (64, 1, 16)
    assert model.model_config.input.lead_names == ("I",)
    tiny = ecgfm.create_backbone("net1d-tiny", num_classes=3)
    x = torch.randn(2, 12, 5000)
    assert tiny(x).shape == (2, 3)
    assert tiny.forward_features(x).shape == (2, tiny.num_features)
    assert tiny(torch.randn(2, 12, 1234)).shape == (2, 3)  # any length works


def test_ecgfounder_constructor_arguments_and_train_eval_equal():
    model = Net1D(
        in_channels=12,
        base_filters=16,
        ratio=1,
        filter_list=[16, 32],
        m_blocks_list=[1, 2],
        kernel_size=16,
        stride=2,
        groups_width=16,
        n_classes=4,
        use_bn=False,
        use_do=False,
    )
    x = torch.randn(3, 12, 5000)
    model.train()
    a = model(x)
    model.eval()
    torch.testing.assert_close(a, model(x))  # no BN, no dropout: train() and eval() agree, as in ECGFounder


def test_time_lengths_follow_same_padding():
    model = ecgfm.create_backbone("ecgfounder-12lead")
    lengths = []
    hooks = [model.first_conv.register_forward_hook(lambda m, i, o: lengths.append(o.shape[-1]))]
    hooks += [s.register_forward_hook(lambda m, i, o: lengths.append(o.shape[-1])) for s in model.stage_list]
    with torch.no_grad():
        model.forward_features(torch.zeros(1, 12, 5000))
    assert lengths == [2500, 1250, 625, 313, 157, 79, 40, 20]


def _write_ecgfounder_checkpoint(path, model):
    """The format of ECGFounder's released files: weights under state_dict, plus training state and a numpy scalar."""
    torch.save(
        {
            "state_dict": model.state_dict(),
            "epoch": 7,
            "step": 1234,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "val_auroc": np.float64(0.912),
        },
        path,
    )


def test_ecgfounder_checkpoint_round_trip(tmp_path):
    source = ecgfm.create_backbone("ecgfounder-12lead")
    path = tmp_path / "12_lead_ECGFounder.pth"
    _write_ecgfounder_checkpoint(path, source)
    loaded = ecgfm.create_backbone("ecgfounder-12lead", pretrained=path)
    x = torch.linspace(-1, 1, 60000).reshape(1, 12, 5000)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))

    # a new head for k outputs is one argument; everything else still comes from the file
    five = ecgfm.create_backbone("ecgfounder-12lead", pretrained=path, num_classes=5)
    assert five.dense.out_features == 5
    torch.testing.assert_close(five.first_conv.conv.weight, source.first_conv.conv.weight)
    with torch.no_grad():
        torch.testing.assert_close(five.forward_features(x), source.forward_features(x))


def test_missing_key_is_named(tmp_path):
    model = ecgfm.create_backbone("net1d-tiny")
    state = model.state_dict()
    del state["stage_list.1.block_list.0.conv2.conv.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"missing keys.*stage_list\.1\.block_list\.0\.conv2\.conv\.weight"):
        ecgfm.create_backbone("net1d-tiny", pretrained=path)


def test_unexpected_and_misshaped_keys_are_named(tmp_path):
    model = ecgfm.create_backbone("net1d-tiny")
    state = dict(model.state_dict())
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*extra\.weight"):
        ecgfm.create_backbone("net1d-tiny", pretrained=path)
    path12 = tmp_path / "12lead.pth"
    torch.save({"state_dict": ecgfm.create_backbone("net1d-tiny").state_dict()}, path12)
    with pytest.raises(
        CheckpointError, match=r"first_conv\.conv\.weight: checkpoint \(16, 12, 8\) vs model \(16, 1, 8\)"
    ):
        ecgfm.create_backbone("net1d-tiny", pretrained=path12, lead_names=("I",))


def test_missing_head_is_not_silently_random(tmp_path):
    model = ecgfm.create_backbone("net1d-tiny")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("dense.")}
    path = tmp_path / "nohead.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"dense\.weight"):
        ecgfm.create_backbone("net1d-tiny", pretrained=path)


def test_module_prefix_from_data_parallel_is_stripped(tmp_path):
    model = ecgfm.create_backbone("net1d-tiny")
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    loaded = ecgfm.create_backbone("net1d-tiny", pretrained=path)
    torch.testing.assert_close(loaded.dense.weight, model.dense.weight)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this file ran code on unpickling",))


def test_file_that_runs_code_on_unpickling_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        ecgfm.create_backbone("net1d-tiny", pretrained=path)
    assert "ran code" not in capsys.readouterr().out
    torch.save({"state_dict": {}, "payload": _RunsCode()}, tmp_path / "evil2.pth")
    with pytest.raises(CheckpointError, match="refusing to load"):
        ecgfm.create_backbone("net1d-tiny", pretrained=tmp_path / "evil2.pth")
    assert "ran code" not in capsys.readouterr().out


def test_safetensors_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    model = ecgfm.create_backbone("net1d-tiny")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = ecgfm.create_backbone("net1d-tiny", pretrained=path)
    torch.testing.assert_close(loaded.dense.weight, model.dense.weight)


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 7 + b"not safetensors at all")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}: not a readable .safetensors file"):
        ecgfm.create_backbone("net1d-tiny", pretrained=path)
    truncated = tmp_path / "model.pth"
    torch.save({"state_dict": ecgfm.create_backbone("net1d-tiny").state_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {truncated}: it is truncated or corrupt"):
        ecgfm.create_backbone("net1d-tiny", pretrained=truncated)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pth does not exist"):
        ecgfm.create_backbone("net1d-tiny", pretrained=tmp_path / "nothere.pth")


REAL_12LEAD = __import__("os").environ.get("ECGFOUNDER_12LEAD")


@pytest.mark.skipif(not REAL_12LEAD, reason="set ECGFOUNDER_12LEAD to the real 12_lead_ECGFounder.pth to run")
def test_real_ecgfounder_checkpoint_first_logits():
    model = ecgfm.create_backbone("ecgfounder-12lead", pretrained=REAL_12LEAD).eval()
    x = torch.linspace(-1, 1, 60000).reshape(1, 12, 5000)
    with torch.no_grad():
        logits = model(x)[0, :5]
    expected = torch.tensor([8.3751173, -4.1527028, -6.7856750, -2.8647900, 4.4135675])
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-4)


def test_parameters_unused_by_features_are_exactly_those_without_a_gradient():
    model = ecgfm.create_backbone("net1d-tiny").train()
    model.forward_features(torch.randn(2, 12, 5000)).sum().backward()
    without_grad = {id(p) for p in model.parameters() if p.grad is None}
    assert without_grad and without_grad == {id(p) for p in model.parameters_unused_by_features()}
