"""Rollout workers: step ``rollout.envs_per_worker`` chat envs in lock-step with the generation engine.

A :class:`Sampler` (plain Python, no Ray) owns B ``rlchat/Chat-v0`` envs and a policy copy for inference. One
assistant turn of all live envs is one batched KV-cache generation: each generated token is fed to its env with
``env.step`` (O(1)), and a row stops as soon as its env says the turn or the episode ended. Multi-turn episodes
run one such round per assistant turn (the user's next message is appended by the env as observation tokens, and
the next round prefills the whole context again -- one prefill per turn instead of splicing tokens into the cache).

Samplers only act: the :class:`~rlchat.batch.RolloutBatch` they return holds ids, masks, behaviour log-probs of
the chosen tokens, turn-end scores and reward components; values, advantages and reference log-probs are the
learner's job.

Determinism: every random draw of an iteration is seeded from ``(seed, iteration, worker_id, env_index)``, so a
worker that is restarted after a crash re-samples exactly the share it would have produced, and a resumed run
samples the same episodes as an uninterrupted one.

:class:`RolloutWorker` is the Ray actor around a Sampler; :class:`RolloutGroup` runs N of them with Ray's actor
restarts and task retries (a killed worker is restarted, loads the current weights and re-samples its share).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rlchat.batch import RolloutBatch
from rlchat.config import Config
from rlchat.generation import GenerationEngine, SamplingParams
from rlchat.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

# Worker-side metric keys (the driver logs rollout/* from rlchat.metrics; the learner adds ppo/* and kl/*).
SAMPLE_TOKENS = "perf/sample_tokens"
SAMPLE_S = "perf/worker_sample_s"


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (stable across processes, unlike ``hash``)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]
        >> 1
    )


def set_torch_threads(n: int) -> None:
    """Give this process an explicit thread budget (ARCHITECTURE.md: budgets must sum to the cores owned)."""
    if n > 0:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)


class Sampler:
    """B envs + a policy copy -> RolloutBatch. Runs in-process (tests) or inside a :class:`RolloutWorker`.

    Args:
        cfg: the run config (env, reward, rollout, seed sections are used).
        tokenizer: the chat tokenizer shared with the learner.
        model: the policy LM (a ``PolicyValueModel`` or a plain HF causal LM); inference only.
        records: prompt records the envs draw from.
        worker_id: this worker's index (part of every seed).
        reward_fn: optional shared reward callable (default: the env builds ``RewardFunction(cfg.reward)``).
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer: ChatTokenizer,
        model: torch.nn.Module,
        records: Sequence[Any],
        worker_id: int = 0,
        reward_fn: Any = None,
    ) -> None:
        from envs.chat_env import ChatEnv
        from rlchat.rewards import RewardFunction

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.worker_id = worker_id
        self.model = model.eval()
        self.engine = GenerationEngine(model, tokenizer, precision=cfg.model.precision)
        reward_fn = reward_fn if reward_fn is not None else RewardFunction(cfg.reward, tokenizer)
        self.records = list(records)
        self.envs = [
            ChatEnv(records=self.records, tokenizer=tokenizer, config=cfg, reward=reward_fn)
            for _ in range(cfg.rollout.envs_per_worker)
        ]
        self.weights_version = 0

    # ------------------------------------------------------------------------------------------------ weights
    def set_weights(self, state_dict: dict[str, Any], version: int) -> None:
        """Load policy weights (the LM part of the learner's model) tagged with their version."""
        target = getattr(self.model, "lm", self.model)
        missing, unexpected = target.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if "value_head" not in k]:
            raise RuntimeError(
                f"weights do not fit the rollout policy: missing={missing[:5]} unexpected={unexpected[:5]}"
            )
        self.weights_version = version

    # ------------------------------------------------------------------------------------------------ sampling
    def sample(
        self, iteration: int, *, greedy: bool = False, record_indices: Sequence[int] | None = None
    ) -> RolloutBatch:
        """Run one episode in every env (or one per ``record_indices`` entry, for evaluation) and batch them.

        Args:
            iteration: PPO iteration (part of every seed).
            greedy: decode with temperature 0 (held-out evaluation).
            record_indices: start episode i from record ``record_indices[i]`` instead of a random one.
        """
        t0 = time.perf_counter()
        r = self.cfg.rollout
        n = len(record_indices) if record_indices is not None else len(self.envs)
        envs = self.envs
        if n > len(envs):  # evaluation over more prompts than envs: grow the pool once
            from envs.chat_env import ChatEnv

            reward_fn = envs[0].reward_fn
            envs.extend(
                ChatEnv(records=self.records, tokenizer=self.tokenizer, config=self.cfg, reward=reward_fn)
                for _ in range(n - len(envs))
            )
        seeds = [derive_seed(self.cfg.seed, iteration, self.worker_id, i) for i in range(n)]
        lengths = np.zeros(n, dtype=np.int64)
        buffers: list[np.ndarray] = []
        record_index = np.zeros(n, dtype=np.int64)
        for i in range(n):
            options = {"record_index": int(record_indices[i])} if record_indices is not None else None
            obs, info = envs[i].reset(seed=seeds[i], options=options)
            buffers.append(obs["tokens"])
            lengths[i] = int(obs["length"])
            record_index[i] = info["record_index"]

        cap = envs[0].max_context
        action = np.zeros((n, cap), dtype=bool)
        logp = np.zeros((n, cap), dtype=np.float32)
        scores = np.zeros((n, cap), dtype=np.float32)
        truncated = np.zeros(n, dtype=bool)
        done = np.zeros(n, dtype=bool)
        names = list(getattr(envs[0].reward_fn, "component_names", []))
        components: dict[str, np.ndarray] = {k: np.zeros(n, np.float32) for k in [*names, "total"]}
        params = SamplingParams(
            max_new_tokens=self.cfg.env.max_turn_tokens,
            temperature=0.0 if greedy else r.temperature,
            top_k=0 if greedy else r.top_k,
            top_p=1.0 if greedy else r.top_p,
        )
        turn = 0
        while not done.all():
            # 1. one batched generation round over the live envs (one assistant turn each)
            live = np.flatnonzero(~done)
            prompts = [buffers[i][: lengths[i]].tolist() for i in live]
            round_seeds = [derive_seed(seeds[i], turn) for i in live]
            stream = self.engine.steps(prompts, params, seeds=round_seeds)
            turn_open = np.ones(len(live), dtype=bool)
            for step in stream:
                # 2. feed each generated token to its env (O(1) per step)
                finished: list[int] = []
                for j in np.flatnonzero(step.active & turn_open):
                    i = int(live[j])
                    pos = int(lengths[i])
                    obs, reward, term, trunc, info = envs[i].step(int(step.tokens[j]))
                    action[i, pos] = True
                    logp[i, pos] = step.logprobs[j]
                    if "reward_components" in info:  # the turn ended and was scored
                        scores[i, pos] += reward
                        for k, v in info["reward_components"].items():
                            components.setdefault(k, np.zeros(n, np.float32))[i] += v
                        components.setdefault("total", np.zeros(n, np.float32))[i] += reward
                    lengths[i] = int(obs["length"])
                    turn_ended = "response_ids" in info or term or trunc
                    if term or trunc:
                        done[i] = True
                        truncated[i] = trunc
                    if turn_ended:
                        turn_open[j] = False
                        finished.append(j)
                if finished:
                    stream.finish(finished)
            # A row the engine ended without its env ending the turn (cannot happen when the engine's budget is the
            # env's turn budget, but be safe): mark it truncated so the learner bootstraps.
            for j in np.flatnonzero(turn_open):
                i = int(live[j])
                done[i] = True
                truncated[i] = True
            turn += 1

        t = int(lengths.max()) if n else 0
        pad = self.tokenizer.pad_id
        ids = np.full((n, t), pad, dtype=np.int64)
        for i in range(n):
            ids[i, : lengths[i]] = buffers[i][: lengths[i]]
        attention = np.arange(t)[None, :] < lengths[:, None]
        components.setdefault("total", np.zeros(n, np.float32))
        elapsed = time.perf_counter() - t0
        n_actions = int(action.sum())
        return RolloutBatch(
            input_ids=ids,
            attention_mask=attention,
            action_mask=action[:, :t],
            behaviour_logprobs=logp[:, :t],
            scores=scores[:, :t],
            truncated=truncated,
            reward_components=components,
            record_index=record_index,
            weights_version=self.weights_version,
            worker_id=self.worker_id,
            metrics={SAMPLE_TOKENS: float(n_actions), SAMPLE_S: elapsed},
        )

    def responses(self, batch: RolloutBatch) -> list[str]:
        """The decoded assistant text of each episode (for samples in logs and the demo table)."""
        return [
            self.tokenizer.decode(batch.input_ids[i][batch.action_mask[i]], skip_special=True)
            for i in range(len(batch))
        ]


