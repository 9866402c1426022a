"""The pure core of rlchat: config, tokenizer, data, model, log-probs, generation, rewards, PPO maths, checkpoints,
metrics, evaluation and the small helpers they share. Runs in one plain Python process: nothing here imports Ray,
Tune, Serve, ``envs``, :mod:`rlchat.distributed` or :mod:`rlchat.cli` (an import contract in ``pyproject.toml``)."""
