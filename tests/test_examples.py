"""The README's example commands: the quick starts run offline and padding changes nothing."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, out: Path) -> str:
    """Run examples/NAME with --out OUT and no network; returns its stdout."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quickstart_runs_offline(tmp_path):
    stdout = run_example("quickstart.py", tmp_path)
    assert "kept 2048 of 16384 patches" in stdout
    diffs = [float(x) for x in re.findall(r"max \|diff\| (\S+)", stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-4
    assert (tmp_path / "moving_objects.mp4").stat().st_size > 0


def test_lmm_quickstart_runs_offline(tmp_path):
    """A text, an image, a two-image and a video sample in one generate() batch, then save and load."""
    stdout = run_example("lmm_quickstart.py", tmp_path)
    assert "one batch: 4 samples, 4 visual items of [200, 99, 99, 1152] tokens" in stdout, stdout
    assert len(re.findall(r"^answer: ", stdout, re.M)) == 4, stdout
    assert float(re.search(r"max \|diff\| of the logits (\S+)", stdout).group(1)) < 1e-5, stdout
