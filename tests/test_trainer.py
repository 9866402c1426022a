"""The PPO driver loop in one process (rollout.num_workers=0, ray.learner_workers=0): metrics, checkpoints, the
driver log, guardrails that act (and survive a resume), the progress ETA, and one-step off-policy overlap on real
rollout actors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_configs import IN_PROCESS, TINY_PPO

from rlchat import metrics as metrics_module
from rlchat.config import load_config
from rlchat.metrics import make_run_dir, write_run_config
from rlchat.trainer import PPOTrainer, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_PPO,
    "ppo.update_epochs=1",
    "ppo.eval_every=2",
    "ppo.eval_prompts=8",
    *IN_PROCESS,
]


def _cfg(*extra: str):
    return load_config(ROOT / "configs" / "demo.yaml", [*TINY, *extra])


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _trainer(cfg, run: Path) -> PPOTrainer:
    """A driver whose learner the test can inspect (``train`` shuts it down before returning)."""
    path = make_run_dir(run, "train")
    write_run_config(path, cfg)
    return PPOTrainer(cfg, path, quiet=True)


def _group_lrs(t: PPOTrainer) -> list[float]:
    return [g["lr"] for g in t.learner.learner.optimizer.param_groups]


def test_in_process_run_logs_every_documented_metric(tmp_path):
    run, last = train(_cfg("ppo.iterations=2", "checkpoint.every=1"), tmp_path / "run", quiet=True)
    lines = _lines(run)
    assert [r["step"] for r in lines] == [1, 2]
    required = {
        "rollout/reward_mean",
        "rollout/reward/verifiable",
        "rollout/response_len",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/entropy",
        "ppo/approx_kl",
        "ppo/clipfrac",
        "ppo/explained_variance",
        "kl/ref_kl",
        "kl/coef",
        "perf/tokens_per_s",
        "perf/sample_s",
        "perf/update_s",
        "perf/sync_s",
        "eval/reward_mean",
        "eval/perplexity",
        "eval/accuracy",
    }
    assert required <= set(lines[1]), required - set(lines[1])
    assert all(np.isfinite(v) for k, v in lines[1].items() if isinstance(v, float))
    assert (run / "checkpoints" / "step_000002" / "meta.json").is_file()
    assert last["perf/tokens_per_s"] > 0
    # the driver log: its progress lines land in logs/ even with quiet=True and the default log level
    log = (run / "logs" / "train.log").read_text()
    assert "step 1/2" in log and "step 2/2" in log


def test_each_phase_in_the_driver_process_runs_with_its_own_thread_budget(tmp_path, monkeypatch):
    """rollout.num_workers=0 and ray.learner_workers=0 share one process: sampling runs on rollout.torch_threads and
    the update on ray.learner_threads, each time (the sampler's budget once stayed for every later update)."""
    import torch

    from rlchat.distributed import learner, rollout

    seen: dict[str, list[int]] = {"sample": [], "update": []}

    def spy(cls, name, key):
        real = getattr(cls, name)

        def wrapped(self, *a, **k):
            seen[key].append(torch.get_num_threads())
            return real(self, *a, **k)

        monkeypatch.setattr(cls, name, wrapped)

    spy(rollout.Sampler, "sample", "sample")
    spy(learner.LearnerRank, "update", "update")
    train(_cfg("rollout.torch_threads=1", "ray.learner_threads=2", "ppo.iterations=2"), tmp_path / "run", quiet=True)
    assert seen["sample"] and set(seen["sample"]) == {1}
    assert seen["update"] == [2, 2]


def test_guardrail_stop_ends_the_run_and_is_recorded(tmp_path):
    # an impossible entropy floor trips at once
    cfg = _cfg("ppo.iterations=4", "ppo.min_entropy=1000", "ppo.guardrail_action=stop")
    run, last = train(cfg, tmp_path / "run", quiet=True)
    lines = _lines(run)
    assert len(lines) == 1 and lines[0]["guard/tripped"] == 1.0


def test_guardrail_rollback_restores_the_last_good_checkpoint(tmp_path):
    # k3 KL to the reference is 0 at iteration 1 (nothing trained yet) and positive afterwards: the bound trips from
    # iteration 2 on, and each trip rolls back to the iteration-1 checkpoint with half the learning rate
    cfg = _cfg(
        "ppo.iterations=3",
        "ppo.max_ref_kl=1e-9",
        "ppo.kl_estimator=k3",
        "ppo.kl_in_loss=true",  # k3 only as a loss term (in the reward its gradient is biased)
        "ppo.guardrail_action=rollback",
        "checkpoint.every=1",
    )
    t = _trainer(cfg, tmp_path / "run")
    try:
        t.run()
        lines = _lines(t.run_dir)
        assert [r["guard/tripped"] for r in lines] == [0.0, 1.0, 1.0]
        assert all(np.isfinite(r["ppo/kl_loss"]) for r in lines)  # the KL acts as a loss term here
        assert [r["guard/rollbacks"] for r in lines] == [0.0, 0.0, 1.0]
        assert lines[2]["ppo/lr"] == pytest.approx(lines[0]["ppo/lr"] / 2)
        # after the second rollback (after iteration 3) the optimizer itself is at 1/4, not at 1/2 again
        assert t.rollbacks == 2
        assert _group_lrs(t) == pytest.approx([cfg.ppo.learning_rate / 4])
    finally:
        t.shutdown()
    ckpts = t.run_dir / "checkpoints"
    assert (ckpts / "step_000001").is_dir() and not (ckpts / "step_000002").exists()


class _Crash(Exception):
    pass


def test_resume_restores_guardrail_state_rollbacks_and_lowered_lr(tmp_path, monkeypatch):
    cfg = _cfg("ppo.iterations=3", "checkpoint.every=1", "ppo.eval_every=0")
    lr = cfg.ppo.learning_rate
    first = _trainer(cfg, tmp_path / "run")

    def crash_after_first(it: int, metrics: dict, ckpt: str | None) -> None:
        assert ckpt is not None
        raise _Crash  # the driver dies right after iteration 1's checkpoint

    try:
        # the state two rollbacks and a first iteration of long responses would leave behind
        first.rollbacks = 2
        first.learner.learner.set_learning_rate_scale(0.25)
        first.guard.first_length = 1000.0
        with pytest.raises(_Crash):
            first.run(on_iteration=crash_after_first)
    finally:
        first.shutdown()
    calls: list[tuple[int, int | None]] = []
    format_progress = metrics_module.format_progress

    def spy(step: int, total: int, metrics: dict, elapsed_s: float, done: int | None = None) -> str:
        calls.append((step, done))
        return format_progress(step, total, metrics, elapsed_s, done=done)

    monkeypatch.setattr(metrics_module, "format_progress", spy)  # the driver imports it at run time
    resumed = _trainer(cfg, tmp_path / "run")
    try:
        resumed.run(resume=True)
        assert resumed.guard.first_length == 1000.0  # drift is still judged against iteration 1, not iteration 2
        assert resumed.rollbacks == 2
        assert _group_lrs(resumed) == pytest.approx([lr / 4])
    finally:
        resumed.shutdown()
    lines = {r["step"]: r for r in _lines(resumed.run_dir)}
    assert sorted(lines) == [1, 2, 3]
    assert [lines[s]["guard/rollbacks"] for s in (2, 3)] == [2.0, 2.0]
    assert lines[2]["ppo/lr"] == pytest.approx(lr / 4)
    # the ETA counts the iterations this process ran: 1 at iteration 2, 2 at iteration 3
    assert calls == [(2, 1), (3, 2)]


def test_resuming_a_finished_run_says_so_and_returns_its_last_metrics(tmp_path, capsys):
    """``rlchat train --resume`` of a run at its last iteration printed ``reward nan``: nothing ran, so no metrics.
    Now it says the run is complete and returns the last checkpoint's metrics (as ``rlchat sft --resume`` does)."""
    cfg = _cfg("ppo.iterations=2", "checkpoint.every=1", "ppo.eval_every=0")
    run, last = train(cfg, tmp_path / "run", quiet=True)
    before = _lines(run)
    resumed = _trainer(cfg, run)
    try:
        resumed.quiet = False
        again = resumed.run(resume=True)
    finally:
        resumed.shutdown()
    assert again["rollout/reward_mean"] == pytest.approx(last["rollout/reward_mean"])
    assert "already complete (2/2 iterations)" in capsys.readouterr().out
    assert _lines(run) == before  # nothing re-run, nothing rewound


def test_a_missing_init_checkpoint_fails_before_the_run_directory_is_made(tmp_path):
    """A typo in ``checkpoint.init_from`` was reported only after ``runs/train-*`` (config, logs, an empty
    checkpoints/) had been made: the failed start left a run behind that looks like a real one."""
    from rlchat.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="sft-typo"):
        train(_cfg(f"checkpoint.init_from={tmp_path / 'runs' / 'sft-typo' / 'checkpoints' / 'best'}"),
              tmp_path / "run", quiet=True)  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_overlapped_sampling_is_one_step_off_policy(ray_local, tmp_path):
    cfg = _cfg("ppo.iterations=3", "rollout.num_workers=1", "rollout.overlap=true", "rollout.num_cpus_per_worker=0.5")
    run, _ = train(cfg, tmp_path / "run", quiet=True)
    lines = _lines(run)
    # the first batch is sampled with the initial weights; later ones with the weights of one update earlier
    assert [r["rollout/weights_staleness"] for r in lines] == [0.0, 1.0, 1.0]
    assert all(np.isfinite(r["ppo/policy_loss"]) for r in lines)


