"""The model zoo: one card per model in ``checkpoints/zoo.json``, and where its files are on this machine.

Resolution looks locally first (an explicit path, ``$ECGFM_HOME``, the user cache, the repository's
``checkpoints/``, the Hugging Face hub cache) and asks the hub only when the caller allows downloads; every file
with a recorded sha256 is checked before it is used. This module builds no models and never imports torch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ecgfm.io import atomic_write_json, atomic_write_text, sha256sum
from ecgfm.registry import UnknownNameError
from ecgfm.resources import zoo_manifest

__all__ = [
    "FILE_FORMAT",
    "FOLDER_FORMAT",
    "ZOO_MANIFEST",
    "ChecksumError",
    "FileCheck",
    "ZooError",
    "add_zoo_entry",
    "download",
    "hub_cache_dir",
    "locate",
    "read_manifest",
    "resolve",
    "resolve_weights",
    "search_dirs",
    "sha256sum",
    "verify_entry",
    "write_zoo_table",
    "zoo_entries",
    "zoo_entry",
    "zoo_entry_for_folder",
    "zoo_markdown_table",
]

ZOO_MANIFEST = zoo_manifest()  # checkpoints/zoo.json in a source checkout, ecgfm/_checkpoints/ in a wheel
ZOO_VERSION = 1
#: A backbone's native weight file (ECGFounder's ``.pth``): loads into a registered backbone.
FILE_FORMAT = "ecgfounder-pth"
#: A published model folder: ``ecgfm.pretrained.FORMAT``, spelled out so that the zoo never imports torch.
FOLDER_FORMAT = "ecgfm-pretrained"
FORMATS = (FILE_FORMAT, FOLDER_FORMAT)
#: The files of a published folder (``ecgfm.pretrained``'s CONFIG_NAME, WEIGHTS_NAME, LABELS_NAME, CARD_NAME).
FOLDER_FILES = ("config.yaml", "model.safetensors", "labels.json", "card.md")
REQUIRED_KEYS = (
    "name",
    "format",
    "summary",
    "backbone",
    "input",
    "heads",
    "files",
    "source",
    "licence",
    "paper",
    "metrics",
    "intended_use",
    "limitations",
)
TEXT_KEYS = ("summary", "backbone", "licence", "paper", "intended_use", "limitations", "training_data")
NOT_STATED = "not stated by the publisher"
TABLE_START, TABLE_END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")  # no slash: ecgfm.load() reads a slash as a path
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: sha256 of files already hashed in this process, by (path, size, mtime, inode): a second load does not rehash.
_HASHED: dict[tuple[str, int, int, int], str] = {}


class ZooError(ValueError):
    """A manifest entry that breaks the schema; the message names the manifest, the entry and the key."""


class ChecksumError(ValueError):
    """A zoo file whose sha256 is not the recorded one: corrupt, truncated or replaced. The message names it."""


# ----------------------------------------------------------------------------------------------- the manifest
def read_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """The manifest as stored (``{"zoo_version": 1, "models": [...]}``), every entry validated."""
    path = Path(path or ZOO_MANIFEST)
    if not path.is_file():
        return {"zoo_version": ZOO_VERSION, "models": []}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ZooError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), list):
        raise ZooError(f"{path}: a zoo manifest is an object with a 'models' list")
    if int(manifest.get("zoo_version", 0)) > ZOO_VERSION:
        raise ZooError(f"{path} has zoo_version {manifest['zoo_version']}, newer than this ecgfm reads: upgrade ecgfm")
    seen: set[str] = set()
    for i, entry in enumerate(manifest["models"]):
        validate_entry(entry, f"{path}: models[{i}]")
        if entry["name"] in seen:
            raise ZooError(f"{path}: model {entry['name']!r} is listed twice")
        seen.add(entry["name"])
    return manifest


def zoo_entries() -> dict[str, dict[str, Any]]:
    """Every model card of the manifest by name, in manifest order (empty when no manifest ships)."""
    return {entry["name"]: entry for entry in read_manifest()["models"]}


def zoo_entry(name: str) -> dict[str, Any]:
    """The card of one model; an unknown name is one line listing the known ones."""
    entries = zoo_entries()
    if name not in entries:
        raise UnknownNameError(
            f"no zoo model {name!r}; known: {', '.join(entries) or 'none'} (`ecgfm zoo list`), or pass a path"
        )
    return entries[name]


def validate_entry(entry: Any, where: str = "zoo entry") -> dict[str, Any]:
    """Check one card against the schema (docs/zoo.md); the first problem is a :class:`ZooError` naming the key."""
    if not isinstance(entry, dict):
        raise ZooError(f"{where} is not an object")
    name = entry.get("name")
    where = f"{where} ({name!r})" if isinstance(name, str) else where

    def fail(key: str, problem: str) -> None:
        raise ZooError(f"{where}: {key!r} {problem}")

    missing = [key for key in REQUIRED_KEYS if key not in entry]
    if missing:
        fail(missing[0], "is missing" + (f" (so are {', '.join(missing[1:])})" if missing[1:] else ""))
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        fail("name", "must be lower-case letters, digits, '.', '_' or '-' (no slash)")
    if entry["format"] not in FORMATS:
        fail("format", f"must be one of {', '.join(FORMATS)}, not {entry['format']!r}")
    for key in TEXT_KEYS:
        if key in entry and not isinstance(entry[key], str):
            fail(key, "must be a string")
    _validate_input(entry["input"], fail)
    _validate_heads(entry["heads"], fail)
    _validate_files(entry, fail)
    _validate_source(entry, fail)
    metrics = entry["metrics"]
    if not isinstance(metrics, list) or any(
        not isinstance(m, dict) or not {"data", "split", "metric", "value"} <= set(m) for m in metrics
    ):
        fail("metrics", "must be a list of {data, split, metric, value}")
    return entry


def _validate_input(contract: Any, fail: Any) -> None:
    keys = ("fs", "n_samples", "lead_names", "units", "preprocessing")
    if not isinstance(contract, dict) or not set(keys) <= set(contract):
        fail("input", f"must be the full input contract ({', '.join(keys)})")
    if not isinstance(contract["preprocessing"], dict) or "name" not in contract["preprocessing"]:
        fail("input", "preprocessing must be a chain with its name and every parameter")
    if not isinstance(contract["lead_names"], list) or not contract["lead_names"]:
        fail("input", "lead_names must be a non-empty list")


def _validate_heads(heads: Any, fail: Any) -> None:
    if not isinstance(heads, list):
        fail("heads", "must be a list")
    for head in heads:
        if not isinstance(head, dict) or not {"name", "kind"} <= set(head):
            fail("heads", "entries need a name and a kind")
        named = isinstance(head.get("labels"), list)
        counted = isinstance(head.get("n_labels"), int) and isinstance(head.get("labels_source"), str)
        if not (named or counted):
            fail("heads", f"head {head['name']!r} needs its labels, or n_labels with labels_source (where they are)")


def _validate_files(entry: dict[str, Any], fail: Any) -> None:
    files = entry["files"]
    if not isinstance(files, list) or not files:
        fail("files", "must be a non-empty list of {path, bytes, sha256}")
    for spec in files:
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            fail("files", "entries need a path")
        parts = PurePosixPath(spec["path"]).parts
        if not parts or spec["path"].startswith("/") or ".." in parts:
            fail("files", f"path {spec['path']!r} must be relative, inside its folder")
        if spec.get("sha256") is not None and not _SHA256.fullmatch(str(spec["sha256"])):
            fail("files", f"{spec['path']}: sha256 must be 64 lower-case hex digits or null (unknown)")
        if spec.get("bytes") is not None and (not isinstance(spec["bytes"], int) or spec["bytes"] < 0):
            fail("files", f"{spec['path']}: bytes must be a size or null (unknown)")
    if entry["format"] == FILE_FORMAT and len(files) != 1:
        fail("files", f"a {FILE_FORMAT} model is one file")
    if entry["format"] == FOLDER_FORMAT and {spec["path"] for spec in files} != set(FOLDER_FILES):
        fail("files", f"a {FOLDER_FORMAT} folder lists {', '.join(FOLDER_FILES)}")


def _validate_source(entry: dict[str, Any], fail: Any) -> None:
    source = entry["source"]
    if not isinstance(source, dict) or (source.get("shipped") is True) == ("hub" in source):
        fail("source", 'must be {"hub": {repo_id, filename, revision}} or {"shipped": true}')
    hub = source.get("hub")
    if hub is not None:
        if not isinstance(hub, dict) or not isinstance(hub.get("repo_id"), str) or "/" not in hub["repo_id"]:
            fail("source", "hub needs a repo_id (owner/name)")
        if not isinstance(hub.get("revision"), str) or not hub["revision"]:
            fail("source", "hub needs a revision (a branch, tag or commit)")
        if entry["format"] == FILE_FORMAT and not isinstance(hub.get("filename"), str):
            fail("source", "hub needs the filename in the repo")
    elif any(spec.get("sha256") is None for spec in entry["files"]):
        fail("files", "a shipped model records the sha256 of every file")


def add_zoo_entry(entry: Mapping[str, Any], manifest: str | Path | None = None) -> Path:
    """Add a card to the manifest, or replace the one of that name in place; the file is rewritten atomically."""
    path = Path(manifest or ZOO_MANIFEST)
    entry = validate_entry(json.loads(json.dumps(entry)))
    current = read_manifest(path)
    models = [entry if m["name"] == entry["name"] else m for m in current["models"]]
    if entry["name"] not in {m["name"] for m in current["models"]}:
        models.append(entry)
    return atomic_write_json(path, {"zoo_version": ZOO_VERSION, "models": models})


def zoo_entry_for_folder(
    folder: str | Path, name: str | None = None, source: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The card of a published model folder (``save_pretrained``/``ecgfm publish``), its four files hashed.

    A shipped model (the default source) is found as ``checkpoints/<name>/``: put the folder there under its name.
    """
    import yaml  # a dependency, imported here: reading the manifest needs none of it

    folder = Path(folder)
    config_path = folder / FOLDER_FILES[0]
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file (a published ecgfm model is a folder holding it)")
    config = yaml.safe_load(config_path.read_text())
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        raise ZooError(f"{config_path} is not an ecgfm model config (format {FOLDER_FORMAT!r} expected)")
    card = config.get("card") or {}
    labels = json.loads((folder / "labels.json").read_text())
    heads = [
        {
            "name": head,
            "kind": spec["kind"],
            "target": spec.get("target"),
            "labels": list(spec["labels"]),
            "units": spec.get("units"),
            "outputs": list(spec.get("outputs") or []),
        }
        for head, spec in labels.items()
    ]
    files = []
    for file_name in FOLDER_FILES:
        path = folder / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (a published model folder holds {', '.join(FOLDER_FILES)})")
        files.append({"path": file_name, "bytes": path.stat().st_size, "sha256": sha256sum(path)})
    name = name or config.get("name") or folder.name
    entry = {
        "name": name,
        "format": FOLDER_FORMAT,
        "summary": str(card.get("summary") or f"{name}: a published ecgfm model ({', '.join(labels)})"),
        "backbone": config["contract"]["backbone"]["name"],
        "input": config["contract"]["input"],
        "heads": heads,
        "files": files,
        "source": dict(source) if source else {"shipped": True},
        "licence": str(card.get("licence") or NOT_STATED),
        "paper": str(card.get("paper") or NOT_STATED),
        "training_data": str(card.get("training_data") or NOT_STATED),
        "metrics": list(card.get("metrics") or []),
        "intended_use": str(card.get("intended_use") or NOT_STATED),
        "limitations": str(card.get("limitations") or NOT_STATED),
    }
    return validate_entry(json.loads(json.dumps(entry)), f"the card of {folder}")


