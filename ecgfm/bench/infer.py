"""``ecgfm bench infer``: one prediction (preprocessing, backbone, head, post-processing) per runtime, side by side.

For each backbone and input (a 10-s 12-lead record; lead I alone, through the same backbone built with one input
lead, which for ECGFounder is the architecture of ``ecgfounder-1lead``) the model is exported to TorchScript and ONNX
and the three runtimes are timed in one run, in alternating blocks (a noisy neighbour slows all alike): latency
p50/p95 at batch 1 and throughput at batch ``batch``, each as a ratio to PyTorch eager. The preprocessing chain
alone is timed the same way, to show where the time goes. Weights are random (the timing does not depend on them);
the input is real (shipped LUDB recordings). On a machine with CUDA, eager fp32, eager bf16 (autocast) and
``torch.compile`` are timed on the GPU too.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from ecgfm.backbones import create_backbone
from ecgfm.export import (
    ExportedModule,
    TorchScriptModel,
    export_onnx,
    export_torchscript,
    record_windows,
    shipped_records,
)
from ecgfm.io import atomic_write_json
from ecgfm.onnx_model import OnnxModel
from ecgfm.pretrained import ECGModel

#: The inputs measured: name -> the leads the model reads.
INPUTS = {"12-lead": ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"), "lead-I": ("I",)}
DEFAULT_BACKBONES = ("net1d-small", "ecgfounder-12lead")
QUICK_BACKBONES = ("net1d-tiny",)
N_LABELS = 5

Predict = Callable[[np.ndarray, np.ndarray], Any]


def bench_model(backbone: str, leads: Sequence[str], labels: int = N_LABELS, seed: int = 0) -> ECGModel:
    """``backbone`` built for ``leads`` (random weights) with its declared preprocessing and one multilabel head."""
    torch.manual_seed(seed)
    config = create_backbone(backbone, lead_names=list(leads)).model_config
    head = {"kind": "multilabel", "name": "dx", "labels": [f"label_{i}" for i in range(labels)]}
    contract = {"backbone": config.to_dict(), "input": config.input.to_dict(), "adapter": "identity"}
    return ECGModel({**contract, "heads": {"dx": head}}).eval()


class _Chain(nn.Module):
    """The preprocessing chain alone, as a graph with the model's inputs (signal, lead_mask)."""

    def __init__(self, model: ECGModel) -> None:
        super().__init__()
        self.preprocessing = model.preprocessing

    def forward(self, signal: Tensor, lead_mask: Tensor) -> Tensor:
        return self.preprocessing(signal, lead_mask)


