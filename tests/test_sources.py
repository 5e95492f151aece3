"""Record readers on the real PhysioNet files in tests/data and the bundled LUDB, and on damaged copies of them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import wfdb

import ecgfm
from ecgfm.data.sources import (
    RecordError,
    dx_names,
    load_dx_mapping,
)
from ecgfm.leads import STANDARD_LEADS
from ecgfm.registry import SOURCES

# Ningbo records whose V2, V4 and V6 are stored as all zeros (checksum 0 in the header) in the real files.
FLAT_CHALLENGE_LEADS = {("JS20004", "V2"), ("JS20004", "V4"), ("JS20004", "V6")} | {
    ("JS20008", "V2"),
    ("JS20008", "V4"),
    ("JS20008", "V6"),
}


@pytest.fixture(scope="module")
def records(test_data: Path, ludb_data: Path) -> dict[str, Path]:
    """The record each reader's damaged copies start from: LUDB 1 (wfdb) and Challenge E07500 (challenge)."""
    return {"wfdb": ludb_data / "data" / "1", "challenge": test_data / "cinc2021" / "E07500"}


def copy_record(src: Path, dst: Path, edit_header: Callable[[list[str]], list[str]] | None = None) -> Path:
    """Copy a record's header and data files into ``dst``, optionally editing the header."""
    hea = src.parent / (src.name + ".hea")
    lines = hea.read_text().splitlines()
    data_files = {line.split()[0] for line in lines[1:] if line.strip() and not line.startswith("#")}
    for name in data_files:
        shutil.copy(src.parent / name, dst / name)
    if edit_header is not None:
        lines = edit_header(lines)
    (dst / hea.name).write_text("\n".join(lines) + "\n")
    return dst / src.name


def test_registry_knows_both_readers_and_rejects_unknown_names() -> None:
    assert {"wfdb", "challenge"} <= set(SOURCES.names())
    assert SOURCES.create("wfdb").name == "wfdb"
    with pytest.raises(ValueError, match="challenge.*wfdb"):
        SOURCES.create("scp_ecg")


def test_every_ludb_record_reads_as_12_leads_in_millivolts(ludb_data: Path) -> None:
    reader = SOURCES.create("wfdb")
    paths = reader.find_records(ludb_data)
    assert len(paths) == 120
    assert paths == sorted(paths)
    for path in paths:
        rec = reader.read(path)
        assert rec.lead_names == STANDARD_LEADS, path
        assert rec.fs == 500
        assert rec.signal.shape == (12, 5000) and rec.signal.dtype == np.float32
        ptp = np.ptp(rec.signal, axis=1)
        assert np.all((ptp > 0.05) & (ptp < 20)), (path, ptp)
        assert rec.metadata["sex"] in ("M", "F") and isinstance(rec.metadata["age"], int)
    assert rec.record_id == rec.patient_id


def test_ludb_per_lead_gain_and_baseline_match_wfdb_physical(ludb_data: Path) -> None:
    path = ludb_data / "data" / "1"
    rec = SOURCES.create("wfdb").read(path)
    physical = wfdb.rdrecord(str(path), physical=True)
    assert len(set(physical.adc_gain)) > 1  # the point: gains differ per lead
    lead = rec.lead_names.index("III")  # 1229(-5)/mV in the header
    np.testing.assert_allclose(rec.signal[lead], physical.p_signal[:, lead], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rec.signal, physical.p_signal.T, rtol=1e-6, atol=1e-6)
    assert rec.metadata["age"] == 51 and rec.metadata["sex"] == "F"


def test_ptbdb_record_keeps_frank_leads_by_raw_name(test_data: Path) -> None:
    rec = SOURCES.create("wfdb").read(test_data / "ptbdb-s0010" / "s0010_re")
    assert rec.signal.shape == (15, 38400)
    assert rec.fs == 1000
    assert rec.lead_names == STANDARD_LEADS + ("vx", "vy", "vz")
    assert rec.metadata["age"] == 81 and rec.metadata["sex"] == "F"
    assert "Reason for admission: Myocardial infarction" in rec.metadata["comments"]


