"""Rollout workers: step ``rollout.envs_per_worker`` chat envs in lock-step with the generation engine.

A :class:`Sampler` (plain Python, no Ray) owns B ``rlchat/Chat-v0`` envs and a policy copy for inference. One
assistant turn of all live envs is one batched KV-cache generation: each generated token is fed to its env with
``env.step`` (O(1)), and a row stops as soon as its env says the turn or the episode ended. Multi-turn episodes
run one such round per assistant turn (the user's next message is appended by the env as observation tokens, and
the next round prefills the whole context again -- one prefill per turn instead of splicing tokens into the cache).

Samplers only act: the :class:`~rlchat.core.batch.RolloutBatch` they return holds ids, masks, behaviour log-probs of
the chosen tokens, turn-end scores and reward components; values, advantages and reference log-probs are the
learner's job.

Rewards are scored per batch, not per env: the envs are built with ``defer_reward=True``, so a finished turn only
records its reward inputs, and after the last round the sampler calls ``RewardFunction.score_batch`` once on every
finished turn of the call (a turn cut by a limit included, plus its ``reward.truncation_penalty``, as in the env;
only a multi-turn context cut stays unscored and is bootstrapped). That makes the across-batch
component ``diversity_batch`` real (each reply is compared with all other replies this worker sampled in the call;
a standalone env, scoring one reply at a time, always gives 0) and runs model-backed components (reward model,
sentence encoder, safety classifier) one forward per batch. A reward callable without ``score_batch`` is still
called by each env per turn.

Device: a worker that Ray gave GPU ids (``rollout.num_gpus_per_worker > 0``) samples on ``cuda`` when torch sees
CUDA (:func:`pick_device`); the policy is moved there and the engine allocates its KV cache and sampling buffers on
the policy's device. Everything else samples on CPU.

Determinism: every random draw of an iteration is seeded from ``(seed, iteration, worker_id, env_index)``, so a
worker that is restarted after a crash re-samples exactly the share it would have produced, and a resumed run
samples the same episodes as an uninterrupted one.

:class:`RolloutWorker` is the Ray actor around a Sampler; :class:`RolloutGroup` runs N of them with Ray's actor
restarts and task retries (a killed worker is restarted, loads the current weights and re-samples its share).
A restarted worker says so in its next batch (``rollout/worker_restarts``). Tests kill a worker inside a ``sample``
call with ``RLCHAT_TEST_WORKER_DIE_*`` (:mod:`rlchat.distributed.faults`, wrapped around the actor class; the
Sampler's loop knows nothing of it).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rlchat.core.batch import RolloutBatch
from rlchat.core.config import Config
from rlchat.core.generation import GenerationEngine, SamplingParams
from rlchat.core.tokenizer import ChatTokenizer
from rlchat.distributed import faults

logger = logging.getLogger(__name__)

# Worker-side metric keys (the driver logs rollout/* from rlchat.core.metrics; the learner adds ppo/* and kl/*).
SAMPLE_TOKENS = "perf/sample_tokens"
SAMPLE_S = "perf/worker_sample_s"
CUT_EPISODES = "rollout/cut_episodes"
"""In ``RolloutBatch.metrics``: episodes that ended at ``env.max_turn_tokens`` or ``env.max_context`` (summed by
concat). Their share is logged as :data:`rlchat.core.metrics.ROLLOUT_TRUNCATED_FRAC`; ``RolloutBatch.truncated`` marks
only the bootstrapped ones (a multi-turn context cut)."""
WORKER_RESTARTS = "perf/worker_restarts"
"""In ``RolloutBatch.metrics``: 1 in the first batch a restarted worker process returns, else 0 (summed by concat).
The driver logs the sum as :data:`rlchat.core.metrics.ROLLOUT_WORKER_RESTARTS`."""

GROUP_SEED = 0x6A09E667
"""Seed part of the per-group record draws (keeps them apart from the envs' own seeds)."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (stable across processes, unlike ``hash``)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]
        >> 1
    )


