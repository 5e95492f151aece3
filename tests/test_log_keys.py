"""Every metric the training loop logs names its unit (per 10-s segment); monitors written before the rename follow
the renamed key with a warning instead of failing or watching nothing."""

from __future__ import annotations

import pytest

from ecgfm.checkpointing import ResumableCheckpoint
from ecgfm.evaluation.log_keys import head_key, unit_named_monitor
from ecgfm.tasks import FineTuneTask


def test_head_keys_name_the_segment_unit():
    assert head_key("val", "diagnoses", "auroc") == "val/segment/diagnoses/auroc"
    assert (
        head_key("test", "potassium", "sensitivity/hyperkalemia") == "test/segment/potassium/sensitivity/hyperkalemia"
    )


@pytest.mark.parametrize(
    ("given", "expected", "renamed"),
    [
        ("val/diagnoses/auroc", "val/segment/diagnoses/auroc", True),
        ("val/potassium/auroc/hyperkalemia", "val/segment/potassium/auroc/hyperkalemia", True),
        ("val/segment/diagnoses/auroc", "val/segment/diagnoses/auroc", False),
        ("test/record/diagnoses/auroc", "test/record/diagnoses/auroc", False),
        ("val/loss", "val/loss", False),
        ("train/loss_epoch", "train/loss_epoch", False),
        (None, None, False),
    ],
)
def test_monitors_without_a_unit_become_the_logged_key(given, expected, renamed):
    assert unit_named_monitor(given) == (expected, renamed)


def test_checkpoint_and_scheduler_monitors_written_the_old_way_follow_the_new_key():
    with pytest.warns(UserWarning, match="val/segment/diagnoses/auroc"):
        callback = ResumableCheckpoint(monitor="val/diagnoses/auroc", mode="max")
    assert callback.monitor == "val/segment/diagnoses/auroc"
    with pytest.warns(UserWarning, match="val/segment/potassium/mae"):
        task = FineTuneTask(backbone="net1d-tiny", monitor="val/potassium/mae", scheduler="plateau")
    assert task.hparams.monitor == "val/segment/potassium/mae"
