"""The central PPO learner: one :class:`Learner` per data-parallel rank, run by Ray Train.

Why our own learner instead of RLlib's PPO (measured: docs/ppo.md "rlchat vs RLlib's PPO", bench/rllib_compare.py):
RLlib's learner works per timestep -- it forwards the whole context once per generated token, ships full logits per
step and takes its KL to the previous policy, not to a frozen reference; on the same env and model on a 2-core CPU
its stock PPO took 16x (16-token replies) to 33x (112 tokens) longer per env step than this learner. Here one
causal forward per sequence gives log-probs, entropy and values at every position, and all PPO maths lives in
:mod:`rlchat.core.ppo` as pure functions. Ray Train still owns what it is good at: the worker group, its placement
group (so rollouts cannot starve the learner), device placement and the DDP process group.

Data-parallel layout (exactly equal to one worker on the same batch; tested):

1. every rank receives the whole :class:`~rlchat.core.batch.RolloutBatch` (one object-store read each);
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

The driver calls one :class:`LearnerRank` (update, weights, save, load, restore, evaluate, set_learning_rate,
set_kl_coef): in its own process (:class:`LocalLearner`), or on every Ray Train rank through :class:`LearnerGroup`,
the typed rank group of :mod:`rlchat.distributed.rank_group` (Ray Train started once per run, not once per step: its
start-up costs ~17 s on 2 cores). The driver keeps the loop -- sample -> update -> sync -> log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from rlchat.core import ppo
from rlchat.core.batch import (
    ACTION_MASK,
    ATTENTION_MASK,
    BEHAVIOUR_LOGPROBS,
    INPUT_IDS,
    SCORES,
    TRUNCATED,
    RolloutBatch,
)
from rlchat.core.config import Config, check_context_limits
from rlchat.core.errors import ConfigError, RLChatError
from rlchat.core.metrics import PPO_BEHAVIOUR_LOGPROB_MAXDIFF as BEHAVIOUR_DIFF
from rlchat.core.metrics import PPO_EARLY_STOPPED as EARLY_STOPPED
from rlchat.core.metrics import PPO_EPOCHS_RUN as EPOCHS_RUN
from rlchat.core.metrics import PPO_GRAD_NORM as GRAD_NORM
from rlchat.core.metrics import PPO_LR as LR
from rlchat.core.model import PolicyLM, PolicyValueModel
from rlchat.distributed.rank_group import RankContext, RankGroup, rank0_only
from rlchat.distributed.rollout import set_torch_threads

logger = logging.getLogger(__name__)


def _derive_seed(*parts: int) -> int:
    from rlchat.distributed.rollout import derive_seed

    return derive_seed(*parts)


def check_ppo_config(cfg: Config) -> None:
    """Refuse settings the PPO learner cannot honour (called by the learner and, before Ray starts, the driver).

    Raises:
        CheckpointError: ``checkpoint.init_from`` is not a policy checkpoint (message with the fix).
        ConfigError: ``model.dropout > 0``. The learner runs every forward with dropout off so that its log-probs
            equal the (eval-mode) rollouts' and the old log-probs equal the gradient pass's at the start of an
            update; a dropout the user asked for would be silently ignored, so it is refused instead. Also an
            ``env.max_context`` beyond the policy's positions (:func:`rlchat.core.config.check_context_limits`).
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
        from rlchat.core.checkpoint import POLICY_STAGES, read_checkpoint

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
        n = t[INPUT_IDS].shape[0]
        rows = torch.arange(self.rank, n, self.world)
        ids, attn, act = t[INPUT_IDS][rows], t[ATTENTION_MASK][rows], t[ACTION_MASK][rows]
        self.policy.eval()
        temp = self.temperature
        out = self.policy(ids, attn, act, compute_entropy=False, temperature=temp)
        ref_lp = self.ref.action_logprobs(ids, attn, act, temperature=temp) if self.ref is not None else out.logprobs
        # V(state after the last token) matters only where the episode was cut (bootstrap at truncation).
        last_values = torch.zeros(len(rows), device=self.device)
        trunc = t[TRUNCATED][rows]
        if self.cfg.ppo.advantage == "gae" and bool(trunc.any()):  # critic-free estimators bootstrap nothing
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
        act = t[ACTION_MASK]
        n = act.shape[0]
        if n // p.num_minibatches < self.world:
            raise RLChatError(
                f"rollout batch of {n} episodes / ppo.num_minibatches={p.num_minibatches} gives minibatches smaller "
                f"than ray.learner_workers={self.world}; lower ppo.num_minibatches or raise rollout.envs_per_worker"
            )
        # 1. no-grad passes: old log-probs, values, reference log-probs (sharded, then gathered)
        stats = self._rollout_stats(t)
        behaviour = t[BEHAVIOUR_LOGPROBS]
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
            t[SCORES],
            act,
            stats["last_values"],
            t[TRUNCATED],
            p,
            self.kl_ctl.value,
            groups=_group_ids(batch, self.device) if p.advantage != "gae" else None,
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
                # Dr. GRPO: a constant per-reply token budget instead of the tokens present, so long and short
                # replies weigh their tokens equally (Liu et al. 2025; TRL's loss_type="dr_grpo")
                denom = (len(mb) * self.cfg.env.max_turn_tokens if p.dr_grpo else mb_tokens) / self.world
                self.optimizer.zero_grad(set_to_none=True)
                micro = [m for m in torch.tensor_split(mine, max(1, min(p.grad_accum_steps, len(mine)))) if len(m)]
                mb_metrics = MinibatchMetrics(self.device)
                for k, rows in enumerate(micro):
                    sync = k == len(micro) - 1
                    ctx = self.train_module.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
                    with ctx:
                        out = self.train_module(
                            t[INPUT_IDS][rows], t[ATTENTION_MASK][rows], act[rows], temperature=self.temperature
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
        holds for checkpoints without a train state too (their weights get the next version).

        The learner keeps training with *its* config's ``ppo.learning_rate`` and (fixed) ``ppo.kl_coef``: a
        checkpoint written under other values (a PBT explore step copied another trial's checkpoint, or ``--resume``
        with an override) keeps its Adam moments, schedule position and LR scale, and takes this config's values
        through :meth:`set_learning_rate` / :meth:`set_kl_coef`."""
        from rlchat.core.checkpoint import read_checkpoint

        ck = read_checkpoint(path)
        self.policy.load_state_dict(PolicyValueModel.from_pretrained(ck.path, self.cfg).state_dict())
        state = ck.load_train_state()
        if state is not None:
            driver_state = self.load_train_state(state)
        else:
            driver_state = {}
            self.version += 1
        trained_with = ck.config.ppo
        if trained_with.learning_rate != self.p.learning_rate:
            self.set_learning_rate(self.p.learning_rate)
        if not self.p.adaptive_kl and trained_with.kl_coef != self.p.kl_coef:
            self.set_kl_coef(self.p.kl_coef)
        if lr_scale is not None:
            self.set_learning_rate_scale(lr_scale)
        return driver_state

    def set_learning_rate(self, lr: float) -> float:
        """Train from now on with base learning rate ``lr``; returns the next step's LR.

        The schedule's position, the Adam moments and :attr:`lr_scale` stay: the next step's LR is
        ``lr x schedule(step) x lr_scale``, applied to the param groups at once (Tune's PBT explore steps, a resume
        with another ``ppo.learning_rate``). Saved with the scheduler's state (its ``base_lrs``).

        Raises:
            RLChatError: a non-positive or non-finite learning rate.
        """
        if not (math.isfinite(lr) and lr > 0):
            raise RLChatError(f"learning rate {lr!r}: expected a positive finite value")
        self.scheduler.base_lrs = [float(lr)] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = float(lr)
        return self.set_learning_rate_scale(self.lr_scale)

    def set_kl_coef(self, coef: float) -> float:
        """Use KL coefficient ``coef`` from now on (an adaptive controller continues from it); returns it.

        Raises:
            RLChatError: a negative or non-finite coefficient.
        """
        if not (math.isfinite(coef) and coef >= 0):
            raise RLChatError(f"KL coefficient {coef!r}: expected a finite value >= 0")
        self.kl_ctl.value = float(coef)
        return self.kl_ctl.value

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


def _group_ids(batch: RolloutBatch, device: torch.device) -> torch.Tensor:
    """(B,) group ids of a batch for the critic-free estimators: replies to the same prompt (record) share one.

    Replies of one group are sampled together from one record (``rollout.samples_per_prompt``); two groups that drew
    the same record merge into one larger group of replies to the same prompt, which is still a valid baseline.
    """
    if batch.record_index is None:
        raise RLChatError("ppo.advantage=grpo/rloo needs the batch's record_index (the prompt of every reply)")
    return torch.as_tensor(np.asarray(batch.record_index), dtype=torch.long, device=device)


def build_models(cfg: Config, device: torch.device) -> tuple[PolicyValueModel, PolicyLM | None, Any]:
    """The policy (from ``checkpoint.init_from`` or built from the config) and its frozen reference: a copy of the
    policy's LM only (no value head, no critic trunk), None when no KL penalty is used."""
    from rlchat.core.tokenizer import ChatTokenizer

    if cfg.checkpoint.init_from:
        from rlchat.core.checkpoint import load_policy

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


# -------------------------------------------------------------------------------------------- the driver's view


class LearnerRank:
    """The PPO learner as the driver calls it: one per rank under Ray Train, or the whole learner in process.

    :class:`LearnerGroup` builds one on every Ray Train rank and runs the driver's calls on them (a
    :class:`~rlchat.distributed.rank_group.RankGroup`); :class:`LocalLearner` is one built in the driver process
    (``ray.learner_workers=0``) and called directly -- the same methods either way. Around :class:`Learner` (the
    maths) it holds what the driver needs: weights for the samplers (``ctx.share``: an object-store ref from a Ray
    rank, the state dict itself in process; only rank 0 hands them over), checkpoints (rank 0 writes), the restore
    of a checkpoint after ``--resume`` or a restart of the worker group, held-out teacher-forced evaluation, and the
    learning rate and KL coefficient Tune changes.

    Args:
        ctx: where this learner runs (rank, world, device); ``RankContext()`` in the driver process.
        cfg: the run config (or its dict, as a Ray Train rank receives it).

    Raises:
        ConfigError: a setting PPO cannot honour (:func:`check_ppo_config`).
    """

    def __init__(self, ctx: RankContext, cfg: Config | dict[str, Any]) -> None:
        from rlchat.core.config import from_dict

        self.ctx = ctx
        self.cfg = from_dict(cfg) if isinstance(cfg, dict) else cfg
        policy, ref, self.tokenizer = build_models(self.cfg, ctx.device)
        ddp = None
        if ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(policy, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.learner = Learner(self.cfg, policy, ref, rank=ctx.rank, world=ctx.world, ddp=ddp)

    def _shared_weights(self) -> Any:
        """The LM weights as the driver receives them (rank 0 only: the other ranks' results are dropped)."""
        return self.ctx.share(self.learner.policy_weights()) if self.ctx.rank == 0 else None

    @rank0_only
    def weights(self) -> tuple[Any, int]:
        """(weights, weights version) for the samplers."""
        return self._shared_weights(), self.learner.version

    def update(self, batch: Any, iteration: int) -> tuple[dict[str, float], Any, int]:
        """One PPO update (:meth:`Learner.update`) on a :class:`~rlchat.core.batch.RolloutBatch` (the driver passes an
        ``ObjectRef`` of it to a :class:`LearnerGroup`; each rank fetches it); returns (metrics +
        ``perf/learner_update_s``, new weights, their version)."""
        t0 = time.perf_counter()
        metrics = self.learner.update(batch, iteration)
        metrics["perf/learner_update_s"] = time.perf_counter() - t0
        return metrics, self._shared_weights(), self.learner.version

    @rank0_only
    def save(
        self, run_dir: str, step: int, metrics: dict[str, float], driver_state: dict[str, Any] | None = None
    ) -> str:
        """Checkpoint ``step`` into ``run_dir/checkpoints``; ``driver_state`` is stored in its train state."""
        from rlchat.core.checkpoint import CheckpointManager

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
        """Roll back to a checkpoint of this run (:meth:`Learner.load_checkpoint`); ``lr_scale`` (None: the
        checkpoint's own) is set after it.

        Returns:
            (weights, weights version, the driver state saved with the checkpoint).
        """
        driver_state = self.learner.load_checkpoint(path, lr_scale)
        return self._shared_weights(), self.learner.version, driver_state

    def restore(self, path: str | None, min_version: int = 0) -> tuple[Any, int, dict[str, Any]]:
        """Bring a freshly built learner to the run's checkpoint ``path`` (None: keep its initial weights), with a
        weights version of at least ``min_version``: what ``--resume`` does, and the driver after Ray Train
        restarted the worker group (versions then stay above every version the samplers saw).

        Returns:
            (weights, weights version, the driver state saved with the checkpoint; empty without one).
        """
        driver_state = self.learner.load_checkpoint(path) if path else {}
        self.learner.version = max(self.learner.version, int(min_version))
        return self._shared_weights(), self.learner.version, driver_state

    @rank0_only
    def evaluate(self, conversations: list[list[dict[str, str]]]) -> dict[str, float]:
        """Teacher-forced perplexity / accuracy of the policy on reference conversations."""
        from rlchat.core.evaluation import teacher_forced_metrics

        return teacher_forced_metrics(self.learner.policy, self.tokenizer, conversations)

    def set_learning_rate(self, lr: float) -> float:
        """:meth:`Learner.set_learning_rate` (every rank); returns the next step's LR."""
        return self.learner.set_learning_rate(lr)

    def set_kl_coef(self, coef: float) -> float:
        """:meth:`Learner.set_kl_coef` (every rank); returns it."""
        return self.learner.set_kl_coef(coef)

    def shutdown(self) -> None:
        """Nothing to stop in process (a :class:`LearnerGroup` stops its ranks)."""
        return None


class LearnerGroup(RankGroup):
    """The PPO learner on ``ray.learner_workers`` Ray Train ranks: a :class:`~rlchat.distributed.rank_group.RankGroup`
    of :class:`LearnerRank`, whose methods it mirrors (``group.update(batch_ref, iteration)`` runs
    :meth:`LearnerRank.update` on every rank and returns rank 0's result).

    Ray Train places the ranks in its own placement group with the learner's resources (``ray.learner_*``), so
    rollout actors can never take the learner's GPUs/CPUs; after a rank dies it restarts them (at most
    ``ray.learner_max_failures`` times) and the next call raises
    :class:`~rlchat.distributed.rank_group.RankGroupRestarted`, on which
    :class:`~rlchat.distributed.trainer.PPOTrainer` restores the last checkpoint.
    """

    def __init__(self, cfg: Config, run_dir: str, timeout_s: float = 1800.0) -> None:
        super().__init__(
            LearnerRank,
            LearnerRank,
            (cfg.to_dict(),),
            cfg=cfg,
            run_dir=run_dir,
            name="learner",
            overlap=cfg.rollout.overlap,
            timeout_s=timeout_s,
        )


class LocalLearner(LearnerRank):
    """The learner in the driver process (``ray.learner_workers=0``): the :class:`LearnerRank` a Ray rank would
    build, called directly, with this process's thread budget.

    For small sweeps and tests, where a Ray Train worker group (~17 s to start on 2 cores) costs more than it gives.
    Weights are handed over as plain state dicts instead of object-store refs. In-process sampling
    (``rollout.num_workers=0``) shares the process with its own budget, so each update and evaluation sets the
    learner's budget again.
    """

    def __init__(self, cfg: Config, run_dir: str = "") -> None:
        from rlchat.distributed.cluster import learner_thread_budget

        self.threads = learner_thread_budget(cfg, cfg.rollout.overlap)
        set_torch_threads(self.threads)
        super().__init__(RankContext(), cfg)

    def update(self, batch: Any, iteration: int) -> tuple[dict[str, float], Any, int]:
        set_torch_threads(self.threads)
        return super().update(batch, iteration)

    def evaluate(self, conversations: list[list[dict[str, str]]]) -> dict[str, float]:
        set_torch_threads(self.threads)
        return super().evaluate(conversations)


def make_learner(cfg: Config, run_dir: str) -> LearnerGroup | LocalLearner:
    """A Ray Train learner group, or the in-process learner when ``ray.learner_workers == 0``."""
    return LocalLearner(cfg, run_dir) if cfg.ray.learner_workers == 0 else LearnerGroup(cfg, run_dir)
