"""WFDB records as PhysioNet archives hold them: bedside channels beside the ECG, multi-segment records, every storage
format, samples per frame, skew and lead aliases. Every fixture is written here, by wfdb's own writer where it can
write the format, from the real samples of the PTB record s0010_re in tests/data."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import wfdb

from ecgfm.data.convert import convert
from ecgfm.data.provenance import record_files
from ecgfm.data.sources import RecordError, WfdbReader
from ecgfm.leads import MODIFIED_LEADS, LeadError, canonical_lead, lead_aliases

warnings.filterwarnings("ignore", category=FutureWarning)  # wfdb's pandas calls


@pytest.fixture(scope="module")
def ptb(test_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """12 s of leads i, ii and v1 of s0010_re (1000 Hz) as stored: (digital int [T, 3], gains [3])."""
    rec = wfdb.rdrecord(str(test_data / "ptbdb-s0010" / "s0010_re"), sampto=12000, channels=[0, 1, 6], physical=False)
    return rec.d_signal.astype(np.int64), np.asarray(rec.adc_gain, float)


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))[1:]


def _icu_record(folder: Path, digital: np.ndarray, gains: np.ndarray, fmt: str = "16", first: str = "II") -> Path:
    """A bedside record: ECG leads II and V, arterial pressure (mmHg), pleth (NU) and heart rate (bpm)."""
    abp = 80 + digital[:, 1:2] // 40  # a pressure-like trace; its unit, not its shape, is what is tested
    pleth = 500 + digital[:, 2:3] // 20
    hr = np.full((len(digital), 1), 72)
    signals = np.hstack([digital[:, 1:3], abp, pleth, hr])
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        "icu",
        fs=1000,
        units=["mV", "mV", "mmHg", "NU", "bpm"],
        sig_name=[first, "V", "ABP", "PLETH", "HR"],
        d_signal=signals,
        fmt=[fmt] * 5,
        adc_gain=[gains[1], gains[2], 1.0, 100.0, 1.0],
        baseline=[0, 0, 0, 0, 0],
        write_dir=str(folder),
    )
    return folder / "icu"


@pytest.mark.parametrize("fmt", ["16", "212"])  # the numpy fast path and wfdb's general path
def test_non_voltage_channels_are_ignored_and_listed(tmp_path, ptb, fmt):
    digital, gains = ptb
    if fmt == "212":  # 12 bits: V1 reaches 2491 codes at gain 2000, so store it at gain 1000
        digital, gains = digital // 2, gains / 2
    record = _icu_record(tmp_path / "src", digital, gains, fmt)
    rec = WfdbReader().read(record)
    assert rec.lead_names == ("II", "V")
    np.testing.assert_allclose(rec.signal[0], digital[:, 1] / gains[1], atol=1e-6)
    assert "signals ignored, not a voltage: ABP (mmHg), PLETH (NU), HR (bpm)" in rec.metadata["warnings"]

    summary = convert(tmp_path / "src", tmp_path / "out", progress=False)
    assert summary.records_read == 1 and not summary.skipped
    warned = [w for _, w in _rows(tmp_path / "out" / "warnings.csv")]
    assert "signals ignored, not a voltage: ABP (mmHg), PLETH (NU), HR (bpm)" in warned
    assert "non-standard signals ignored: V" in warned
    import h5py

    with h5py.File(tmp_path / "out" / "shard-00000.h5") as f:
        assert f["lead_mask"][0].tolist() == [lead == "II" for lead in ("I", "II", *["x"] * 10)]


def test_an_ecg_lead_in_mmhg_is_a_skip_reason(tmp_path, ptb):
    digital, gains = ptb
    record = _icu_record(tmp_path / "src", digital, gains)
    hea = record.parent / "icu.hea"
    hea.write_text(hea.read_text().replace("/mV 16 0", "/mmHg 16 0", 1))
    convert(tmp_path / "src", tmp_path / "out", progress=False)
    [(path, reason)] = _rows(tmp_path / "out" / "skipped.csv")
    assert reason == f"{hea}: signal 1 (lead II) is in 'mmHg', not a voltage (expected mV, uV/µV or V)"


def test_mlii_is_not_lead_ii_unless_the_user_says_so(tmp_path, ptb):
    digital, gains = ptb
    record = _icu_record(tmp_path / "src", digital, gains, first="MLII")
    assert WfdbReader().read(record).lead_names == ("MLII", "V")  # the default table maps nothing
    convert(tmp_path / "src", tmp_path / "plain", progress=False)
    [(_, reason)] = _rows(tmp_path / "plain" / "skipped.csv")
    assert reason.endswith(
        "no standard lead among ['MLII', 'V'] (MLII: modified leads, mapped only with the reader option lead_aliases)"
    )

    for option in ({"MLII": "II"}, "MLII=II", ["mlii=ii"], "modified"):
        rec = WfdbReader(lead_aliases=option).read(record)
        assert rec.lead_names == ("II", "V"), option
        assert "signal MLII stored as lead II (lead alias)" in rec.metadata["warnings"]

    from ecgfm.commands.shard import run

    out = tmp_path / "aliased"
    assert (
        run(["--source", str(tmp_path / "src"), "--out", str(out), "--reader_options", "{lead_aliases: {MLII: II}}"])
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["shards"][0]["n_segments"] == 1
    assert "signal MLII stored as lead II (lead alias)" in [w for _, w in _rows(out / "warnings.csv")]


def test_lead_alias_table():
    assert canonical_lead("MLII") is None and MODIFIED_LEADS["MLII"] == "II"
    table = lead_aliases({"MLII": "ii", "Lead MV1": "V1"})
    assert canonical_lead("mlii", table) == "II" and canonical_lead("MV1", table) == "V1"
    assert canonical_lead("aVR", table) == "aVR"  # the built-in names still apply
    with pytest.raises(LeadError, match="'chest' is not one of"):
        lead_aliases({"MLII": "chest"})
    with pytest.raises(LeadError, match="expected NAME=LEAD"):
        lead_aliases("MLII")
    with pytest.raises(ValueError, match="wfdb: lead alias MLII=X"):
        WfdbReader(lead_aliases="MLII=X")
    with pytest.raises(ValueError, match="multi_segment must be 'join' or 'segments'"):
        WfdbReader(multi_segment="both")


# ---- storage formats -------------------------------------------------------------------------------------------

#: Bits of each format: the real samples are rescaled to use its range (8-bit formats hold a coarse copy).
FORMAT_BITS = {"80": 8, "16": 16, "24": 24, "32": 32, "212": 12, "508": 8, "516": 16, "524": 24}
#: Formats wfdb reads but cannot write: their bytes are packed here, following the WFDB specification.
PACKED_BITS = {"8": 8, "61": 16, "160": 16, "310": 10, "311": 10}


def _scaled(digital: np.ndarray, gains: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The same physical signal at a gain that fills ``bits`` (the top code is left free: it is "no sample")."""
    physical = digital / gains
    gain = (2 ** (bits - 1) - 2) / np.abs(physical).max(axis=0)
    return np.round(physical * gain).astype(np.int64), gain


