"""Run directories, metric keys, metric logging (JSONL, TensorBoard, MLflow), the live progress line and plots.

Only the driver writes metrics: Ray workers return plain dicts and the driver passes them to
:class:`MetricsWriter`. A run directory (see docs/checkpoints.md)::

    runs/sft-20250101-120000/
      config.yaml        the resolved config (write_run_config)
      metrics.jsonl      one JSON object per logged step: {"step": 12, "time": 1712.3, "sft/loss": 2.31, ...}
      tensorboard/       TensorBoard event files (tensorboard --logdir runs/)
      checkpoints/       step_XXXXXX/ checkpoints + index.json (rlchat/checkpoint.py)
      logs/              text logs of the driver and workers
      plots/             PNG curves written by `rlchat plot RUN_DIR`

Metric keys are slash-namespaced constants defined here, so producers (stages, learner, rollout workers,
evaluation) and consumers (progress line, plots, best-checkpoint choice, Tune stoppers) cannot drift apart.

Usage::

    run_dir = make_run_dir(None, "sft")          # runs/sft-20250101-120000
    write_run_config(run_dir, cfg)
    with MetricsWriter(run_dir, cfg) as writer:
        writer.log(step, {SFT_LOSS: 2.3, PERF_TOKENS_PER_S: 1.2e4})
    plot_run(run_dir)                            # runs/.../plots/*.png
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlchat.core import ppo as _ppo
from rlchat.core.errors import RLChatError
from rlchat.core.files import JOB_SCRATCH_NOTE, atomic_write_text, in_job_working_dir

if TYPE_CHECKING:
    from rlchat.core.config import Config

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Metric keys (one place; use these constants, not string literals)
# --------------------------------------------------------------------------------------------------------------

# SFT
SFT_LOSS = "sft/loss"
SFT_VAL_LOSS = "sft/val_loss"
SFT_VAL_PERPLEXITY = "sft/val_perplexity"
SFT_VAL_ACCURACY = "sft/val_accuracy"
SFT_LR = "sft/lr"
SFT_GRAD_NORM = "sft/grad_norm"
SFT_EPOCH = "sft/epoch"
# reward model
RM_LOSS = "rm/loss"
RM_ACCURACY = "rm/accuracy"
RM_VAL_LOSS = "rm/val_loss"
RM_VAL_ACCURACY = "rm/val_accuracy"
RM_VAL_ACCURACY_PREFERENCES = "rm/val_accuracy_preferences"
"""Held-out pairwise accuracy on ``data.preferences`` alone (logged when ``rm.feedback`` / policy pairs add more)."""
RM_MARGIN = "rm/margin"
RM_VAL_MARGIN = "rm/val_margin"
RM_VAL_ECE = "rm/val_ece"
RM_LR = "rm/lr"
RM_GRAD_NORM = "rm/grad_norm"
RM_EPOCH = "rm/epoch"
# PPO rollouts
ROLLOUT_REWARD_MEAN = "rollout/reward_mean"
ROLLOUT_REWARD_STD = "rollout/reward_std"
ROLLOUT_REWARD_PREFIX = "rollout/reward/"
"""Per-component rollout rewards: ``rollout/reward/<component>`` (e.g. rollout/reward/verifiable)."""
ROLLOUT_RESPONSE_LEN = "rollout/response_len"
ROLLOUT_TRUNCATED_FRAC = "rollout/truncated_frac"
ROLLOUT_CONTEXT_LEN = "rollout/context_len"
ROLLOUT_WEIGHTS_STALENESS = "rollout/weights_staleness"
ROLLOUT_REPETITION = "rollout/repetition"
ROLLOUT_EPISODES = "rollout/episodes"
"""Episodes in the iteration's batch (all workers): a killed-and-retried worker must not change it."""
ROLLOUT_WORKER_RESTARTS = "rollout/worker_restarts"
"""Rollout worker processes that were restarted (after a crash) and sampled again in this iteration; only logged
when the rollouts come from Ray actors (``rollout.num_workers > 0``: in-process sampling cannot restart)."""
GUARD_TRIPPED = "guard/tripped"
GUARD_ROLLBACKS = "guard/rollbacks"
# PPO update (cleanrl names; the keys are defined where they are computed, in rlchat/ppo.py)
PPO_POLICY_LOSS = _ppo.POLICY_LOSS
PPO_VALUE_LOSS = _ppo.VALUE_LOSS
PPO_ENTROPY = _ppo.ENTROPY
PPO_APPROX_KL = _ppo.APPROX_KL
PPO_CLIPFRAC = _ppo.CLIPFRAC
PPO_EXPLAINED_VARIANCE = _ppo.EXPLAINED_VARIANCE
PPO_LR = "ppo/lr"
PPO_GRAD_NORM = "ppo/grad_norm"
PPO_EPOCHS_RUN = "ppo/epochs_run"
PPO_EARLY_STOPPED = "ppo/early_stopped"
PPO_BEHAVIOUR_LOGPROB_MAXDIFF = "ppo/behaviour_logprob_maxdiff"
# KL to the frozen reference
KL_REF_KL = _ppo.KL_REF
KL_COEF = _ppo.KL_COEF
# performance / timing
PERF_TOKENS_PER_S = "perf/tokens_per_s"
PERF_STEP_S = "perf/step_s"
PERF_SAMPLE_S = "perf/sample_s"
PERF_ITER_S = "perf/iter_s"
PERF_UPDATE_S = "perf/update_s"
PERF_SYNC_S = "perf/sync_s"
PERF_MFU = "perf/mfu"
# held-out evaluation
EVAL_REWARD_MEAN = "eval/reward_mean"
EVAL_REWARD_PREFIX = "eval/reward/"
"""Per-component evaluation rewards: ``eval/reward/<component>``."""
EVAL_PROXY_REWARD = "eval/proxy_reward"
"""Held-out greedy reward under the *training* reward (the proxy; equals eval/reward_mean), beside the gold one."""
EVAL_GOLD_REWARD = "eval/gold_reward"
"""Held-out gold reward: the task's checked answer (``eval/reward/verifiable``, rlchat/rewards.py ``GOLD_COMPONENT``),
logged whether or not it is part of the training reward (``reward.monitor``)."""
GUARD_GOLD_DROP = "guard/gold_drop"
"""At each evaluation: best gold reward of the last ``ppo.gold_window`` evaluations minus the newest one."""
EVAL_PERPLEXITY = "eval/perplexity"
EVAL_ACCURACY = "eval/accuracy"
EVAL_RESPONSE_LEN = "eval/response_len"
EVAL_DISTINCT_1 = "eval/distinct_1"
EVAL_DISTINCT_2 = "eval/distinct_2"
EVAL_SAFETY_HIT_RATE = "eval/safety_hit_rate"
EVAL_WIN_RATE = "eval/win_rate"

