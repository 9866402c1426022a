"""Paths mean what the user typed: relative paths are resolved once, where they enter (config load and CLI).

The README's first command once failed at the PPO stage because a relative run directory reached a Ray Train
worker, which resolved it against its own working directory. The slow tests here run the commands as a user
does -- subprocesses started in a temporary working directory, default and relative run directories -- and
check the console shows rlchat's own lines, not Ray's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlchat.cli import resolve_path_args
from rlchat.config import load_config, resolve_path

ROOT = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"core_worker\.cc|RayDeprecationWarning|Traceback \(most recent call last\)|\(\w+ pid=\d+\)")
"""Lines of Ray's own logging that must not reach the console of a normal run."""


def test_resolve_path_keeps_ids_uris_and_builtins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    assert resolve_path("") == ""
    assert resolve_path("builtin:task") == "builtin:task"
    assert resolve_path("s3://bucket/runs/x") == "s3://bucket/runs/x"
    assert resolve_path("Qwen/Qwen2-0.5B", maybe_id=True) == "Qwen/Qwen2-0.5B"  # a hub id, not a local path
    assert resolve_path("cl100k_base", maybe_id=True) == "cl100k_base"
    assert resolve_path("gpt2", maybe_id=True) == str(tmp_path / "gpt2")  # a local directory wins, as in HF
    assert resolve_path("./models/new", maybe_id=True) == str(tmp_path / "models" / "new")
    assert resolve_path("runs/a/../b") == str(tmp_path / "runs" / "b")
    assert resolve_path("/abs/x") == "/abs/x"
    assert resolve_path("~/x") == str(Path.home() / "x")


def test_load_config_makes_every_path_key_absolute(tmp_path, monkeypatch):
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    shutil.copy(ROOT / "configs" / "demo.yaml", cwd / "my.yaml")
    cfg = load_config(
        "my.yaml",
        [
            "data.prompts=data/prompts.jsonl",
            "data.sft=builtin:chat",
            "checkpoint.init_from=runs/sft/checkpoints/best",
            "reward.model_path=../rm",
            "rm.feedback=[fb/a.jsonl, /abs/b.jsonl]",
            "model.name_or_path=org/some-model",
        ],
    )
    assert cfg.data.prompts == str(cwd / "data" / "prompts.jsonl")
    assert cfg.data.sft == "builtin:chat"
    assert cfg.checkpoint.init_from == str(cwd / "runs" / "sft" / "checkpoints" / "best")
    assert cfg.reward.model_path == str(tmp_path / "rm")
    assert list(cfg.rm.feedback) == [str(cwd / "fb" / "a.jsonl"), "/abs/b.jsonl"]
    assert cfg.model.name_or_path == "org/some-model"


def test_cli_path_arguments_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = resolve_path_args(
        {
            "run_dir": "runs/x",
            "checkpoint": "ck",
            "inputs": ["a.jsonl", "builtin:task"],
            "target": "http://127.0.0.1:8000",
            "temperature": 0.7,
            "resume": None,
        }
    )
    assert out["run_dir"] == str(tmp_path / "runs" / "x")
    assert out["checkpoint"] == str(tmp_path / "ck")
    assert out["inputs"] == [str(tmp_path / "a.jsonl"), "builtin:task"]
    assert out["target"] == "http://127.0.0.1:8000"
    assert out["temperature"] == 0.7 and out["resume"] is None


def _rlchat(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the CLI as a user does: a fresh process, its own local Ray, in ``cwd``."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RLCHAT_VERBOSE", None)
    return subprocess.run(
        [sys.executable, "-m", "rlchat", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _assert_quiet(proc: subprocess.CompletedProcess) -> None:
    noisy = [line for line in (proc.stdout + proc.stderr).splitlines() if NOISE.search(line)]
    assert not noisy, "Ray noise on the console:\n" + "\n".join(noisy[:10])


@pytest.mark.slow
def test_sft_then_train_with_relative_paths_in_the_default_layout(tmp_path):
    """SFT, then PPO from the SFT checkpoint, every path relative, learner on Ray Train (the default layout)."""
    shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "demo.yaml")
    small = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"]
    sft = _rlchat(
        ["sft", "--config", "demo.yaml", "--run-dir", "out/sft", *small, "sft.max_steps=4", "sft.epochs=1"], tmp_path
    )
    assert sft.returncode == 0, sft.stderr[-3000:]
    _assert_quiet(sft)
    ppo = _rlchat(
        [
            "train",
            "--config",
            "demo.yaml",
            "--run-dir",
            "out/ppo",
            *small,
            "checkpoint.init_from=out/sft/checkpoints/best",
            "ppo.iterations=2",
            "ppo.eval_every=0",
            "rollout.envs_per_worker=8",
            "ppo.update_epochs=1",
        ],
        tmp_path,
    )
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    _assert_quiet(ppo)
    assert (tmp_path / "out" / "ppo" / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "out" / "ppo" / "logs" / "console.log").is_file()


@pytest.mark.slow
def test_failure_prints_one_error_line_and_where_the_log_is(tmp_path):
    proc = _rlchat(["train", "checkpoint.init_from=no/such/ckpt", "ppo.iterations=1"], tmp_path, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert str(tmp_path / "no" / "such" / "ckpt") in errors[0]
    assert "full log:" in proc.stderr
    _assert_quiet(proc)


def test_demo_verdict_says_plainly_when_ppo_did_not_improve():
    from rlchat.demo import verdict

    assert verdict({"mean": 0.5, "stderr": 0.02}, {"mean": 0.75, "stderr": 0.02}).startswith("PPO raised")
    flat = verdict({"mean": 0.5, "stderr": 0.03}, {"mean": 0.52, "stderr": 0.03})
    assert flat.startswith("PPO did not clearly improve") and "+0.020" in flat
    worse = verdict({"mean": 0.5, "stderr": 0.02}, {"mean": 0.47, "stderr": 0.02})
    assert worse.startswith("PPO did not improve") and "fell by 0.030" in worse and "raised" not in worse
