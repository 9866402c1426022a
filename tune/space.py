"""The search-space language of ``rlchat tune``: a YAML file of dotted config keys to distributions, read with
line-numbered errors and checked against the config schema before any trial starts (format in docs/tune.md).

    metric: eval/reward_mean      # objective and its mode (max | min)
    mode: max
    samples: 4
    scheduler: {grace_period: 1, reduction_factor: 2}
    stop: {max_ref_kl: 1.0, min_entropy: 0.05}
    fixed: {rollout.num_workers: 0}
    ppo.learning_rate: {loguniform: [1.0e-4, 1.0e-3]}
    ppo.clip_coef: {choice: [0.1, 0.2, 0.3]}
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlchat.core.config import Config
from rlchat.core.errors import ConfigError
from rlchat.core.files import load_yaml_mapping, yaml_key_lines
from rlchat.core.metrics import EVAL_REWARD_MEAN
from tune.stoppers import RLStopper

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
    data, text = load_yaml_mapping(
        p, "search-space file", "dotted config keys to distributions", "tune/spaces/demo.yaml"
    )
    lines = yaml_key_lines(text)

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
