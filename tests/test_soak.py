"""CI soak: scripts/soak.py in a real subprocess with a small number of calls; every output is checked against the
target's greedy decoding inside the script, and RSS growth must stay within its margin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def test_soak_24_calls_in_a_subprocess():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, str(SCRIPT), "--calls", "24", "--seed", "3", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600, env=env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert out.strip().endswith("PASS"), out
    assert re.search(r"calls: 24 in [\d.]+s .* mismatches: 0", out), out
    start, end = (float(x) for x in re.search(r"rss_start_mib: ([\d.]+)\s+rss_end_mib: ([\d.]+)", out).groups())
    assert start > 0 and end > 0
    assert "hooks_left: 0" in out
    assert "soak" in result.stderr  # the tqdm progress bar


def test_soak_rejects_bad_arguments():
    result = subprocess.run([sys.executable, str(SCRIPT), "--calls", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--calls must be >= 1, got 0" in result.stderr
