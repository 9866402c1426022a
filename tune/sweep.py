"""Ray Tune sweeps over the one config schema (``rlchat tune``).

    rlchat tune --config configs/demo.yaml --space tune/spaces/demo.yaml [--samples N] [--scheduler asha|pbt]
                [key=value ...] [--run-dir DIR] [--address ADDR] [--deploy]
    rlchat tune --resume runs/tune-20250101-120000 --space tune/spaces/demo.yaml   # after the driver was killed

A trial is one PPO run (:func:`rlchat.distributed.trainer.train`) with the base config plus the trial's sampled dotted
keys; it reports every PPO iteration to Tune through the trainer's ``on_iteration`` hook, with the checkpoint whenever
the trainer saved one. ASHA (default) stops weak trials early on the sweep's metric (``eval/reward_mean`` unless
the space file says otherwise); PBT (``--scheduler pbt``) copies the weights of good trials into weak ones and
perturbs their hyperparameters. :class:`tune.stoppers.RLStopper` ends trials that show KL blow-up, entropy
collapse or reward hacking and records why.

The search space is a YAML file (``tune/spaces/*.yaml``; full format in docs/tune.md)::

    metric: eval/reward_mean      # objective (default eval/reward_mean) and its mode (max | min)
    mode: max
    samples: 4                    # trials (num_samples); --samples overrides
    scheduler: {grace_period: 1, reduction_factor: 2}        # ASHA / PBT options
    stop: {max_ref_kl: 1.0, min_entropy: 0.05, hacking_component: reference_f1}
    fixed: {rollout.num_workers: 0, ray.learner_workers: 0}  # values every trial shares
    ppo.learning_rate: {loguniform: [1.0e-4, 1.0e-3]}        # searched keys: dotted key -> distribution
    ppo.clip_coef: {choice: [0.1, 0.2, 0.3]}

Precedence: the ``--config`` file < the space's ``fixed:`` values < ``key=value`` overrides < sampled values (a
key both searched and overridden is an error, not a silent pick).

A sweep directory (default ``runs/tune-<time>``)::

    config.yaml           the base config every trial starts from (fixed + overrides applied)
    space.yaml, sweep.json  the space file and the sweep settings (what --resume rebuilds the sweep from)
    tuner/                Ray Tune's experiment (state, per-trial results, the reported checkpoints)
    trials/<trial_id>/    each trial's rlchat run directory (metrics.jsonl, TensorBoard, checkpoints/)
    stops.json            why the RL stoppers ended trials (written once one has)
    results.csv           the results table (also printed), one row per trial
    trials.png            the objective and the training reward vs iteration, one line per trial
    best_config.yaml      the best trial's resolved config (``rlchat train --config best_config.yaml``)
    best_checkpoint.txt   the best trial's best checkpoint (``rlchat serve $(cat best_checkpoint.txt)``)

Resources per trial come from the trial's own config: in-process trials (``rollout.num_workers=0``,
``ray.learner_workers=0``; what a 2-core laptop should use) take the CPUs of one process; with rollout workers the
trial's placement group also holds one bundle per rollout worker, which the workers' actors are scheduled into.
Learner workers are *not* in the trial's placement group: Ray Train starts its own placement group for them (they
would be reserved twice and could deadlock a small cluster), so the sweep caps concurrent trials to what the
cluster can host instead (:func:`max_concurrent_trials`: computed from the nodes up when the sweep starts; on an
autoscaling cluster, set ``max_concurrent:`` in the space file).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlchat.core.config import Config, from_dict, load_config, parse_override
from rlchat.core.errors import ConfigError, RLChatError
from rlchat.core.metrics import (
    make_run_dir,
    write_run_config,
)
from tune.results import (
    TRIALS_DIR,
    TUNER_DIR,
    _native,
)
from tune.space import (
    Distribution,
    SearchSpace,
    load_space,
)
from tune.stoppers import EVAL_ITERATION, ITERATION, STOPS_FILE, RLStopper

if TYPE_CHECKING:
    from ray.tune import PlacementGroupFactory

logger = logging.getLogger(__name__)

SPACE_FILE = "space.yaml"
SWEEP_FILE = "sweep.json"

PBT_FROZEN_PREFIXES = ("model.", "tokenizer.")
"""Keys PBT may not mutate: a copied checkpoint's weights would not fit the mutated architecture."""

_STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
RESUMED_FROM = "tune/resumed_from"
"""Reported by every result: the PPO iteration of the checkpoint this trial (re)started from (0 = from scratch);
above 0 after a driver resume or a PBT exploit step."""


# ---------------------------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------------------------


