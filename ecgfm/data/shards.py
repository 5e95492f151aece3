"""HDF5 shard format v1: int16 µV segments + lead mask + targets + ids; an atomic writer, a reader and a verifier.

The format is specified in docs/shard-format.md; bump ``SHARD_VERSION`` when it changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ecgfm.data.checksums import ArrayChecksum, array_checksum, dataset_checksum
from ecgfm.io import atomic_path, atomic_write_json
from ecgfm.leads import STANDARD_FS, STANDARD_LEADS, STANDARD_N_SAMPLES

SHARD_FORMAT = "ecgfm-shard"
SHARD_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: The per-segment dataset of a feature folder (``ecgfm embed``): float16 ``[N, D]`` in place of ``/signal``.
FEATURES_KEY = "features"
INT16_MIN, INT16_MAX = -32767, 32767  # -32768 is left free: it is WFDB's "invalid sample"
#: How a ``/metadata/<name>`` column is stored: ``number`` float32 (NaN = missing), ``string`` UTF-8 ("" = missing).
METADATA_KINDS = ("number", "string")


class ShardError(RuntimeError):
    """A shard or manifest that is missing, corrupt or of another format; the message names the file."""


@dataclass
class TargetSpec:
    """One target stored in the shards: ``kind`` is multilabel | regression | multiclass | binary."""

    kind: str
    names: list[str]
    units: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("multilabel", "regression", "multiclass", "binary"):
            raise ValueError(f"unknown target kind {self.kind!r}")


@dataclass
class TargetSummary:
    """Per-column counts, sums and sums of squares of one target over a split (missing values skipped).

    Enough for standardisation (mean, std), class weights and positive weights, gathered shard by shard.
    """

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> TargetSummary:
        """Summary of a [N, C] array with NaN for missing values."""
        values = np.asarray(values, dtype=np.float64)
        known = np.isfinite(values)
        filled = np.where(known, values, 0.0)
        return cls(known.sum(0).astype(np.int64), filled.sum(0), np.square(filled).sum(0))

    def __add__(self, other: TargetSummary) -> TargetSummary:
        return TargetSummary(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    def select(self, columns: list[int]) -> TargetSummary:
        return TargetSummary(self.count[columns], self.total[columns], self.total_sq[columns])

    @property
    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.total / self.count

    @property
    def std(self) -> np.ndarray:
        """Sample standard deviation (n - 1)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (self.total_sq - self.total**2 / self.count) / (self.count - 1)
        return np.sqrt(np.clip(var, 0.0, None))


@dataclass
class Manifest:
    """manifest.json beside the shards: shard list with counts, target vocabularies, split by patient."""

    shards: list[dict[str, Any]] = field(default_factory=list)  # {"path", "n_segments", "checksums"}
    targets: dict[str, TargetSpec] = field(default_factory=dict)
    fs: float = STANDARD_FS
    n_samples: int = STANDARD_N_SAMPLES
    lead_names: list[str] = field(default_factory=lambda: list(STANDARD_LEADS))
    format: str = SHARD_FORMAT
    version: int = SHARD_VERSION
    source: dict[str, Any] = field(default_factory=dict)
    #: only in a feature folder written by ``ecgfm embed`` (docs/embeddings.md): size, dtype, the model, the source
    features: dict[str, Any] = field(default_factory=dict)
    #: per-segment metadata stored in ``/metadata/<name>`` (``ecgfm shard --metadata``): name -> ``{"kind": "number"
    #: | "string", "source": where it was read}``; read by evaluation (subgroups), never by training batches
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def n_segments(self) -> int:
        return sum(int(s["n_segments"]) for s in self.shards)

    @property
    def data_key(self) -> str:
        """The per-segment dataset a model reads: ``signal`` (int16 µV), or ``features`` in a feature folder."""
        return FEATURES_KEY if self.features else "signal"

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one segment's row of :attr:`data_key`: ``(leads, samples)``, or ``(feature size,)``."""
        if self.features:
            return (int(self.features["size"]),)
        return (len(self.lead_names), int(self.n_samples))

    def save(self, root: Path) -> Path:
        path = Path(root) / MANIFEST_NAME
        data = asdict(self)
        if not data["features"]:  # a signal folder's manifest stays as it always was
            del data["features"]
        if not data["metadata"]:  # nor does a folder converted without metadata
            del data["metadata"]
        data["n_segments"] = self.n_segments
        return atomic_write_json(path, data)

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        root = Path(root)
        path = root / MANIFEST_NAME if root.is_dir() else root
        if not path.is_file():
            raise ShardError(f"no {MANIFEST_NAME} at {path}: run `ecgfm shard` first")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ShardError(f"{path} is not valid JSON: {err}") from err
        if data.get("format") != SHARD_FORMAT or data.get("version") != SHARD_VERSION:
            raise ShardError(
                f"{path} is format {data.get('format')!r} v{data.get('version')}; "
                f"this ecgfm reads {SHARD_FORMAT} v{SHARD_VERSION}"
            )
        data.pop("n_segments", None)
        data["targets"] = {k: TargetSpec(**v) for k, v in data.get("targets", {}).items()}
        return cls(**data)


