"""rlchat/Chat-v0 is a plain Gymnasium env: RLlib's stock PPO (new API stack) trains on it unchanged.

Only the observation is flattened (RLlib's stock ``FlattenObservations`` connector turns the Dict observation into
one vector for the default MLP). The env is built by RLlib from the registered id and the ``env_config`` dict in a
remote env-runner process, which has to import the ``envs`` package itself ("envs:" prefix in the id).
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow

ENV_CONFIG = {
    "config_overrides": {
        "tokenizer.vocab_size": 512,  # Discrete(512) actions keep RLlib's policy head tiny
        "env.max_context": 48,
        "env.max_turn_tokens": 4,
    }
}


def test_rllib_stock_ppo_trains_two_iterations(ray_local):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.connectors.env_to_module import FlattenObservations
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    config = (
        PPOConfig()
        .environment("envs:rlchat/Chat-v0", env_config=ENV_CONFIG)
        .env_runners(
            num_env_runners=1,
            num_envs_per_env_runner=1,
            num_cpus_per_env_runner=1,
            rollout_fragment_length=32,
            env_to_module_connector=lambda env, spaces=None, device=None: FlattenObservations(),
        )
        .learners(num_learners=0)
        .training(train_batch_size_per_learner=32, minibatch_size=16, num_epochs=1, lr=1e-3)
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[16], vf_share_layers=True))
        .debugging(seed=0)
    )
    algo = config.build_algo()
    try:
        results = [algo.train() for _ in range(2)]
    finally:
        algo.stop()
    for r in results:
        assert r["env_runners"]["num_env_steps_sampled"] >= 32
        learner = r["learners"]["default_policy"]
        assert math.isfinite(learner["total_loss"])
        assert math.isfinite(learner["policy_loss"])
    # Episodes end within the per-turn budget of 4 tokens or earlier at <|end|> (terminated either way).
    assert results[-1]["env_runners"]["num_episodes"] >= 1
    assert results[-1]["env_runners"]["episode_len_mean"] <= 4