def trial_bundles(cfg: Config) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the trial process first, then one bundle per rollout worker.

    The trial process does the sampling when ``rollout.num_workers == 0`` and the learning when
    ``ray.learner_workers == 0``; it then needs those CPUs (and GPU). When both run elsewhere it only
    coordinates, and takes no CPU (an empty head bundle), so a 1-CPU node can host a trial's rollout worker.
    """
    from rlchat.distributed.cluster import learner_bundle, rollout_bundle

    head: dict[str, float] = {}
    if cfg.ray.learner_workers == 0:
        for k, v in learner_bundle(cfg).items():
            head[k] = max(head.get(k, 0.0), v)
    if cfg.rollout.num_workers == 0:
        for k, v in rollout_bundle(cfg).items():
            head[k] = max(head.get(k, 0.0), v)
    bundles = [head] + [rollout_bundle(cfg) for _ in range(cfg.rollout.num_workers)]
    if not any(bundles):
        bundles[0] = {"CPU": 1.0}  # a trial must hold something, or Tune would start unbounded trials
    return bundles


def trial_resources(cfg: Config) -> PlacementGroupFactory:
    """The trial's :class:`~ray.tune.PlacementGroupFactory` (``PACK``: a trial's workers stay close)."""
    from ray import tune as ray_tune

    return ray_tune.PlacementGroupFactory(trial_bundles(cfg), strategy="PACK")


class TrialResources:
    """``tune.with_resources`` callable: each trial's resources from its own config (base + sampled keys)."""

    def __init__(self, base: Mapping[str, Any]) -> None:
        self.base = dict(base)

    def __call__(self, config: Mapping[str, Any]) -> PlacementGroupFactory:
        return trial_resources(from_dict(self.base, _native(config)))


def max_concurrent_trials(cfg: Config, cluster: Mapping[str, float]) -> int | None:
    """How many trials the cluster can run at once when each starts Ray Train learner workers; None otherwise.

    Learner workers get their own placement group from Ray Train, outside the trial's, so Tune cannot count them:
    without a cap, every trial could grab its rollout CPUs while no learner fits anywhere (a deadlock on a small
    cluster). The cap counts a whole trial: its own bundles plus ``ray.learner_workers`` learner bundles.

    Args:
        cfg: the base config.
        cluster: ``ray.cluster_resources()``.

    Returns:
        At least 1; or None when trials learn in-process (Tune's own placement-group accounting is then exact), or
        when the nodes up now cannot host even one trial (an autoscaling cluster before it scales up: Tune's
        pending placement groups are what makes the autoscaler add nodes, so no cap is set).
    """
    from rlchat.distributed.cluster import learner_bundle

    if cfg.ray.learner_workers == 0:
        return None
    need: dict[str, float] = {}
    for bundle in trial_bundles(cfg) + [learner_bundle(cfg)] * cfg.ray.learner_workers:
        for k, v in bundle.items():
            need[k] = need.get(k, 0.0) + v
    fits = [math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    if not fits or min(fits) < 1:
        logger.info("the cluster cannot host a whole trial yet (needs %s, has %s); no concurrency cap", need, cluster)
        return None
    return min(fits)


# ---------------------------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker process, one per trial)
# ---------------------------------------------------------------------------------------------------------------


def _eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("eval/") and isinstance(v, (int, float))}


def _seed_run_dir(run_dir: Path, src: Path, cfg: Config) -> tuple[int, dict[str, float]]:
    """Make ``src`` (a Tune checkpoint: this trial's own, or another trial's under PBT) the run's only checkpoint.

    The trainer then resumes from it step-exactly. The copy is exact even when a PBT explore step mutated
    ``ppo.learning_rate`` or ``ppo.kl_coef``: the learner that loads it keeps the checkpoint's Adam moments and
    schedule position and trains with this trial's values (:meth:`rlchat.distributed.learner.Learner.load_checkpoint`
    calls ``set_learning_rate`` / ``set_kl_coef`` when the checkpoint was trained with others).

    Returns:
        (the checkpoint's step, its eval/* metrics to carry forward until the next evaluation).
    """
    from rlchat.core.checkpoint import CheckpointManager, read_checkpoint

    info = read_checkpoint(src, expect_stage="ppo")
    ckpt_dir = run_dir / "checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir(parents=True)
    shutil.copytree(info.path, CheckpointManager.from_config(run_dir, cfg, "ppo").path_for(info.step))
    old, new = info.config.ppo, cfg.ppo
    if old.learning_rate != new.learning_rate or (old.kl_coef != new.kl_coef and not new.adaptive_kl):
        logger.info(
            "checkpoint %s (learning_rate=%g kl_coef=%g) continues with learning_rate=%g kl_coef=%g",
            src,
            old.learning_rate,
            old.kl_coef,
            new.learning_rate,
            new.kl_coef,
        )
    return info.step, _eval_metrics(info.metrics)


