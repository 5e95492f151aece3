"""A rerun of `ecgfm shard` reuses a finished shard only while its source files, label table and bytes are unchanged,
and says which shards it rebuilt and why; `ecgfm shard verify` names the shard and dataset of one flipped byte."""

from __future__ import annotations

import csv
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from ecgfm.commands import main
from ecgfm.data.checksums import array_checksum
from ecgfm.data.convert import convert
from ecgfm.data.shards import Manifest, update_checksums, verify_shards

DATASETS = ["/signal", "/lead_mask", "/record_id", "/patient_id", "/patient_key", "/segment_start", "/valid_samples"]


@pytest.fixture
def src(ludb_data, tmp_path):
    """LUDB records 1-6 copied out of the package (never change files in the repository): 3 shards of 2."""
    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(1, 7):
        for ext in ("hea", "dat"):
            shutil.copy(ludb_data / "data" / f"{i}.{ext}", folder / f"{i}.{ext}")
    return folder


def shard(out, k: int) -> str:
    return str(out / f"shard-{k:05d}.h5")


def record_signal(out, k: int, record: str) -> np.ndarray:
    with h5py.File(shard(out, k)) as f:
        row = list(f["record_id"].asstr()[:]).index(record)
        return f["signal"][row]


def test_a_replaced_source_file_rebuilds_exactly_the_shard_that_holds_it(src, tmp_path):
    out = tmp_path / "out"
    first = convert(src, out, records_per_shard=2, progress=False)
    assert (first.shards_reused, first.rebuilt) == (0, [])
    before = {k: (out / f"shard-{k:05d}.h5").read_bytes() for k in range(3)}
    old_signal = record_signal(out, 1, "3")

    shutil.copy(src / "1.dat", src / "3.dat")  # record 3 (shard 1) now holds record 1's samples
    second = convert(src, out, records_per_shard=2, progress=False)
    assert second.shards_reused == 2 and second.rebuilt == [("shard-00001", "3.dat changed")]
    assert (out / "shard-00000.h5").read_bytes() == before[0] and (out / "shard-00002.h5").read_bytes() == before[2]
    assert not np.array_equal(record_signal(out, 1, "3"), old_signal)
    fresh = tmp_path / "fresh"
    convert(src, fresh, records_per_shard=2, progress=False)  # what an uninterrupted run of the new files gives
    np.testing.assert_array_equal(record_signal(out, 1, "3"), record_signal(fresh, 1, "3"))
    assert (Manifest.load(out).shards, verify_shards(out)) == (Manifest.load(fresh).shards, [])

    os.utime(src / "5.dat", ns=(1, 1))  # another mtime, the same bytes: not a change
    third = convert(src, out, records_per_shard=2, progress=False)
    assert (third.shards_reused, third.rebuilt) == (3, [])


def test_a_truncated_record_fixed_later_converts_and_leaves_skipped_csv(src, tmp_path):
    out = tmp_path / "out"
    good = (src / "4.dat").read_bytes()
    (src / "4.dat").write_bytes(good[:50_000])
    first = convert(src, out, records_per_shard=2, progress=False)
    assert [path for path, _ in first.skipped] == [str(src / "4")] and "truncated" in first.skipped[0][1]
    assert len(list(csv.reader((out / "skipped.csv").open()))) == 2

    (src / "4.dat").write_bytes(good)  # the user replaces it with a good copy
    second = convert(src, out, records_per_shard=2, progress=False)
    assert second.rebuilt == [("shard-00001", "4.dat changed")] and second.shards_reused == 2
    assert second.skipped == [] and second.records_read == 6
    assert list(csv.reader((out / "skipped.csv").open())) == [["record", "reason"]]
    assert Manifest.load(out).n_segments == 6 and verify_shards(out) == []


def test_an_edited_label_table_rebuilds_the_shards(src, tmp_path):
    out, table = tmp_path / "out", tmp_path / "labels.csv"
    table.write_text("record,k\n" + "".join(f"{i},{4 + i / 10}\n" for i in range(1, 7)))
    options = dict(labels=table, regression={"potassium": ["k"]}, records_per_shard=2, progress=False)
    convert(src, out, **options)
    table.write_text(table.read_text().replace("5,4.5", "5,6.5"))
    again = convert(src, out, **options)
    assert again.shards_reused == 0 and len(again.rebuilt) == 3
    assert all(reason == f"label table {table} changed" for _, reason in again.rebuilt)
    with h5py.File(shard(out, 2)) as f:
        assert f["targets/potassium"][0, 0] == pytest.approx(6.5)
    assert convert(src, out, **options).shards_reused == 3


