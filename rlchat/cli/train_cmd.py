"""``rlchat train``: PPO from a config, or ``--resume RUN_DIR`` with the run's own config.yaml (the loop is
:mod:`rlchat.distributed.trainer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlchat.core.config import load_config
from rlchat.core.errors import RLChatError
from rlchat.distributed.trainer import train


def train_command(
    config: str | None,
    overrides: list[str],
    run_dir: str | None,
    address: str | None,
    resume: str | None,
    **_: Any,
) -> int:
    """``rlchat train``: PPO from a config (or ``--resume RUN_DIR`` with the run's own config.yaml)."""
    if resume:
        run_path = Path(resume)
        saved = run_path / "config.yaml"
        if not saved.is_file():
            raise RLChatError(
                f"--resume {resume}: no config.yaml there; expected a run directory written by rlchat train"
            )
        cfg = load_config(saved, overrides)
        run_dir = str(run_path)
    else:
        cfg = load_config(config, overrides)
    path, metrics = train(cfg, run_dir, resume=bool(resume), address=address)
    print(f"done: {path.resolve()}  reward {metrics.get('rollout/reward_mean', float('nan')):.3f}", flush=True)
    return 0
