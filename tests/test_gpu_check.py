"""The prepared GPU check (bench/gpu_check.py) runs on a CPU too, so it has not rotted when a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_passes_on_a_cpu_from_another_directory_only_when_told_cpu_is_fine(tmp_path):
    """On a CPU every check runs (so the script has not rotted); without ``--allow-cpu`` the run fails, so a GPU
    machine whose torch silently fell back to the CPU does not read as a pass (it printed five PASS lines)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--skip-figures", "--allow-cpu", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert [c["check"][:2] for c in report["checks"]] == ["0.", "1.", "2.", "3.", "4.", "5.", "6."]
    assert all(c["ok"] for c in report["checks"]), report["checks"]
    assert report["device"] == "CPU" and report["figures"] == []
    # the check names the device the engine process reports from its own engine
    assert report["checks"][5]["device"] == "cpu", report["checks"][5]
    strict = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--skip-figures", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert strict.returncode == 1, strict.stdout[-3000:]
    assert "FAIL  0. a CUDA device" in strict.stdout
