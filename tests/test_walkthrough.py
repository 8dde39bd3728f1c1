"""README's hospital walkthrough runs as written: examples/walkthrough.py extracts its
commands, runs them with bash for three sites against a loopback S3 server (the crontab
lines as cron would, with nothing exported) and fails on the first command that fails."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "walkthrough.py"), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "walkthrough OK" in proc.stdout