# ----------------------------------------------------------------------------------------------- where files are
def search_dirs() -> list[tuple[str, Path]]:
    """Local folders searched, in order, each with how a user would name it (the hub cache comes after them)."""
    dirs = []
    home = os.environ.get("ECGFM_HOME")
    if home:
        dirs.append(("$ECGFM_HOME", Path(home).expanduser()))
    # the older variable: a path list, still read after $ECGFM_HOME
    older = os.environ.get("ECGFM_WEIGHTS", "").split(os.pathsep)
    dirs += [("$ECGFM_WEIGHTS", Path(p).expanduser()) for p in older if p]
    dirs.append(("user cache", user_cache_dir()))
    dirs.append(("checkpoints/", ZOO_MANIFEST.parent))
    return dirs


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ecgfm``, else ``~/.cache/ecgfm``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ecgfm"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as ``huggingface_hub`` picks it, read at call time (it reads it once, at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(os.path.expandvars(str(home))).expanduser() / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) forbids the hub's network calls."""
    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    if any(str(v).strip().lower() in ("1", "true", "yes", "on") for v in values if v):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class Located:
    """One copy of a zoo model on this machine: its file or folder, where it was found, and its files."""

    path: Path
    where: str
    files: tuple[tuple[dict[str, Any], Path], ...] = field(default_factory=tuple)


