"""Exported models (ONNX, TorchScript) agree with the PyTorch model on real recordings, outputs and decisions
included; the exported ECGFounder chain matches scipy; the ONNX runner needs no torch; ``ecgfm export`` and
``ecgfm bench infer`` run through the real command line."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.signal
import torch

from ecgfm.commands import main
from ecgfm.export import (
    PARITY_TOLERANCE,
    _near_threshold,
    export_onnx,
    export_torchscript,
    graph_output_names,
    load_exported,
    parity_check,
    record_windows,
)
from ecgfm.onnx_model import CONTRACT_NAME, OnnxModel
from ecgfm.pretrained import ECGModel
from ecgfm.signal import ECGFounderPreprocessing, _median_filter_graph, ecgfounder_preprocess_numpy
from ecgfm.tasks import FineTuneTask

REPO = Path(__file__).resolve().parents[1]
HEADS = [
    {"kind": "multilabel", "name": "dx", "labels": ["AF", "LBBB", "RBBB"]},
    {"kind": "potassium", "labels": ["potassium"], "target_mean": 4.5, "target_std": 1.0},
]


def cinc_records(test_data: Path) -> list[Path]:
    return sorted((test_data / "cinc2021").glob("*.hea"))


def run_command(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A net1d-tiny model with a multilabel head and a potassium head, published as a folder."""
    torch.manual_seed(0)
    task = FineTuneTask(backbone="net1d-tiny", heads=HEADS)
    return task.save_pretrained(tmp_path_factory.mktemp("published") / "model")


@pytest.fixture(scope="module")
def model(published: Path) -> ECGModel:
    return ECGModel.from_pretrained(published)