def batch_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Driver-side rollout metrics: reward mean and every component, response length, truncation."""
    from rlchat import metrics as M

    out = {M.ROLLOUT_REWARD_PREFIX + k: float(np.mean(v)) for k, v in batch.reward_components.items() if k != "total"}
    total = batch.reward_components.get("total", batch.episode_rewards)
    out[M.ROLLOUT_REWARD_MEAN] = float(np.mean(total))
    out[M.ROLLOUT_REWARD_STD] = float(np.std(total))
    out[M.ROLLOUT_RESPONSE_LEN] = float(np.mean(batch.response_lengths))
    out[M.ROLLOUT_TRUNCATED_FRAC] = float(np.mean(batch.truncated))
    out[M.ROLLOUT_CONTEXT_LEN] = float(np.mean(batch.attention_mask.sum(axis=1)))
    return out


# ---------------------------------------------------------------------------------------------------- Ray layer


def build_sampler(cfg_dict: dict[str, Any], worker_id: int, split: str = "train") -> Sampler:
    """Build a Sampler from a plain config dict (what travels to Ray actors)."""
    from rlchat.config import from_dict
    from rlchat.data import load_records
    from rlchat.model import PolicyValueModel

    cfg = from_dict(cfg_dict)
    set_torch_threads(cfg.rollout.torch_threads)
    tokenizer = ChatTokenizer.from_config(cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint.init_from:
        from rlchat.checkpoint import load_policy

        model, tokenizer, _ = load_policy(cfg.checkpoint.init_from)
        model = model.lm
    else:
        model = PolicyValueModel.build(cfg, tokenizer).lm
    records = load_records(cfg.data.prompts, split=split, cfg=cfg)
    return Sampler(cfg, tokenizer, model, records, worker_id=worker_id)


class RolloutWorker:
    """Ray actor: a Sampler plus weight sync. Created by :class:`RolloutGroup` with restart/retry options."""

    def __init__(self, cfg_dict: dict[str, Any], worker_id: int) -> None:
        self.sampler = build_sampler(cfg_dict, worker_id)
        self.sampler.weights_version = -1  # the first call always loads the learner's weights
        self.eval_sampler: Sampler | None = None
        self._cfg_dict = cfg_dict

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def _sync(self, weights: list[Any], version: int) -> None:
        # ``weights`` is a one-element list holding an ObjectRef, so Ray does not resolve it for every call:
        # the (large) state dict is fetched only when this worker's version is stale (e.g. right after a restart).
        if version != self.sampler.weights_version:
            import ray

            state = ray.get(weights[0])
            self.sampler.set_weights(state, version)

    def sync(self, weights: list[Any], version: int) -> int:
        self._sync(weights, version)
        return self.sampler.weights_version

    def sample(self, iteration: int, weights: list[Any], version: int) -> RolloutBatch:
        self._sync(weights, version)
        return self.sampler.sample(iteration)

    def evaluate(
        self, iteration: int, weights: list[Any], version: int, n_prompts: int, share: int, shares: int
    ) -> RolloutBatch:
        """Greedy episodes on this worker's share of the first ``n_prompts`` held-out records."""
        self._sync(weights, version)
        if self.eval_sampler is None:
            from rlchat.config import from_dict
            from rlchat.data import load_records

            cfg = from_dict(self._cfg_dict)
            records = load_records(cfg.data.prompts, split="val", cfg=cfg)
            s = self.sampler
            self.eval_sampler = Sampler(cfg, s.tokenizer, s.model, records, worker_id=s.worker_id)
        self.eval_sampler.weights_version = self.sampler.weights_version
        indices = list(range(min(n_prompts, len(self.eval_sampler.records))))[share::shares]
        return self.eval_sampler.sample(iteration, greedy=True, record_indices=indices)


