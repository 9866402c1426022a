"""The rank group of rlchat/rank_group.py and the learner's fault tolerance: a SIGKILLed Ray Train rank.

- The fault hook itself (fast): ``RLCHAT_TEST_RANK_DIE_*`` kills exactly the armed call, once.
- Errors (fast) and typed calls on two real ranks: every-rank and rank-0-only methods, a rank's exception back on
  the driver (the same RLChatError, or a RankError with the rank's traceback), ranks that keep serving.
- A learner rank SIGKILLed in the middle of an update: Ray Train restarts the worker group, the driver restores the
  last checkpoint into the new learners and the run finishes by itself, with the same numbers as an uninterrupted
  run from that checkpoint on.
- A learner rank SIGKILLed in the middle of a checkpoint save, with restarts off (``ray.learner_max_failures=0``):
  the run fails with one clean error, the partial checkpoint is never loaded, and ``--resume`` continues from the
  previous checkpoint, step-exactly.

- The SFT stage on the same group: a rank SIGKILLed in epoch 2 continues from the epoch-1 checkpoint by itself.

The slow tests share the session's local Ray (2 CPUs) and one uninterrupted PPO reference run; models are tiny.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlchat.config import load_config
from rlchat.distributed.faults import (
    DIE_AFTER_S_ENV,
    DIE_CALL_ENV,
    DIE_MARKER_ENV,
    DIE_METHOD_ENV,
    DIE_RANK_ENV,
    DIE_WHEN_EXISTS_ENV,
    fault_from_env,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
ITERATIONS = 3
TINY = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.precision=fp32",
    "env.max_turn_tokens=8",
    "ppo.num_minibatches=2",
    "ppo.update_epochs=2",
    "ppo.eval_every=0",
    f"ppo.iterations={ITERATIONS}",
    "checkpoint.every=1",
    "rollout.num_workers=1",
    "rollout.envs_per_worker=8",
    "rollout.num_cpus_per_worker=0.5",
    "ray.learner_workers=1",
    "ray.learner_cpus=0.5",
]


def _cfg(*extra: str):
    return load_config(DEMO, [*TINY, *extra])


def _metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _assert_same_iteration(a: dict, b: dict) -> None:
    compared = 0
    for key, value in a.items():
        if key in ("time", "step") or key.startswith("perf/") or not isinstance(value, float):
            continue
        assert b[key] == pytest.approx(value, abs=1e-6), key
        compared += 1
    assert compared > 10


def _arm(monkeypatch: pytest.MonkeyPatch, marker: Path, method: str, call: int, **extra: str) -> None:
    monkeypatch.setenv(DIE_METHOD_ENV, method)
    monkeypatch.setenv(DIE_CALL_ENV, str(call))
    monkeypatch.setenv(DIE_MARKER_ENV, str(marker))
    for key, value in extra.items():
        monkeypatch.setenv(key, value)


# ------------------------------------------------------------------------------------------------ the hook


def test_rank_fault_hook_kills_the_armed_call_once(tmp_path: Path) -> None:
    """Unarmed, other ranks and other methods are untouched; the armed call dies (also when it returns before its
    delay: before replying); an existing marker disarms the hook."""
    from rlchat.errors import RLChatError

    marker = tmp_path / "died"
    env = {DIE_METHOD_ENV: "update", DIE_CALL_ENV: "2", DIE_MARKER_ENV: str(marker)}
    assert fault_from_env(0, {}) is None
    assert fault_from_env(1, env) is None  # armed for rank 0
    assert fault_from_env(1, {**env, DIE_RANK_ENV: "1"}) is not None
    with pytest.raises(RLChatError, match=DIE_MARKER_ENV):
        fault_from_env(0, {DIE_METHOD_ENV: "update"})

    def run(hook_env: dict, calls: str) -> subprocess.CompletedProcess:
        code = f"from rlchat.distributed.faults import fault_from_env; f = fault_from_env(0, {hook_env!r}); {calls}"
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)

    calls = (
        "f.before('save'); f.after('save'); f.before('update'); f.after('update'); print('alive', flush=True); "
        "f.before('update'); print('survived', flush=True)"
    )
    out = run(env, calls)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert out.stdout == "alive\n" and marker.exists()
    assert run(env, calls).stdout == "alive\nsurvived\n"  # the marker exists: disarmed

    marker.unlink()
    late = {**env, DIE_CALL_ENV: "1", DIE_AFTER_S_ENV: "30"}  # the call returns long before its delay
    out = run(late, "import time; f.before('update'); print('in the call', flush=True); f.after('update')")
    assert out.returncode == -signal.SIGKILL and out.stdout == "in the call\n" and marker.exists()

    marker.unlink()
    watch = {**env, DIE_CALL_ENV: "1", DIE_WHEN_EXISTS_ENV: str(tmp_path / "partial-*")}
    code = (
        "import pathlib, time; f.before('update'); print('waiting', flush=True); time.sleep(0.3); "
        f"pathlib.Path({str(tmp_path / 'partial-1')!r}).touch(); time.sleep(30); print('survived')"
    )
    out = run(watch, code)
    assert out.returncode == -signal.SIGKILL and out.stdout == "waiting\n" and marker.exists()


def test_remote_errors_come_back_as_the_same_rlchat_error_or_a_rank_error() -> None:
    from rlchat.errors import ConfigError
    from rlchat.rank_group import RankError, _RemoteFailure

    def failure(e: Exception, rank: int, method: str) -> _RemoteFailure:
        try:
            raise e
        except Exception as raised:  # noqa: BLE001 - captured with its traceback
            return _RemoteFailure.capture(raised, rank, method)

    same = failure(ConfigError("ppo.clip_coef=2: expected a value in (0, 1); use 0.1-0.3"), 1, "update").exception("x")
    assert type(same) is ConfigError and str(same) == "ppo.clip_coef=2: expected a value in (0, 1); use 0.1-0.3"
    assert "raise e" in same.remote_traceback  # type: ignore[attr-defined]
    other = failure(ValueError("boom"), 1, "update").exception("learner")
    assert isinstance(other, RankError)
    assert (other.rank, other.method, other.remote_type) == (1, "update", "ValueError")
    assert str(other) == "learner rank 1 failed in update(): ValueError: boom"
    assert "ValueError: boom" in other.remote_traceback and other.__notes__


# ------------------------------------------------------------------------------------------------ real Ray Train ranks


@pytest.fixture(scope="module")
def reference_run(ray_local, tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must reproduce."""
    from rlchat.trainer import train

    run_dir, _ = train(_cfg(), tmp_path_factory.mktemp("reference") / "run", quiet=True)
    return run_dir


