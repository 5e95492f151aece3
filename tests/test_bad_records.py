"""A catalogue of bad inputs to ``ecgfm shard``, one row each, run through the real command line: a bad record is
skipped with its reason (naming its file) while the others convert, a questionable value is stored as missing and
reported, and a bad table or option ends in one ``ecgfm: error:`` line naming the file, column or option."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from ecgfm.commands import main
from ecgfm.registry import ADAPTERS, SOURCES, MissingOptionError

LUDB = Path(__file__).resolve().parents[1] / "ecgfm" / "quickstart" / "ludb" / "data"
CINC = Path(__file__).resolve().parent / "data" / "cinc2021"


def copy_record(src: Path, dst: Path, edit: Callable[[list[str]], list[str]] | None = None) -> Path:
    """Copy a record's header and data files into ``dst``, editing the header lines if asked."""
    dst.mkdir(parents=True, exist_ok=True)
    lines = (src.parent / f"{src.name}.hea").read_text().splitlines()
    for name in {line.split()[0] for line in lines[1:] if line.strip() and not line.startswith("#")}:
        shutil.copy(src.parent / name, dst / name)
    (dst / f"{src.name}.hea").write_text("\n".join(edit(lines) if edit else lines) + "\n")
    return dst / src.name


def record_line(field: int, value: str) -> Callable[[list[str]], list[str]]:
    """A header edit that sets one field of the record line (2: sampling frequency, 3: sample count)."""

    def edit(lines: list[str]) -> list[str]:
        tokens = lines[0].split()
        tokens[field] = value
        return [" ".join(tokens), *lines[1:]]

    return edit


def first_signal(old: str, new: str) -> Callable[[list[str]], list[str]]:
    """A header edit replacing text in the first signal line (lead I in both LUDB and Challenge records)."""
    return lambda lines: [lines[0], lines[1].replace(old, new, 1), *lines[2:]]


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:keep])


def shard(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str]]:
    """Run ``ecgfm shard`` as a user would; (exit code, stderr lines)."""
    code = main(["shard", *args, "--progress", "false"])
    return code, capsys.readouterr().err.strip().splitlines()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def stored(out: Path, target: str) -> dict[str, np.ndarray]:
    """record id -> the target's stored values, over every shard."""
    values: dict[str, np.ndarray] = {}
    for shard_file in sorted(out.glob("shard-*.h5")):
        with h5py.File(shard_file, "r") as f:
            for record, row in zip(f["record_id"].asstr()[:], f[f"targets/{target}"][:], strict=True):
                values[record] = row
    return values


# --- records: one bad record among good ones is skipped with its reason, the others convert -------------------


@dataclass
class BadRecord:
    """One damaged copy of a real record, and what skipped.csv must say about it."""

    id: str
    reader: str
    header_edit: Callable[[list[str]], list[str]] | None
    reason: str  # regex the reason must match after the record's file name
    damage: Callable[[Path], None] | None = None


