"""The PPO driver: sample -> update -> sync -> log, each timed (``rlchat train``).

    rlchat train --config configs/demo.yaml [key=value ...] [--run-dir DIR] [--resume RUN_DIR] [--address ADDR]

The driver owns the loop and is the only process that writes metrics; rollout workers and learner ranks return
them. Every random draw of iteration ``i`` derives from ``(seed, i, ...)`` (rollout seeds, minibatch permutations),
so ``--resume`` after a SIGKILL continues step-exactly from the last checkpoint: the next iteration's metrics equal
the uninterrupted run's (tested). A learner rank that dies (SIGKILL, OOM, a lost node) needs no ``--resume``: Ray
Train restarts the learner's worker group (``ray.learner_max_failures`` times at most) and the driver takes the same
path as a resume -- the new learners load the run's last checkpoint and the loop goes back to its iteration.

Guardrails act, not just log: ref-KL above ``ppo.max_ref_kl``, entropy below ``ppo.min_entropy``, response-length
drift above ``ppo.max_length_drift``, n-gram repetition above ``ppo.max_repetition`` or held-out gold reward falling
more than ``ppo.max_gold_drop`` below its best of the last ``ppo.gold_window`` evaluations while the proxy rose (reward
over-optimisation, see :meth:`PPOTrainer.evaluate`) trip them; then, by
``ppo.guardrail_action``, the run warns (once per cause, with the fix), rolls back to the last good checkpoint and
halves the learning rate (``0.5 ** n`` after ``n`` rollbacks), or stops. Every trip is recorded in the metrics
(``guard/*``). The guardrails' reference length and the rollback count are saved with each checkpoint, so a resumed
run keeps measuring drift from the same first iteration and keeps its lowered learning rate. A rollback restores
the checkpoint's weights under a new, larger weights version (versions never go down), and a batch being sampled in
the background (``rollout.overlap``) is dropped: it came from weights the learner no longer holds.

The driver's own lines (progress, resume, rollback, stop) also go to ``RUN_DIR/logs/train.log`` whatever
``--log-level`` is, next to the library's records at that level, so a run directory keeps the story of its run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from rlchat.core import ppo
from rlchat.core.config import Config
from rlchat.core.errors import RLChatError
from rlchat.core.metrics import (
    EVAL_GOLD_REWARD,
    EVAL_PROXY_REWARD,
    EVAL_REWARD_MEAN,
    EVAL_REWARD_PREFIX,
    GUARD_GOLD_DROP,
    GUARD_ROLLBACKS,
    GUARD_TRIPPED,
    PERF_ITER_S,
    PERF_SAMPLE_S,
    PERF_SYNC_S,
    PERF_TOKENS_PER_S,
    PERF_UPDATE_S,
    ROLLOUT_REPETITION,
    ROLLOUT_RESPONSE_LEN,
    ROLLOUT_WEIGHTS_STALENESS,
    gold_drop,
)
from rlchat.core.rewards import GOLD_COMPONENT
from rlchat.distributed import faults
from rlchat.distributed.rollout import batch_metrics

logger = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"

# Learning-rate factor per guardrail rollback: after n rollbacks the run trains at ROLLBACK_LR_FACTOR ** n.
ROLLBACK_LR_FACTOR = 0.5

# Keys of the driver state saved in each checkpoint's train state (see PPOTrainer.driver_state).
_STATE_ROLLBACKS = "rollbacks"
_STATE_GUARDRAILS = "guardrails"


def repetition_rate(batch: Any, n: int = 2) -> float:
    """Fraction of the responses' n-grams that repeat an earlier n-gram of the same response."""
    rep = tot = 0
    for i in range(len(batch)):
        toks = batch.input_ids[i][batch.action_mask[i]].tolist()
        grams = [tuple(toks[j : j + n]) for j in range(len(toks) - n + 1)]
        tot += len(grams)
        rep += len(grams) - len(set(grams))
    return rep / tot if tot else 0.0


