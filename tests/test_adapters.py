"""Lead-subset adapters: any lead subset by name reaches a 12-lead backbone, and 12-lead weights start a k-lead one."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch

from ecgfm.adapters import LeadDropout, create_adapter
from ecgfm.backbones import create_backbone
from ecgfm.heads import MultiLabelHead
from ecgfm.leads import STANDARD_LEADS, LeadError
from ecgfm.registry import ADAPTERS
from ecgfm.tasks import FineTuneTask

T = 5000
SUBSETS = [(["ii", "I"], ("II", "I")), ("limb", STANDARD_LEADS[:6]), (["V1", "avr"], ("V1", "aVR"))]
SPECS = [
    "zero_fill",
    {"name": "zero_fill", "missing_embedding": True},
    "projection",
    "fold_first_conv",
    {"name": "fold_first_conv", "fold_absent": True},
]


def slots(leads):
    return [STANDARD_LEADS.index(lead) for lead in leads]


def zero_filled(x, leads):
    out = torch.zeros(x.shape[0], 12, x.shape[-1])
    out[:, slots(leads)] = x
    return out


def head():
    return MultiLabelHead(name="d", labels=["a", "b"])


def int16_batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-800, 800, (n, 12, T), generator=g, dtype=torch.int16), torch.ones(n, 12, dtype=torch.bool)


def test_registry_names():
    assert {"identity", "zero_fill", "fold_first_conv", "projection"} <= set(ADAPTERS.names())
    with pytest.raises(ValueError, match="unknown adapter name 'nope'.*zero_fill"):
        create_adapter("nope", ["I"], create_backbone("net1d-tiny"))
    with pytest.raises(ValueError, match="adapter 'zero_fill' has no option 'fold_absent'; its options: missing_emb"):
        create_adapter({"name": "zero_fill", "fold_absent": True}, ["I"], create_backbone("net1d-tiny"))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize(("leads", "canonical"), SUBSETS, ids=["ii+I", "limb", "V1+avr"])
def test_output_shapes_for_subsets_by_name(spec, leads, canonical):
    backbone = create_backbone("net1d-tiny")
    adapter = create_adapter(spec, leads, backbone)
    k = len(canonical)
    assert adapter.input_leads == canonical
    x = torch.randn(2, k, T)
    mask = torch.ones(2, k, dtype=torch.bool)
    mask[1, 0] = False
    out, out_mask = adapter(x, mask)
    n_out = k if adapter.name == "fold_first_conv" else 12
    assert out.shape == (2, n_out, T) and out_mask.shape == (2, n_out)
    assert backbone.forward_features(out).shape == (2, backbone.num_features)
    if adapter.name == "fold_first_conv":
        assert backbone.model_config.input.lead_names == canonical
        assert backbone.first_conv.conv.weight.shape[1] == k
    else:  # the present leads sit in their canonical slots, in the order given, and the mask follows them
        torch.testing.assert_close(out[:, slots(canonical)], x)
        assert out_mask[:, slots(canonical)].tolist() == mask.tolist()
        assert not out_mask[:, [i for i in range(12) if i not in slots(canonical)]].any()


@pytest.mark.parametrize("spec", [*SPECS, "identity"], ids=str)
def test_lead_named_twice_or_unknown_is_named(spec):
    with pytest.raises(LeadError, match="lead 'I' is named twice"):
        create_adapter(spec, ["I", "ii", "i"], create_backbone("net1d-tiny"))
    with pytest.raises(LeadError, match="unknown lead name 'V7'"):
        create_adapter(spec, ["I", "V7"], create_backbone("net1d-tiny"))


def test_a_lead_the_backbone_lacks_needs_a_learned_adapter():
    one_lead = create_backbone("net1d-tiny", lead_names=("I",))
    with pytest.raises(LeadError, match=r"adapter 'zero_fill': leads \['II'\] are not inputs of the backbone"):
        create_adapter("zero_fill", ["I", "II"], one_lead)
    with pytest.raises(LeadError, match=r"adapter 'identity' needs the input leads to be the backbone's \(I\)"):
        create_adapter("identity", ["I", "II"], one_lead)
    projection = create_adapter("projection", ["II", "I"], one_lead)  # lead II starts with a zero column
    x = torch.randn(2, 2, 100)
    out, mask = projection(x, torch.ones(2, 2, dtype=torch.bool))
    torch.testing.assert_close(out, x[:, 1:])
    assert mask.all()


def test_fold_first_conv_equals_the_12_lead_model_on_zero_filled_input():
    source = create_backbone("net1d-tiny").eval()
    backbone = copy.deepcopy(source)
    create_adapter("fold_first_conv", ["V1", "avr"], backbone)
    backbone.eval()
    assert backbone.model_config.architecture["in_channels"] == 2
    x = torch.randn(3, 2, T)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x), source.forward_features(zero_filled(x, ("V1", "aVR"))))


def test_fold_absent_shares_the_absent_kernels_out_equally():
    source = create_backbone("net1d-tiny").eval()
    backbone = copy.deepcopy(source)
    adapter = create_adapter({"name": "fold_first_conv", "fold_absent": True}, ["II", "I"], backbone)
    assert adapter.config() == {"name": "fold_first_conv", "fold_absent": True}
    w = source.first_conv.conv.weight.detach()
    expected = w[:, [1, 0]] + w[:, 2:].sum(dim=1, keepdim=True) / 2
    torch.testing.assert_close(backbone.first_conv.conv.weight.detach(), expected)
    torch.testing.assert_close(backbone.first_conv.conv.bias, source.first_conv.conv.bias)
    # what that means: the 12-lead model on a signal whose absent leads are the mean of the present ones
    x = torch.randn(2, 2, T)
    x12 = x.mean(dim=1, keepdim=True).expand(2, 12, T).clone()
    x12[:, [1, 0]] = x
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x), source.forward_features(x12), atol=1e-5, rtol=1e-4)


def test_projection_starts_as_zero_fill_and_learns():
    backbone = create_backbone("net1d-tiny")
    projection = create_adapter("projection", "limb", backbone)
    zero_fill = create_adapter("zero_fill", "limb", backbone)
    x = torch.randn(2, 6, T)
    mask = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    x = x * mask.unsqueeze(-1)
    out, out_mask = projection(x, mask)
    expected, expected_mask = zero_fill(x, mask)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out_mask, expected_mask)
    assert [p.shape for p in projection.parameters()] == [(12, 6, 1)]


def test_missing_embedding_fills_only_absent_slots():
    adapter = create_adapter(
        {"name": "zero_fill", "missing_embedding": True}, ["I", "II"], create_backbone("net1d-tiny")
    )
    assert adapter.config() == {"name": "zero_fill", "missing_embedding": True}
    x = torch.randn(2, 2, T)
    mask = torch.tensor([[True, True], [True, False]])
    plain, _ = create_adapter("zero_fill", ["I", "II"], create_backbone("net1d-tiny"))(x, mask)
    torch.testing.assert_close(adapter(x, mask)[0], plain)  # starts at zero: zero_fill exactly
    with torch.no_grad():
        adapter.missing_embedding.fill_(1.0)
    out, out_mask = adapter(x, mask)
    torch.testing.assert_close(out[:, 2:], torch.ones(2, 10, T))
    torch.testing.assert_close(out[0, :2], x[0])
    torch.testing.assert_close(out[1, 1], x[1, 1] + 1.0)  # lead II is absent from the second sample
    assert out_mask[:, 2:].sum() == 0 and out_mask[1].tolist()[:2] == [True, False]


@pytest.mark.parametrize("spec", [None, *SPECS], ids=str)
def test_task_reads_lead_i_from_a_12_lead_batch(spec):
    task = FineTuneTask(backbone="net1d-tiny", heads=[head()], leads=["i"], adapter=spec).eval()
    assert task.adapter.name == (spec if isinstance(spec, str) else (spec or {"name": "zero_fill"})["name"])
    signal, mask = int16_batch()
    with torch.no_grad():
        assert task(signal, mask)["d"].shape == (2, 2)
        x, x_mask = task.prepare_signal(signal, mask)
    assert x.shape[1] == (1 if task.adapter.name == "fold_first_conv" else 12)
    if task.adapter.name != "fold_first_conv":
        assert x_mask[0].tolist() == [True] + [False] * 11 and not x[:, 1:].any()


def test_default_task_is_unchanged():
    task = FineTuneTask(backbone="net1d-tiny", heads=[head()], lead_dropout=0.0)
    assert task.adapter.name == "identity" and task.leads == STANDARD_LEADS
    signal, mask = int16_batch()
    mask[0, 3] = False
    x, x_mask = task.prepare_signal(signal, mask)
    torch.testing.assert_close(x, task.preprocessing(signal.float() / 1000.0, mask))
    assert torch.equal(x_mask, mask)


def _loader(n=4):
    signal, mask = int16_batch(n, seed=1)
    batch = {
        "signal": signal,
        "lead_mask": mask,
        "targets": {"d": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])[:n]},
        "target_masks": {"d": torch.ones(n, 2, dtype=torch.bool)},
        "record_id": [f"r{i}" for i in range(n)],
        "patient_id": [f"p{i}" for i in range(n)],
    }
    return torch.utils.data.DataLoader([batch], batch_size=None)


def _trainer(tmp_path):
    return L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip


def test_fold_task_starts_from_a_12_lead_checkpoint_and_reloads(tmp_path):
    source = create_backbone("net1d-tiny").eval()
    weights = tmp_path / "12_lead_ECGFounder.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3, "val_auroc": np.float64(0.9)}, weights)
    task = FineTuneTask(
        backbone="net1d-tiny",
        pretrained=str(weights),
        heads=[head()],
        leads=["II", "I"],
        adapter="fold_first_conv",
        preprocessing="zscore",
    )
    trainer = _trainer(tmp_path)
    trainer.validate(task, dataloaders=_loader())  # setup loads the 12-lead file into the 2-lead model
    torch.testing.assert_close(task.backbone.first_conv.conv.weight, source.first_conv.conv.weight[:, [1, 0]])
    x = torch.randn(2, 2, T)
    with torch.no_grad():
        torch.testing.assert_close(
            task.backbone.forward_features(x), source.forward_features(zero_filled(x, ("II", "I")))
        )

    ckpt = tmp_path / "task.ckpt"
    trainer.save_checkpoint(ckpt)
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["ecgfm"]
    assert stored["input"]["lead_names"] == ["II", "I"]  # the task reads II, I; its backbone's native leads stay
    assert stored["backbone"]["input"]["lead_names"] == list(STANDARD_LEADS)
    assert stored["adapter"] == {"name": "fold_first_conv", "fold_absent": False}

    reloaded = FineTuneTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert reloaded.backbone.first_conv.conv.weight.shape[1] == 2
    signal, mask = int16_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(signal, mask)["d"], task.eval()(signal, mask)["d"])
    # a reloaded model keeps its own weights when a trainer sets it up again (the pretrained file is not reread)
    with torch.no_grad():
        reloaded.backbone.first_conv.conv.weight.add_(1.0)
    before = reloaded.backbone.first_conv.conv.weight.clone()
    _trainer(tmp_path).validate(reloaded, dataloaders=_loader())
    torch.testing.assert_close(reloaded.backbone.first_conv.conv.weight, before)


def test_a_fine_tuned_12_lead_checkpoint_starts_a_lead_i_model(tmp_path):
    teacher = FineTuneTask(backbone="net1d-tiny", heads=[head()], preprocessing="zscore")
    trainer = _trainer(tmp_path)
    trainer.validate(teacher, dataloaders=_loader())
    with torch.no_grad():  # a fine-tuned head: no longer what the seed initialises a head named "d" to
        for parameter in teacher.heads.parameters():
            parameter.add_(1.0)
    ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(ckpt)

    student = FineTuneTask(
        backbone="net1d-tiny",
        pretrained=str(ckpt),
        heads=[head()],
        leads=["I"],
        adapter="fold_first_conv",
        preprocessing="zscore",
    )
    _trainer(tmp_path).validate(student, dataloaders=_loader())
    torch.testing.assert_close(student.backbone.first_conv.conv.weight, teacher.backbone.first_conv.conv.weight[:, :1])
    x = torch.randn(2, 1, T)
    with torch.no_grad():
        torch.testing.assert_close(
            student.backbone.eval().forward_features(x),
            teacher.backbone.eval().forward_features(zero_filled(x, ("I",))),
        )
    # only the backbone comes from the checkpoint: the student's head keeps its own initialisation
    student_head, teacher_head = student.heads["d"].state_dict(), teacher.heads["d"].state_dict()
    assert any(not torch.equal(student_head[k], teacher_head[k]) for k in student_head if k.endswith("weight"))


def test_lead_dropout_masks_only_in_training_and_never_every_lead():
    torch.manual_seed(0)
    dropout = LeadDropout(0.6)
    x = torch.randn(2000, 12, 8)
    mask = torch.ones(2000, 12, dtype=torch.bool)
    mask[:500, 3:] = False  # three leads recorded
    mask[500:510] = False  # nothing recorded
    out, kept = dropout(x, mask)
    assert not (kept & ~mask).any()  # an absent lead is never switched on
    assert kept[510:].any(dim=1).all() and kept[:500].any(dim=1).all()
    assert not kept[500:510].any()
    torch.testing.assert_close(out, x * kept.unsqueeze(-1))
    dropped = (mask & ~kept)[510:].float().mean()
    assert 0.5 < dropped < 0.65
    dropout.eval()
    out, kept = dropout(x, mask)
    assert out is x and kept is mask
    with pytest.raises(ValueError, match=r"lead_dropout must be in \[0, 1\)"):
        LeadDropout(1.0)


def test_task_lead_dropout_in_training_only():
    task = FineTuneTask(backbone="net1d-tiny", heads=[head()], leads="limb", lead_dropout=0.5, preprocessing="none")
    signal, mask = int16_batch(64)
    task.train()
    _, train_mask = task.prepare_signal(signal, mask)
    limb = train_mask[:, :6]
    assert not limb.all() and limb.any(dim=1).all() and not train_mask[:, 6:].any()
    task.eval()
    _, eval_mask = task.prepare_signal(signal, mask)
    assert eval_mask[:, :6].all()


def test_one_lead_backbone_reads_lead_i_without_an_adapter(tmp_path):
    source = create_backbone("net1d-tiny", lead_names=("I",)).eval()
    weights = tmp_path / "1_lead_ECGFounder.pth"
    torch.save({"state_dict": source.state_dict()}, weights)
    for leads in (["i"], None):
        task = FineTuneTask(
            backbone="net1d-tiny",
            backbone_kwargs={"lead_names": ["I"]},
            pretrained=str(weights),
            heads=[head()],
            leads=leads,
            preprocessing="zscore",
        ).eval()
        assert task.adapter.name == "identity" and task.leads == ("I",)
        task.setup("validate")
        torch.testing.assert_close(task.backbone.first_conv.conv.weight, source.first_conv.conv.weight)
        signal, mask = int16_batch()
        with torch.no_grad():
            x, _ = task.prepare_signal(signal, mask)
            torch.testing.assert_close(x, task.preprocessing(signal[:, :1].float() / 1000.0, mask[:, :1]))
            torch.testing.assert_close(task.backbone.forward_features(x), source.forward_features(x))
