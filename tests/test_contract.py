"""The model contract and the one registry: every registered name builds and round-trips its config; a checkpoint
keeps its preprocessing when a default changes in code; data of another rate, length or lead set is refused."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ecgfm.adapters import create_adapter
from ecgfm.backbones import ContractError, InputContract, ModelConfig, create_backbone, net1d
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.data.shards import MANIFEST_NAME
from ecgfm.data.synthetic import write_synthetic_shards
from ecgfm.heads import MultiLabelHead, RegressionHead, create_head
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES
from ecgfm.registry import ADAPTERS, BACKBONES, HEADS, PREPROCESSING, REGISTRIES, SOURCES, UnknownNameError
from ecgfm.signal import ECGFounderPreprocessing, create_preprocessing
from ecgfm.tasks import FineTuneTask

# ------------------------------------------------------------------------------------------------ every registered name


def test_every_kind_shares_one_registry_with_one_wording():
    assert set(REGISTRIES) == {"backbones", "heads", "adapters", "preprocessing", "image-preprocessing", "sources"}
    for registry in REGISTRIES.values():
        assert len(registry) >= 2
        with pytest.raises(UnknownNameError, match=rf"unknown {registry.kind} {registry.key} 'nope'; known: "):
            registry.create({registry.key: "nope"})
    with pytest.raises(UnknownNameError, match="preprocessing 'zscore' has no option 'per_leads'; its options: eps"):
        PREPROCESSING.create({"name": "zscore", "per_leads": True})
    with pytest.raises(ValueError, match="already registered"):
        BACKBONES.register("net1d-tiny")(lambda **kwargs: None)


# `precomputed` reads features, not signals: it has no convolution and needs a feature folder (tests/test_embed.py)
@pytest.mark.parametrize("name", [n for n in BACKBONES.names() if not getattr(BACKBONES.get(n), "reads_features", 0)])
def test_every_backbone_builds_names_its_layers_and_rebuilds_from_its_config(name):
    model = create_backbone(name)
    config = model.model_config
    assert isinstance(config, ModelConfig) and config.name == name
    assert isinstance(model.get_submodule(config.first_conv), torch.nn.Conv1d)
    assert isinstance(model.get_submodule(config.classifier), torch.nn.Linear)
    for block in config.blocks:
        model.get_submodule(block)
    assert config.input.fs == STANDARD_FS and config.input.n_samples == STANDARD_N_SAMPLES
    assert config.input.preprocessing["name"] in PREPROCESSING
    with torch.no_grad():
        features = model.eval().forward_features(torch.randn(1, len(config.input.lead_names), 1000))
    assert features.shape == (1, config.num_features)
    stored = json.loads(json.dumps(config.to_dict()))  # what a checkpoint holds
    again = create_backbone(stored)
    assert again.model_config == config
    assert again.get_submodule(config.first_conv).weight.shape == model.get_submodule(config.first_conv).weight.shape


def _labels_for(kind: str) -> list[str]:
    return {"binary": ["event"], "potassium": ["potassium"]}.get(kind, ["a", "b", "c"])


@pytest.mark.parametrize("kind", HEADS.names())
def test_every_head_has_a_finite_loss_with_a_gradient_when_every_label_is_masked(kind):
    head = create_head({"kind": kind, "name": "h"})
    labels = _labels_for(kind)
    head.build(16, labels)
    features = torch.randn(4, 16, requires_grad=True)
    output = head(features)
    target = torch.full((4, len(labels)), float("nan"))
    mask = torch.zeros(4, len(labels), dtype=torch.bool)
    loss = head.loss(output, target, mask)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


@pytest.mark.parametrize("kind", HEADS.names())
def test_every_head_round_trips_its_config_through_yaml(kind):
    head = create_head({"kind": kind, "name": "h", "loss_weight": 0.5})
    head.build(16, _labels_for(kind))
    config = head.config()
    assert config["kind"] == kind and config["labels"] == _labels_for(kind) and config["loss_weight"] == 0.5
    again = create_head(yaml.safe_load(yaml.safe_dump(config)))
    assert type(again) is type(head) and again.config() == config


def test_a_head_stored_by_an_old_module_path_still_loads():
    """Checkpoints saved before the registry named heads by Python module path; the class name finds them."""
    head = create_head({"class_path": "ecgfm.heads.somewhere_else.MultiLabelHead", "init_args": {"name": "d"}})
    assert isinstance(head, MultiLabelHead)


@pytest.mark.parametrize("name", ADAPTERS.names())
def test_every_adapter_round_trips_its_config(name):
    leads = STANDARD_LEADS if name == "identity" else ("II", "I")
    adapter = create_adapter(name, leads, create_backbone("net1d-tiny"))
    config = adapter.config()
    assert config["name"] == name
    again = create_adapter(yaml.safe_load(yaml.safe_dump(config)), leads, create_backbone("net1d-tiny"))
    assert again.config() == config


@pytest.mark.parametrize("name", PREPROCESSING.names())
def test_every_preprocessing_chain_round_trips_its_config_and_output(name):
    chain = create_preprocessing(name)
    config = chain.config()
    assert config["name"] == name
    again = create_preprocessing(json.loads(json.dumps(config)))
    assert again.config() == config
    x = torch.randn(2, 3, 2000)
    torch.testing.assert_close(
        again(x, torch.ones(2, 3, dtype=torch.bool)), chain(x, torch.ones(2, 3, dtype=torch.bool))
    )


@pytest.mark.parametrize("name", SOURCES.names())
def test_every_source_reader_builds(name, tmp_path):
    options = {}
    if name == "arrays":  # the one reader that needs its label table
        (tmp_path / "records.csv").write_text("record\nr1\n")
        options = {"table": str(tmp_path / "records.csv")}
    reader = SOURCES.create({"name": name, **options})
    assert reader.name == name and callable(reader.read) and callable(reader.find_records)


# ------------------------------------------------------------------------------------------------ checkpoints


def _batches(n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        signal = torch.randint(-900, 900, (4, 12, STANDARD_N_SAMPLES), generator=g, dtype=torch.int16)
        out.append(
            {
                "signal": signal,
                "lead_mask": torch.ones(4, 12, dtype=torch.bool),
                "targets": {"d": torch.randint(0, 2, (4, 2), generator=g).float()},
                "target_masks": {"d": torch.ones(4, 2, dtype=torch.bool)},
            }
        )
    return out


def _fit_and_save(task: FineTuneTask, tmp_path) -> str:
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(_batches(), batch_size=None))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _change_the_ecgfounder_band_default(monkeypatch) -> None:
    """What editing the default band of ECGFounder's chain in signal.py would do (and so net1d's contracts)."""
    init = ECGFounderPreprocessing.__init__.__wrapped__
    names = list(init.__code__.co_varnames[1 : init.__code__.co_argcount])
    defaults = dict(zip(names[-len(init.__defaults__) :], init.__defaults__, strict=True))
    defaults["band_hz"] = (5.0, 15.0)
    monkeypatch.setattr(init, "__defaults__", tuple(defaults.values()))
    monkeypatch.setattr(net1d, "NET1D_TINY", net1d.NET1D_TINY.replace(input=net1d.ecgfounder_input()))


def test_a_checkpoint_keeps_its_preprocessing_when_the_default_changes(tmp_path, monkeypatch):
    L.seed_everything(0)
    task = FineTuneTask(backbone="net1d-tiny", heads=[MultiLabelHead(name="d", labels=["a", "b"])], lr=1e-2)
    assert task.hparams["preprocessing"]["band_hz"] == [0.67, 40.0]  # spelled out, not "ecgfounder"
    ckpt = _fit_and_save(task, tmp_path)
    signal = _batches(1, seed=1)[0]["signal"]
    with torch.no_grad():
        before = task.eval()(signal)["d"]
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["ecgfm"]
    assert stored["input"]["preprocessing"]["band_hz"] == [0.67, 40.0]
    assert stored["backbone"]["name"] == "net1d-tiny" and stored["backbone"]["architecture"]["kernel_size"] == 8

    _change_the_ecgfounder_band_default(monkeypatch)
    assert ECGFounderPreprocessing().config()["band_hz"] == [5.0, 15.0]
    fresh = FineTuneTask(backbone="net1d-tiny", heads=[MultiLabelHead(name="d", labels=["a", "b"])])
    assert fresh.preprocessing.config()["band_hz"] == [5.0, 15.0]  # a new model follows the new default

    reloaded = FineTuneTask.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert reloaded.preprocessing.config()["band_hz"] == [0.67, 40.0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(signal)["d"], before)

    # the trainer path (`ecgfm test -c recipe --ckpt_path`): a model built from the recipe with today's defaults is
    # rebuilt from the checkpoint's contract, and says so
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    with pytest.warns(UserWarning, match=r"checkpoint's model contract.*preprocessing.*0\.67"):
        fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(signal)["d"], before)


def test_the_trainer_path_rebuilds_a_recipe_model_with_other_leads_and_backbone(tmp_path):
    task = FineTuneTask(
        backbone="net1d-tiny",
        heads=[MultiLabelHead(name="d", labels=["a", "b"])],
        leads=["II", "I"],
        adapter="zero_fill",
    )
    ckpt = _fit_and_save(task, tmp_path)
    signal = _batches(1, seed=2)[0]["signal"]
    with torch.no_grad():
        before = task.eval()(signal)["d"]
    recipe = FineTuneTask(backbone="net1d-small", heads=[MultiLabelHead(name="d", labels=["a", "b"])])
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    with pytest.warns(UserWarning, match="backbone net1d-tiny.*leads"):
        recipe.on_load_checkpoint(checkpoint)
    recipe.load_state_dict(checkpoint["state_dict"])
    assert recipe.leads == ("II", "I") and recipe.backbone_config.name == "net1d-tiny"
    assert recipe.hparams["backbone"] == "net1d-tiny" and recipe.hparams["leads"] == ["II", "I"]
    with torch.no_grad():
        torch.testing.assert_close(recipe.eval()(signal)["d"], before)


def test_a_model_config_from_another_version_is_refused_by_name():
    stored = create_backbone("net1d-tiny").model_config.to_dict()
    with pytest.raises(ContractError, match=r"unknown fields \['dropout_rate'\]"):
        ModelConfig.from_dict({**stored, "dropout_rate": 0.1})
    with pytest.raises(ContractError, match="in_channels=3 but the input contract names 12 leads"):
        create_backbone("net1d-tiny", in_channels=3)


def test_the_standard_rate_length_and_leads_are_defined_once():
    contract = InputContract()
    assert (contract.fs, contract.n_samples, contract.lead_names) == (500.0, 5000, STANDARD_LEADS)
    assert contract.seconds == 10.0
    assert dataclasses.is_dataclass(contract)
    with pytest.raises(dataclasses.FrozenInstanceError):
        contract.fs = 250.0


# ------------------------------------------------------------------------------------------------ data vs model


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("contract-shards")
    write_synthetic_shards(out, 96, seed=0, segments_per_shard=96, progress=False)
    return out


def _with_manifest(root, tmp_path, **changes):
    """A copy of the shard folder whose manifest says something else (rate, length, leads)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for path in root.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / MANIFEST_NAME).unlink()
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest.update(changes)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def _validate(task: FineTuneTask, root) -> None:
    data = ShardDataModule(str(root), batch_size=16, targets=["potassium"])
    trainer = L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        default_root_dir=Path(root).parent / "validate-run",  # the tables go there, not into the working folder
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(task, datamodule=data, verbose=False)


