"""Reader for PhysioNet/CinC Challenge 2020/2021 records (``.hea`` + ``.mat``) and their SNOMED-CT label maps.

The header is parsed here, not by wfdb, because real Challenge headers carry record lines such as
``E00271.mat 12 500 5000 05-Jun-2020 11:03:54`` that wfdb refuses.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from ecgfm.data.shards import TargetSpec
from ecgfm.data.sources.base import (
    Record,
    RecordError,
    SourceReader,
    digital_to_mv,
    header_path,
    map_lead_names,
    parse_age,
    parse_comment_fields,
    parse_fs,
    parse_gain,
    parse_sex,
    record_base,
)
from ecgfm.data.triage import TRIAGE_LEVELS, load_triage_mapping, triage_level, triage_one_hot
from ecgfm.registry import SOURCES

# Challenge .mat files hold int16 samples, so WFDB's format-16 "no sample" code applies.
_INVALID_INT16 = -(2**15)


@dataclass
class _Signal:
    file: str
    gain: float
    baseline: int
    unit: str | None
    name: str


def _number(token: str, kind: type, what: str, hea: Path) -> float | int:
    try:
        return kind(token)
    except ValueError:
        raise RecordError(f"{hea}: {what} {token!r} is not a number") from None


def _parse_signal_line(line: str, index: int, hea: Path) -> _Signal:
    tokens = line.split()
    if len(tokens) < 9:
        raise RecordError(f"{hea}: signal line {index + 1} has {len(tokens)} fields, needs 9 with the lead name")
    gain, baseline, unit = parse_gain(tokens[2], index, hea)
    adc_zero = _number(tokens[4], int, f"signal {index + 1} ADC zero", hea)
    return _Signal(
        file=tokens[0],
        gain=gain,
        baseline=baseline if baseline is not None else adc_zero,
        unit=unit,
        name=" ".join(tokens[8:]),
    )


def _read_header_text(hea: Path) -> str:
    try:
        raw = hea.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"{hea}: header file not found") from None
    except OSError as exc:
        raise RecordError(f"{hea}: cannot read header ({exc})") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _load_val(mat: Path) -> np.ndarray:
    if not mat.is_file():
        raise RecordError(f"{mat}: data file not found")
    try:
        contents = scipy.io.loadmat(str(mat))
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError... on a damaged file
        raise RecordError(f"{mat}: cannot load .mat file ({type(exc).__name__}: {exc})") from exc
    if "val" not in contents:
        raise RecordError(f"{mat}: no 'val' array (found {sorted(k for k in contents if not k.startswith('__'))})")
    return np.asarray(contents["val"])


#: The Challenge 2021 mapping tables shipped with ecgfm (BSD-2, see label_maps/cinc2021_LICENSE).
DEFAULT_DX_MAPPING = (
    Path(__file__).resolve().parents[1] / "label_maps" / "cinc2021_dx_mapping_scored.csv",
    Path(__file__).resolve().parents[1] / "label_maps" / "cinc2021_dx_mapping_unscored.csv",
)


@SOURCES.register("challenge")
class ChallengeReader(SourceReader):
    """Challenge records: int16 ``val`` in the .mat; per-lead gain/baseline/unit and labels in the .hea.

    Provides the multi-label target ``dx``: the ``# Dx:`` SNOMED-CT codes named by the mapping tables
    (the Challenge 2021 tables by default; codes no table knows keep their number).

    Args:
        dx_mapping: Challenge mapping CSVs (SNOMED-CT code -> abbreviation); default: the Challenge 2021 tables.
        triage_mapping: a CSV of code -> triage level (``ecgfm.data.triage``, e.g.
            ``recipes/triage/snomed_triage.csv``); when given, the reader also provides the multiclass target
            ``triage`` (one-hot over normal, abnormal_not_acute, subacute, acute): the most urgent level among
            the record's mapped codes, all NaN (missing) when none of its codes is mapped.
    """

    def __init__(self, dx_mapping: list[str | Path] | None = None, triage_mapping: str | Path | None = None):
        paths = [Path(p) for p in dx_mapping] if dx_mapping else list(DEFAULT_DX_MAPPING)
        self.dx_mapping = load_dx_mapping(paths)
        self.triage_mapping = load_triage_mapping(triage_mapping) if triage_mapping else None

    def target_specs(self, paths: list[Path]) -> dict[str, TargetSpec]:
        names = sorted({name for p in paths for name in dx_names(header_dx_codes(p), self.dx_mapping)})
        specs = {"dx": TargetSpec("multilabel", names)}
        if self.triage_mapping is not None:
            specs["triage"] = TargetSpec("multiclass", list(TRIAGE_LEVELS))
        return specs

    def targets(self, record: Record, specs: dict[str, TargetSpec]) -> dict[str, np.ndarray]:
        codes = record.metadata.get("dx_codes", [])
        present = set(dx_names(codes, self.dx_mapping))
        out = {"dx": np.array([float(n in present) for n in specs["dx"].names], np.float32)}
        if "triage" in specs and self.triage_mapping is not None:
            out["triage"] = triage_one_hot(triage_level(codes, self.triage_mapping))
        return out

    def read(self, path: Path) -> Record:
        """Read one record as float32 mV [L, T] with ``dx_codes``, age and sex in the metadata."""
        record = record_base(path)
        hea = header_path(record)
        lines = [line.strip() for line in _read_header_text(hea).splitlines()]
        comments = [line.lstrip("#").strip() for line in lines if line.startswith("#")]
        spec = [line for line in lines if line and not line.startswith("#")]
        if not spec:
            raise RecordError(f"{hea}: empty header")

        tokens = spec[0].split()
        if len(tokens) < 4:
            raise RecordError(f"{hea}: record line {spec[0]!r} needs name, signals, frequency and samples")
        n_sig = int(_number(tokens[1], int, "signal count", hea))
        fs = parse_fs(tokens[2], hea)
        n_samples = int(_number(tokens[3], int, "sample count", hea))
        if n_sig <= 0 or n_samples <= 0:
            raise RecordError(f"{hea}: record line {spec[0]!r} declares an empty record")
        if len(spec) - 1 != n_sig:
            raise RecordError(f"{hea}: record line declares {n_sig} signals but {len(spec) - 1} signal lines follow")
        signals = [_parse_signal_line(line, i, hea) for i, line in enumerate(spec[1:])]

        files = sorted({s.file for s in signals})
        if len(files) != 1:
            raise RecordError(f"{hea}: signals are spread over several files {files}; expected one .mat")
        mat = record.parent / files[0]
        val = _load_val(mat)
        if val.shape != (n_sig, n_samples):
            raise RecordError(
                f"{mat}: 'val' has shape {val.shape} but {hea.name} declares {n_sig} leads x {n_samples} samples"
            )

        signal = digital_to_mv(
            val,
            gains=[s.gain for s in signals],
            baselines=[s.baseline for s in signals],
            units=[s.unit for s in signals],
            invalid=[_INVALID_INT16 if np.issubdtype(val.dtype, np.integer) else None] * n_sig,
            path=hea,
            names=[s.name for s in signals],
        )
        fields = parse_comment_fields(comments)
        dx = fields.get("dx", "")
        return Record(
            record_id=record.name,
            patient_id=record.name,
            signal=signal,
            fs=fs,
            lead_names=map_lead_names([s.name for s in signals], hea),
            path=record,
            metadata={
                "age": parse_age(fields.get("age")),
                "sex": parse_sex(fields.get("sex")),
                "dx_codes": [code.strip() for code in dx.split(",") if code.strip()],
                "comments": comments,
                "units": [s.unit for s in signals],
                "record_line_extra": " ".join(tokens[4:]),
                "source": "challenge",
            },
        )


def header_dx_codes(record_path: Path) -> list[str]:
    """The ``# Dx:`` codes of a Challenge header, read without loading the signal (to build the vocabulary)."""
    try:
        text = header_path(record_base(Path(record_path))).read_text(errors="replace")
    except OSError:
        return []  # an unreadable header is reported when the record itself is read
    for line in text.splitlines():
        if line.lstrip("#").strip().lower().startswith("dx:"):
            return [c.strip() for c in line.split(":", 1)[1].split(",") if c.strip()]
    return []


def load_dx_mapping(paths: Iterable[Path]) -> dict[str, str]:
    """SNOMED-CT code -> abbreviation from the Challenge mapping CSVs (scored, unscored), to name labels."""
    mapping: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"SNOMEDCTCode", "Abbreviation"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
            for row in reader:
                code = (row["SNOMEDCTCode"] or "").strip()
                abbreviation = (row["Abbreviation"] or "").strip()
                if not code:
                    continue
                if code in mapping and mapping[code] != abbreviation:
                    raise ValueError(f"{path}: code {code} maps to {abbreviation!r} here, {mapping[code]!r} before")
                mapping[code] = abbreviation
    return mapping


def dx_names(codes: Iterable[str], mapping: dict[str, str]) -> list[str]:
    """Abbreviations for SNOMED-CT codes; a code the tables do not know stays as its code string."""
    return [mapping.get(str(code), str(code)) for code in codes]
