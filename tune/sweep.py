"""Ray Tune sweeps over the one config schema (``rlchat tune``).

    rlchat tune --config configs/demo.yaml --space tune/spaces/demo.yaml [--samples N] [--scheduler asha|pbt]
                [key=value ...] [--run-dir DIR] [--address ADDR] [--deploy]
    rlchat tune --resume runs/tune-20250101-120000 --space tune/spaces/demo.yaml   # after the driver was killed

A trial is one PPO run (:func:`rlchat.distributed.trainer.train`) with the base config plus the trial's sampled dotted keys;
it reports every PPO iteration to Tune through the trainer's ``on_iteration`` hook, with the checkpoint whenever
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
    stops.json            why the RL stoppers ended trials
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

import contextlib
import csv
import difflib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rlchat.core.config import Config, from_dict, load_config, parse_override, save_config
from rlchat.core.errors import CheckpointError, ConfigError, RLChatError
from rlchat.core.metrics import (
    CONFIG_FILE,
    EVAL_REWARD_MEAN,
    GUARD_TRIPPED,
    KL_REF_KL,
    PPO_ENTROPY,
    ROLLOUT_REWARD_MEAN,
    make_run_dir,
    write_run_config,
)
from tune.stoppers import EVAL_ITERATION, FIXES, ITERATION, STOPS_FILE, RLStopper, read_stops

if TYPE_CHECKING:
    from ray.tune import PlacementGroupFactory, ResultGrid

logger = logging.getLogger(__name__)

SPACE_FILE = "space.yaml"
SWEEP_FILE = "sweep.json"
TUNER_DIR = "tuner"
TRIALS_DIR = "trials"
RESULTS_CSV = "results.csv"
PLOT_FILE = "trials.png"
BEST_CONFIG_FILE = "best_config.yaml"
BEST_CHECKPOINT_FILE = "best_checkpoint.txt"

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
"""Distribution names a space file may use (``randint`` excludes its upper bound, as Tune and numpy do)."""
RESERVED_KEYS = ("metric", "mode", "samples", "max_concurrent", "scheduler", "stop", "fixed")
"""Top-level keys of a space file that are settings, not config keys."""
SCHEDULER_OPTIONS: dict[str, tuple[type, str]] = {
    "grace_period": (int, "ASHA: iterations every trial runs before it can be stopped (>= 1)"),
    "reduction_factor": (float, "ASHA: keep 1/reduction_factor of the trials at each rung (> 1)"),
    "brackets": (int, "ASHA: number of brackets (>= 1)"),
    "perturbation_interval": (int, "PBT: iterations between exploit/explore steps (>= 1)"),
    "burn_in_period": (int, "PBT: no perturbation before this iteration (>= 0)"),
    "quantile_fraction": (float, "PBT: bottom/top fraction of trials that exploit / are copied (0-0.5)"),
    "resample_probability": (float, "PBT: chance to resample a value instead of perturbing it (0-1)"),
}
STOP_OPTIONS: dict[str, type] = {
    "max_ref_kl": float,
    "min_entropy": float,
    "hacking_component": str,
    "hacking_window": int,
    "hacking_min_delta": float,
    "max_gold_drop": float,
    "gold_window": int,
    "patience": int,
    "grace_iterations": int,
}
PBT_FROZEN_PREFIXES = ("model.", "tokenizer.")
"""Keys PBT may not mutate: a copied checkpoint's weights would not fit the mutated architecture."""

_STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
RESUMED_FROM = "tune/resumed_from"
"""Reported by every result: the PPO iteration of the checkpoint this trial (re)started from (0 = from scratch);
above 0 after a driver resume or a PBT exploit step."""

