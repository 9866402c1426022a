"""``rlchat sft`` and ``rlchat rm``: resolve the config (a resumed run reads its own config.yaml) and run the stage
(:mod:`rlchat.distributed.stages`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlchat.core.config import load_config
from rlchat.core.errors import CheckpointError, ConfigError
from rlchat.distributed.stages import run_stage


def _command(
    stage: str,
    config: str | None,
    overrides: list[str] | None,
    run_dir: str | None,
    address: str | None,
    resume: str | None,
) -> int:
    """Resolve the config (a resumed run reads its own config.yaml unless --config is given) and run the stage."""
    if resume:
        if run_dir and Path(run_dir).resolve() != Path(resume).resolve():
            raise ConfigError(
                f"--resume {resume} and --run-dir {run_dir}: a resumed run continues in its own "
                "directory; drop --run-dir"
            )
        stored = Path(resume) / "config.yaml"
        if config is None and not stored.is_file():
            raise CheckpointError(
                f"--resume {resume}: no config.yaml there; expected a run directory of rlchat {stage}"
            )
        cfg = load_config(config or stored, overrides or [])
        run_stage(stage, cfg, resume, address, resume=True)
    else:
        cfg = load_config(config, overrides or [])
        run_stage(stage, cfg, run_dir, address)
    return 0


def sft_command(
    config: str | None = None,
    overrides: list[str] | None = None,
    run_dir: str | None = None,
    address: str | None = None,
    resume: str | None = None,
    **_: Any,
) -> int:
    """``rlchat sft --config FILE [key=value ...] [--run-dir DIR] [--address ADDR] [--resume RUN_DIR]``."""
    return _command("sft", config, overrides, run_dir, address, resume)


def rm_command(
    config: str | None = None,
    overrides: list[str] | None = None,
    run_dir: str | None = None,
    address: str | None = None,
    resume: str | None = None,
    **_: Any,
) -> int:
    """``rlchat rm --config FILE [key=value ...] [--run-dir DIR] [--address ADDR] [--resume RUN_DIR]``."""
    return _command("rm", config, overrides, run_dir, address, resume)