BAD_RECORDS = [
    # LUDB (WFDB, 500 Hz): wfdb itself reads a rate of -500 as 250 Hz and a gain of 0 as 200
    BadRecord(
        "wfdb-fs-negative", "wfdb", record_line(2, "-500"), r"1\.hea: sampling frequency '-500' .* not a positive"
    ),
    BadRecord("wfdb-fs-zero", "wfdb", record_line(2, "0"), r"1\.hea: sampling frequency '0' .* not a positive"),
    BadRecord("wfdb-fs-nan", "wfdb", record_line(2, "nan"), r"1\.hea: sampling frequency 'nan' .* not a positive"),
    BadRecord("wfdb-fs-inf", "wfdb", record_line(2, "inf"), r"1\.hea: sampling frequency 'inf' .* not a positive"),
    BadRecord("wfdb-fs-too-low", "wfdb", record_line(2, "5"), r"1: sampling rate 5 Hz is below 25 Hz"),
    BadRecord("wfdb-gain-zero", "wfdb", first_signal("1716(6)", "0(6)"), r"1\.hea: signal 1 \(lead I\) has ADC gain 0"),
    BadRecord("wfdb-gain-negative", "wfdb", first_signal("1716(6)", "-1716(6)"), r"1\.hea: .*lead I.* negative ADC"),
    BadRecord("wfdb-gain-huge", "wfdb", first_signal("1716(6)", "1e400(6)"), r"1\.hea: .*lead I.* gain inf, not a"),
    BadRecord("wfdb-gain-text", "wfdb", first_signal("1716(6)", "nan(6)"), r"1\.hea: .*unreadable gain field 'nan"),
    BadRecord("wfdb-unit-degC", "wfdb", first_signal("/mV", "/degC"), r"1\.hea: .*lead I.* 'degC', not a voltage"),
    BadRecord("wfdb-length-short", "wfdb", record_line(3, "4000"), r"1\.dat: holds 5000 samples .* header says 4000"),
    BadRecord("wfdb-length-long", "wfdb", record_line(3, "6000"), r"1\.dat: truncated, 120000 bytes .* 6000 samples"),
    BadRecord("wfdb-truncated-dat", "wfdb", None, r"1\.dat: truncated, 50000 bytes", truncate("1.dat", 50_000)),
    # PhysioNet/CinC Challenge 2021 (.hea + .mat, header parsed by ecgfm)
    BadRecord("challenge-fs-negative", "challenge", record_line(2, "-500"), r"E07500\.hea: sampling frequency '-500'"),
    BadRecord("challenge-fs-nan", "challenge", record_line(2, "nan"), r"E07500\.hea: sampling frequency 'nan'"),
    BadRecord("challenge-gain-zero", "challenge", first_signal("1000.0(0)", "0(0)"), r"E07500\.hea: .*lead I.* gain 0"),
    BadRecord("challenge-unit-mmHg", "challenge", first_signal("/mV", "/mmHg"), r"E07500\.hea: .*'mmHg', not a volt"),
    BadRecord("challenge-length", "challenge", record_line(3, "6000"), r"E07500\.mat: 'val' has shape \(12, 5000\)"),
    BadRecord(
        "challenge-truncated-mat", "challenge", None, r"E07500\.mat: cannot load", truncate("E07500.mat", 60_000)
    ),
]