# ---------------------------------------------------------------------------------------------------------------
# The search space
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distribution:
    """One searched key's distribution, as written in the space file.

    Attributes:
        kind: one of :data:`DISTRIBUTIONS`.
        args: ``(low, high)`` for uniform / loguniform / randint, the values for choice / grid.
    """

    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        """The Ray Tune domain (``tune.loguniform(...)``, ``tune.grid_search([...])``...)."""
        from ray import tune as ray_tune

        if self.kind == "grid":
            return ray_tune.grid_search(list(self.args))
        if self.kind == "choice":
            return ray_tune.choice(list(self.args))
        return getattr(ray_tune, self.kind)(*self.args)

    def to_mutation(self) -> Any:
        """What PBT resamples from (a grid becomes a plain list of choices: PBT cannot grid-search)."""
        from ray import tune as ray_tune

        if self.kind in ("grid", "choice"):
            return list(self.args)
        return getattr(ray_tune, self.kind)(*self.args)

    def probe_values(self) -> list[Any]:
        """Values that must all be valid config values: the bounds of a range, every listed value."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [low, high]

    def clip(self, value: Any) -> Any:
        """Clamp a PBT-perturbed value back into the range (choices are left as they are)."""
        if self.kind in ("choice", "grid") or not isinstance(value, (int, float)):
            return value
        low, high = self.args
        if self.kind == "randint":
            return int(min(max(int(round(value)), low), high - 1))
        return float(min(max(float(value), low), high))

    def describe(self) -> str:
        return f"{self.kind}{list(self.args)}"


@dataclass(frozen=True)
class SearchSpace:
    """A parsed and validated space file (see the module docstring and docs/tune.md).

    Attributes:
        path: the file it came from (named in every error).
        params: searched dotted key -> distribution, in file order.
        fixed: dotted key -> value shared by every trial (applied before ``key=value`` overrides).
        metric, mode: the objective ("max" or "min").
        samples: trials (Tune's ``num_samples``; grid values multiply it).
        max_concurrent: most trials at once (0 = as many as the resources allow; see :func:`max_concurrent_trials`).
        scheduler: options from :data:`SCHEDULER_OPTIONS`.
        stop: :class:`~tune.stoppers.RLStopper` settings.
    """

    path: str
    params: dict[str, Distribution]
    fixed: dict[str, Any] = field(default_factory=dict)
    metric: str = EVAL_REWARD_MEAN
    mode: str = "max"
    samples: int = 4
    max_concurrent: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    stop: dict[str, Any] = field(default_factory=dict)

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: dotted key -> domain (the trial's ``config`` dict has the same keys)."""
        return {key: dist.to_tune() for key, dist in self.params.items()}


def _err(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of every top-level key and of every key one level down (``fixed.rollout.num_workers``)."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if not isinstance(root, yaml.MappingNode):
        return lines
    for k, v in root.value:
        name = str(k.value)
        lines[name] = k.start_mark.line + 1
        if isinstance(v, yaml.MappingNode):
            for k2, _ in v.value:
                lines[f"{name}.{k2.value}"] = k2.start_mark.line + 1
    return lines


def _schema_keys() -> dict[str, Any]:
    """Every dotted config key with its default value (the schema the space is checked against)."""
    return Config().flat()


def _unknown_key(where: str, key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" did you mean '{close[0]}'?" if close else " `rlchat config keys` lists them all."
    return _err(where, f"unknown config key '{key}'; expected a dotted key of the config schema.{hint}")


def _number(where: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _err(where, f"expected {what} (a number), found {value!r}")
    try:
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    except ValueError:
        raise _err(where, f"expected {what} (a number), found {value!r}") from None


def _parse_distribution(where: str, key: str, spec: Any, default: Any) -> Distribution:
    """``{loguniform: [1e-4, 1e-3]}`` -> Distribution, checked against the field's type."""
    example = "{loguniform: [1.0e-4, 1.0e-3]}" if isinstance(default, float) else "{choice: [a, b]}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise _err(
            where,
            f"expected a distribution with one of {', '.join(DISTRIBUTIONS)}, e.g. {key}: {example}; found "
            f"{spec!r} (a value every trial shares goes under `fixed:`)",
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint = f" did you mean '{close[0]}'?" if close else ""
        raise _err(where, f"unknown distribution '{kind}'; expected one of {', '.join(DISTRIBUTIONS)}.{hint}")
    if not isinstance(args, list) or not args:
        raise _err(where, f"{kind}: expected a non-empty list, found {args!r}")
    if kind in ("choice", "grid"):
        return Distribution(kind, tuple(args))
    if len(args) != 2:
        raise _err(where, f"{kind}: expected [low, high], found {args!r}")
    is_int_field = isinstance(default, int) and not isinstance(default, bool)
    if kind == "randint":
        if not is_int_field:
            raise _err(where, f"randint needs an integer config key; {key} is {type(default).__name__}")
        low, high = (_number(where, a, "a bound") for a in args)
        if not (low.is_integer() and high.is_integer()):
            raise _err(where, f"randint: expected integer bounds, found {args!r}")
        if high - low < 1:
            raise _err(where, f"randint: expected low < high (high is excluded), found {args!r}")
        return Distribution(kind, (int(low), int(high)))
    if not isinstance(default, float):
        fix = "use randint" if is_int_field else "use choice"
        raise _err(where, f"{kind} needs a float config key; {key} is {type(default).__name__} ({fix})")
    low, high = (_number(where, a, "a bound") for a in args)
    if not low < high:
        raise _err(where, f"{kind}: expected low < high, found {args!r}")
    if kind == "loguniform" and low <= 0:
        raise _err(where, f"loguniform: expected positive bounds, found {args!r} (use uniform to include 0)")
    return Distribution(kind, (low, high))


def _typed_option(where: str, value: Any, tp: type) -> Any:
    if tp is str:
        if not isinstance(value, str):
            raise _err(where, f"expected a string, found {value!r}")
        return value
    number = _number(where, value, "a number")
    if tp is int:
        if not number.is_integer():
            raise _err(where, f"expected an integer, found {value!r}")
        return int(number)
    return number


def load_space(path: str | Path, base: Config | None = None) -> SearchSpace:
    """Read and validate a space file.

    Args:
        path: the YAML file.
        base: when given, every listed value and range bound must make a valid config with it (so a trial
            never fails on a value the file could have been checked for).

    Returns:
        The parsed :class:`SearchSpace`.

    Raises:
        ConfigError: unreadable file or invalid YAML; an unknown config key (with the closest valid one); an
            unknown distribution or bad bounds; a value the config rejects; a bad setting. The message starts with
            ``file:line: key``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: search-space file not found; pass an existing YAML file, e.g. tune/spaces/demo.yaml")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: expected a mapping of dotted config keys to distributions, found {type(data).__name__}"
        )
    lines = _key_lines(text)

    def where(key: str) -> str:
        line = lines.get(key)
        name = key.split(".", 1)[1] if key.startswith(("fixed.", "stop.", "scheduler.")) else key
        return f"{p}:{line}: {name}" if line else f"{p}: {name}"

    schema = _schema_keys()
    params: dict[str, Distribution] = {}
    for key, spec in data.items():
        key = str(key)
        if key in RESERVED_KEYS:
            continue
        if key not in schema:
            if "." not in key:
                raise _err(
                    where(key),
                    f"unknown setting '{key}'; expected a dotted config key (e.g. ppo.learning_rate) or one of "
                    f"{', '.join(RESERVED_KEYS)}",
                )
            raise _unknown_key(where(key), key, list(schema))
        params[key] = _parse_distribution(where(key), key, spec, schema[key])
    if not params:
        raise ConfigError(
            f"{p}: no searched keys; add at least one, e.g. ppo.learning_rate: {{loguniform: [1.0e-4, 1.0e-3]}}"
        )

    fixed_raw = data.get("fixed") or {}
    if not isinstance(fixed_raw, dict):
        raise _err(where("fixed"), f"expected a mapping of dotted config keys to values, found {fixed_raw!r}")
    fixed: dict[str, Any] = {}
    for key, value in fixed_raw.items():
        key = str(key)
        if key not in schema:
            raise _unknown_key(where(f"fixed.{key}"), key, list(schema))
        if key in params:
            raise _err(where(f"fixed.{key}"), "is both searched and fixed; remove one of the two")
        fixed[key] = value

    metric = data.get("metric", EVAL_REWARD_MEAN)
    if not isinstance(metric, str) or "/" not in metric:
        raise _err(where("metric"), f"expected a metric key such as eval/reward_mean, found {metric!r}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise _err(where("mode"), f"expected max or min, found {mode!r}")
    samples = _typed_option(where("samples"), data.get("samples", 4), int)
    if samples < 1:
        raise _err(where("samples"), f"expected at least 1 trial, found {samples}")
    max_concurrent = _typed_option(where("max_concurrent"), data.get("max_concurrent", 0), int)
    if max_concurrent < 0:
        raise _err(where("max_concurrent"), f"expected >= 0 (0 = no cap), found {max_concurrent}")

    sections: dict[str, dict[str, Any]] = {}
    for section, allowed in (("scheduler", {k: t for k, (t, _) in SCHEDULER_OPTIONS.items()}), ("stop", STOP_OPTIONS)):
        raw = data.get(section) or {}
        if not isinstance(raw, dict):
            raise _err(where(section), f"expected a mapping of options, found {raw!r}")
        out: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in allowed:
                close = difflib.get_close_matches(str(name), list(allowed), n=1)
                hint = f" did you mean '{close[0]}'?" if close else ""
                expected = ", ".join(allowed)
                raise _err(where(f"{section}.{name}"), f"unknown {section} option; expected one of {expected}.{hint}")
            out[name] = _typed_option(where(f"{section}.{name}"), value, allowed[name])
        sections[section] = out
    _check_scheduler_options(sections["scheduler"], where)
    try:
        RLStopper(**sections["stop"])  # range checks, with the option named
    except ConfigError as e:
        raise _err(str(p), str(e)) from None

    space = SearchSpace(
        path=str(p),
        params=params,
        fixed=fixed,
        metric=metric,
        mode=mode,
        samples=samples,
        max_concurrent=max_concurrent,
        scheduler=sections["scheduler"],
        stop=sections["stop"],
    )
    if base is not None:
        check_space_values(space, base, where)
    return space


def _check_scheduler_options(opts: Mapping[str, Any], where: Any) -> None:
    bounds = {
        "grace_period": lambda v: v >= 1,
        "reduction_factor": lambda v: v > 1,
        "brackets": lambda v: v >= 1,
        "perturbation_interval": lambda v: v >= 1,
        "burn_in_period": lambda v: v >= 0,
        "quantile_fraction": lambda v: 0 <= v <= 0.5,
        "resample_probability": lambda v: 0 <= v <= 1,
    }
    for name, value in opts.items():
        if not bounds[name](value):
            raise _err(where(f"scheduler.{name}"), f"{value!r} is out of range: {SCHEDULER_OPTIONS[name][1]}")


def check_space_values(space: SearchSpace, base: Config, where: Any = None) -> None:
    """Every choice / grid value and every range bound must make a valid config with ``base``.

    Raises:
        ConfigError: ``file:line: key: value V is not valid with the base config: <why>``.
    """
    for key, dist in space.params.items():
        for value in dist.probe_values():
            try:
                base.replace(**{key: value})
            except ConfigError as e:
                loc = where(key) if where is not None else f"{space.path}: {key}"
                raise ConfigError(
                    f"{loc}: value {value!r} ({dist.describe()}) is not valid with the base config: {e}"
                ) from None


def resolve_space_path(space: str | Path) -> Path:
    """A space file given as a path, or by name from this package's ``spaces/`` (``demo`` -> spaces/demo.yaml),
    so ``--space tune/spaces/demo.yaml`` also works from outside the checkout."""
    p = Path(space)
    if p.is_file():
        return p
    here = Path(__file__).resolve().parent
    candidates = [here.parent / p, here / "spaces" / p.name, here / "spaces" / f"{p.name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    names = ", ".join(sorted(q.name for q in (here / "spaces").glob("*.yaml")))
    raise ConfigError(f"--space {space}: no such file; pass a YAML file or one of the built-in spaces ({names})")


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


def _native(config: Mapping[str, Any]) -> dict[str, Any]:
    """Sampled values as plain Python (Tune may hand out numpy scalars, which the config's coercion rejects)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        out[k] = v.item() if hasattr(v, "item") and not isinstance(v, (list, tuple, dict)) else v
    return out


def _eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("eval/") and isinstance(v, (int, float))}


def _seed_run_dir(run_dir: Path, src: Path, cfg: Config) -> tuple[int, dict[str, float]]:
    """Make ``src`` (a Tune checkpoint: this trial's own, or another trial's under PBT) the run's only checkpoint.

    The trainer then resumes from it step-exactly. The copy is exact even when a PBT explore step mutated
    ``ppo.learning_rate`` or ``ppo.kl_coef``: the learner that loads it keeps the checkpoint's Adam moments and
    schedule position and trains with this trial's values (:meth:`rlchat.distributed.learner.Learner.load_checkpoint` calls
    ``set_learning_rate`` / ``set_kl_coef`` when the checkpoint was trained with others).

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


# ---------------------------------------------------------------------------------------------------------------
# Results: table, CSV, plot, best config / checkpoint
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    """One trial's line of the results table."""

    trial_id: str
    status: str  # "TERMINATED" | "ERROR"
    stop_reason: str  # completed | asha | ref_kl | entropy | reward_hacking | guardrail | error | not started
    stop_detail: str
    iterations: int
    last: float
    best: float
    params: dict[str, Any]
    final: dict[str, float]  # last values of KL, entropy, training reward
    run_dir: str
    checkpoint: str = ""
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (iteration, metric, training reward)


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def _history(df: Any, metric: str) -> list[tuple[int, float, float]]:
    """(iteration, metric, training reward) per iteration from Tune's progress table. A resumed trial re-reports
    the iterations after its checkpoint (the last report wins), and an eval metric counts only where it was
    measured, not where it was carried forward."""
    if df is None or not len(df):
        return []
    it_col = ITERATION if ITERATION in df.columns else "training_iteration"
    by_iteration: dict[int, tuple[int, float, float]] = {}
    for _, rec in df.iterrows():
        it = int(rec[it_col])
        value = _finite(rec.get(metric))
        if metric.startswith("eval/") and EVAL_ITERATION in df.columns and _finite(rec.get(EVAL_ITERATION)) != it:
            value = float("nan")
        by_iteration[it] = (it, value, _finite(rec.get(ROLLOUT_REWARD_MEAN)))
    return [by_iteration[k] for k in sorted(by_iteration)]


def collect_rows(
    grid: ResultGrid, space: SearchSpace, base: Config, sweep_dir: Path, scheduler: str
) -> list[TrialRow]:
    """One :class:`TrialRow` per trial of a finished ``tuner.fit()``, with the stop reason of each."""
    stops = read_stops(sweep_dir / STOPS_FILE)
    rows: list[TrialRow] = []
    sign = 1.0 if space.mode == "max" else -1.0
    for result in grid:
        metrics = dict(result.metrics or {})
        # the trial directory names the trial (trial_dirname); a PBT clone's last result may carry the donor's id
        name = Path(result.path).name
        trial_id = name.removeprefix("trial_") if name.startswith("trial_") else str(metrics.get("trial_id", name))
        history = _history(result.metrics_dataframe, space.metric)
        values = [h[1] for h in history if not math.isnan(h[1])]
        best = max(values, key=lambda v: sign * v) if values else float("nan")
        iterations = int(metrics.get(ITERATION, metrics.get("training_iteration", 0)) or 0)
        status = "ERROR" if result.error else "TERMINATED"
        if result.error:
            reason, detail = "error", str(result.error).strip().splitlines()[-1][:300]
        elif trial_id in stops:
            reason, detail = stops[trial_id]["reason"], stops[trial_id]["detail"]
        elif not history:
            reason, detail = "not started", ""
        elif iterations >= base.replace(**_native(result.config or {})).ppo.iterations:
            reason, detail = "completed", ""
        elif _finite(metrics.get(GUARD_TRIPPED)) > 0:
            reason, detail = "guardrail", "a trainer guardrail stopped the run (ppo.guardrail_action=stop)"
        else:
            reason, detail = scheduler, f"stopped early by the {scheduler.upper()} scheduler"
        rows.append(
            TrialRow(
                trial_id=trial_id,
                status=status,
                stop_reason=reason,
                stop_detail=detail,
                iterations=iterations,
                last=_finite(metrics.get(space.metric)),
                best=best,
                params={k: (result.config or {}).get(k) for k in space.params},
                final={k: _finite(metrics.get(k)) for k in (ROLLOUT_REWARD_MEAN, KL_REF_KL, PPO_ENTROPY)},
                run_dir=str(sweep_dir / TRIALS_DIR / trial_id),
                history=history,
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def best_row(rows: Sequence[TrialRow], mode: str) -> TrialRow | None:
    """The trial with the best value of the metric over its whole run (ties: the earlier trial id)."""
    scored = [r for r in rows if not math.isnan(r.best)]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda r: sign * r.best)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def format_table(rows: Sequence[TrialRow], space: SearchSpace, best: TrialRow | None) -> str:
    """The results table as aligned text (what the command prints)."""
    metric = space.metric
    header = ["trial", "stop", "iter", *space.params, f"{metric} (last)", f"{metric} (best)", "kl/ref_kl", "entropy"]
    lines = [header]
    for r in rows:
        mark = "*" if best is not None and r.trial_id == best.trial_id else " "
        lines.append(
            [
                mark + r.trial_id,
                r.stop_reason,
                str(r.iterations),
                *(_fmt(r.params[k]) for k in space.params),
                _fmt(r.last),
                _fmt(r.best),
                _fmt(r.final[KL_REF_KL]),
                _fmt(r.final[PPO_ENTROPY]),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_csv(rows: Sequence[TrialRow], space: SearchSpace, path: Path) -> None:
    """``results.csv``: one row per trial (parameters, metric last / best, final KL / entropy / reward, stop)."""
    fields = [
        "trial_id",
        "status",
        "stop_reason",
        "stop_detail",
        "iterations",
        *space.params,
        f"{space.metric}_last",
        f"{space.metric}_best",
        *(f"{k}_last" for k in (ROLLOUT_REWARD_MEAN, KL_REF_KL, PPO_ENTROPY)),
        "run_dir",
        "checkpoint",
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in rows:
            w.writerow(
                [
                    r.trial_id,
                    r.status,
                    r.stop_reason,
                    r.stop_detail,
                    r.iterations,
                    *(r.params[k] for k in space.params),
                    r.last,
                    r.best,
                    *(r.final[k] for k in (ROLLOUT_REWARD_MEAN, KL_REF_KL, PPO_ENTROPY)),
                    r.run_dir,
                    r.checkpoint,
                ]
            )


def plot_trials(rows: Sequence[TrialRow], space: SearchSpace, path: Path) -> Path:
    """``trials.png``: the objective and the training reward vs iteration, one line per trial; a trial the RL
    stoppers or the scheduler ended is marked with an x at its last point, the best trial drawn thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    best = best_row(rows, space.mode)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, idx, title in ((axes[0][0], 1, space.metric), (axes[0][1], 2, ROLLOUT_REWARD_MEAN)):
        for r in rows:
            pts = [(h[0], h[idx]) for h in r.history if not math.isnan(h[idx])]
            if not pts:
                continue
            xs, ys = zip(*pts)
            is_best = best is not None and r.trial_id == best.trial_id
            label = f"{r.trial_id} ({r.stop_reason})" + (" best" if is_best else "")
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, linewidth=2.4 if is_best else 1.2, label=label)
            if r.stop_reason not in ("completed", "not started"):
                ax.plot(xs[-1], ys[-1], marker="x", markersize=9, color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][1].legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle(f"{len(rows)} trials — {Path(space.path).name} (x = stopped early)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _best_checkpoint(grid: ResultGrid, row: TrialRow, space: SearchSpace) -> str:
    """The best trial's best reported checkpoint (Tune's persisted copy); else its run's best; "" if none."""
    for result in grid:
        if Path(result.path).name == f"trial_{row.trial_id}":
            try:
                ckpt = result.get_best_checkpoint(space.metric, space.mode) or result.checkpoint
            except RuntimeError:  # no checkpoint reported
                ckpt = result.checkpoint
            if ckpt is not None and Path(ckpt.path).is_dir():
                return str(Path(ckpt.path).resolve())
    try:
        from rlchat.core.checkpoint import find_best_checkpoint

        return str(find_best_checkpoint(row.run_dir).resolve())
    except CheckpointError:
        return ""


def write_outputs(
    grid: ResultGrid, space: SearchSpace, base: Config, sweep_dir: Path, scheduler: str
) -> TrialRow | None:
    """Table (printed), results.csv, trials.png, best_config.yaml, best_checkpoint.txt; returns the best row."""
    rows = collect_rows(grid, space, base, sweep_dir, scheduler)
    best = best_row(rows, space.mode)
    if best is not None:
        best.checkpoint = _best_checkpoint(grid, best, space)
        params = {k: v for k, v in _native(best.params).items() if v is not None}
        save_config(base.replace(**params), sweep_dir / BEST_CONFIG_FILE)
        if best.checkpoint:
            (sweep_dir / BEST_CHECKPOINT_FILE).write_text(best.checkpoint + "\n", encoding="utf-8")
    write_csv(rows, space, sweep_dir / RESULTS_CSV)
    plot_trials(rows, space, sweep_dir / PLOT_FILE)
    print()
    print(format_table(rows, space, best))
    stopped = [r for r in rows if r.stop_reason in FIXES]
    for r in stopped:
        print(f"  {r.trial_id}: {r.stop_detail}")
    for reason in sorted({r.stop_reason for r in stopped}):
        print(f"  fix for {reason}: {FIXES[reason]}")
    print(f"\nresults: {sweep_dir / RESULTS_CSV}\nplot:    {sweep_dir / PLOT_FILE}")
    if best is None:
        print(f"no trial reported {space.metric}; see the errors above and {sweep_dir / TUNER_DIR}")
    else:
        print(f"best:    trial {best.trial_id}  {space.metric}={_fmt(best.best)}  {_fmt_params(best.params)}")
        print(f"config:  {sweep_dir / BEST_CONFIG_FILE}")
        print(f"checkpoint: {best.checkpoint or '(none reported; set checkpoint.every)'}")
    return best


def _fmt_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def _connects_to_cluster(address: str | None, base: Config) -> bool:
    """Whether the sweep joins an existing cluster (as rlchat.distributed.cluster.init_ray resolves it) rather than starting
    a local Ray instance that ends with this process."""
    target = address or base.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    return target != "local"


def deploy_best(checkpoint: str, address: str | None, blocking: bool) -> int:
    """Serve ``checkpoint`` with the Serve app (``serve.app:serve_command``; it prints the URL)."""
    from serve.app import serve_command  # lazily: Serve's imports cost seconds and only --deploy needs them

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

    With ``deploy``, the best checkpoint is served through :func:`serve.app.serve_command` when the sweep ends:
    blocking (until Ctrl-C) when this call started a local Ray instance, which would end with the process;
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


if __name__ == "__main__":  # pragma: no cover
    from rlchat.cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
