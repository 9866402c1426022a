"""The central PPO learner: one :class:`Learner` per data-parallel rank, run by Ray Train.

Why our own learner instead of RLlib's PPO (measured: docs/ppo.md "rlchat vs RLlib's PPO", bench/rllib_compare.py):
RLlib's learner works per timestep -- it forwards the whole context once per generated token, ships full logits per
step and takes its KL to the previous policy, not to a frozen reference; on the same env and model on a 2-core CPU
its stock PPO took 16x (16-token replies) to 33x (112 tokens) longer per env step than this learner. Here one
causal forward per sequence gives log-probs, entropy and values at every position, and all PPO maths lives in
:mod:`rlchat.ppo` as pure functions. Ray Train still owns what it is good at: the worker group, its placement
group (so rollouts cannot starve the learner), device placement and the DDP process group.

Data-parallel layout (exactly equal to one worker on the same batch; tested):

1. every rank receives the whole :class:`~rlchat.batch.RolloutBatch` (one object-store read each);
2. rank r runs the no-grad passes (old log-probs, values, reference log-probs) on rows ``r::world`` and the
   results are all-gathered, so every rank holds identical batch-wide targets (KL-shaped rewards, GAE, whitening);
3. each minibatch is a slice of one global permutation (seeded by seed, iteration, epoch); rank r trains on its rows
   ``r::world`` with the loss normalised by the *global* minibatch token count, so DDP's gradient average equals
   the single-worker gradient;
4. early stop uses the token-weighted global approx-KL.

Deviations from a textbook PPO step, and why:

- Log-probs, entropy and the reference's log-probs are those of the distribution the rollouts sampled from: the
  LM's logits divided by ``rollout.temperature`` (as TRL's PPO trainer does), via
  ``PolicyValueModel.forward(..., temperature=...)``. The generation engine records behaviour log-probs after
  temperature, so only then do the ratio's numerator and its denominator (the behaviour log-probs, with overlapped
  sampling) describe the same policy. Top-k / top-p truncation cannot be reproduced from a full-vocabulary
  softmax; config validation rejects it for PPO.
- Every PPO forward runs with dropout off (the model in eval mode), like TRL's ``disable_dropout``: the rollouts
  sample in eval mode, so a dropout mask in the learner would make the ratio differ from 1 before any update and
  the old log-probs (no-grad pass) disagree with the gradient pass. ``model.dropout > 0`` is refused for PPO
  (:func:`check_ppo_config`) rather than silently ignored.

:class:`LearnerGroup` is the driver's handle: a ``TorchTrainer`` whose workers serve commands (update, weights,
save, eval) from Ray queues, so the driver keeps the loop -- sample -> update -> sync -> log -- and Ray Train is
started once per run, not once per step (its start-up costs ~17 s on 2 cores).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from rlchat import ppo
from rlchat.batch import RolloutBatch
from rlchat.config import Config, check_context_limits
from rlchat.errors import ConfigError, RLChatError
from rlchat.metrics import PPO_BEHAVIOUR_LOGPROB_MAXDIFF as BEHAVIOUR_DIFF
from rlchat.metrics import PPO_EARLY_STOPPED as EARLY_STOPPED
from rlchat.metrics import PPO_EPOCHS_RUN as EPOCHS_RUN
from rlchat.metrics import PPO_GRAD_NORM as GRAD_NORM
from rlchat.metrics import PPO_LR as LR
from rlchat.model import PolicyLM, PolicyValueModel

logger = logging.getLogger(__name__)


def _derive_seed(*parts: int) -> int:
    from rlchat.rollout import derive_seed

    return derive_seed(*parts)


def check_ppo_config(cfg: Config) -> None:
    """Refuse settings the PPO learner cannot honour (called by the learner and, before Ray starts, the driver).

    Raises:
        CheckpointError: ``checkpoint.init_from`` is not a policy checkpoint (message with the fix).
        ConfigError: ``model.dropout > 0``. The learner runs every forward with dropout off so that its log-probs
            equal the (eval-mode) rollouts' and the old log-probs equal the gradient pass's at the start of an
            update; a dropout the user asked for would be silently ignored, so it is refused instead. Also an
            ``env.max_context`` beyond the policy's positions (:func:`rlchat.config.check_context_limits`).
    """
    if cfg.model.dropout > 0:
        raise ConfigError(
            f"model.dropout={cfg.model.dropout!r}: expected 0 for PPO (rlchat train); the learner runs with dropout "
            "off so its log-probs match the rollouts' and the PPO ratio is exactly 1 before the first step. Fix: set "
            "model.dropout=0 for the PPO run (dropout in SFT / reward-model training is fine)"
        )
    model_dir = None
    if cfg.checkpoint.init_from:
        # Checked here, before any worker starts, so a wrong path is one clear line instead of a worker traceback.
        from rlchat.checkpoint import POLICY_STAGES, read_checkpoint

        model_dir = read_checkpoint(cfg.checkpoint.init_from, expect_stage=POLICY_STAGES).path
    check_context_limits(cfg, model_dir)


ADAM_EPS = 1e-8
"""AdamW's eps (docs/ppo.md row 20): PyTorch's and TRL's default, not cleanrl's 1e-5. Per-parameter gradients of an
LM after norm clipping are ~1e-4 to 1e-5 (1 / sqrt(parameters)), so an eps of 1e-5 would shrink their Adam steps
by 10-50%, a hidden learning-rate cut that grows with the model."""


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (eps :data:`ADAM_EPS`), fused where torch supports it (measured: ~5% off a CPU PPO step)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=ADAM_EPS, fused=True)
    except (RuntimeError, TypeError):  # device / dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=ADAM_EPS, foreach=True)


class Learner:
    """One rank of the PPO learner (plain torch; no Ray).

    Args:
        cfg: the run config (``ppo`` section, ``seed``).
        policy: the trainable policy + value model (already on ``device``).
        ref: the frozen reference policy (its LM only, :meth:`PolicyLM.frozen_copy`), or None without a KL
            penalty.
        rank, world: data-parallel coordinates (``torch.distributed`` must be initialised when world > 1).
        ddp: the DDP-wrapped policy used for the gradient forward (None: ``policy`` itself).

    Raises:
        ConfigError: a setting PPO cannot honour (:func:`check_ppo_config`).
    """

    def __init__(
        self,
        cfg: Config,
        policy: PolicyValueModel,
        ref: PolicyLM | None,
        rank: int = 0,
        world: int = 1,
        ddp: nn.Module | None = None,
    ) -> None:
        check_ppo_config(cfg)
        self.cfg = cfg
        self.p = cfg.ppo
        self.policy = policy
        self.ref = ref
        self.rank, self.world = rank, world
        # every log-prob is taken at the rollout temperature (module docstring); the reference's too, so the KL
        # penalty compares the two distributions the samples could have come from. DDP passes forward kwargs on.
        self.temperature = float(cfg.rollout.temperature)
        self.train_module = ddp if ddp is not None else policy
        self.device = policy.device
        self.params = [q for q in policy.parameters() if q.requires_grad]
        self.optimizer = make_optimizer(self.params, self.p.learning_rate, self.p.weight_decay)
        total = self.p.iterations * self.p.update_epochs * self.p.num_minibatches
        self._lr_schedule = ppo.lr_lambda(self.p.lr_schedule, self.p.warmup_steps, total)
        self.lr_scale = 1.0  # factor on the scheduled LR: guardrail rollbacks set 0.5 ** rollbacks (train state)
        # The scheduler's multiplier includes lr_scale, so every scheduler.step() keeps the scale instead of
        # recomputing the unscaled LR from base_lrs. A plain closure: LambdaLR's state_dict skips functions.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: self._lr_schedule(step) * self.lr_scale
        )
        self.kl_ctl = ppo.make_kl_controller(self.p)
        self.version = 0

    # ------------------------------------------------------------------------------------------------ collectives
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            x = x.clone()
            dist.all_reduce(x)
        return x

    def _all_gather_rows(self, x: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Rows computed on ``r::world`` shards -> the full (n_rows, ...) tensor in the original row order."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        per = math.ceil(n_rows / self.world)
        pad = per - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous())
        full = x.new_zeros((n_rows, *x.shape[1:]))
        for r in range(self.world):
            rows = torch.arange(r, n_rows, self.world)
            full[rows] = out[r][: len(rows)]
        return full

    # ------------------------------------------------------------------------------------------------ update
    @torch.no_grad()
    def _rollout_stats(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Old log-probs, values, reference log-probs and bootstrap values of this rank's rows, then gathered."""
        n = t["input_ids"].shape[0]
        rows = torch.arange(self.rank, n, self.world)
        ids, attn, act = t["input_ids"][rows], t["attention_mask"][rows], t["action_mask"][rows]
        self.policy.eval()
        temp = self.temperature
        out = self.policy(ids, attn, act, compute_entropy=False, temperature=temp)
        ref_lp = self.ref.action_logprobs(ids, attn, act, temperature=temp) if self.ref is not None else out.logprobs
        # V(state after the last token) matters only where the episode was cut (bootstrap at truncation).
        last_values = torch.zeros(len(rows), device=self.device)
        trunc = t["truncated"][rows]
        if bool(trunc.any()):
            sel = trunc.nonzero(as_tuple=True)[0]
            last_values[sel] = self.policy.bootstrap_values(ids[sel], attn[sel]).float()
        local = {
            "old_logprobs": out.logprobs,
            "values": out.values,
            "ref_logprobs": ref_lp,
            "last_values": last_values,
        }
        return {k: self._all_gather_rows(v, n) for k, v in local.items()}

    def update(self, batch: RolloutBatch, iteration: int) -> dict[str, float]:
        """One PPO update on a rollout batch: targets, then ``update_epochs`` x ``num_minibatches`` steps.

        Returns:
            Metrics (identical on every rank): ``ppo/*`` losses and diagnostics, ``kl/ref_kl``, ``kl/coef``.
        """
        p = self.p
        t = batch.to_torch(self.device)
        act = t["action_mask"]
        n = act.shape[0]
        if n // p.num_minibatches < self.world:
            raise RLChatError(
                f"rollout batch of {n} episodes / ppo.num_minibatches={p.num_minibatches} gives minibatches smaller "
                f"than ray.learner_workers={self.world}; lower ppo.num_minibatches or raise rollout.envs_per_worker"
            )
        # 1. no-grad passes: old log-probs, values, reference log-probs (sharded, then gathered)
        stats = self._rollout_stats(t)
        behaviour = t["behaviour_logprobs"]
        diff = ((stats["old_logprobs"] - behaviour).abs() * act).max().item() if act.any() else 0.0
        # When the batch was sampled with the weights the learner holds, the recomputed log-probs are the ratio's
        # denominator (robust to bf16 sampling noise). Whenever the versions differ (overlapped sampling, or any
        # other way a batch and the learner got out of step) only the behaviour policy's own log-probs are, as
        # importance sampling requires: recomputing them would take the ratio against the wrong policy.
        old_logprobs = behaviour if batch.weights_version != self.version else stats["old_logprobs"]
        # 2. KL-shaped rewards -> GAE -> whitening (identical on every rank)
        targets, metrics = ppo.compute_targets(
            old_logprobs,
            stats["ref_logprobs"],
            stats["values"],
            t["scores"],
            act,
            stats["last_values"],
            t["truncated"],
            p,
            self.kl_ctl.value,
        )
        old_values = stats["values"]
        # 3. epochs x minibatches (x micro-batches), each minibatch a slice of one global permutation. Eval mode on
        # purpose (dropout off, module docstring): the forward is then deterministic, so no per-step reseeding of
        # torch's RNG is needed for ranks, resumes and the no-grad pass to agree.
        self.policy.eval()
        sums: dict[str, float] = {}
        count = 0
        epochs_run = 0
        early = False
        grad_norms: list[float] = []
        for epoch in range(p.update_epochs):
            gen = torch.Generator().manual_seed(_derive_seed(self.cfg.seed, iteration, epoch))
            epoch_kl_num = epoch_kl_den = 0.0  # token-weighted approx KL of the epoch (host floats)
            for mb in ppo.minibatch_indices(n, p.num_minibatches, gen):
                mine = mb[self.rank :: self.world]
                mb_tokens = act[mb].sum().item()
                if mb_tokens == 0:
                    continue
                denom = mb_tokens / self.world
                self.optimizer.zero_grad(set_to_none=True)
                micro = [m for m in torch.tensor_split(mine, max(1, min(p.grad_accum_steps, len(mine)))) if len(m)]
                mb_metrics = MinibatchMetrics(self.device)
                for k, rows in enumerate(micro):
                    sync = k == len(micro) - 1
                    ctx = self.train_module.no_sync() if (self.world > 1 and not sync) else _null()
                    with ctx:
                        out = self.train_module(
                            t["input_ids"][rows], t["attention_mask"][rows], act[rows], temperature=self.temperature
                        )
                        loss, m = ppo.ppo_loss(
                            out.logprobs,
                            out.entropy,
                            out.values,
                            old_logprobs[rows],
                            old_values[rows],
                            targets.advantages[rows],
                            targets.returns[rows],
                            act[rows],
                            p,
                            loss_denominator=denom,
                            ref_logprobs=stats["ref_logprobs"][rows],  # the KL loss term (ppo.kl_in_loss)
                            kl_coef=self.kl_ctl.value,
                        )
                        loss.backward()
                    mb_metrics.add(m, float(act[rows].sum().item()))
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, p.max_grad_norm)
                grad_norms.append(float(grad_norm))
                self.optimizer.step()
                self.scheduler.step()
                # token-weighted global means of the minibatch metrics
                keys, vec = mb_metrics.vector()
                *values, total_tokens = self._all_reduce(vec).tolist()
                for key, v in zip(keys, values):
                    sums[key] = sums.get(key, 0.0) + v / max(total_tokens, 1.0)
                count += 1
                epoch_kl_num += values[keys.index(ppo.APPROX_KL)]
                epoch_kl_den += total_tokens
            epochs_run += 1
            epoch_kl = epoch_kl_num / max(epoch_kl_den, 1.0)
            if ppo.should_early_stop(epoch_kl, p.target_kl):
                early = True
                break
        # 4. adapt the KL coefficient to the measured sequence KL
        self.kl_ctl.update(metrics[ppo.KL_REF], n)
        self.version += 1
        out_metrics = {k: v / max(count, 1) for k, v in sums.items()}
        out_metrics.update(metrics)
        out_metrics[LR] = float(self.scheduler.get_last_lr()[0])
        out_metrics[GRAD_NORM] = float(np.mean(grad_norms)) if grad_norms else 0.0
        out_metrics[EPOCHS_RUN] = float(epochs_run)
        out_metrics[EARLY_STOPPED] = float(early)
        out_metrics[BEHAVIOUR_DIFF] = float(diff)
        out_metrics[ppo.ENTROPY] = out_metrics.get(ppo.ENTROPY, 0.0)
        return out_metrics

    # ------------------------------------------------------------------------------------------------ state
    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The LM's weights for rollout workers (CPU tensors; the value head stays here)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.policy.lm.state_dict().items()}

    def train_state(self, driver_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """What resuming needs: optimizer, scheduler, LR scale, KL controller, weights version, and the driver's
        own state (guardrail reference length, rollback count), which travels with the checkpoint it belongs to."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "lr_scale": self.lr_scale,
            "kl_controller": self.kl_ctl.state_dict(),
            "version": self.version,
            "driver": dict(driver_state or {}),
        }

    def load_train_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Restore :meth:`train_state`; returns its driver state (empty for checkpoints written without one).

        The weights version never goes down: it becomes the checkpoint's (a resume, into a fresh learner) or, when
        that is not newer than the current one (a guardrail rollback), the current one + 1. The restored weights
        are new weights for the samplers; a batch sampled before the load must never look current or newer than
        the learner (it would pass the staleness check and be importance-weighted against the wrong policy).
        """
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.version = max(int(state["version"]), self.version + 1)
        self.set_learning_rate_scale(float(state.get("lr_scale", 1.0)))
        return dict(state.get("driver") or {})

    def load_checkpoint(self, path: str, lr_scale: float | None = None) -> dict[str, Any]:
        """Resume / roll back: the policy weights and the train state of a checkpoint, then ``lr_scale`` (None: the
        checkpoint's own). Returns the driver state saved with it. The version rule of :meth:`load_train_state`
        holds for checkpoints without a train state too (their weights get the next version)."""
        from rlchat.checkpoint import read_checkpoint

        ck = read_checkpoint(path)
        self.policy.load_state_dict(PolicyValueModel.from_pretrained(ck.path, self.cfg).state_dict())
        state = ck.load_train_state()
        if state is not None:
            driver_state = self.load_train_state(state)
        else:
            driver_state = {}
            self.version += 1
        if lr_scale is not None:
            self.set_learning_rate_scale(lr_scale)
        return driver_state

    def current_learning_rates(self) -> list[float]:
        """The LR of each param group for the next optimizer step: base LR x schedule(step) x :attr:`lr_scale`."""
        step = self.scheduler.last_epoch
        return [base * self._lr_schedule(step) * self.lr_scale for base in self.scheduler.base_lrs]

    def set_learning_rate_scale(self, scale: float) -> float:
        """Set the factor on the scheduled LR and apply it to the param groups now; returns the next step's LR.

        The scale is absolute, not multiplied into the current one: a rollback reloads a checkpoint (and its scale)
        and then sets ``0.5 ** rollbacks``, so repeated trips go 1/2, 1/4, 1/8. It is written into
        ``param_groups[i]["lr"]`` at once (the very next ``optimizer.step()`` uses it) and, being part of the
        scheduler's multiplier, survives every later ``scheduler.step()``.

        Raises:
            RLChatError: a non-positive or non-finite scale.
        """
        if not (math.isfinite(scale) and scale > 0):
            raise RLChatError(f"learning-rate scale {scale!r}: expected a positive finite factor")
        self.lr_scale = float(scale)
        lrs = self.current_learning_rates()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = list(lrs)  # what get_last_lr() (the ppo/lr metric) reports until the next step
        return float(lrs[0])


class MinibatchMetrics:
    """Token-weighted sums of the ``ppo_loss`` metrics of one minibatch's micro-batches, kept on ``device``.

    Why on the learner's device: ``ppo_loss`` returns its metrics where the model runs (CUDA on a GPU learner).
    A CPU accumulator or token count mixed in crashes there (``torch.stack`` refuses mixed devices), and NCCL can
    only all-reduce CUDA tensors. The vector is all-reduced once per minibatch, then read with one host sync.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0.0

    def add(self, metrics: dict[str, torch.Tensor], tokens: float) -> None:
        """Add one micro-batch's metrics (0-dim tensors on ``device``), weighted by its action-token count."""
        self.tokens += tokens
        for key, v in metrics.items():
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            self.sums[key] = self.sums.get(key, zero) + v.double() * tokens

    def vector(self) -> tuple[list[str], torch.Tensor]:
        """(sorted keys, (len(keys) + 1,) float64 sums followed by the token count): one tensor to all-reduce."""
        keys = sorted(self.sums)
        count = torch.tensor(self.tokens, dtype=torch.float64, device=self.device)
        return keys, torch.stack([self.sums[k] for k in keys] + [count])


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def build_models(cfg: Config, device: torch.device) -> tuple[PolicyValueModel, PolicyLM | None, Any]:
    """The policy (from ``checkpoint.init_from`` or built from the config) and its frozen reference: a copy of the
    policy's LM only (no value head, no critic trunk), None when no KL penalty is used."""
    from rlchat.tokenizer import ChatTokenizer

    if cfg.checkpoint.init_from:
        from rlchat.checkpoint import load_policy

        policy, tokenizer, _ = load_policy(cfg.checkpoint.init_from)
        policy.precision = cfg.model.precision
    else:
        tokenizer = ChatTokenizer.from_config(cfg.tokenizer)
        policy = PolicyValueModel.build(cfg, tokenizer)
    policy.to(device)
    ref = None
    if cfg.ppo.kl_coef > 0 or cfg.ppo.adaptive_kl:
        ref = policy.frozen_copy()
    return policy, ref, tokenizer


# ---------------------------------------------------------------------------------------------------- Ray Train


def _learner_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: build this rank's Learner, then serve driver commands until "stop"."""
    import ray
    import ray.train
    import ray.train.torch

    from rlchat.cluster import torch_thread_budget
    from rlchat.config import from_dict
    from rlchat.rollout import set_torch_threads

    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    r = cfg.ray
    set_torch_threads(
        torch_thread_budget(r.learner_threads, r.learner_cpus, ctx.get_local_world_size(), cfg.rollout.overlap)
    )
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.ray.learner_use_gpu else torch.device("cpu")
    policy, ref, tokenizer = build_models(cfg, device)
    ddp = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
    learner = Learner(cfg, policy, ref, rank=rank, world=world, ddp=ddp)
    commands, replies = config["commands"][rank], config["replies"]

    def reply(kind: str, payload: Any) -> None:
        if rank == 0:
            replies.put((kind, payload))

    while True:
        cmd, args = commands.get()
        try:
            if cmd == "stop":
                reply("stopped", None)
                return
            if cmd == "weights":
                reply("weights", (ray.put(learner.policy_weights()), learner.version))
            elif cmd == "update":
                batch_ref, iteration = args
                batch = ray.get(batch_ref[0])
                t0 = time.perf_counter()
                metrics = learner.update(batch, iteration)
                metrics["perf/learner_update_s"] = time.perf_counter() - t0
                reply("update", (metrics, ray.put(learner.policy_weights()), learner.version))
            elif cmd == "save":
                if rank == 0:
                    from rlchat.checkpoint import CheckpointManager

                    run_dir, step, metrics, driver_state = args
                    manager = CheckpointManager.from_config(run_dir, cfg, "ppo")
                    path = manager.save(
                        step,
                        model=policy,
                        tokenizer=tokenizer,
                        config=cfg,
                        stage="ppo",
                        weights_version=learner.version,
                        metrics=metrics,
                        train_state=learner.train_state(driver_state),
                    )
                    reply("save", str(path))
            elif cmd == "load":
                # resume / rollback: policy weights + optimizer, scheduler, LR scale, KL controller, version
                path, lr_scale = args
                driver_state = learner.load_checkpoint(path, lr_scale)
                reply("load", (ray.put(learner.policy_weights()), learner.version, driver_state))
            elif cmd == "eval":
                from rlchat.evaluation import teacher_forced_metrics

                conversations = args
                reply("eval", teacher_forced_metrics(policy, tokenizer, conversations) if rank == 0 else None)
            else:
                raise RLChatError(f"learner: unknown command {cmd!r}")
        except Exception as e:  # report to the driver instead of hanging it, then fail the Train run
            logger.exception("learner rank %d failed on %s", rank, cmd)
            reply("error", f"{e.__class__.__name__}: {e}")
            raise


class LearnerGroup:
    """Driver-side handle of the learner: a Ray Train ``TorchTrainer`` serving commands from queues.

    The ``TorchTrainer``'s worker group is placed by Ray Train in its own placement group with the learner's
    resources (``ray.learner_*``), so rollout actors can never take the learner's GPUs/CPUs.
    """

    def __init__(self, cfg: Config, run_dir: str, timeout_s: float = 1800.0) -> None:
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        self.cfg = cfg
        self.timeout_s = timeout_s
        n = cfg.ray.learner_workers
        # queues are tiny actors; they hold only commands and ObjectRefs (never tensors)
        self._commands = [Queue(actor_options={"num_cpus": 0}) for _ in range(n)]
        self._replies = Queue(actor_options={"num_cpus": 0})
        resources = {"CPU": cfg.ray.learner_cpus, **cfg.ray.learner_resources}
        scaling = ray.train.ScalingConfig(
            num_workers=n, use_gpu=cfg.ray.learner_use_gpu, resources_per_worker=resources
        )
        run_config = ray.train.RunConfig(
            name=f"learner-{int(time.time() * 1000)}", storage_path=str(_abs(run_dir) / "ray_train")
        )
        self.trainer = TorchTrainer(
            _learner_loop,
            train_loop_config={"cfg": cfg.to_dict(), "commands": self._commands, "replies": self._replies},
            scaling_config=scaling,
            run_config=run_config,
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, name="rlchat-learner", daemon=True)
        self._thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # surfaced by _wait
            self._error = e

    def _send(self, cmd: str, args: Any = None) -> None:
        for q in self._commands:
            q.put((cmd, args))

    def _wait(self, kind: str) -> Any:
        from ray.util.queue import Empty

        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                got, payload = self._replies.get(timeout=1.0)
            except Empty:
                if self._error is not None or not self._thread.is_alive():
                    raise RLChatError(f"the learner stopped unexpectedly: {self._error}") from self._error
                if time.monotonic() > deadline:
                    raise RLChatError(f"the learner did not answer '{kind}' within {self.timeout_s:.0f} s") from None
                continue
            if got == "error":
                raise RLChatError(f"the learner failed: {payload}")
            if got != kind:
                raise RLChatError(f"learner protocol error: expected '{kind}', got '{got}'")
            return payload

    def weights(self) -> tuple[Any, int]:
        self._send("weights")
        return self._wait("weights")

    def update(self, batch_ref: Any, iteration: int) -> tuple[dict[str, float], Any, int]:
        self._send("update", ([batch_ref], iteration))
        return self._wait("update")

    def save(
        self, run_dir: str, step: int, metrics: dict[str, float], driver_state: dict[str, Any] | None = None
    ) -> str:
        """Checkpoint ``step`` (rank 0 writes it); ``driver_state`` is stored in its train state."""
        self._send("save", (str(run_dir), step, metrics, dict(driver_state or {})))
        return self._wait("save")

    def load(self, path: str, lr_scale: float | None = None) -> tuple[Any, int, dict[str, Any]]:
        """Load a checkpoint on every rank; ``lr_scale`` (None: the checkpoint's own) is set after it.

        Returns:
            (weights ref, weights version, the driver state saved with the checkpoint).
        """
        self._send("load", (str(path), lr_scale))
        return self._wait("load")

    def evaluate(self, conversations: list[list[dict[str, str]]]) -> dict[str, float]:
        self._send("eval", conversations)
        return self._wait("eval")

    def shutdown(self) -> None:
        if self._thread.is_alive():
            try:
                self._send("stop")
                self._wait("stopped")
            except Exception:  # already failing; nothing left to stop cleanly
                pass
            self._thread.join(timeout=60)


class LocalLearner:
    """The learner in the driver process (``ray.learner_workers=0``): same interface as :class:`LearnerGroup`.

    For small sweeps and tests, where a Ray Train worker group (~17 s to start on 2 cores) costs more than it gives.
    Weights are handed over as plain state dicts instead of object-store refs.
    """

    def __init__(self, cfg: Config, run_dir: str) -> None:
        from rlchat.cluster import torch_thread_budget
        from rlchat.rollout import set_torch_threads

        set_torch_threads(torch_thread_budget(cfg.ray.learner_threads, cfg.ray.learner_cpus, 1, cfg.rollout.overlap))
        self.cfg = cfg
        policy, ref, self.tokenizer = build_models(cfg, torch.device("cpu"))
        self.learner = Learner(cfg, policy, ref)

    def weights(self) -> tuple[Any, int]:
        return self.learner.policy_weights(), self.learner.version

    def update(self, batch: Any, iteration: int) -> tuple[dict[str, float], Any, int]:
        t0 = time.perf_counter()
        metrics = self.learner.update(batch, iteration)
        metrics["perf/learner_update_s"] = time.perf_counter() - t0
        return metrics, self.learner.policy_weights(), self.learner.version

    def save(
        self, run_dir: str, step: int, metrics: dict[str, float], driver_state: dict[str, Any] | None = None
    ) -> str:
        from rlchat.checkpoint import CheckpointManager

        manager = CheckpointManager.from_config(run_dir, self.cfg, "ppo")
        path = manager.save(
            step,
            model=self.learner.policy,
            tokenizer=self.tokenizer,
            config=self.cfg,
            stage="ppo",
            weights_version=self.learner.version,
            metrics=metrics,
            train_state=self.learner.train_state(driver_state),
        )
        return str(path)

    def load(self, path: str, lr_scale: float | None = None) -> tuple[Any, int, dict[str, Any]]:
        driver_state = self.learner.load_checkpoint(path, lr_scale)
        weights, version = self.weights()
        return weights, version, driver_state

    def evaluate(self, conversations: list[list[dict[str, str]]]) -> dict[str, float]:
        from rlchat.evaluation import teacher_forced_metrics

        return teacher_forced_metrics(self.learner.policy, self.tokenizer, conversations)

    def shutdown(self) -> None:
        return None


def make_learner(cfg: Config, run_dir: str) -> LearnerGroup | LocalLearner:
    """A Ray Train learner group, or the in-process learner when ``ray.learner_workers == 0``."""
    return LocalLearner(cfg, run_dir) if cfg.ray.learner_workers == 0 else LearnerGroup(cfg, run_dir)


def _abs(path: str) -> Any:
    from pathlib import Path

    return Path(path).resolve()
