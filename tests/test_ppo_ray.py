"""PPO on a real local Ray: fault-tolerant rollout workers, DDP learner equivalence, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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

# ------------------------------------------------------------------------------------------- rollout device


def test_pick_device_uses_cuda_only_with_ray_gpu_ids_and_cuda() -> None:
    import torch

    from rlchat.rollout import pick_device

    assert pick_device([], cuda_available=True) == torch.device("cpu")  # no GPU reserved for this worker
    assert pick_device([0], cuda_available=False) == torch.device("cpu")  # reserved, but torch has no CUDA
    assert pick_device([3], cuda_available=True) == torch.device("cuda", 0)  # Ray's CUDA_VISIBLE_DEVICES: index 0
    assert pick_device(["0", "1"], cuda_available=True) == torch.device("cuda", 0)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_rollout_worker_with_a_gpu_samples_on_it(ray_local) -> None:
    """rollout.num_gpus_per_worker=1: the policy and the engine's buffers live on the GPU, and sampling works there."""
    import torch

    from rlchat.learner import build_models
    from rlchat.rollout import RolloutGroup, build_sampler

    cfg = load_config(DEMO, [*TINY, "rollout.num_workers=1", "rollout.envs_per_worker=8"])
    sampler = build_sampler(cfg.to_dict(), 0, device="cuda")
    assert {p.device.type for p in sampler.model.parameters()} == {"cuda"}
    assert sampler.engine.device.type == "cuda"
    batch = sampler.sample(1)
    assert len(batch) == 8 and (batch.behaviour_logprobs[batch.action_mask] <= 0).all()
    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the shared local Ray instance has no GPU resource")
    group = RolloutGroup(cfg.replace(**{"rollout.num_gpus_per_worker": 1.0}))
    try:
        assert ray_local.get(group.workers[0].device_name.remote()) == "cuda:0"
        policy, _, tok = build_models(cfg, device=torch.device("cpu"))
        weights = ray_local.put({k: v.detach().clone() for k, v in policy.lm.state_dict().items()})
        batch = group.sample(1, weights, 1, tok.pad_id)  # CPU weights load into the GPU policy
        assert len(batch) == 8 and batch.weights_version == 1
    finally:
        group.shutdown()


# ------------------------------------------------------------------------------------------- fault tolerance


def test_worker_fault_wraps_the_actor_class_only_when_armed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seam leaves RolloutWorker untouched when nothing is armed; armed, its sample() runs inside the fault, which
    kills the armed worker's call after its work and before its reply, once (the marker disarms it)."""
    from rlchat.distributed import faults
    from rlchat.distributed.rollout import RolloutWorker

    for key in list(os.environ):
        if key.startswith(faults.TEST_ENV_PREFIX):
            monkeypatch.delenv(key)
    assert faults.actor_class(RolloutWorker, faults.WORKER, lambda w: 0) is RolloutWorker
    assert faults.wrap(object, faults.DRIVER) is object
    marker = tmp_path / "died"
    env = {
        faults.env_name(faults.WORKER, "METHOD"): "sample",
        faults.env_name(faults.WORKER, "WORKER"): "1",
        faults.env_name(faults.WORKER, "AT_REPLY"): "1",
        faults.env_name(faults.WORKER, "MARKER"): str(marker),
    }
    code = (
        "from rlchat.distributed import faults\n"
        "class W:\n"
        "    def __init__(self, i): self.i = i\n"
        "    def sample(self): print('sampled', self.i, flush=True); return self.i\n"
        "cls = faults.actor_class(W, faults.WORKER, lambda w: w.i)\n"
        "assert cls is not W and cls(0).sample() == 0\n"
        "cls(1).sample(); print('replied')\n"
    )
    run_env = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert out.stdout == "sampled 0\nsampled 1\n" and marker.exists()  # worker 1 did the work, never replied
    again = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.endswith("replied\n")  # disarmed by the marker


def _arm_die_hook(monkeypatch: pytest.MonkeyPatch, marker: Path, worker: int) -> None:
    """Worker ``worker`` dies in its first sample() call, after sampling and before replying: the call is lost."""
    from rlchat.distributed import faults

    monkeypatch.setenv(faults.env_name(faults.WORKER, "METHOD"), "sample")
    monkeypatch.setenv(faults.env_name(faults.WORKER, "WORKER"), str(worker))
    monkeypatch.setenv(faults.env_name(faults.WORKER, "AT_REPLY"), "1")
    monkeypatch.setenv(faults.env_name(faults.WORKER, "MARKER"), str(marker))