def pick_device(gpu_ids: Sequence[Any], cuda_available: bool) -> torch.device:
    """The device a rollout worker samples on: ``cuda`` when Ray assigned it GPUs and torch can use CUDA, else CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the worker's assigned GPUs, so the first visible device (``cuda:0``) is the
    one reserved for it. Ray ids without CUDA (a CPU-only torch build) fall back to CPU; the worker warns.

    Args:
        gpu_ids: ``ray.get_gpu_ids()`` of the worker (empty without ``rollout.num_gpus_per_worker``).
        cuda_available: ``torch.cuda.is_available()``.
    """
    return torch.device("cuda", 0) if len(gpu_ids) > 0 and cuda_available else torch.device("cpu")


def set_torch_threads(n: int) -> None:
    """Give this process an explicit thread budget (docs/ARCHITECTURE.md "Threads": budgets sum to the cores owned)."""
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
        reward_fn: optional shared reward callable (default: ``RewardFunction(cfg.reward)``). With a
            ``score_batch`` method, every turn of a ``sample`` call is scored in one batch (see the module docstring).
        device: where the policy samples (default: where ``model`` already is); the model is moved there.
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer: ChatTokenizer,
        model: torch.nn.Module,
        records: Sequence[Any],
        worker_id: int = 0,
        reward_fn: Any = None,
        device: torch.device | str | None = None,
    ) -> None:
        from rlchat.core.rewards import RewardFunction

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.worker_id = worker_id
        first = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (first.device if first is not None else None)
        # The engine allocates its KV cache and sampling buffers on the model's device, so moving the model moves them.
        self.model = (model.to(self.device) if self.device is not None else model).eval()
        self.engine = GenerationEngine(self.model, tokenizer, precision=cfg.model.precision)
        self.reward_fn = reward_fn if reward_fn is not None else RewardFunction(cfg.reward, tokenizer)
        # Defer scoring to one score_batch call per sample() when the reward can take a batch (diversity_batch).
        self.batch_scoring = callable(getattr(self.reward_fn, "score_batch", None))
        self.records = list(records)
        self.envs: list[Any] = []
        self._grow_envs(cfg.rollout.envs_per_worker)
        self.weights_version = 0

    def _grow_envs(self, n: int) -> None:
        """Have at least ``n`` envs (evaluation over more prompts than envs grows the pool once)."""
        from envs.chat_env import ChatEnv

        self.envs.extend(
            ChatEnv(
                records=self.records,
                tokenizer=self.tokenizer,
                config=self.cfg,
                reward=self.reward_fn,
                defer_reward=self.batch_scoring,
            )
            for _ in range(n - len(self.envs))
        )

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
        from envs.chat_env import INFO_PENDING_TURN, INFO_REWARD_COMPONENTS, PendingTurn

        n = len(record_indices) if record_indices is not None else len(self.envs)
        self._grow_envs(n)
        envs = self.envs
        seeds = [derive_seed(self.cfg.seed, iteration, self.worker_id, i) for i in range(n)]
        lengths = np.zeros(n, dtype=np.int64)
        buffers: list[np.ndarray] = []
        record_index = np.zeros(n, dtype=np.int64)
        g = self.cfg.rollout.samples_per_prompt
        if record_indices is None and g > 1 and not greedy:
            # groups of g consecutive envs answer one prompt (GRPO / RLOO baselines); the group's record is drawn
            # from its own seed, so it is as reproducible as every other draw of the iteration
            n_records = len(envs[0].records)
            record_indices = [
                int(np.random.default_rng(derive_seed(self.cfg.seed, iteration, self.worker_id, GROUP_SEED, i // g))
                    .integers(n_records))
                for i in range(n)
            ]  # fmt: skip
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
        truncated = np.zeros(n, dtype=bool)  # bootstrapped by the learner (env truncated: a multi-turn context cut)
        cut = np.zeros(n, dtype=bool)  # ended at a limit (scored and terminal, or truncated)
        done = np.zeros(n, dtype=bool)
        names = list(getattr(self.reward_fn, "component_names", []))
        components: dict[str, np.ndarray] = {k: np.zeros(n, np.float32) for k in [*names, "total"]}
        pending: list[tuple[int, int, PendingTurn]] = []  # (env, position of the turn's last token, reward inputs)
        n_steps = 0
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
                n_steps += 1
                # 2. feed each generated token to its env (O(1) per step)
                finished: list[int] = []
                for j in np.flatnonzero(step.active & turn_open):
                    i = int(live[j])
                    pos = int(lengths[i])
                    obs, reward, term, trunc, info = envs[i].step(int(step.tokens[j]))
                    action[i, pos] = True
                    logp[i, pos] = step.logprobs[j]
                    if INFO_PENDING_TURN in info:  # the turn ended; scored with the whole batch in step 4
                        pending.append((i, pos, info[INFO_PENDING_TURN]))
                    elif INFO_REWARD_COMPONENTS in info:  # the turn ended and the env scored it (no score_batch)
                        scores[i, pos] += reward
                        for k, v in info[INFO_REWARD_COMPONENTS].items():
                            components.setdefault(k, np.zeros(n, np.float32))[i] += v
                        components.setdefault("total", np.zeros(n, np.float32))[i] += reward
                    lengths[i] = int(obs["length"])
                    turn_ended = "response_ids" in info or term or trunc
                    if term or trunc:
                        done[i] = True
                        truncated[i] = trunc
                        cut[i] = "truncated_by" in info
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
                truncated[i] = cut[i] = True
            turn += 1

        # 4. score every finished turn of the call in one batch (batch diversity, one forward per reward model)
        self._score_pending(pending, scores, components, n)

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
            metrics={SAMPLE_TOKENS: float(n_actions), SAMPLE_S: elapsed, CUT_EPISODES: float(cut.sum())},
        )

    def _score_pending(
        self,
        pending: Sequence[tuple[int, int, Any]],
        scores: np.ndarray,
        components: dict[str, np.ndarray],
        n: int,
    ) -> None:
        """Score deferred turns with one ``score_batch`` call; add each total at its turn's last token.

        Args:
            pending: (env index, position of the turn's last token, PendingTurn) per finished turn; a turn cut by a
                limit adds its ``PendingTurn.penalty`` to the scored total.
            scores: (n, C) float32 turn rewards, updated in place.
            components: name -> (n,) float32 episode sums of each component (``total`` included), updated in place.
            n: episodes in the batch.
        """
        if not pending:
            return
        turns = [p for _, _, p in pending]
        results = self.reward_fn.score_batch(
            [t.prompt_messages for t in turns],
            [t.response_text for t in turns],
            [t.response_ids for t in turns],
            [t.record for t in turns],
        )
        for (i, pos, turn), res in zip(pending, results):
            total = res.total + turn.penalty
            scores[i, pos] += total
            for k, v in res.components.items():
                components.setdefault(k, np.zeros(n, np.float32))[i] += v
            components.setdefault("total", np.zeros(n, np.float32))[i] += total

    def responses(self, batch: RolloutBatch) -> list[str]:
        """The decoded assistant text of each episode (for samples in logs and the demo table)."""
        return [
            self.tokenizer.decode(batch.input_ids[i][batch.action_mask[i]], skip_special=True)
            for i in range(len(batch))
        ]


def batch_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Driver-side rollout metrics (keys from :mod:`rlchat.core.metrics`): reward mean / std and every component,
    response and context length, truncation, episodes and worker restarts."""
    from rlchat.core import metrics as M

    out = {M.ROLLOUT_REWARD_PREFIX + k: float(np.mean(v)) for k, v in batch.reward_components.items() if k != "total"}
    total = batch.reward_components.get("total", batch.episode_rewards)
    out[M.ROLLOUT_REWARD_MEAN] = float(np.mean(total))
    out[M.ROLLOUT_REWARD_STD] = float(np.std(total))
    out[M.ROLLOUT_RESPONSE_LEN] = float(np.mean(batch.response_lengths))
    cut = batch.metrics.get(CUT_EPISODES)  # batches built elsewhere (tests) have only the bootstrap flags
    out[M.ROLLOUT_TRUNCATED_FRAC] = float(cut / max(len(batch), 1) if cut is not None else np.mean(batch.truncated))
    out[M.ROLLOUT_CONTEXT_LEN] = float(np.mean(batch.attention_mask.sum(axis=1)))
    out[M.ROLLOUT_EPISODES] = float(len(batch))
    if WORKER_RESTARTS in batch.metrics:  # batches from RolloutWorker actors (in-process sampling cannot restart)
        out[M.ROLLOUT_WORKER_RESTARTS] = float(batch.metrics[WORKER_RESTARTS])
    return out


# ---------------------------------------------------------------------------------------------------- Ray layer


def rollout_thread_budget(cfg: Config) -> int:
    """Torch threads of one rollout worker's sampling (``rollout.torch_threads``; 0 = auto, see
    :func:`rlchat.distributed.cluster.torch_thread_budget`)."""
    from rlchat.distributed.cluster import node_cpus, rollout_workers_per_node, torch_thread_budget

    r = cfg.rollout
    return torch_thread_budget(
        r.torch_threads, r.num_cpus_per_worker, rollout_workers_per_node(cfg, node_cpus()), r.overlap
    )


def build_sampler(
    cfg_dict: dict[str, Any], worker_id: int, split: str = "train", device: torch.device | str = "cpu"
) -> Sampler:
    """Build a Sampler from a plain config dict (what travels to Ray actors), its policy on ``device``."""
    from rlchat.core.config import from_dict
    from rlchat.core.data import load_records
    from rlchat.core.model import PolicyValueModel

    cfg = from_dict(cfg_dict)
    set_torch_threads(rollout_thread_budget(cfg))
    tokenizer = ChatTokenizer.from_config(cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint.init_from:
        from rlchat.core.checkpoint import load_policy

        model, tokenizer, _ = load_policy(cfg.checkpoint.init_from)
        model = model.lm
    else:
        model = PolicyValueModel.build(cfg, tokenizer).lm
    records = load_records(cfg.data.prompts, split=split, cfg=cfg)
    return Sampler(cfg, tokenizer, model, records, worker_id=worker_id, device=device)


class RolloutWorker:
    """Ray actor: a Sampler plus weight sync. Created by :class:`RolloutGroup` with restart/retry options."""

    def __init__(self, cfg_dict: dict[str, Any], worker_id: int) -> None:
        import ray

        self.device = pick_device(ray.get_gpu_ids(), torch.cuda.is_available())
        gpus = float(cfg_dict.get("rollout", {}).get("num_gpus_per_worker", 0.0))
        if gpus > 0 and self.device.type != "cuda":
            logger.warning(
                "rollout worker %d: rollout.num_gpus_per_worker=%s reserved a GPU (ray ids %s) but torch cannot use "
                "CUDA here (torch.cuda.is_available()=%s), so it samples on CPU; install a CUDA build of torch on "
                "the rollout nodes, or set rollout.num_gpus_per_worker=0 to silence this",
                worker_id,
                gpus,
                ray.get_gpu_ids(),
                torch.cuda.is_available(),
            )
        self.sampler = build_sampler(cfg_dict, worker_id, device=self.device)
        self.sampler.weights_version = -1  # the first call always loads the learner's weights
        self.eval_sampler: Sampler | None = None
        self._cfg_dict = cfg_dict
        # Ray re-runs __init__ in the new process after a crash; the next sampled batch reports the restart once.
        # (The property itself reads Ray's deprecated ``actor_id``; its RayDeprecationWarning is Ray's, not ours.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._restart_unreported = bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def pid(self) -> int:
        return os.getpid()

    def device_name(self) -> str:
        """Where this worker's policy lives (``cpu`` / ``cuda:0``): the device checks of the tests read it."""
        return str(next(self.sampler.model.parameters()).device)

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
        batch = self.sampler.sample(iteration)
        batch.metrics[WORKER_RESTARTS] = float(self._restart_unreported)
        self._restart_unreported = False
        return batch

    def evaluate(
        self, iteration: int, weights: list[Any], version: int, n_prompts: int, share: int, shares: int
    ) -> RolloutBatch:
        """Greedy episodes on this worker's share of the first ``n_prompts`` held-out records."""
        self._sync(weights, version)
        if self.eval_sampler is None:
            from rlchat.core.config import from_dict
            from rlchat.core.data import load_records

            cfg = from_dict(self._cfg_dict)
            records = load_records(cfg.data.prompts, split="val", cfg=cfg)
            s = self.sampler
            self.eval_sampler = Sampler(
                cfg, s.tokenizer, s.model, records, worker_id=s.worker_id, reward_fn=s.reward_fn, device=s.device
            )
        self.eval_sampler.weights_version = self.sampler.weights_version
        indices = list(range(min(n_prompts, len(self.eval_sampler.records))))[share::shares]
        return self.eval_sampler.sample(iteration, greedy=True, record_indices=indices)


