"""The built-in demo, reduced (`rlchat demo --quick`): every stage runs and PPO raises the held-out task reward.

This is the README's main job end to end on a local Ray that starts by itself (its own instance, in a subprocess,
as a user would run it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.05
"""Smallest accepted gain of the held-out sampled task reward, PPO over SFT (the full demo gains ~0.15)."""


@pytest.mark.slow
def test_quick_demo_raises_held_out_reward(tmp_path):
    run = tmp_path / "demo"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "rlchat.cli", "demo", "--quick", "--run-dir", str(run)],
        cwd=tmp_path,  # the CLI works from any directory
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    sft, ppo = summary["sampled_reward"]["sft"], summary["sampled_reward"]["ppo"]
    assert sft["n"] == ppo["n"] >= 128
    assert ppo["mean"] - sft["mean"] >= MARGIN, (sft, ppo)
    # every stage left its checkpoint and plots; the table was printed
    for stage in ("sft", "rm", "ppo"):
        assert Path(summary["checkpoints"][stage]).is_dir()
        assert list((run / stage / "plots").glob("*.png"))
    assert "PPO raised the held-out task reward" in proc.stdout
    assert summary["ppo_eval"]["eval/win_rate"] is not None
    assert 0 <= summary["ppo_final"]["kl/ref_kl"] < 50
