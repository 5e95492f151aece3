"""The bad-input catalogue: one row per bad input or fault, each run through the real ``ecgfm`` command line.

Every row ends in one of two outcomes, asserted here: a **clear error** (non-zero exit, exactly one
``ecgfm: error: ...`` line naming the file, record, column or key, no traceback) or a **correct result** (exit 0 and
the result checked). After every row, no source file has changed and, after an error, no finished output is lost.
The rows are the 45 inputs of issue 12 plus more; docs/troubleshooting.md lists the messages and what to do.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from ecgfm.commands import main
from ecgfm.data.synthetic import write_synthetic_shards
from ecgfm.quickstart import DATA_DIR as LUDB

CLEAR_ERROR, CORRECT_RESULT = "clear error", "correct result"


@dataclass
class Ctx:
    """A row's folder: ``src`` (copied records), ``out`` (converted shards) and the module's shared artefacts."""

    tmp: Path
    synthetic: Path
    recipe: Path
    checkpoint: Path

    @property
    def src(self) -> Path:
        return self.tmp / "src"

    @property
    def out(self) -> Path:
        return self.tmp / "out"


@dataclass
class Row:
    """``prepare`` makes the row's files and returns the command; ``error`` is a regex the one error line matches
    (None: a correct result, checked by ``check``)."""

    id: str
    prepare: Callable[[Ctx], list[str]]
    error: str | None = None
    check: Callable[[Ctx, str, str], None] | None = None
    exit_code: int | None = None


# ---------------------------------------------------------------------------------------------------- builders
def records(ctx: Ctx, ids: tuple[int, ...] = (1, 2, 3, 4)) -> Path:
    ctx.src.mkdir(exist_ok=True)
    for i in ids:
        for ext in ("hea", "dat"):
            shutil.copy(LUDB / "data" / f"{i}.{ext}", ctx.src / f"{i}.{ext}")
    return ctx.src


def set_header(path: Path, line: int, field: int, value: str) -> None:
    lines = path.read_text().splitlines()
    fields = lines[line].split(" ")
    fields[field] = value
    lines[line] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")


def label_table(ctx: Ctx, cells: dict[int, str], name: str = "labels.csv", sep: str = ",") -> Path:
    path = ctx.tmp / name
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(["record", "potassium"])
        writer.writerows([str(i), cell] for i, cell in cells.items())
    return path


def shard(ctx: Ctx, *extra: str) -> list[str]:
    return ["shard", "--source", str(ctx.src), "--out", str(ctx.out), "--progress", "false", *extra]


def shard_labels(ctx: Ctx, table: Path, *extra: str) -> list[str]:
    regression = '{"potassium": ["potassium"]}'
    return shard(ctx, "--labels", str(table), "--regression", regression, *extra)


def converted(ctx: Ctx, *extra: str) -> None:
    assert main(shard(ctx, "--records_per_shard", "2", *extra)) == 0


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def stored(ctx: Ctx, target: str = "potassium") -> dict[str, float]:
    out = {}
    for path in sorted(ctx.out.glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            for record, value in zip(f["record_id"].asstr()[:], f["targets"][target][:, 0], strict=True):
                out[record] = float(value)
    return out


def skipped(ctx: Ctx) -> dict[str, str]:
    return {Path(r).name: reason for r, reason in csv_rows(ctx.out / "skipped.csv")}


def fit(ctx: Ctx, *extra: str) -> list[str]:
    return ["fit", "--config", str(ctx.recipe), f"--data.root={ctx.synthetic}", *run_dirs(ctx), *extra]


def run_dirs(ctx: Ctx) -> list[str]:
    return [f"--trainer.default_root_dir={ctx.tmp / 'root'}", f"--trainer.logger.init_args.save_dir={ctx.tmp / 'logs'}"]


def evaluate(ctx: Ctx, command: str, *extra: str) -> list[str]:
    return [command, "--config", str(ctx.recipe), f"--data.root={ctx.synthetic}", *run_dirs(ctx), *extra]


def manifest_copy(ctx: Ctx, **changes) -> Path:
    folder = ctx.tmp / "data"
    folder.mkdir()
    for path in ctx.synthetic.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / "manifest.json").unlink()
    manifest = json.loads((ctx.synthetic / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def recipe_without_heads(ctx: Ctx) -> Path:
    config = yaml.safe_load(ctx.recipe.read_text())
    config["model"].pop("heads")
    path = ctx.tmp / "no-heads.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def flip_byte(path: Path, dataset: str) -> None:
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset + 3)
        byte = f.read(1)
        f.seek(offset + 3)
        f.write(bytes([byte[0] ^ 0x01]))


# ---------------------------------------------------------------------------------------------------- checks
def converts(n_segments: int, skipped_records: dict[str, str] | None = None):
    def check(ctx: Ctx, out: str, err: str) -> None:
        manifest = json.loads((ctx.out / "manifest.json").read_text())
        assert manifest["n_segments"] == n_segments
        reasons = skipped(ctx)
        assert set(reasons) == set(skipped_records or {})
        for record, pattern in (skipped_records or {}).items():
            assert re.search(pattern, reasons[record]), reasons[record]

    return check


def warned(pattern: str, values: dict[str, float]):
    def check(ctx: Ctx, out: str, err: str) -> None:
        warnings = [" ".join(row) for row in csv_rows(ctx.out / "warnings.csv")]
        assert any(re.search(pattern, w) for w in warnings), warnings
        got = stored(ctx)
        for record, value in values.items():
            assert (np.isnan(got[record]) and np.isnan(value)) or got[record] == pytest.approx(value), got

    return check


def rerun_rebuilds(reason: str, skipped_records: dict[str, str] | None = None):
    def check(ctx: Ctx, out: str, err: str) -> None:
        assert re.search(rf"shard-0000\d: rebuilt, {reason}", out), out
        converts(4 - len(skipped_records or {}), skipped_records)(ctx, out, err)

    return check


def verify_fails(dataset: str):
    def check(ctx: Ctx, out: str, err: str) -> None:
        failed = [line for line in out.splitlines() if line.startswith("FAILED")]
        assert len(failed) == 1 and "shard-00000.h5" in failed[0] and dataset in failed[0], out

    return check


def writes_nothing(ctx: Ctx, out: str, err: str) -> None:
    assert not list(ctx.tmp.rglob("*.ckpt")) and not list(ctx.tmp.rglob("tables"))


def evaluates_checkpoint_heads(ctx: Ctx, out: str, err: str) -> None:
    assert re.search(r"test/segment/potassium/mae", out + err), out


def resumed_past_bad_last(ctx: Ctx, out: str, err: str) -> None:
    folder = next(ctx.tmp.rglob("checkpoints"))
    assert list(folder.glob("last.ckpt.corrupt-*")) and re.search(r"moved .*last\.ckpt aside", err), err
    assert re.search(r"resum\w+ .* from .*step=\d+\.ckpt", err), err  # the newest checkpoint that loads
    # the run ended at its last step (tests/test_resume.py shows the step count equals an uninterrupted run's)
    assert max(torch.load(p, weights_only=True)["global_step"] for p in folder.glob("*.ckpt")) == 4


# ---------------------------------------------------------------------------------------------------- rows
def _fs(value: str) -> Callable[[Ctx], list[str]]:
    def prepare(ctx: Ctx) -> list[str]:
        set_header(records(ctx) / "2.hea", 0, 2, value)
        return shard(ctx)

    return prepare


def _truncated_then_replaced(ctx: Ctx) -> list[str]:
    records(ctx)
    good = (ctx.src / "3.dat").read_bytes()
    (ctx.src / "3.dat").write_bytes(good[:1000])
    converted(ctx)
    assert "3" in skipped(ctx)
    (ctx.src / "3.dat").write_bytes(good)
    return shard(ctx, "--records_per_shard", "2")


def _edited_record(ctx: Ctx) -> list[str]:
    records(ctx)
    converted(ctx)
    data = bytearray((ctx.src / "4.dat").read_bytes())
    data[100] ^= 0x10
    (ctx.src / "4.dat").write_bytes(bytes(data))
    return shard(ctx, "--records_per_shard", "2")


def _truncated_shard(ctx: Ctx) -> list[str]:
    records(ctx)
    converted(ctx)
    path = ctx.out / "shard-00001.h5"
    path.write_bytes(path.read_bytes()[:5000])
    return shard(ctx, "--records_per_shard", "2")


def _flipped(dataset: str) -> Callable[[Ctx], list[str]]:
    def prepare(ctx: Ctx) -> list[str]:
        records(ctx)
        converted(ctx)
        flip_byte(ctx.out / "shard-00000.h5", dataset)
        return ["shard", "verify", str(ctx.out)]

    return prepare


def _labels(cells: dict[int, str], *extra: str, sep: str = ",") -> Callable[[Ctx], list[str]]:
    def prepare(ctx: Ctx) -> list[str]:
        records(ctx)
        return shard_labels(ctx, label_table(ctx, cells, sep=sep), *extra)

    return prepare


def _with_records(*extra: str) -> Callable[[Ctx], list[str]]:
    def prepare(ctx: Ctx) -> list[str]:
        records(ctx)
        return shard(ctx, *extra)

    return prepare


def _rerun_with(*extra: str) -> Callable[[Ctx], list[str]]:
    """A finished conversion, then the same folders with a bad option: the finished shards must stay."""

    def prepare(ctx: Ctx) -> list[str]:
        records(ctx)
        converted(ctx)
        return shard(ctx, "--records_per_shard", "2", *extra)

    return prepare


def _rerun_with_table(cells: dict[int, str]) -> Callable[[Ctx], list[str]]:
    def prepare(ctx: Ctx) -> list[str]:
        records(ctx)
        good = label_table(ctx, {i: "4.0" for i in cells}, name="good.csv")
        assert main(shard_labels(ctx, good, "--records_per_shard", "2")) == 0
        return shard_labels(ctx, label_table(ctx, cells), "--records_per_shard", "2")

    return prepare


def _empty_source(ctx: Ctx) -> list[str]:
    ctx.src.mkdir()
    return shard(ctx)


def _table_text(name: str, text: str) -> Callable[[Ctx], list[str]]:
    def prepare(ctx: Ctx) -> list[str]:
        records(ctx)
        (ctx.tmp / name).write_text(text)
        return shard_labels(ctx, ctx.tmp / name)

    return prepare


def _gain_zero(ctx: Ctx) -> list[str]:
    set_header(records(ctx) / "2.hea", 1, 2, "0(6)/mV")
    return shard(ctx)


def _unit(unit: str) -> Callable[[Ctx], list[str]]:
    def prepare(ctx: Ctx) -> list[str]:
        set_header(records(ctx) / "2.hea", 1, 2, f"1716(6)/{unit}")
        return shard(ctx)

    return prepare


def _fewer_samples_in_file(ctx: Ctx) -> list[str]:
    set_header(records(ctx) / "2.hea", 0, 3, "6000")  # the header promises 12 s, the file holds 10 s
    return shard(ctx)


def _out_is_a_file(ctx: Ctx) -> list[str]:
    records(ctx)
    ctx.out.write_text("not a folder\n")
    return shard(ctx)


def _out_under_a_file(ctx: Ctx) -> list[str]:
    records(ctx)
    (ctx.tmp / "file").write_text("x\n")
    return ["shard", "--source", str(ctx.src), "--out", str(ctx.tmp / "file" / "out"), "--progress", "false"]


def _unsafe_checkpoint(ctx: Ctx) -> list[str]:
    path = ctx.tmp / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hook": print}, path)  # unpickling would call into an arbitrary global
    return evaluate(ctx, "test", f"--ckpt_path={path}")


def _truncated_checkpoint(ctx: Ctx) -> list[str]:
    path = ctx.tmp / "cut.ckpt"
    path.write_bytes(ctx.checkpoint.read_bytes()[:10000])
    return evaluate(ctx, "test", f"--ckpt_path={path}")


def _garbage_safetensors(ctx: Ctx) -> list[str]:
    path = ctx.tmp / "weights.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    return fit(ctx, f"--model.pretrained={path}", "--trainer.max_steps=1")


def _bad_last_ckpt(ctx: Ctx) -> list[str]:
    command = fit(ctx, "--trainer.max_steps=4", "--trainer.max_epochs=2")
    assert main(command) == 0
    run = next((ctx.tmp / "logs").rglob("ecgfm-run.json"))
    record = json.loads(run.read_text())
    run.write_text(json.dumps({**record, "finished": False, "pid": 999_999_999, "host": "elsewhere"}))
    last = run.parent / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:4000])  # a kill during a copy, or a full disk
    return command


def _heads_differ(ctx: Ctx) -> list[str]:
    heads = "[{class_path: ecgfm.heads.PotassiumHead, init_args: {name: potassium, loss: huber}}]"
    return evaluate(ctx, "test", f"--ckpt_path={ctx.checkpoint}", f"--model.heads={heads}")


def _no_heads(ctx: Ctx) -> list[str]:
    return ["test", "--config", str(recipe_without_heads(ctx)), f"--data.root={ctx.synthetic}", *run_dirs(ctx)] + [
        f"--ckpt_path={ctx.checkpoint}"
    ]


# ---------------------------------------------------------------------------------------------------- published models
def published(ctx: Ctx) -> Path:
    """The module's checkpoint (net1d-tiny, potassium) published as a folder."""
    from ecgfm.pretrained import ECGModel

    return ECGModel.from_checkpoint(ctx.checkpoint).save_pretrained(ctx.tmp / "model")