STAGE_BEST_METRIC: dict[str, tuple[str, str]] = {
    "sft": (SFT_VAL_LOSS, "min"),
    "rm": (RM_VAL_ACCURACY, "max"),
    "ppo": (EVAL_REWARD_MEAN, "max"),
}
"""(metric, mode) that picks a stage's best checkpoint when ``checkpoint.best_metric`` is empty."""

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RUN_SUBDIRS = ("checkpoints", "logs", "plots")
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "time")

# --------------------------------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------------------------------


def make_run_dir(run_dir: str | Path | None, stage: str, root: str | Path = "runs") -> Path:
    """Create (or reuse) a run directory with ``checkpoints/``, ``logs/`` and ``plots/``.

    Args:
        run_dir: the directory to use (created if missing, reused as is for ``--resume``); None for a new
            ``<root>/<stage>-YYYYmmdd-HHMMSS`` (``-1``, ``-2``... appended when two runs start in one second).
        stage: "sft", "rm", "train", "tune", ... (prefix of the default name).
        root: parent of default run directories.

    Returns:
        The run directory, absolute (Ray workers run in other working directories; see
        :func:`rlchat.core.config.resolve_path`). ``config.yaml`` is written by :func:`write_run_config`.
    """
    if run_dir is not None:
        path = Path(run_dir).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise RLChatError(f"--run-dir {path}: is a file; expected a directory (it is created if missing)")
        path.mkdir(parents=True, exist_ok=True)
    else:
        base = Path(root).expanduser().resolve() / f"{stage}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        base.parent.mkdir(parents=True, exist_ok=True)
        path, n = base, 0
        while True:
            try:
                path.mkdir()  # exist_ok=False: two runs started in the same second never share a directory
                break
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}-{n}")
    for sub in RUN_SUBDIRS:
        (path / sub).mkdir(exist_ok=True)
    if in_job_working_dir(path):  # on the terminal (the job's log), not only in the logs of a doomed directory
        from rlchat.core.console import console

        print(f"warning: run directory {path} {JOB_SCRATCH_NOTE}", file=console(), flush=True)
    from rlchat.core.console import attach_run_dir

    attach_run_dir(path)
    return path


