"""``rlchat tune``: run (or ``--resume``) a Ray Tune sweep (the library is ``tune/``) and, with ``--deploy``, serve
the best checkpoint through the Serve app -- the one place that joins the two."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rlchat.core.config import Config, load_config
from rlchat.core.errors import CheckpointError, ConfigError, RLChatError
from rlchat.core.metrics import CONFIG_FILE, make_run_dir, write_run_config
from tune.results import TUNER_DIR, write_outputs
from tune.space import load_space, resolve_space_path
from tune.sweep import (
    _STRICT_METRIC_ENV,
    SPACE_FILE,
    SWEEP_FILE,
    SweepSettings,
    _trainable,
    build_tuner,
    prepare_sweep,
)

logger = logging.getLogger(__name__)


def _connects_to_cluster(address: str | None, base: Config) -> bool:
    """Whether the sweep joins an existing cluster (as rlchat.distributed.cluster.init_ray resolves it) rather than
    starting a local Ray instance that ends with this process."""
    target = address or base.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    return target != "local"


def deploy_best(checkpoint: str, address: str | None, blocking: bool) -> int:
    """Serve ``checkpoint`` with the Serve app (``rlchat.cli.serve_cmd:serve_command``; it prints the URL)."""
    from rlchat.cli.serve_cmd import serve_command  # lazily: Serve's imports cost seconds and only --deploy needs them

    print(f"deploying the best checkpoint {checkpoint}")
    return int(serve_command(checkpoint=checkpoint, address=address, blocking=blocking) or 0)


def tune_command(
    config: str | None,
    overrides: list[str] | None,
    run_dir: str | None,
    address: str | None,
    resume: str | None,
    space: str | None,
    samples: int | None = None,
    scheduler: str = "asha",
    deploy: bool = False,
    **_: Any,
) -> int:
    """``rlchat tune``: run (or ``--resume``) a sweep and write its results; ``--deploy`` serves the best.

    With ``deploy``, the best checkpoint is served through :func:`rlchat.cli.serve_cmd.serve_command` when the sweep
    ends: blocking (until Ctrl-C) when this call started a local Ray instance, which would end with the process;
    non-blocking on a cluster or on a Ray instance the caller already runs (the app stays up on it).

    Returns:
        0 when at least one trial reported the metric, 1 otherwise (every trial failed).

    Raises:
        ConfigError / RLChatError: a bad space or config, ``--resume`` of something that is not a sweep.
    """
    import ray
    from ray import tune as ray_tune

    from rlchat.distributed.cluster import init_ray

    t0 = time.perf_counter()
    if resume:
        sweep_dir = Path(resume).resolve()
        if overrides:
            raise ConfigError(
                f"--resume {resume}: key=value overrides cannot change a sweep in flight ({' '.join(overrides)}); "
                "resume without them, or start a new sweep"
            )
        settings = SweepSettings.read(sweep_dir)
        base = load_config(sweep_dir / CONFIG_FILE)
        space_obj = load_space(sweep_dir / SPACE_FILE, base)
        try:
            given = resolve_space_path(space).read_bytes() if space else None
        except ConfigError:
            given = b""
        if given is not None and given != (sweep_dir / SPACE_FILE).read_bytes():
            logger.warning("--space %s differs from the sweep's own %s; resuming with the sweep's", space, SPACE_FILE)
        tuner_dir = sweep_dir / TUNER_DIR
        if not ray_tune.Tuner.can_restore(str(tuner_dir)):
            raise RLChatError(
                f"--resume {resume}: no Tune experiment state in {tuner_dir} (the driver was killed before Tune "
                "saved any); start the sweep again"
            )
        scheduler, address = settings.scheduler, address or settings.address
        print(f"resuming sweep {sweep_dir}")
    else:
        if not space:
            raise ConfigError("rlchat tune: --space is required for a new sweep (e.g. --space tune/spaces/demo.yaml)")
        space_path = resolve_space_path(space)
        base, space_obj = prepare_sweep(config, overrides, space_path)
        samples = samples if samples is not None else space_obj.samples
        if samples < 1:
            raise ConfigError(f"--samples {samples}: expected at least 1 trial")
        sweep_dir = make_run_dir(run_dir, "tune").resolve()
        for sub in ("checkpoints", "logs", "plots"):  # a train run's layout; a sweep keeps its runs in trials/
            with contextlib.suppress(OSError):
                (sweep_dir / sub).rmdir()  # only when empty
        write_run_config(sweep_dir, base)
        shutil.copyfile(space_path, sweep_dir / SPACE_FILE)
        settings = SweepSettings(scheduler=scheduler, samples=samples, space_source=str(space_path), address=address)
        (sweep_dir / SWEEP_FILE).write_text(settings.to_json(), encoding="utf-8")
        print(f"sweep directory: {sweep_dir}")
        print(
            f"{samples} sample(s) x {len(space_obj.params)} searched key(s), {scheduler.upper()} on "
            f"{space_obj.metric} ({space_obj.mode}), {base.ppo.iterations} iterations max"
        )
    # Held-out evaluation runs every ppo.eval_every iterations, so results before the first one lack eval/*
    # metrics; the schedulers skip such results, but Tune's strict check would fail the trial.
    os.environ[_STRICT_METRIC_ENV] = "1"
    # Whether this call starts the Ray instance that --deploy would serve on: one it starts locally ends with this
    # process, so --deploy then keeps serving until Ctrl-C. On a cluster, or on a Ray the caller already runs (a
    # notebook, a script, a test), --deploy deploys and returns: the app lives as long as that Ray.
    starts_local_ray = not ray.is_initialized() and not _connects_to_cluster(address, base)
    init_ray(address or base.ray.address or None, base.ray.num_cpus)
    if resume:
        tuner = ray_tune.Tuner.restore(
            str(sweep_dir / TUNER_DIR), trainable=_trainable(base, sweep_dir), resume_errored=True
        )
    else:
        tuner = build_tuner(base, space_obj, sweep_dir, scheduler, int(samples or space_obj.samples))
    grid = tuner.fit()
    best = write_outputs(grid, space_obj, base, sweep_dir, scheduler)
    print(f"sweep wall time: {time.perf_counter() - t0:.1f} s")
    if best is None:
        return 1
    if deploy:
        if not best.checkpoint:
            raise CheckpointError(
                f"--deploy: the best trial {best.trial_id} reported no checkpoint; set checkpoint.every "
                "(e.g. in the space's `fixed:`) so trials save one"
            )
        return deploy_best(best.checkpoint, address, blocking=starts_local_ray)
    return 0
