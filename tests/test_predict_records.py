"""``ecgfm predict --model DIR RECORD...`` on raw records: leads by name, resampling, windows aggregated into one
prediction per record, batch mode with a summary of the records that could not be predicted, and a path with no
torch import for the ONNX runtime."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch
import wfdb

from ecgfm.commands import _predicts_records, main
from ecgfm.data.sources import ChallengeReader, WfdbReader
from ecgfm.decisions import apply_decisions
from ecgfm.evaluation.aggregate import aggregate_windows, window_rows
from ecgfm.leads import STANDARD_LEADS, canonical_lead
from ecgfm.pretrained import ECGModel
from ecgfm.record_windows import model_windows
from ecgfm.tasks import FineTuneTask

REPO = Path(__file__).resolve().parents[1]
HEADS = [{"kind": "multilabel", "name": "dx", "labels": ["AF", "SR"]}, {"kind": "potassium", "labels": ["potassium"]}]
SCORES = ("p_AF", "p_SR", "potassium_mmol_l")
LIMB = ["I", "II", "III", "aVR", "aVL", "aVF"]


def save_model(folder: Path, card: dict | None = None, **task) -> Path:
    torch.manual_seed(0)
    FineTuneTask(backbone="net1d-tiny", heads=HEADS, **task).save_pretrained(folder, card=card)
    return folder


@pytest.fixture(scope="module")
def model12(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("model12") / "model")


@pytest.fixture(scope="module")
def ptb_record(test_data) -> Path:
    return test_data / "ptbdb-s0010" / "s0010_re"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_wfdb(folder: Path, name: str, signal: np.ndarray, leads: list[str], fs: float) -> Path:
    """A WFDB record (format 16, 1 µV per unit) of ``signal`` [L, T] mV."""
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        name,
        fs=fs,
        units=["mV"] * len(leads),
        sig_name=leads,
        p_signal=signal.T.astype(np.float64),
        fmt=["16"] * len(leads),
        adc_gain=[1000.0] * len(leads),
        baseline=[0] * len(leads),
        write_dir=str(folder),
    )
    return folder / name


# ------------------------------------------------------------------------------------------------ the acceptance test


def test_a_1000_hz_15_signal_record_gives_the_mean_of_its_windows_resampled_by_hand(model12, ptb_record, tmp_path):
    out = tmp_path / "out.csv"
    assert main(["predict", "--model", str(model12), str(ptb_record), "--output", str(out)]) == 0
    (row,) = read_csv(out)

    raw = wfdb.rdrecord(str(ptb_record))  # 15 signals at 1000 Hz: the 12 leads, then Frank's vx vy vz
    names = [canonical_lead(name) for name in raw.sig_name]
    x = np.stack([raw.p_signal[:, names.index(lead)] for lead in STANDARD_LEADS])
    x = scipy.signal.resample_poly(x, 1, 2, axis=-1)  # 1000 -> 500 Hz
    model = ECGModel.from_pretrained(model12)
    windows = []
    for start in (0, 5000, 10000):  # 38.4 s: three full 10-s windows, the 8.4-s tail dropped
        with torch.no_grad():
            out_window = model.predict(torch.tensor(x[None, :, start : start + 5000], dtype=torch.float32))
        windows.append({name: float(value[0]) for name, value in out_window.items()})
    mean = {name: np.mean([w[name] for w in windows]) for name in SCORES}

    assert row["record_id"] == "s0010_re" and row["n_windows"] == "3"
    for name in SCORES:
        assert float(row[name]) == pytest.approx(mean[name], abs=1e-6), name
    decided = apply_decisions({k: np.array([v]) for k, v in mean.items()}, model.decision_rules())
    for name, value in decided.items():
        assert row[name] == str(int(value[0])), name
    assert list(row)[:3] == ["record_id", "path", "n_windows"] and list(row)[3:] == model.output_names()


# ------------------------------------------------------------------------------------------------ batch mode


def test_a_folder_is_predicted_record_by_record_and_the_unreadable_ones_are_listed(
    model12, test_data, tmp_path, capsys
):
    bad = tmp_path / "bad"
    bad.mkdir()
    for suffix in (".hea", ".mat"):
        shutil.copy(test_data / "cinc2021" / f"E07500{suffix}", bad / f"E07500{suffix}")
    mat = bad / "E07500.mat"
    mat.write_bytes(mat.read_bytes()[:300])  # truncated
    out = tmp_path / "out.csv"
    code = main(["predict", "--model", str(model12), str(test_data / "cinc2021"), str(bad), "--output", str(out)])
    assert code == 1  # some records failed: a script notices, and still gets the others
    captured = capsys.readouterr()
    rows = read_csv(out)
    skipped = {Path(r["record"]).name: r["reason"] for r in read_csv(tmp_path / "out-skipped.csv")}
    assert len(rows) == 18 and all(r["n_windows"] == "1" for r in rows)
    assert [r["record_id"] for r in rows] == sorted(r["record_id"] for r in rows)
    assert set(skipped) == {"E07500", "JS20004", "JS20008"}
    assert str(bad / "E07500") in skipped["E07500"] and ".mat" in skipped["E07500"]
    assert "V2 V4 V6 flat or NaN" in skipped["JS20004"]  # stored as zeros: missing, and no card subset covers it
    assert "3 of 21 records could not be predicted" in captured.err
    assert str(bad / "E07500") in captured.err

    # windows of many records share batches: the same numbers as one window per forward pass
    single = tmp_path / "single.csv"
    record = test_data / "cinc2021" / "HR06002.hea"
    assert main(["predict", "--model", str(model12), str(record), "--batch-size", "1", "--output", str(single)]) == 0
    (alone,) = read_csv(single)
    (batched,) = [r for r in rows if r["record_id"] == "HR06002"]
    for name in SCORES:
        assert float(alone[name]) == pytest.approx(float(batched[name]), abs=1e-6)


def test_a_record_that_does_not_exist_is_listed_and_the_rest_predicted(model12, test_data, tmp_path, capsys):
    out = tmp_path / "out.json"
    args = ["predict", "--model", str(model12), str(test_data / "cinc2021" / "E07501.mat"), str(tmp_path / "nope")]
    assert main([*args, "--output", str(out)]) == 1
    data = json.loads(out.read_text())
    assert [r["record_id"] for r in data["records"]] == ["E07501"]
    assert data["skipped"][0]["path"] == str(tmp_path / "nope") and "no such file" in data["skipped"][0]["reason"]


# ------------------------------------------------------------------------------------------------ aggregation options


def test_aggregate_none_gives_every_window_and_mean_and_max_are_made_from_them(model12, ptb_record, tmp_path):
    outs = {}
    for method in ("none", "mean", "max"):
        outs[method] = tmp_path / f"{method}.csv"
        args = ["predict", "--model", str(model12), str(ptb_record), "--aggregate", method]
        assert main([*args, "--output", str(outs[method])]) == 0
    windows = read_csv(outs["none"])
    assert [(w["window"], float(w["start_s"])) for w in windows] == [("0", 0.0), ("1", 10.0), ("2", 20.0)]
    assert list(windows[0])[:4] == ["record_id", "path", "window", "start_s"]
    (mean,) = read_csv(outs["mean"])
    (peak,) = read_csv(outs["max"])
    for name in SCORES:
        values = [float(w[name]) for w in windows]
        assert float(mean[name]) == pytest.approx(np.mean(values), abs=1e-6)
        assert float(peak[name]) == pytest.approx(max(values), abs=1e-7)
    assert peak["AF"] == str(int(float(peak["p_AF"]) >= 0.5))


def test_decisions_are_made_again_on_the_aggregated_scores():
    rules = [{"output": "AF", "kind": "compare", "score": "p_AF", "op": ">=", "value": 0.5}]
    outputs = {"p_AF": np.array([0.2, 0.7, 0.7]), "AF": np.array([0.0, 1.0, 1.0])}
    mean = aggregate_windows(outputs, ["p_AF"], rules, "mean")
    assert mean == {"n_windows": 3, "p_AF": pytest.approx(0.5333333), "AF": 1.0}
    assert aggregate_windows(outputs, ["p_AF"], rules, "max")["p_AF"] == pytest.approx(0.7)
    low = aggregate_windows({"p_AF": np.array([0.2, 0.6, 0.6]), "AF": np.array([0.0, 1.0, 1.0])}, ["p_AF"], rules)
    assert low["AF"] == 0.0  # two of three windows say AF, but the record's mean probability is below threshold
    assert [r["start_s"] for r in window_rows(outputs, [0.0, 10.0, 20.0])] == [0.0, 10.0, 20.0]
    with pytest.raises(ValueError, match="one row per record"):
        aggregate_windows(outputs, ["p_AF"], rules, "none")


def test_json_output_names_the_model_its_input_contract_and_units(model12, test_data, tmp_path):
    out = tmp_path / "predictions.json"
    records = [str(test_data / "cinc2021" / name) for name in ("E07501", "HR06000.hea")]
    assert main(["predict", "--model", str(model12), *records, "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "net1d-tiny" and data["aggregate"] == "mean" and data["runtime"] == "torch"
    assert data["input"]["fs"] == 500.0 and data["input"]["lead_names"] == list(STANDARD_LEADS)
    assert data["outputs"]["potassium_mmol_l"]["unit"] == "mmol/L"
    assert data["outputs"]["p_AF"]["unit"] == "probability"
    assert [r["record_id"] for r in data["records"]] == ["E07501", "HR06000"]
    first = data["records"][0]
    assert first["n_windows"] == 1 and set(first["outputs"]) >= {"p_AF", "AF", "potassium_mmol_l", "hyperkalemia"}
    assert first["outputs"]["AF"] in (0, 1) and data["skipped"] == []
    assert (tmp_path / "predictions-skipped.csv").read_text().strip() == "record,reason"


def test_without_output_a_table_is_printed(model12, ptb_record, capsys):
    assert main(["predict", "--model", str(model12), str(ptb_record)]) == 0
    out = capsys.readouterr().out
    assert "s0010_re" in out and "p_AF" in out and "3 more columns in --output" in out


# ------------------------------------------------------------------------------------------------ leads and lengths


def test_a_lead_i_model_reads_lead_i_of_a_12_lead_record(test_data, tmp_path):
    folder = save_model(tmp_path / "lead-i", leads=["I"], adapter="zero_fill")
    out = tmp_path / "out.csv"
    record = test_data / "cinc2021" / "E07500"
    assert main(["predict", "--model", str(folder), str(record), "--output", str(out)]) == 0
    (row,) = read_csv(out)
    signal = ChallengeReader().read(record)
    lead_i = signal.signal[list(signal.lead_names).index("I")][None, None, :5000]
    direct = ECGModel.from_pretrained(folder).predict_numpy(lead_i)
    assert float(row["p_AF"]) == pytest.approx(float(direct["p_AF"][0]), abs=1e-6)


def test_missing_leads_fail_unless_the_card_serves_the_leads_the_record_has(test_data, model12, tmp_path, capsys):
    record = ChallengeReader().read(test_data / "cinc2021" / "E07501")
    limb = np.stack([record.signal[record.lead_names.index(lead)] for lead in LIMB])
    path = write_wfdb(tmp_path / "records", "limb", limb, LIMB, 500)
    assert main(["predict", "--model", str(model12), str(path)]) == 1
    err = capsys.readouterr().err
    assert "lacks V1 V2 V3 V4 V5 V6" in err and "no smaller lead set it serves" in err

    card = {"lead_subsets": [LIMB]}
    served = save_model(tmp_path / "limb-model", card=card)
    out = tmp_path / "out.csv"
    assert main(["predict", "--model", str(served), str(path), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "leads V1 V2 V3 V4 V5 V6 absent: zero-filled and masked" in err
    assert read_csv(out)[0]["n_windows"] == "1"
    windows = model_windows(
        WfdbReader().read(path), {"fs": 500, "n_samples": 5000, "lead_names": STANDARD_LEADS}, [LIMB]
    )
    assert windows.lead_mask.tolist() == [[True] * 6 + [False] * 6] and not windows.signal[0, 6:].any()


def test_a_record_shorter_than_a_window_fails_with_its_length(model12, tmp_path, capsys):
    path = write_wfdb(tmp_path, "short", np.random.default_rng(0).normal(size=(12, 1000)), list(STANDARD_LEADS), 250)
    assert main(["predict", "--model", str(model12), str(path)]) == 1
    assert "4.00 s long, shorter than the 10-s window the model reads" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the command line


def test_predict_goes_to_lightning_only_with_a_recipe(capsys):
    assert _predicts_records(["--model", "m", "x.hea"]) and _predicts_records(["--help"]) and _predicts_records([])
    assert not _predicts_records(["-c", "recipe.yaml", "--ckpt_path", "x.ckpt"])
    assert not _predicts_records(["--config=r.yaml", "--model=model.yaml"])
    assert not _predicts_records(["--data.root", "shards", "--model.backbone", "net1d-tiny"])
    assert main(["predict", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--runtime {torch,onnx}" in out and "ecgfm predict -c RECIPE --ckpt_path CKPT" in out


# -------------------------------------------------------------------------------------------- no torch on the ONNX path

NO_TORCH = """
import sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "lightning", "torchmetrics", "pytorch_lightning"):
            raise ImportError(f"{name} is blocked: this path must not import it")