def _potassium_task(**kwargs) -> FineTuneTask:
    return FineTuneTask(backbone="net1d-tiny", heads=[RegressionHead(name="potassium")], **kwargs)


@pytest.mark.parametrize(
    ("changes", "data_side"),
    [
        ({"fs": 100.0, "n_samples": 1000}, "100 Hz x 1000 samples (10 s)"),
        ({"n_samples": 1250}, "500 Hz x 1250 samples (2.5 s)"),
    ],
    ids=["100Hz", "2.5s"],
)
def test_a_manifest_of_another_rate_or_length_is_refused_naming_both(small_shards, tmp_path, changes, data_side):
    _validate(_potassium_task(), small_shards)  # the real folder is fine
    root = _with_manifest(small_shards, tmp_path, **changes)
    with pytest.raises(ContractError) as info:
        _validate(_potassium_task(), root)
    message = str(info.value)
    assert "\n" not in message
    assert f"{root / MANIFEST_NAME}" in message
    assert f"holds {data_side} segments" in message
    assert "the model 'net1d-tiny' reads 500 Hz x 5000 samples (10 s)" in message


def test_data_without_the_leads_the_model_reads_is_refused_naming_both(small_shards, tmp_path):
    root = _with_manifest(small_shards, tmp_path, lead_names=list(STANDARD_LEADS[:6]))
    with pytest.raises(ContractError, match=r"has leads I, II, III, aVR, aVL, aVF but the model .* \(missing V1, V2"):
        _validate(_potassium_task(), root)


