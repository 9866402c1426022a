"""Critic-free estimators beside PPO's GAE: GRPO, Dr. GRPO and RLOO (``ppo.advantage``).

Advantages against hand values, the batch wiring (groups of ``rollout.samples_per_prompt`` replies to one
prompt), no critic allocated. A GRPO run that learns the demo task is tests/test_rlhf_gold.py's: GRPO on the
reward model alone raises the held-out checked-answer reward it never sees (``rlchat demo --full``'s run).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlchat import ppo
from rlchat.config import load_config
from rlchat.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_rloo_is_each_return_minus_the_mean_of_the_others():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 2.0])
    g = torch.tensor([7, 7, 7, 7, 3, 3])
    adv = ppo.group_advantages(r, g, "rloo")
    # group 7: returns 1,0,0,1 -> leave-one-out means 1/3, 2/3, 2/3, 1/3
    want = [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 5 - 2, 2 - 5]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=adv.dtype))


def test_grpo_scales_by_the_unbiased_group_std_and_dr_grpo_does_not():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of 1,0,0,1
    adv = ppo.group_advantages(r, g, "grpo")
    want = [0.5 / (std + ppo.GROUP_STD_EPS), -0.5 / (std + ppo.GROUP_STD_EPS)] * 2 + [0.0, 0.0]
    torch.testing.assert_close(adv[[0, 1, 3, 2, 4, 5]], torch.tensor(want, dtype=adv.dtype)[[0, 1, 2, 3, 4, 5]])
    dr = ppo.group_advantages(r, g, "grpo", scale_by_std=False)
    torch.testing.assert_close(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0], dtype=dr.dtype))


def test_a_group_of_one_has_no_baseline_and_no_advantage():
    r = torch.tensor([2.0, 1.0, 3.0])
    g = torch.tensor([0, 1, 1])
    for est in ("grpo", "rloo"):
        adv = ppo.group_advantages(r, g, est)
        assert adv[0] == 0.0 and adv[1] < 0 < adv[2]


def test_compute_targets_gives_every_action_token_its_replys_advantage():
    cfg = load_config(None, ["ppo.advantage=rloo", "rollout.samples_per_prompt=2", "rollout.envs_per_worker=4"]).ppo
    act = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    scores = torch.zeros(4, 4)
    scores[0, 2], scores[1, 3], scores[2, 2], scores[3, 1] = 1.0, 0.0, 0.5, 0.25
    zeros = torch.zeros(4, 4)
    targets, _ = ppo.compute_targets(
        zeros, zeros, zeros, scores, act, torch.zeros(4), torch.zeros(4, dtype=torch.bool), cfg, 0.0,
        groups=torch.tensor([0, 0, 1, 1]),
    )  # fmt: skip
    want = torch.tensor([1.0, -1.0, 0.25, -0.25])  # RLOO with groups of two: R_i - R_j
    for row in range(4):
        assert torch.allclose(targets.advantages[row][act[row]], want[row].expand(int(act[row].sum())))
        assert (targets.advantages[row][~act[row]] == 0).all()
    with pytest.raises(ValueError, match="group ids"):
        ppo.compute_targets(zeros, zeros, zeros, scores, act, torch.zeros(4), torch.zeros(4, dtype=torch.bool), cfg, 0)


def test_config_needs_groups_for_a_group_baseline():
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        load_config(None, ["ppo.advantage=grpo"])
    with pytest.raises(ConfigError, match="divisor"):
        load_config(None, ["rollout.samples_per_prompt=3", "rollout.envs_per_worker=32"])
    with pytest.raises(ConfigError, match="ppo.advantage=grpo"):
        load_config(None, ["ppo.dr_grpo=true"])


TINY = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.precision=fp32",
    "model.critic=separate",
    "rollout.envs_per_worker=8",
    "rollout.samples_per_prompt=4",
    "env.max_turn_tokens=8",
    "ppo.num_minibatches=2",
    "ppo.update_epochs=1",
    "ppo.eval_every=0",
    "rollout.num_workers=0",
    "ray.learner_workers=0",
]


def test_groups_share_a_prompt_and_no_critic_is_allocated(tmp_path):
    from rlchat.learner import LocalLearner
    from rlchat.rollout import LocalRollouts

    cfg = load_config(ROOT / "configs" / "demo.yaml", [*TINY, "ppo.advantage=grpo"])
    learner = LocalLearner(cfg, str(tmp_path))
    assert learner.learner.policy.critic is None  # model.critic=separate is not honoured without GAE
    rollouts = LocalRollouts(cfg)
    weights, version = learner.weights()
    batch = rollouts.sample(1, weights, version, pad_id=0)
    rec = np.asarray(batch.record_index)
    assert (rec.reshape(2, 4) == rec.reshape(2, 4)[:, :1]).all()  # groups of 4 consecutive replies, one prompt
    metrics, _, _ = learner.update(batch, 1)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics[ppo.VALUE_LOSS] == 0.0
