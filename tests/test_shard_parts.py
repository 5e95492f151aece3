"""`ecgfm shard --part K/N` converts one part of a conversion, `ecgfm shard merge` joins the parts into exactly the
folder a single run writes; the slurm test runs slurm/shard.sbatch as a 2-task array on a real Slurm."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecgfm.commands import main
from ecgfm.data.convert import convert
from ecgfm.data.parts import merge_parts, parse_part
from ecgfm.data.shards import ShardError, verify_shards

REPO = Path(__file__).resolve().parents[1]
#: What a merged folder must hold byte for byte as a single run wrote it (shards and sidecars included).
SAME_FILES = ("manifest.json", "skipped.csv", "warnings.csv", "patient_keys.npy")


@pytest.fixture(scope="module")
def records(test_data, tmp_path_factory) -> Path:
    """The 20 real Challenge 2021 records plus one broken record, so skipped.csv has a row to merge."""
    folder = tmp_path_factory.mktemp("parts") / "cinc"
    shutil.copytree(test_data / "cinc2021", folder)
    (folder / "JS99999.hea").write_text("JS99999 12 500 5000\nthis is no signal line\n")
    (folder / "JS99999.mat").write_bytes(b"\0" * 16)
    return folder


@pytest.fixture(scope="module")
def single(records, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "shards"
    summary = convert(records, out, reader="challenge", records_per_shard=3, progress=False)
    assert summary.records_read == 20 and len(summary.skipped) == 1 and summary.warnings
    return out


def assert_same_folder(merged: Path, single: Path) -> None:
    for name in SAME_FILES:
        assert (merged / name).read_bytes() == (single / name).read_bytes(), name
    shards = sorted(p.name for p in single.glob("shard-*"))
    assert sorted(p.name for p in merged.glob("shard-*")) == shards and len(shards) == 14
    for name in shards:
        assert (merged / name).read_bytes() == (single / name).read_bytes(), name
    assert verify_shards(merged) == []


@pytest.mark.parametrize("n", [2, 3])
def test_parts_merged_equal_a_single_run(records, single, tmp_path, n):
    out = tmp_path / "shards"
    for k in range(n):
        summary = convert(records, out, reader="challenge", records_per_shard=3, progress=False, part=f"{k}/{n}")
        assert summary.shards_reused == 0
        assert (out / f"manifest.part-{k}-of-{n}.json").is_file() and not (out / "manifest.json").exists()
    summary = merge_parts(out)
    assert summary.records_read == 20 and summary.segments_written == 20 and len(summary.skipped) == 1
    assert_same_folder(out, single)


def test_parts_in_their_own_folders_merge_into_out(records, single, tmp_path, capsys):
    for k in range(2):
        args = ["shard", "--source", str(records), "--out", str(tmp_path / f"part{k}"), "--reader", "challenge"]
        assert main([*args, "--records_per_shard", "3", "--progress", "false", "--part", f"{k}/2"]) == 0
    assert "part 1 of 2: 3 of 7 shards in manifest.part-1-of-2.json" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["shard", "merge", str(tmp_path / "part1"), str(tmp_path / "part0"), "--out", str(merged)]) == 0
    assert "records read" in capsys.readouterr().out
    assert_same_folder(merged, single)


def test_labels_and_metadata_merge_with_an_empty_part(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    recipe = ["shard", "--config", "recipes/quickstart/shard.yaml", "--progress", "false"]
    assert main([*recipe, "--out", str(tmp_path / "single")]) == 0
    for k in range(2):  # 120 records in one shard: part 1 of 2 has none, and still says it finished
        assert main([*recipe, "--out", str(tmp_path / "parts"), "--part", f"{k}/2"]) == 0
    part1 = json.loads((tmp_path / "parts" / "manifest.part-1-of-2.json").read_text())
    assert part1["shards"] == [] and part1["n_shards"] == 1
    assert main(["shard", "merge", str(tmp_path / "parts")]) == 0
    for name in SAME_FILES:
        assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    assert json.loads((tmp_path / "parts" / "manifest.json").read_text())["metadata"]


def test_a_missing_part_fails_merge_naming_it(records, tmp_path, capsys):
    out = tmp_path / "shards"
    convert(records, out, reader="challenge", records_per_shard=3, progress=False, part="0/3")
    convert(records, out, reader="challenge", records_per_shard=3, progress=False, part="2/3")
    assert main(["shard", "merge", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ecgfm: error: part [1] of 3 missing: no manifest.part-1-of-3.json" in err
    assert not (out / "manifest.json").exists()


def test_a_part_from_another_plan_fails_merge_naming_it(records, tmp_path, capsys):
    out = tmp_path / "shards"
    convert(records, out, reader="challenge", records_per_shard=3, progress=False, part="0/2")
    convert(records, out, reader="challenge", records_per_shard=4, progress=False, part="1/2")
    with pytest.raises(ShardError, match=r"manifest\.part-1-of-2\.json: part 1 of 2 is from another plan"):
        merge_parts(out)
    # the same options over another record list: the fingerprint agrees, the plan does not
    fewer = tmp_path / "fewer"
    shutil.copytree(records, fewer)
    (fewer / "JS99999.hea").unlink()
    other = tmp_path / "other"
    convert(records, other, reader="challenge", records_per_shard=3, progress=False, part="0/2")
    convert(records, other, reader="challenge", records_per_shard=3, progress=False, part="1/2")
    convert(fewer, tmp_path / "f", reader="challenge", records_per_shard=3, progress=False, part="1/2")
    part = tmp_path / "f" / "manifest.part-1-of-2.json"
    shutil.copy(part, other / part.name)
    assert main(["shard", "merge", str(other)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{other / part.name}: part 1 of 2 is from another plan" in err


def test_parts_of_different_splits_and_a_changed_shard_fail_merge(records, tmp_path):
    out = tmp_path / "shards"
    for k in range(2):
        convert(records, out, reader="challenge", records_per_shard=3, progress=False, part=f"{k}/2")
    shutil.copytree(out, tmp_path / "three")
    convert(records, tmp_path / "three", reader="challenge", records_per_shard=3, progress=False, part="0/3")
    assert not (tmp_path / "three" / "manifest.part-1-of-2.json").exists()  # an earlier split is dropped
    with pytest.raises(ShardError, match="part 0 of 2 is also in"):
        merge_parts([out, out / "manifest.part-0-of-2.json"])
    shard = out / "shard-00003.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00003\.h5: "):
        merge_parts(out)


def test_rerunning_a_part_reuses_its_shards(records, tmp_path):
    out = tmp_path / "shards"
    convert(records, out, reader="challenge", records_per_shard=3, progress=False, part="1/2")
    part = out / "manifest.part-1-of-2.json"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    text = part.read_text()
    assert sorted(before) == [f"shard-{k:05d}.h5" for k in (1, 3, 5)]
    again = convert(records, out, reader="challenge", records_per_shard=3, progress=False, part="1/2")
    assert again.shards_reused == 3 and again.shards_rebuilt == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")} == before
    assert part.read_text() == text


def test_part_parses_k_of_n_and_the_slurm_array(monkeypatch):
    assert parse_part("2/3") == (2, 3) and parse_part(" 0 / 1 ") == (0, 1)
    for bad, why in (("3/3", "K must be 0 ... N-1"), ("1-2", "expected K/N"), ("0/0", "N at least 1")):
        with pytest.raises(ValueError, match=why):
            parse_part(bad)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID or SLURM_ARRAY_TASK_COUNT is not set"):
        parse_part("slurm")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert parse_part("slurm") == (1, 4)


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _job_states(job_id: str) -> dict[str, tuple[str, str]]:
    """{job id, or ARRAYID_TASK for array tasks: (state, exit code)} from scontrol (no accounting needed)."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    states = {}
    for line in shown.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        name = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}" if "ArrayTaskId" in fields else fields["JobId"]
        states[name] = (fields["JobState"], fields["ExitCode"])
    return states


