"""A published model as one ONNX or TorchScript graph: raw mV in, named outputs out, preprocessing and each head's
post-processing inside, so what runs in deployment is what was validated.

``export_onnx`` / ``export_torchscript`` write the model file and ``contract.json`` (the published config plus the
graph's inputs, outputs and the file's sha256) into a folder; :func:`parity_check` runs real recordings through the
PyTorch model and the exported one and reports the largest difference per output. ``ecgfm export`` runs all three.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ecgfm.io import atomic_write, atomic_write_bytes, atomic_write_json, fsync_folder, sha256sum
from ecgfm.onnx_model import CONTRACT_NAME, EXPORT_KEY, MAX_BATCH, ExportedModel, OnnxModel, read_contract
from ecgfm.pretrained import ECGModel

__all__ = [
    "EXPORT_FORMATS",
    "ONNX_NAME",
    "PARITY_TOLERANCE",
    "TORCHSCRIPT_NAME",
    "ExportedModule",
    "TorchScriptModel",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "graph_output_names",
    "load_exported",
    "parity_check",
    "record_windows",
    "shipped_records",
]

EXPORT_FORMATS = ("onnx", "torchscript")
ONNX_NAME = "model.onnx"
TORCHSCRIPT_NAME = "model.torchscript.pt"
#: Largest difference (max abs) an exported model may show against the PyTorch model on any output.
PARITY_TOLERANCE = 1e-4
#: Batch of the example input a graph is recorded with (2, not 1, so the batch dimension is not fixed to 1).
EXAMPLE_BATCH = 2


class ExportedModule(nn.Module):
    """``ECGModel.predict`` as a graph: ``(signal float32 [B, L, T] mV, lead_mask bool [B, L])`` -> one float32
    ``[B]`` tensor per public output, in ``model.output_names()`` order (graphs return tuples, not dicts)."""

    def __init__(self, model: ECGModel) -> None:
        super().__init__()
        if not model.heads:
            raise ValueError(
                f"the model {model.name!r} has no heads: an export gives named predictions, and it has none to give"
            )
        self.model = model.eval()
        self.names = model.output_names()

    def forward(self, signal: Tensor, lead_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.model.predict(signal, lead_mask)
        return tuple(out[name] for name in self.names)


def graph_output_names(public: Sequence[str]) -> list[str]:
    """Graph-safe output names (letters, digits, ``_``), unique: ``dx/AF`` -> ``dx_AF``, a clash gets ``_2``."""
    out: list[str] = []
    for name in public:
        base = re.sub(r"[^A-Za-z0-9_]", "_", name) or "output"
        if base[0].isdigit():
            base = f"_{base}"
        candidate, n = base, 1
        while candidate in out or candidate in ("signal", "lead_mask"):
            n += 1
            candidate = f"{base}_{n}"
        out.append(candidate)
    return out


def _example(model: ECGModel) -> tuple[Tensor, Tensor]:
    """A real-sized example input (zeros would do for shapes; a gentle random signal keeps every branch honest)."""
    generator = torch.Generator().manual_seed(0)
    shape = (EXAMPLE_BATCH, len(model.leads), model.input_contract.n_samples)
    signal = torch.randn(shape, generator=generator) * 0.1
    return signal, torch.ones(shape[:2], dtype=torch.bool)


def _write_contract(model: ECGModel, folder: Path, runtime: str, file: Path, extra: Mapping[str, Any]) -> Path:
    """``contract.json``: the published config plus the runtime, file, checksum and graph inputs/outputs."""
    names = model.output_names()
    contract = model.published_config()
    leads, n_samples = list(model.leads), model.input_contract.n_samples
    contract[EXPORT_KEY] = {
        "runtime": runtime,
        "file": file.name,
        "sha256": sha256sum(file),
        "bytes": file.stat().st_size,
        "inputs": [
            {
                "name": "signal",
                "dtype": "float32",
                "shape": ["batch", len(leads), n_samples],
                "units": model.input_contract.units,
                "fs": model.input_contract.fs,
                "lead_names": leads,
            },
            {"name": "lead_mask", "dtype": "bool", "shape": ["batch", len(leads)], "meaning": "True: lead recorded"},
        ],
        "outputs": [
            {"name": graph, "output": public, "dtype": "float32", "shape": ["batch"]}
            for graph, public in zip(graph_output_names(names), names, strict=True)
        ],
        "torch_version": torch.__version__,
        **extra,
    }
    path = atomic_write_json(folder / CONTRACT_NAME, contract)  # last: a folder without it is not an export
    fsync_folder(folder)
    return path


def export_onnx(model: ECGModel, folder: str | Path, opset: int | None = None) -> Path:
    """``model.onnx`` (torch.onnx's dynamo exporter, batch dimension dynamic, inputs ``signal`` and ``lead_mask``,
    outputs named by :func:`graph_output_names`) and ``contract.json`` in ``folder``; returns the model file."""
    import onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = ExportedModule(model)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals, not on this model
        program = torch.onnx.export(
            module,
            _example(model),
            dynamo=True,
            input_names=["signal", "lead_mask"],
            output_names=graph_output_names(module.names),
            dynamic_shapes={"signal": {0: batch}, "lead_mask": {0: batch}},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    onnx.checker.check_model(proto)
    file = atomic_write_bytes(folder / ONNX_NAME, proto.SerializeToString())
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    _write_contract(model, folder, "onnx", file, {"opset": opsets.get("ai.onnx")})
    return file


def export_torchscript(model: ECGModel, folder: str | Path) -> Path:
    """``model.torchscript.pt`` (``torch.jit.trace``: the batch dimension stays free) and ``contract.json`` in
    ``folder``; returns the model file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = ExportedModule(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape arithmetic the trace records as constants
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated: it still serves C++ deployments
        # check_trace would compare against the eager pass, whose median is scipy's in float64: parity_check does
        traced = torch.jit.trace(module, _example(model), check_trace=False)
        file = folder / TORCHSCRIPT_NAME
        with atomic_write(file) as f:
            torch.jit.save(traced, f)
    _write_contract(model, folder, "torchscript", file, {})
    return file


def export_model(model: ECGModel, folder: str | Path, format: str, opset: int | None = None) -> Path:
    """:func:`export_onnx` or :func:`export_torchscript` by name."""
    if format == "onnx":
        return export_onnx(model, folder, opset)
    if format == "torchscript":
        return export_torchscript(model, folder)
    raise ValueError(f"unknown export format {format!r}; known: {', '.join(EXPORT_FORMATS)}")


class TorchScriptModel(ExportedModel):
    """A TorchScript export, loaded with ``torch.jit.load`` (no ecgfm classes needed), on the CPU."""

    runtime = "torchscript"

    def __init__(self, folder: str | Path, max_batch: int = MAX_BATCH) -> None:
        super().__init__(folder, max_batch)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                self.module = torch.jit.load(str(self.path), map_location="cpu").eval()
        except RuntimeError as err:
            raise ValueError(f"{self.path} cannot be loaded by TorchScript: {' '.join(str(err).split())}") from None

    @torch.no_grad()
    def _run(self, signal: np.ndarray, lead_mask: np.ndarray) -> Sequence[np.ndarray]:
        out = self.module(torch.from_numpy(signal), torch.from_numpy(lead_mask))
        return [tensor.numpy() for tensor in out]


def load_exported(path: str | Path, threads: int | None = None) -> ExportedModel:
    """The exported model in folder ``path`` (or ``path``'s folder, for its model file), in the runtime it names;
    ``threads``: ONNX Runtime's intra-op threads."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    runtime = read_contract(folder)[EXPORT_KEY]["runtime"]
    if runtime == "onnx":
        return OnnxModel(folder, threads=threads)
    if runtime == "torchscript":
        return TorchScriptModel(folder)  # it runs on torch's threads (torch.set_num_threads)
    raise ValueError(f"{folder / CONTRACT_NAME}: unknown runtime {runtime!r}; known: {', '.join(EXPORT_FORMATS)}")


# ----------------------------------------------------------------- parity on real recordings


def shipped_records(n: int) -> list[Path]:
    """The first ``n`` LUDB recordings that ship inside the package (10 s, 500 Hz, 12 leads; ``.hea`` paths)."""
    from ecgfm.quickstart import DATA_DIR

    headers = sorted((DATA_DIR / "data").glob("*.hea"), key=lambda p: (len(p.stem), p.stem))
    if not headers:
        raise FileNotFoundError(f"{DATA_DIR / 'data'}: no shipped LUDB recordings (*.hea) to check an export on")
    return headers[:n]


def record_windows(
    paths: Iterable[str | Path],
    input_contract: Mapping[str, Any],
    reader: str = "wfdb",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every full window of each record as ``ecgfm predict`` cuts it (:func:`ecgfm.record_windows.model_windows`:
    leads by name, resampled to the contract's rate): ``(signal float32 [N, L, T] mV, lead_mask bool [N, L], ids)``.

    Made to compare runtimes on the same input: a record lacking some of the model's leads (or holding them flat)
    is still used, those leads zero-filled and masked, as a model card's lead subsets would let it be.
    """
    from ecgfm.record_windows import model_windows
    from ecgfm.registry import SOURCES

    source = SOURCES.create(reader)
    any_lead = [(lead,) for lead in input_contract["lead_names"]]
    signals, masks, ids = [], [], []
    for path in paths:
        windows = model_windows(source.read(Path(path)), input_contract, lead_subsets=any_lead)
        signals.append(windows.signal)
        masks.append(windows.lead_mask)
        ids += [f"{windows.record_id}@{start}" for start in windows.starts]
    if not ids:
        raise ValueError("no records given for the parity check")
    return np.concatenate(signals), np.concatenate(masks), ids


def parity_check(
    model: ECGModel,
    exported: str | Path | ExportedModel,
    records: Sequence[str | Path],
    tolerance: float = PARITY_TOLERANCE,
    reader: str = "wfdb",
) -> dict[str, Any]:
    """Run the windows of ``records`` through ``model`` (PyTorch, eager) and the exported model; per output the
    largest absolute difference, and for decisions (0/1, classes) the windows that disagree.

    A decision that flips where the scores it reads agree within ``tolerance`` and sit within it of the threshold
    is counted as ``borderline`` (reported, not a failure). ``passed`` is False and ``failure`` one line naming the
    output and the difference when a score differs by more than ``tolerance`` or a decision flips elsewhere.
    """
    exported = exported if isinstance(exported, ExportedModel) else load_exported(exported)
    signal, lead_mask, ids = record_windows(records, model.input_contract.to_dict(), reader)
    reference = model.predict_numpy(signal, lead_mask)
    got = exported.predict_numpy(signal, lead_mask)
    rules = {rule["output"]: rule for rule in model.decision_rules()}
    outputs: dict[str, dict[str, Any]] = {}
    failure = None
    for name in model.output_names():
        diff = np.abs(reference[name].astype(np.float64) - got[name].astype(np.float64))
        entry: dict[str, Any] = {"type": "decision" if name in rules else "score", "max_abs_diff": float(diff.max())}
        if name in rules:
            flipped = diff > 0
            borderline = flipped & _near_threshold(rules[name], reference, got, tolerance)
            entry.update(mismatches=int(flipped.sum()), borderline=int(borderline.sum()))
            if failure is None and entry["mismatches"] > entry["borderline"]:
                failure = (
                    f"decision {name!r} of the exported model differs from PyTorch on "
                    f"{entry['mismatches'] - entry['borderline']} of {len(ids)} windows away from its threshold"
                )
        elif failure is None and not entry["max_abs_diff"] <= tolerance:  # NaN fails too
            failure = (
                f"output {name!r} of the exported model differs from PyTorch by {entry['max_abs_diff']:.3g} "
                f"(max abs over {len(ids)} windows; tolerance {tolerance:g})"
            )
        outputs[name] = entry
    return {
        "runtime": exported.runtime,
        "records": [str(p) for p in records],
        "windows": len(ids),
        "tolerance": tolerance,
        "outputs": outputs,
        "passed": failure is None,
        "failure": failure,
    }


def _near_threshold(
    rule: Mapping[str, Any], a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], tolerance: float
) -> np.ndarray:
    """Per window: the scores ``rule`` reads agree within ``tolerance`` and (for a comparison) lie within it of
    the threshold, so a flip of its decision is rounding, not a different model."""
    reads = [rule["score"]] if rule["kind"] == "compare" else list(rule["scores"])
    close = np.all([np.abs(a[s].astype(np.float64) - b[s].astype(np.float64)) <= tolerance for s in reads], axis=0)
    if rule["kind"] == "compare":
        value = float(rule["value"])
        score = rule["score"]
        near = np.minimum(np.abs(a[score] - value), np.abs(b[score] - value)) <= tolerance
        return close & near
    return close  # argmax / median level: with every score read within tolerance, only a near-tie flips the call