def _export_chain(model: ECGModel, folder: Path, threads: int) -> dict[str, Predict]:
    """The chain alone in each runtime (eager, TorchScript, ONNX Runtime) as ``f(signal, mask) -> array``."""
    import onnxruntime

    chain = _Chain(model).eval()
    example = (torch.zeros(2, len(model.leads), model.input_contract.n_samples), torch.ones(2, len(model.leads)) > 0)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(chain, example, check_trace=False)
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            program = torch.onnx.export(
                chain,
                example,
                dynamo=True,
                input_names=["signal", "lead_mask"],
                dynamic_shapes={"signal": {0: batch}, "lead_mask": {0: batch}},
                verbose=False,
            )
    path = folder / "chain.onnx"
    path.write_bytes(program.model_proto.SerializeToString())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {node.name for node in session.get_inputs()}

    def eager(signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return chain(torch.from_numpy(signal), torch.from_numpy(mask)).numpy()

    def torchscript(signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return traced(torch.from_numpy(signal), torch.from_numpy(mask)).numpy()

    def onnx_runtime(signal: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"signal": signal, "lead_mask": mask}
        return session.run(None, {name: feed[name] for name in names})[0]

    return {"eager": eager, "torchscript": torchscript, "onnxruntime": onnx_runtime}


def _cpu_runtimes(model: ECGModel, folder: Path, threads: int) -> tuple[dict[str, Predict], dict[str, float]]:
    """``{runtime: predict_numpy}`` for eager, TorchScript and ONNX Runtime, and the seconds each export took."""
    seconds = {}
    start = time.perf_counter()
    export_torchscript(model, folder / "torchscript")
    seconds["torchscript"] = time.perf_counter() - start
    start = time.perf_counter()
    export_onnx(model, folder / "onnx")
    seconds["onnxruntime"] = time.perf_counter() - start
    runtimes = {
        "eager": model.predict_numpy,
        "torchscript": TorchScriptModel(folder / "torchscript").predict_numpy,
        "onnxruntime": OnnxModel(folder / "onnx", threads=threads).predict_numpy,
    }
    return runtimes, seconds


def _gpu_runtimes(model: ECGModel, device: str) -> dict[str, Predict]:
    """Eager fp32, eager bf16 (autocast) and ``torch.compile`` on ``device``: numpy in, numpy out (copies timed)."""
    gpu_model = ECGModel(model.contract(), model.card).to(device).eval()
    gpu_model.load_state_dict(model.state_dict())
    names = gpu_model.output_names()
    compiled = torch.compile(ExportedModule(gpu_model))

    def run(predict: Callable[[Tensor, Tensor], Any], bf16: bool = False) -> Predict:
        def call(signal: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
            x, m = torch.from_numpy(signal).to(device), torch.from_numpy(mask).to(device)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = predict(x, m)
            values = out.values() if isinstance(out, dict) else out
            return {name: value.float().cpu().numpy() for name, value in zip(names, values, strict=True)}

        return call

    return {
        "eager fp32 (gpu)": run(gpu_model.predict),
        "eager bf16 (gpu)": run(gpu_model.predict, bf16=True),
        "torch.compile (gpu)": run(compiled),
    }


def _time_rounds(
    runtimes: dict[str, Predict], signal: np.ndarray, mask: np.ndarray, repeats: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of each runtime: ``rounds`` rounds in which each runtime makes a block of calls.

    Rounds spread every runtime over the same stretch of a noisy machine; blocks (not single alternating calls),
    each opened by one untimed call, keep one runtime's idle threads from slowing the next: ONNX Runtime's and
    OpenMP's worker threads spin for a while after a call, and on 2 cores that doubled eager's batch-1 time.
    """
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    per_block = -(-repeats // rounds)
    for _ in range(rounds):
        for name, predict in runtimes.items():
            predict(signal, mask)  # untimed: the previous runtime's threads settle, this one's wake up
            for _ in range(min(per_block, repeats - len(times[name]))):
                start = time.perf_counter()
                predict(signal, mask)
                times[name].append(time.perf_counter() - start)
    return times


def _max_diff(a: Any, b: Any) -> float:
    if isinstance(a, dict):
        return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _measure(
    runtimes: dict[str, Predict],
    one: tuple[np.ndarray, np.ndarray],
    many: tuple[np.ndarray, np.ndarray],
    repeats: int,
    batch_repeats: int,
) -> dict[str, dict[str, float]]:
    """Latency p50/p95 (ms, batch 1), throughput (records/s at batch len(many)), |difference| from eager."""
    reference = runtimes["eager"](*one) if "eager" in runtimes else None
    for predict in runtimes.values():  # first calls (allocation, lazy initialisation) are not timed
        predict(*one)
    latency = _time_rounds(runtimes, *one, repeats=repeats, rounds=min(3, repeats))
    batch = _time_rounds(runtimes, *many, repeats=batch_repeats, rounds=1)
    out = {}
    for name, predict in runtimes.items():
        out[name] = {
            "p50_ms": float(np.percentile(latency[name], 50) * 1e3),
            "p95_ms": float(np.percentile(latency[name], 95) * 1e3),
            "records_per_s": len(many[0]) / float(np.median(batch[name])),
            "max_abs_diff_vs_eager": _max_diff(reference, predict(*one)) if reference is not None else float("nan"),
        }
    return out


def run_infer_benchmark(
    backbones: list[str] | None = None,
    inputs: list[str] | None = None,
    repeats: int = 30,
    batch: int = 64,
    batch_repeats: int = 3,
    threads: int | None = None,
    gpu: bool | None = None,
    quick: bool = False,
    json_out: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Latency (batch 1) and throughput (batch ``batch``) of one prediction in PyTorch eager, TorchScript and ONNX
    Runtime on the CPU, side by side, with ratios to eager; prints a table and returns (optionally saves) the numbers.

    Args:
        backbones: registered backbones to measure (random weights, their declared preprocessing chain, one
            multilabel head of 5 labels). Default: net1d-small and ecgfounder-12lead (quick: net1d-tiny).
        inputs: ``12-lead`` (10 s, 500 Hz) and/or ``lead-I`` (the backbone built with one input lead).
        repeats: batch-1 calls per runtime (in 3 alternating blocks); p50/p95 over them.
        batch: records per call for the throughput (real LUDB recordings).
        batch_repeats: batch calls per runtime; the median is reported.
        threads: CPU threads for torch and ONNX Runtime alike (default: torch's, i.e. the cores).
        gpu: also time eager fp32/bf16 and torch.compile on CUDA (default: when CUDA is available).
        quick: a smoke run: net1d-tiny unless backbones are given, 3 repeats, batch 4, one batch repeat.
        json_out: also write the numbers to this JSON file.
    """
    console = console or Console(width=max(Console().width, 150))  # the table must not wrap in logs
    if quick:
        repeats, batch, batch_repeats = min(repeats, 3), min(batch, 4), 1
    backbones = list(backbones or (QUICK_BACKBONES if quick else DEFAULT_BACKBONES))
    inputs = list(inputs or INPUTS)
    unknown = [name for name in inputs if name not in INPUTS]
    if unknown or repeats < 1 or batch < 1 or batch_repeats < 1:
        raise ValueError(
            f"inputs must be among {list(INPUTS)} (got {unknown}) and repeats, batch, batch_repeats at least 1"
        )
    threads = int(threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    use_gpu = torch.cuda.is_available() if gpu is None else bool(gpu)
    if use_gpu and not torch.cuda.is_available():
        raise ValueError("--gpu true needs CUDA, and torch sees no CUDA device here")
    records = shipped_records(max(batch, 1))
    results: dict[str, Any] = {
        "threads": threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "batch": batch,
        "repeats": repeats,
        "batch_repeats": batch_repeats,
        "weights": "random",
        "rows": [],
    }
    import onnxruntime

    results["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory(prefix="ecgfm-bench-infer-") as tmp:
        for input_name in inputs:
            leads = INPUTS[input_name]
            chain_done = False
            for backbone in backbones:
                model = bench_model(backbone, leads)
                contract = model.input_contract
                signal, mask, _ = record_windows(records, contract.to_dict())
                while len(signal) < batch:  # fewer shipped records than the batch: repeat them
                    signal, mask = np.concatenate([signal, signal]), np.concatenate([mask, mask])
                one, many = (signal[:1], mask[:1]), (signal[:batch], mask[:batch])
                folder = Path(tmp) / f"{backbone}-{input_name}"
                console.print(f"{backbone}, {input_name}: exporting to TorchScript and ONNX ...")
                runtimes, export_s = _cpu_runtimes(model, folder, threads)
                console.print(f"{backbone}, {input_name}: timing {', '.join(runtimes)} ...")
                measured = _measure(runtimes, one, many, repeats, batch_repeats)
                for name, numbers in measured.items():
                    results["rows"].append(
                        {"backbone": backbone, "input": input_name, "runtime": name, "device": "cpu", **numbers}
                    )
                    results["rows"][-1]["export_s"] = export_s.get(name)
                if not chain_done:  # the chain does not depend on the backbone: once per input
                    console.print(f"preprocessing, {input_name}: exporting and timing the chain alone ...")
                    chain = _export_chain(model, folder, threads)
                    for name, numbers in _measure(chain, one, many, repeats, batch_repeats).items():
                        results["rows"].append(
                            {
                                "backbone": f"preprocessing only ({contract.preprocessing['name']})",
                                "input": input_name,
                                "runtime": name,
                                "device": "cpu",
                                **numbers,
                            }
                        )
                    chain_done = True
                if use_gpu:
                    console.print(f"{backbone}, {input_name}: timing on the GPU ...")
                    gpu_runtimes = {"eager": runtimes["eager"], **_gpu_runtimes(model, "cuda")}
                    gpu = _measure(gpu_runtimes, one, many, repeats, batch_repeats)
                    for name, numbers in gpu.items():
                        if name != "eager":
                            row = {"backbone": backbone, "input": input_name, "runtime": name, "device": "cuda"}
                            results["rows"].append({**row, **numbers})
    _print_table(results, console)
    if json_out:
        atomic_write_json(json_out, results)
    return results


def _print_table(results: dict[str, Any], console: Console) -> None:
    """One row per (backbone, input, runtime), with speed relative to CPU eager of the same backbone and input."""
    table = Table(
        title=f"ecgfm bench infer: one prediction, CPU {results['threads']} thread(s), batch 1 latency over "
        f"{results['repeats']} calls, throughput at batch {results['batch']} (random weights, real LUDB input)"
    )
    columns = ("model", "input", "runtime", "p50 ms", "p95 ms", "x eager", "records/s", "x eager ", "max |diff|")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "input", "runtime") else "right")
    eager = {(r["backbone"], r["input"]): r for r in results["rows"] if r["runtime"] == "eager"}
    for row in results["rows"]:
        base = eager[(row["backbone"], row["input"])]
        table.add_row(
            row["backbone"],
            row["input"],
            row["runtime"],
            f"{row['p50_ms']:.1f}",
            f"{row['p95_ms']:.1f}",
            f"{base['p50_ms'] / row['p50_ms']:.2f}",
            f"{row['records_per_s']:.1f}",
            f"{row['records_per_s'] / base['records_per_s']:.2f}",
            "" if row["runtime"] == "eager" else f"{row['max_abs_diff_vs_eager']:.1e}",
        )
    console.print(table)
    console.print("x eager: speed relative to PyTorch eager on the CPU for the same model and input (> 1: faster)")
