"""Reader for PhysioNet WFDB records (``.hea`` + signal files) as archives hold them: LUDB, PTB, MIT-BIH, MIMIC's
multi-segment bedside records with pressure and pleth channels beside the ECG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wfdb

from ecgfm.data.sources.base import (
    Record,
    RecordError,
    SourceReader,
    digital_to_mv,
    header_path,
    is_voltage,
    map_lead_names,
    parse_age,
    parse_comment_fields,
    parse_fs,
    parse_gain,
    parse_sex,
    record_base,
)
from ecgfm.leads import LeadError, canonical_lead
from ecgfm.leads import lead_aliases as lead_aliases_table
from ecgfm.registry import SOURCES
from ecgfm.resampling import resample

# The digital value WFDB reserves for "no sample" in each format (after wfdb's offset-binary conversion). Format 8
# stores first differences, so any value is a real sample: it has none.
INVALID_SAMPLE: dict[str, int] = {
    "16": -(2**15),
    "24": -(2**23),
    "32": -(2**31),
    "61": -(2**15),
    "80": -(2**7),
    "160": -(2**15),
    "212": -(2**11),
    "310": -(2**9),
    "311": -(2**9),
    "508": -(2**7),
    "516": -(2**15),
    "524": -(2**23),
}

# Bytes per sample of the uncompressed, byte-aligned formats, whose file size tells the sample count exactly.
_BYTES_PER_SAMPLE: dict[str, int] = {"8": 1, "16": 2, "24": 3, "32": 4, "61": 2, "80": 1, "160": 2}


def _check_data_files(header: wfdb.Record, record: Path) -> None:
    """Fail naming the data file if it is missing, or shorter or longer than the header's sample count."""
    files: dict[str, list[int]] = {}
    for i, name in enumerate(header.file_name):
        files.setdefault(name, []).append(i)
    for name, signals in files.items():
        data = record.parent / name
        if not data.is_file():
            raise RecordError(f"{data}: data file not found (named in {header_path(record)})")
        offset = (header.byte_offset[signals[0]] if header.byte_offset else None) or 0
        size = data.stat().st_size
        if size <= offset:
            raise RecordError(f"{data}: data file holds no samples ({size} bytes)")
        fmt = header.fmt[signals[0]]
        if fmt not in _BYTES_PER_SAMPLE or header.sig_len is None:
            continue
        frame = sum(header.samps_per_frame[i] for i in signals) * _BYTES_PER_SAMPLE[fmt]
        expected = offset + header.sig_len * frame
        if size < expected:
            raise RecordError(
                f"{data}: truncated, {size} bytes but the header's {header.sig_len} samples need {expected}"
            )
        if size > expected:
            raise RecordError(
                f"{data}: holds {(size - offset) // frame} samples per signal but the header says {header.sig_len}"
            )


def _header_lines(hea: Path) -> tuple[list[str], list[str]]:
    """(record and signal lines, comment lines) of a header, read as text."""
    try:
        text = hea.read_text(errors="replace")
    except OSError as exc:
        raise RecordError(f"{hea}: cannot read header ({exc})") from exc
    lines = [line.strip() for line in text.splitlines()]
    spec = [line for line in lines if line and not line.startswith("#")]
    comments = [line.lstrip("#").strip() for line in lines if line.startswith("#")]
    return spec, comments


def _raw_fs_and_gains(spec: list[str], hea: Path) -> tuple[float | None, list[float]]:
    """The sampling frequency (None when the record line omits it) and every signal's gain, from the header text of
    a single-segment record: wfdb reads ``-500`` Hz as 250 and a gain of 0 as 200, so neither is taken from it."""
    head = spec[0].split()
    fs = parse_fs(head[2], hea) if len(head) > 2 else None
    gains = []
    for i, line in enumerate(spec[1:]):
        tokens = line.split()
        if len(tokens) < 3:
            raise RecordError(f"{hea}: signal line {i + 1} gives no ADC gain (uncalibrated); cannot convert to mV")
        gains.append(parse_gain(tokens[2], i, hea)[0])
    return fs, gains