class _TaggedRollouts:
    """Rollouts without a model: each batch remembers the weights it was sampled with (``batch.sampled_with``)."""

    def __init__(self) -> None:
        self.weights: object = None

    def _batch(self, weights: object, version: int):
        from rlchat.batch import RolloutBatch

        ones = np.ones((2, 3), dtype=bool)
        batch = RolloutBatch(
            input_ids=np.ones((2, 3), dtype=np.int64),
            attention_mask=ones,
            action_mask=ones,
            behaviour_logprobs=np.zeros((2, 3), np.float32),
            scores=np.zeros((2, 3), np.float32),
            truncated=np.zeros(2, dtype=bool),
            reward_components={"total": np.zeros(2, np.float32)},
            weights_version=version,
        )
        batch.sampled_with = weights
        return batch

    def sample(self, iteration, weights, version, pad_id):
        return self._batch(weights, version)

    def sample_async(self, iteration, weights, version):
        return self._batch(weights, version)  # "in flight" until collect()

    def collect(self, pending, pad_id):
        return pending

    def sync(self, weights, version) -> None:
        self.weights = weights

    def shutdown(self) -> None:
        return None


class _TaggedLearner:
    """A learner whose weights are tags; iteration 4's update trips the ref-KL guardrail."""

    def __init__(self) -> None:
        self.weights_tag, self.version = "init", 0
        self.updates: list[tuple[int, object, object]] = []  # (iteration, weights held, weights that sampled)

    def weights(self):
        return self.weights_tag, self.version

    def update(self, batch, iteration):
        from rlchat import ppo

        self.updates.append((iteration, self.weights_tag, batch.sampled_with))
        self.weights_tag, self.version = f"u{iteration}", self.version + 1
        return {ppo.KL_REF: 5.0 if iteration == 4 else 0.0}, self.weights_tag, self.version

    def save(self, run_dir, step, metrics, driver_state=None):
        self.saved = getattr(self, "saved", {})
        self.saved[f"ckpt{step}"] = (self.weights_tag, self.version)
        return f"ckpt{step}"

    def load(self, path, lr_scale=None):
        tag, version = self.saved[path]
        self.weights_tag = f"load:{tag}"
        self.version = max(version, self.version + 1)
        return self.weights_tag, self.version, {}

    def shutdown(self) -> None:
        return None