def _ecgfm() -> str:
    exe = os.environ.get("ECGFM") or str(Path(sys.executable).with_name("ecgfm"))
    if not os.access(exe, os.X_OK):
        pytest.fail(f"ecgfm executable {exe} not found: set ECGFM=/path/to/.venv/bin/ecgfm")
    return exe


@pytest.mark.slurm
@pytest.mark.slow
def test_shard_sbatch_two_part_array_merges_to_the_single_run(records, single, tmp_path):
    if (
        shutil.which("sbatch") is None
        or "is UP" not in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout
    ):
        message = "no Slurm controller answers (start one with: slurm/local-cluster.sh start)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    out = tmp_path / "shards"
    config = tmp_path / "shard.yaml"
    config.write_text(f"source: {records}\nout: {out}\nreader: challenge\nrecords_per_shard: 3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(ECGFM=_ecgfm(), PYTHONUNBUFFERED="1")

    def submit() -> tuple[str | None, str]:
        cmd = ["bash", "slurm/shard.sbatch", "submit", "2", "--cpus-per-task=1", "--time=15:00"]
        cmd += [f"--output={tmp_path}/shard-%j.out", "--", str(config)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"submit failed: {done.stdout}{done.stderr}"
        jobs = dict(re.findall(r"^(parts|merge): job (\d+)", done.stdout, re.MULTILINE))
        assert "merge" in jobs, done.stdout
        return jobs.get("parts"), jobs["merge"]

    def wait(job: str) -> dict[str, tuple[str, str]]:
        start = time.monotonic()
        while True:
            states = _job_states(job)
            if states and all(state in FINAL_STATES for state, _ in states.values()):
                return states
            if time.monotonic() - start > (600 if states else 30):
                subprocess.run(["scancel", job])
                pytest.fail(f"job {job} not finished ({states or 'unknown to scontrol'}); cancelled")
            time.sleep(1)

    def logs() -> str:
        return "\n".join(p.read_text() for p in sorted(tmp_path.glob("shard-*.out")))

    parts, merge = submit()
    assert parts is not None
    states = wait(parts)
    assert sorted(states) == [f"{parts}_0", f"{parts}_1"], states
    assert all(state == ("COMPLETED", "0:0") for state in states.values()), f"{states}\n{logs()[-4000:]}"
    assert wait(merge)[merge] == ("COMPLETED", "0:0"), logs()[-4000:]
    assert "part 0 of 2 finished" in logs() and "part 1 of 2 finished" in logs()
    assert_same_folder(out, single)

    # resubmitting: both parts finished, so only the merge runs again, and the folder stays the same
    (out / "manifest.json").unlink()
    parts, merge = submit()
    assert parts is None
    assert wait(merge)[merge] == ("COMPLETED", "0:0"), logs()[-4000:]
    assert_same_folder(out, single)