def run_trial(config: dict[str, Any], base: Mapping[str, Any] | None = None, sweep_dir: str = "") -> None:
    """The Tune function trainable: one PPO run with the base config plus this trial's sampled keys.

    Reports every iteration (``tune.report``) with the checkpoint when the trainer saved one. Eval metrics are
    carried forward between held-out evaluations (so schedulers always see the objective) and
    :data:`~tune.stoppers.EVAL_ITERATION` says when they were measured. A restarted trial (driver resumed, or PBT
    exploit) continues from ``tune.get_checkpoint()``; a trial restarted before its first checkpoint starts over.

    Args:
        config: the sampled dotted keys (Tune's trial config).
        base: the base config as a nested dict (``Config.to_dict()``).
        sweep_dir: the sweep directory (absolute); the run goes to ``trials/<trial_id>/`` in it.
    """
    from ray import tune as ray_tune

    from rlchat.distributed.trainer import train

    try:  # trial logs stay readable: no per-save progress bars from transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass

    cfg = from_dict(dict(base or {}), _native(config))
    trial_id = ray_tune.get_context().get_trial_id()
    run_dir = Path(sweep_dir) / TRIALS_DIR / str(trial_id)
    restored = ray_tune.get_checkpoint()
    carried: dict[str, float] = {}
    eval_iteration = resumed_from = 0
    if restored is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # a restart before any checkpoint: begin again, cleanly
        resume = False
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        with restored.as_directory() as src:
            resumed_from, carried = _seed_run_dir(run_dir, Path(src), cfg)
        eval_iteration = resumed_from if carried else 0
        resume = True
    make_run_dir(run_dir, "train")
    write_run_config(run_dir, cfg)

    def on_iteration(iteration: int, metrics: dict[str, Any], checkpoint: str | None) -> None:
        nonlocal carried, eval_iteration
        fresh = _eval_metrics(metrics)
        if fresh:
            carried, eval_iteration = fresh, iteration
        report: dict[str, Any] = {**carried, **{k: v for k, v in metrics.items() if not isinstance(v, str)}}
        report[ITERATION] = iteration
        report[EVAL_ITERATION] = eval_iteration
        report[RESUMED_FROM] = resumed_from
        if checkpoint:
            ray_tune.report(report, checkpoint=ray_tune.Checkpoint.from_directory(checkpoint))
        else:
            ray_tune.report(report)

    train(cfg, run_dir, resume=resume, quiet=True, on_iteration=on_iteration)


class ClipToSpace:
    """PBT ``custom_explore_fn``: keep perturbed values inside the space's ranges (PBT multiplies by 0.8 / 1.2,
    which can leave a range and, e.g. for ``ppo.clip_coef``, make an invalid config)."""

    def __init__(self, params: Mapping[str, Distribution]) -> None:
        self.params = dict(params)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, dist in self.params.items():
            if key in config:
                config[key] = dist.clip(config[key])
        return config


def trial_dirname(trial: Any) -> str:
    """Tune trial directories named by trial id (the default name embeds every sampled value)."""
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------------------------
# Building and running the sweep
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepSettings:
    """What ``sweep.json`` stores: enough for ``--resume`` to rebuild the trainable and the outputs."""

    scheduler: str
    samples: int
    space_source: str
    address: str | None = None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2) + "\n"

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepSettings:
        p = sweep_dir / SWEEP_FILE
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            return cls(**data)
        except FileNotFoundError:
            raise RLChatError(
                f"--resume {sweep_dir}: no {SWEEP_FILE}; expected a sweep directory written by rlchat tune"
            ) from None
        except (ValueError, TypeError) as e:
            raise RLChatError(f"{p}: unreadable sweep settings ({e}); start a new sweep") from None


