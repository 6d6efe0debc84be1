"""The README's offline multimodal LLM quick start runs end to end with no network."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_lmm_quickstart_runs_offline(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lmm_quickstart.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "one batch: 4 samples, 4 visual items of [200, 99, 99, 1152] tokens" in result.stdout
    assert len(re.findall(r"^answer: ", result.stdout, re.M)) == 4
    assert float(re.search(r"max \|diff\| of the logits (\S+)", result.stdout).group(1)) < 1e-5