def predict(ctx: Ctx, *inputs: str | Path, model: Path | str | None = None) -> list[str]:
    return ["predict", "--model", str(model or published(ctx)), *map(str, inputs)]


def _short_record(ctx: Ctx) -> list[str]:
    """Record 1 cut to 2,000 samples (4 s) in its header and its signal file."""
    src = records(ctx, (1,))
    (src / "1.dat").write_bytes((src / "1.dat").read_bytes()[: 2000 * 12 * 2])
    set_header(src / "1.hea", 0, 3, "2000")
    return predict(ctx, src / "1")


def _no_chest_leads(ctx: Ctx) -> list[str]:
    """Record 1 with its chest leads relabelled as other channels."""
    src = records(ctx, (1,))
    for line in range(7, 13):
        set_header(src / "1.hea", line, 8, f"x{line}")
    return predict(ctx, src / "1.hea")


def _tampered_weights(ctx: Ctx) -> list[str]:
    model = published(ctx)
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-3] ^= 0x01
    (model / "model.safetensors").write_bytes(bytes(data))
    return predict(ctx, records(ctx, (1,)) / "1", model=model)


def _newer_config(ctx: Ctx) -> list[str]:
    model = published(ctx)
    config = yaml.safe_load((model / "config.yaml").read_text())
    (model / "config.yaml").write_text(yaml.safe_dump({**config, "format_version": 99}))
    return predict(ctx, records(ctx, (1,)) / "1", model=model)


