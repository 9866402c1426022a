"""RL-aware Ray Tune stoppers: end trials that show KL blow-up, entropy collapse, reward hacking or gold drop.

A PPO trial can look fine on its objective while going wrong in ways every RLHF practitioner watches for:

- **KL blow-up**: ``kl/ref_kl`` (KL to the frozen reference, rlchat/ppo.py ``KL_REF``) climbs past a bound -- the
  policy has left the region where the reward is trustworthy (or the step size is too large). A non-finite KL
  stops the trial at once.
- **Entropy collapse**: ``ppo/entropy`` (``ENTROPY``) falls below a floor -- the policy has become (nearly)
  deterministic and stops exploring; PPO rarely recovers.
- **Reward hacking**: the training reward (``rollout/reward_mean``) rises while a held-out check
  (``eval/reward/<component>``, e.g. ``reference_f1`` or ``model``, the reward-model score) falls. Trends are the
  least-squares change over the last ``hacking_window`` held-out evaluations, and the training reward of an
  evaluation point is the mean over the iterations since the previous one, so single noisy batches do not trip it.
- **Gold drop** (reward-model over-optimisation, Gao et al. 2022): over the last ``gold_window`` held-out
  evaluations, the gold reward (``eval/gold_reward``: the task's checked answer, logged even when the training reward
  is the reward model alone) fell more than ``max_gold_drop`` below its best while the proxy (``eval/proxy_reward``:
  the training reward on the same held-out prompts) rose. The same rule as the trainer's ``ppo.max_gold_drop``
  guardrail (:func:`rlchat.core.metrics.gold_drop`).

Each stop is recorded with its reason: :attr:`RLStopper.stops` (trial id -> record) and, when ``record_path`` is
set, ``stops.json`` in the sweep directory (rewritten atomically on every stop), which the results table reads.

The stopper runs in the Tune driver (Tune calls it with every reported result). It reads the keys the trainable
reports; :data:`EVAL_ITERATION` tells it when a held-out evaluation is fresh rather than carried forward.

Usage::

    from ray import tune as ray_tune
    stopper = RLStopper(max_ref_kl=1.0, min_entropy=0.1, hacking_component="reference_f1",
                        record_path="runs/tune-x/stops.json")
    ray_tune.Tuner(trainable, run_config=ray_tune.RunConfig(stop=stopper), ...)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune as ray_tune

from rlchat.core.errors import ConfigError
from rlchat.core.files import atomic_write_json
from rlchat.core.metrics import (
    EVAL_GOLD_REWARD,
    EVAL_PROXY_REWARD,
    EVAL_REWARD_PREFIX,
    KL_REF_KL,
    PPO_ENTROPY,
    ROLLOUT_REWARD_MEAN,
    gold_drop,
)

logger = logging.getLogger(__name__)

ITERATION = "tune/iteration"
"""The PPO iteration of a reported result (the trainable adds it)."""
EVAL_ITERATION = "tune/eval_iteration"
"""The PPO iteration of the newest held-out evaluation in a result (0 = none yet). Eval metrics are carried
forward between evaluations so schedulers always see the objective; this key says which values are fresh."""
STOPS_FILE = "stops.json"

REASON_REF_KL = "ref_kl"
REASON_ENTROPY = "entropy"
REASON_HACKING = "reward_hacking"
REASON_GOLD_DROP = "gold_drop"
REASONS = (REASON_REF_KL, REASON_ENTROPY, REASON_HACKING, REASON_GOLD_DROP)

FIXES = {
    REASON_REF_KL: "lower ppo.learning_rate, raise ppo.kl_coef or enable ppo.adaptive_kl",
    REASON_ENTROPY: "raise ppo.ent_coef or rollout.temperature, or lower ppo.learning_rate",
    REASON_HACKING: "raise ppo.kl_coef, add the held-out component to the reward, or fix the exploited reward",
    REASON_GOLD_DROP: "raise ppo.kl_coef or lower ppo.iterations (stop at gold's peak), or improve the reward model",
}
"""What to change in the search space when many trials stop for a reason (printed with the results)."""


def fitted_change(xs: list[float], ys: list[float]) -> float:
    """The change of ``ys`` over the span of ``xs`` along the least-squares line (0 for fewer than 2 points).

    A trend that ignores single outliers better than ``ys[-1] - ys[0]`` does, and that is comparable between the
    training reward and a held-out score measured at the same points.
    """
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope * (xs[-1] - xs[0])


def _lookup(result: Mapping[str, Any], key: str) -> float | None:
    """``result[key]`` as a float; also finds ``a/b`` stored nested as ``{"a": {"b": ...}}``. None when absent."""
    value: Any = result.get(key)
    if value is None and "/" in key:
        node: Any = result
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        value = node
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass
class _TrialState:
    """What the stopper remembers about one trial."""

    over_kl: int = 0  # consecutive iterations above max_ref_kl
    under_entropy: int = 0  # consecutive iterations below min_entropy
    train_since_eval: list[float] = field(default_factory=list)  # training rewards since the last eval point
    eval_points: list[tuple[float, float, float]] = field(default_factory=list)  # (iteration, train, held-out)
    last_eval_iteration: float = 0.0
    gold_points: list[tuple[float, float]] = field(default_factory=list)  # (proxy, gold) per held-out evaluation
    last_gold_iteration: float = 0.0
    warned_missing: bool = False
    warned_missing_gold: bool = False
    stopped: bool = False


class RLStopper(ray_tune.Stopper):
    """End a trial on ref-KL blow-up, entropy collapse, reward hacking or gold drop; record why.

    Args:
        max_ref_kl: stop when ``kl/ref_kl`` exceeds this for ``patience`` consecutive iterations (0 = off).
        min_entropy: stop when ``ppo/entropy`` is below this for ``patience`` consecutive iterations (0 = off).
        hacking_component: held-out reward component compared with the training reward: a name
            (``reference_f1`` -> ``eval/reward/reference_f1``) or a full metric key; "" = off. The component must
            be enabled (weight != 0) for the trainer to evaluate it.
        hacking_window: held-out evaluations in the trend window (>= 2).
        hacking_min_delta: the training reward must rise by more than this, and the held-out score fall by more
            than this, over the window (in reward units) -- noise below it never trips the check.
        max_gold_drop: stop when ``eval/gold_reward`` is more than this below its best of the last ``gold_window``
            held-out evaluations while ``eval/proxy_reward`` rose since that best (0 = off).
        gold_window: held-out evaluations the gold-drop check looks back over (>= 2).
        patience: consecutive bad iterations before a KL / entropy stop (>= 1).
        grace_iterations: no stop at or before this PPO iteration (the first batches are noisy).
        record_path: where to write the stop records as JSON (None = keep them in memory only).

    Raises:
        ConfigError: a setting out of range (the message names it and the fix).
    """

    def __init__(
        self,
        max_ref_kl: float = 0.0,
        min_entropy: float = 0.0,
        hacking_component: str = "",
        hacking_window: int = 3,
        hacking_min_delta: float = 0.01,
        max_gold_drop: float = 0.0,
        gold_window: int = 3,
        patience: int = 1,
        grace_iterations: int = 0,
        record_path: str | os.PathLike[str] | None = None,
    ) -> None:
        checks = [
            (max_ref_kl >= 0, "max_ref_kl", max_ref_kl, ">= 0 (0 = off)"),
            (min_entropy >= 0, "min_entropy", min_entropy, ">= 0 (0 = off)"),
            (hacking_window >= 2, "hacking_window", hacking_window, "at least 2 held-out evaluations"),
            (hacking_min_delta >= 0, "hacking_min_delta", hacking_min_delta, ">= 0"),
            (max_gold_drop >= 0, "max_gold_drop", max_gold_drop, ">= 0 (0 = off)"),
            (gold_window >= 2, "gold_window", gold_window, "at least 2 held-out evaluations"),
            (patience >= 1, "patience", patience, "at least 1"),
            (grace_iterations >= 0, "grace_iterations", grace_iterations, ">= 0"),
        ]
        for ok, name, value, expected in checks:
            if not ok:
                raise ConfigError(f"stop.{name}={value!r}: expected {expected}; fix the `stop:` section of the space")
        self.max_ref_kl = float(max_ref_kl)
        self.min_entropy = float(min_entropy)
        self.hacking_key = (
            ""
            if not hacking_component
            else hacking_component
            if "/" in hacking_component
            else EVAL_REWARD_PREFIX + hacking_component
        )
        self.hacking_window = int(hacking_window)
        self.hacking_min_delta = float(hacking_min_delta)
        self.max_gold_drop = float(max_gold_drop)
        self.gold_window = int(gold_window)
        self.patience = int(patience)
        self.grace_iterations = int(grace_iterations)
        self.record_path = str(record_path) if record_path is not None else None
        self.stops: dict[str, dict[str, Any]] = read_stops(self.record_path) if self.record_path else {}
        self._trials: dict[str, _TrialState] = {}

    @property
    def active(self) -> bool:
        """Whether any check is on."""
        return bool(self.max_ref_kl or self.min_entropy or self.hacking_key or self.max_gold_drop)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Tune's hook: True ends the trial. Also records the reason (see :meth:`check`)."""
        record = self.check(trial_id, result)
        if record is None:
            return False
        self.stops[trial_id] = record
        if self.record_path:
            write_stops(self.record_path, self.stops)
        logger.warning(
            "stopping trial %s at iteration %s: %s (fix: %s)",
            trial_id,
            record["iteration"],
            record["detail"],
            FIXES[record["reason"]],
        )
        return True

    def stop_all(self) -> bool:
        """Never ends the whole sweep: one sick trial says nothing about the others."""
        return False

    def check(self, trial_id: str, result: Mapping[str, Any]) -> dict[str, Any] | None:
        """Update the trial's history with one result and return a stop record, or None to continue.

        Returns:
            ``{"trial_id", "iteration", "reason" (one of REASONS), "detail" (readable), "values" (numbers),
            "time"}`` for the first result that trips a check; None otherwise (and for every later result of a
            trial already stopped).
        """
        state = self._trials.setdefault(trial_id, _TrialState())
        if state.stopped:
            return None
        iteration = _lookup(result, ITERATION) or _lookup(result, "training_iteration") or 0.0
        found = self._check_kl(state, result) or self._check_entropy(state, result)
        hacking = self._check_hacking(trial_id, state, result, iteration)  # always updates the history
        gold = self._check_gold_drop(trial_id, state, result, iteration)  # likewise
        found = found or hacking or gold
        if found is None or iteration <= self.grace_iterations:
            return None
        reason, detail, values = found
        state.stopped = True
        return {
            "trial_id": trial_id,
            "iteration": int(iteration),
            "reason": reason,
            "detail": detail,
            "values": values,
            "time": time.time(),
        }

    # ------------------------------------------------------------------------------------------------ checks
    def _check_kl(self, state: _TrialState, result: Mapping[str, Any]) -> tuple[str, str, dict[str, float]] | None:
        if not self.max_ref_kl:
            return None
        kl = _lookup(result, KL_REF_KL)
        if kl is None:
            return None
        if not math.isfinite(kl):
            return REASON_REF_KL, f"{KL_REF_KL} is {kl} (not finite)", {KL_REF_KL: kl}
        state.over_kl = state.over_kl + 1 if kl > self.max_ref_kl else 0
        if state.over_kl >= self.patience:
            more = f" for {state.over_kl} iterations" if self.patience > 1 else ""
            return REASON_REF_KL, f"{KL_REF_KL}={kl:.4g} > max_ref_kl={self.max_ref_kl:g}{more}", {KL_REF_KL: kl}
        return None

    def _check_entropy(
        self, state: _TrialState, result: Mapping[str, Any]
    ) -> tuple[str, str, dict[str, float]] | None:
        if not self.min_entropy:
            return None
        ent = _lookup(result, PPO_ENTROPY)
        if ent is None:
            return None
        state.under_entropy = state.under_entropy + 1 if not ent >= self.min_entropy else 0  # NaN counts as low
        if state.under_entropy >= self.patience:
            more = f" for {state.under_entropy} iterations" if self.patience > 1 else ""
            return (
                REASON_ENTROPY,
                f"{PPO_ENTROPY}={ent:.4g} < min_entropy={self.min_entropy:g}{more}",
                {PPO_ENTROPY: ent},
            )
        return None

    def _check_hacking(
        self, trial_id: str, state: _TrialState, result: Mapping[str, Any], iteration: float
    ) -> tuple[str, str, dict[str, float]] | None:
        if not self.hacking_key:
            return None
        train = _lookup(result, ROLLOUT_REWARD_MEAN)
        if train is not None and math.isfinite(train):
            state.train_since_eval.append(train)
        eval_it = _lookup(result, EVAL_ITERATION)
        held_out = _lookup(result, self.hacking_key)
        fresh = eval_it is not None and eval_it > state.last_eval_iteration and eval_it == iteration
        if eval_it is None and held_out is not None:
            fresh = True  # a result without the freshness key (not from tune.sweep): every value counts
        if not fresh:
            return None
        state.last_eval_iteration = eval_it or iteration
        if held_out is None:
            if not state.warned_missing:
                state.warned_missing = True
                logger.warning(
                    "trial %s: reward-hacking check is on but its result has no %s; enable that reward component "
                    "(a weight != 0) or set stop.hacking_component to a reported eval/reward/<component>",
                    trial_id,
                    self.hacking_key,
                )
            return None
        if not state.train_since_eval or not math.isfinite(held_out):
            return None
        train_mean = sum(state.train_since_eval) / len(state.train_since_eval)
        state.train_since_eval = []
        state.eval_points.append((iteration, train_mean, held_out))
        window = state.eval_points[-self.hacking_window :]
        if len(window) < self.hacking_window:
            return None
        xs = [p[0] for p in window]
        d_train = fitted_change(xs, [p[1] for p in window])
        d_eval = fitted_change(xs, [p[2] for p in window])
        if d_train > self.hacking_min_delta and d_eval < -self.hacking_min_delta:
            detail = (
                f"{ROLLOUT_REWARD_MEAN} rose by {d_train:+.4g} while {self.hacking_key} fell by {d_eval:+.4g} "
                f"over iterations {int(xs[0])}-{int(xs[-1])} ({len(window)} held-out evaluations)"
            )
            values = {ROLLOUT_REWARD_MEAN + "_change": d_train, self.hacking_key + "_change": d_eval}
            return REASON_HACKING, detail, values
        return None

    def _check_gold_drop(
        self, trial_id: str, state: _TrialState, result: Mapping[str, Any], iteration: float
    ) -> tuple[str, str, dict[str, float]] | None:
        if not self.max_gold_drop:
            return None
        eval_it = _lookup(result, EVAL_ITERATION)
        proxy, gold = _lookup(result, EVAL_PROXY_REWARD), _lookup(result, EVAL_GOLD_REWARD)
        # a fresh evaluation: this iteration's (tune.sweep carries eval metrics forward), or any value at all from a
        # result without the freshness key
        fresh = eval_it is None or (eval_it > state.last_gold_iteration and eval_it == iteration)
        if not fresh or proxy is None:
            return None
        state.last_gold_iteration = eval_it or iteration
        if gold is None:
            if not state.warned_missing_gold:
                state.warned_missing_gold = True
                logger.warning(
                    "trial %s: the gold-drop check is on but its result has no %s; keep 'verifiable' in "
                    "reward.monitor and use prompts with reference answers",
                    trial_id,
                    EVAL_GOLD_REWARD,
                )
            return None
        if not (math.isfinite(proxy) and math.isfinite(gold)):
            return None
        state.gold_points.append((proxy, gold))
        state.gold_points = state.gold_points[-self.gold_window :]
        drop, proxy_rise = gold_drop(state.gold_points, self.gold_window)
        if drop > self.max_gold_drop and proxy_rise > 0:
            detail = (
                f"{EVAL_GOLD_REWARD} fell {drop:.4g} below its best of the last {len(state.gold_points)} held-out "
                f"evaluations (> max_gold_drop={self.max_gold_drop:g}) while {EVAL_PROXY_REWARD} rose by "
                f"{proxy_rise:+.4g}"
            )
            values = {EVAL_GOLD_REWARD + "_drop": drop, EVAL_PROXY_REWARD + "_change": proxy_rise}
            return REASON_GOLD_DROP, detail, values
        return None


# ---------------------------------------------------------------------------------------------------- records


def read_stops(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The stop records of a sweep (``stops.json``): trial id -> record; {} when there is none yet."""
    p = Path(path)
    if p.is_dir():
        p = p / STOPS_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("%s: unreadable stop records (%s); starting a new file", p, e)
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def write_stops(path: str | os.PathLike[str], stops: Mapping[str, Mapping[str, Any]]) -> None:
    """Write the stop records atomically (a killed driver never leaves half a file); merges with what is there,
    so a resumed sweep keeps the stops recorded before the kill."""
    p = Path(path)
    merged = {**read_stops(p), **{k: dict(v) for k, v in stops.items()}}
    atomic_write_json(p, merged, indent=2, sort_keys=True, default=float)