def make_scheduler(kind: str, space: SearchSpace, cfg: Config) -> Any:
    """ASHA (``max_t`` = ``ppo.iterations``) or PBT, with the space file's options.

    Raises:
        ConfigError: PBT asked to mutate model / tokenizer keys, or checkpoints too rare for its interval.
    """
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    opts = space.scheduler
    if kind == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.ppo.iterations,
            grace_period=min(int(opts.get("grace_period", 1)), cfg.ppo.iterations),
            reduction_factor=float(opts.get("reduction_factor", 2)),
            brackets=int(opts.get("brackets", 1)),
            # A trial that reaches max_t ends by itself (its loop stops at ppo.iterations), so its learner group
            # shuts down cleanly; Tune's stop would kill the trial mid-shutdown and leave Ray Train's placement
            # group to a cleaner (which cannot run where several Ray instances share a machine).
            stop_last_trials=False,
        )
    if kind != "pbt":
        raise ConfigError(f"--scheduler {kind}: expected asha or pbt")
    frozen = [k for k in space.params if k.startswith(PBT_FROZEN_PREFIXES)]
    if frozen:
        raise ConfigError(
            f"{space.path}: PBT cannot search {', '.join(frozen)}: a trial continues from another trial's weights, "
            "which must fit its model; search them with --scheduler asha, or move them under `fixed:`"
        )
    interval = int(opts.get("perturbation_interval", max(1, cfg.checkpoint.every)))
    every = cfg.checkpoint.every
    if every <= 0 or interval % every:
        raise ConfigError(
            f"checkpoint.every={every}: PBT copies the checkpoint reported at each perturbation_interval "
            f"({interval}), so checkpoint.every must divide it; set checkpoint.every={interval} (or 1) in `fixed:`"
        )
    return PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=interval,
        burn_in_period=int(opts.get("burn_in_period", 0)),
        quantile_fraction=float(opts.get("quantile_fraction", 0.25)),
        resample_probability=float(opts.get("resample_probability", 0.25)),
        hyperparam_mutations={k: d.to_mutation() for k, d in space.params.items()},
        custom_explore_fn=ClipToSpace(space.params),
        require_attrs=False,  # held-out metrics arrive every ppo.eval_every iterations
    )


def _trainable(base: Config, sweep_dir: Path) -> Any:
    from ray import tune as ray_tune

    base_dict = base.to_dict()
    fn = ray_tune.with_parameters(run_trial, base=base_dict, sweep_dir=str(sweep_dir))
    return ray_tune.with_resources(fn, TrialResources(base_dict))


def _stopper(space: SearchSpace, sweep_dir: Path) -> RLStopper:
    return RLStopper(**space.stop, record_path=sweep_dir / STOPS_FILE)


def build_tuner(base: Config, space: SearchSpace, sweep_dir: Path, scheduler: str, samples: int) -> Any:
    """A new :class:`ray.tune.Tuner` for the sweep (Ray must be initialised: the concurrency cap reads the
    cluster's resources)."""
    import ray
    from ray import tune as ray_tune

    from rlchat.core.console import verbose_requested

    tune_config = ray_tune.TuneConfig(
        metric=space.metric,
        mode=space.mode,
        scheduler=make_scheduler(scheduler, space, base),
        num_samples=samples,
        max_concurrent_trials=space.max_concurrent or max_concurrent_trials(base, ray.cluster_resources()),
        trial_dirname_creator=trial_dirname,
    )
    run_config = ray_tune.RunConfig(
        name=TUNER_DIR,
        storage_path=str(sweep_dir),
        stop=_stopper(space, sweep_dir),
        checkpoint_config=ray_tune.CheckpointConfig(
            # the best by the metric (Tune always keeps the latest too, which resume needs); PBT restores a clone
            # from the donor's checkpoint some time after choosing it, so it keeps a few more
            num_to_keep=4 if scheduler == "pbt" else 2,
            checkpoint_score_attribute=space.metric,
            checkpoint_score_order=space.mode,
        ),
        failure_config=ray_tune.FailureConfig(max_failures=0),
        verbose=1 if verbose_requested() else 0,  # rlchat prints its own progress; Tune's tables with --verbose
    )
    return ray_tune.Tuner(
        _trainable(base, sweep_dir), param_space=space.param_space(), tune_config=tune_config, run_config=run_config
    )


def _cli_overrides(overrides: Sequence[str] | None) -> dict[str, Any]:
    return dict(parse_override(o) for o in overrides or [])


def prepare_sweep(
    config: str | None, overrides: Sequence[str] | None, space_path: str | Path
) -> tuple[Config, SearchSpace]:
    """The base config (config file < space ``fixed:`` < overrides; best checkpoint by the sweep metric) and the
    validated space.

    Raises:
        ConfigError: bad space, a key both searched and overridden, an invalid combined config.
    """
    space = load_space(space_path)
    cli = _cli_overrides(overrides)
    both = sorted(set(cli) & set(space.params))
    if both:
        raise ConfigError(
            f"{', '.join(both)}: searched by {space.path} and also overridden on the command line; drop the "
            "override, or move the key under `fixed:` in a copy of the space"
        )
    merged = {**space.fixed, **cli}
    # Each trial keeps its best checkpoint by the sweep's objective, so best_checkpoint.txt means the same thing.
    merged.setdefault("checkpoint.best_metric", space.metric)
    merged.setdefault("checkpoint.best_mode", space.mode)
    try:
        base = load_config(config, merged)
    except ConfigError as e:
        raise ConfigError(f"{e} (with the `fixed:` values of {space.path} and the command-line overrides)") from None
    # (path keys are already absolute: load_config resolves them where the user typed the command)
    return base, load_space(space_path, base)