def _pack(fmt: str, d: np.ndarray) -> bytes:
    """Bytes of the interleaved samples ``d`` [T, L] in a format wfdb cannot write."""
    flat = d.reshape(-1)
    if fmt == "61":
        return flat.astype(">i2").tobytes()
    if fmt == "160":
        return (flat + 2**15).astype("<u2").tobytes()
    if fmt == "8":  # first differences, starting from the header's initial value (the first sample)
        return np.diff(d, axis=0, prepend=d[:1]).reshape(-1).astype("i1").tobytes()
    u = (flat & 0x3FF).astype(np.uint32).reshape(-1, 3)  # 10-bit two's complement, one triplet per 4 bytes
    if fmt == "311":
        return (u[:, 0] | u[:, 1] << 10 | u[:, 2] << 20).astype("<u4").tobytes()
    first = (u[:, 0] << 1) | ((u[:, 2] & 0x1F) << 11)
    second = (u[:, 1] << 1) | ((u[:, 2] >> 5) << 11)
    return np.stack([first, second], axis=1).astype("<u2").tobytes()


@pytest.mark.parametrize("fmt", [*FORMAT_BITS, *PACKED_BITS])
def test_every_storage_format_reads_the_physical_values(tmp_path, ptb, fmt):
    digital, gains = ptb
    bits = 12 if fmt == "8" else FORMAT_BITS.get(fmt) or PACKED_BITS[fmt]
    d, gain = _scaled(digital, gains, bits)
    if fmt == "8":  # first differences must fit a byte: a copy whose steps are clipped to +-127
        d = d[:1] + np.cumsum(np.clip(np.diff(d, axis=0, prepend=d[:1]), -127, 127), axis=0)
    write = fmt if fmt in FORMAT_BITS else "16"
    wfdb.wrsamp(
        "r",
        fs=1000,
        units=["mV", "uV", "V"],
        sig_name=["I", "II", "V1"],
        d_signal=d,
        fmt=[write] * 3,
        adc_gain=list(gain),
        baseline=[0, 0, 0],
        write_dir=str(tmp_path),
    )
    if fmt in PACKED_BITS:
        hea = tmp_path / "r.hea"
        lines = [line.split(" ") for line in hea.read_text().splitlines()]
        hea.write_text("\n".join(" ".join(t[:1] + [fmt] + t[2:] if i else t) for i, t in enumerate(lines)) + "\n")
        (tmp_path / "r.dat").write_bytes(_pack(fmt, d))
    reference = wfdb.rdrecord(str(tmp_path / "r")).p_signal.T  # wfdb's own reading, in each signal's unit
    np.testing.assert_allclose(reference, (d / gain).T, rtol=1e-9, atol=1e-12)
    rec = WfdbReader().read(tmp_path / "r")
    assert rec.lead_names == ("I", "II", "V1") and rec.fs == 1000 and rec.signal.shape == (3, 12000)
    np.testing.assert_allclose(rec.signal, reference * np.array([[1.0], [1e-3], [1e3]]), rtol=1e-5, atol=1e-6)