@pytest.mark.slow
def test_rank_group_runs_typed_calls_on_every_rank_and_returns_their_errors(ray_local, tmp_path):
    """Two real ranks: a method runs on both (its collective completes) and rank 0's result comes back; a
    rank-0-only method runs on rank 0 alone; one rank's exception comes back with its rank and traceback, and both
    ranks keep serving; a method the learner class lacks fails on the driver."""
    from rlchat.errors import ConfigError
    from rlchat.rank_group import RankError, RankGroup, rank0_only

    class Probe:  # a local class: pickled by value for the workers
        def __init__(self, ctx, offset: int) -> None:
            self.ctx, self.offset, self.calls = ctx, offset, 0

        def rank_sum(self) -> tuple[int, int]:
            import torch
            import torch.distributed as dist

            x = torch.tensor([float(self.ctx.rank)])
            dist.all_reduce(x)
            return self.ctx.rank + self.offset, int(x.item())

        @rank0_only
        def count(self) -> int:
            self.calls += 1
            return self.calls

        def fail(self, rank: int, user_error: bool) -> None:
            if self.ctx.rank == rank:
                raise ConfigError("bad key: fix it") if user_error else ValueError(f"rank {rank} broke")

    cfg = _cfg("ray.learner_workers=2")
    group = RankGroup(Probe, Probe, (100,), cfg=cfg, run_dir=tmp_path, name="probe")
    try:
        assert group.rank_sum() == (100, 1)  # rank 0's result; the all-reduce saw both ranks
        assert [group.count(), group.count()] == [1, 2]
        with pytest.raises(RankError, match="probe rank 1 failed in fail\\(\\): ValueError: rank 1 broke") as err:
            group.fail(1, False)
        assert err.value.rank == 1 and "raise ConfigError" in err.value.remote_traceback
        with pytest.raises(ConfigError, match="^bad key: fix it$"):
            group.fail(0, True)
        assert group.rank_sum() == (100, 1) and group.generation == 0  # still serving, never restarted
        with pytest.raises(AttributeError, match="no learner method 'nope'"):
            group.nope()
    finally:
        group.shutdown()


@pytest.mark.slow
def test_learner_killed_mid_update_is_restarted_from_the_last_checkpoint(reference_run, tmp_path, monkeypatch):
    """Rank 0 dies 0.2 s into the third update (after checkpoint 2): Ray Train restarts the worker group, the driver
    goes back to checkpoint 2 and the run finishes without user action, its iteration 3 equal to the reference's."""
    from rlchat.trainer import train

    marker = tmp_path / "rank-0-died"
    _arm(monkeypatch, marker, "update", ITERATIONS, **{DIE_AFTER_S_ENV: "0.2"})
    run_dir, last = train(_cfg(), tmp_path / "run", quiet=True)
    assert marker.exists()  # the rank did die, inside update() call 3
    log = (run_dir / "logs" / "train.log").read_text()
    assert "Ray Train restarted the learner (incarnation 1)" in log
    assert "step_000002 (iteration 2)" in log  # the loop went back to the last checkpoint
    got, want = _metrics(run_dir), _metrics(reference_run)
    assert sorted(got) == list(range(1, ITERATIONS + 1))  # one history: the lost iteration was logged once
    for it in range(1, ITERATIONS + 1):
        _assert_same_iteration(want[it], got[it])
    assert (run_dir / "checkpoints" / f"step_{ITERATIONS:06d}" / "meta.json").is_file()


