"""Safe checkpoint reading: ``torch.load(weights_only=True)`` with a small allow-list, or safetensors; strict loads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not match the model; the message names file and keys."""


def _numpy_scalar_globals() -> list[Any]:
    """What unpickling a numpy scalar (ECGFounder stores ``val_auroc`` as one) needs, and nothing more."""
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    allowed: list[Any] = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), scalar]
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        dtype_cls = getattr(getattr(np, "dtypes", None), name, None)
        if dtype_cls is not None:
            allowed.append(dtype_cls)
    return allowed


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` that can never run code from the file: weights_only=True plus the numpy-scalar allow-list."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for refused globals, RuntimeError for corrupt files
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-weights checkpoint that loads with weights_only=True "
            f"(it may contain code or objects outside the allow-list). Reason: {err}"
        ) from err


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state_dict from ``.safetensors`` or a torch file, unwrapping ``state_dict``/``model_state_dict``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return load_file(str(path))
    obj = safe_torch_load(path)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state_dict (expected a dict of tensors, or one under 'state_dict')")
    return obj


def load_strict(
    model: nn.Module, state: dict[str, Tensor], source: str | Path, allow_missing: Iterable[str] = ()
) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key fails with the keys named."""
    allow_missing = tuple(allow_missing)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if mismatched:
            parts.append(f"shape mismatches: {'; '.join(mismatched[:20])}")
        raise CheckpointError(f"checkpoint {source} does not match {type(model).__name__}: " + " | ".join(parts))
    model.load_state_dict(state, strict=False)