def test_samples_per_frame_keep_the_fast_signal(tmp_path, ptb):
    digital, gains = ptb
    fast = digital[:, 0]  # lead I at 1000 Hz, two samples per 500-Hz frame
    slow = [digital[::2, 1], digital[::2, 2]]
    wfdb.wrsamp(
        "spf",
        fs=500,
        units=["mV"] * 3,
        sig_name=["I", "II", "V1"],
        e_d_signal=[fast, *slow],
        samps_per_frame=[2, 1, 1],
        fmt=["16"] * 3,
        adc_gain=list(gains),
        baseline=[0, 0, 0],
        write_dir=str(tmp_path),
    )
    reference = wfdb.rdrecord(str(tmp_path / "spf"), smooth_frames=False).e_p_signal
    rec = WfdbReader().read(tmp_path / "spf")
    assert rec.fs == 1000 and rec.signal.shape == (3, 12000)
    np.testing.assert_allclose(rec.signal[0], reference[0], atol=1e-6)  # the fast lead sample for sample
    for row in (1, 2):  # the slow leads upsampled: every other sample close to the stored one
        np.testing.assert_allclose(rec.signal[row, 100:-100:2], reference[row][50:-50], atol=0.05)
    assert (
        "signal II: 1 samples per frame upsampled to 2 (1000 Hz), the rate of the record's fastest signal"
        in rec.metadata["warnings"]
    )


def test_skew_aligns_the_signals_as_wfdb_does(tmp_path, ptb):
    digital, gains = ptb
    wfdb.wrsamp(
        "skew",
        fs=1000,
        units=["mV"] * 3,
        sig_name=["I", "II", "V1"],
        d_signal=digital,
        fmt=["16"] * 3,
        adc_gain=list(gains),
        baseline=[0, 0, 0],
        write_dir=str(tmp_path),
    )
    hea = tmp_path / "skew.hea"
    lines = hea.read_text().splitlines()
    lines[2] = lines[2].replace("skew.dat 16 ", "skew.dat 16:7 ", 1)  # lead II recorded 7 samples late
    hea.write_text("\n".join(lines) + "\n")
    reference = wfdb.rdrecord(str(tmp_path / "skew")).p_signal.T
    rec = WfdbReader().read(tmp_path / "skew")
    np.testing.assert_allclose(rec.signal[:, :-7], reference[:, :-7], atol=1e-6)
    np.testing.assert_allclose(rec.signal[1, :-7], digital[7:, 1] / gains[1], atol=1e-6)
    assert np.isnan(rec.signal[1, -7:]).all() and not np.isnan(rec.signal[0]).any()


# ---- multi-segment records -------------------------------------------------------------------------------------


