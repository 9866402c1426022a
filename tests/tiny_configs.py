"""The tiny PPO settings many tests share, in one place (imported as ``from tiny_configs import TINY_PPO``).

A one-layer, width-32 fp32 policy, 8 envs per worker, 8-token turns, two minibatches: every PPO code path runs in
well under a second per iteration on one CPU thread. Tests add what they exercise (epochs, eval, layout).
"""

TINY_PPO = [
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.precision=fp32",
    "rollout.envs_per_worker=8",
    "env.max_turn_tokens=8",
    "ppo.num_minibatches=2",
]

IN_PROCESS = ["rollout.num_workers=0", "ray.learner_workers=0"]
"""Sampling and learning in the test process: no Ray actors or Ray Train workers to start."""
