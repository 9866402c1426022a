"""The built-in demo, reduced (`rlchat demo --quick`): every stage runs and PPO raises the held-out task reward.

This is the README's main job end to end on a local Ray that starts by itself (its own instance, in a subprocess,
as a user would run it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"core_worker\.cc|RayDeprecationWarning|Traceback \(most recent call last\)|\(\w+ pid=\d+\)")
"""Ray's own log lines, which belong in RUN_DIR/logs/console.log, not on the console."""
MARGIN = 0.05
"""Smallest accepted gain of the held-out sampled task reward, PPO over SFT (the full demo gains ~0.15)."""


def _run_demo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RLCHAT_VERBOSE", None)
    return subprocess.run(
        [sys.executable, "-m", "rlchat", "demo", "--quick", *args],
        cwd=cwd,  # a user's own directory, not the checkout
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def _check_demo(proc: subprocess.CompletedProcess, run: Path) -> None:
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
    assert "held-out metric" in proc.stdout and "SFT policy" in proc.stdout
    assert summary["ppo_eval"]["eval/win_rate"] is not None
    assert 0 <= summary["ppo_final"]["kl/ref_kl"] < 50
    # the console shows rlchat's lines; Ray's own logs went to the run's logs/
    noisy = [line for line in (proc.stdout + proc.stderr).splitlines() if NOISE.search(line)]
    assert not noisy, noisy[:10]
    assert (run / "logs" / "console.log").stat().st_size > 0


@pytest.mark.slow
def test_quick_demo_with_the_default_run_dir(tmp_path):
    """Exactly the README's command, from a fresh working directory: the run lands in ./runs/demo-*."""
    proc = _run_demo(tmp_path)
    runs = list((tmp_path / "runs").glob("demo-*"))
    assert len(runs) == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    _check_demo(proc, runs[0])


@pytest.mark.slow
def test_demo_with_a_relative_run_dir_from_another_directory(tmp_path):
    """``--run-dir ../some/relative/dir`` from another working directory, with ``--full``: every stage (the RLHF
    run's too) reads and writes there (the stages are cut to a few steps, and the command line's keys win over the
    RLHF run's own settings; the margins are the test above's and tests/test_rlhf_gold.py's job). The learners run
    in the driver process (``ray.learner_workers=0``: six Ray Train start-ups cost ~70 s here); the test above runs
    them on Ray Train from a relative default run directory."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    short = ["sft.epochs=1", "sft.max_steps=5", "rm.max_steps=3", "ppo.iterations=2", "ppo.eval_prompts=8"]
    short.append("ray.learner_workers=0")
    proc = _run_demo(cwd, "--run-dir", "../some/relative/dir", "--full", *short)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "some" / "relative" / "dir"
    summary = json.loads((run / "summary.json").read_text())
    for stage in ("sft", "rm", "ppo"):
        assert Path(summary["checkpoints"][stage]).is_relative_to(run)
        assert (run / stage / "metrics.jsonl").is_file()
        assert Path(summary["rlhf"]["checkpoints"][stage]).is_relative_to(run / "rlhf")
        assert len((run / "rlhf" / stage / "metrics.jsonl").read_text().splitlines()) >= 2
    rlhf = summary["rlhf"]
    assert rlhf["gold"]["ppo"]["n"] == rlhf["proxy"]["sft"]["n"] == 32  # 8 held-out prompts x 4 samples
    assert (run / "rlhf" / "ppo" / "metrics.jsonl").read_text().count('"step"') == 2  # ppo.iterations=2 kept
    assert "RLHF: PPO (GRPO) on the reward model alone" in proc.stdout and "== 6/6 RLHF" in proc.stdout
    assert "held-out metric" in proc.stdout and "SFT policy" in proc.stdout
    assert not [line for line in (proc.stdout + proc.stderr).splitlines() if NOISE.search(line)]
    assert not (cwd / "runs").exists()
