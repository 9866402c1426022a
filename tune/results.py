"""The results of a sweep: one row per trial, the printed table, ``results.csv``, ``trials.png`` and the best
trial's ``best_config.yaml`` / ``best_checkpoint.txt`` (what ``rlchat train`` and ``rlchat serve`` take next)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlchat.core.config import Config, save_config
from rlchat.core.errors import CheckpointError
from rlchat.core.metrics import GUARD_TRIPPED, KL_REF_KL, PPO_ENTROPY, ROLLOUT_REWARD_MEAN
from tune.space import SearchSpace
from tune.stoppers import EVAL_ITERATION, FIXES, ITERATION, STOPS_FILE, read_stops

if TYPE_CHECKING:
    from ray.tune import ResultGrid

logger = logging.getLogger(__name__)


TUNER_DIR = "tuner"


TRIALS_DIR = "trials"


def _native(config: Mapping[str, Any]) -> dict[str, Any]:
    """Sampled values as plain Python (Tune may hand out numpy scalars, which the config's coercion rejects)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        out[k] = v.item() if hasattr(v, "item") and not isinstance(v, (list, tuple, dict)) else v
    return out


RESULTS_CSV = "results.csv"


PLOT_FILE = "trials.png"


BEST_CONFIG_FILE = "best_config.yaml"


BEST_CHECKPOINT_FILE = "best_checkpoint.txt"


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