@dataclass
class _Signals:
    """One single-segment record (or a whole multi-segment one) in mV, before it becomes a ``Record``."""

    names: list[str]  # raw signal names of the kept signals
    signal: np.ndarray  # float32 [L, T] mV at ``fs``
    fs: float  # the rate of ``signal``: the frame rate times the largest samples-per-frame kept
    frame_fs: float  # the header's rate (frames per second)
    units: list[str | None]
    comments: list[str]
    ignored: list[str] = field(default_factory=list)  # "ABP (mmHg)": signals left out, not a voltage
    warnings: list[str] = field(default_factory=list)


def _keep(names: list[str], units: list[str | None], aliases: dict[str, str]) -> tuple[list[int], list[str]]:
    """(signals kept, ``"name (unit)"`` of those ignored): a signal whose unit is not a voltage (mmHg, NU, bpm, %)
    is left out unless its name is an ECG lead, whose wrong unit then fails the record in ``digital_to_mv``."""
    kept, ignored = [], []
    for i, (name, unit) in enumerate(zip(names, units, strict=True)):
        if is_voltage(unit) or canonical_lead(name or "", aliases):
            kept.append(i)
        else:
            ignored.append(f"{name} ({unit})")
    return kept, ignored


def _read_plain_format16(
    record: Path, hea: Path, spec: list[str], comments: list[str], aliases: dict[str, str]
) -> _Signals | None:
    """The common case (one format-16 file, no skew/offset, sizes that agree) read with numpy: ~10x faster
    than wfdb's header parser plus rdrecord. Anything else returns None and takes the general path."""
    if not spec:
        return None
    head = spec[0].split()
    if len(head) < 4 or "/" in head[0]:
        return None
    try:
        n_sig, sig_len = int(head[1]), int(head[3])
    except ValueError:
        return None
    signals = [line.split() for line in spec[1:]]
    if n_sig <= 0 or sig_len <= 0 or len(signals) != n_sig or any(len(t) < 9 for t in signals):
        return None
    if {t[0] for t in signals} != {signals[0][0]} or any(t[1] != "16" for t in signals):
        return None
    fs = parse_fs(head[2], hea)
    gains, baselines, units = [], [], []
    for i, tokens in enumerate(signals):
        gain, baseline, unit = parse_gain(tokens[2], i, hea)
        gains.append(gain)
        baselines.append(baseline if baseline is not None else int(tokens[4]))
        units.append(unit)
    data = record.parent / signals[0][0]
    if not data.is_file() or data.stat().st_size != sig_len * n_sig * 2:
        return None  # the general path reports missing, truncated or over-long files precisely
    names = [" ".join(t[8:]) for t in signals]
    kept, ignored = _keep(names, units, aliases)
    digital = np.fromfile(data, dtype="<i2").reshape(sig_len, n_sig).T[kept]
    signal = digital_to_mv(
        digital,
        [gains[i] for i in kept],
        [baselines[i] for i in kept],
        [units[i] for i in kept],
        [INVALID_SAMPLE["16"]] * len(kept),
        hea,
        [names[i] for i in kept],
        aliases,
    )
    return _Signals([names[i] for i in kept], signal, fs, fs, [units[i] for i in kept], comments, ignored)


