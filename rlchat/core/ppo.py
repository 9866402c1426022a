"""PPO maths for chat language models: pure torch functions, readable top to bottom.

Nothing here knows about Ray, models or tokenizers. The learner calls, per iteration::

    kl_ctl = make_kl_controller(cfg.ppo)                                  # once per run (state in checkpoints)
    targets, m = compute_targets(old_logprobs, ref_logprobs, values, scores, action_mask,
                                 last_values, truncated, cfg.ppo, kl_ctl.value)   # KL-shaped rewards, GAE, whitening
    for epoch in range(cfg.ppo.update_epochs):
        for idx in minibatch_indices(B, cfg.ppo.num_minibatches, generator):
            ...forward on rows idx -> logprobs, entropy, values...
            loss, stats = ppo_loss(logprobs, entropy, new_values, old_logprobs[idx], old_values[idx],
                                   targets.advantages[idx], targets.returns[idx], action_mask[idx], cfg.ppo,
                                   loss_denominator=...)          # see ppo_loss: loss aggregation
        if should_early_stop(epoch_approx_kl, cfg.ppo.target_kl): break
    kl_ctl.update(m[KL_REF], n_steps=B)

Tensor alignment (the model produces it, this module consumes it): every per-token tensor is ``(B, T)`` and aligned
with ``input_ids``; position ``t`` holds the quantities for *generating* token ``t``:
``logprobs[:, t] = log pi(x_t | x_<t)``, ``values[:, t] = V(x_<t)``. ``action_mask[:, t]`` is 1 (nonzero) where
token ``t`` was chosen by the policy (assistant tokens including the end-of-turn token) and 0 for the prompt,
user-turn observation tokens inside a multi-turn episode, and padding. Per sequence, ``last_values (B,)`` is the
value of the state after the last real token and ``truncated (B,)`` says whether the episode was cut where it would
have gone on -- a multi-turn context limit (bootstrap from ``last_values``) -- rather than ending (terminal value 0).
A turn cut at ``env.max_turn_tokens`` ends its episode: it is scored (see envs/chat_env.py), not bootstrapped.

Masked positions may hold anything finite or not (padding log-probs of ``-inf``, stale values): every reduction
here selects with ``torch.where`` instead of multiplying by the mask, so garbage there never leaks in as NaN.

Deviations from textbook PPO (Schulman et al. 2017) and from cleanrl's ``ppo.py``, and why:

1. **Per-token KL penalty to a frozen reference in the reward** (Ziegler et al. 2019, TRL): the reward of action
   token ``t`` is ``score_t - kl_coef * KL_t``; ``score_t`` is non-zero only on the last token of an assistant
   turn. RLlib's ``kl_coeff`` is a *loss* term to the previous policy instead; that is not what this is. In the
   reward the estimator is k1: its score-function gradient is the KL's gradient, while k3's is biased (~0 near the
   reference; Shah et al. 2025, "A Comedy of Estimators"). ``ppo.kl_in_loss`` instead adds GRPO's
   differentiable k3 term ``kl_coef * mean_t k3_t`` to the loss (:func:`ppo_loss`) and leaves the rewards alone.
2. **GAE skips observation tokens.** In a multi-turn episode the "next state" of an action token is the next
   action token of the same row; user-turn tokens in between are not time steps (verl / OpenRLHF multi-turn
   style). Advantages and returns at action positions are therefore invariant to values at masked positions.
3. **Bootstrap only at truncation** (SB3 / Gymnasium ``truncated``): after the last action token the next value
   is ``last_values`` if the episode was truncated, else 0.
4. **Advantages are whitened once over all action tokens of the rollout batch** (TRL), not per minibatch as in
   cleanrl. Per-minibatch whitening would make the update depend on how rows are split across micro-batches and
   data-parallel workers; batch-level whitening (with an optional all-reduce, ``reduce_fn``) keeps the
   grad-accumulation and DDP updates exactly equal to the single-process full-batch one.
5. **Losses are token means** over the action tokens of the minibatch (TRL's ``masked_mean``), not means over
   sequences. ``loss_denominator`` lets micro-batches / DDP shards divide by the *minibatch's* token count, so
   summed micro-batch gradients equal the full minibatch gradient exactly (tests/test_ppo.py checks this).
6. **Early stop at ``approx_kl > 1.5 * target_kl``** (SB3's rule; cleanrl stops at ``> target_kl``).
7. **Learning-rate warm-up starts at ``1 / warmup_steps``**, not at 0 as in HF's schedulers: the first optimizer
   step is not wasted. Decay goes from 1 at the end of warm-up to 0 at ``total_steps``.
8. **``explained_variance`` is 0.0, not NaN, when the returns have zero variance** (e.g. the first iteration of a
   run where every reward is 0 and the policy equals the reference), so logged metrics stay finite.
9. Probability ratios and losses are computed in fp32 even when the model runs under bf16 autocast: ``exp`` of a
   bf16 log-ratio has ~3 significant digits, which would make the clip test noisy.

References: cleanrl ppo.py and "The 37 Implementation Details of PPO" (Huang et al. 2022); "The N Implementation
Details of RLHF with PPO" (Huang et al. 2023); GAE (Schulman et al. 2016, https://arxiv.org/abs/1506.02438);
KL estimators (http://joschu.net/blog/kl-approx.html); adaptive KL (Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593). ``docs/ppo.md`` maps each implementation detail to the function here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlchat.core.config import PPOConfig
from rlchat.core.errors import CheckpointError, ConfigError

# --------------------------------------------------------------------------------------------------------------
# Metric keys (the learner, metrics writers, guardrails and Tune stoppers import these; never spell the strings)
# --------------------------------------------------------------------------------------------------------------

LOSS = "ppo/loss"
POLICY_LOSS = "ppo/policy_loss"
VALUE_LOSS = "ppo/value_loss"
ENTROPY = "ppo/entropy"
APPROX_KL = "ppo/approx_kl"
CLIPFRAC = "ppo/clipfrac"
VF_CLIPFRAC = "ppo/vf_clipfrac"
RATIO_MEAN = "ppo/ratio_mean"
EXPLAINED_VARIANCE = "ppo/explained_variance"
RETURN_MEAN = "ppo/return_mean"
VALUE_MEAN = "ppo/value_mean"
KL_LOSS = "ppo/kl_loss"
"""Token-mean k3 KL to the reference, the loss term of ``ppo.kl_in_loss`` (before ``kl_coef``)."""
KL_REF = "kl/ref_kl"
"""Mean over sequences of the summed per-token KL to the reference (the configured estimator): what the
adaptive controller tracks and ``ppo.adaptive_kl_target`` / ``ppo.max_ref_kl`` are measured in."""
KL_COEF = "kl/coef"

KL_ESTIMATORS = ("k1", "k3", "abs", "mse")
LR_SCHEDULES = ("constant", "linear", "cosine")

ReduceFn = Callable[[Tensor], Tensor]
"""Sums a tensor over data-parallel workers and returns the sum (e.g. ``dist.all_reduce(t); return t``).
``None`` everywhere means: this process holds the whole batch."""


# --------------------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------------------


def _upcast(x: Tensor) -> Tensor:
    """fp32 for half-precision inputs (deviation 9); fp32 / fp64 pass through (tests use fp64 for exactness)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _sum_count(x: Tensor, mask: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """Sum of ``x`` over nonzero ``mask`` and the number of selected entries (NaN-safe at masked positions)."""
    keep = mask.bool()
    x = _upcast(x)  # a bf16 sum / count would lose precision beyond 256 tokens
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return total.sum(), keep.sum().to(x.dtype)
    return total.sum(dim), keep.sum(dim).to(x.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, reduce_fn: ReduceFn | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is nonzero.

    An empty mask gives 0 (not NaN): a minibatch with no action tokens contributes nothing.

    Args:
        x: any shape, e.g. ``(B, T)``.
        mask: same shape as ``x``; nonzero = included.
        dim: reduce only this dimension (e.g. ``dim=1`` gives per-sequence means ``(B,)``); None = all.
        reduce_fn: sum over data-parallel workers (only with ``dim=None``), for a global mean.

    Returns:
        0-dim tensor, or ``x`` reduced over ``dim``.
    """
    total, count = _sum_count(x, mask, dim)
    if reduce_fn is not None:
        if dim is not None:
            raise ValueError("masked_mean: reduce_fn needs dim=None (a per-row mean has nothing to all-reduce)")
        total, count = reduce_fn(torch.stack([total, count])).unbind()
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, reduce_fn: ReduceFn | None = None) -> Tensor:
    """Variance of ``x`` over the entries where ``mask`` is nonzero (two-pass, numerically stable).

    Args:
        x: any shape.
        mask: same shape as ``x``.
        unbiased: Bessel's correction ``n / (n - 1)`` (skipped when ``n <= 1``, where the variance is 0).
        reduce_fn: sum over data-parallel workers, for the variance of the global batch.

    Returns:
        0-dim tensor.
    """
    return _masked_moments(x, mask, unbiased, reduce_fn)[1]


def _masked_moments(
    x: Tensor, mask: Tensor, unbiased: bool = True, reduce_fn: ReduceFn | None = None
) -> tuple[Tensor, Tensor]:
    mean = masked_mean(x, mask, reduce_fn=reduce_fn)
    sq, count = _sum_count((x - mean) ** 2, mask)
    if reduce_fn is not None:
        sq, count = reduce_fn(torch.stack([sq, count])).unbind()
    var = sq / count.clamp(min=1)
    if unbiased:
        var = var * count / (count - 1).clamp(min=1)
    return mean, var


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, reduce_fn: ReduceFn | None = None, eps: float = 1e-8
) -> Tensor:
    """Normalise ``x`` to mean 0 and (unbiased) std 1 over the masked entries; masked positions become 0.

    Args:
        x: ``(B, T)`` e.g. advantages.
        mask: ``(B, T)`` action mask.
        shift_mean: False keeps the original mean (only rescales), as TRL's ``whiten(shift_mean=False)``.
        reduce_fn: sum over data-parallel workers, so every shard is whitened with the global batch statistics.
        eps: added to the variance before the square root.

    Returns:
        ``(B, T)``, same dtype as ``x``.
    """
    mean, var = _masked_moments(x, mask, unbiased=True, reduce_fn=reduce_fn)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------------------------------------------
# KL to the reference and reward shaping
# --------------------------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (http://joschu.net/blog/kl-approx.html).

    With ``log r = ref_logprobs - logprobs`` (``r = q / p``):

    - ``k1 = -log r = logp - logq``: unbiased, high variance, can be negative per token;
    - ``k3 = (r - 1) - log r``: unbiased, always >= 0, lower variance;
    - ``abs = |log r|`` and ``mse = 0.5 (log r)^2`` (k2, biased, >= 0), as TRL offers them.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy (the behaviour / old policy).
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the frozen reference.
        estimator: one of ``k1``, ``k3``, ``abs``, ``mse``.

    Returns:
        ``(B, T)`` per-token KL estimate (fp32, or fp64 for fp64 inputs); values at non-action positions are
        meaningless (mask them).

    Raises:
        ConfigError: unknown estimator.
    """
    log_r = _upcast(ref_logprobs) - _upcast(logprobs)
    if estimator == "k1":
        return -log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r  # expm1: exact near r = 1, where the two terms nearly cancel
    if estimator == "abs":
        return log_r.abs()
    if estimator == "mse":
        return 0.5 * log_r.square()
    raise ConfigError(
        f"ppo.kl_estimator={estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}; "
        "use k1 (TRL's default) or k3 (non-negative, lower variance)"
    )


def shape_rewards(scores: Tensor, kl: Tensor, kl_coef: float, action_mask: Tensor) -> Tensor:
    """Per-token rewards ``r_t = score_t - kl_coef * kl_t`` on action tokens, 0 elsewhere (Ziegler et al. 2019).

    Args:
        scores: ``(B, T)`` turn-end scores, non-zero only at the final token of each assistant turn.
        kl: ``(B, T)`` per-token KL from :func:`kl_penalty`.
        kl_coef: the KL controller's current coefficient.
        action_mask: ``(B, T)``.

    Returns:
        ``(B, T)`` rewards (fp32, or fp64 for fp64 inputs).

    Raises:
        ValueError: a non-zero score sits on a non-action token (it would be silently dropped).
    """
    keep = action_mask.bool()
    scores = _upcast(scores)
    if bool(((scores != 0) & ~keep).any()):
        b, t = (((scores != 0) & ~keep).nonzero()[0]).tolist()
        raise ValueError(
            f"shape_rewards: score {scores[b, t].item():.4g} at row {b}, position {t} is on a non-action token; "
            "place each turn's score at the final action token of the turn (its end-of-turn token)"
        )
    rewards = scores - kl_coef * _upcast(kl)
    return torch.where(keep, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))


def sequence_kl(kl: Tensor, action_mask: Tensor) -> Tensor:
    """Per-sequence KL to the reference: the sum of the per-token estimates over action tokens.

    Args:
        kl: ``(B, T)`` from :func:`kl_penalty`.
        action_mask: ``(B, T)``.

    Returns:
        ``(B,)``; its batch mean is the :data:`KL_REF` metric.
    """
    return _sum_count(_upcast(kl), action_mask, dim=1)[0]


# --------------------------------------------------------------------------------------------------------------
# Generalised advantage estimation over action tokens
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_gae(
    rewards: Tensor,
    values: Tensor,
    action_mask: Tensor,
    last_values: Tensor,
    truncated: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) over the action tokens of each row; observation tokens are not time steps.

    For action tokens ``t`` with next action token ``t'`` of the same row (user-turn tokens in between skipped)::

        delta_t = r_t + gamma * V_next - V_t        V_next = values[t'], or after the last action token
        A_t     = delta_t + gamma * lambda * A_t'            last_values if truncated else 0
        R_t     = A_t + V_t                          (the value target, "returns")

    (https://arxiv.org/abs/1506.02438). Vectorised over ``B``; a Python loop over ``T`` walks backwards carrying,
    per row, the value and advantage of the next action token; masked positions leave the carry untouched.

    Args:
        rewards: ``(B, T)`` per-token rewards (from :func:`shape_rewards`; ignored at masked positions).
        values: ``(B, T)`` ``V(x_<t)`` from the rollout-time critic (ignored at masked positions).
        action_mask: ``(B, T)``.
        last_values: ``(B,)`` value of the state after the last real token.
        truncated: ``(B,)`` bool; True = the episode was cut where it would have gone on (bootstrap).
        gamma: discount per action token.
        gae_lambda: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` fp32 (fp64 if ``values`` is fp64), 0 at masked positions.
    """
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    rewards, values = rewards.to(dtype), values.to(dtype)
    keep = action_mask.bool()
    _, T = values.shape
    # 1. after the last action token: bootstrap from last_values only where the episode was cut short
    next_value = torch.where(
        truncated.bool(), last_values.to(dtype), torch.zeros((), dtype=dtype, device=values.device)
    )
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(values)
    # 2. backwards over positions; only action tokens update the carry
    for t in reversed(range(T)):
        m = keep[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * gae_lambda * next_adv
        next_adv = torch.where(m, adv, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = torch.where(m, adv, 0.0)
    # 3. value targets; masked positions stay exactly 0
    returns = torch.where(keep, advantages + values, 0.0)
    return advantages, returns


class Targets(NamedTuple):
    """What :func:`compute_targets` prepares once per rollout batch for the update epochs (all ``(B, T)``)."""

    advantages: Tensor
    """Whitened (if ``ppo.norm_adv``) GAE advantages, 0 at masked positions."""
    returns: Tensor
    """Value targets ``A + V`` (never whitened), 0 at masked positions."""
    rewards: Tensor
    """KL-shaped per-token rewards."""
    kl: Tensor
    """Per-token KL estimate to the reference, 0 at masked positions."""


@torch.no_grad()
def group_advantages(returns: Tensor, groups: Tensor, estimator: str, scale_by_std: bool = True) -> Tensor:
    """Critic-free sequence advantages: each reply's return against the other replies to the same prompt.

    - ``rloo`` (REINFORCE leave-one-out; Ahmadian et al. 2024, TRL's ``RLOOTrainer``):
      ``A_i = R_i - mean_{j != i} R_j``, an unbiased baseline because it never includes ``R_i`` itself.
    - ``grpo`` (Shao et al. 2024, TRL's ``GRPOTrainer``, verl's ``grpo``): ``A_i = (R_i - mean_g R) / (std_g R + eps)``
      with the unbiased group std; ``scale_by_std=False`` is Dr. GRPO (Liu et al. 2025), which drops the std
      scaling (it up-weights prompts whose replies barely differ).

    A group of one reply has no baseline: its advantage is 0.

    Args:
        returns: ``(B,)`` episode returns.
        groups: ``(B,)`` integer group ids (replies to the same prompt share one).
        estimator: ``"grpo"`` or ``"rloo"``.
        scale_by_std: divide GRPO advantages by the group's std.

    Returns:
        ``(B,)`` float advantages.
    """
    r = _upcast(returns)
    _, inv = torch.unique(groups, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))[inv]
    total = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, inv, r)[inv]
    alone = count < 2
    if estimator == "rloo":
        adv = r - (total - r) / (count - 1).clamp(min=1)
    elif estimator == "grpo":
        mean = total / count
        adv = r - mean
        if scale_by_std:
            sq = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, inv, (r - mean) ** 2)[inv]
            adv = adv / ((sq / (count - 1).clamp(min=1)).sqrt() + GROUP_STD_EPS)
    else:
        raise ValueError(f"group_advantages: estimator={estimator!r}; expected 'grpo' or 'rloo'")
    return torch.where(alone, torch.zeros_like(adv), adv)


GROUP_STD_EPS = 1e-4
"""Added to the group std of GRPO advantages (TRL uses 1e-4): a group of equal returns gets advantage 0."""


def compute_targets(
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor,
    scores: Tensor,
    action_mask: Tensor,
    last_values: Tensor,
    truncated: Tensor,
    cfg: PPOConfig,
    kl_coef: float,
    reduce_fn: ReduceFn | None = None,
    groups: Tensor | None = None,
) -> tuple[Targets, dict[str, float]]:
    """KL-shaped rewards -> GAE -> advantage whitening, plus the batch-level metrics, for one rollout batch.

    Args:
        old_logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy that is about to be updated.
        ref_logprobs: ``(B, T)`` the same under the frozen reference.
        values: ``(B, T)`` critic values before the update.
        scores: ``(B, T)`` turn-end scores (see :func:`shape_rewards`).
        action_mask: ``(B, T)``.
        last_values: ``(B,)``.
        truncated: ``(B,)`` bool.
        cfg: reads ``kl_estimator``, ``kl_in_loss``, ``gamma``, ``gae_lambda``, ``norm_adv``.
        kl_coef: the KL controller's current ``.value`` (the rewards use it unless ``kl_in_loss``).
        reduce_fn: sum over data-parallel workers; whitening and metrics then use global batch statistics.
        groups: ``(B,)`` prompt ids of the replies, needed by ``cfg.advantage`` ``grpo`` / ``rloo``.

    With ``cfg.advantage`` ``grpo`` / ``rloo`` step 3 is :func:`group_advantages` over the episode returns (the sum
    of the shaped rewards), each action token of a reply carrying its reply's advantage; no critic, no GAE, no
    batch whitening (the group baseline already centres them). ``values`` and ``last_values`` are then ignored.

    Returns:
        ``(Targets, metrics)`` with metric keys :data:`KL_REF`, :data:`KL_COEF`, :data:`EXPLAINED_VARIANCE`,
        :data:`RETURN_MEAN`, :data:`VALUE_MEAN` (Python floats).
    """
    keep = action_mask.bool()
    # 1. per-token KL to the frozen reference (0 off the action tokens)
    kl = torch.where(keep, kl_penalty(old_logprobs, ref_logprobs, cfg.kl_estimator), 0.0)
    # 2. reward = turn-end score - kl_coef * KL, per action token (with ppo.kl_in_loss the KL is in the loss instead)
    rewards = shape_rewards(scores, kl, 0.0 if cfg.kl_in_loss else kl_coef, action_mask)
    if cfg.advantage != "gae":
        # 3'. critic-free: one advantage per reply from its group (replies to the same prompt)
        if groups is None:
            raise ValueError(f"compute_targets: ppo.advantage={cfg.advantage} needs the replies' group ids")
        episode_return = torch.where(keep, _upcast(rewards), 0.0).sum(-1)  # (B,)
        seq_adv = group_advantages(episode_return, groups, cfg.advantage, scale_by_std=not cfg.dr_grpo)
        advantages = torch.where(keep, seq_adv[:, None].to(rewards.dtype), 0.0)
        returns = torch.where(keep, episode_return[:, None].to(rewards.dtype), 0.0)
    else:
        # 3. GAE over action tokens, bootstrapping at truncation
        advantages, returns = compute_gae(
            rewards, values, action_mask, last_values, truncated, cfg.gamma, cfg.gae_lambda
        )
    # 4. whiten advantages once over the whole batch (deviation 4 in the module docstring)
    if cfg.norm_adv and cfg.advantage == "gae":
        advantages = masked_whiten(advantages, action_mask, reduce_fn=reduce_fn)
    # 5. batch metrics (sequence-level KL: the quantity adaptive_kl_target is expressed in)
    seq_kl = sequence_kl(kl, action_mask)
    metrics = {
        KL_REF: masked_mean(seq_kl, torch.ones_like(seq_kl), reduce_fn=reduce_fn).item(),
        KL_COEF: float(kl_coef),
        EXPLAINED_VARIANCE: explained_variance(values, returns, action_mask, reduce_fn=reduce_fn),
        RETURN_MEAN: masked_mean(returns, action_mask, reduce_fn=reduce_fn).item(),
        VALUE_MEAN: masked_mean(_upcast(values), action_mask, reduce_fn=reduce_fn).item(),
    }
    return Targets(advantages, returns, rewards, kl), metrics


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


def _token_mean(x: Tensor, mask: Tensor, denominator: float | Tensor | None) -> Tensor:
    """Masked sum divided by ``denominator`` (the minibatch's token count), or a plain masked mean when None."""
    if denominator is None:
        return masked_mean(x, mask)
    return _sum_count(x, mask)[0] / denominator


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    clip_coef: float,
    loss_denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective, as a loss: ``mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``.

    The max of the two negated terms is the pessimistic bound: once the ratio has moved past ``1 + eps`` for a
    positive advantage (or below ``1 - eps`` for a negative one) the loss is flat and its gradient is zero.

    Args:
        logprobs: ``(B, T)`` log-probs under the policy being optimised (requires grad).
        old_logprobs: ``(B, T)`` log-probs under the policy that sampled / started the update (no grad).
        advantages: ``(B, T)``.
        action_mask: ``(B, T)``.
        clip_coef: epsilon.
        loss_denominator: divide the masked sum by this instead of the local token count (see ``ppo_loss``).

    Returns:
        ``(loss, stats)``: 0-dim loss; detached 0-dim stats ``clipfrac`` (share of tokens with
        ``|ratio - 1| > eps``), ``approx_kl`` (k3 estimate of KL(old || new), cleanrl's), ``ratio_mean``.
    """
    keep = action_mask.bool()
    # 1. log-ratio in fp32 (at least), zeroed off the action tokens so padding (-inf, garbage) cannot make NaN
    log_ratio = torch.where(keep, _upcast(logprobs) - _upcast(old_logprobs), 0.0)
    ratio = log_ratio.exp()
    adv = _upcast(advantages)
    # 2. pessimistic clipped surrogate
    pg_losses = -adv * ratio
    pg_losses_clipped = -adv * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    loss = _token_mean(torch.maximum(pg_losses, pg_losses_clipped), action_mask, loss_denominator)
    # 3. diagnostics (cleanrl): k3 of old vs new, and how many tokens the clip is acting on
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(((ratio - 1.0).abs() > clip_coef).float(), action_mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, action_mask),
            "ratio_mean": masked_mean(ratio, action_mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    clip_coef: float | None,
    loss_denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * mean(max((V - R)^2, (V_clipped - R)^2))``, ``V_clipped = V_old + clip(V - V_old)``.

    The clip keeps ``V`` within ``+-clip_coef`` of the rollout-time value; cleanrl's / TRL's form.
    SB3's ``clip_range_vf`` uses the clipped term alone instead of the max.

    Args:
        values: ``(B, T)`` critic values being optimised (requires grad).
        old_values: ``(B, T)`` values at rollout time.
        returns: ``(B, T)`` value targets from :func:`compute_gae`.
        action_mask: ``(B, T)``.
        clip_coef: clip range in value units; None = unclipped ``0.5 * (V - R)^2``.
        loss_denominator: as in :func:`policy_loss`.

    Returns:
        ``(loss, stats)`` with detached ``clipfrac``: share of tokens where the clipped term is the larger one.
    """
    keep = action_mask.bool()
    v = _upcast(values)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    v = torch.where(keep, v, zero)
    ret = torch.where(keep, _upcast(returns), zero)
    unclipped = (v - ret).square()
    if clip_coef is None:
        return 0.5 * _token_mean(unclipped, action_mask, loss_denominator), {"clipfrac": zero.clone()}
    v_old = torch.where(keep, _upcast(old_values), zero)
    v_clipped = v_old + (v - v_old).clamp(-clip_coef, clip_coef)
    clipped = (v_clipped - ret).square()
    loss = 0.5 * _token_mean(torch.maximum(unclipped, clipped), action_mask, loss_denominator)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), action_mask)
    return loss, {"clipfrac": clipfrac}


def entropy_bonus(entropy: Tensor, action_mask: Tensor, loss_denominator: float | Tensor | None = None) -> Tensor:
    """Token-mean policy entropy over action tokens; the loss subtracts ``ent_coef`` times this.

    Args:
        entropy: ``(B, T)`` entropy of pi(. | x_<t) in nats.
        action_mask: ``(B, T)``.
        loss_denominator: as in :func:`policy_loss`.

    Returns:
        0-dim tensor.
    """
    return _token_mean(_upcast(entropy), action_mask, loss_denominator)


def ppo_loss(
    logprobs: Tensor,
    entropy: Tensor,
    values: Tensor,
    old_logprobs: Tensor,
    old_values: Tensor,
    advantages: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    cfg: PPOConfig,
    loss_denominator: float | Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO loss of one (micro-)batch: ``pg + vf_coef * v - ent_coef * H`` (cleanrl's overall loss), plus
    ``kl_coef * mean k3(logprobs, ref_logprobs)`` with ``cfg.kl_in_loss`` (GRPO's KL term).

    Loss aggregation: by default each term is a token mean over this call's action tokens. When a minibatch
    is split into micro-batches (gradient accumulation) and/or data-parallel shards, pass
    ``loss_denominator = (action tokens of the whole minibatch) / world_size`` to every call and sum the
    micro-batch losses (DDP averages gradients over ``world_size``): the accumulated gradient then equals the
    full-minibatch gradient exactly, however unevenly tokens fall into micro-batches.

    Args:
        logprobs: ``(B, T)`` new log-probs (requires grad).
        entropy: ``(B, T)`` new entropies.
        values: ``(B, T)`` new values (requires grad).
        old_logprobs: ``(B, T)`` log-probs before the update (or the behaviour policy's, when off-policy).
        old_values: ``(B, T)`` values before the update.
        advantages: ``(B, T)`` from :func:`compute_targets`.
        returns: ``(B, T)`` from :func:`compute_targets`.
        action_mask: ``(B, T)``.
        cfg: reads ``clip_coef``, ``clip_vloss``, ``vf_coef``, ``ent_coef``, ``kl_in_loss``.
        loss_denominator: see above; None = local token mean.
        ref_logprobs: ``(B, T)`` the reference's log-probs of the same tokens (needed with ``kl_in_loss``).
        kl_coef: the KL controller's current ``.value`` (used with ``kl_in_loss``).

    Returns:
        ``(loss, metrics)``: 0-dim loss; detached 0-dim tensors under :data:`LOSS`, :data:`POLICY_LOSS`,
        :data:`VALUE_LOSS`, :data:`ENTROPY`, :data:`APPROX_KL`, :data:`CLIPFRAC`, :data:`VF_CLIPFRAC`,
        :data:`RATIO_MEAN`, and :data:`KL_LOSS` with ``kl_in_loss`` (tensors, so the learner can all-reduce
        them before one ``.item()``).

    Raises:
        ValueError: ``kl_in_loss`` without ``ref_logprobs``.
    """
    # 1. clipped surrogate
    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs, advantages, action_mask, cfg.clip_coef, loss_denominator)
    # 2. (clipped) value loss; clipping uses the same epsilon, as in cleanrl. Critic-free estimators have none.
    if cfg.advantage == "gae":
        v_clip = cfg.clip_coef if cfg.clip_vloss else None
        v_loss, v_stats = value_loss(values, old_values, returns, action_mask, v_clip, loss_denominator)
    else:
        v_loss, v_stats = logprobs.new_zeros(()), {"clipfrac": logprobs.new_zeros(())}
    # 3. entropy bonus
    ent = entropy_bonus(entropy, action_mask, loss_denominator)
    # 4. overall loss
    loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent
    # 5. GRPO's KL term (ppo.kl_in_loss): k3 differentiated through the new log-probs, d k3 / d logp =
    # 1 - pi_ref / pi, whose expectation under pi is the gradient of KL(pi_ref || pi) (deviation 1)
    kl_loss = None
    if cfg.kl_in_loss:
        if ref_logprobs is None:
            raise ValueError("ppo_loss: ppo.kl_in_loss needs ref_logprobs (the reference's log-probs)")
        kl_loss = _token_mean(kl_penalty(logprobs, ref_logprobs, "k3"), action_mask, loss_denominator)
        loss = loss + kl_coef * kl_loss
    # 6. metrics as local token means (independent of loss_denominator)
    with torch.no_grad():
        scale = 1.0 if loss_denominator is None else _local_tokens(action_mask) / loss_denominator
        metrics = {
            LOSS: loss.detach() / scale,
            POLICY_LOSS: pg_loss.detach() / scale,
            VALUE_LOSS: v_loss.detach() / scale,
            ENTROPY: ent.detach() / scale,
            APPROX_KL: pg_stats["approx_kl"],
            CLIPFRAC: pg_stats["clipfrac"],
            VF_CLIPFRAC: v_stats["clipfrac"],
            RATIO_MEAN: pg_stats["ratio_mean"],
        }
        if kl_loss is not None:
            metrics[KL_LOSS] = kl_loss.detach() / scale
    return loss, metrics


def _local_tokens(action_mask: Tensor) -> Tensor:
    """Number of action tokens, at least 1 (so an empty micro-batch does not divide by zero)."""
    return action_mask.bool().sum().float().clamp(min=1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce_fn: ReduceFn | None = None) -> float:
    """``1 - Var[R - V] / Var[R]`` over masked tokens: 1 = perfect critic, 0 = no better than a constant.

    Args:
        values: ``(B, T)`` critic predictions.
        returns: ``(B, T)`` value targets.
        mask: ``(B, T)``.
        reduce_fn: sum over data-parallel workers.

    Returns:
        A float; 0.0 when ``Var[R] == 0`` (cleanrl / SB3 return NaN; deviation 8 in the module docstring).
    """
    values, returns = values.detach().double(), returns.detach().double()
    var_r = _masked_moments(returns, mask, unbiased=False, reduce_fn=reduce_fn)[1]
    if float(var_r) == 0.0:
        return 0.0
    var_err = _masked_moments(returns - values, mask, unbiased=False, reduce_fn=reduce_fn)[1]
    return float(1.0 - var_err / var_r)


# --------------------------------------------------------------------------------------------------------------
# KL controllers (Ziegler et al. 2019, section 2.2; TRL's FixedKLController / AdaptiveKLController)
# --------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = _state_value(state, type(self).__name__)


class AdaptiveKLController:
    """Proportional controller that moves the KL coefficient so the sequence-level KL tracks ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``, with ``n_steps`` the
    number of episodes in the batch the KL was measured on (https://arxiv.org/abs/1909.08593, eq. 2).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0:
            raise ConfigError(f"ppo.adaptive_kl_target={target!r}: expected a positive target KL; use e.g. 6.0")
        if horizon <= 0:
            raise ConfigError(f"ppo.kl_horizon={horizon!r}: expected a positive horizon; use e.g. 10000")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt the coefficient after a batch of ``n_steps`` episodes whose mean sequence KL was ``current_kl``.

        Returns:
            The new coefficient (also in ``.value``).
        """
        if not math.isfinite(current_kl):
            return self.value  # a non-finite KL must not poison the coefficient; the guardrails report it
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = _state_value(state, type(self).__name__)


def _state_value(state: dict[str, Any], owner: str) -> float:
    value = state.get("value") if isinstance(state, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CheckpointError(
            f"{owner}.load_state_dict: expected a dict with a numeric 'value', found {state!r}; "
            "the checkpoint's KL-controller state is corrupt or from another program"
        )
    return float(value)


def make_kl_controller(ppo_cfg: PPOConfig) -> FixedKLController | AdaptiveKLController:
    """The KL controller the config asks for: adaptive if ``ppo.adaptive_kl``, else fixed at ``ppo.kl_coef``."""
    if ppo_cfg.adaptive_kl:
        return AdaptiveKLController(ppo_cfg.kl_coef, ppo_cfg.adaptive_kl_target, ppo_cfg.kl_horizon)
    return FixedKLController(ppo_cfg.kl_coef)


# --------------------------------------------------------------------------------------------------------------
# Update-loop helpers: early stop, learning-rate schedule, minibatches
# --------------------------------------------------------------------------------------------------------------


def should_early_stop(approx_kl: float, target_kl: float) -> bool:
    """True when the update has moved too far from the sampling policy: ``approx_kl > 1.5 * target_kl``.

    ``target_kl <= 0`` disables the rule. A non-finite ``approx_kl`` also stops (nothing good follows a NaN).
    """
    if target_kl <= 0:
        return False
    return not math.isfinite(approx_kl) or approx_kl > 1.5 * target_kl


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based), for ``torch.optim.LambdaLR``.

    A picklable object rather than a closure, so it travels to Ray Train workers and ``LambdaLR.state_dict()``
    stores it.
    """

    schedule: str
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        # 1. linear warm-up from 1/warmup_steps to 1 (the first step already learns; deviation 7)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        # 2. decay from 1 at the end of warm-up to 0 at total_steps
        progress = min((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 1.0)
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier for ``torch.optim.lr_scheduler.LambdaLR``: warm-up, then constant/linear/cosine.

    Call ``scheduler.step()`` after every ``optimizer.step()``; optimizer step ``k`` (0-based) then runs at
    ``lr * f(k)``.

    Args:
        schedule: ``constant``, ``linear`` or ``cosine``.
        warmup_steps: optimizer steps of linear warm-up (0 = none).
        total_steps: optimizer steps of the whole run (decay reaches 0 here).

    Raises:
        ConfigError: unknown schedule, negative warm-up, non-positive total.
    """
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule={schedule!r}: expected one of {', '.join(LR_SCHEDULES)}; use constant")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps={warmup_steps!r}: expected >= 0; use 0 for no warm-up")
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps!r}: expected at least 1 optimizer step; check the iterations")
    return LRSchedule(schedule, warmup_steps, total_steps)


def minibatch_indices(n: int, num_minibatches: int, generator: torch.Generator) -> list[Tensor]:
    """A random permutation of ``range(n)`` split into ``num_minibatches`` parts (sizes differ by at most 1).

    Args:
        n: rows (episodes) in the rollout batch.
        num_minibatches: parts per epoch.
        generator: seeded torch generator (its state goes into checkpoints for exact resume).

    Returns:
        ``num_minibatches`` int64 index tensors covering every row exactly once.

    Raises:
        ConfigError: ``num_minibatches`` < 1 or > n (a minibatch would be empty).
    """
    if not 1 <= num_minibatches <= n:
        raise ConfigError(
            f"ppo.num_minibatches={num_minibatches}: expected between 1 and the {n} episodes of the rollout batch; "
            "lower ppo.num_minibatches or raise rollout.envs_per_worker / rollout.num_workers"
        )
    perm = torch.randperm(n, generator=generator, device=generator.device)
    return list(torch.tensor_split(perm, num_minibatches))
