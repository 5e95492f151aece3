"""Safe checkpoint reading: ``torch.load(weights_only=True)`` with a small allow-list, or safetensors; strict loads."""

from __future__ import annotations

import errno
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not match the model; the message names file and keys."""


def allowed_globals() -> list[Any]:
    """The allow-list beyond torch's own: what unpickling a numpy scalar (ECGFounder stores ``val_auroc`` as one)
    needs, and nothing more."""
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


def load_error(path: str | Path, err: BaseException) -> CheckpointError:
    """A one-line CheckpointError naming ``path`` and why torch could not read it safely, for the command line's
    one-line errors: torch's own message spans many lines and suggests loading with weights_only=False, which ecgfm
    never does."""
    text = str(err)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return CheckpointError(
            f"refusing to load {path}: it pickles {unsafe.group(1)}, which is not on ecgfm's allow-list of plain "
            "weights (tensors, containers, numbers, numpy scalars); ecgfm never runs code from a checkpoint"
        )
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if isinstance(err, pickle.UnpicklingError) or unpickler:
        detail = f" ({unpickler.group(1).strip()})" if unpickler else ""
        return CheckpointError(
            f"refusing to load {path}: it is not a checkpoint written by torch.save (a plain pickle or another "
            f"format){detail}; ecgfm reads torch checkpoints with a plain-weights allow-list, or .safetensors"
        )
    if isinstance(err, IsADirectoryError):
        reason = "it is a folder, not a file"
    elif isinstance(err, PermissionError):
        reason = "permission denied"
    elif (
        isinstance(err, EOFError)
        or "central directory" in text
        or "PytorchStreamReader failed" in text
        or (isinstance(err, OSError) and err.errno == errno.EINVAL)  # mmap of a zip cut short
    ):
        reason = "it is truncated or corrupt (an interrupted copy or write?)"
    elif isinstance(err, KeyError) or "invalid load key" in text:
        reason = "it is not a torch checkpoint"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
        reason = f"{type(err).__name__}: {lines[0] if lines else 'unreadable'}"
    return CheckpointError(f"cannot read checkpoint {path}: {reason}")


def safe_torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` that can never run code from the file: weights_only=True plus the numpy-scalar allow-list.

    ``mmap=True`` maps the tensors instead of reading them (cheap for checking a large checkpoint); a file in
    torch's old, non-zip format is then read in full. Every failure is a one-line CheckpointError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: it is empty (an interrupted copy or write?)")
    try:
        with torch.serialization.safe_globals(allowed_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle: refused below
            if mmap:
                try:
                    return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "_use_new_zipfile_serialization" not in str(err):
                        raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for refused globals, RuntimeError/EOFError for corrupt files
        raise load_error(path, err) from err


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state_dict from ``.safetensors`` or a torch file, unwrapping ``state_dict``/``model_state_dict``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError (header too large, truncated, ...), IsADirectoryError
            raise CheckpointError(f"cannot read checkpoint {path}: not a readable .safetensors file ({err})") from err
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
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key fails with the keys named. Buffers a
    module lists in ``added_buffers`` (newer than some saved models; the module fills them in) may be missing."""
    allow_missing = tuple(allow_missing)
    own = model.state_dict()
    added = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in getattr(module, "added_buffers", {})
    }
    missing = [k for k in own if k not in state and k not in added and not k.startswith(allow_missing)]
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