class Guardrails:
    """Training-health bounds from the ``ppo`` config; warns once per cause with the fix."""

    FIXES = {
        "ref_kl": "lower ppo.learning_rate or raise ppo.kl_coef (or enable ppo.adaptive_kl)",
        "entropy": "raise ppo.ent_coef or rollout.temperature, or lower ppo.learning_rate",
        "length_drift": "add a length reward (reward.length) or raise ppo.kl_coef",
        "repetition": "add reward.repetition or raise ppo.kl_coef",
        "gold_drop": "the policy over-optimises the reward model: raise ppo.kl_coef, train fewer iterations (stop at "
        "gold's peak, see `rlchat plot`), or improve the reward model (more preference data)",
    }

    def __init__(self, cfg: Config) -> None:
        self.p = cfg.ppo
        self.first_length: float | None = None
        self.eval_points: list[tuple[float, float]] = []  # (eval/proxy_reward, eval/gold_reward) per evaluation
        self.warned: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to judge drift against the same reference: the first iteration's length, and
        the held-out (proxy, gold) points the gold-drop guardrail looks back over.

        (``warned`` is not kept: a resumed process warns once more per cause, which is what a reader of its log
        wants.)"""
        # plain Python numbers: train_state.pt must load with torch.load(weights_only=True)
        return {
            "first_length": float(self.first_length) if self.first_length is not None else None,
            "eval_points": [[float(p), float(g)] for p, g in self.eval_points],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        first = state.get("first_length")
        self.first_length = float(first) if first is not None else None
        self.eval_points = [(float(p), float(g)) for p, g in state.get("eval_points") or []]

    def check(self, metrics: dict[str, float]) -> list[str]:
        """The causes that trip on this iteration's metrics (empty: healthy).

        An iteration with a held-out evaluation (``eval/proxy_reward`` and ``eval/gold_reward`` present) adds its
        point to the gold-drop history and ``guard/gold_drop`` to ``metrics``. A tripping point is dropped from that
        history when the run rolls back (its weights are discarded), so the restored policy is not judged by it.
        """
        p = self.p
        length = metrics.get(ROLLOUT_RESPONSE_LEN, 0.0)
        if self.first_length is None:
            self.first_length = max(length, 1.0)
        tripped = []
        if p.max_ref_kl > 0 and metrics.get(ppo.KL_REF, 0.0) > p.max_ref_kl:
            tripped.append("ref_kl")
        if p.min_entropy > 0 and metrics.get(ppo.ENTROPY, np.inf) < p.min_entropy:
            tripped.append("entropy")
        if p.max_length_drift > 0 and abs(length - self.first_length) / self.first_length > p.max_length_drift:
            tripped.append("length_drift")
        if p.max_repetition > 0 and metrics.get(ROLLOUT_REPETITION, 0.0) > p.max_repetition:
            tripped.append("repetition")
        if EVAL_PROXY_REWARD in metrics and EVAL_GOLD_REWARD in metrics:
            self.eval_points.append((float(metrics[EVAL_PROXY_REWARD]), float(metrics[EVAL_GOLD_REWARD])))
            self.eval_points = self.eval_points[-p.gold_window :]
            drop, proxy_rise = gold_drop(self.eval_points, p.gold_window)
            metrics[GUARD_GOLD_DROP] = drop
            if p.max_gold_drop > 0 and drop > p.max_gold_drop and proxy_rise > 0:
                tripped.append("gold_drop")
                if p.guardrail_action == "rollback":
                    self.eval_points.pop()
        for cause in tripped:
            if cause not in self.warned:
                self.warned.add(cause)
                logger.warning(
                    "guardrail '%s' tripped at %s; fix: %s", cause, _guard_value(cause, metrics), self.FIXES[cause]
                )
        return tripped


def _guard_value(cause: str, m: dict[str, float]) -> str:
    key = {
        "ref_kl": ppo.KL_REF,
        "entropy": ppo.ENTROPY,
        "length_drift": ROLLOUT_RESPONSE_LEN,
        "repetition": ROLLOUT_REPETITION,
        "gold_drop": GUARD_GOLD_DROP,
    }[cause]
    return f"{key}={m.get(key, float('nan')):.4g}"


class PPOTrainer:
    """The driver of one PPO run (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: Path, address: str | None = None, quiet: bool = False) -> None:
        from rlchat.core.tokenizer import ChatTokenizer
        from rlchat.distributed.cluster import init_ray
        from rlchat.distributed.learner import check_ppo_config, make_learner
        from rlchat.distributed.rollout import make_rollouts

        check_ppo_config(cfg)  # before Ray and the workers start
        self.cfg = cfg
        self.run_dir = run_dir
        self.quiet = quiet
        self.log_handler: logging.Handler | None = None  # set by train(): the driver's lines also go there
        if cfg.rollout.num_workers or cfg.ray.learner_workers:
            init_ray(address or cfg.ray.address or None, cfg.ray.num_cpus)
        self.tokenizer = ChatTokenizer.from_config(cfg.tokenizer)
        self.rollouts = make_rollouts(cfg)
        # the fault-injection seam: a proxy around the learner handle when a test armed faults.DRIVER (e.g. the
        # driver dies right after a checkpoint save), else the handle itself
        self.learner = faults.wrap(make_learner(cfg, str(run_dir)), faults.DRIVER)
        self.guard = Guardrails(cfg)
        self.rollbacks = 0
        self._eval_conversations: list[list[dict[str, str]]] | None = None

    # ------------------------------------------------------------------------------------------------ state
    @property
    def lr_scale(self) -> float:
        """The learning-rate factor the rollbacks so far call for."""
        return ROLLBACK_LR_FACTOR**self.rollbacks

    def driver_state(self) -> dict[str, Any]:
        """The driver's resume state, saved in each checkpoint's train state next to the learner's."""
        return {_STATE_ROLLBACKS: int(self.rollbacks), _STATE_GUARDRAILS: self.guard.state_dict()}

    def load_driver_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`driver_state` (checkpoints written before it existed restore nothing)."""
        self.rollbacks = int(state.get(_STATE_ROLLBACKS, 0))
        self.guard.load_state_dict(state.get(_STATE_GUARDRAILS) or {})

    def _eval_set(self) -> list[list[dict[str, str]]]:
        if self._eval_conversations is None:
            from rlchat.core.data import load_records

            records = load_records(self.cfg.data.prompts, split="val", cfg=self.cfg)[: self.cfg.ppo.eval_prompts]
            self._eval_conversations = [
                [dict(m) for m in r.messages] for r in records if any(m["role"] == "assistant" for m in r.messages)
            ]
        return self._eval_conversations

    def evaluate(self, iteration: int, weights_ref: Any, version: int) -> dict[str, float]:
        """Held-out evaluation: greedy reward (+ components) on validation prompts, perplexity/accuracy on
        their reference answers.

        Proxy and gold side by side: ``eval/proxy_reward`` is the training reward (= ``eval/reward_mean``) and
        ``eval/gold_reward`` the task's checked answer (``eval/reward/verifiable``), computed even when the training
        reward leaves it out (weight 0, ``reward.monitor``) as long as the prompts have references. Against
        ``kl/ref_kl`` of the same iteration they give the over-optimisation curve (``rlchat plot``).
        """
        batch = self.rollouts.evaluate(
            iteration, weights_ref, version, self.cfg.ppo.eval_prompts, self.tokenizer.pad_id
        )
        out = {EVAL_PREFIX + k.split("/", 1)[1]: v for k, v in batch_metrics(batch).items()}
        out[EVAL_PROXY_REWARD] = out[EVAL_REWARD_MEAN]
        if EVAL_REWARD_PREFIX + GOLD_COMPONENT in out:
            out[EVAL_GOLD_REWARD] = out[EVAL_REWARD_PREFIX + GOLD_COMPONENT]
        conversations = self._eval_set()
        if conversations:
            out.update({EVAL_PREFIX + k: v for k, v in self.learner.evaluate(conversations).items()})
        return out

    def run(self, resume: bool = False, on_iteration: Any = None) -> dict[str, float]:
        """The loop. ``on_iteration(iteration, metrics, checkpoint_path_or_None)`` is called after each iteration
        (Ray Tune's trainable reports through it)."""
        import ray

        from rlchat.core.checkpoint import CheckpointManager, read_checkpoint
        from rlchat.core.metrics import MetricsWriter, format_progress
        from rlchat.distributed.rank_group import RankGroupRestarted

        cfg, p = self.cfg, self.cfg.ppo
        writer = MetricsWriter(self.run_dir, cfg)
        manager = CheckpointManager.from_config(self.run_dir, cfg, "ppo")
        start = 1
        latest = manager.latest() if resume else None
        if latest is not None:
            # the checkpoint's own LR scale comes back with the learner's state; its driver state with it
            weights_ref, version, start = self._restore(writer, latest)
            if start > p.iterations:  # nothing left to run: the run's result is its last checkpoint's metrics
                self._say(f"the run is already complete ({start - 1}/{p.iterations} iterations): {latest}")
                writer.close()
                return {k: v for k, v in read_checkpoint(latest).metrics.items() if isinstance(v, float)}
            self._say(f"resumed from {latest} (iteration {start - 1})")
        else:
            weights_ref, version = self._shared(*self.learner.weights())
        last_good: str | None = str(manager.latest()) if manager.latest() else None
        t_start = time.perf_counter()
        metrics: dict[str, float] = {}
        pending = None
        it = start
        try:
            while it <= p.iterations:
                try:
                    t0 = time.perf_counter()
                    # 1. sample (or collect the batch sampled during the previous update, when overlapping)
                    if pending is not None:
                        batch = self.rollouts.collect(pending, self.tokenizer.pad_id)
                    else:
                        batch = self.rollouts.sample(it, weights_ref, version, self.tokenizer.pad_id)
                    sample_s = time.perf_counter() - t0
                    staleness = version - batch.weights_version
                    if not 0 <= staleness <= cfg.rollout.max_staleness:
                        raise RLChatError(
                            f"iteration {it}: batch sampled with weights v{batch.weights_version} but the learner is "
                            f"at v{version}; expected a staleness in [0, rollout.max_staleness="
                            f"{cfg.rollout.max_staleness}]"
                        )
                    batch_ref = ray.put(batch) if cfg.ray.learner_workers else batch
                    # 2. update (overlap: start sampling the next batch with the current weights first)
                    pending = (
                        self.rollouts.sample_async(it + 1, weights_ref, version)
                        if cfg.rollout.overlap and it < p.iterations
                        else None
                    )
                    t1 = time.perf_counter()
                    metrics, weights_ref, version = self.learner.update(batch_ref, it)
                    weights_ref, version = self._shared(weights_ref, version)
                    update_s = time.perf_counter() - t1
                    # 3. sync: one ray.put of the new weights (done by the learner); workers load them now
                    t2 = time.perf_counter()
                    if pending is None:
                        self.rollouts.sync(weights_ref, version)
                    sync_s = time.perf_counter() - t2
                    # 4. metrics
                    metrics.update(batch_metrics(batch))
                    metrics[ROLLOUT_REPETITION] = repetition_rate(batch)
                    metrics[ROLLOUT_WEIGHTS_STALENESS] = float(staleness)
                    iter_s = time.perf_counter() - t0
                    metrics.update(
                        {
                            PERF_SAMPLE_S: sample_s,
                            PERF_UPDATE_S: update_s,
                            PERF_SYNC_S: sync_s,
                            PERF_ITER_S: iter_s,
                            PERF_TOKENS_PER_S: batch.num_action_tokens / iter_s,
                        }
                    )
                    if p.eval_every and (it % p.eval_every == 0 or it == p.iterations):
                        metrics.update(self.evaluate(it, weights_ref, version))
                    tripped = self.guard.check(metrics)
                    metrics[GUARD_TRIPPED] = float(len(tripped))
                    metrics[GUARD_ROLLBACKS] = float(self.rollbacks)
                    writer.log(it, metrics)
                    # the ETA from the iterations this process ran (after --resume, fewer than it)
                    elapsed = time.perf_counter() - t_start
                    self._say(format_progress(it, p.iterations, metrics, elapsed, done=it - start + 1))
                    # 5. checkpoint, then act on guardrails
                    due = (cfg.checkpoint.every and it % cfg.checkpoint.every == 0) or it == p.iterations
                    if due and not tripped:
                        last_good = self.learner.save(str(self.run_dir), it, metrics, self.driver_state())
                    if on_iteration is not None:
                        on_iteration(it, metrics, last_good if due and not tripped else None)
                    if tripped and p.guardrail_action == "stop":
                        self._say(f"stopping: guardrail(s) {', '.join(tripped)} tripped (ppo.guardrail_action=stop)")
                        break
                    if tripped and p.guardrail_action == "rollback" and last_good:
                        # the checkpoint's state (and LR scale) is reloaded, then the scale set from the total count,
                        # so the n-th rollback trains at 0.5 ** n, not at half the checkpoint's LR again
                        self.rollbacks += 1
                        weights, version, _ = self.learner.load(last_good, lr_scale=self.lr_scale)
                        weights_ref, version = self._shared(weights, version)
                        # the batch in flight (overlap) was sampled by weights the learner no longer holds: drop it;
                        # the next iteration samples afresh with the restored weights (under a new, larger version)
                        pending = None
                        self.rollouts.sync(weights_ref, version)
                        self._say(
                            f"rolled back to {last_good}; learning rate x{self.lr_scale:g} "
                            f"({self.rollbacks} rollback(s), ppo.guardrail_action=rollback)"
                        )
                except RankGroupRestarted as restart:
                    # a learner rank died and Ray Train restarted the worker group: its fresh learners take the
                    # run's last checkpoint and this loop goes back to that iteration, as --resume would; the batch
                    # in flight (overlap) came from weights that are gone
                    weights_ref, version, it, last_good = self._after_restart(restart, writer, manager, version)
                    pending = None
                    continue
                it += 1
        finally:
            writer.close()
        return metrics

    def _restore(self, writer: Any, latest: Path | None, min_version: int = 0) -> tuple[Any, int, int]:
        """Bring the learner and this driver to the run's checkpoint ``latest`` (None: the initial weights, for a run
        that saved none yet): its weights, learner and driver state, and metrics.jsonl rewound to its iteration.
        ``--resume`` and a restart of the learner's worker group both come here; ``min_version`` keeps weights
        versions above every version the samplers saw.

        Returns:
            (weights as the samplers take them, weights version, the next iteration).
        """
        from rlchat.core.checkpoint import read_checkpoint

        step = read_checkpoint(latest).step if latest is not None else 0
        weights, version, driver_state = self.learner.restore(str(latest) if latest else None, min_version)
        weights_ref, version = self._shared(weights, version)
        self.load_driver_state(driver_state)
        writer.rewind(step)
        return weights_ref, version, step + 1

    def _after_restart(
        self, restart: Exception, writer: Any, manager: Any, version: int
    ) -> tuple[Any, int, int, str | None]:
        """:meth:`_restore` the latest checkpoint into a restarted learner (again if it restarts meanwhile).

        Returns:
            (weights, weights version, the next iteration, the checkpoint restored or None).
        """
        from rlchat.distributed.rank_group import RankGroupRestarted

        while True:
            latest = manager.latest()
            try:
                weights_ref, version, start = self._restore(writer, latest, version + 1)
            except RankGroupRestarted as again:
                restart = again
                continue
            where = str(latest) if latest is not None else "the initial weights"
            incarnation = getattr(restart, "generation", "?")
            self._say(
                f"a learner worker died; Ray Train restarted the learner (incarnation {incarnation}): continuing from "
                f"{where} (iteration {start - 1})"
            )
            return weights_ref, version, start, str(latest) if latest is not None else None

    def _shared(self, weights: Any, version: int) -> tuple[Any, int]:
        """Weights as rollout workers take them: an in-process learner's state dict is put into the object store
        once per version when the samplers are actors (a Ray Train learner already hands over a ref)."""
        import ray

        if self.cfg.rollout.num_workers and not isinstance(weights, ray.ObjectRef):
            weights = ray.put(weights)
        return weights, version

    def shutdown(self) -> None:
        self.learner.shutdown()
        self.rollouts.shutdown()

    def _say(self, line: str) -> None:
        """Print a driver line (unless quiet) and write it to the run's log file (whatever the log level)."""
        if not self.quiet:
            print(line, flush=True)
        if self.log_handler is not None:
            self.log_handler.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, None, None))


def train(
    cfg: Config,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    address: str | None = None,
    quiet: bool = False,
    on_iteration: Any = None,
) -> tuple[Path, dict[str, float]]:
    """Run PPO; returns (run_dir, last iteration's metrics)."""
    from rlchat.core.checkpoint import POLICY_STAGES, read_checkpoint
    from rlchat.core.metrics import attach_log_file, detach_log_file, make_run_dir, write_run_config

    if cfg.checkpoint.init_from and not resume:  # a typo fails here, before a run directory that looks real is made
        read_checkpoint(cfg.checkpoint.init_from, expect_stage=POLICY_STAGES)
    path = make_run_dir(str(run_dir) if run_dir else None, "train")
    if not resume:
        write_run_config(path, cfg)
    if not quiet:
        print(f"run directory: {path.resolve()}", flush=True)
    log_handler = attach_log_file(path, "train")  # RUN_DIR/logs/train.log, appended to on --resume
    try:
        trainer = PPOTrainer(cfg, path, address=address, quiet=quiet)
        trainer.log_handler = log_handler
        try:
            metrics = trainer.run(resume=resume, on_iteration=on_iteration)
        finally:
            trainer.shutdown()
    finally:
        detach_log_file(log_handler)
    return path, metrics
