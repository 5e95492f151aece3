"""Model zoo: where pretrained weights live on this machine, checked against the sha256 in checkpoints/zoo.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ecgfm.io import sha256sum
from ecgfm.resources import zoo_manifest

ZOO_MANIFEST = zoo_manifest()  # checkpoints/zoo.json in a source checkout, ecgfm/_checkpoints/ in a wheel


def weights_dirs() -> list[Path]:
    """Folders searched for weight files, in order: $ECGFM_WEIGHTS, ~/.cache/ecgfm, the repository's checkpoints/."""
    dirs = [Path(p) for p in os.environ.get("ECGFM_WEIGHTS", "").split(os.pathsep) if p]
    dirs.append(Path.home() / ".cache" / "ecgfm")
    dirs.append(ZOO_MANIFEST.parent)
    return dirs


def zoo_entries() -> dict[str, dict]:
    """The model cards of checkpoints/zoo.json (empty when the file is not shipped)."""
    return json.loads(ZOO_MANIFEST.read_text()) if ZOO_MANIFEST.is_file() else {}


def resolve_weights(name: str) -> Path:
    """The local weight file of a zoo model, verified when its checksum is known. Nothing is downloaded."""
    entries = zoo_entries()
    if name not in entries:
        raise FileNotFoundError(f"no zoo entry for {name!r}; known: {sorted(entries)}. Pass pretrained=PATH instead.")
    entry = entries[name]
    for folder in weights_dirs():
        path = folder / entry["file"]
        if path.is_file():
            expected = entry.get("sha256")
            if expected and sha256sum(path) != expected:
                raise ValueError(f"{path} has the wrong sha256 (expected {expected}); re-download it")
            return path
    searched = ", ".join(str(d) for d in weights_dirs())
    raise FileNotFoundError(
        f"weights for {name!r} ({entry['file']}, from {entry['source']}) are not on this machine; "
        f"put the file in one of: {searched} (or set ECGFM_WEIGHTS), or pass pretrained=PATH"
    )
