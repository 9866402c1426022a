"""The Ray layer: rollout workers, learners and their rank group, the PPO driver, SFT / RM stages, the Ray Data jobs
(prepare, batch generation) and the cluster helpers. It distributes :mod:`rlchat.core`'s pure functions; Ray is
imported inside functions and classes, so importing a module here stays cheap. It never imports :mod:`rlchat.cli`,
``tune`` or ``serve`` (import contracts in ``pyproject.toml``)."""