def to_int16_microvolts(signal_mv: np.ndarray) -> np.ndarray:
    """float mV -> int16 µV (1 LSB = 1 µV), clipped to ±32.767 mV; NaN becomes 0."""
    uv = np.nan_to_num(np.asarray(signal_mv, dtype=np.float64) * 1000.0, nan=0.0)
    return np.clip(np.rint(uv), INT16_MIN, INT16_MAX).astype(np.int16)


def patient_key(patient_id: str) -> np.uint64:
    """A stable 64-bit key for a patient id (first 8 bytes of its sha256): splits need no strings at scale."""
    return np.frombuffer(hashlib.sha256(patient_id.encode()).digest()[:8], dtype=">u8")[0].astype(np.uint64)


class ShardWriter:
    """Write one shard under a temporary name and rename it into place on ``close()``, so no half shard exists.

    Signals are spooled to a raw temporary file and stored as one contiguous, uncompressed ``/signal`` dataset,
    so readers find each segment at a fixed byte offset and read it with one pread (no HDF5 call per segment).
    After ``close()``, ``checksums`` holds each dataset's checksum, hashed from what was written, not read back.
    """

    def __init__(
        self,
        path: str | Path,
        targets: dict[str, TargetSpec],
        fs: float = STANDARD_FS,
        n_samples: int = STANDARD_N_SAMPLES,
        lead_names: tuple[str, ...] = STANDARD_LEADS,
        attrs: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.spool_path = self.path.with_name(self.path.name + ".signal.tmp")
        self.targets = targets
        self.lead_names = tuple(lead_names)
        self.n_samples = n_samples
        self.attrs = {
            "format": SHARD_FORMAT,
            "version": SHARD_VERSION,
            "fs": fs,
            "n_samples": n_samples,
            "lead_names": list(lead_names),
            "preprocessing": "none (raw µV; preprocessing runs on the device)",
            **(attrs or {}),
        }
        self._spool = open(self.spool_path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._rows: dict[str, list] = {
            "lead_mask": [],
            "record_id": [],
            "patient_id": [],
            "segment_start": [],
            "valid_samples": [],
        }
        self._targets: dict[str, list[np.ndarray]] = {name: [] for name in targets}
        #: metadata name -> kind (``number``: float32, NaN = missing; ``string``: UTF-8, "" = missing)
        self.metadata = dict(metadata or {})
        for name, kind in self.metadata.items():
            if kind not in METADATA_KINDS or not name or "/" in name:
                raise ShardError(f"metadata {name!r}: kind must be one of {METADATA_KINDS} and the name have no '/'")
        self._metadata: dict[str, list[Any]] = {name: [] for name in self.metadata}
        self._signal_checksum = ArrayChecksum(np.int16, (len(self.lead_names), n_samples))
        self.checksums: dict[str, str] = {}

    def append(
        self,
        signal_int16: np.ndarray,
        lead_mask: np.ndarray,
        record_id: str,
        patient_id: str,
        segment_start: int,
        targets: dict[str, np.ndarray],
        valid_samples: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Add one segment: int16 [L, T] µV, lead_mask bool [L], targets {name: float32 [K]} (NaN = missing).

        ``valid_samples`` < T marks a zero-padded last piece of a record (default: all T samples are real);
        ``metadata`` gives the writer's metadata columns (a name left out, or None, is stored as missing).
        """
        expected = (len(self.lead_names), self.n_samples)
        if signal_int16.shape != expected or signal_int16.dtype != np.int16:
            raise ShardError(
                f"segment of {record_id} has shape {signal_int16.shape} {signal_int16.dtype}; expected {expected} int16"
            )
        segment = np.ascontiguousarray(signal_int16)
        self._spool.write(segment.data)
        self._signal_checksum.update(segment[None])
        rows = self._rows
        rows["lead_mask"].append(np.asarray(lead_mask, dtype=bool))
        rows["record_id"].append(record_id)
        rows["patient_id"].append(patient_id)
        rows["segment_start"].append(segment_start)
        rows["valid_samples"].append(self.n_samples if valid_samples is None else valid_samples)
        for name, spec in self.targets.items():
            value = np.asarray(targets[name], dtype=np.float32).reshape(-1)
            if value.shape != (len(spec.names),):
                raise ShardError(f"target {name!r} of {record_id} has {value.size} values, expected {len(spec.names)}")
            self._targets[name].append(value)
        given = metadata or {}
        for name, kind in self.metadata.items():
            value = given.get(name)
            if kind == "number":
                self._metadata[name].append(np.nan if value is None or value == "" else float(value))
            else:
                self._metadata[name].append("" if value is None else str(value))

    def __len__(self) -> int:
        """Segments appended so far."""
        return len(self._rows["record_id"])

    def close(self) -> Path:
        """Write the HDF5 file under a temporary name, then rename it into place; returns the final path."""
        self._spool.close()
        with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as f:
            self._write_hdf5(f)
        self.spool_path.unlink(missing_ok=True)
        return self.path

    def _write_hdf5(self, f: h5py.File) -> None:
        """The datasets of docs/shard-format.md; the signal is copied from the spool 256 segments at a time."""
        n, leads = len(self), len(self.lead_names)
        rows = self._rows
        f.attrs.update({**self.attrs, "n_segments": n})
        signal = f.create_dataset("signal", (n, leads, self.n_samples), np.int16)  # contiguous: one pread each
        spooled = np.memmap(self.spool_path, np.int16, "r", shape=(n, leads, self.n_samples)) if n else None
        for start in range(0, n, 256):
            signal[start : start + 256] = spooled[start : start + 256]
        del spooled
        checksums = {"/signal": self._signal_checksum.hexdigest()}
        columns = {
            "lead_mask": np.array(rows["lead_mask"], dtype=bool).reshape(n, leads),
            "record_id": rows["record_id"],
            "patient_id": rows["patient_id"],
            "patient_key": np.array([patient_key(p) for p in rows["patient_id"]], dtype=np.uint64),
            "segment_start": np.array(rows["segment_start"], dtype=np.int32),
            "valid_samples": np.array(rows["valid_samples"], dtype=np.int32),
        }
        for name, values in columns.items():
            if isinstance(values, list):  # the ids: variable-length UTF-8 strings
                f.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
                checksums[f"/{name}"] = array_checksum(values, "str")
            else:
                f.create_dataset(name, data=values)
                checksums[f"/{name}"] = array_checksum(values)
        group = f.create_group("targets")
        for name, spec in self.targets.items():
            values = np.array(self._targets[name], dtype=np.float32).reshape(n, len(spec.names))
            dset = group.create_dataset(name, data=values)
            dset.attrs.update({"names": spec.names, "units": spec.units, "kind": spec.kind})
            checksums[f"/targets/{name}"] = array_checksum(values)
        if self.metadata:
            group = f.create_group("metadata")
            for name, kind in self.metadata.items():
                values = self._metadata[name]
                if kind == "number":
                    array = np.array(values, dtype=np.float32).reshape(n)
                    group.create_dataset(name, data=array).attrs["kind"] = kind
                    checksums[f"/metadata/{name}"] = array_checksum(array)
                else:
                    dset = group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
                    dset.attrs["kind"] = kind
                    checksums[f"/metadata/{name}"] = array_checksum(values, "str")
        self.checksums = dict(sorted(checksums.items()))

    def abort(self) -> None:
        """Drop the spool (a half-written shard is removed by ``close`` itself)."""
        self._spool.close()
        self.spool_path.unlink(missing_ok=True)


def open_shard(path: str | Path) -> h5py.File:
    """Open a shard read-only and check its format; errors name the file."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ShardError(f"cannot open shard {path}: {err}") from err
    if f.attrs.get("format") != SHARD_FORMAT or int(f.attrs.get("version", -1)) != SHARD_VERSION:
        f.close()
        raise ShardError(f"{path} is not an {SHARD_FORMAT} v{SHARD_VERSION} shard")
    return f


def sidecar_path(shard: str | Path) -> Path:
    """``shard-NNNNN.json`` beside ``shard-NNNNN.h5``: what the converter made the shard from, and its checksums."""
    return Path(shard).with_suffix(".json")


def update_checksums(root: str | Path, entry: dict[str, Any], changed: dict[str, str | None]) -> None:
    """After a shard was rewritten in place, set (or, with None, drop) dataset checksums in its manifest entry and
    its sidecar, so ``ecgfm shard verify`` and a rerun of ``ecgfm shard`` check what is now there.

    A shard listed without checksums (an older folder) stays without; the caller saves the manifest.
    """
    if "checksums" not in entry:
        return

    def apply(sums: dict[str, str]) -> dict[str, str]:
        sums = dict(sums)
        for name, value in changed.items():
            if value is None:
                sums.pop(name, None)
            else:
                sums[name] = value
        return dict(sorted(sums.items()))

    entry["checksums"] = apply(entry["checksums"])
    sidecar = sidecar_path(Path(root) / entry["path"])
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return  # no sidecar (not a converted folder), or a damaged one: a rerun of `ecgfm shard` rebuilds that shard
    if isinstance(data, dict) and "checksums" in data:
        data["checksums"] = apply(data["checksums"])
        atomic_write_json(sidecar, data, indent=None)


def check_shard(
    path: Path,
    n_segments: int,
    targets: dict[str, TargetSpec],
    checksums: dict[str, str] | None,
    lead_names: list[str] | tuple[str, ...] = STANDARD_LEADS,
    n_samples: int = STANDARD_N_SAMPLES,
    quick: bool = False,
    reference: str = MANIFEST_NAME,
    data_key: str = "signal",
    row_shape: tuple[int, ...] | None = None,
) -> list[str]:
    """Problems of one shard against what ``reference`` (the manifest, or a sidecar) says it holds, one line each.

    The structure always (opens, format, counts, shapes, targets); unless ``quick``, also every dataset against
    its checksum, which reads the whole file. A feature shard (``ecgfm embed``) passes ``data_key="features"`` and
    its ``row_shape`` ``(D,)`` in place of the signal's ``(leads, samples)``.
    """
    problems: list[str] = []
    try:
        with open_shard(path) as f:
            if data_key not in f:
                raise ShardError(f"no dataset /{data_key}")
            data = f[data_key]
            n = data.shape[0]
            if n != int(n_segments):
                problems.append(f"{path}: {n} segments, {reference} says {n_segments}")
            expected = tuple(row_shape) if row_shape is not None else (len(lead_names), n_samples)
            if data.shape[1:] != expected:
                problems.append(f"{path}: {data_key} shape {data.shape[1:]} != {expected}")
            for name in ("lead_mask", "record_id", "patient_id", "patient_key", "segment_start", "valid_samples"):
                if name in f and f[name].shape[0] != n:
                    problems.append(f"{path}: /{name} has {f[name].shape[0]} rows, /{data_key} has {n}")
            for name, dset in f["metadata"].items() if "metadata" in f else ():
                if dset.shape[0] != n:
                    problems.append(f"{path}: /metadata/{name} has {dset.shape[0]} rows, /{data_key} has {n}")
            for name, spec in targets.items():
                if f"targets/{name}" not in f:
                    problems.append(f"{path}: target {name!r} missing")
                elif list(f[f"targets/{name}"].attrs["names"]) != spec.names:
                    problems.append(f"{path}: target {name!r} names differ from {reference}")
            for name in f["targets"] if "targets" in f else ():
                if name not in targets:
                    problems.append(f"{path}: holds target {name!r}, not one of {sorted(targets)}")
            if n:  # touch the last segment so a truncated file fails here, not mid-training
                data[n - 1]
            if not quick:
                problems += _checksum_problems(f, path, checksums, reference)
    except (ShardError, OSError, KeyError) as err:
        problems.append(f"{path}: {err}")
    return problems


def _checksum_problems(f: h5py.File, path: Path, checksums: dict[str, str] | None, reference: str) -> list[str]:
    """One line per dataset whose content differs from its checksum, lacks one, or cannot be read."""
    if not checksums:
        return [
            f"{path}: no dataset checksums in {reference} (written by an older ecgfm): convert again to add them, "
            "or check the structure only with `ecgfm shard verify --quick`"
        ]
    present: list[str] = []
    f.visititems(lambda name, obj: present.append(f"/{name}") if isinstance(obj, h5py.Dataset) else None)
    problems = []
    for name in sorted(set(present) | set(checksums)):
        if name not in present:
            problems.append(f"{path}: dataset {name} is missing ({reference} has its checksum)")
        elif name not in checksums:
            problems.append(f"{path}: dataset {name} has no checksum in {reference}")
        else:
            try:
                actual = dataset_checksum(f[name])
            except Exception as err:  # a corrupt file fails in many ways inside HDF5; each is a finding, not a crash
                problems.append(f"{path}: dataset {name} cannot be read ({type(err).__name__}: {err})")
                continue
            if actual != checksums[name]:
                changed = f"differs from its checksum in {reference} (changed after it was written)"
                problems.append(f"{path}: dataset {name} {changed}")
    return problems


def verify_shards(root: str | Path, quick: bool = False) -> list[str]:
    """Check every shard against the manifest: exists, opens, format, counts, shapes, target names and, unless
    ``quick``, every dataset's checksum (which reads every byte).

    Returns a list of problems, one line each naming the shard (and the dataset); empty when all is well.
    """
    root = Path(root)
    manifest = Manifest.load(root)
    problems: list[str] = []
    for entry in manifest.shards:
        problems += check_shard(
            root / entry["path"],
            int(entry["n_segments"]),
            manifest.targets,
            entry.get("checksums"),
            manifest.lead_names,
            int(manifest.n_samples),
            quick=quick,
            data_key=manifest.data_key,
            row_shape=manifest.row_shape,
        )
    return problems