def _at(entry: dict[str, Any], root: Path, where: str, explicit: bool = False) -> Located | None:
    """The copy under a search folder (``root/<file>``, ``root/<name>/``); an explicit path may be the copy itself."""
    if entry["format"] == FILE_FORMAT:
        path = root if explicit and root.is_file() else root / entry["files"][0]["path"]
        return Located(path, where, ((entry["files"][0], path),)) if path.is_file() else None
    folder = root if explicit and (root / FOLDER_FILES[0]).is_file() else root / entry["name"]
    files = tuple((spec, folder / spec["path"]) for spec in entry["files"])
    return Located(folder, where, files) if folder.is_dir() else None


def _hub_source(entry: dict[str, Any], revision: str | None) -> tuple[str, str] | None:
    hub = entry["source"].get("hub")
    return None if hub is None else (hub["repo_id"], revision or hub["revision"])


def _from_hub(entry: dict[str, Any], revision: str | None, download: bool, force: bool = False) -> Located | None:
    """The copy in the hub cache (``huggingface_hub``'s layout: refs/, snapshots/<commit>/); the network is used
    only when ``download``.

    A cache lookup goes through ``try_to_load_from_cache``, not ``hf_hub_download(local_files_only=True)``: the
    latter builds request headers even then, and huggingface_hub 2.x fetches an agent registry from the hub for them.
    """
    source = _hub_source(entry, revision)
    if source is None:
        return None
    try:
        import huggingface_hub
    except ImportError:
        if download:
            raise FileNotFoundError(f"{entry['name']}: downloading needs huggingface_hub (pip install it)") from None
        return None
    repo_id, rev = source
    hub = entry["source"]["hub"]
    names = [hub["filename"]] if entry["format"] == FILE_FORMAT else [spec["path"] for spec in entry["files"]]
    prefix = f"{hub['subfolder'].strip('/')}/" if hub.get("subfolder") else ""
    cache_dir = str(hub_cache_dir())
    paths = []
    for name in names:
        if download:
            local = huggingface_hub.hf_hub_download(
                repo_id, prefix + name, revision=rev, cache_dir=cache_dir, force_download=force
            )
        else:
            local = huggingface_hub.try_to_load_from_cache(repo_id, prefix + name, cache_dir=cache_dir, revision=rev)
            if not isinstance(local, str) or not Path(local).is_file():  # None, or "known not to exist"
                return None
        paths.append(Path(local))
    where = f"Hugging Face hub cache ({repo_id}@{rev})"
    if entry["format"] == FILE_FORMAT:
        return Located(paths[0], where, ((entry["files"][0], paths[0]),))
    return Located(paths[0].parent, where, tuple(zip(entry["files"], paths, strict=True)))