@pytest.fixture(scope="module")
def onnx_export(published: Path, tmp_path_factory) -> tuple[Path, int, str]:
    """``ecgfm export MODEL --format onnx`` run once: (folder, exit code, printed text)."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    code, printed, _ = run_command(["export", str(published), "--format", "onnx", "--out", str(out)])
    return out, code, printed


@pytest.fixture(scope="module")
def torchscript_export(published: Path, tmp_path_factory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("torchscript") / "export"
    code, printed, _ = run_command(["export", str(published), "--format", "torchscript", "--out", str(out)])
    return out, code, printed


# --- the command ---


@pytest.mark.parametrize("which", ["onnx_export", "torchscript_export"])
def test_export_command_writes_model_contract_and_a_passing_parity_table(which: str, request, model) -> None:
    folder, code, printed = request.getfixturevalue(which)
    assert code == 0, printed
    runtime = "onnx" if which == "onnx_export" else "torchscript"
    contract = json.loads((folder / CONTRACT_NAME).read_text())
    file = folder / contract["export"]["file"]
    assert file.is_file() and contract["export"]["runtime"] == runtime
    assert f"wrote {file}" in printed and ("KB" in printed or "MB" in printed)
    assert "8 windows of 8 shipped LUDB recordings" in printed
    for name in model.output_names():  # every output is a row of the parity table
        assert name in printed
    assert "parity passed" in printed


def test_export_command_fails_in_one_line_when_the_export_differs(onnx_export, published, tmp_path, monkeypatch):
    folder = onnx_export[0]

    def copy_export(model, out, format, opset=None):  # the real export, already made: copy it
        shutil.copytree(folder, out)
        return Path(out) / "model.onnx"

    original = OnnxModel._run

    def drifting(self, signal, mask):  # an exported graph that drifts by 1e-3 on every output
        return [value + 1e-3 for value in original(self, signal, mask)]

    monkeypatch.setattr("ecgfm.export.export_model", copy_export)
    monkeypatch.setattr(OnnxModel, "_run", drifting)
    code, printed, err = run_command(["export", str(published), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("ecgfm: error: export parity: output 'p_AF'")
    assert "differs from PyTorch by 0.001" in err and "not verified" in err


def test_export_command_refuses_a_model_without_heads(tmp_path) -> None:
    from ecgfm.backbones import create_backbone

    config = create_backbone("net1d-tiny").model_config
    ECGModel({"backbone": config.to_dict(), "input": config.input.to_dict(), "adapter": "identity"}).save_pretrained(
        tmp_path / "bare"
    )
    code, _, err = run_command(["export", str(tmp_path / "bare"), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert code == 1 and "has no heads" in err


# --- parity on real recordings ---


@pytest.mark.parametrize("which", ["onnx_export", "torchscript_export"])
def test_exported_model_agrees_with_pytorch_on_real_recordings(which: str, request, model, test_data) -> None:
    """Every output, probabilities, mmol/L and 0/1 decisions, within 1e-4 on the CinC 2021 records."""
    folder = request.getfixturevalue(which)[0]
    result = parity_check(model, folder, cinc_records(test_data))
    assert result["windows"] == 20 and result["passed"], result["failure"]
    for name, entry in result["outputs"].items():
        assert entry["max_abs_diff"] <= PARITY_TOLERANCE, name
        if entry["type"] == "decision":
            assert entry["mismatches"] == entry["borderline"], name
    assert {entry["type"] for entry in result["outputs"].values()} == {"score", "decision"}
    # the batch dimension is free: one record alone gives what it gives in a batch
    exported = load_exported(folder)
    signal, mask, _ = record_windows(cinc_records(test_data)[:3], model.input_contract.to_dict())
    batch, alone = exported.predict_numpy(signal, mask), exported.predict_numpy(signal[1:2], mask[1:2])
    for name in model.output_names():
        assert abs(float(alone[name][0]) - float(batch[name][1])) <= 1e-6


def test_lead_I_model_with_zero_fill_adapter_exports_in_both_formats(tmp_path, test_data) -> None:
    torch.manual_seed(1)
    task = FineTuneTask(backbone="net1d-tiny", heads=HEADS[:1], leads=["I"], adapter="zero_fill")
    model = ECGModel.from_task(task)
    records = cinc_records(test_data)
    for folder, export in ((tmp_path / "onnx", export_onnx), (tmp_path / "ts", export_torchscript)):
        file = export(model, folder)
        contract = json.loads((folder / CONTRACT_NAME).read_text())
        assert contract["export"]["inputs"][0]["shape"] == ["batch", 1, 5000]
        result = parity_check(model, file, records)
        assert result["passed"], result["failure"]
        assert max(entry["max_abs_diff"] for entry in result["outputs"].values()) <= PARITY_TOLERANCE


def test_parity_counts_a_decision_flipped_at_its_threshold_as_borderline() -> None:
    rule = {"output": "AF", "kind": "compare", "score": "p_AF", "op": ">=", "value": 0.5}
    a = {"p_AF": np.array([0.50000, 0.9, 0.2]), "AF": np.array([1.0, 1.0, 0.0])}
    b = {"p_AF": np.array([0.49998, 0.9, 0.2]), "AF": np.array([0.0, 0.0, 0.0])}
    np.testing.assert_array_equal(_near_threshold(rule, a, b, 1e-4), [True, False, False])


# --- the contract and the runner ---


def test_contract_records_the_input_contract_and_the_output_names(onnx_export, model) -> None:
    folder = onnx_export[0]
    contract = json.loads((folder / CONTRACT_NAME).read_text())
    signal, mask = contract["export"]["inputs"]
    assert signal["name"] == "signal" and signal["shape"] == ["batch", 12, 5000] and signal["units"] == "mV"
    assert signal["fs"] == 500.0 and signal["lead_names"] == list(model.leads)
    assert mask["name"] == "lead_mask" and mask["dtype"] == "bool"
    assert [o["output"] for o in contract["export"]["outputs"]] == model.output_names()
    assert contract["contract"]["input"]["preprocessing"]["name"] == "ecgfounder"
    exported = OnnxModel(folder)
    assert exported.output_names() == model.output_names()
    expected = model.published_config()
    assert exported.published_config() == json.loads(json.dumps(expected))  # config.yaml's content, as JSON


def test_graph_output_names_are_safe_and_unique() -> None:
    names = graph_output_names(["dx/AF", "dx_AF", "p_AF", "1x", "signal"])
    assert names == ["dx_AF", "dx_AF_2", "p_AF", "_1x", "signal_2"]


def test_onnx_model_refuses_a_corrupted_file_naming_it(onnx_export, tmp_path) -> None:
    folder = tmp_path / "export"
    shutil.copytree(onnx_export[0], folder)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{folder / 'model.onnx'} has the wrong sha256"):
        OnnxModel(folder)
    (folder / CONTRACT_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONTRACT_NAME):
        OnnxModel(folder)


def test_onnx_model_names_the_expected_input_on_a_wrong_shape(onnx_export) -> None:
    exported = OnnxModel(onnx_export[0])
    with pytest.raises(ValueError, match=r"reads \[batch, 12 leads \(I, II, .*V6\), 5000 samples at 500 Hz\] in mV"):
        exported.predict_numpy(np.zeros((1, 12, 2500), dtype=np.float32))


def test_onnx_model_module_imports_nothing_that_needs_torch() -> None:
    tree = ast.parse((REPO / "ecgfm" / "onnx_model.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    allowed = {"__future__", "json", "abc", "collections.abc", "pathlib", "typing", "numpy", "onnxruntime"}
    assert imported <= allowed | {"ecgfm.io", "ecgfm.decisions"}, imported - allowed


def test_onnx_model_predicts_with_torch_blocked(onnx_export, test_data) -> None:
    """A deployment with no torch: ``import torch`` raises, yet the exported model loads and predicts."""
    script = f"""