@pytest.mark.parametrize("case", BAD_RECORDS, ids=[c.id for c in BAD_RECORDS])
def test_a_bad_record_is_skipped_naming_its_file_and_the_others_convert(case: BadRecord, tmp_path, capsys) -> None:
    source = tmp_path / "source"
    bad_src, good_src = (LUDB / "1", LUDB / "2") if case.reader == "wfdb" else (CINC / "E07500", CINC / "E07501")
    bad = copy_record(bad_src, source, case.header_edit)
    copy_record(good_src, source)
    if case.damage is not None:
        case.damage(source)
    code, err = shard(capsys, "--source", str(source), "--out", str(tmp_path / "out"), "--reader", case.reader)
    assert (code, err) == (0, [])
    skipped = read_csv(tmp_path / "out" / "skipped.csv")
    assert [row["record"] for row in skipped] == [str(bad)]
    assert re.search(re.escape(str(source)) + "/" + case.reason, skipped[0]["reason"]), skipped[0]["reason"]
    assert "\n" not in skipped[0]["reason"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["n_segments"] == 1  # the good record, whole


# --- records that convert correctly, with what was changed in warnings.csv ---------------------------------------


def _arrays_export(folder: Path, values: np.ndarray) -> list[str]:
    """A two-record arrays export (``export.npy`` + ``export.csv``) whose first record holds ``values``."""
    folder.mkdir()
    data = np.random.default_rng(0).normal(0, 0.3, (2, 12, 5000)).astype(np.float32)
    data[0] = values
    np.save(folder / "export.npy", data)
    (folder / "export.csv").write_text("record\nA\nB\n")
    return ["--reader", "arrays", "--reader_options", json.dumps({"table": str(folder / "export.csv")})]


def test_infinite_samples_are_zeroed_and_reported_not_clipped_to_full_scale(tmp_path, capsys) -> None:
    values = np.random.default_rng(1).normal(0, 0.3, (12, 5000)).astype(np.float32)
    values[0, 100:103] = np.inf
    values[1, 200] = -np.inf
    values[1, 201] = np.nan
    options = _arrays_export(tmp_path / "export", values)
    code, err = shard(capsys, "--source", str(tmp_path / "export"), "--out", str(tmp_path / "out"), *options)
    assert (code, err) == (0, [])
    warnings = {row["warning"] for row in read_csv(tmp_path / "out" / "warnings.csv")}
    assert warnings == {"lead I: 3 NaN or infinite samples set to 0", "lead II: 2 NaN or infinite samples set to 0"}
    with h5py.File(tmp_path / "out" / "shard-00000.h5", "r") as f:
        assert (f["signal"][0, 0, 100:103] == 0).all() and f["signal"][0, 1, 200] == 0


def test_samples_beyond_int16_are_clipped_and_reported(tmp_path, capsys) -> None:
    values = np.random.default_rng(1).normal(0, 0.3, (12, 5000)).astype(np.float32)
    values[6, :10] = 50.0  # 50 mV: beyond what int16 µV holds
    options = _arrays_export(tmp_path / "export", values)
    code, _ = shard(capsys, "--source", str(tmp_path / "export"), "--out", str(tmp_path / "out"), *options)
    assert code == 0
    rows = read_csv(tmp_path / "out" / "warnings.csv")
    assert [(r["record"].rsplit("#")[1], r["warning"]) for r in rows] == [
        ("0", "lead V1: 10 samples beyond ±32.767 mV clipped")
    ]


def test_a_non_ecg_channel_in_another_unit_is_ignored_and_the_record_converts(tmp_path, capsys) -> None:
    def respiration(lines: list[str]) -> list[str]:
        return [*lines[:12], lines[12].replace("/mV", "/Ohm").replace(" v6", " resp"), *lines[13:]]

    copy_record(LUDB / "1", tmp_path / "source", respiration)
    code, err = shard(capsys, "--source", str(tmp_path / "source"), "--out", str(tmp_path / "out"))
    assert (code, err) == (0, [])
    assert read_csv(tmp_path / "out" / "skipped.csv") == []
    assert {r["warning"] for r in read_csv(tmp_path / "out" / "warnings.csv")} == {
        "signals ignored, not a voltage: resp (Ohm)"
    }
    with h5py.File(tmp_path / "out" / "shard-00000.h5", "r") as f:
        assert f["lead_mask"][0].tolist() == [True] * 11 + [False]  # V6 absent, the rest stored


def test_a_header_without_a_rate_uses_wfdbs_default_and_says_so(tmp_path, capsys) -> None:
    copy_record(LUDB / "1", tmp_path / "source", lambda lines: ["1 12", *lines[1:]])
    code, _ = shard(capsys, "--source", str(tmp_path / "source"), "--out", str(tmp_path / "out"))
    assert code == 0
    warnings = [r["warning"] for r in read_csv(tmp_path / "out" / "warnings.csv")]
    assert warnings == ["no sampling frequency in 1.hea: WFDB's default 250 Hz assumed"]


# --- label tables: cells that are not finite numbers are missing and reported; bad tables stop in one line ------


def _ludb_source(tmp_path: Path, n: int = 4) -> Path:
    for i in range(1, n + 1):
        copy_record(LUDB / str(i), tmp_path / "source")
    return tmp_path / "source"


def _label_args(tmp_path: Path, table: str, name: str = "labels.csv", *extra: str) -> list[str]:
    (tmp_path / name).write_text(table)
    return [
        "--source",
        str(_ludb_source(tmp_path)),
        "--out",
        str(tmp_path / "out"),
        "--labels",
        str(tmp_path / name),
        "--regression",
        "{potassium: [potassium]}",
        *extra,
    ]


@pytest.mark.parametrize(
    "cell, warning",
    [
        ("high", "label column 'potassium': 'high' is not a number; stored as missing"),
        (
            '"5,2"',
            "label column 'potassium': '5,2' is not a number (a decimal comma? use --decimal ,); stored as missing",
        ),
        ("inf", "label column 'potassium': 'inf' is not a finite number; stored as missing"),
        ("-Infinity", "label column 'potassium': '-Infinity' is not a finite number; stored as missing"),
        ("1e400", "label column 'potassium': '1e400' is out of range (beyond float32's ±3.4e38); stored as missing"),
        ("1e39", "label column 'potassium': '1e39' is out of range (beyond float32's ±3.4e38); stored as missing"),
        ("", None),  # an empty cell is simply missing
        ("NA", None),  # as is an export's explicit "no value"
        ("nan", None),
    ],
    ids=["high", "decimal-comma-cell", "inf", "minus-infinity", "1e400", "1e39", "empty", "NA", "nan-text"],
)
def test_a_label_cell_that_is_not_a_finite_number_is_missing_and_reported(cell, warning, tmp_path, capsys) -> None:
    table = f"record,potassium\n1,{cell}\n2,4.1\n3,5\n4,3.9\n"
    code, err = shard(capsys, *_label_args(tmp_path, table))
    assert (code, err) == (0, [])
    values = stored(tmp_path / "out", "potassium")
    assert np.isnan(values["1"][0]) and values["2"][0] == pytest.approx(4.1) and values["3"][0] == 5.0
    rows = read_csv(tmp_path / "out" / "warnings.csv")
    assert [(Path(r["record"]).name, r["warning"]) for r in rows] == ([("1", warning)] if warning else [])


def test_decimal_comma_export_reads_with_decimal_option(tmp_path, capsys) -> None:
    table = 'record,potassium\n1,"4,1"\n2,"5,25"\n3,\n4,"-0,5"\n'
    code, err = shard(capsys, *_label_args(tmp_path, table, "labels.csv", "--decimal", ","))
    assert (code, err) == (0, [])
    values = stored(tmp_path / "out", "potassium")
    assert values["1"][0] == pytest.approx(4.1) and values["2"][0] == pytest.approx(5.25)
    assert np.isnan(values["3"][0]) and values["4"][0] == pytest.approx(-0.5)
    assert read_csv(tmp_path / "out" / "warnings.csv") == []


def test_semicolon_export_reads_with_separator_and_decimal_options(tmp_path, capsys) -> None:
    table = "record;potassium\n1;4,1\n2;5,25\n3;3\n4;4\n"
    code, err = shard(capsys, *_label_args(tmp_path, table, "labels.csv", "--separator", ";", "--decimal", ","))
    assert (code, err) == (0, [])
    assert stored(tmp_path / "out", "potassium")["1"][0] == pytest.approx(4.1)


@dataclass
class BadTable:
    """A label table (or option) that must stop ``ecgfm shard`` with one line naming the file and the cause."""

    id: str
    table: str
    message: str  # regex, after "ecgfm: error: "
    extra: tuple[str, ...] = ()


BAD_TABLES = [
    BadTable(
        "decimal-comma-column",
        'record,potassium\n1,"4,1"\n2,"5,2"\n3,"3,9"\n4,4\n',
        r"label table .*labels\.csv: column 'potassium' should hold numbers but 3 of its 4 non-empty cells do not "
        r"\(e\.g\. '4,1', '5,2', '3,9'\); they look like decimal commas: use --decimal ,$",
    ),
    BadTable(
        "decimal-point-column-with-decimal-comma",
        "record,potassium\n1,4.1\n2,5.2\n3,3\n4,4.4\n",
        r"labels\.csv: column 'potassium' .* 3 of its 4 .*they use a decimal point: leave out --decimal ,$",
        ("--decimal", ","),
    ),
    BadTable(
        "text-column",
        "record,potassium\n1,high\n2,low\n3,normal\n4,4.1\n",
        r"labels\.csv: column 'potassium' .* 3 of its 4 .*e\.g\. 'high', 'low', 'normal'\); is it the right column",
    ),
    BadTable(
        "semicolon-file-read-as-csv",
        "record;potassium\n1;4\n2;5\n",
        r"label table .*labels\.csv has no column\(s\) \['record', 'potassium'\]; it has \['record;potassium'\]; "
        r"the header looks ';'-separated: use --separator ';'$",
    ),
    BadTable(
        "semicolon-file-with-decimal-commas-read-as-csv",
        "record;potassium\n1;4,1\n2;5,2\n",
        r"label table .*labels\.csv: its header 'record;potassium' is one column; .* use --separator ';'$",
    ),
    BadTable(
        "unquoted-decimal-comma-shifts-columns",
        "record,potassium\n1,4,1\n2,3,9\n",  # old: record 4 got potassium 1, record 3 got 9
        r"label table .*labels\.csv: its rows have one field more than its header \(line 2: '1,4,1'\)",
    ),
    BadTable("empty-table", "", r"label table .*labels\.csv is empty: no header line$"),
    BadTable("header-only", "record,potassium\n", r"label table .*labels\.csv has a header but no rows$"),
    BadTable(
        "bad-decimal-option", "record,potassium\n1,4\n", r"decimal must be '\.' or ',', got ';'$", ("--decimal", ";")
    ),
]


@pytest.mark.parametrize("case", BAD_TABLES, ids=[c.id for c in BAD_TABLES])
def test_a_bad_label_table_stops_with_one_line_naming_it(case: BadTable, tmp_path, capsys) -> None:
    code, err = shard(capsys, *_label_args(tmp_path, case.table, "labels.csv", *case.extra))
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("ecgfm: error: ") and re.search(case.message, err[0]), err[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- reader options -----------------------------------------------------------------------------------------------


def test_reader_arrays_without_its_table_is_one_line_naming_the_option(tmp_path, capsys) -> None:
    _arrays_export(tmp_path / "export", np.zeros((12, 5000), np.float32))
    code, err = shard(
        capsys, "--source", str(tmp_path / "export"), "--out", str(tmp_path / "out"), "--reader", "arrays"
    )
    assert (code, err) == (1, ["ecgfm: error: reader 'arrays' needs the option 'table' (reader_options: {table: ...})"])


def test_registry_names_a_missing_required_option_for_every_kind() -> None:
    with pytest.raises(MissingOptionError, match=r"^source 'arrays' needs the option 'table'; its options: table, "):
        SOURCES.create("arrays")
    assert SOURCES.required_options("arrays") == ["table"]
    assert SOURCES.required_options("arrays", given={"table": "t.csv"}) == []
    assert SOURCES.required_options("wfdb") == []
    for name in ADAPTERS.names():  # the leads and backbone the framework passes are not options
        assert ADAPTERS.required_options(name) == []


@pytest.mark.parametrize("fs", ["-500", "0", ".nan", ".inf"])
def test_reader_arrays_with_an_impossible_rate_is_one_line_naming_it(fs: str, tmp_path, capsys) -> None:
    options = _arrays_export(tmp_path / "export", np.zeros((12, 5000), np.float32))
    options[-1] = options[-1].replace("}", f", fs: {fs}}}")
    code, err = shard(capsys, "--source", str(tmp_path / "export"), "--out", str(tmp_path / "out"), *options)
    assert code == 1 and len(err) == 1 and err[0].startswith("ecgfm: error: arrays: fs must be a positive finite"), err