def _read_single(record: Path, aliases: dict[str, str]) -> _Signals:
    """Read a single-segment record in any storage format wfdb reads, with samples per frame and skew; a signal
    stored at fewer samples per frame than the others kept is upsampled to the highest rate."""
    hea = header_path(record)
    if not hea.is_file():
        raise RecordError(f"{hea}: header file not found")
    spec, header_comments = _header_lines(hea)
    fast = _read_plain_format16(record, hea, spec, header_comments, aliases)
    if fast is not None:
        return fast
    try:
        header = wfdb.rdheader(str(record))
    except Exception as exc:  # wfdb raises many types for a malformed header
        raise RecordError(f"{hea}: malformed WFDB header ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, wfdb.Record):
        raise RecordError(f"{hea}: a multi-segment master header cannot be a segment of another record")
    if not header.n_sig:
        raise RecordError(f"{hea}: header lists no signals")
    if header.sig_len == 0:
        raise RecordError(f"{hea}: header declares a zero-length record (0 samples)")
    fs, gains = _raw_fs_and_gains(spec, hea)
    if len(gains) != header.n_sig:
        raise RecordError(f"{hea}: record line declares {header.n_sig} signals but {len(gains)} lines follow")
    warnings = [] if fs is not None else [f"no sampling frequency in {hea.name}: WFDB's default 250 Hz assumed"]
    _check_data_files(header, record)
    files = ", ".join(sorted(set(header.file_name)))
    try:
        # frames are expanded only where a signal has several samples per frame: wfdb's expanded reading fails on
        # format 61 (big-endian), and the smooth one is faster
        expand = any((k or 1) > 1 for k in (header.samps_per_frame or []))
        rec = wfdb.rdrecord(str(record), physical=False, smooth_frames=not expand)
    except Exception as exc:  # truncated or corrupt signal files surface as ValueError, IndexError, ...
        raise RecordError(f"{record} ({files}): cannot read samples ({type(exc).__name__}: {exc})") from exc
    frame_fs = float(rec.fs if fs is None else fs)
    names = [name or "" for name in (rec.sig_name or [None] * rec.n_sig)]
    units = list(rec.units or [None] * rec.n_sig)
    spf = [int(k or 1) for k in (rec.samps_per_frame or [1] * rec.n_sig)]
    expanded = (rec.e_d_signal or []) if expand else list(np.asarray(rec.d_signal).T)
    if len(expanded) != rec.n_sig:
        raise RecordError(f"{record} ({files}): holds {len(expanded)} signals but {hea.name} lists {rec.n_sig}")
    for i, samples in enumerate(expanded):
        if header.sig_len and len(samples) != header.sig_len * spf[i]:
            raise RecordError(
                f"{record} ({files}): holds {len(samples) // spf[i]} samples per signal but {hea.name} says "
                f"{header.sig_len}"
            )
    kept, ignored = _keep(names, units, aliases)
    if not kept:
        return _Signals([], np.zeros((0, 0), np.float32), frame_fs, frame_fs, [], list(rec.comments or []), ignored)
    top = max(spf[i] for i in kept)
    rows = []
    for i in kept:
        row = digital_to_mv(
            np.asarray(expanded[i])[None, :],
            [gains[i]],
            [rec.baseline[i]],
            [units[i]],
            [INVALID_SAMPLE.get(rec.fmt[i])],
            hea,
            [names[i]],
            aliases,
        )[0]
        if spf[i] != top:
            warnings.append(
                f"signal {names[i]}: {spf[i]} samples per frame upsampled to {top} ({frame_fs * top:g} Hz), the "
                "rate of the record's fastest signal"
            )
            row = resample(row, frame_fs * spf[i], frame_fs * top)[: len(row) * top // spf[i]]
        rows.append(row)
    signal = np.stack(rows).astype(np.float32, copy=False)
    kept_names, kept_units = [names[i] for i in kept], [units[i] for i in kept]
    return _Signals(
        kept_names, signal, frame_fs * top, frame_fs, kept_units, list(rec.comments or []), ignored, warnings
    )


def _master_segments(hea: Path) -> list[tuple[str, int]] | None:
    """``[(segment name, length), ...]`` of a multi-segment master header, None for any other header; reads only
    the first line of an ordinary header, so listing a large folder stays cheap."""
    try:
        with hea.open(errors="replace") as handle:
            lines = iter(handle)
            first = next((line for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
            if "/" not in (first.split() or [""])[0]:
                return None
            rest = [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    except OSError:
        return None  # an unreadable header is reported when the record is read
    segments = []
    for tokens in rest:
        try:
            segments.append((tokens[0], int(tokens[1])))
        except (IndexError, ValueError):
            return []  # a broken master: read() names the fault
    return segments


def _read_multi(record: Path, hea: Path, spec: list[str], comments: list[str], aliases: dict[str, str]) -> _Signals:
    """A multi-segment record as one continuous record: segments joined in order, a null segment (``~``) or a
    signal a segment lacks (variable layout) stored as NaN; the signal order is the layout header's."""
    head = spec[0].split()
    try:
        n_seg = int(head[0].split("/")[1])
    except (IndexError, ValueError):
        raise RecordError(f"{hea}: record line {spec[0]!r} does not give the number of segments") from None
    if len(head) < 3:
        raise RecordError(f"{hea}: multi-segment record line {spec[0]!r} gives no sampling frequency")
    fs = parse_fs(head[2], hea)
    segments = []
    for line in spec[1:]:
        tokens = line.split()
        try:
            segments.append((tokens[0], int(tokens[1])))
        except (IndexError, ValueError):
            raise RecordError(f"{hea}: segment line {line!r} is not 'name length'") from None
    if len(segments) != n_seg or not segments:
        raise RecordError(f"{hea}: record line declares {n_seg} segments but {len(segments)} segment lines follow")
    order: list[str] | None = None
    if segments[0][1] == 0:  # variable layout: the first segment is the layout header, naming every signal
        layout = record.parent / segments[0][0]
        layout_hea = header_path(layout)
        if not layout_hea.is_file():
            raise RecordError(f"{layout_hea}: layout header not found (named in {hea})")
        try:
            order = [name or "" for name in (wfdb.rdheader(str(layout)).sig_name or [])]
        except Exception as exc:
            raise RecordError(f"{layout_hea}: malformed layout header ({type(exc).__name__}: {exc})") from exc
        segments = segments[1:]
    parts: list[tuple[str, int, _Signals | None]] = []
    ignored: dict[str, None] = {}
    warnings: dict[str, None] = {}
    for name, length in segments:
        if length < 0:
            raise RecordError(f"{hea}: segment {name} has a negative length {length}")
        if name == "~":
            parts.append((name, length, None))
            continue
        part = _read_single(record.parent / name, aliases)
        if part.frame_fs != fs:
            raise RecordError(f"{header_path(record.parent / name)}: {part.frame_fs:g} Hz but {hea.name} says {fs:g}")
        n_frames = part.signal.shape[1] * part.frame_fs / part.fs if part.names else length
        if round(n_frames) != length:
            raise RecordError(f"{header_path(record.parent / name)}: {n_frames:g} samples but {hea.name} says {length}")
        ignored.update(dict.fromkeys(part.ignored))
        warnings.update(dict.fromkeys(f"segment {name}: {w}" for w in part.warnings))
        parts.append((name, length, part))
    read = [part for _, _, part in parts if part is not None]
    if order is None:  # fixed layout: every segment holds the same signals
        order = read[0].names if read else []
        for name, _, part in parts:
            if part is not None and part.names != order:
                raise RecordError(
                    f"{header_path(record.parent / name)}: signals {part.names} differ from the first segment's "
                    f"{order}, but {hea.name} has no layout header (a fixed layout)"
                )
    else:
        dropped = {entry.rsplit(" (", 1)[0] for entry in ignored}
        order = [name for name in order if name not in dropped]
    fs_out = max([part.fs for part in read], default=fs)
    k = fs_out / fs
    blocks, gap = [], 0
    for name, length, part in parts:
        block = np.full((len(order), round(length * k)), np.nan, np.float32)
        if part is None:
            gap += length
        else:
            absent = [signal for signal in order if signal not in part.names]
            if absent:
                warnings[f"segment {name} lacks {' '.join(absent)}: NaN there"] = None
            for row, signal in zip(part.signal, part.names, strict=True):
                if signal not in order:
                    raise RecordError(
                        f"{header_path(record.parent / name)}: signal {signal!r} is not in the layout header's "
                        f"signals {order}"
                    )
                if part.fs != fs_out:
                    row = resample(row, part.fs, fs_out)
                n = min(block.shape[1], row.shape[0])
                block[order.index(signal), :n] = row[:n]
        blocks.append(block)
    if gap:
        warnings[f"multi-segment record: {gap} samples in null segments (~) stored as NaN"] = None
    signal = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(order), 0), np.float32)
    units = {}
    for part in read:
        units.update({n: u for n, u in zip(part.names, part.units, strict=True) if n not in units})
    return _Signals(order, signal, fs_out, fs, [units.get(n) for n in order], comments, list(ignored), list(warnings))


@SOURCES.register("wfdb")
class WfdbReader(SourceReader):
    """Any WFDB record as PhysioNet archives hold it: gains, baselines and units from its header, per signal.

    Signals whose unit is not a voltage (mmHg, NU, bpm, %) are left out and listed in the warnings, unless they are
    ECG leads. Multi-segment records are read whole, gaps as NaN; every storage format wfdb reads, with samples per
    frame and skew.

    Args:
        lead_aliases: extra lead names, ``{MLII: II}``, ``"MLII=II,MV1=V1"`` or ``modified`` (all of
            ``ecgfm.leads.MODIFIED_LEADS``): monitoring leads such as MIT-BIH's modified lead II are not the
            standard lead, so they are kept only when asked for.
        multi_segment: ``join`` (default) reads a multi-segment record as one record; ``segments`` reads each
            segment as a record of its own.
    """

    def __init__(self, lead_aliases: dict[str, str] | list[str] | str | None = None, multi_segment: str = "join"):
        if multi_segment not in ("join", "segments"):
            raise ValueError(f"wfdb: multi_segment must be 'join' or 'segments', got {multi_segment!r}")
        try:
            self.lead_aliases = lead_aliases_table(lead_aliases)
        except LeadError as err:
            raise ValueError(f"wfdb: {err}") from None
        self.multi_segment = multi_segment

    def find_records(self, root: Path) -> list[Path]:
        """Record paths under ``root``; the segments of a multi-segment record are its master's (``join``), or the
        records themselves without the master and layout headers (``segments``)."""
        records = super().find_records(root)
        masters = {path: _master_segments(header_path(path)) for path in records}
        masters = {path: segs for path, segs in masters.items() if segs is not None}
        if not masters:
            return records
        parts = {path.parent / name: length for path, segs in masters.items() for name, length in segs if name != "~"}
        if self.multi_segment == "join":
            return [path for path in records if path not in parts]
        # a layout header (length 0) holds no samples
        return [path for path in records if path not in masters and parts.get(path, 1) > 0]

    def read(self, path: Path) -> Record:
        """Read one record as float32 mV [L, T]; RecordError names the file at fault and why."""
        record = record_base(path)
        hea = header_path(record)
        if not hea.is_file():
            raise RecordError(f"{hea}: header file not found")
        segments = _master_segments(hea)
        if segments is not None:
            if self.multi_segment == "segments":
                raise RecordError(
                    f"{hea}: a multi-segment master; with multi_segment: segments each segment is a record"
                )
            spec, comments = _header_lines(hea)
            signals = _read_multi(record, hea, spec, comments, self.lead_aliases)
        else:
            signals = _read_single(record, self.lead_aliases)
        if not signals.names:
            raise RecordError(f"{hea}: no voltage signal; ignored {', '.join(signals.ignored)}")
        warnings = list(signals.warnings)
        if signals.ignored:
            warnings.append(f"signals ignored, not a voltage: {', '.join(signals.ignored)}")
        for name in signals.names:
            alias = canonical_lead(name, self.lead_aliases)
            if alias and not canonical_lead(name):
                warnings.append(f"signal {name} stored as lead {alias} (lead alias)")
        fields = parse_comment_fields(signals.comments)
        return Record(
            record_id=record.name,
            patient_id=record.name,
            signal=signals.signal,
            fs=signals.fs,
            lead_names=map_lead_names(signals.names, hea, self.lead_aliases),
            path=record,
            metadata={
                "age": parse_age(fields.get("age")),
                "sex": parse_sex(fields.get("sex")),
                "comments": signals.comments,
                "units": signals.units,
                "source": "wfdb",
                "segments": len(segments) if segments is not None else 1,
                "warnings": warnings,
            },
        )