import importlib.abc, sys, types
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
# ecgfm/__init__ imports the torch side of the library; the ONNX path must not need it
package = types.ModuleType("ecgfm")
package.__path__ = [{str(REPO / "ecgfm")!r}]
sys.modules["ecgfm"] = package
import numpy as np, scipy.io
from ecgfm.onnx_model import OnnxModel
model = OnnxModel({str(onnx_export[0])!r})
x = scipy.io.loadmat({str(test_data / "cinc2021" / "E07500.mat")!r})["val"][None].astype(np.float32) / 1000
out = model.predict_numpy(x)
assert "torch" not in sys.modules
print(sorted(out)[0], float(out["potassium_mmol_l"][0]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("AF ")


# --- the exported ECGFounder chain and its median filter ---


def test_exported_ecgfounder_chain_matches_the_scipy_reference(test_data) -> None:
    import onnxruntime

    chain = ECGFounderPreprocessing().eval()
    names = ("E07500", "JS20004")  # JS20004 stores V2, V4 and V6 as zeros
    records = np.stack([scipy.io.loadmat(test_data / "cinc2021" / f"{r}.mat")["val"] / 1000.0 for r in names])
    x = torch.tensor(records, dtype=torch.float32)
    program = torch.onnx.export(
        chain, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), verbose=False
    )
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the record length is fixed by the model's contract
        traced = torch.jit.trace(chain, (x,), check_trace=False)(x).numpy()
    for i, record in enumerate(records):
        reference = ecgfounder_preprocess_numpy(record)
        assert np.abs(got[i] - reference).max() < 1e-3  # the tolerance the torch chain meets (test_signal.py)
        assert np.abs(traced[i] - reference).max() < 1e-3
    # exporting must leave the eager chain (its cached filter taps) intact
    assert np.abs(chain(x)[0].numpy() - ecgfounder_preprocess_numpy(records[0])).max() < 1e-3


@pytest.mark.parametrize(("n_time", "kernel"), [(5000, 201), (3001, 201), (150, 201), (37, 5), (10, 1)])
def test_graph_median_filter_is_scipy_medfilt_in_float32(n_time: int, kernel: int) -> None:
    rng = np.random.default_rng(n_time)
    x = rng.standard_normal((4, n_time)).cumsum(-1)
    x[1] = np.round(x[1])  # many ties
    x[2, n_time // 3 : n_time // 2] = 0.0  # a flat run, like the zero padding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy: "kernel_size exceeds volume extent" for rows shorter than it
        reference = np.stack([scipy.signal.medfilt(row, kernel) for row in x])
    got = _median_filter_graph(torch.tensor(x), kernel).numpy()
    np.testing.assert_array_equal(got, reference.astype(np.float32).astype(np.float64))


# --- the benchmark ---


def test_bench_infer_quick_runs_the_three_runtimes_side_by_side(tmp_path) -> None:
    out = tmp_path / "infer.json"
    args = ["bench", "infer", "--quick", "true", "--inputs", "[lead-I]", "--json_out", str(out)]
    code, printed, _ = run_command(args)
    assert code == 0
    assert "ecgfm bench infer" in printed and "x eager" in printed
    rows = json.loads(out.read_text())["rows"]
    runtimes = {(row["backbone"], row["runtime"]) for row in rows}
    for runtime in ("eager", "torchscript", "onnxruntime"):
        assert ("net1d-tiny", runtime) in runtimes and ("preprocessing only (ecgfounder)", runtime) in runtimes
    for row in rows:
        assert row["p50_ms"] > 0 and row["records_per_s"] > 0
        if row["runtime"] != "eager":
            assert row["max_abs_diff_vs_eager"] <= PARITY_TOLERANCE, row