def locate(
    entry: dict[str, Any], path: str | Path | None = None, revision: str | None = None, every: bool = False
) -> list[Located]:
    """The local copies of a model in resolution order (only the first unless ``every``); nothing is downloaded
    and nothing is hashed. An explicit ``path`` that does not exist is an error, never a silent fallback."""
    if path is not None:
        found = _at(entry, Path(path).expanduser(), "explicit path", explicit=True)
        if found is None:
            what = entry["files"][0]["path"] if entry["format"] == FILE_FORMAT else "a published model folder"
            raise FileNotFoundError(f"{path}: no such file or folder (the path given for {entry['name']}: {what})")
        return [found]
    copies = []
    for where, root in search_dirs():
        found = _at(entry, root, f"{where} {root}")
        if found is not None:
            copies.append(found)
            if not every:
                return copies
    found = _from_hub(entry, revision, download=False)
    return copies + ([found] if found is not None else [])


# ----------------------------------------------------------------------------------------------- checksums
def file_sha256(path: Path, use_cache: bool = True) -> str:
    """sha256 of a file, remembered in this process by path, size, mtime and inode (370 MB take a second)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if not use_cache or key not in _HASHED:
        _HASHED[key] = sha256sum(path)
    return _HASHED[key]


def check_file(name: str, spec: dict[str, Any], path: Path, use_cache: bool = True) -> bool:
    """True when ``path`` matches its recorded sha256, False when none is recorded; a mismatch raises a
    :class:`ChecksumError` naming the file, both hashes and how to get a good copy."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({spec['path']} of zoo model {name}: the copy is incomplete)")
    expected = spec.get("sha256")
    if expected is None:
        return False
    actual = file_sha256(path, use_cache)
    if actual != expected:
        size = path.stat().st_size
        sizes = f" ({size} bytes, {spec['bytes']} recorded)" if spec.get("bytes") not in (None, size) else ""
        raise ChecksumError(
            f"{path} has sha256 {actual}, but the zoo records {expected} for {spec['path']} of {name}{sizes}: "
            f"the file is corrupt, truncated or replaced; delete it and run `ecgfm zoo download {name}`"
        )
    return True


