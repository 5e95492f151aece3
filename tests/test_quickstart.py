"""The README's main job, end to end: `ecgfm quickstart` converts, fine-tunes, tests and prints macro AUROC."""

import math
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "ecgfm", "quickstart", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("test macro AUROC over")]
    assert lines, proc.stdout[-3000:]
    auroc = float(lines[0].rsplit(":", 1)[1])
    assert math.isfinite(auroc) and 0.0 <= auroc <= 1.0
    assert "over 8 labels" in lines[0]  # every trained label has positives and negatives among test patients
    checkpoint = next(
        line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("checkpoint:")
    )
    from ecgfm.tasks import FineTuneTask

    model = FineTuneTask.load_from_checkpoint(checkpoint, map_location="cpu")
    assert model.heads["diagnoses"].labels[0] == "Sinus rhythm"
    print(proc.stdout[-1500:])
