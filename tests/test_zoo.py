"""pretrained=True finds zoo weights locally, verifies known checksums, and says where to put missing files."""

import json

import pytest
import torch

import ecgfm
from ecgfm import zoo


def test_missing_weights_say_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setenv("ECGFM_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(zoo.Path, "home", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"12_lead_ECGFounder\.pth.*ECGFM_WEIGHTS"):
        ecgfm.create_backbone("ecgfounder-12lead", pretrained=True)


def test_local_weights_are_found_and_checksummed(monkeypatch, tmp_path):
    model = ecgfm.create_backbone("net1d-tiny")
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    manifest = tmp_path / "zoo.json"
    entry = {"file": "tiny.pth", "source": "test", "sha256": zoo.sha256sum(path)}
    manifest.write_text(json.dumps({"net1d-tiny": entry}))
    monkeypatch.setattr(zoo, "ZOO_MANIFEST", manifest)
    monkeypatch.setenv("ECGFM_WEIGHTS", str(tmp_path))
    loaded = ecgfm.create_backbone("net1d-tiny", pretrained=True)
    torch.testing.assert_close(loaded.dense.weight, model.dense.weight)
    manifest.write_text(json.dumps({"net1d-tiny": {**entry, "sha256": "0" * 64}}))
    with pytest.raises(ValueError, match="wrong sha256"):
        ecgfm.create_backbone("net1d-tiny", pretrained=True)