@dataclass(frozen=True)
class FileCheck:
    """One file of one copy, checked: ``ok``, ``unverified`` (no sha256 recorded), ``corrupt`` or ``missing``;
    or an ``absent`` model (no copy at all, ``path`` None)."""

    name: str
    status: str
    path: Path | None
    detail: str = ""


def verify_entry(
    entry: dict[str, Any], use_cache: bool = False, progress: Callable[[Path], None] | None = None
) -> list[FileCheck]:
    """Every file of every local copy of a model hashed against the manifest (what ``ecgfm zoo verify`` prints);
    ``progress`` hears of each file before it is hashed."""
    name = entry["name"]
    copies = locate(entry, every=True)
    if not copies:
        return [FileCheck(name, "absent", None, "not on this machine")]
    checks = []
    for copy in copies:
        for spec, path in copy.files:
            if progress is not None and spec.get("sha256") and path.is_file():
                progress(path)
            try:
                verified = check_file(name, spec, path, use_cache)
            except ChecksumError as err:
                checks.append(FileCheck(name, "corrupt", path, str(err)))
            except FileNotFoundError as err:
                checks.append(FileCheck(name, "missing", path, str(err)))
            else:
                detail = f"sha256 {spec['sha256']}" if verified else "present, no checksum recorded"
                checks.append(FileCheck(name, "ok" if verified else "unverified", path, f"{detail}; {copy.where}"))
    return checks


def local_status(entry: dict[str, Any]) -> tuple[str, Path | None]:
    """What ``ecgfm zoo list`` shows: the status of the copy resolution would use, and its path."""
    copies = locate(entry)
    if not copies:
        return "absent", None
    statuses = set()
    for spec, path in copies[0].files:
        try:
            statuses.add("present" if check_file(entry["name"], spec, path) else "present, unverified")
        except ChecksumError:
            return "corrupt", copies[0].path
        except FileNotFoundError:
            return "incomplete", copies[0].path
    return ("present, unverified" if "present, unverified" in statuses else "present"), copies[0].path


# ----------------------------------------------------------------------------------------------- resolution
def resolve(
    name: str, allow_download: bool = False, path: str | Path | None = None, revision: str | None = None
) -> Path:
    """The verified local file (``ecgfounder-pth``) or folder (``ecgfm-pretrained``) of a zoo model.

    Looks at ``path``, ``$ECGFM_HOME``, ``$ECGFM_WEIGHTS`` (older), the user cache, ``checkpoints/``, then the
    Hugging Face hub cache (``revision``: a branch, tag or commit; default the manifest's); downloads only when
    ``allow_download``. A copy that fails its checksum is an error, never skipped for the next one.
    """
    entry = zoo_entry(name)
    copies = locate(entry, path, revision)
    if copies:
        for spec, file in copies[0].files:
            check_file(name, spec, file)
        return copies[0].path
    if allow_download and _hub_source(entry, revision) is not None and not hub_offline():
        return download(name, revision)
    raise FileNotFoundError(_not_found(entry, revision, allow_download))


def _not_found(entry: dict[str, Any], revision: str | None, allow_download: bool) -> str:
    name = entry["name"]
    what = entry["files"][0]["path"] if entry["format"] == FILE_FORMAT else f"the folder {name}/"
    searched = [f"{where} {root}" for where, root in search_dirs()]
    if not os.environ.get("ECGFM_HOME"):
        searched.insert(0, "$ECGFM_HOME (unset)")
    source = _hub_source(entry, revision)
    if source is not None:
        searched.append(f"the Hugging Face hub cache {hub_cache_dir()} ({source[0]}@{source[1]})")
    message = f"zoo model {name!r}: {what} is not on this machine; searched {', '.join(searched)}"
    if source is None:
        return f"{message}; it ships with ecgfm, so the installation is incomplete: reinstall ecgfm"
    if allow_download:
        return f"{message}; downloads are off because HF_HUB_OFFLINE is set: unset it, or copy the file here"
    return (
        f"{message}; get it with `ecgfm zoo download {name}` (or allow_download=True), put it in $ECGFM_HOME, "
        "or pass pretrained=PATH"
    )


