"""Rollout sampler and PPO learner in one process: shapes, determinism, rollout/learner agreement, an update."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_configs import TINY_PPO

from rlchat.batch import RolloutBatch
from rlchat.config import Config, load_config
from rlchat.data import Record
from rlchat.errors import ConfigError
from rlchat.learner import Learner
from rlchat.metrics import (
    PPO_BEHAVIOUR_LOGPROB_MAXDIFF,
    PPO_EARLY_STOPPED,
    PPO_EPOCHS_RUN,
    PPO_LR,
    ROLLOUT_EPISODES,
    ROLLOUT_WORKER_RESTARTS,
)
from rlchat.model import PolicyValueModel, position_ids_from_mask
from rlchat.rollout import Sampler, batch_metrics
from rlchat.tokenizer import ChatTokenizer

TINY = [
    *TINY_PPO,
    "env.max_context=96",
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
    # in-process sampling: the episode count, and no worker-restart key (only Ray actors can restart)
    assert m[ROLLOUT_EPISODES] == float(b) and ROLLOUT_WORKER_RESTARTS not in m


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


def _rewarded(batch: RolloutBatch) -> RolloutBatch:
    """Give the episodes different final rewards so advantages (and the update) are not all zero."""
    batch.scores[np.arange(len(batch)), batch.action_mask.cumsum(1).argmax(1)] = np.linspace(-1, 1, len(batch))
    return batch


@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
def test_learner_recomputes_behaviour_logprobs_at_temperature(setup, softcap):
    # The sampler records log-probs of logits / temperature; the learner must take its log-probs (and the ratio's
    # numerator) from the same distribution, with or without a soft-capped head (Gemma; set on the config here).
    cfg, tok, policy = setup
    cfg = cfg.replace(**{"rollout.temperature": 0.7})
    policy = copy.deepcopy(policy)
    if softcap:
        policy.lm.config.final_logit_softcapping = softcap
    batch = _rewarded(Sampler(cfg, tok, policy.lm, _records()).sample(iteration=2))
    t = batch.to_torch()
    act = t["action_mask"]
    learner = Learner(cfg, policy, copy.deepcopy(policy).eval())
    stats = learner._rollout_stats(t)
    diff = (stats["old_logprobs"] - t["behaviour_logprobs"]).abs()[act]
    assert diff.max().item() < 1e-5
    # the test discriminates: the model's temperature-1 log-probs are far from the behaviour log-probs
    with torch.no_grad():
        plain = policy(t["input_ids"], t["attention_mask"], act).logprobs
    assert (plain - t["behaviour_logprobs"]).abs()[act].max().item() > 1e-2
    metrics = learner.update(batch, iteration=2)
    assert metrics[PPO_BEHAVIOUR_LOGPROB_MAXDIFF] < 1e-5


@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
def test_tempered_forward_equals_the_full_softmax_of_scaled_logits(setup, softcap):
    # PolicyValueModel.forward(..., temperature=T): head -> scale -> soft-cap -> / T (the engine's order), through
    # the chunked head (several chunks here), values and gradients equal to plain autograd on the full logits.
    cfg, tok, policy = setup
    policy = copy.deepcopy(policy)
    if softcap:
        policy.lm.config.final_logit_softcapping = softcap  # read by logit_transform; GPT-2's own forward ignores it
    batch = Sampler(cfg, tok, policy.lm, _records()).sample(iteration=3)
    t = batch.to_torch()
    ids, attn, act = t["input_ids"], t["attention_mask"], t["action_mask"]
    temperature = 0.7
    # reference: the LM's own full logits, soft-capped, / T, plain autograd log_softmax
    logits = policy.lm(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    z = logits[:, :-1, : policy.vocab_size].float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)  # (B, T-1, V)
    ref_lp = torch.nn.functional.pad(logp.gather(2, ids[:, 1:, None]).squeeze(2), (1, 0)) * act
    ref_ent = torch.nn.functional.pad(-(logp.exp() * logp).sum(-1), (1, 0)) * act
    (ref_lp.sum() + 0.1 * ref_ent.sum()).backward()
    ref_grads = {k: v.grad.clone() for k, v in policy.lm.named_parameters()}
    policy.zero_grad(set_to_none=True)
    out = policy(ids, attn, act, chunk_size=7, temperature=temperature)
    torch.testing.assert_close(out.logprobs, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy, ref_ent, atol=1e-5, rtol=0)
    (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
    for k, v in policy.lm.named_parameters():
        torch.testing.assert_close(v.grad, ref_grads[k], atol=1e-5, rtol=1e-4, msg=k)
    with torch.no_grad():
        # the default (temperature 1) is the untempered distribution; values never depend on the temperature
        own, at_one = policy(ids, attn, act), policy(ids, attn, act, temperature=1.0)
        tempered = policy(ids, attn, act, temperature=temperature)
    for name in ("logprobs", "entropy", "values"):
        torch.testing.assert_close(getattr(at_one, name), getattr(own, name), atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(tempered.values, own.values, atol=0, rtol=0)
    assert (tempered.logprobs - own.logprobs).abs()[act].max().item() > 1e-2
    with pytest.raises(ConfigError, match=r"temperature=0\.0: expected a positive"):
        policy(ids, attn, act, temperature=0.0)


def test_ppo_refuses_dropout_and_updates_deterministically_with_a_dropout_model(setup):
    cfg, tok, _ = setup
    with pytest.raises(ConfigError, match=r"model\.dropout=0\.1.*set model\.dropout=0"):
        Learner(cfg.replace(**{"model.dropout": 0.1}), *_fresh_policy(cfg, tok))
    # A checkpoint can still carry dropout in its HF config (pretrained GPT-2 has 0.1): the learner runs it with
    # dropout off, so the update does not depend on torch's global RNG and old log-probs equal the gradient pass's.
    dropout_cfg = cfg.replace(**{"model.dropout": 0.5})
    policy = PolicyValueModel.build(dropout_cfg, tok)
    batch = _rewarded(Sampler(cfg, tok, policy.lm, _records()).sample(iteration=4))
    results = []
    for seed in (0, 1):
        learner = Learner(cfg, copy.deepcopy(policy), copy.deepcopy(policy).eval())
        torch.manual_seed(seed)
        metrics = learner.update(batch, iteration=4)
        assert not learner.policy.training
        assert metrics[PPO_BEHAVIOUR_LOGPROB_MAXDIFF] < 1e-5
        results.append((metrics, learner.policy.state_dict()))
    (m0, w0), (m1, w1) = results
    assert m0["ppo/policy_loss"] == m1["ppo/policy_loss"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def _fresh_policy(cfg: Config, tok: ChatTokenizer) -> tuple[PolicyValueModel, PolicyValueModel]:
    policy = PolicyValueModel.build(cfg, tok)
    return policy, copy.deepcopy(policy).eval()


def test_update_epochs_stop_early_on_a_tiny_target_kl(setup):
    cfg, tok, policy = setup
    base = cfg.replace(**{"ppo.update_epochs": 3})
    batch = _rewarded(Sampler(base, tok, policy.lm, _records()).sample(iteration=6))
    runs = {}
    for target_kl in (1e-9, 0.0):
        c = base.replace(**{"ppo.target_kl": target_kl})
        runs[target_kl] = Learner(c, copy.deepcopy(policy), copy.deepcopy(policy).eval()).update(batch, 6)
    # the first minibatch step moves the policy, so epoch 1's approx KL exceeds 1.5 * 1e-9: one epoch only
    assert runs[1e-9][PPO_EPOCHS_RUN] == 1.0 < base.ppo.update_epochs
    assert runs[1e-9][PPO_EARLY_STOPPED] == 1.0
    # disabled: every epoch runs
    assert runs[0.0][PPO_EPOCHS_RUN] == float(base.ppo.update_epochs)
    assert runs[0.0][PPO_EARLY_STOPPED] == 0.0


def test_learning_rate_scale_reaches_the_param_groups_and_survives_scheduler_steps(setup):
    cfg, tok, policy = setup
    cfg = cfg.replace(**{"ppo.lr_schedule": "linear", "ppo.warmup_steps": 1, "ppo.iterations": 4})
    lr = cfg.ppo.learning_rate
    batch = _rewarded(Sampler(cfg, tok, policy.lm, _records()).sample(iteration=7))
    learner = Learner(cfg, copy.deepcopy(policy), copy.deepcopy(policy).eval())
    learner.update(batch, 1)

    def group_lrs() -> list[float]:
        return [g["lr"] for g in learner.optimizer.param_groups]

    def scheduled(scale: float) -> float:
        return lr * learner._lr_schedule(learner.scheduler.last_epoch) * scale

    assert group_lrs() == pytest.approx([scheduled(1.0)])
    # absolute, not compounding: two rollbacks set 0.5 then 0.25; the very next optimizer step uses it
    learner.set_learning_rate_scale(0.5)
    learner.set_learning_rate_scale(0.25)
    assert group_lrs() == pytest.approx([scheduled(0.25)]) and scheduled(0.25) > 0
    metrics = learner.update(batch, 2)  # more scheduler steps: the scale stays
    assert group_lrs() == pytest.approx([scheduled(0.25)])
    assert metrics[PPO_LR] == pytest.approx(scheduled(0.25))
    # and it is part of the train state
    state = learner.train_state({"rollbacks": 2})
    other = Learner(cfg, copy.deepcopy(policy), copy.deepcopy(policy).eval())
    assert other.load_train_state(state) == {"rollbacks": 2}
    assert other.lr_scale == 0.25 and [g["lr"] for g in other.optimizer.param_groups] == pytest.approx(group_lrs())


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
    batch = _rewarded(Sampler(cfg, tok, policy.lm, _records()).sample(iteration=5))
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


def test_a_long_prompt_ends_at_the_context_limit_instead_of_killing_the_run(setup):
    # configs/gpu.yaml's geometry scaled down: env.max_context == model.n_positions, env.max_turn_tokens well below.
    # A prompt longer than n_positions - max_turn_tokens used to make the engine refuse the batch mid-run; now the
    # env cuts the reply at the context limit (where the model's positions end too) and the batch trains.
    cfg, tok, _ = setup
    cfg = cfg.replace(**{"model.n_positions": 64, "env.max_context": 64, "env.max_turn_tokens": 16})
    policy = PolicyValueModel.build(cfg, tok)
    long = Record(messages=[{"role": "user", "content": "word " * 50}], reference="1")
    prompt_len = len(tok.render_prompt(long.prompt_messages()))
    assert 64 - 16 < prompt_len < 64
    batch = Sampler(cfg, tok, policy.lm, [long] * 4).sample(iteration=1)
    assert batch.attention_mask.sum(axis=1).max() <= 64
    assert (batch.response_lengths <= 64 - prompt_len).all()
    metrics = Learner(cfg, policy, copy.deepcopy(policy).eval()).update(_rewarded(batch), iteration=1)
    assert np.isfinite(metrics["ppo/policy_loss"])


class _ScriptedStream:
    """A lock-step stream replaying fixed replies (the policy is scripted; envs, rewards and batching are real)."""

    def __init__(self, replies: list[list[int]]) -> None:
        self.replies, self.open = replies, np.ones(len(replies), dtype=bool)

    def __iter__(self):
        from types import SimpleNamespace

        for t in range(max(map(len, self.replies))):
            active = self.open & np.array([t < len(r) for r in self.replies])
            if not active.any():
                return
            tokens = np.array([r[t] if t < len(r) else 0 for r in self.replies], dtype=np.int64)
            yield SimpleNamespace(tokens=tokens, logprobs=np.full(len(tokens), -0.5, np.float32), active=active)

    def finish(self, rows) -> None:
        self.open[rows] = False


class _ScriptedEngine:
    def __init__(self, replies: list[list[int]]) -> None:
        self.replies = replies

    def steps(self, prompts, params, seeds=None) -> _ScriptedStream:
        return _ScriptedStream(self.replies)


def test_turns_cut_at_the_budget_are_scored_penalised_and_terminal(setup):
    cfg, tok, policy = setup
    eot = tok.eot_id
    cfg = cfg.replace(
        **{"rollout.envs_per_worker": 2, "env.max_turn_tokens": 4, "reward.truncation_penalty": -0.5},
        **{"reward.verifiable": 1.0, "reward.length": 1.0, "reward.length_min": 1, "reward.length_max": 2},
    )
    replies = [[tok.encode("7")[0], eot], [30, 31, 32, 33]]  # a right answer; a reply cut at the 4-token budget
    sampler = Sampler(cfg, tok, policy.lm, [_records()[0]] * 2)
    sampler.engine = _ScriptedEngine(replies)
    batch = sampler.sample(iteration=1)
    # the cut turn is scored on its text (length 4 tokens vs [1, 2]: -1.0), plus the penalty; nothing bootstraps
    assert batch.truncated.tolist() == [False, False]
    comps = batch.reward_components
    assert comps["length"].tolist() == pytest.approx([0.0, -1.0])
    assert comps["total"].tolist() == pytest.approx([float(comps["verifiable"][0]), -1.5])
    last = batch.action_mask.cumsum(1).argmax(1)
    assert batch.scores[np.arange(2), last].tolist() == pytest.approx(comps["total"].tolist())
    assert batch_metrics(batch)["rollout/truncated_frac"] == 0.5  # still reports how often replies hit a limit
    stats = Learner(cfg, copy.deepcopy(policy), copy.deepcopy(policy).eval())._rollout_stats(batch.to_torch())
    assert stats["last_values"].tolist() == [0.0, 0.0]