def predicted_one_record(ctx: Ctx, out: str, err: str) -> None:
    (row,) = list(csv.DictReader((ctx.tmp / "predictions.csv").open()))
    assert row["record_id"] == "1" and row["n_windows"] == "1"
    assert 0 < float(row["potassium_mmol_l"]) < 20 and row["hyperkalemia"] in ("0", "0.0", "1", "1.0")


ROWS: list[Row] = [
    # --- conversion: the record files
    Row("sampling-rate-negative", _fs("-500"), check=converts(3, {"2": r"2\.hea.*'-500'.*not a positive"})),
    Row("sampling-rate-zero", _fs("0"), check=converts(3, {"2": r"2\.hea.*'0'"})),
    Row("sampling-rate-nan", _fs("nan"), check=converts(3, {"2": r"2\.hea.*'nan'"})),
    Row("sampling-rate-typo-5-hz", _fs("5"), check=converts(3, {"2": r"5 Hz is below"})),
    Row("gain-zero", _gain_zero, check=converts(3, {"2": r"ADC gain 0"})),
    Row("ecg-lead-in-mmhg", _unit("mmHg"), check=converts(3, {"2": r"lead I.*mmHg"})),
    Row("header-longer-than-file", _fewer_samples_in_file, check=converts(3, {"2": r"2\.dat"})),
    Row("truncated-dat-replaced-by-a-good-copy", _truncated_then_replaced, check=rerun_rebuilds(r"3\.dat changed")),
    Row("record-edited-after-conversion", _edited_record, check=rerun_rebuilds(r"4\.dat changed")),
    Row("finished-shard-truncated-on-disk", _truncated_shard, check=rerun_rebuilds(".*")),
    # --- conversion: options and folders
    Row("stride-zero", _with_records("--stride", "0"), error=r"stride.*0"),
    Row("stride-negative", _with_records("--stride", "-5"), error=r"stride.*-5"),
    Row("stride-zero-on-a-rerun-keeps-the-shards", _rerun_with("--stride", "0"), error=r"stride.*0"),
    Row("out-is-a-file", _out_is_a_file, error=r"out /.*/out is not a folder"),
    Row("out-under-a-file", _out_under_a_file, error=r"file/out"),
    Row("source-folder-missing", lambda c: shard(c), error=r"src.*does not exist"),
    Row("no-records-found", _empty_source, error=r"no wfdb records found under .*src"),
    Row("unknown-reader", _with_records("--reader", "scp_ecg"), error=r"unknown source.*'scp_ecg'"),
    Row("arrays-reader-without-table", _with_records("--reader", "arrays"), error=r"reader 'arrays' needs .*'table'"),
    Row(
        "recipe-name-unknown",
        lambda c: ["shard", "--config", "no/such-recipe"],
        error=r"--config no/such-recipe: no such file here and no shipped recipe",
    ),
    # --- conversion: label tables
    Row(
        "decimal-comma-column",
        _labels({1: "4,1", 2: "3,9", 3: "5,2", 4: "4,4"}),
        error=r"column 'potassium'.*decimal comma.*--decimal ,",
    ),
    Row(
        "decimal-comma-column-with-decimal-option",
        _labels({1: "4,1", 2: "3,9", 3: "5,2", 4: "4,4"}, "--decimal", ","),
        check=lambda c, o, e: stored(c) == pytest.approx({"1": 4.1, "2": 3.9, "3": 5.2, "4": 4.4}),
    ),
    Row("label-cell-text", _labels({1: "4.1", 2: "high", 3: "5.0", 4: "4.4"}), check=warned("high", {"2": np.nan})),
    Row("label-cell-one-comma", _labels({1: "4.1", 2: "5,2", 3: "5.0", 4: "4.4"}), check=warned("5,2", {"2": np.nan})),
    Row("label-cell-inf", _labels({1: "4.1", 2: "inf", 3: "5.0", 4: "4.4"}), check=warned("inf", {"2": np.nan})),
    Row("label-cell-1e400", _labels({1: "4.1", 2: "1e400", 3: "5", 4: "4.4"}), check=warned("1e400", {"2": np.nan})),
    Row(
        "label-table-semicolons",
        _labels({1: "4.1", 2: "3.9", 3: "5.0", 4: "4.4"}, sep=";"),
        error=r"labels\.csv.*--separator ';'",
    ),
    Row("label-table-empty", _table_text("empty.csv", ""), error=r"empty\.csv is empty"),
    Row(
        "label-table-missing-column",
        _labels({1: "4.1"}, "--record_column", "ID"),
        error=r"labels\.csv has no column.*'ID'",
    ),
    Row(
        "label-table-record-twice",
        _table_text("twice.csv", "record,potassium\n1,4.1\n1,4.2\n"),
        error=r"twice\.csv.*record '1' appears twice",
    ),
    Row(
        "decimal-comma-table-on-a-rerun-keeps-the-shards",
        _rerun_with_table({1: "4,1", 2: "3,9", 3: "5,2", 4: "4,4"}),
        error=r"column 'potassium'.*--decimal ,",
    ),
    # --- shard verify
    *(
        Row(f"verify-flipped-byte-{d.strip('/').replace('/', '-')}", _flipped(d), exit_code=1, check=verify_fails(d))
        for d in ("/signal", "/lead_mask", "/segment_start")
    ),  # fmt: skip
    Row(
        "verify-help",
        lambda c: ["shard", "verify", "--help"],
        exit_code=0,
        check=lambda c, o, e: "usage: ecgfm shard verify" in o,
    ),
    # --- the model and the data
    Row(
        "manifest-100-hz",
        lambda c: fit(c, f"--data.root={manifest_copy(c, fs=100.0, n_samples=1000)}"),
        error=r"manifest\.json holds 100 Hz x 1000 samples .* reads 500 Hz x 5000 samples",
    ),
    Row(
        "manifest-2.5-s",
        lambda c: fit(c, f"--data.root={manifest_copy(c, n_samples=1250)}"),
        error=r"manifest\.json holds 500 Hz x 1250 samples \(2\.5 s\)",
    ),
    Row(
        "manifest-without-the-models-leads",
        lambda c: fit(c, f"--data.root={manifest_copy(c, lead_names=['I', 'II', 'III', 'aVR', 'aVL', 'aVF'])}"),
        error=r"manifest\.json has leads I, II, III, aVR, aVL, aVF .*missing V1",
    ),
    Row(
        "multilabel-head-on-a-regression-target",
        lambda c: fit(c, "--model.heads=[{kind: multilabel, name: k, target: potassium}]"),
        error=r"head 'k' is a multilabel head.*target 'potassium' is regression",
    ),
    Row(
        "head-target-the-shards-lack",
        lambda c: fit(c, "--model.heads=[{kind: regression, name: na, labels: [sodium]}]"),
        error=r"head 'na' learns target 'na', which the data does not have",
    ),
    Row(
        "data-targets-unknown",
        lambda c: fit(c, "--data.targets=[sodium]"),
        error=r"data\.targets names \['sodium'\].*manifest\.json does not have",
    ),
    Row(
        "unknown-backbone", lambda c: fit(c, "--model.backbone=net1d-huge"), error=r"unknown backbone name 'net1d-huge'"
    ),
    Row("unknown-lead", lambda c: fit(c, "--model.leads=[I, X7]"), error=r"unknown lead name 'X7'"),
    Row(
        "unknown-preprocessing",
        lambda c: fit(c, "--model.preprocessing=wavelet"),
        error=r"preprocessing name 'wavelet'",
    ),
    Row("option-typo", lambda c: fit(c, "--trainer.max_epohcs=3"), error=r"max_epohcs", exit_code=2),
    Row("option-wrong-type", lambda c: fit(c, "--trainer.max_epochs=abc"), error=r"max_epochs", exit_code=2),
    # --- checkpoints
    Row("test-heads-differ-from-the-checkpoint", _heads_differ, error=r"heads differ.*potassium\.loss: 'huber'"),
    Row("test-without-heads-uses-the-checkpoints", _no_heads, check=evaluates_checkpoint_heads),
    Row("test-unsafe-checkpoint", _unsafe_checkpoint, error=r"refusing to load .*unsafe\.ckpt"),
    Row("test-truncated-checkpoint", _truncated_checkpoint, error=r"cut\.ckpt.*truncated or corrupt"),
    Row(
        "test-checkpoint-missing",
        lambda c: evaluate(c, "test", f"--ckpt_path={c.tmp / 'nope.ckpt'}"),
        error=r"nope\.ckpt.*does not exist",
    ),
    Row("pretrained-garbage-safetensors", _garbage_safetensors, error=r"weights\.safetensors.*not a readable"),
    Row("truncated-last-ckpt-on-resume", _bad_last_ckpt, check=resumed_past_bad_last),
    # --- published models: predict, publish, load
    Row(
        "predict-a-raw-record",
        lambda c: [*predict(c, records(c, (1,)) / "1.hea"), "--output", str(c.tmp / "predictions.csv")],
        check=predicted_one_record,
    ),
    Row("predict-record-shorter-than-the-window", _short_record, error=r"1: 4\.00 s long, shorter than the 10-s"),
    Row("predict-record-without-chest-leads", _no_chest_leads, error=r"no record could be predicted.*V1"),
    Row("predict-tampered-weights", _tampered_weights, error=r"model\.safetensors has the wrong sha256"),
    Row("predict-config-of-a-newer-ecgfm", _newer_config, error=r"config\.yaml has format_version 99"),
    Row(
        "predict-unknown-zoo-name",
        lambda c: predict(c, records(c, (1,)) / "1", model="no-such-model"),
        error=r"no zoo model 'no-such-model'; known: .*ludb-diagnoses-net1d-small",
    ),
    Row(
        "predict-record-missing",
        lambda c: predict(c, c.tmp / "nope.hea"),
        error=r"nope.*no such file or folder",
    ),
    Row(
        "publish-a-recipe-instead-of-a-checkpoint",
        lambda c: ["publish", str(c.recipe), str(c.tmp / "out")],
        error=r"recipe\.yaml",
    ),
    Row(
        "publish-unknown-lead-subset",
        lambda c: ["publish", str(c.checkpoint), str(c.tmp / "out"), "--lead-subsets", "I,X7"],
        error=r"unknown lead name 'X7'",
    ),
    Row(
        "fast-dev-run-writes-nothing",
        lambda c: fit(c, "--trainer.fast_dev_run=true"),
        check=writes_nothing,
    ),
]


