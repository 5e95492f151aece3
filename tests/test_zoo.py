"""The model zoo: cards in checkpoints/zoo.json, local resolution in order, the real huggingface_hub cache path,
no network unless allowed, checksums that name the bad file, and the ``ecgfm zoo`` command."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import huggingface_hub
import pytest
import torch

import ecgfm
from ecgfm import pretrained, zoo
from ecgfm.backbones.net1d import NET1D_TINY
from ecgfm.commands import main
from ecgfm.io import sha256sum
from ecgfm.registry import BACKBONES

REPO = Path(__file__).resolve().parents[1]
HUB_REPO = "PKUDigitalHealth/ECGFounder"
FILE = "tiny_ECGFounder.pth"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No zoo folder, hub cache or offline flag of this machine leaks in; any network connection is recorded."""
    for variable in ("ECGFM_HOME", "ECGFM_WEIGHTS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError("network disabled in tests")

    def no_lookup(host, *args, **kwargs):
        attempts.append(host)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    yield
    assert attempts == [], f"the zoo tried the network: {attempts}"


@pytest.fixture
def weights(tmp_path) -> bytes:
    """An ECGFounder-format checkpoint of net1d-tiny: the bytes a hub file would hold."""
    path = tmp_path / "made" / FILE
    path.parent.mkdir()
    torch.save({"state_dict": BACKBONES.create("net1d-tiny").state_dict(), "epoch": 3}, path)
    return path.read_bytes()


@pytest.fixture
def manifest(monkeypatch, tmp_path, weights) -> Path:
    """A zoo of one hub model (net1d-tiny weights named like ECGFounder's) whose sha256 is known."""
    path = tmp_path / "checkpoints" / "zoo.json"
    path.parent.mkdir()
    monkeypatch.setattr(zoo, "ZOO_MANIFEST", path)
    zoo.add_zoo_entry(_hub_entry(weights))
    return path


def _hub_entry(data: bytes, name: str = "tiny-founder") -> dict:
    import hashlib

    return {
        "name": name,
        "format": zoo.FILE_FORMAT,
        "summary": "net1d-tiny weights in ECGFounder's file format",
        "backbone": "net1d-tiny",
        "input": NET1D_TINY.input.to_dict(),
        "heads": [{"name": "ecgfounder", "kind": "multilabel", "n_labels": 150, "labels_source": "nowhere"}],
        "files": [{"path": FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}],
        "source": {"hub": {"repo_id": HUB_REPO, "filename": FILE, "revision": "main"}},
        "licence": "MIT",
        "paper": "none",
        "metrics": [{"data": "synthetic", "split": "test", "metric": "auroc", "value": 0.5}],
        "intended_use": "tests",
        "limitations": "random weights",
    }


def lay_out_hub_cache(cache: Path, data: bytes, commit: str = COMMIT, ref: str = "main") -> Path:
    """The folder huggingface_hub writes for one downloaded file: blobs/, snapshots/<commit>/ links, refs/<ref>."""
    import hashlib

    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / FILE
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return link


def _spy_on_hub(monkeypatch) -> list[dict]:
    """Record the hub-cache lookups; fail on any call of hf_hub_download (the download function)."""
    calls = []
    real = huggingface_hub.try_to_load_from_cache

    def spy(repo_id, filename, **kwargs):
        calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        return real(repo_id, filename, **kwargs)

    def no_download(*args, **kwargs):
        raise AssertionError(f"hf_hub_download called without an allowed download: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", spy)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return calls


# ------------------------------------------------------------------------------------------- the Hugging Face cache
def test_a_file_in_the_hub_cache_resolves_through_huggingface_hub_without_network(
    manifest, weights, tmp_path, monkeypatch
):
    cache = tmp_path / "hub-cache"
    link = lay_out_hub_cache(cache, weights)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # set after huggingface_hub was imported: read at call time
    calls = _spy_on_hub(monkeypatch)

    assert zoo.resolve("tiny-founder") == link  # revision "main" -> refs/main -> the snapshot
    assert zoo.resolve("tiny-founder", revision=COMMIT) == link  # a pinned commit
    assert [call["revision"] for call in calls] == ["main", COMMIT]
    assert all(call["cache_dir"] == str(cache) and call["repo_id"] == HUB_REPO for call in calls)
    loaded = ecgfm.create_backbone("net1d-tiny", pretrained=zoo.resolve("tiny-founder"))
    assert loaded.model_config.name == "net1d-tiny"
    with pytest.raises(FileNotFoundError, match="ecgfm zoo download tiny-founder"):
        zoo.resolve("tiny-founder", revision="f" * 40)  # another commit is not in the cache


def test_hf_home_locates_the_hub_cache_as_huggingface_hub_does(manifest, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    link = lay_out_hub_cache(tmp_path / "elsewhere" / "hub", weights)
    assert zoo.resolve("tiny-founder") == link


def test_an_absent_model_is_refused_naming_the_entry_the_file_and_every_folder(manifest, tmp_path, monkeypatch):
    calls = _spy_on_hub(monkeypatch)
    with pytest.raises(FileNotFoundError) as caught:
        zoo.resolve("tiny-founder")
    message = str(caught.value)
    assert "\n" not in message and "'tiny-founder'" in message and FILE in message
    for searched in ("$ECGFM_HOME (unset)", str(tmp_path / "xdg" / "ecgfm"), str(manifest.parent)):
        assert searched in message
    assert str(tmp_path / "hf" / "hub") in message and f"{HUB_REPO}@main" in message
    assert "ecgfm zoo download tiny-founder" in message and "allow_download=True" in message
    assert "pretrained=PATH" in message
    assert calls  # the hub cache was asked, the hub was not (no_download)


def test_hf_hub_offline_refuses_even_an_allowed_download(manifest, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="downloads are off because HF_HUB_OFFLINE is set"):
        zoo.resolve("tiny-founder", allow_download=True)
    assert main(["zoo", "download", "tiny-founder"]) == 1
    assert "downloads are off because HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_an_allowed_download_goes_through_huggingface_hub_and_is_verified(manifest, weights, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    downloads = []

    def hub(repo_id, filename, **kwargs):  # the network part: what a download leaves in the cache
        assert not kwargs.get("local_files_only")
        downloads.append((repo_id, filename, kwargs["revision"], kwargs["cache_dir"]))
        return str(lay_out_hub_cache(Path(kwargs["cache_dir"]), weights))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(FileNotFoundError):
        zoo.resolve("tiny-founder")
    assert downloads == []
    path = zoo.resolve("tiny-founder", allow_download=True)
    assert downloads == [(HUB_REPO, FILE, "main", str(cache))] and path.read_bytes() == weights
    assert zoo.resolve("tiny-founder") == path  # found in the hub cache from now on, without downloading
    assert len(downloads) == 1

    def corrupt(repo_id, filename, **kwargs):
        return str(lay_out_hub_cache(Path(kwargs["cache_dir"]), b"not the weights", commit="f" * 40))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", corrupt)
    with pytest.raises(zoo.ChecksumError, match=f"{'f' * 40}/{FILE} has sha256"):
        zoo.download("tiny-founder", revision="f" * 40)


def test_zoo_download_command_fetches_once_and_refuses_shipped_models(manifest, weights, monkeypatch, capsys):
    def hub(repo_id, filename, **kwargs):
        assert not kwargs.get("local_files_only") and kwargs["revision"] == COMMIT
        return str(lay_out_hub_cache(Path(kwargs["cache_dir"]), weights))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert main(["zoo", "download", "tiny-founder", "--revision", COMMIT]) == 0
    assert "downloaded tiny-founder" in capsys.readouterr().out
    _spy_on_hub(monkeypatch)
    assert main(["zoo", "download", "tiny-founder"]) == 0  # now in the hub cache: not fetched again
    assert "already on this machine" in capsys.readouterr().out

    entry = {**_hub_entry(weights, "shipped-one"), "source": {"shipped": True}}
    zoo.add_zoo_entry(entry)
    assert main(["zoo", "download", "shipped-one"]) == 1
    assert "already shipped" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- local folders
def test_ecgfm_home_beats_the_user_cache_beats_checkpoints(manifest, weights, tmp_path, monkeypatch):
    home, cache = tmp_path / "home", tmp_path / "xdg" / "ecgfm"
    monkeypatch.setenv("ECGFM_HOME", str(home))
    for folder in (home, cache, manifest.parent):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FILE).write_bytes(weights)
    for expected in (home, cache, manifest.parent):
        assert zoo.resolve("tiny-founder") == expected / FILE
        (expected / FILE).unlink()


def test_the_older_ecgfm_weights_list_is_still_read(manifest, weights, tmp_path, monkeypatch):
    older = tmp_path / "older"
    older.mkdir()
    (older / FILE).write_bytes(weights)
    monkeypatch.setenv("ECGFM_WEIGHTS", f"{tmp_path / 'nothing'}:{older}")
    assert zoo.resolve("tiny-founder") == older / FILE


def test_an_explicit_path_wins_and_a_missing_one_is_an_error(manifest, weights, tmp_path):
    mine = tmp_path / "my-copy.pth"
    mine.write_bytes(weights)
    assert zoo.resolve("tiny-founder", path=mine) == mine
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth: no such file"):
        zoo.resolve("tiny-founder", path=tmp_path / "nowhere.pth")


def test_pretrained_true_loads_the_zoo_weights(manifest, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("ECGFM_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / FILE).write_bytes(weights)
    zoo.add_zoo_entry({**_hub_entry(weights, "net1d-tiny")})
    loaded = ecgfm.create_backbone("net1d-tiny", pretrained=True)
    expected = torch.load(tmp_path / "made" / FILE, weights_only=True)["state_dict"]
    torch.testing.assert_close(loaded.dense.weight, expected["dense.weight"])
    with pytest.raises(ValueError, match="no zoo model 'net1d-small'.*tiny-founder.*pretrained=PATH"):
        ecgfm.create_backbone("net1d-small", pretrained=True)


# ------------------------------------------------------------------------------------------- checksums
def test_a_corrupt_file_fails_naming_its_path_in_resolve_list_and_verify(manifest, weights, tmp_path, capsys):
    cache = tmp_path / "xdg" / "ecgfm"
    cache.mkdir(parents=True)
    bad = cache / FILE
    bad.write_bytes(weights[:-100])  # a truncated download
    with pytest.raises(zoo.ChecksumError) as caught:
        zoo.resolve("tiny-founder")
    message = str(caught.value)
    assert str(bad) in message and _hub_entry(weights)["files"][0]["sha256"] in message and "\n" not in message

    assert main(["zoo", "list"]) == 0
    assert "corrupt" in capsys.readouterr().out
    assert main(["zoo", "verify"]) == 1
    captured = capsys.readouterr()
    assert "CORRUPT" in captured.out and str(bad) in captured.out and str(bad) in captured.err

    bad.write_bytes(weights)
    assert main(["zoo", "verify", "tiny-founder"]) == 0
    assert f"ok          tiny-founder  {bad}" in capsys.readouterr().out


def test_a_flipped_byte_is_caught_by_verify_even_after_a_cached_check(manifest, weights, tmp_path, capsys):
    path = tmp_path / "xdg" / "ecgfm" / FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(weights)
    zoo.resolve("tiny-founder")
    path.write_bytes(weights[:10] + bytes([weights[10] ^ 1]) + weights[11:])  # same size, maybe the same mtime
    assert main(["zoo", "verify", "tiny-founder"]) == 1  # verify always rehashes
    assert str(path) in capsys.readouterr().err


def test_repeated_resolution_hashes_a_file_once(manifest, weights, tmp_path, monkeypatch):
    path = tmp_path / "xdg" / "ecgfm" / FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(weights)
    hashed = []
    monkeypatch.setattr(zoo, "sha256sum", lambda p: hashed.append(p) or sha256sum(p))
    for _ in range(3):
        zoo.resolve("tiny-founder")
    assert len(hashed) == 1


def test_a_file_with_no_recorded_checksum_is_present_but_never_verified(manifest, weights, tmp_path, capsys):
    entry = _hub_entry(weights, "unhashed")
    entry["files"] = [{"path": FILE, "bytes": None, "sha256": None}]
    zoo.add_zoo_entry(entry)
    (manifest.parent / FILE).write_bytes(weights)
    assert main(["zoo", "verify", "unhashed"]) == 0
    out = capsys.readouterr().out
    assert "unverified" in out and "present, no checksum recorded" in out and "ok " not in out
    assert main(["zoo", "list"]) == 0
    assert "present, unverified" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- published folders
def test_a_published_folder_becomes_a_card_resolves_loads_and_is_verified(manifest, tmp_path, capsys):
    from ecgfm.tasks import FineTuneTask

    folder = manifest.parent / "tiny-dx"
    task = FineTuneTask(backbone="net1d-tiny", heads=[{"kind": "multilabel", "name": "dx", "labels": ["AF", "SR"]}])
    card = {
        "summary": "AF and SR from 12 leads",
        "licence": "CC-BY-4.0",
        "training_data": "LUDB",
        "metrics": [{"data": "LUDB", "split": "test", "metric": "auroc", "value": 0.75}],
    }
    task.save_pretrained(folder, card=card)
    entry = zoo.zoo_entry_for_folder(folder, "tiny-dx")
    assert entry["heads"][0]["labels"] == ["AF", "SR"] and entry["backbone"] == "net1d-tiny"
    assert entry["input"] == task.contract()["input"] and entry["metrics"] == card["metrics"]
    assert [f["path"] for f in entry["files"]] == list(zoo.FOLDER_FILES)
    zoo.add_zoo_entry(entry)
    zoo.add_zoo_entry({**entry, "summary": "replaced in place"})
    assert [e["name"] for e in json.loads(manifest.read_text())["models"]] == ["tiny-founder", "tiny-dx"]

    assert zoo.resolve("tiny-dx") == folder
    model = ecgfm.load("tiny-dx")  # ecgfm.pretrained.load through zoo_entry and resolve
    assert {"p_AF", "p_SR"} <= set(model.output_names())
    assert main(["zoo", "info", "tiny-dx", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["local"] == {"status": "present", "path": str(folder)} and info["summary"] == "replaced in place"

    (folder / "labels.json").write_text("{}")
    with pytest.raises(zoo.ChecksumError, match=str(folder / "labels.json")):
        zoo.resolve("tiny-dx")
    (folder / "card.md").unlink()
    assert main(["zoo", "verify", "tiny-dx"]) == 1
    err = capsys.readouterr().err
    assert str(folder / "labels.json") in err and str(folder / "card.md") in err


def test_the_folder_file_names_are_the_published_formats():
    assert zoo.FOLDER_FORMAT == pretrained.FORMAT
    assert zoo.FOLDER_FILES == (pretrained.CONFIG_NAME, pretrained.WEIGHTS_NAME, pretrained.LABELS_NAME, "card.md")
    assert pretrained.CARD_NAME == "card.md"


# ------------------------------------------------------------------------------------------- the shipped manifest
def test_zoo_list_shows_both_ecgfounder_models():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["zoo", "list"]) == 0
    lines = {line.split()[0]: line for line in out.getvalue().splitlines() if line.strip()}
    assert "12 (I..V6)" in lines["ecgfounder-12lead"] and "absent" in lines["ecgfounder-12lead"]
    assert " I " in lines["ecgfounder-1lead"] and "MIT" in lines["ecgfounder-1lead"]


def test_the_manifest_input_contracts_are_the_registered_backbones():
    entries = zoo.zoo_entries()
    assert {"ecgfounder-12lead", "ecgfounder-1lead"} <= set(entries)
    for entry in entries.values():
        if entry["format"] == zoo.FILE_FORMAT:
            assert entry["input"] == BACKBONES.create(entry["backbone"]).model_config.input.to_dict(), entry["name"]
    hub = entries["ecgfounder-12lead"]["source"]["hub"]
    assert (hub["repo_id"], hub["filename"]) == (HUB_REPO, "12_lead_ECGFounder.pth")


def test_docs_zoo_md_holds_the_table_generated_from_the_manifest():
    text = (REPO / "docs" / "zoo.md").read_text()
    table = text.split(zoo.TABLE_START, 1)[1].split(zoo.TABLE_END, 1)[0]
    assert table == "\n" + zoo.zoo_markdown_table(), "run `ecgfm zoo table --write docs/zoo.md`"


def test_a_broken_card_is_one_line_naming_the_entry_and_the_key(manifest, weights):
    entry = _hub_entry(weights, "broken")
    del entry["licence"]
    with pytest.raises(zoo.ZooError, match=r"'broken'.*'licence' is missing"):
        zoo.add_zoo_entry(entry)
    entry = {**_hub_entry(weights, "shipped-unhashed"), "source": {"shipped": True}}
    entry["files"] = [{"path": FILE, "bytes": None, "sha256": None}]
    with pytest.raises(zoo.ZooError, match="'shipped-unhashed'.*'files' a shipped model records the sha256"):
        zoo.add_zoo_entry(entry)
    manifest.write_text(json.dumps({"zoo_version": 1, "models": [{**_hub_entry(weights), "format": "onnx"}]}))
    with pytest.raises(zoo.ZooError, match=r"zoo\.json: models\[0\] \('tiny-founder'\): 'format' must be one of"):
        zoo.zoo_entries()


def test_an_unknown_name_lists_the_known_ones(manifest, capsys):
    assert main(["zoo", "info", "ecgfounder"]) == 1
    assert "no zoo model 'ecgfounder'; known: tiny-founder" in capsys.readouterr().err


def test_the_zoo_imports_neither_torch_nor_the_command_line():
    import subprocess
    import sys

    modules = ("torch", "ecgfm.pretrained", "ecgfm.commands")
    code = f"import sys, ecgfm.zoo; print(sorted(m for m in {modules} if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
