"""Shared pytest fixtures: one local Ray instance per session, tiny configs, thread budgets.

Start-up costs dominate on 2 cores (imports ~4 s, ray.init 2-4 s), so every Ray test shares one instance.
"""

from __future__ import annotations

import os

import pytest

# Hermetic: no hub downloads, quiet Ray, one torch thread per process unless a test asks for more.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tests run with one torch thread (several test processes may share the 2 cores)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