def _multi_segment(folder: Path, digital: np.ndarray, gains: np.ndarray, variable: bool = True) -> Path:
    """Record ``m``: 12 s of s0010_re in segments written by wfdb; with ``variable``, a layout header, a null
    segment of 1 s, a segment without V1 (in format 212) and one with an arterial pressure channel."""
    folder.mkdir(parents=True, exist_ok=True)
    names, units = ["I", "II", "V1"], ["mV"] * 3

    def segment(name, rows, channels, fmt="16", extra=None, scale=1):
        d, n, u = digital[rows][:, channels] // scale, [names[c] for c in channels], [units[c] for c in channels]
        g = [gains[c] / scale for c in channels]
        if extra is not None:
            d, n, u, g = np.hstack([d, extra]), [*n, "ABP"], [*u, "mmHg"], [*g, 10.0]
        wfdb.wrsamp(name, fs=1000, units=u, sig_name=n, d_signal=d, fmt=[fmt] * len(n), adc_gain=g,
                    baseline=[0] * len(n), write_dir=str(folder))  # fmt: skip

    if not variable:
        for k, rows in enumerate((slice(0, 4000), slice(4000, 12000)), 1):
            segment(f"m_{k:04d}", rows, [0, 1, 2])
        master = wfdb.MultiRecord(
            record_name="m", fs=1000, sig_len=12000, seg_name=["m_0001", "m_0002"], seg_len=[4000, 8000], n_sig=3
        )
        master.n_seg = 2
        master.wrheader(write_dir=str(folder))
        return folder / "m"
    segment("m_0001", slice(0, 4000), [0, 1, 2])
    segment("m_0002", slice(5000, 9000), [0, 1], fmt="212", scale=2)  # 12 bits: at half the gain
    segment("m_0003", slice(9000, 12000), [0, 1, 2], extra=80 + digital[9000:12000, 1:2] // 40)
    # wfdb cannot write a layout header (its signal files are '~'): written as the WFDB specification has it
    layout = [
        f"~ 0 {g}/{u} 16 0 0 0 0 {n}" for g, u, n in zip([*gains, 10.0], [*units, "mmHg"], [*names, "ABP"], strict=True)
    ]
    (folder / "m_layout.hea").write_text("\n".join(["m_layout 4 1000 0", *layout]) + "\n")
    master = wfdb.MultiRecord(
        record_name="m",
        fs=1000,
        sig_len=12000,
        seg_name=["m_layout", "m_0001", "~", "m_0002", "m_0003"],
        seg_len=[0, 4000, 1000, 4000, 3000],
        n_sig=4,
    )
    master.n_seg = 5
    master.wrheader(write_dir=str(folder))
    return folder / "m"


@pytest.mark.parametrize("variable", [True, False], ids=["variable", "fixed"])
def test_multi_segment_record_reads_as_wfdb_m2s(tmp_path, ptb, variable):
    digital, gains = ptb
    record = _multi_segment(tmp_path / "src", digital, gains, variable)
    reference = wfdb.rdrecord(str(record), m2s=True)
    rec = WfdbReader().read(record)
    assert rec.lead_names == ("I", "II", "V1") and rec.fs == 1000
    expected = reference.p_signal[:, :3].T
    assert rec.signal.shape == expected.shape == (3, 12000)
    np.testing.assert_array_equal(np.isnan(rec.signal), np.isnan(expected))
    np.testing.assert_allclose(rec.signal, expected, atol=1e-6)
    if variable:
        assert np.isnan(rec.signal[:, 4000:5000]).all() and np.isnan(rec.signal[2, 5000:9000]).all()
        assert rec.metadata["warnings"] == [
            "segment m_0002 lacks V1: NaN there",
            "multi-segment record: 1000 samples in null segments (~) stored as NaN",
            "signals ignored, not a voltage: ABP (mmHg)",
        ]
        assert [p.name for p in record_files(record)] == [
            "m.hea", "m_layout.hea", "m_0001.hea", "m_0001.dat", "m_0002.hea", "m_0002.dat", "m_0003.hea", "m_0003.dat"
        ]  # fmt: skip
    else:
        np.testing.assert_allclose(rec.signal, (digital / gains).T, atol=1e-6)


def test_multi_segment_conversion_joins_or_splits(tmp_path, ptb):
    digital, gains = ptb
    _multi_segment(tmp_path / "src", digital, gains)
    assert [p.name for p in WfdbReader().find_records(tmp_path / "src")] == ["m"]
    segments = WfdbReader(multi_segment="segments")
    assert [p.name for p in segments.find_records(tmp_path / "src")] == ["m_0001", "m_0002", "m_0003"]

    summary = convert(tmp_path / "src", tmp_path / "joined", progress=False, last_piece="pad")
    assert summary.records_read == 1 and summary.segments_written == 2 and not summary.skipped
    warned = [w for _, w in _rows(tmp_path / "joined" / "warnings.csv")]
    assert "lead V1: 5000 NaN or infinite samples set to 0" in warned  # the gap and the segment without V1
    assert "lead II: 1000 NaN or infinite samples set to 0" in warned

    summary = convert(
        tmp_path / "src",
        tmp_path / "split",
        progress=False,
        last_piece="pad",
        reader_options={"multi_segment": "segments"},
    )
    assert summary.records_read == 3 and summary.segments_written == 3 and not summary.skipped
    with pytest.raises(RecordError, match="a multi-segment master; with multi_segment: segments"):
        segments.read(tmp_path / "src" / "m")


def test_broken_multi_segment_records_name_the_file(tmp_path, ptb):
    digital, gains = ptb
    record = _multi_segment(tmp_path / "src", digital, gains)
    (tmp_path / "src" / "m_0002.hea").unlink()
    with pytest.raises(RecordError, match=r"m_0002\.hea: header file not found"):
        WfdbReader().read(record)
    (tmp_path / "src" / "m_layout.hea").unlink()
    with pytest.raises(RecordError, match=r"m_layout\.hea: layout header not found \(named in .*m\.hea\)"):
        WfdbReader().read(record)
    master = tmp_path / "src" / "m.hea"
    master.write_text(master.read_text().replace("m/5", "m/7"))
    with pytest.raises(RecordError, match="declares 7 segments but 5 segment lines follow"):
        WfdbReader().read(record)