class LocalRollouts:
    """Sampling in the driver process (``rollout.num_workers=0``): same interface as :class:`RolloutGroup`.

    Samples on CPU: the driver has no Ray GPU assignment (a GPU learner in the driver keeps its GPU to itself).
    The driver process also runs the in-process learner (``ray.learner_workers=0``), whose budget differs, so
    each sampling call sets this phase's thread budget again.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sampler = build_sampler(cfg.to_dict(), 0)
        self.eval_sampler: Sampler | None = None
        self.threads = rollout_thread_budget(cfg)

    def sync(self, weights: Any, version: int) -> None:
        if version != self.sampler.weights_version:
            self.sampler.set_weights(weights, version)

    def sample(self, iteration: int, weights: Any, version: int, pad_id: int) -> RolloutBatch:
        self.sync(weights, version)
        set_torch_threads(self.threads)
        return self.sampler.sample(iteration)

    def sample_async(self, iteration: int, weights: Any, version: int) -> list[Any]:
        raise RuntimeError("rollout.overlap needs rollout.num_workers >= 1 (a sampler in another process)")

    def evaluate(self, iteration: int, weights: Any, version: int, n_prompts: int, pad_id: int) -> RolloutBatch:
        from rlchat.core.data import load_records

        self.sync(weights, version)
        if self.eval_sampler is None:
            records = load_records(self.cfg.data.prompts, split="val", cfg=self.cfg)
            s = self.sampler
            self.eval_sampler = Sampler(self.cfg, s.tokenizer, s.model, records, worker_id=0, reward_fn=s.reward_fn)
        self.eval_sampler.weights_version = self.sampler.weights_version
        n = min(n_prompts, len(self.eval_sampler.records))
        set_torch_threads(self.threads)
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
    results are untouched, so nothing is lost or duplicated. Variables ``RLCHAT_TEST_*`` of the driver's environment
    are passed to the actors (``runtime_env.env_vars``) so tests can arm worker-side hooks.
    """

    def __init__(self, cfg: Config) -> None:
        import ray

        from rlchat.distributed.cluster import rollout_actor_options

        self.cfg = cfg
        options: dict[str, Any] = dict(rollout_actor_options(cfg))
        test_env = faults.forwarded_env()
        if test_env:
            runtime_env = dict(options.get("runtime_env") or {})
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **test_env}
            options["runtime_env"] = runtime_env
        # the fault-injection seam: RolloutWorker itself unless a test armed RLCHAT_TEST_WORKER_DIE_* (faults.WORKER)
        worker_cls = faults.actor_class(RolloutWorker, faults.WORKER, lambda w: w.sampler.worker_id)
        actor_cls = ray.remote(worker_cls).options(
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
        """Start sampling on every worker; :meth:`collect` waits for the result (overlapped sampling)."""
        return [w.sample.remote(iteration, [weights_ref], version) for w in self.workers]

    def collect(self, pending: list[Any], pad_id: int) -> RolloutBatch:
        """The batch of a :meth:`sample_async` call, merged over the workers."""
        import ray

        return RolloutBatch.concat(ray.get(pending), pad_id=pad_id)

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
