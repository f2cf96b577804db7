"""`kvtier torture`: real writer processes killed with SIGKILL; nothing acknowledged is lost."""

from __future__ import annotations

import json
import subprocess
import sys


def test_torture_two_kills(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "kvtier.scheduler.cli", "torture", "--kills", "2", "--corruptions", "10", "--dir",
                           str(tmp_path / "store"), "--json", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["kills"] == 2
    assert data["acknowledged_blocks"] >= 2  # every cycle acknowledged at least one block before its kill
    assert data["acknowledged_blocks_lost"] == 0
    assert data["wrong_blocks_served"] == 0
    assert data["reopen_failures"] == 0
    assert data["corruptions_injected"] >= 5 and data["corruptions_detected"] == data["corruptions_injected"]


def test_torture_rejects_zero_kills():
    proc = subprocess.run([sys.executable, "-m", "kvtier.scheduler.cli", "torture", "--kills", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--kills" in proc.stderr