def _digests(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Synthetic shards, a small recipe (net1d-tiny, potassium) and a checkpoint trained from it."""
    folder = tmp_path_factory.mktemp("catalogue")
    synthetic = folder / "synthetic"
    write_synthetic_shards(synthetic, 64, seed=3, segments_per_shard=64, progress=False)
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "trainer": {
                    "accelerator": "cpu",
                    "max_steps": 2,
                    "limit_val_batches": 1,
                    "limit_test_batches": 1,
                    "num_sanity_val_steps": 0,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "k"}},
                    "callbacks": [{"class_path": "ecgfm.checkpointing.ResumableCheckpoint"}],
                },
                "model": {
                    "backbone": "net1d-tiny",
                    "preprocessing": "zscore",
                    "heads": [{"class_path": "ecgfm.heads.PotassiumHead", "init_args": {"name": "potassium"}}],
                },
                "data": {"batch_size": 16, "targets": ["potassium"]},
            }
        )
    )
    train = Ctx(folder / "train", synthetic, recipe, folder / "none")
    assert main(fit(train)) == 0
    checkpoint = next((folder / "train").rglob("last.ckpt"))
    return synthetic, recipe, checkpoint


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_every_bad_input_gives_a_clear_error_or_a_correct_result(row: Row, shared, tmp_path, capsys):
    ctx = Ctx(tmp_path, *shared)
    argv = row.prepare(ctx)
    capsys.readouterr()
    sources, finished = _digests(ctx.src), _digests(ctx.out)
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert _digests(ctx.src) == sources, "a source file changed"
    if row.error is not None:
        lines = [line for line in err.splitlines() if line.startswith("ecgfm: error")]  # others: notes, warnings
        assert code == (row.exit_code or 1) and len(lines) == 1, (code, err)
        assert re.search(row.error, lines[0]), lines[0]
        assert _digests(ctx.out) == finished, "an error lost or changed a finished output"
    else:
        assert code == (row.exit_code or 0), (code, out, err)
        row.check(ctx, out, err)


def test_the_catalogue_covers_the_issue_and_more():
    assert len(ROWS) >= 45 and len({row.id for row in ROWS}) == len(ROWS)
    outcomes = {CLEAR_ERROR: 0, CORRECT_RESULT: 0}
    for row in ROWS:
        outcomes[CLEAR_ERROR if row.error else CORRECT_RESULT] += 1
    assert outcomes[CLEAR_ERROR] >= 25 and outcomes[CORRECT_RESULT] >= 15
