"""PPO maths (rlchat/ppo.py) against plain loops, closed forms and hand values. Fast, no Ray, no model code."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import threading
from pathlib import Path

import pytest
import torch

from rlchat import ppo
from rlchat.config import PPOConfig
from rlchat.errors import CheckpointError, ConfigError

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------------
# Fixtures: random multi-turn episodes
# --------------------------------------------------------------------------------------------------------------


def random_episodes(B: int = 8, T: int = 24, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Rows: prompt, then alternating assistant spans / user-turn gaps, then padding; random truncation.

    Returns rewards, values, action_mask, last_values, truncated. Row 0 has no action token at all.
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(1, B):
        t = int(torch.randint(1, 4, (), generator=g))  # prompt
        end = T - int(torch.randint(0, 4, (), generator=g))  # padding at the end
        while t < end:
            span = int(torch.randint(1, 5, (), generator=g))
            mask[b, t : min(t + span, end)] = True
            t += span + int(torch.randint(1, 4, (), generator=g))  # a user turn the policy did not choose
    rewards = torch.randn(B, T, generator=g, dtype=dtype)
    values = torch.randn(B, T, generator=g, dtype=dtype)
    last_values = torch.randn(B, generator=g, dtype=dtype)
    truncated = torch.rand(B, generator=g) < 0.5
    truncated[1], truncated[2] = True, False  # both kinds always present
    return rewards, values, mask, last_values, truncated


def gae_reference(rewards, values, mask, last_values, truncated, gamma, lam):
    """Plain per-row Python loop over the list of action positions."""
    adv = torch.zeros_like(values)
    ret = torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[b, t]]
        next_v = float(last_values[b]) if truncated[b] else 0.0
        last = 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + float(values[b, t])
            next_v = float(values[b, t])
    return adv, ret


# --------------------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 0.0), (0.5, 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_plain_loop(gamma: float, lam: float, seed: int) -> None:
    r, v, m, lv, tr = random_episodes(seed=seed)
    adv, ret = ppo.compute_gae(r, v, m, lv, tr, gamma, lam)
    ref_adv, ref_ret = gae_reference(r, v, m, lv, tr, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-12, atol=1e-12)
    assert adv.shape == ret.shape == (8, 24)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()
    assert (adv[0] == 0).all()  # a row without action tokens


def test_gae_float32_inputs_give_float32() -> None:
    r, v, m, lv, tr = random_episodes(dtype=torch.float32)
    adv, ret = ppo.compute_gae(r, v.bfloat16(), m, lv, tr, 1.0, 0.95)
    assert adv.dtype == ret.dtype == torch.float32


def test_gae_closed_form_lambda1_gamma1_is_future_reward_sum_minus_value() -> None:
    r, v, m, lv, tr = random_episodes(seed=3)
    adv, ret = ppo.compute_gae(r, v, m, lv, tr, gamma=1.0, gae_lambda=1.0)
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if not m[b, t]:
                continue
            future = float((r[b, t:] * m[b, t:]).sum()) + (float(lv[b]) if tr[b] else 0.0)
            assert adv[b, t].item() == pytest.approx(future - float(v[b, t]), abs=1e-10)
            assert ret[b, t].item() == pytest.approx(future, abs=1e-10)  # Monte Carlo return


def test_gae_closed_form_lambda0_is_td_error() -> None:
    gamma = 0.9
    r, v, m, lv, tr = random_episodes(seed=4)
    adv, _ = ppo.compute_gae(r, v, m, lv, tr, gamma=gamma, gae_lambda=0.0)
    for b in range(v.shape[0]):
        idx = m[b].nonzero().flatten().tolist()
        for i, t in enumerate(idx):
            nxt = float(v[b, idx[i + 1]]) if i + 1 < len(idx) else (float(lv[b]) if tr[b] else 0.0)
            assert adv[b, t].item() == pytest.approx(float(r[b, t]) + gamma * nxt - float(v[b, t]), abs=1e-12)


def test_gae_hand_example_two_turns() -> None:
    # prompt | a0 a1 | user u | a3 | pad ; gamma=1, lambda=1, terminated: A_t = sum of later rewards - V_t
    m = torch.tensor([[0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    r = torch.tensor([[9.0, 0.0, 1.0, 9.0, 2.0, 9.0]])
    v = torch.tensor([[9.0, 0.5, 0.25, 9.0, 1.0, 9.0]])
    adv, ret = ppo.compute_gae(r, v, m, torch.tensor([7.0]), torch.tensor([False]), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 2.5, 2.75, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 3.0, 3.0, 0.0, 2.0, 0.0]]))


def test_gae_invariant_to_values_at_masked_positions() -> None:
    r, v, m, lv, tr = random_episodes(seed=5)
    adv, ret = ppo.compute_gae(r, v, m, lv, tr, 0.99, 0.95)
    for junk in (torch.randn_like(v) * 1e3, torch.full_like(v, float("nan")), torch.full_like(v, float("inf"))):
        v2 = torch.where(m, v, junk)
        r2 = torch.where(m, r, junk)  # rewards off the action tokens are ignored too
        adv2, ret2 = ppo.compute_gae(r2, v2, m, lv, tr, 0.99, 0.95)
        torch.testing.assert_close(adv2, adv, rtol=0, atol=0)
        torch.testing.assert_close(ret2, ret, rtol=0, atol=0)


def test_gae_bootstraps_only_at_truncation() -> None:
    gamma, lam = 0.9, 0.8
    r, v, m, lv, tr = random_episodes(seed=6)
    adv, ret = ppo.compute_gae(r, v, m, lv, tr, gamma, lam)
    adv2, ret2 = ppo.compute_gae(r, v, m, lv + 1.0, tr, gamma, lam)
    diff = adv2 - adv
    assert (diff[~tr] == 0).all()  # terminated rows ignore last_values
    for b in tr.nonzero().flatten().tolist():
        idx = m[b].nonzero().flatten().tolist()
        for i, t in enumerate(idx):
            after = len(idx) - 1 - i  # action tokens after t
            assert diff[b, t].item() == pytest.approx(gamma * (gamma * lam) ** after, abs=1e-12)
    # a truncated row with one action token: A = r + gamma * last_value - V
    m1 = torch.tensor([[False, True]])
    a1, _ = ppo.compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.5]]), m1, torch.tensor([2.0]),
                            torch.tensor([True]), 0.5, 0.95)  # fmt: skip
    assert a1[0, 1].item() == pytest.approx(1.0 + 0.5 * 2.0 - 0.5)


# --------------------------------------------------------------------------------------------------------------
# KL estimators and reward shaping
# --------------------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.1]], dtype=torch.float64))
    logq = torch.log(torch.tensor([[0.25, 0.5, 0.1]], dtype=torch.float64))
    ln2 = math.log(2.0)
    k1 = ppo.kl_penalty(logp, logq, "k1")
    torch.testing.assert_close(k1, torch.tensor([[ln2, -ln2, 0.0]], dtype=torch.float64))
    k3 = ppo.kl_penalty(logp, logq, "k3")  # r = q / p ; (r - 1) - log r
    torch.testing.assert_close(k3, torch.tensor([[-0.5 + ln2, 1.0 - ln2, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ppo.kl_penalty(logp, logq, "abs"), torch.tensor([[ln2, ln2, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(
        ppo.kl_penalty(logp, logq, "mse"), torch.tensor([[0.5 * ln2**2, 0.5 * ln2**2, 0.0]], dtype=torch.float64)
    )
    assert (ppo.kl_penalty(torch.randn(50, 50), torch.randn(50, 50), "k3") >= 0).all()


def test_kl_estimators_unbiased_on_samples() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    true_kl = float((p * (p.log() - q.log())).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x][None], q.log()[x][None]
    for est in ("k1", "k3"):
        assert ppo.kl_penalty(logp, logq, est).mean().item() == pytest.approx(true_kl, rel=0.03)


def test_kl_penalty_unknown_estimator() -> None:
    with pytest.raises(ConfigError, match=r"ppo.kl_estimator='k9'.*expected one of k1, k3"):
        ppo.kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k9")


def test_shape_rewards() -> None:
    m = torch.tensor([[0, 1, 1, 0, 1]], dtype=torch.bool)
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0]])
    kl = torch.tensor([[5.0, 0.5, -1.0, 5.0, 2.0]])
    r = ppo.shape_rewards(scores, kl, 0.1, m)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 1.1, 0.0, 1.8]]))
    with pytest.raises(ValueError, match="row 0, position 3 is on a non-action token"):
        ppo.shape_rewards(torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]), kl, 0.1, m)


# --------------------------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------------------------


def test_masked_mean_var_match_selected_entries() -> None:
    _, v, m, _, _ = random_episodes(seed=7)
    sel = v[m]
    assert ppo.masked_mean(v, m).item() == pytest.approx(sel.mean().item())
    assert ppo.masked_var(v, m).item() == pytest.approx(sel.var().item())
    assert ppo.masked_var(v, m, unbiased=False).item() == pytest.approx(sel.var(unbiased=False).item())
    rows = ppo.masked_mean(v, m, dim=1)
    assert rows.shape == (8,) and rows[0].item() == 0.0  # empty row -> 0, not NaN
    assert rows[3].item() == pytest.approx(v[3][m[3]].mean().item())
    assert ppo.masked_mean(v, torch.zeros_like(m)).item() == 0.0
    one = torch.zeros_like(m)
    one[3, 5] = True
    assert ppo.masked_var(v, one).item() == 0.0  # one entry: no NaN from n - 1
    ones = torch.ones(1000, dtype=torch.bfloat16)  # a bf16 count stops at 256: sums are taken in fp32
    assert ppo.masked_mean(ones * 3, torch.ones(1000)).item() == 3.0


def test_masked_whiten_mean0_std1_over_mask() -> None:
    _, v, m, _, _ = random_episodes(seed=8)
    w = ppo.masked_whiten(v * 3 + 7, m)
    assert w[m].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert w[m].std().item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~m] == 0).all()
    w2 = ppo.masked_whiten(v * 3 + 7, m, shift_mean=False)
    assert w2[m].mean().item() == pytest.approx((v * 3 + 7)[m].mean().item())
    assert w2[m].std().item() == pytest.approx(1.0, abs=1e-6)


class ThreadAllReduce:
    """Simulates a SUM all-reduce between `world` threads (each thread is one data-parallel rank)."""

    def __init__(self, world: int) -> None:
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world)

    def fn(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            return out

        return reduce


def run_ranks(world: int, work) -> list:
    ar, results = ThreadAllReduce(world), [None] * world

    def target(rank: int) -> None:
        results[rank] = work(rank, ar.fn(rank))

    threads = [threading.Thread(target=target, args=(k,)) for k in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    return results


def test_masked_whiten_with_reduce_fn_equals_full_batch() -> None:
    _, v, m, _, _ = random_episodes(seed=9)
    full = ppo.masked_whiten(v, m)
    shards = [slice(0, 3), slice(3, 8)]  # unequal token counts per rank
    out = run_ranks(2, lambda k, fn: ppo.masked_whiten(v[shards[k]], m[shards[k]], reduce_fn=fn))
    torch.testing.assert_close(torch.cat(out), full, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


def _one_token(ratio: float, adv: float, eps: float = 0.2):
    old = torch.zeros(1, 1, dtype=torch.float64)
    new = torch.full((1, 1), math.log(ratio), dtype=torch.float64, requires_grad=True)
    loss, stats = ppo.policy_loss(new, old, torch.full((1, 1), adv, dtype=torch.float64), torch.ones(1, 1), eps)
    loss.backward()
    return loss.item(), new.grad.item(), stats


@pytest.mark.parametrize(
    "ratio,adv,clipped",
    [
        (1.5, 1.0, True),  # A > 0, ratio above 1 + eps: no incentive to push further -> flat
        (0.5, 1.0, False),  # A > 0, ratio below 1 - eps: unclipped term is the pessimistic one -> gradient
        (0.5, -1.0, True),  # A < 0, ratio below 1 - eps -> flat
        (1.5, -1.0, False),  # A < 0, ratio above 1 + eps -> gradient pulls it back
        (1.1, 1.0, False),  # inside the clip region
        (0.9, -1.0, False),
    ],
)
def test_policy_loss_clipping(ratio: float, adv: float, clipped: bool) -> None:
    eps = 0.2
    loss, grad, stats = _one_token(ratio, adv, eps)
    assert loss == pytest.approx(max(-adv * ratio, -adv * min(max(ratio, 1 - eps), 1 + eps)))
    if clipped:
        assert grad == 0.0
    else:
        assert grad == pytest.approx(-adv * ratio)  # d(-A * exp(logp))/dlogp
    assert stats["clipfrac"].item() == (1.0 if abs(ratio - 1) > eps else 0.0)
    assert stats["ratio_mean"].item() == pytest.approx(ratio)
    assert stats["approx_kl"].item() == pytest.approx((ratio - 1) - math.log(ratio))  # cleanrl's k3


def test_policy_loss_clip_boundaries_exact() -> None:
    # the clipped region starts exactly at 1 +- eps: just inside keeps the gradient, just outside loses it
    for ratio, adv, has_grad in [(1.19, 1.0, True), (1.21, 1.0, False), (0.81, -1.0, True), (0.79, -1.0, False)]:
        _, grad, _ = _one_token(ratio, adv)
        assert (grad != 0.0) == has_grad, (ratio, adv)


def test_policy_loss_token_mean_and_nan_safe_padding() -> None:
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 0.0]])
    new = torch.tensor([[0.0, 0.0, float("-inf")], [0.0, float("-inf"), 5.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, -3.0, float("nan")]])
    loss, stats = ppo.policy_loss(new, old, adv, m, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 3.0) / 3)  # ratio 1 -> -mean(A) over 3 action tokens
    assert torch.isfinite(new.grad).all()
    torch.testing.assert_close(new.grad, torch.tensor([[-1 / 3, 2 / 3, 0.0], [-1.0, 0.0, 0.0]]))
    assert all(math.isfinite(s.item()) for s in stats.values())


def test_value_loss_hand_values() -> None:
    m = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, -1.0, 9.0]])
    v = torch.tensor([[0.5, 0.1, 0.5, 3.0]], requires_grad=True)
    loss, stats = ppo.value_loss(v, old, ret, m, clip_coef=0.2)
    # token 0: unclipped (0.5-1)^2=.25, clipped (0.2-1)^2=.64 -> .64 ; token 1: both (0.1-1)^2=.81 ;
    # token 2: unclipped (0.5+1)^2=2.25, clipped (0.2+1)^2=1.44 -> 2.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert v.grad[0, 0].item() == 0.0  # the clipped term wins: flat in V
    loss_u, stats_u = ppo.value_loss(v, old, ret, m, clip_coef=None)
    assert loss_u.item() == pytest.approx(0.5 * (0.25 + 0.81 + 2.25) / 3)
    assert stats_u["clipfrac"].item() == 0.0


def test_entropy_bonus_and_explained_variance() -> None:
    m = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    assert ppo.entropy_bonus(torch.tensor([[1.0, 2.0, 100.0]]), m).item() == pytest.approx(1.5)
    _, v, mm, _, _ = random_episodes(seed=10)
    ret = v + 0.1 * torch.randn_like(v)
    expected = 1 - (ret - v)[mm].var(unbiased=False) / ret[mm].var(unbiased=False)
    assert ppo.explained_variance(v, ret, mm) == pytest.approx(expected.item())
    assert ppo.explained_variance(v, v, mm) == pytest.approx(1.0)
    assert ppo.explained_variance(v, torch.full_like(v, 2.0), mm) == 0.0  # constant returns: 0, not NaN


def _cfg(**kw) -> PPOConfig:
    return dataclasses.replace(PPOConfig(), **kw)


def test_ppo_loss_composes_terms_and_metric_keys() -> None:
    r, v, m, lv, tr = random_episodes(seed=11, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    old_lp = -torch.rand(8, 24, generator=g)
    new_lp = (old_lp + 0.3 * torch.randn(8, 24, generator=g)).requires_grad_()
    ent = torch.rand(8, 24, generator=g)
    new_v = (v + 0.5 * torch.randn(8, 24, generator=g)).requires_grad_()
    adv, ret = ppo.compute_gae(r, v, m, lv, tr, 1.0, 0.95)
    cfg = _cfg(vf_coef=0.7, ent_coef=0.01, clip_coef=0.2, clip_vloss=True)
    loss, metrics = ppo.ppo_loss(new_lp, ent, new_v, old_lp, v, adv, ret, m, cfg)
    pg, _ = ppo.policy_loss(new_lp, old_lp, adv, m, 0.2)
    vl, _ = ppo.value_loss(new_v, v, ret, m, 0.2)
    h = ppo.entropy_bonus(ent, m)
    assert loss.item() == pytest.approx((pg + 0.7 * vl - 0.01 * h).item(), rel=1e-6)
    assert set(metrics) == {
        ppo.LOSS, ppo.POLICY_LOSS, ppo.VALUE_LOSS, ppo.ENTROPY, ppo.APPROX_KL, ppo.CLIPFRAC, ppo.VF_CLIPFRAC,
        ppo.RATIO_MEAN,
    }  # fmt: skip
    assert metrics[ppo.POLICY_LOSS].item() == pytest.approx(pg.item(), rel=1e-6)
    assert 0 < metrics[ppo.CLIPFRAC].item() < 1 and metrics[ppo.APPROX_KL].item() > 0
    assert all(not t.requires_grad and t.dim() == 0 for t in metrics.values())
    # with a global denominator the metrics are still this call's token means
    _, metrics_d = ppo.ppo_loss(new_lp, ent, new_v, old_lp, v, adv, ret, m, cfg, loss_denominator=1000.0)
    for k in metrics:
        assert metrics_d[k].item() == pytest.approx(metrics[k].item(), rel=1e-5), k
    _, metrics_nc = ppo.ppo_loss(new_lp, ent, new_v, old_lp, v, adv, ret, m, _cfg(clip_vloss=False))
    assert metrics_nc[ppo.VF_CLIPFRAC].item() == 0.0


class TinyPolicy(torch.nn.Module):
    """Per-position logits and values from token embeddings: enough parameters to compare gradients."""

    def __init__(self, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.head = torch.nn.Linear(d, vocab)
        self.vhead = torch.nn.Linear(d, 1)

    def forward(self, ids: torch.Tensor):
        h = torch.tanh(self.emb(ids[:, :-1]))
        h = torch.cat([torch.zeros_like(h[:, :1]), h], 1)  # position t sees token t-1
        logits = self.head(h)
        logp_all = torch.log_softmax(logits, -1)
        logprobs = logp_all.gather(-1, ids[..., None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logprobs, entropy, self.vhead(h).squeeze(-1)


def test_grad_accumulation_and_ddp_equal_full_minibatch_gradient() -> None:
    torch.manual_seed(0)
    model = TinyPolicy().double()
    B, T = 5, 9
    ids = torch.randint(0, 11, (B, T))
    m = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate([(2, 9), (1, 3), (4, 6), (1, 9), (3, 4)]):  # very unequal token counts
        m[b, s:e] = True
    with torch.no_grad():
        lp0, _, v0 = model(ids)
    old_lp = lp0 + 0.3 * torch.randn(B, T, dtype=torch.float64)  # ratios away from 1: some clipping
    adv = ppo.masked_whiten(torch.randn(B, T, dtype=torch.float64), m)
    ret = torch.where(m, torch.randn(B, T, dtype=torch.float64), 0.0)
    cfg = _cfg(vf_coef=0.5, ent_coef=0.01, clip_coef=0.2, clip_vloss=True)

    def grads(loss_fn) -> list[torch.Tensor]:
        model.zero_grad()
        loss_fn()
        return [p.grad.clone() for p in model.parameters()]

    def loss_rows(rows, denom=None):
        lp, ent, val = model(ids[rows])
        loss, metrics = ppo.ppo_loss(lp, ent, val, old_lp[rows], v0[rows], adv[rows], ret[rows], m[rows], cfg, denom)
        return loss, metrics

    full_loss, full_metrics = loss_rows(slice(None))
    assert full_metrics[ppo.CLIPFRAC].item() > 0
    full = grads(lambda: loss_rows(slice(None))[0].backward())
    micro = [slice(0, 2), slice(2, 5)]
    n_total = m.sum().item()
    # (a) global token denominator, micro-batch losses summed
    acc_a = grads(lambda: [loss_rows(s, float(n_total))[0].backward() for s in micro])
    # (b) micro-batch token means weighted by their share of the minibatch's tokens
    acc_b = grads(lambda: [(loss_rows(s)[0] * (m[s].sum().item() / n_total)).backward() for s in micro])
    # (c) 2 DDP ranks, each with denominator N / world; DDP averages the ranks' gradients
    rank_grads = [grads(lambda s=s: loss_rows(s, n_total / 2)[0].backward()) for s in micro]
    acc_c = [(g0 + g1) / 2 for g0, g1 in zip(*rank_grads)]
    # the naive unweighted mean of micro-batch means is NOT equal (tokens split unevenly): the test has teeth
    naive = grads(lambda: [(loss_rows(s)[0] / len(micro)).backward() for s in micro])
    for acc in (acc_a, acc_b, acc_c):
        for g_full, g_acc in zip(full, acc):
            torch.testing.assert_close(g_acc, g_full, rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(gn, gf, rtol=1e-4) for gn, gf in zip(naive, full))
    summed = sum(loss_rows(s, float(n_total))[0] for s in micro)
    assert summed.item() == pytest.approx(full_loss.item(), rel=1e-12)


# --------------------------------------------------------------------------------------------------------------
# compute_targets (KL -> rewards -> GAE -> whitening)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_compute_targets_composition(estimator: str) -> None:
    r, v, m, lv, tr = random_episodes(seed=12)
    g = torch.Generator().manual_seed(2)
    old_lp = -torch.rand(8, 24, generator=g, dtype=torch.float64)
    ref_lp = old_lp + 0.2 * torch.randn(8, 24, generator=g, dtype=torch.float64)
    scores = torch.zeros(8, 24, dtype=torch.float64)
    for b in range(1, 8):  # a score on the last action token of the row
        scores[b, m[b].nonzero().max()] = float(b)
    cfg = _cfg(kl_estimator=estimator, gamma=0.99, gae_lambda=0.9, norm_adv=True)
    targets, metrics = ppo.compute_targets(old_lp, ref_lp, v, scores, m, lv, tr, cfg, kl_coef=0.1)
    kl = torch.where(m, ppo.kl_penalty(old_lp, ref_lp, estimator), 0.0)
    rewards = torch.where(m, scores - 0.1 * kl, 0.0)
    adv, ret = gae_reference(rewards, v, m, lv, tr, 0.99, 0.9)
    torch.testing.assert_close(targets.kl, kl)
    torch.testing.assert_close(targets.rewards, rewards)
    torch.testing.assert_close(targets.returns, ret)
    torch.testing.assert_close(targets.advantages, ppo.masked_whiten(adv, m))
    assert metrics[ppo.KL_REF] == pytest.approx(kl.sum(1).mean().item())
    assert metrics[ppo.KL_COEF] == 0.1
    assert metrics[ppo.EXPLAINED_VARIANCE] == pytest.approx(ppo.explained_variance(v, ret, m))
    assert metrics[ppo.RETURN_MEAN] == pytest.approx(ret[m].mean().item())
    raw, _ = ppo.compute_targets(old_lp, ref_lp, v, scores, m, lv, tr, _cfg(gamma=0.99, gae_lambda=0.9,
                                 kl_estimator=estimator, norm_adv=False), kl_coef=0.1)  # fmt: skip
    torch.testing.assert_close(raw.advantages, adv)


def test_compute_targets_sharded_with_reduce_fn_equals_full() -> None:
    r, v, m, lv, tr = random_episodes(seed=13)
    old_lp, ref_lp = -torch.rand(8, 24, dtype=torch.float64), -torch.rand(8, 24, dtype=torch.float64)
    scores = torch.where(m, r, 0.0)
    cfg = _cfg(norm_adv=True)
    full, full_m = ppo.compute_targets(old_lp, ref_lp, v, scores, m, lv, tr, cfg, 0.05)
    sh = [slice(0, 5), slice(5, 8)]

    def work(k, fn):
        s = sh[k]
        return ppo.compute_targets(old_lp[s], ref_lp[s], v[s], scores[s], m[s], lv[s], tr[s], cfg, 0.05, fn)

    out = run_ranks(2, work)
    torch.testing.assert_close(torch.cat([o[0].advantages for o in out]), full.advantages)
    for key in (ppo.KL_REF, ppo.EXPLAINED_VARIANCE, ppo.RETURN_MEAN, ppo.VALUE_MEAN):
        assert out[0][1][key] == pytest.approx(full_m[key], rel=1e-9) == out[1][1][key]


# --------------------------------------------------------------------------------------------------------------
# KL controllers, early stop, LR schedule, minibatches
# --------------------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_computation() -> None:
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9 vs target 6: error 0.5 clipped to 0.2 -> beta *= 1 + 0.2 * 256 / 10000
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * 1.00512)
    # KL 6.6: error 0.1 (inside the clip)
    before = ctl.value
    ctl.update(6.6, 1000)
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 1000 / 10000))
    # KL 0: error -1 clipped to -0.2
    before = ctl.value
    ctl.update(0.0, 500)
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 500 / 10000))
    before = ctl.value
    ctl.update(float("nan"), 500)
    assert ctl.value == before
    state = ctl.state_dict()
    other = ppo.AdaptiveKLController(0.5, 6.0, 10000)
    other.load_state_dict(state)
    assert other.value == ctl.value
    with pytest.raises(CheckpointError, match="numeric 'value'"):
        other.load_state_dict({"beta": 1.0})
    with pytest.raises(ConfigError, match="ppo.adaptive_kl_target"):
        ppo.AdaptiveKLController(0.1, 0.0, 100)


def test_fixed_kl_controller_and_factory() -> None:
    fixed = ppo.make_kl_controller(_cfg(kl_coef=0.3, adaptive_kl=False))
    assert isinstance(fixed, ppo.FixedKLController)
    assert fixed.update(100.0, 1000) == 0.3 and fixed.value == 0.3
    fixed.load_state_dict({"value": 0.7})
    assert fixed.state_dict() == {"value": 0.7}
    adaptive = ppo.make_kl_controller(_cfg(kl_coef=0.2, adaptive_kl=True, adaptive_kl_target=3.0, kl_horizon=50))
    assert isinstance(adaptive, ppo.AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 3.0, 50)


def test_should_early_stop() -> None:
    assert ppo.should_early_stop(0.016, 0.01)
    assert not ppo.should_early_stop(0.015, 0.01)  # exactly 1.5 x target does not stop
    assert not ppo.should_early_stop(0.012, 0.01)
    assert not ppo.should_early_stop(100.0, 0.0)  # disabled
    assert not ppo.should_early_stop(100.0, -1.0)
    assert ppo.should_early_stop(float("nan"), 0.01)


def test_lr_lambda_warmup_and_decay_endpoints() -> None:
    f = ppo.lr_lambda("linear", warmup_steps=4, total_steps=14)
    assert [f(k) for k in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert f(9) == pytest.approx(0.5) and f(13) == pytest.approx(0.1) and f(14) == 0.0 and f(100) == 0.0
    c = ppo.lr_lambda("cosine", warmup_steps=0, total_steps=10)
    assert c(0) == 1.0 and c(5) == pytest.approx(0.5) and c(10) == pytest.approx(0.0) and c(11) == pytest.approx(0.0)
    const = ppo.lr_lambda("constant", 2, 10)
    assert [const(k) for k in (0, 1, 2, 50)] == [0.5, 1.0, 1.0, 1.0]
    # with torch's LambdaLR: optimizer step k runs at base_lr * f(k)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([f(k) for k in range(6)])
    assert "lr_lambdas" in sched.state_dict() and sched.state_dict()["lr_lambdas"][0] is not None  # picklable object
    with pytest.raises(ConfigError, match="expected one of constant, linear, cosine"):
        ppo.lr_lambda("step", 0, 10)
    with pytest.raises(ConfigError, match="warmup_steps"):
        ppo.lr_lambda("linear", -1, 10)


def test_minibatch_indices() -> None:
    parts = ppo.minibatch_indices(10, 3, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    again = ppo.minibatch_indices(10, 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = ppo.minibatch_indices(10, 3, torch.Generator().manual_seed(1))
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))
    with pytest.raises(ConfigError, match="ppo.num_minibatches=11"):
        ppo.minibatch_indices(10, 11, torch.Generator())


# --------------------------------------------------------------------------------------------------------------
# Precision and devices
# --------------------------------------------------------------------------------------------------------------


def _loss_inputs(device: str, dtype: torch.dtype = torch.float32):
    r, v, m, lv, tr = random_episodes(seed=14, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    old_lp = -torch.rand(8, 24, generator=g)
    new_lp = old_lp + 0.3 * torch.randn(8, 24, generator=g)
    ent = torch.rand(8, 24, generator=g)
    adv, ret = ppo.compute_gae(r, v, m, lv, tr, 1.0, 0.95)
    tensors = [new_lp, ent, v + 0.1, old_lp, v, adv, ret]
    return [t.to(device=device, dtype=dtype) for t in tensors] + [m.to(device)]


def test_ppo_loss_bf16_inputs_compute_in_fp32() -> None:
    loss32, m32 = ppo.ppo_loss(*_loss_inputs("cpu"), _cfg())
    loss16, m16 = ppo.ppo_loss(*_loss_inputs("cpu", torch.bfloat16), _cfg())
    assert loss16.dtype == torch.float32 and m16[ppo.APPROX_KL].dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05, abs=0.02)  # only the inputs were rounded


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    r, v, m, lv, tr = random_episodes(seed=15, dtype=torch.float32)
    adv_c, ret_c = ppo.compute_gae(r, v, m, lv, tr, 0.99, 0.95)
    adv_g, ret_g = ppo.compute_gae(r.cuda(), v.cuda(), m.cuda(), lv.cuda(), tr.cuda(), 0.99, 0.95)
    torch.testing.assert_close(adv_g.cpu(), adv_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret_g.cpu(), ret_c, rtol=1e-5, atol=1e-5)
    loss_c, _ = ppo.ppo_loss(*_loss_inputs("cpu"), _cfg())
    loss_g, metrics_g = ppo.ppo_loss(*_loss_inputs("cuda"), _cfg())
    assert loss_g.item() == pytest.approx(loss_c.item(), rel=1e-5)
    assert all(t.device.type == "cuda" for t in metrics_g.values())
    parts = ppo.minibatch_indices(10, 2, torch.Generator(device="cuda").manual_seed(0))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))


# --------------------------------------------------------------------------------------------------------------
# docs/ppo.md stays in sync with the module
# --------------------------------------------------------------------------------------------------------------


def test_docs_reference_existing_names() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "ppo.md").read_text(encoding="utf-8")
    names = set(re.findall(r"`ppo\.([A-Za-z_]+)`", doc))
    assert len(names) >= 15
    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    # `ppo.<name>` is either this module's function / constant or a config key of the ppo section
    missing = sorted(n for n in names if not hasattr(ppo, n) and n not in fields)
    assert not missing, f"docs/ppo.md names missing from rlchat/ppo.py: {missing}"
    # every line link points at the named function's def, or at its numbered step comment
    src = Path(ppo.__file__).read_text(encoding="utf-8").splitlines()
    links = re.findall(r"`ppo\.(\w+)`([^`|]*?)\[L(\d+)\]", doc)
    assert len(links) >= 15
    for name, between, line in links:
        text = src[int(line) - 1].strip()
        step = re.search(r"step (\d+)", between)
        want = f"# {step.group(1)}." if step else ("def " if text.startswith("def ") else "class ")
        ok = text.startswith(want) and (step is not None or re.match(rf"(def|class) {name}\b", text))
        if step:  # the step comment must lie inside the named function
            start = inspect.getsourcelines(getattr(ppo, name))[1]
            ok = ok and start <= int(line) < start + len(inspect.getsource(getattr(ppo, name)).splitlines())
        assert ok, f"docs/ppo.md: `ppo.{name}`{between}[L{line}] is stale (line {line} is {text!r}); fix the link"
    cfg_names = set(re.findall(r"^\| `([a-z_]+)` \|", doc, flags=re.M))  # first column of the hyperparameter table
    assert len(cfg_names) >= 15 and cfg_names <= fields, sorted(cfg_names - fields)


# --------------------------------------------------------------------------------------------------------------
# KL to the reference as a loss term (ppo.kl_in_loss, GRPO-style k3)
# --------------------------------------------------------------------------------------------------------------


def test_kl_in_the_loss_is_a_differentiable_k3_term() -> None:
    # k3 in the reward is a detached per-token penalty whose REINFORCE gradient is not the KL's (refused by the
    # config); as a loss term (GRPO) it is differentiated directly: d k3 / d logp = 1 - exp(ref_logp - logp).
    _, v, m, _, _ = random_episodes(seed=21)
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(8, 24, generator=g, dtype=torch.float64)).requires_grad_()
    ref = logp.detach() + 0.3 * torch.randn(8, 24, generator=g, dtype=torch.float64)
    zeros = torch.zeros(8, 24, dtype=torch.float64)
    args = (logp, zeros, v, logp.detach(), v, zeros, v, m)
    cfg = _cfg(kl_in_loss=True, kl_estimator="k3", vf_coef=0.0, ent_coef=0.0)
    loss, metrics = ppo.ppo_loss(*args, cfg, ref_logprobs=ref, kl_coef=0.1)
    k3 = torch.expm1(ref - logp.detach()) - (ref - logp.detach())
    n = m.sum()
    assert loss.item() == pytest.approx(0.1 * k3[m].sum().item() / n.item())
    assert metrics[ppo.KL_LOSS].item() == pytest.approx(k3[m].mean().item())
    loss.backward()
    expected = torch.where(m, 0.1 * (1 - torch.exp(ref - logp.detach())) / n, 0.0)
    torch.testing.assert_close(logp.grad, expected)
    # in the reward (the default) the loss has no KL term, and the targets carry it instead
    plain, plain_metrics = ppo.ppo_loss(*args, _cfg(vf_coef=0.0, ent_coef=0.0), ref_logprobs=ref, kl_coef=0.1)
    assert plain.item() == 0.0 and ppo.KL_LOSS not in plain_metrics


def test_kl_in_the_loss_leaves_the_rewards_alone() -> None:
    _, v, m, lv, tr = random_episodes(seed=22)
    g = torch.Generator().manual_seed(4)
    old_lp = -torch.rand(8, 24, generator=g, dtype=torch.float64)
    ref_lp = old_lp + 0.2 * torch.randn(8, 24, generator=g, dtype=torch.float64)
    scores = torch.where(m, torch.rand(8, 24, generator=g, dtype=torch.float64), 0.0)
    in_loss, m_loss = ppo.compute_targets(
        old_lp, ref_lp, v, scores, m, lv, tr, _cfg(kl_in_loss=True, kl_estimator="k3"), 0.1
    )
    torch.testing.assert_close(in_loss.rewards, scores)
    # the sequence KL is still measured (guardrails, adaptive controller), with the configured estimator
    kl = torch.where(m, ppo.kl_penalty(old_lp, ref_lp, "k3"), 0.0)
    assert m_loss[ppo.KL_REF] == pytest.approx(kl.sum(1).mean().item())