@pytest.mark.slow
def test_killed_rollout_worker_is_restarted_and_its_share_resampled(ray_local, tmp_path, monkeypatch):
    """Worker 0 SIGKILLs itself inside its sample() call, after sampling and before replying (by construction, not by
    timing: the whole share is lost): Ray restarts it, the retried call re-samples its share, and the iteration's
    data equals an uninterrupted sample of it."""
    import torch

    from rlchat.batch import RolloutBatch
    from rlchat.learner import build_models
    from rlchat.metrics import ROLLOUT_EPISODES, ROLLOUT_WORKER_RESTARTS
    from rlchat.rollout import WORKER_RESTARTS, RolloutGroup, batch_metrics

    marker = tmp_path / "worker-0-died"
    _arm_die_hook(monkeypatch, marker, worker=0)
    cfg = load_config(DEMO, [*TINY, "rollout.num_workers=2", "rollout.envs_per_worker=8"])
    group = RolloutGroup(cfg)
    try:
        policy, _, tok = build_models(cfg, device=torch.device("cpu"))
        weights = ray_local.put({k: v.detach().clone() for k, v in policy.lm.state_dict().items()})
        pids = group.pids()
        assert not marker.exists()
        batches = ray_local.get(group.sample_async(2, weights, 1), timeout=300)
        assert marker.exists()  # worker 0 died inside sample(), before its reply
        new_pids = group.pids()
        assert new_pids[0] != pids[0] and new_pids[1] == pids[1]  # only worker 0 was restarted
        assert [b.worker_id for b in batches] == [0, 1] and [len(b) for b in batches] == [8, 8]
        assert [b.metrics[WORKER_RESTARTS] for b in batches] == [1.0, 0.0]  # the restart is reported, once
        merged = RolloutBatch.concat(batches, pad_id=tok.pad_id)
        m = batch_metrics(merged)
        assert (m[ROLLOUT_WORKER_RESTARTS], m[ROLLOUT_EPISODES]) == (1.0, 16.0)
        # Nothing lost, nothing duplicated: the same iteration sampled again (no death now) gives identical data.
        again = group.sample(2, weights, 1, tok.pad_id)
        assert again.metrics[WORKER_RESTARTS] == 0.0 and group.pids() == new_pids
        np.testing.assert_array_equal(merged.record_index, again.record_index)
        np.testing.assert_array_equal(merged.input_ids, again.input_ids)
        np.testing.assert_array_equal(merged.action_mask, again.action_mask)
        np.testing.assert_allclose(merged.behaviour_logprobs, again.behaviour_logprobs, atol=1e-6)
    finally:
        group.shutdown()


@pytest.mark.slow
def test_train_iteration_completes_with_the_full_batch_when_a_worker_dies(ray_local, tmp_path, monkeypatch):
    """rlchat.trainer.train with worker 1 dying mid-sample in iteration 1: both iterations run on full batches."""
    from rlchat.metrics import ROLLOUT_EPISODES, ROLLOUT_WORKER_RESTARTS
    from rlchat.trainer import train

    marker = tmp_path / "worker-1-died"
    _arm_die_hook(monkeypatch, marker, worker=1)
    cfg = load_config(
        DEMO,
        [*TINY, "rollout.num_workers=2", "rollout.envs_per_worker=4", "ray.learner_workers=0", "ppo.iterations=2"],
    )
    run_dir, last = train(cfg, tmp_path / "run", quiet=True)
    assert marker.exists()
    rows = _metrics(run_dir)
    assert sorted(rows) == [1, 2]
    assert [rows[i][ROLLOUT_EPISODES] for i in (1, 2)] == [8.0, 8.0]  # 2 workers x 4 envs, the dead share re-sampled
    assert [rows[i][ROLLOUT_WORKER_RESTARTS] for i in (1, 2)] == [1.0, 0.0]
    for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "rollout/reward_mean"):
        assert np.isfinite(rows[1][key]) and np.isfinite(rows[2][key]), key


@pytest.mark.slow
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


def _driver_dies_after_save(call: int, marker: Path) -> dict[str, str]:
    """The driver SIGKILLs itself right after its ``call``-th checkpoint save returns (faults.DRIVER)."""
    from rlchat.distributed import faults

    return {
        faults.env_name(faults.DRIVER, "METHOD"): "save",
        faults.env_name(faults.DRIVER, "CALL"): str(call),
        faults.env_name(faults.DRIVER, "AT_REPLY"): "1",
        faults.env_name(faults.DRIVER, "MARKER"): str(marker),
    }


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_resume_after_sigkill_is_step_exact(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    out = {}

    def run_full():
        out["full"] = _train(full, 3)

    thread = threading.Thread(target=run_full)
    thread.start()
    first = _train(killed, 3, env=_driver_dies_after_save(2, tmp_path / "driver-died"))
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