def test_a_batch_of_the_wrong_length_is_refused_before_the_backbone():
    task = _potassium_task().eval()
    with pytest.raises(ContractError, match=r"batch of shape \(2, 12, 2500\).*5000 samples at 500 Hz"):
        task(torch.zeros(2, 12, 2500, dtype=torch.int16))


def test_the_command_line_refuses_a_100hz_manifest_in_one_line(small_shards, tmp_path, capsys):
    from ecgfm.commands import main

    root = _with_manifest(small_shards, tmp_path, fs=100.0, n_samples=1000)
    code = main(
        [
            "validate",
            "--config",
            "potassium/net1d-small",  # a shipped recipe, by name
            f"--data.root={root}",
            "--data.targets=[potassium]",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
        ]
    )
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("ecgfm")]  # Lightning may warn (srun, ...)
    assert code == 1 and len(err) == 1 and "Traceback" not in stderr
    assert err[0] == (
        f"ecgfm: error: {root / MANIFEST_NAME} holds 100 Hz x 1000 samples (10 s) segments but the model "
        "'net1d-small' reads 500 Hz x 5000 samples (10 s); convert the records again for this model or use a model "
        "made for this data"
    )


def test_a_checkpoint_from_before_model_configs_keeps_its_stored_chain(tmp_path):
    """Older checkpoints stored the chain, leads and adapter (no model config): those are what loading uses."""
    task = FineTuneTask(backbone="net1d-tiny", heads=[MultiLabelHead(name="d", labels=["a", "b"])])
    ckpt = _fit_and_save(task, tmp_path)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    chain = {**task.preprocessing.config(), "band_hz": [1.0, 30.0]}
    checkpoint["ecgfm"] = {
        "input_spec": {"fs": 500.0, "n_samples": 5000, "lead_names": list(STANDARD_LEADS)},
        "leads": list(STANDARD_LEADS),
        "adapter": {"name": "identity"},
        "preprocessing": chain,
        "heads": {"d": {"target": "d", "labels": ["a", "b"]}},
    }
    checkpoint["hyper_parameters"]["preprocessing"] = "ecgfounder"  # as old checkpoints had it: a bare name
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="preprocessing"):
        old = FineTuneTask.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert old.preprocessing.config() == chain and old.hparams["preprocessing"] == chain
