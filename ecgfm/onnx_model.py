"""An exported model (``ecgfm export``) run through ONNX Runtime, with no torch anywhere on this path.

A deployment that installs numpy and onnxruntime only runs what was validated: the exported graph holds the
preprocessing chain and the heads' post-processing, and ``contract.json`` beside it holds the input contract, the
outputs with their units and the decision rules. :class:`OnnxModel` serves ``ecgfm predict --runtime onnx`` through
the same three calls the PyTorch ``ECGModel`` offers it: ``published_config``, ``output_names``, ``predict_numpy``.
This module imports numpy, onnxruntime, the standard library and torch-free ecgfm modules only.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm.io import sha256sum

__all__ = [
    "CONTRACT_NAME",
    "EXPORT_KEY",
    "MAX_BATCH",
    "ExportedModel",
    "OnnxModel",
    "read_contract",
]

#: The file beside an exported model: the published config plus, under ``EXPORT_KEY``, what the runtime needs.
CONTRACT_NAME = "contract.json"
EXPORT_KEY = "export"
#: The largest batch one call hands the runtime; larger batches run in pieces so memory stays bounded.
MAX_BATCH = 64


def read_contract(folder: str | Path, runtime: str | None = None) -> dict[str, Any]:
    """``contract.json`` of an exported model folder, checked to describe an export (of ``runtime`` when given)."""
    path = Path(folder) / CONTRACT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an exported ecgfm model is a folder holding {CONTRACT_NAME})")
    try:
        contract = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    export = contract.get(EXPORT_KEY) if isinstance(contract, dict) else None
    if not isinstance(export, dict) or not {"runtime", "file", "sha256", "inputs", "outputs"} <= set(export):
        raise ValueError(f"{path} is not an ecgfm export contract (no complete {EXPORT_KEY!r} section)")
    if runtime is not None and export["runtime"] != runtime:
        raise ValueError(f"{path} describes a {export['runtime']} export, not {runtime}")
    return contract


class ExportedModel(ABC):
    """An exported model folder: contract, checksum-verified model file, input checks, batching, named outputs.

    Subclasses open the file in their runtime and run one batch (:meth:`_run`); outputs come back in the graph's
    order and are named with the public output names of the contract.
    """

    runtime = ""

    def __init__(self, folder: str | Path, max_batch: int = MAX_BATCH) -> None:
        folder = Path(folder)
        if folder.is_file():  # the model file itself: its folder holds the contract
            folder = folder.parent
        self.folder = folder
        self.contract = read_contract(folder, self.runtime)
        export = self.contract[EXPORT_KEY]
        self.path = folder / export["file"]
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file (the {self.runtime} model {CONTRACT_NAME} names)")
        if sha256sum(self.path) != export["sha256"]:
            raise ValueError(
                f"{self.path} has the wrong sha256 ({CONTRACT_NAME} records {export['sha256']}): the file is corrupt "
                "or was replaced; export the model again"
            )
        self.max_batch = int(max_batch)
        self._graph_outputs = [entry["output"] for entry in export["outputs"]]

    # ----------------------------------------------------------------- what it reads and gives
    @property
    def input_contract(self) -> dict[str, Any]:
        return self.contract["contract"]["input"]

    @property
    def leads(self) -> tuple[str, ...]:
        return tuple(self.input_contract["lead_names"])

    @property
    def fs(self) -> float:
        return float(self.input_contract["fs"])

    @property
    def n_samples(self) -> int:
        return int(self.input_contract["n_samples"])

    @property
    def name(self) -> str:
        return str(self.contract.get("name", self.path.stem))

    def published_config(self) -> dict[str, Any]:
        """The exported model's ``config.yaml`` content (``ECGModel.published_config()``), runtime keys left out."""
        return {key: value for key, value in self.contract.items() if key != EXPORT_KEY}

    def output_names(self) -> list[str]:
        """Public output names in the model's order (``p_AF``, ``potassium_mmol_l``, ...)."""
        return list(self.contract["outputs"])

    def decision_rules(self) -> list[dict[str, Any]]:
        return list(self.contract.get("decisions", []))

    def score_names(self) -> list[str]:
        """Continuous outputs (probabilities, values): the ones a record's windows are aggregated over."""
        decided = {rule["output"] for rule in self.decision_rules()}
        return [name for name in self.output_names() if name not in decided]

    # ----------------------------------------------------------------- running
    def _check(self, signal: np.ndarray, lead_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        signal = np.asarray(signal, dtype=np.float32)
        expected = (len(self.leads), self.n_samples)
        if signal.ndim != 3 or signal.shape[1:] != expected:
            raise ValueError(
                f"the model {self.name!r} reads [batch, {expected[0]} leads ({', '.join(self.leads)}), {expected[1]} "
                f"samples at {self.fs:g} Hz] in {self.input_contract.get('units', 'mV')}; got {signal.shape}"
            )
        if lead_mask is None:
            return signal, np.ones(signal.shape[:2], dtype=bool)
        lead_mask = np.asarray(lead_mask, dtype=bool)
        if lead_mask.shape != signal.shape[:2]:
            raise ValueError(f"lead_mask must be [batch, leads] = {signal.shape[:2]}, got {lead_mask.shape}")
        return np.ascontiguousarray(signal), np.ascontiguousarray(lead_mask)

    @abstractmethod
    def _run(self, signal: np.ndarray, lead_mask: np.ndarray) -> Sequence[np.ndarray]:
        """One batch through the runtime: the graph's outputs, in the contract's order."""

    def predict_numpy(self, signal: np.ndarray, lead_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Raw mV ``[B, L, T]`` (+ ``lead_mask [B, L]``) -> ``{public output name: float32 [B]}``."""
        signal, lead_mask = self._check(signal, lead_mask)
        if signal.shape[0] == 0:
            return {name: np.zeros(0, dtype=np.float32) for name in self._graph_outputs}
        pieces: list[Sequence[np.ndarray]] = []
        for start in range(0, signal.shape[0], self.max_batch):
            stop = start + self.max_batch
            pieces.append(self._run(signal[start:stop], lead_mask[start:stop]))
        return {
            name: np.concatenate([np.asarray(piece[i], dtype=np.float32).reshape(-1) for piece in pieces])
            for i, name in enumerate(self._graph_outputs)
        }


class OnnxModel(ExportedModel):
    """An ONNX export run by ONNX Runtime on the CPU; ``threads`` sets its intra-op threads (None: its default)."""

    runtime = "onnx"

    def __init__(self, folder: str | Path, threads: int | None = None, max_batch: int = MAX_BATCH) -> None:
        import onnxruntime

        super().__init__(folder, max_batch)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for a file it cannot load
            raise ValueError(f"{self.path} cannot be loaded by ONNX Runtime: {' '.join(str(err).split())}") from None
        export = self.contract[EXPORT_KEY]
        self._fetch = [entry["name"] for entry in export["outputs"]]
        declared = {node.name for node in self.session.get_outputs()}
        missing = [name for name in self._fetch if name not in declared]
        if missing:
            raise ValueError(f"{self.path} lacks the outputs {missing} that {CONTRACT_NAME} names")
        # the exporter drops an input the graph never reads (a lead mask nothing uses): feed only declared ones
        self._inputs = [node.name for node in self.session.get_inputs()]

    def _run(self, signal: np.ndarray, lead_mask: np.ndarray) -> Sequence[np.ndarray]:
        feed: Mapping[str, np.ndarray] = {"signal": signal, "lead_mask": lead_mask}
        return self.session.run(self._fetch, {name: feed[name] for name in self._inputs})
