"""Model zoo: where pretrained weights live on this machine, checked against the sha256 in checkpoints/zoo.json."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ZOO_MANIFEST = Path(__file__).resolve().parents[1] / "checkpoints" / "zoo.json"


def weights_dirs() -> list[Path]:
    """Folders searched for weight files, in order: $ECGFM_WEIGHTS, ~/.cache/ecgfm, the repository's checkpoints/."""
    dirs = [Path(p) for p in os.environ.get("ECGFM_WEIGHTS", "").split(os.pathsep) if p]
    dirs.append(Path.home() / ".cache" / "ecgfm")
    dirs.append(ZOO_MANIFEST.parent)
    return dirs


def zoo_entries() -> dict[str, dict]:
    """The model cards of checkpoints/zoo.json (empty when the file is not shipped)."""
    return json.loads(ZOO_MANIFEST.read_text()) if ZOO_MANIFEST.is_file() else {}


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