class LocalRollouts:
    """Sampling in the driver process (``rollout.num_workers=0``): same interface as :class:`RolloutGroup`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sampler = build_sampler(cfg.to_dict(), 0)
        self.eval_sampler: Sampler | None = None

    def sync(self, weights: Any, version: int) -> None:
        if version != self.sampler.weights_version:
            self.sampler.set_weights(weights, version)

    def sample(self, iteration: int, weights: Any, version: int, pad_id: int) -> RolloutBatch:
        self.sync(weights, version)
        return self.sampler.sample(iteration)

    def sample_async(self, iteration: int, weights: Any, version: int) -> list[Any]:
        raise RuntimeError("rollout.overlap needs rollout.num_workers >= 1 (a sampler in another process)")

    def evaluate(self, iteration: int, weights: Any, version: int, n_prompts: int, pad_id: int) -> RolloutBatch:
        from rlchat.data import load_records

        self.sync(weights, version)
        if self.eval_sampler is None:
            records = load_records(self.cfg.data.prompts, split="val", cfg=self.cfg)
            s = self.sampler
            self.eval_sampler = Sampler(self.cfg, s.tokenizer, s.model, records, worker_id=0)
        self.eval_sampler.weights_version = self.sampler.weights_version
        n = min(n_prompts, len(self.eval_sampler.records))
        return self.eval_sampler.sample(iteration, greedy=True, record_indices=list(range(n)))

    def pids(self) -> list[int]:
        return [os.getpid()]

    def shutdown(self) -> None:
        return None


def make_rollouts(cfg: Config) -> RolloutGroup | LocalRollouts:
    """Rollout worker actors, or in-process sampling when ``rollout.num_workers == 0``."""
    return LocalRollouts(cfg) if cfg.rollout.num_workers == 0 else RolloutGroup(cfg)


class RolloutGroup:
    """N RolloutWorker actors with fault tolerance (Ray actor restarts + task retries).

    A worker whose process dies mid-iteration is restarted by Ray (``max_restarts``) and its pending ``sample`` call
    is retried (``max_task_retries``) on the new process, which rebuilds the policy, fetches the current weights and
    -- because seeds depend only on (seed, iteration, worker, env) -- re-samples exactly its share. Other workers'
    results are untouched, so nothing is lost or duplicated.
    """

    def __init__(self, cfg: Config) -> None:
        import ray

        from rlchat.cluster import rollout_actor_options

        self.cfg = cfg
        options = rollout_actor_options(cfg)
        actor_cls = ray.remote(RolloutWorker).options(
            max_restarts=cfg.rollout.max_restarts,
            max_task_retries=cfg.rollout.max_restarts,
            **options,
        )
        cfg_dict = cfg.to_dict()
        self.workers = [actor_cls.remote(cfg_dict, i) for i in range(cfg.rollout.num_workers)]

    def sample(self, iteration: int, weights_ref: Any, version: int, pad_id: int) -> RolloutBatch:
        import ray

        refs = [w.sample.remote(iteration, [weights_ref], version) for w in self.workers]
        batches = ray.get(refs)
        return RolloutBatch.concat(batches, pad_id=pad_id)

    def sync(self, weights_ref: Any, version: int) -> None:
        """Every worker loads the new weights now (the ``perf/sync_s`` part of an iteration)."""
        import ray

        ray.get([w.sync.remote([weights_ref], version) for w in self.workers])

    def sample_async(self, iteration: int, weights_ref: Any, version: int) -> list[Any]:
        return [w.sample.remote(iteration, [weights_ref], version) for w in self.workers]

    def evaluate(self, iteration: int, weights_ref: Any, version: int, n_prompts: int, pad_id: int) -> RolloutBatch:
        """Greedy held-out episodes, the first ``n_prompts`` validation records split over the workers."""
        import ray

        k = len(self.workers)
        refs = [
            w.evaluate.remote(iteration, [weights_ref], version, n_prompts, i, k) for i, w in enumerate(self.workers)
        ]
        return RolloutBatch.concat([b for b in ray.get(refs) if len(b)], pad_id=pad_id)

    def pids(self) -> list[int]:
        import ray

        return ray.get([w.pid.remote() for w in self.workers])

    def node_ids(self) -> list[str]:
        import ray

        return ray.get([w.node_id.remote() for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