sys.meta_path.insert(0, NoTorch())

import ecgfm, ecgfm.record_windows, ecgfm.evaluation.aggregate, ecgfm.commands, ecgfm.data.convert  # noqa
from ecgfm.registry import SOURCES

record = SOURCES.create("wfdb").read(sys.argv[2])
assert record.signal.shape == (15, 38400), record.signal.shape
assert {"arrays", "challenge", "ptbxl", "wfdb"} <= set(SOURCES.names())


from ecgfm.commands import main

code = main(["predict", "--model", sys.argv[1], "--runtime", "onnx", sys.argv[2], "--output", sys.argv[3]])
assert code == 0, code
blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lightning"))
assert not blocked, blocked
print("no torch")
"""


def test_the_onnx_runtime_path_imports_no_torch(model12, ptb_record, tmp_path):
    """An exported model run by `ecgfm predict --runtime onnx` in a process where torch cannot be imported gives
    what the PyTorch model gives on the same record (within the export's 1e-4)."""
    from ecgfm.export import export_onnx
    from ecgfm.pretrained import ECGModel

    exported = tmp_path / "onnx"
    export_onnx(ECGModel.from_pretrained(model12), exported)
    out = tmp_path / "out.csv"
    script = tmp_path / "no_torch.py"
    script.write_text(textwrap.dedent(NO_TORCH))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(script), str(exported), str(ptb_record), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0 and "no torch" in result.stdout, result.stderr[-3000:]
    (row,) = read_csv(out)
    assert main(["predict", "--model", str(model12), str(ptb_record), "--output", str(tmp_path / "torch.csv")]) == 0
    (expected,) = read_csv(tmp_path / "torch.csv")
    assert row["n_windows"] == expected["n_windows"] == "3"
    for name in ("p_AF", "p_SR", "potassium_mmol_l"):
        assert abs(float(row[name]) - float(expected[name])) <= 1e-4, name
    for name in ("AF", "SR", "hyperkalemia"):
        assert row[name] == expected[name], name