def write_run_config(run_dir: str | Path, cfg: Config) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically) and return its path."""
    from rlchat.core.config import to_yaml

    path = Path(run_dir) / CONFIG_FILE
    return atomic_write_text(path, to_yaml(cfg))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def attach_log_file(run_dir: str | Path, stage: str) -> logging.Handler:
    """Send the ``rlchat`` loggers' records to ``run_dir/logs/<stage>.log`` (appended to, e.g. on ``--resume``).

    The handler passes INFO and above, so what reaches the file is whatever the configured level (``--log-level``)
    lets through the ``rlchat`` logger; the PPO driver also writes its own progress lines to it directly. Undo with
    :func:`detach_log_file`.

    Returns:
        The attached ``logging.FileHandler``.
    """
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / f"{stage}.log", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger("rlchat").addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    """Remove a handler added by :func:`attach_log_file` and close its file."""
    logging.getLogger("rlchat").removeHandler(handler)
    handler.close()


# --------------------------------------------------------------------------------------------------------------
# Writing metrics
# --------------------------------------------------------------------------------------------------------------


def _as_float(key: str, value: Any) -> float | str | None:
    """A metric value as float (numbers, numpy/torch scalars), str kept as is, None kept."""
    if value is None or isinstance(value, str):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}={value!r}: expected a number (or a string)") from None


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and mirrors numbers to TensorBoard and, when configured, MLflow.

    Only the driver creates one. Each :meth:`log` is one flushed JSON line, so a crash loses at most the line
    being written (:func:`read_metrics` skips a torn last line).

    Args:
        run_dir: the run directory.
        config: when given, recorded in TensorBoard (text) and MLflow (params).
        tensorboard: write TensorBoard event files to ``run_dir/tensorboard``.
        mlflow_uri: MLflow tracking URI (e.g. ``file:///tmp/mlruns`` or ``http://host:5000``); None falls back to
            the ``MLFLOW_TRACKING_URI`` environment variable; "" turns MLflow off. mlflow is optional and imported
            only when used.

    Raises:
        RLChatError: MLflow requested but the ``mlflow`` package is not installed.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: Config | None = None,
        tensorboard: bool = True,
        mlflow_uri: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = self.path.open("a", encoding="utf-8")
        self._t0 = time.time()
        self._tb: Any = None
        self._mlflow: Any = None
        self._mlflow_run_id: str | None = None
        self._warned_nonfinite: set[str] = set()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
            if config is not None:
                from rlchat.core.config import to_yaml

                self._tb.add_text("config", "```\n" + to_yaml(config) + "\n```", 0)
        uri = os.environ.get("MLFLOW_TRACKING_URI", "") if mlflow_uri is None else mlflow_uri
        if uri:
            self._start_mlflow(uri, config)

    def _start_mlflow(self, uri: str, config: Config | None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise RLChatError(
                f"MLflow tracking URI {uri!r} is set (mlflow_uri or MLFLOW_TRACKING_URI) but the mlflow package is "
                "not installed; pip install mlflow (or mlflow-skinny), or unset MLFLOW_TRACKING_URI"
            ) from None
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its local file store unless opted in; a local store is what a laptop run wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A client, not mlflow.start_run(): no process-global active run that another library could pick up.
        client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlchat")
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=self.run_dir.name, tags={"rlchat.run_dir": str(self.run_dir)})
        self._mlflow, self._mlflow_run_id = client, run.info.run_id
        if config is not None:
            from mlflow.entities import Param

            params = [Param(k, str(v)[:500]) for k, v in sorted(config.flat().items())]
            for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
                client.log_batch(self._mlflow_run_id, params=params[i : i + 100])

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one step's metrics.

        Args:
            step: the optimizer step / PPO iteration (x axis everywhere).
            metrics: slash-namespaced key -> number. Non-finite values are written as null in JSON and skipped in
                TensorBoard and MLflow (logged once per key as a warning). Strings are kept in JSON only.
        """
        clean: dict[str, float | str | None] = {}
        for key, value in metrics.items():
            if key in _RESERVED:
                raise ValueError(f"metric key {key!r} is reserved by metrics.jsonl; rename it (e.g. 'perf/{key}')")
            clean[key] = _as_float(key, value)
        now = time.time()
        record: dict[str, Any] = {"step": int(step), "time": round(now - self._t0, 3)}
        finite: dict[str, float] = {}
        for key, v in clean.items():
            if isinstance(v, float) and not math.isfinite(v):
                if key not in self._warned_nonfinite:
                    self._warned_nonfinite.add(key)
                    logger.warning("metric %s is %s at step %d (written as null)", key, v, step)
                record[key] = None
            else:
                record[key] = v
                if isinstance(v, float):
                    finite[key] = v
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, v in finite.items():
                self._tb.add_scalar(key, v, int(step), walltime=now)
        if self._mlflow is not None and finite:
            from mlflow.entities import Metric

            ms = int(now * 1000)
            batch = [Metric(k, v, ms, int(step)) for k, v in finite.items()]
            for i in range(0, len(batch), 1000):
                self._mlflow.log_batch(self._mlflow_run_id, metrics=batch[i : i + 1000])

    def rewind(self, step: int) -> int:
        """Drop logged lines with a step above ``step`` (a resumed run re-logs them); returns how many.

        Call it right after resuming from a checkpoint of ``step`` so metrics.jsonl holds one history, not a
        fork. TensorBoard and MLflow keep their points (they overwrite per step on display).
        """
        self._file.flush()
        records = read_metrics(self.run_dir) if self.path.stat().st_size else []
        keep = [r for r in records if int(r.get("step", 0)) <= step]
        self._file.close()
        atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))
        self._file = self.path.open("a", encoding="utf-8")
        return len(records) - len(keep)

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._mlflow.set_terminated(self._mlflow_run_id)
            self._mlflow = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _metrics_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    return p if p.is_file() else p / METRICS_FILE


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` (or of a metrics file path), in logged order.

    A torn last line (crash while writing) is skipped with a warning; a corrupt line elsewhere raises.

    Raises:
        RLChatError: no metrics.jsonl, or a corrupt line in the middle (named by file:line).
    """
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise RLChatError(
            f"{path}: no metrics file; expected a run directory written by rlchat sft/rm/train (it holds "
            f"{METRICS_FILE})"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if i == len(lines):
                logger.warning("%s:%d: skipping a torn last line (the run was probably killed mid-write)", path, i)
                continue
            raise RLChatError(f"{path}:{i}: corrupt metrics line ({e}); delete or fix that line") from None
        records.append(rec)
    return records


# --------------------------------------------------------------------------------------------------------------
# The live progress line
# --------------------------------------------------------------------------------------------------------------

_PROGRESS_FIELDS: tuple[tuple[str, str, str], ...] = (
    (ROLLOUT_REWARD_MEAN, "reward", "{:.3f}"),
    (EVAL_REWARD_MEAN, "eval", "{:.3f}"),
    (KL_REF_KL, "KL", "{:.4f}"),
    (PPO_ENTROPY, "ent", "{:.3f}"),
    (SFT_LOSS, "loss", "{:.4f}"),
    (SFT_VAL_PERPLEXITY, "val ppl", "{:.2f}"),
    (SFT_VAL_ACCURACY, "val acc", "{:.3f}"),
    (RM_LOSS, "loss", "{:.4f}"),
    (RM_VAL_ACCURACY, "val acc", "{:.3f}"),
)


def gold_drop(points: Sequence[tuple[float, float]], window: int) -> tuple[float, float]:
    """Reward over-optimisation over the last ``window`` held-out evaluations (Gao et al. 2022).

    Args:
        points: ``(proxy, gold)`` per evaluation, oldest first (``eval/proxy_reward``, ``eval/gold_reward``).
        window: evaluations to look back over (the newest included).

    Returns:
        ``(drop, proxy_rise)``: the best gold of the window minus the newest gold (>= 0), and the newest proxy minus
        the proxy at that best evaluation. Gold falling while the proxy rises (``drop > delta`` and
        ``proxy_rise > 0``) is the over-optimisation signature the ``gold_drop`` guardrail and stopper act on;
        ``(0.0, 0.0)`` for fewer than 2 points.
    """
    pts = list(points)[-window:] if window > 0 else []
    if len(pts) < 2:
        return 0.0, 0.0
    best = max(range(len(pts)), key=lambda i: (pts[i][1], i))  # the latest of equal bests: the smallest rise
    return pts[best][1] - pts[-1][1], pts[-1][0] - pts[best][0]


def _duration(seconds: float) -> str:
    s = int(max(0, round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_progress(step: int, total: int, metrics: dict[str, Any], elapsed_s: float, done: int | None = None) -> str:
    """One live status line: ``step 12/40 (30%) | reward 0.412 | KL 0.0310 | 1.2k tok/s | 00:42 < ETA 01:38``.

    Shows whichever of reward, KL, entropy, loss, perplexity, accuracy are present; the ETA assumes the
    remaining steps take as long as the mean step so far.

    Args:
        step: the step just finished (1-based).
        total: the run's total steps (0: unknown, no percentage or ETA).
        metrics: this step's metrics.
        elapsed_s: seconds since this process started its loop.
        done: steps run in ``elapsed_s`` -- after a resume fewer than ``step``, since the steps before the resume
            point ran in an earlier process; None means all ``step`` of them (a fresh run).
    """
    total = max(int(total), 0)
    pct = f" ({100 * step / total:.0f}%)" if total else ""
    parts = [f"step {step}/{total}{pct}" if total else f"step {step}"]
    for key, label, fmt in _PROGRESS_FIELDS:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{label} {fmt.format(v)}" if math.isfinite(v) else f"{label} {v}")
    tps = metrics.get(PERF_TOKENS_PER_S)
    if isinstance(tps, (int, float)) and math.isfinite(tps):
        parts.append(f"{tps / 1000:.1f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s")
    done = step if done is None else int(done)
    if done > 0 and total:
        eta = elapsed_s / done * max(total - step, 0)
        parts.append(f"{_duration(elapsed_s)} < ETA {_duration(eta)}")
    else:
        parts.append(f"{_duration(elapsed_s)} < ETA ?")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------

# Metric groups, in plot order: one PNG each. A key belongs to the first group whose test matches.
_GROUPS: tuple[tuple[str, str], ...] = (
    ("loss", "Loss"),
    ("perplexity", "Perplexity"),
    ("accuracy", "Accuracy"),
    ("reward", "Reward"),
    ("kl", "KL divergence"),
    ("entropy", "Entropy"),
    ("lr", "Learning rate"),
    ("throughput", "Throughput and timing"),
)


def metric_group(key: str) -> str:
    """The plot group of a metric key: loss, perplexity, accuracy, reward, kl, entropy, lr, throughput, or its
    namespace (``ppo/clipfrac`` -> ``ppo``) for anything else."""
    ns, _, name = key.rpartition("/")
    name = name.lower()
    if "loss" in name:
        return "loss"
    if "perplexity" in name or name.endswith("ppl"):
        return "perplexity"
    if "accuracy" in name or name == "win_rate":
        return "accuracy"
    if "reward" in key.lower():
        return "reward"
    if ns == "kl" or "kl" in name.split("_"):
        return "kl"
    if "entropy" in name:
        return "entropy"
    if name in ("lr", "learning_rate"):
        return "lr"
    if ns == "perf" or name.endswith(("_s", "per_s")):
        return "throughput"
    return ns.split("/")[0] or "other"


def _series(records: Iterable[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) of finite numeric values; the last value logged for a step wins."""
    by_key: dict[str, dict[int, float]] = {}
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, int):
            continue
        for key, v in rec.items():
            if key in _RESERVED or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            by_key.setdefault(key, {})[step] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_key.items()}


def _pair_key(key: str, keys: set[str]) -> str:
    """Validation series share a panel with their training series (sft/val_loss -> sft/loss)."""
    ns, _, name = key.rpartition("/")
    if name.startswith("val_"):
        train = f"{ns}/{name[4:]}" if ns else name[4:]
        if train in keys:
            return train
    return key


def _smooth(values: list[float]) -> list[float]:
    """Centered moving average (window ~5% of the series, shrinking at the ends): no lag, unlike an EMA."""
    import numpy as np

    n = len(values)
    i = np.arange(n)
    half = np.minimum(np.minimum(i, n - 1 - i), max(1, n // 40))  # symmetric window: no bias at the ends
    c = np.concatenate([[0.0], np.cumsum(values)])
    lo, hi = i - half, i + half + 1
    return list((c[hi] - c[lo]) / (hi - lo))


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write one PNG per metric group (loss, perplexity, accuracy, reward, KL, ...) to ``run_dir/plots/``, and the
    over-optimisation curve (:func:`plot_overoptimisation`, ``overoptimisation.png``) when the run logged proxy and
    gold rewards.

    Each metric gets its own panel (scales differ), except that a validation series is drawn on its training
    series' panel (``sft/val_loss`` with ``sft/loss``). Long series get a centered moving average drawn over
    the faint raw points.

    Returns:
        The written PNG paths.

    Raises:
        RLChatError: no metrics.jsonl in run_dir, or no numeric metrics in it.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    run_dir = Path(run_dir)
    series = _series(read_metrics(run_dir))
    if not series:
        raise RLChatError(f"{run_dir / METRICS_FILE}: no numeric metrics to plot yet; run a stage first")
    keys = set(series)
    panels: dict[str, dict[str, list[str]]] = {}  # group -> panel key -> series keys
    for key in sorted(keys):
        anchor = _pair_key(key, keys)
        panels.setdefault(metric_group(anchor), {}).setdefault(anchor, []).append(key)
    order = [g for g, _ in _GROUPS] + sorted(set(panels) - {g for g, _ in _GROUPS})
    titles = dict(_GROUPS)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for group in order:
        if group not in panels:
            continue
        items = sorted(panels[group].items())
        n = len(items)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows), squeeze=False)
        for ax, (anchor, members) in zip(axes.flat, items):
            for key in sorted(members, key=lambda k: (k != anchor, k)):
                steps, values = series[key]
                style = {"marker": "o", "markersize": 3} if len(steps) <= 50 else {}
                if len(steps) > 50:
                    (raw,) = ax.plot(steps, values, alpha=0.3, linewidth=0.8)
                    ax.plot(steps, _smooth(values), color=raw.get_color(), linewidth=1.6, label=key)
                else:
                    ax.plot(steps, values, linewidth=1.4, label=key, **style)
            ax.set_title(anchor, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            vals = [v for k in members for v in series[k][1]]
            if group == "perplexity" and min(vals) > 0 and max(vals) / min(vals) > 10:
                ax.set_yscale("log")  # early perplexities are orders of magnitude above the final ones
                ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
            if len(members) > 1:
                ax.legend(fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.suptitle(f"{titles.get(group, group)} — {run_dir.name}", fontsize=11)
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    over = plot_overoptimisation(series, out_dir / OVEROPTIMISATION_PLOT, run_dir.name)
    if over is not None:
        written.append(over)
    return written


OVEROPTIMISATION_PLOT = "overoptimisation.png"


def plot_overoptimisation(
    series: dict[str, tuple[list[int], list[float]]], path: Path, title: str = ""
) -> Path | None:
    """The over-optimisation curve of Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization"): held-out
    proxy (``eval/proxy_reward``) and gold (``eval/gold_reward``) reward against sqrt(KL to the reference).

    One point per held-out evaluation; its KL is ``kl/ref_kl`` of the same iteration (nats per reply, summed over
    its tokens). Proxy and gold are on their own y-axes (a reward model's scale is arbitrary). Gold peaking and
    falling while the proxy keeps rising is over-optimisation: the best policy is the one at gold's peak.

    Returns:
        ``path`` once written; None (nothing written) when the run has no proxy, gold or KL series.
    """
    if not all(k in series for k in (EVAL_PROXY_REWARD, EVAL_GOLD_REWARD, KL_REF_KL)):
        return None
    proxy, gold, kl = (dict(zip(*series[k])) for k in (EVAL_PROXY_REWARD, EVAL_GOLD_REWARD, KL_REF_KL))
    steps = sorted(set(proxy) & set(gold) & set(kl))
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [math.sqrt(max(kl[s], 0.0)) for s in steps]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    (g,) = ax.plot(x, [gold[s] for s in steps], "o-", color="tab:green", label=f"gold ({EVAL_GOLD_REWARD})")
    ax.set_xlabel("sqrt(KL to the reference)  (sqrt of kl/ref_kl, nats)")
    ax.set_ylabel("gold reward", color=g.get_color())
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    (pr,) = ax2.plot(x, [proxy[s] for s in steps], "s--", color="tab:blue", label=f"proxy ({EVAL_PROXY_REWARD})")
    ax2.set_ylabel("proxy reward (training reward)", color=pr.get_color())
    for xi, s in zip(x, steps):
        ax.annotate(str(s), (xi, gold[s]), textcoords="offset points", xytext=(3, 4), fontsize=7, alpha=0.7)
    ax.legend(handles=[g, pr], fontsize=8, loc="best")
    ax.set_title(f"Reward over-optimisation (held-out evals; labels = iteration) — {title}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