def test_every_challenge_record_reads_with_labels(test_data: Path) -> None:
    reader = SOURCES.create("challenge")
    paths = reader.find_records(test_data / "cinc2021")
    assert len(paths) == 20
    flat = set()
    for path in paths:
        rec = reader.read(path)
        assert rec.lead_names == STANDARD_LEADS, path
        assert rec.fs == 500
        assert rec.signal.shape == (12, 5000) and rec.signal.dtype == np.float32
        assert rec.metadata["dx_codes"] and all(code.isdigit() for code in rec.metadata["dx_codes"])
        for lead, ptp in zip(rec.lead_names, np.ptp(rec.signal, axis=1), strict=True):
            if ptp == 0:
                flat.add((rec.record_id, lead))
            else:
                assert 0.05 < ptp < 20, (path, lead, ptp)
    assert flat == FLAT_CHALLENGE_LEADS


def test_challenge_lower_case_mv_unit_reads_like_mV(test_data: Path) -> None:
    rec = SOURCES.create("challenge").read(test_data / "cinc2021" / "HR06000")  # header unit is "mv"
    assert rec.metadata["units"][0] == "mv"
    # I: baseline 0, gain 1000, first stored sample 10 -> 0.010 mV
    assert rec.signal[0, 0] == pytest.approx(0.010)


def test_challenge_dx_age_sex_parsed(test_data: Path) -> None:
    rec = SOURCES.create("challenge").read(test_data / "cinc2021" / "E07500")
    assert rec.metadata["dx_codes"] == ["67741000119109", "426177001"]
    assert rec.metadata["age"] == 78 and rec.metadata["sex"] == "M"
    assert rec.record_id == rec.patient_id == "E07500"


@pytest.mark.parametrize(
    "record_line",
    ["E07500 12 500 5000 05-Jun-2020 11:03:54", "E07500.mat 12 500 5000 05-Jun-2020 11:03:54"],
)
def test_challenge_header_with_date_on_record_line_still_reads(
    test_data: Path, tmp_path: Path, record_line: str
) -> None:
    original = SOURCES.create("challenge").read(test_data / "cinc2021" / "E07500")
    copy = copy_record(test_data / "cinc2021" / "E07500", tmp_path, lambda lines: [record_line] + lines[1:])
    rec = SOURCES.create("challenge").read(copy)
    np.testing.assert_array_equal(rec.signal, original.signal)
    assert rec.metadata["record_line_extra"] == "05-Jun-2020 11:03:54"


def test_load_dx_mapping_names_sinus_rhythm() -> None:
    maps = Path(ecgfm.__file__).parent / "data" / "label_maps"  # the Challenge's tables, shipped with the package
    mapping = load_dx_mapping([maps / "cinc2021_dx_mapping_scored.csv", maps / "cinc2021_dx_mapping_unscored.csv"])
    assert mapping["426783006"] == "NSR"
    assert mapping["164951009"] == "abQRS"  # from the unscored table
    assert dx_names(["426783006", "123"], mapping) == ["NSR", "123"]


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_truncated_dat_raises_naming_the_file(records: dict[str, Path], tmp_path: Path) -> None:
    copy = copy_record(records["wfdb"], tmp_path)
    _truncate(tmp_path / "1.dat", 50_000)
    with pytest.raises(RecordError, match=r"1\.dat"):
        SOURCES.create("wfdb").read(copy)


def test_truncated_mat_raises_naming_the_file(records: dict[str, Path], tmp_path: Path) -> None:
    copy = copy_record(records["challenge"], tmp_path)
    _truncate(tmp_path / "E07500.mat", 60_000)
    with pytest.raises(RecordError, match=r"E07500\.mat"):
        SOURCES.create("challenge").read(copy)


