"""The README's main job, end to end: `ecgfm quickstart` converts, fine-tunes, and reports on the held-out patients:
each label's test AUROC per record with its 95 % interval and number of positives, labels with too few left out."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

#: `  <label>  0.984 (0.930-1.000)  8 positive of 24 test records`
LABEL_LINE = re.compile(r"^  (.+?)\s+(\d\.\d{3}) \((\d\.\d{3})-(\d\.\d{3})\)\s+(\d+) positive of (\d+) test records$")


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "ecgfm", "quickstart", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    labels = [LABEL_LINE.match(line) for line in lines]
    labels = [m for m in labels if m]
    assert len(labels) >= 4, proc.stdout[-3000:]
    for m in labels:
        estimate, low, high, positives, n = float(m[2]), float(m[3]), float(m[4]), int(m[5]), int(m[6])
        assert 0 <= low <= estimate <= high <= 1 and 5 <= positives <= n - 5  # only labels with enough of each
    macro = next(line for line in lines if line.startswith("test macro AUROC over"))
    low = float(re.search(r"\((\d\.\d{3})-", macro)[1])
    assert low > 0.5, macro  # the model visibly learned: the interval of the macro AUROC excludes chance
    left_out = next(line for line in lines if line.startswith("not scored"))
    assert "Atrial fibrillation (1 positive)" in left_out
    report = Path(next(line.split(":", 1)[1].strip() for line in lines if line.startswith("report:")))
    results = json.loads((report.parent / "metrics.json").read_text())
    assert results["unit"] == "record" and results["data"]["split_settings"]["test_fraction"] == 0.25
    checkpoint = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("checkpoint:"))
    from ecgfm.tasks import FineTuneTask

    model = FineTuneTask.load_from_checkpoint(checkpoint, map_location="cpu")
    assert model.heads["diagnoses"].labels[0] == "Sinus rhythm"
    print(proc.stdout[-1500:])
