"""rlchat: distributed PPO for chat language models on Ray.

The core (config, tokenizer, data, model, generation, rewards, ppo, checkpoint, metrics) never imports Ray; the
distributed layer (rollout, learner, trainer, stages, prepare) does.
"""

__version__ = "0.1.0"