@pytest.mark.parametrize("dataset", [*DATASETS, "/targets/potassium"])
def test_one_flipped_byte_in_any_dataset_fails_verify_naming_shard_and_dataset(src, tmp_path, capsys, dataset):
    table = tmp_path / "labels.csv"
    table.write_text("record,k\n" + "".join(f"{i},4.{i}\n" for i in range(1, 7)))
    good = tmp_path / "good"
    convert(src, good, labels=table, regression={"potassium": ["k"]}, records_per_shard=2, progress=False)
    assert main(["shard", "verify", str(good)]) == 0
    capsys.readouterr()

    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    with h5py.File(shard(broken, 1), "r") as f:
        offset = f[dataset].id.get_offset()  # contiguous: the dataset's bytes (for strings, their heap references)
    with open(shard(broken, 1), "r+b") as f:
        f.seek(offset + 1)
        byte = f.read(1)[0]
        f.seek(offset + 1)
        f.write(bytes([byte ^ 0xFE]))  # a bool byte 1 becomes 0xFF: h5py still reads True, the checksum differs
    assert main(["shard", "verify", str(broken)]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED")]
    assert len(lines) == 1 and shard(broken, 1) in lines[0] and f"dataset {dataset} " in lines[0], lines


@pytest.mark.parametrize("dataset", ["/record_id", "/patient_id"])
def test_a_rewritten_id_fails_verify(src, tmp_path, capsys, dataset):
    convert(src, tmp_path / "out", records_per_shard=2, progress=False)
    with h5py.File(shard(tmp_path / "out", 2), "r+") as f:
        f[dataset][0] = "6x"  # a valid file with another string: only the checksum can tell
    assert main(["shard", "verify", str(tmp_path / "out")]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED")]
    assert len(lines) == 1 and "shard-00002.h5" in lines[0] and f"dataset {dataset} differs" in lines[0]
    assert main(["shard", "verify", "--quick", str(tmp_path / "out")]) == 0  # --quick: the structure only


def test_a_damaged_finished_shard_is_rebuilt_not_reused(src, tmp_path):
    out = tmp_path / "out"
    convert(src, out, records_per_shard=2, progress=False)
    path = out / "shard-00001.h5"
    path.write_bytes(path.read_bytes()[:-100_000])  # truncated on disk after the conversion
    with h5py.File(shard(out, 2), "r") as f:
        offset = f["signal"].id.get_offset()
    with open(shard(out, 2), "r+b") as f:
        f.seek(offset + 5000)
        f.write(b"\x7f")
    again = convert(src, out, records_per_shard=2, progress=False)
    assert again.shards_reused == 1 and [k for k, _ in again.rebuilt] == ["shard-00001", "shard-00002"]
    reasons = dict(again.rebuilt)
    assert "cannot open shard" in reasons["shard-00001"] and "dataset /signal differs" in reasons["shard-00002"]
    assert verify_shards(out) == [] and convert(src, out, records_per_shard=2, progress=False).shards_reused == 3


def test_a_shard_changed_in_place_with_its_checksums_updated_still_verifies_and_is_reused(src, tmp_path):
    """What distill-cache and the distillation benchmark do: rewrite a dataset, then record its new checksum."""
    out = tmp_path / "out"
    table = tmp_path / "labels.csv"
    table.write_text("record,k\n" + "".join(f"{i},4.{i}\n" for i in range(1, 7)))
    options = dict(labels=table, regression={"potassium": ["k"]}, records_per_shard=2, progress=False)
    convert(src, out, **options)
    manifest = Manifest.load(out)
    with h5py.File(out / "shard-00000.h5", "r+") as f:
        values = f["targets/potassium"][:]
        values[0] = np.nan
        f["targets/potassium"][:] = values
    assert any("dataset /targets/potassium differs" in line for line in verify_shards(out))
    update_checksums(out, manifest.shards[0], {"/targets/potassium": array_checksum(values)})
    manifest.save(out)
    assert verify_shards(out) == []
    sidecar = json.loads((out / "shard-00000.json").read_text())
    assert sidecar["checksums"] == manifest.shards[0]["checksums"]
    assert convert(src, out, **options).shards_reused == 3  # the sidecar's checksums were updated too


def test_a_folder_without_checksums_is_not_a_pass(src, tmp_path, capsys):
    out = tmp_path / "out"
    convert(src, out, records_per_shard=3, progress=False)
    data = json.loads((out / "manifest.json").read_text())
    for entry in data["shards"]:
        del entry["checksums"]  # as written by ecgfm before checksums
    (out / "manifest.json").write_text(json.dumps(data))
    assert main(["shard", "verify", str(out)]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED")]
    assert len(lines) == 2 and all("no dataset checksums in manifest.json" in line for line in lines)
    assert main(["shard", "verify", "--quick", str(out)]) == 0


@pytest.mark.parametrize(
    "args, named",
    [
        (["--stride", "0"], "stride"),
        (["--stride", "-5"], "stride"),
        (["--records_per_shard", "0"], "records_per_shard"),
        (["--out", "{file}"], "{file}"),
        (["--out", "{file}/shards"], "{file}"),
    ],
)
def test_bad_shard_options_end_in_one_line(src, tmp_path, capsys, args, named):
    existing = tmp_path / "a-file.txt"
    existing.write_text("not a folder")
    args = [a.format(file=existing) for a in args]
    argv = ["shard", "--source", str(src), "--progress", "false", *args]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ecgfm: error: ") and named.format(file=existing) in err[0], err
    assert existing.read_text() == "not a folder" and not (tmp_path / "out").exists()


def test_verify_help_is_help_not_a_folder(capsys):
    assert main(["shard", "verify", "--help"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: ecgfm shard verify") and "--quick" in printed