def download(name: str, revision: str | None = None, force: bool = False) -> Path:
    """Fetch a model into the Hugging Face hub cache (the user asked for it) and verify it; returns its path."""
    entry = zoo_entry(name)
    source = _hub_source(entry, revision)
    if source is None:
        raise ValueError(f"zoo model {name!r} is already shipped with ecgfm: there is nothing to download")
    if hub_offline():
        raise FileNotFoundError(_not_found(entry, revision, allow_download=True))
    try:
        copy = _from_hub(entry, revision, download=True, force=force)
    except Exception as err:  # network, authentication, an unknown revision: one line, the cause chained
        raise FileNotFoundError(
            f"zoo model {name!r}: downloading from {source[0]}@{source[1]} failed: {' '.join(str(err).split())}"
        ) from err
    assert copy is not None
    for spec, file in copy.files:
        check_file(name, spec, file, use_cache=False)
    return copy.path


def resolve_weights(name: str, allow_download: bool = False) -> Path:
    """The native weight file of a backbone's zoo entry (``create_backbone(name, pretrained=True)``)."""
    try:
        entry = zoo_entry(name)
    except UnknownNameError as err:
        raise UnknownNameError(f"{err}; for backbone weights of your own pass pretrained=PATH") from None
    if entry["format"] != FILE_FORMAT:
        raise ValueError(f"zoo model {name!r} is a published model folder, not backbone weights: ecgfm.load({name!r})")
    return resolve(name, allow_download=allow_download)


# ----------------------------------------------------------------------------------------------- docs
def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def describe_input(contract: Mapping[str, Any]) -> str:
    """One line: leads, rate, window, units and the preprocessing chain's name."""
    leads = contract["lead_names"]
    shown = f"{len(leads)} leads ({leads[0]}..{leads[-1]})" if len(leads) > 2 else f"lead {', '.join(leads)}"
    seconds = contract["n_samples"] / contract["fs"]
    chain = contract["preprocessing"]["name"]
    window = f"{contract['fs']:g} Hz, {contract['n_samples']} samples ({seconds:g} s)"
    return f"{shown}, {window}, {contract['units']}, `{chain}`"


def describe_heads(heads: Iterable[Mapping[str, Any]]) -> str:
    """One line per model: each head's name, kind and labels (or how many, and where their names are)."""
    parts = []
    for head in heads:
        if "labels" in head:
            labels = head["labels"]
            shown = ", ".join(labels[:6]) + (f", ... ({len(labels)})" if len(labels) > 6 else "")
        else:
            shown = f"{head['n_labels']} labels, names in {head['labels_source']}"
        parts.append(f"{head['name']}: {head['kind']}, {shown}")
    return "; ".join(parts) or "none (features only)"


def describe_source(entry: Mapping[str, Any]) -> str:
    hub = entry["source"].get("hub")
    if hub is None:
        return "ships with ecgfm"
    return f"hub `{hub['repo_id']}`, `{hub.get('filename') or '*'}` @ `{hub['revision']}`"


def describe_files(entry: Mapping[str, Any]) -> str:
    """Total size and each file's sha256 (first 12 digits; ``ecgfm zoo info`` shows them whole), or 'unknown'."""
    sizes = [spec.get("bytes") for spec in entry["files"]]
    size = "size unknown" if None in sizes else f"{sum(sizes) / 1e6:.2f} MB"
    hashes = [
        f"{spec['path']} `{spec['sha256'][:12]}`" if spec.get("sha256") else f"{spec['path']} (sha256 unknown)"
        for spec in entry["files"]
    ]
    return f"{size}; {', '.join(hashes)}"


def zoo_markdown_table(entries: Iterable[Mapping[str, Any]] | None = None) -> str:
    """The zoo table of docs/zoo.md, generated from the manifest so that the page never drifts from it."""
    entries = list(zoo_entries().values() if entries is None else entries)
    lines = [
        "| model | what it is | input | heads | source | files | licence | metrics |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        metrics = "; ".join(f"{m['metric']} {m['value']} ({m['data']}, {m['split']})" for m in e["metrics"])
        cells = [
            f"`{e['name']}`",
            e["summary"],
            describe_input(e["input"]),
            describe_heads(e["heads"]),
            describe_source(e),
            describe_files(e),
            e["licence"],
            metrics or "none recorded",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_zoo_table(page: str | Path) -> bool:
    """Replace the table between the zoo-table markers of ``page``; True when the page changed."""
    page = Path(page)
    text = page.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{page} has no {TABLE_START} ... {TABLE_END} markers to put the zoo table between")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    new = f"{head}{TABLE_START}\n{zoo_markdown_table()}{TABLE_END}{tail}"
    if new != text:
        atomic_write_text(page, new)
    return new != text
