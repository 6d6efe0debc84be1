"""The README's main command: the quick start runs offline and padding changes nothing."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_offline(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "kept 2048 of 16384 patches" in result.stdout
    diffs = [float(x) for x in re.findall(r"max \|diff\| (\S+)", result.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-4
    assert (tmp_path / "moving_objects.mp4").stat().st_size > 0
