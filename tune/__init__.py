"""rlchat's Ray Tune sweeps: ``tune.sweep`` (space files, the trainable, results, ``rlchat tune``) and
``tune.stoppers`` (RL-aware stoppers). See docs/tune.md.

This package shares its name with ``ray.tune``: inside the project, Ray's is always imported as
``from ray import tune as ray_tune``, never as a bare ``import tune``; this package's modules as ``tune.sweep`` and
``tune.stoppers``. Nothing is imported here, so ``import tune.stoppers`` does not pull in the sweep machinery.
"""