def test_overlap_drops_the_batch_sampled_before_a_rollback(tmp_path, monkeypatch):
    # checkpoint at iteration 2; iteration 4 trips and rolls back to it. The batch for iteration 5 was already being
    # sampled (overlap) with iteration 3's weights: it must be dropped, and iteration 5 must learn from a batch of
    # the restored weights -- never from one sampled by a policy the learner no longer holds.
    learner, rollouts = _TaggedLearner(), _TaggedRollouts()
    monkeypatch.setattr("rlchat.learner.make_learner", lambda cfg, run_dir: learner)
    monkeypatch.setattr("rlchat.rollout.make_rollouts", lambda cfg: rollouts)
    monkeypatch.setattr("rlchat.cluster.init_ray", lambda *a, **k: None)
    monkeypatch.setattr(PPOTrainer, "_shared", lambda self, weights, version: (weights, version))
    cfg = _cfg(
        "ppo.iterations=5",
        "rollout.num_workers=1",
        "rollout.overlap=true",
        "ppo.max_ref_kl=1.0",
        "ppo.guardrail_action=rollback",
        "checkpoint.every=2",
        "ppo.eval_every=0",
    )
    t = _trainer(cfg, tmp_path / "run")
    try:
        t.run()
    finally:
        t.shutdown()
    assert t.rollbacks == 1
    held, sampled = {it: h for it, h, _ in learner.updates}, {it: s for it, _, s in learner.updates}
    assert held[5] == "load:u2"
    assert sampled[5] == "load:u2"  # a fresh batch of the restored weights, not the in-flight one of "u3"
    # before the rollback, overlap stays one step off-policy
    assert [sampled[i] for i in (1, 2, 3, 4)] == ["init", "init", "u1", "u2"]
