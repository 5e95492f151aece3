"""At the model/data boundary: a head must suit its target's kind and find its target in the data, and test/predict
with a checkpoint use the checkpoint's own heads or refuse a recipe whose heads differ."""

from __future__ import annotations

import contextlib
import warnings

import lightning as L
import pytest

from ecgfm.backbones import ContractError
from ecgfm.data.datamodule import ShardDataModule
from ecgfm.data.synthetic import write_synthetic_shards
from ecgfm.heads import BinaryHead, MulticlassHead, MultiLabelHead, PotassiumHead, RegressionHead
from ecgfm.tasks import FineTuneTask


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("boundary-shards")
    write_synthetic_shards(out, 96, seed=1, segments_per_shard=96, progress=False)
    return out


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _data(shards, **kwargs) -> ShardDataModule:
    return ShardDataModule(str(shards), batch_size=16, **kwargs)


@contextlib.contextmanager
def _quiet():
    """Lightning's warnings about small data and no logger are not what these tests look at."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (
            MultiLabelHead(name="m", target="potassium"),
            "head 'm' is a multilabel head, which learns multilabel or binary targets, but its target 'potassium' is "
            "regression",
        ),
        (
            RegressionHead(name="r", target="electrolyte"),
            "which learns regression targets, but its target 'electrolyte'",
        ),
        (MulticlassHead(name="c", target="hyperkalemia"), "but its target 'hyperkalemia' is binary"),
    ],
    ids=["multilabel-on-regression", "regression-on-multiclass", "multiclass-on-binary"],
)
def test_a_head_on_a_target_of_another_kind_is_refused_in_setup(shards, tmp_path, head, message):
    task = FineTuneTask(backbone="net1d-tiny", heads=[head])
    with pytest.raises(ContractError, match=message):
        _trainer(tmp_path, max_steps=1).fit(task, datamodule=_data(shards))


def test_heads_of_suitable_kinds_train(shards, tmp_path):
    heads = [
        PotassiumHead(name="k", target="potassium"),
        MulticlassHead(name="e", target="electrolyte"),
        BinaryHead(name="h", target="hyperkalemia"),
        MultiLabelHead(name="h2", target="hyperkalemia"),  # a binary target read as one label
    ]
    with _quiet():
        _trainer(tmp_path, max_steps=1, limit_val_batches=1).fit(
            FineTuneTask(backbone="net1d-tiny", heads=heads), datamodule=_data(shards)
        )


def test_a_built_head_whose_target_the_data_lacks_fails_in_setup_naming_it(shards, tmp_path):
    head = RegressionHead(name="sodium", labels=["sodium"])  # built from its labels: no data needed to build it
    task = FineTuneTask(backbone="net1d-tiny", heads=[head])
    with pytest.raises(
        KeyError, match="head 'sodium' learns target 'sodium', which the data does not have .*potassium"
    ):
        _trainer(tmp_path, max_steps=1).fit(task, datamodule=_data(shards))
    with pytest.raises(KeyError, match=r"data.targets names \['sodium'\], which .*manifest.json does not have"):
        _data(shards, targets=["sodium"]).target_specs  # noqa: B018


@pytest.fixture(scope="module")
def checkpoint(shards, tmp_path_factory):
    folder = tmp_path_factory.mktemp("boundary-ckpt")
    task = FineTuneTask(
        backbone="net1d-tiny",
        heads=[PotassiumHead(name="k", target="potassium"), BinaryHead(name="h", target="hyperkalemia")],
    )
    trainer = _trainer(folder, max_steps=2, limit_val_batches=1)
    with _quiet():
        trainer.fit(task, datamodule=_data(shards))
    path = folder / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_a_recipe_without_heads_evaluates_the_checkpoints_own_heads(shards, checkpoint, tmp_path):
    task = FineTuneTask(backbone="net1d-tiny")  # no heads: test the checkpoint's
    with _quiet():
        results = _trainer(tmp_path).test(task, datamodule=_data(shards), ckpt_path=str(checkpoint), verbose=False)
    assert set(task.heads) == {"k", "h"} and "test/segment/k/mae" in results[0] and "test/segment/h/auroc" in results[0]
    reloaded = FineTuneTask.load_from_checkpoint(checkpoint, map_location="cpu")
    for name in ("k", "h"):
        assert task.heads[name].config() == reloaded.heads[name].config()


def test_a_recipe_whose_heads_differ_from_the_checkpoints_is_refused_listing_both(shards, checkpoint, tmp_path):
    other = FineTuneTask(backbone="net1d-tiny", heads=[PotassiumHead(name="k", target="potassium", loss="huber")])
    with pytest.raises(ContractError) as info, _quiet():
        _trainer(tmp_path).test(other, datamodule=_data(shards), ckpt_path=str(checkpoint), verbose=False)
    message = str(info.value)
    assert "heads ['k'] in the recipe, ['h', 'k'] in the checkpoint" in message
    assert "leave model.heads out of the recipe" in message and "h: binary on 'hyperkalemia'" in message

    changed = FineTuneTask(
        backbone="net1d-tiny",
        heads=[PotassiumHead(name="k", target="potassium", loss="huber"), BinaryHead(name="h", target="hyperkalemia")],
    )
    with pytest.raises(ContractError, match="k.loss: 'huber' in the recipe, 'mse' in the checkpoint"), _quiet():
        _trainer(tmp_path).test(changed, datamodule=_data(shards), ckpt_path=str(checkpoint), verbose=False)


def test_fit_without_heads_says_what_to_do(shards, tmp_path):
    with pytest.raises(ValueError, match="needs at least one head: model.heads in the recipe"):
        _trainer(tmp_path, max_steps=1).fit(FineTuneTask(backbone="net1d-tiny"), datamodule=_data(shards))