@pytest.mark.slow
def test_learner_killed_mid_save_leaves_the_previous_checkpoint_and_resume_continues(
    reference_run, tmp_path, monkeypatch
):
    """Rank 0 dies while it writes checkpoint 2 (its partial directory holds a file) and restarts are off: the run
    fails with one clean error; the partial checkpoint is never 'latest', and --resume continues from checkpoint 1
    to the end with the reference's numbers."""
    from rlchat.checkpoint import CheckpointManager
    from rlchat.rank_group import RankError
    from rlchat.trainer import train

    run = tmp_path / "run"
    marker = tmp_path / "rank-0-died"
    partial = run / "checkpoints" / ".step_000002.partial-*" / "*"
    _arm(monkeypatch, marker, "save", 2, **{DIE_WHEN_EXISTS_ENV: str(partial)})
    cfg = _cfg("ray.learner_max_failures=0")
    with pytest.raises(RankError, match="--resume"):
        train(cfg, run, quiet=True)
    assert marker.exists()
    ckpts = run / "checkpoints"
    assert list(ckpts.glob(".step_000002.partial-*")), sorted(p.name for p in ckpts.iterdir())  # died mid-save
    assert not (ckpts / "step_000002").exists()
    assert CheckpointManager.from_config(run, cfg, "ppo").latest() == ckpts / "step_000001"

    for key in (DIE_METHOD_ENV, DIE_CALL_ENV, DIE_MARKER_ENV, DIE_WHEN_EXISTS_ENV):
        monkeypatch.delenv(key)
    run_dir, _ = train(cfg, run, resume=True, quiet=True)
    assert "resumed from" in (run_dir / "logs" / "train.log").read_text()
    got, want = _metrics(run_dir), _metrics(reference_run)
    assert sorted(got) == list(range(1, ITERATIONS + 1))
    for it in range(1, ITERATIONS + 1):
        _assert_same_iteration(want[it], got[it])


@pytest.mark.slow
def test_sft_worker_killed_in_epoch_2_continues_from_the_epoch_1_checkpoint(ray_local, tmp_path, monkeypatch):
    """The SFT stage on the same rank group: rank 0 dies in the validation that ends epoch 2 (its 3rd, after the
    step-0 and epoch-1 ones; the steps before it are lost with it); the driver restores the epoch-1 checkpoint into
    the restarted worker and the run finishes with an uninterrupted run's numbers (the reference runs in process:
    the very same loop)."""
    from rlchat.data import builtin_path
    from rlchat.metrics import SFT_GRAD_NORM, SFT_LOSS, SFT_LR, SFT_VAL_LOSS
    from rlchat.stages import run_sft

    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(builtin_path("chat").read_text(encoding="utf-8").splitlines()[::6]) + "\n")
    cfg = load_config(
        DEMO,
        [
            "model.n_layer=1",
            "model.n_embd=32",
            "model.n_head=2",
            "model.precision=fp32",
            f"data.sft={chat}",
            "sft.epochs=2",
            "sft.batch_size=16",
            "sft.max_seq_len=128",
            "checkpoint.every=1",
            "ray.learner_workers=1",
            "ray.learner_cpus=1",
            "ray.learner_threads=1",
        ],
    )
    reference, _ = run_sft(cfg, run_dir=tmp_path / "reference", quiet=True, use_ray=False)
    want = _metrics(reference)
    per_epoch = min(s for s, r in want.items() if s > 0 and SFT_VAL_LOSS in r)
    assert max(want) == 2 * per_epoch and per_epoch >= 4
    marker = tmp_path / "rank-0-died"
    _arm(monkeypatch, marker, "validate", 3, **{DIE_AFTER_S_ENV: "0.02"})
    run_dir, _ = run_sft(cfg, run_dir=tmp_path / "killed", quiet=True)
    assert marker.exists()
    log = (run_dir / "logs" / "sft.log").read_text()
    assert f"step_{per_epoch:06d} (step {per_epoch})" in log  # back to the epoch-1 checkpoint, not to the start
    got = _metrics(run_dir)
    assert sorted(got) == sorted(want)  # one history: the steps after the checkpoint were logged once
    for step in want:
        for key in (SFT_LOSS, SFT_GRAD_NORM, SFT_LR, SFT_VAL_LOSS):
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-5), (step, key)
