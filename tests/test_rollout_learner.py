"""Rollout sampler and PPO learner in one process: shapes, determinism, rollout/learner agreement, an update."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rlchat.batch import RolloutBatch
from rlchat.config import Config, load_config
from rlchat.data import Record
from rlchat.learner import Learner
from rlchat.model import PolicyValueModel
from rlchat.rollout import Sampler, batch_metrics
from rlchat.tokenizer import ChatTokenizer

TINY = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.precision=fp32",
    "rollout.envs_per_worker=8",
    "env.max_turn_tokens=8",
    "env.max_context=96",
    "ppo.num_minibatches=2",
    "ppo.update_epochs=2",
    "ppo.kl_coef=0.05",
]


def _records(n: int = 20) -> list[Record]:
    out = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        out.append(
            Record(
                messages=[
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": str(a + b)},
                    {"role": "user", "content": "And doubled?"},
                    {"role": "assistant", "content": str(2 * (a + b))},
                ],
                reference=str(a + b),
            )
        )
    return out


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("configs/demo.yaml", TINY)
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    policy = PolicyValueModel.build(cfg, tok)
    return cfg, tok, policy


def test_batch_shapes_dtypes_and_masks(setup):
    cfg, tok, policy = setup
    batch = Sampler(cfg, tok, policy.lm, _records()).sample(iteration=1)
    b, t = batch.input_ids.shape
    assert b == cfg.rollout.envs_per_worker
    assert batch.input_ids.dtype == np.int64 and batch.behaviour_logprobs.dtype == np.float32
    assert batch.attention_mask.dtype == bool and batch.action_mask.dtype == bool
    assert batch.truncated.shape == (b,)
    # actions are real tokens, never the prompt's first token; log-probs only there and all <= 0
    assert not (batch.action_mask & ~batch.attention_mask).any()
    assert (batch.behaviour_logprobs[~batch.action_mask] == 0).all()
    assert (batch.behaviour_logprobs[batch.action_mask] <= 0).all()
    # scores sit on action tokens; a random policy rarely ends turns, so truncation is common and unscored
    assert (batch.scores[~batch.action_mask] == 0).all()
    assert (batch.response_lengths <= cfg.env.max_turn_tokens).all()
    assert (batch.response_lengths[batch.truncated] == cfg.env.max_turn_tokens).all()
    assert "total" in batch.reward_components and batch.reward_components["total"].shape == (b,)
    m = batch_metrics(batch)
    assert set(m) >= {"rollout/reward_mean", "rollout/response_len", "rollout/truncated_frac"}
    assert any(k.startswith("rollout/reward/") for k in m) or cfg.reward.verifiable == 0


def test_sampling_is_deterministic_per_iteration(setup):
    cfg, tok, policy = setup
    s1 = Sampler(cfg, tok, policy.lm, _records())
    s2 = Sampler(cfg, tok, policy.lm, _records())
    a, b, c = s1.sample(3), s2.sample(3), s1.sample(4)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.behaviour_logprobs, b.behaviour_logprobs)
    differs = a.input_ids.shape != c.input_ids.shape or not np.array_equal(a.input_ids, c.input_ids)
    assert differs


def test_learner_recomputes_behaviour_logprobs(setup):
    cfg, tok, policy = setup
    batch = Sampler(cfg, tok, policy.lm, _records()).sample(iteration=2)
    t = batch.to_torch()
    with torch.no_grad():
        out = policy(t["input_ids"], t["attention_mask"], t["action_mask"])
    diff = (out.logprobs - t["behaviour_logprobs"]).abs()[t["action_mask"]]
    assert diff.max().item() < 1e-5


def test_multi_turn_batch_skips_user_tokens(setup):
    cfg, tok, _ = setup
    cfg = cfg.replace(**{"env.multi_turn": True, "env.max_turns": 2, "env.user": "replay"})
    # a policy that always answers "<|end|>" at once: the final norm outputs a constant vector v (weight 0,
    # bias v) and the (tied) embedding row of <|end|> is v, so its logit dominates every position.
    policy = PolicyValueModel.build(cfg, tok)
    with torch.no_grad():
        ln_f = policy.lm.transformer.ln_f
        v = torch.zeros_like(ln_f.bias)
        v[0] = 10.0
        ln_f.weight.zero_()
        ln_f.bias.copy_(v)
        policy.lm.get_output_embeddings().weight[tok.eot_id] = v
    batch = Sampler(cfg, tok, policy.lm, _records()).sample(iteration=1)
    for i in range(len(batch)):
        acts = np.flatnonzero(batch.action_mask[i])
        assert len(acts) == 2  # one <|end|> per assistant turn
        assert (batch.input_ids[i, acts] == tok.eot_id).all()
        # the user's next message sits between the two action tokens (observation tokens, not actions)
        assert acts[1] - acts[0] > 2
        between = batch.input_ids[i, acts[0] + 1 : acts[1]]
        assert tok.role_ids["user"] in between.tolist()
        assert not batch.truncated[i]


def test_update_changes_every_parameter_and_metrics_are_finite(setup):
    cfg, tok, policy = setup
    policy = copy.deepcopy(policy)
    ref = copy.deepcopy(policy).eval()
    batch = Sampler(cfg, tok, policy.lm, _records()).sample(iteration=5)
    # give some episodes a reward so advantages are not all zero
    batch.scores[np.arange(len(batch)), batch.action_mask.cumsum(1).argmax(1)] = np.linspace(-1, 1, len(batch))
    learner = Learner(cfg, policy, ref)
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    metrics = learner.update(batch, iteration=5)
    unchanged = [k for k, v in policy.named_parameters() if torch.equal(v, before[k])]
    assert unchanged == []
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/approx_kl", "ppo/clipfrac", "kl/ref_kl"):
        assert key in metrics
    assert metrics["ppo/behaviour_logprob_maxdiff"] < 1e-5
    assert learner.version == 1
    w = learner.policy_weights()
    assert all(v.device.type == "cpu" for v in w.values())


def test_concat_pads_and_keeps_rows():
    def mk(b: int, t: int, v: int) -> RolloutBatch:
        return RolloutBatch(
            input_ids=np.full((b, t), 7),
            attention_mask=np.ones((b, t), bool),
            action_mask=np.ones((b, t), bool),
            behaviour_logprobs=np.full((b, t), -1.0, np.float32),
            scores=np.zeros((b, t), np.float32),
            truncated=np.zeros(b, bool),
            reward_components={"total": np.ones(b, np.float32)},
            weights_version=v,
        )

    merged = RolloutBatch.concat([mk(2, 3, 4), mk(3, 5, 4)], pad_id=0)
    assert merged.input_ids.shape == (5, 5)
    assert (merged.input_ids[:2, 3:] == 0).all() and not merged.attention_mask[:2, 3:].any()
    assert merged.reward_components["total"].shape == (5,)
    with pytest.raises(ValueError, match="shape"):
        RolloutBatch(
            input_ids=np.zeros((2, 3)),
            attention_mask=np.zeros((2, 2), bool),
            action_mask=np.zeros((2, 3), bool),
            behaviour_logprobs=np.zeros((2, 3)),
            scores=np.zeros((2, 3)),
            truncated=np.zeros(2, bool),
        )


def test_config_rejects_minibatches_smaller_than_learners():
    cfg = Config().replace(**{"rollout.envs_per_worker": 4, "ppo.num_minibatches": 4, "ray.learner_workers": 2})
    assert cfg.rollout_batch_size == 4
