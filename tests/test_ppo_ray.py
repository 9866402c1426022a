"""PPO on a real local Ray: fault-tolerant rollout workers, DDP learner equivalence, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rlchat.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
TINY = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.precision=fp32",
    "env.max_turn_tokens=8",
    "ppo.num_minibatches=2",
    "ppo.update_epochs=2",
    "ppo.eval_every=0",
    "rollout.num_cpus_per_worker=0.5",
    "ray.learner_cpus=0.5",
]

pytestmark = pytest.mark.slow


def test_killed_rollout_worker_is_restarted_and_its_share_resampled(ray_local):
    from rlchat.rollout import RolloutGroup

    cfg = load_config(DEMO, [*TINY, "rollout.num_workers=2", "rollout.envs_per_worker=48", "env.max_turn_tokens=48"])
    group = RolloutGroup(cfg)
    try:
        from rlchat.learner import build_models

        policy, _, tok = build_models(cfg, device=__import__("torch").device("cpu"))
        weights = ray_local.put({k: v.detach().clone() for k, v in policy.lm.state_dict().items()})
        reference = group.sample(1, weights, 1, tok.pad_id)  # uninterrupted
        pids = group.pids()
        refs = group.sample_async(2, weights, 1)
        time.sleep(0.2)
        os.kill(pids[0], signal.SIGKILL)  # mid-iteration
        batches = ray_local.get(refs, timeout=300)
        assert group.pids()[0] != pids[0]  # a new process
        assert [b.worker_id for b in batches] == [0, 1]
        assert sum(len(b) for b in batches) == 96  # nothing lost, nothing duplicated
        again = group.sample(2, weights, 1, tok.pad_id)  # the same iteration re-sampled: identical data
        from rlchat.batch import RolloutBatch

        merged = RolloutBatch.concat(batches, pad_id=tok.pad_id)
        np.testing.assert_array_equal(merged.input_ids, again.input_ids)
        np.testing.assert_allclose(merged.behaviour_logprobs, again.behaviour_logprobs, atol=1e-6)
        assert len(reference) == 96
    finally:
        group.shutdown()


def test_two_learner_workers_equal_one_on_the_same_batch(ray_local):
    """2 rollout workers + 2 CPU learner workers (gloo DDP) give the same first update as 1 + 1."""
    import torch

    from rlchat.learner import LearnerGroup
    from rlchat.rollout import RolloutGroup

    base = load_config(DEMO, [*TINY, "rollout.num_workers=2", "rollout.envs_per_worker=8", "ppo.grad_accum_steps=2"])
    rollouts = RolloutGroup(base)
    results = {}
    try:
        batch = None
        for n in (1, 2):
            cfg = base.replace(**{"ray.learner_workers": n})
            learner = LearnerGroup(cfg, "/tmp/rlchat-test-ddp")
            try:
                w, v = learner.weights()
                if batch is None:
                    batch = rollouts.sample(1, w, v, pad_id=4091)
                    # rewards so the update has a signal
                    batch.scores[np.arange(len(batch)), batch.action_mask.cumsum(1).argmax(1)] = np.linspace(
                        -1, 1, len(batch)
                    )
                    batch_ref = ray_local.put(batch)
                metrics, w2, _ = learner.update(batch_ref, 1)
                results[n] = (metrics, ray_local.get(w2))
            finally:
                learner.shutdown()
    finally:
        rollouts.shutdown()
    (m1, w1), (m2, w2) = results[1], results[2]
    for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "kl/ref_kl", "ppo/clipfrac"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-5), key
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst < 1e-5
    assert any(not torch.equal(w1[k], w1[k] * 0) for k in w1)


def _train(run_dir: Path, iterations: int, *extra: str, env: dict | None = None, resume: bool = False):
    cmd = [sys.executable, "-m", "rlchat.cli", "train"]
    if resume:
        cmd += ["--resume", str(run_dir)]
    else:
        cmd += ["--config", str(DEMO), "--run-dir", str(run_dir)]
    cmd += [
        *TINY,
        f"ppo.iterations={iterations}",
        "checkpoint.every=1",
        "rollout.envs_per_worker=8",
        "ray.num_cpus=2",
        *extra,
    ]
    full_env = {**os.environ, "RAY_ADDRESS": "", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_resume_after_sigkill_is_step_exact(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    out = {}

    def run_full():
        out["full"] = _train(full, 3)

    thread = threading.Thread(target=run_full)
    thread.start()
    first = _train(killed, 3, env={"RLCHAT_TEST_KILL_AFTER_ITERATION": "2"})
    thread.join()
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert out["full"].returncode == 0, out["full"].stderr[-2000:]
    assert sorted(_metrics(killed)) == [1, 2]
    resumed = _train(killed, 3, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = _metrics(full), _metrics(killed)
    assert sorted(b) == [1, 2, 3]
    compared = 0
    for key, value in a[3].items():
        if key in ("time", "step") or key.startswith("perf/") or not isinstance(value, float):
            continue
        assert b[3][key] == pytest.approx(value, abs=1e-6), key
        compared += 1
    assert compared > 10
