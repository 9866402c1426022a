"""Learner correctness that the CPU-only update tests cannot see on their own (issue #12, section 2).

- metric tensors stay on the learner's device (a CUDA learner crashed combining CPU and CUDA metric tensors);
- weights versions never go down (a rollback bumps the version), and behaviour log-probs are the ratio's
  denominator whenever the batch's version differs from the learner's;
- the frozen reference holds the policy's LM only (no value head, no critic trunk);
- the optimizer's eps and the KL early-stop granularity are what docs/ppo.md says.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_configs import TINY_PPO

from rlchat import ppo
from rlchat.batch import RolloutBatch
from rlchat.config import load_config
from rlchat.data import Record
from rlchat.learner import Learner, MinibatchMetrics, build_models
from rlchat.metrics import PPO_EARLY_STOPPED, PPO_EPOCHS_RUN
from rlchat.model import PolicyValueModel
from rlchat.rollout import Sampler
from rlchat.tokenizer import ChatTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_PPO,
    "env.max_context=96",
    "ppo.update_epochs=2",
    "ppo.kl_coef=0.05",
]


def _records(n: int = 20) -> list[Record]:
    return [
        Record(messages=[{"role": "user", "content": f"What is {i % 7} + {i % 5}?"}], reference=str(i % 7 + i % 5))
        for i in range(n)
    ]


def _rewarded(batch: RolloutBatch) -> RolloutBatch:
    """Different final rewards per episode, so advantages (and the update) are not all zero."""
    batch.scores[np.arange(len(batch)), batch.action_mask.cumsum(1).argmax(1)] = np.linspace(-1, 1, len(batch))
    return batch


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY)
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    policy = PolicyValueModel.build(cfg, tok)
    batch = _rewarded(Sampler(cfg, tok, policy.lm, _records()).sample(iteration=1))
    return cfg, tok, policy, batch


def _learner(cfg, policy) -> Learner:
    return Learner(cfg, copy.deepcopy(policy), copy.deepcopy(policy).eval())


# ------------------------------------------------------------------------------------------ 1. metric devices


def test_minibatch_metrics_stay_on_the_learners_device():
    # `meta` stands in for CUDA: ppo_loss returns its metrics on the model's device, and a CPU accumulator mixed in
    # (torch.stack of CPU and CUDA tensors, an NCCL all-reduce of a CPU tensor) crashed a GPU learner.
    meta = torch.device("meta")
    acc = MinibatchMetrics(meta)
    for tokens in (3.0, 5.0):
        acc.add({ppo.POLICY_LOSS: torch.zeros((), device=meta), ppo.APPROX_KL: torch.zeros((), device=meta)}, tokens)
    keys, vec = acc.vector()
    assert keys == sorted([ppo.POLICY_LOSS, ppo.APPROX_KL])
    assert vec.device == meta and vec.shape == (3,) and vec.dtype == torch.float64
    assert all(v.device == meta for v in acc.sums.values())


def test_update_accumulates_metrics_on_the_learners_device(setup, monkeypatch):
    cfg, _, policy, batch = setup
    learner = _learner(cfg, policy)
    devices: list[torch.device] = []

    class Spy(MinibatchMetrics):
        def vector(self):
            keys, vec = super().vector()
            devices.append(vec.device)
            return keys, vec

    monkeypatch.setattr("rlchat.learner.MinibatchMetrics", Spy)
    learner.update(batch, iteration=1)
    assert devices and all(d == learner.device for d in devices)


# ------------------------------------------------------------------------------------------ 2. weights versions


def test_loading_a_checkpoint_never_lowers_the_weights_version(setup):
    # A guardrail rollback reloads an older checkpoint: its weights come back, but under a *new* version, so a
    # batch sampled in flight with newer weights can never look current (or fresher than the learner).
    cfg, _, policy, batch = setup
    learner = _learner(cfg, policy)
    learner.update(batch, iteration=1)
    saved = learner.train_state()
    assert saved["version"] == 1
    learner.update(batch, iteration=2)
    assert learner.version == 2
    learner.load_train_state(saved)
    assert learner.version == 3
    # a fresh learner resuming from the checkpoint takes the checkpoint's own version (step-exact resume)
    resumed = _learner(cfg, policy)
    resumed.load_train_state(saved)
    assert resumed.version == 1


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("batch_version", [0, 3], ids=["older", "newer"])
def test_behaviour_logprobs_are_the_denominator_whenever_versions_differ(setup, monkeypatch, overlap, batch_version):
    cfg, _, policy, batch = setup
    cfg = cfg.replace(**{"rollout.overlap": overlap, "rollout.num_workers": 1})
    batch = copy.deepcopy(batch)
    batch.behaviour_logprobs = np.where(batch.action_mask, batch.behaviour_logprobs - 0.25, 0.0).astype(np.float32)
    seen = []
    compute_targets = ppo.compute_targets

    def spy(old_logprobs, *args, **kwargs):
        seen.append(old_logprobs.clone())
        return compute_targets(old_logprobs, *args, **kwargs)

    monkeypatch.setattr(ppo, "compute_targets", spy)
    learner = _learner(cfg, policy)
    learner.version = 1
    batch.weights_version = batch_version
    learner.update(batch, iteration=1)
    act = torch.from_numpy(batch.action_mask)
    torch.testing.assert_close(seen[0][act], torch.from_numpy(batch.behaviour_logprobs)[act])
    # same version: the learner's recomputed log-probs (robust to sampling-precision noise), not the doctored ones
    batch.weights_version = learner.version
    recomputed = learner._rollout_stats(batch.to_torch())["old_logprobs"]
    learner.update(batch, iteration=2)
    torch.testing.assert_close(seen[1], recomputed, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ 6. reference, eps


def test_reference_holds_the_policy_lm_only(setup):
    cfg, _, _, batch = setup
    cfg = cfg.replace(**{"model.critic": "separate"})
    policy, ref, _ = build_models(cfg, torch.device("cpu"))
    assert ref is not None
    names = {name for name, _ in ref.named_parameters()}
    assert not any(n.startswith(("value_head", "critic")) for n in names), sorted(names)[:5]
    assert sum(q.numel() for q in ref.parameters()) == sum(q.numel() for q in policy.lm.parameters())
    assert not ref.training and not any(q.requires_grad for q in ref.parameters())
    # the same log-probs as the policy it was copied from, at the rollout temperature
    t = batch.to_torch()
    ids, attn, act = t["input_ids"], t["attention_mask"], t["action_mask"]
    with torch.no_grad():
        expected = policy(ids, attn, act, compute_entropy=False, temperature=0.7).logprobs
        got = ref.action_logprobs(ids, attn, act, temperature=0.7)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # the learner's reference pass runs no critic trunk
    calls = []
    policy.critic.register_forward_hook(lambda *a: calls.append(1))
    learner = Learner(cfg, policy, ref)
    learner._rollout_stats({**t, "truncated": torch.zeros_like(t["truncated"])})  # no bootstrap pass either
    assert len(calls) == 1  # the policy's own value pass, not a second one for the reference


def _documented_adam_eps() -> float:
    row = next(line for line in (ROOT / "docs" / "ppo.md").read_text().splitlines() if "| Adam" in line)
    return float(re.search(r"ε = ([0-9.e-]+)", row).group(1))


def test_optimizer_eps_is_the_documented_one(setup):
    cfg, _, policy, _ = setup
    learner = _learner(cfg, policy)
    assert [g["eps"] for g in learner.optimizer.param_groups] == [_documented_adam_eps()]


def test_kl_early_stop_runs_whole_epochs(setup):
    # docs/ppo.md row 17: the rule is checked after each epoch, on the token-weighted mean approx KL of its
    # minibatches; an epoch that crosses the bound still finishes its minibatches, then the loop stops.
    cfg, _, policy, batch = setup
    cfg = cfg.replace(**{"ppo.update_epochs": 3, "ppo.num_minibatches": 2, "ppo.target_kl": 1e-9})
    learner = _learner(cfg, policy)
    metrics = learner.update(batch, iteration=1)
    assert metrics[PPO_EARLY_STOPPED] == 1.0 and metrics[PPO_EPOCHS_RUN] == 1.0
    assert learner.scheduler.last_epoch == cfg.ppo.num_minibatches  # optimizer steps: the whole first epoch