@pytest.mark.parametrize(
    ("source", "data_file"),
    [("wfdb", "1.dat"), ("challenge", "E07500.mat")],
)
def test_missing_data_file_raises_naming_it(
    records: dict[str, Path], tmp_path: Path, source: str, data_file: str
) -> None:
    copy = copy_record(records[source], tmp_path)
    (tmp_path / data_file).unlink()
    with pytest.raises(RecordError, match=data_file.replace(".", r"\.")):
        SOURCES.create(source).read(copy)


@pytest.mark.parametrize(
    ("source", "data_file"),
    [("wfdb", "1.dat"), ("challenge", "E07500.mat")],
)
def test_header_sample_count_disagreeing_with_data_raises(
    records: dict[str, Path], tmp_path: Path, source: str, data_file: str
) -> None:
    def shorten(lines: list[str]) -> list[str]:
        return [lines[0].replace(" 5000", " 4000")] + lines[1:]

    copy = copy_record(records[source], tmp_path, shorten)
    with pytest.raises(RecordError, match=data_file.replace(".", r"\.")):
        SOURCES.create(source).read(copy)


@pytest.mark.parametrize("source", ["wfdb", "challenge"])
def test_malformed_header_raises_naming_it(records: dict[str, Path], tmp_path: Path, source: str) -> None:
    copy = copy_record(records[source], tmp_path, lambda lines: [lines[0].replace(" 12 ", " twelve ")] + lines[1:])
    with pytest.raises(RecordError, match=rf"{copy.name}\.hea"):
        SOURCES.create(source).read(copy)


def test_empty_dat_raises_naming_it(records: dict[str, Path], tmp_path: Path) -> None:
    copy = copy_record(records["wfdb"], tmp_path)
    _truncate(tmp_path / "1.dat", 0)
    with pytest.raises(RecordError, match=r"1\.dat"):
        SOURCES.create("wfdb").read(copy)


def test_challenge_leads_I_and_i_raise(records: dict[str, Path], tmp_path: Path) -> None:
    copy = copy_record(
        records["challenge"],
        tmp_path,
        lambda lines: [lines[0], lines[1], lines[2][: -len("II")] + "i"] + lines[3:],
    )
    with pytest.raises(RecordError, match=r"E07500\.hea: signals 'I' and 'i'"):
        SOURCES.create("challenge").read(copy)


def _write_wfdb(tmp_path: Path, names: list[str], units: list[str], digital: np.ndarray) -> Path:
    wfdb.wrsamp(
        "syn",
        fs=250,
        units=units,
        sig_name=names,
        d_signal=digital,
        fmt=["16"] * len(names),
        adc_gain=[200.0] * len(names),
        baseline=[10] * len(names),
        write_dir=str(tmp_path),
    )
    return tmp_path / "syn"


def test_wfdb_leads_I_and_i_raise(tmp_path: Path) -> None:
    path = _write_wfdb(tmp_path, ["I", "i"], ["mV", "mV"], np.zeros((100, 2), dtype=np.int16))
    with pytest.raises(RecordError, match=r"syn\.hea: signals 'I' and 'i'"):
        SOURCES.create("wfdb").read(path)


def test_wfdb_units_scaled_and_invalid_samples_become_nan(tmp_path: Path) -> None:
    digital = np.full((100, 3), 210, dtype=np.int16)  # (210 - 10) / 200 = 1 unit
    digital[5, 0] = -32768
    path = _write_wfdb(tmp_path, ["II", "V1", "aux"], ["mV", "uV", "V"], digital)
    rec = SOURCES.create("wfdb").read(path)
    assert rec.lead_names == ("II", "V1", "aux")
    assert np.isnan(rec.signal[0, 5]) and np.isnan(rec.signal[0]).sum() == 1
    assert rec.signal[0, 0] == pytest.approx(1.0)
    assert rec.signal[1, 0] == pytest.approx(0.001)
    assert rec.signal[2, 0] == pytest.approx(1000.0)
