"""Ray Tune sweeps (tune/space.py, tune/sweep.py, tune/results.py, tune/stoppers.py, rlchat/cli/tune_cmd.py): space
files, stoppers, results, a real ASHA sweep, resume.

Fast tests check the space parser (every error names file:line and key), the RL stoppers on synthetic metric
sequences (one test per reason), trial resources, PBT's checkpoint copy (the learner then takes the mutated learning
rate and KL coefficient) and the results table / CSV / plot from a fake result grid. Three slow tests run real sweeps
with tiny in-process trials: a 4-trial ASHA sweep on the demo space (shared local Ray), a 2-trial sweep with
``--deploy`` whose best checkpoint then answers over real HTTP (shared local Ray and Serve), and a sweep whose driver
is SIGKILLed after the first checkpoint and then finished with ``--resume`` (subprocesses with their own Ray
instance).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rlchat.config import load_config
from rlchat.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_SPACE = ROOT / "tune" / "spaces" / "demo.yaml"
TINY = [
    "model.n_layer=1",
    "model.n_embd=32",
    "rollout.envs_per_worker=8",
    "env.max_turn_tokens=8",
    "ppo.iterations=4",
    "ppo.eval_prompts=8",
]


def _space(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------- space files


def test_demo_and_core_spaces_parse_against_their_configs() -> None:
    from ray import tune as ray_tune

    from tune.sweep import prepare_sweep

    base, space = prepare_sweep(str(DEMO_CONFIG), [], DEMO_SPACE)
    assert space.metric == "eval/reward_mean" and space.mode == "max" and space.samples >= 4
    assert {d.kind for d in space.params.values()} >= {"loguniform", "choice"}
    # the demo runs trials in-process, and each trial keeps its best checkpoint by the sweep's metric
    assert base.rollout.num_workers == 0 and base.ray.learner_workers == 0
    assert base.checkpoint.best_metric == "eval/reward_mean" and base.checkpoint.best_mode == "max"
    domains = space.param_space()
    assert isinstance(domains["ppo.learning_rate"], ray_tune.search.sample.Float)
    assert isinstance(domains["ppo.clip_coef"], ray_tune.search.sample.Categorical)

    gpu, core = prepare_sweep(str(ROOT / "configs" / "gpu.yaml"), [], ROOT / "tune" / "spaces" / "ppo_core.yaml")
    assert core.params["ppo.update_epochs"].kind == "randint" and gpu.rollout.num_workers >= 1
    assert core.stop["patience"] == 3


def test_precedence_config_then_fixed_then_overrides(tmp_path: Path) -> None:
    from tune.sweep import prepare_sweep

    space = _space(
        tmp_path,
        "fixed: {ppo.iterations: 7, ppo.kl_coef: 0.03}\nppo.clip_coef: {choice: [0.1, 0.2]}\n",
    )
    base, _ = prepare_sweep(str(DEMO_CONFIG), ["ppo.kl_coef=0.07"], space)
    assert base.ppo.iterations == 7  # fixed beats the config file (30)
    assert base.ppo.kl_coef == 0.07  # the command line beats fixed
    assert base.ppo.learning_rate == load_config(DEMO_CONFIG).ppo.learning_rate


def test_override_of_a_searched_key_is_an_error(tmp_path: Path) -> None:
    from tune.sweep import prepare_sweep

    space = _space(tmp_path, "ppo.clip_coef: {choice: [0.1, 0.2]}\n")
    with pytest.raises(ConfigError, match=r"ppo\.clip_coef: searched by .*space\.yaml and also overridden"):
        prepare_sweep(str(DEMO_CONFIG), ["ppo.clip_coef=0.3"], space)


@pytest.mark.parametrize(
    ("text", "line", "pattern"),
    [
        (
            "ppo.learning_rat: {loguniform: [1.0e-4, 1.0e-3]}\n",
            1,
            r"ppo\.learning_rat: unknown config key .* did you mean 'ppo\.learning_rate'",
        ),
        ("# c\nppo.clip_coef: {normal: [0.1, 0.2]}\n", 2, r"ppo\.clip_coef: unknown distribution 'normal'"),
        ("ppo.learning_rate: {loguniform: [0, 1.0e-3]}\n", 1, r"loguniform: expected positive bounds"),
        ("ppo.learning_rate: {uniform: [1.0e-3, 1.0e-4]}\n", 1, r"uniform: expected low < high"),
        (
            "ppo.update_epochs: {uniform: [1, 4]}\n",
            1,
            r"uniform needs a float config key; ppo\.update_epochs is int \(use randint\)",
        ),
        ("ppo.clip_coef: {randint: [1, 3]}\n", 1, r"randint needs an integer config key"),
        ("ppo.clip_coef: 0.2\n", 1, r"expected a distribution .* goes under `fixed:`"),
        (
            "ppo.clip_coef: {choice: [0.1, 1.5]}\n",
            1,
            r"value 1\.5 .* not valid with the base config: ppo\.clip_coef=1\.5: expected a value in \(0, 1\)",
        ),
        ("ppo.kl_estimator: {choice: [k1, k9]}\n", 1, r"value 'k9'"),
        ("fixed:\n  ppo.clip_coef: 0.1\nppo.clip_coef: {choice: [0.1]}\n", 2, r"is both searched and fixed"),
        ("fixed:\n  ppo.iteration: 3\nppo.clip_coef: {choice: [0.1]}\n", 2, r"unknown config key 'ppo\.iteration'"),
        (
            "stop:\n  max_ref_k: 1\nppo.clip_coef: {choice: [0.1]}\n",
            2,
            r"unknown stop option; .* did you mean 'max_ref_kl'",
        ),
        (
            "scheduler:\n  reduction_factor: 1\nppo.clip_coef: {choice: [0.1]}\n",
            2,
            r"reduction_factor: 1\.0 is out of range",
        ),
        ("mode: maximum\nppo.clip_coef: {choice: [0.1]}\n", 1, r"mode: expected max or min"),
        ("samples: 2\n", None, r"no searched keys"),
        ("learning_rate: {choice: [0.1]}\n", 1, r"unknown setting 'learning_rate'"),
    ],
)
def test_space_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int | None, pattern: str) -> None:
    from tune.space import load_space

    path = _space(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_space(path, load_config(DEMO_CONFIG))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:" if line else f"{path}:"), message


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    from tune.space import load_space, resolve_space_path

    with pytest.raises(ConfigError, match=r"space\.yaml:2: invalid YAML"):
        load_space(_space(tmp_path, "ppo.clip_coef: {choice: [0.1]}\nppo.kl_coef: a: b\n"))
    with pytest.raises(ConfigError, match=r"no such file; .*built-in spaces \(demo\.yaml, ppo_core\.yaml\)"):
        resolve_space_path(tmp_path / "nope.yaml")
    assert resolve_space_path("demo") == DEMO_SPACE  # built-in spaces by name, from any directory


def test_distributions_sample_valid_values_and_pbt_clipping() -> None:
    from ray import tune as ray_tune

    from tune.space import Distribution
    from tune.sweep import ClipToSpace

    randint = Distribution("randint", (1, 5))
    assert randint.probe_values() == [1, 4]  # high excluded, as in Tune
    assert isinstance(Distribution("grid", (1, 2)).to_tune(), dict)  # {"grid_search": [...]}
    assert Distribution("grid", (1, 2)).to_mutation() == [1, 2]
    assert isinstance(Distribution("uniform", (0.1, 0.3)).to_mutation(), ray_tune.search.sample.Float)
    clip = ClipToSpace({"ppo.clip_coef": Distribution("uniform", (0.1, 0.3)), "ppo.update_epochs": randint})
    out = clip({"ppo.clip_coef": 0.36, "ppo.update_epochs": 7, "other": 1})
    assert out == {"ppo.clip_coef": 0.3, "ppo.update_epochs": 4, "other": 1}
    assert clip({"ppo.clip_coef": 0.05})["ppo.clip_coef"] == 0.1


# ------------------------------------------------------------------------------------------------- stoppers


def _results(**series: list[float]) -> list[dict[str, float]]:
    n = len(next(iter(series.values())))
    out = []
    for i in range(n):
        r: dict[str, float] = {"tune/iteration": float(i + 1), "training_iteration": float(i + 1)}
        for key, values in series.items():
            if values[i] is not None:
                r[key.replace("__", "/")] = values[i]
        out.append(r)
    return out


def _run(stopper: Any, results: list[dict[str, float]], trial: str = "t1") -> list[bool]:
    return [stopper(trial, r) for r in results]


def test_kl_stopper_with_patience_and_non_finite_kl(tmp_path: Path) -> None:
    from tune.stoppers import RLStopper, read_stops

    stopper = RLStopper(max_ref_kl=1.0, patience=2, record_path=tmp_path / "stops.json")
    # one spike is forgiven, two in a row stop the trial at the second one
    assert _run(stopper, _results(kl__ref_kl=[0.1, 1.5, 0.2, 1.2, 3.0, 5.0])) == [False] * 4 + [True, False]
    record = read_stops(tmp_path)["t1"]
    assert record["reason"] == "ref_kl" and record["iteration"] == 5
    assert "kl/ref_kl=3 > max_ref_kl=1 for 2 iterations" in record["detail"]
    assert record["values"] == {"kl/ref_kl": 3.0}
    # NaN / inf KL stops at once, whatever the patience
    assert _run(stopper, _results(kl__ref_kl=[0.1, float("nan")]), "t2") == [False, True]
    assert "not finite" in read_stops(tmp_path)["t2"]["detail"]
    assert set(read_stops(tmp_path)) == {"t1", "t2"}  # records merge


def test_entropy_stopper_and_grace_period() -> None:
    from tune.stoppers import RLStopper

    stopper = RLStopper(min_entropy=0.5, grace_iterations=2)
    # below the floor at iterations 1-2 is ignored (grace); iteration 3 stops
    assert _run(stopper, _results(ppo__entropy=[0.1, 0.2, 0.3, 0.3])) == [False, False, True, False]
    assert stopper.stops["t1"]["reason"] == "entropy" and stopper.stops["t1"]["iteration"] == 3
    # a healthy trial never stops; no check configured -> inactive
    assert not any(_run(RLStopper(min_entropy=0.5), _results(ppo__entropy=[2.0, 1.5, 1.0])))
    assert not RLStopper().active and RLStopper(min_entropy=0.1).active


def test_reward_hacking_stopper_compares_trends_at_fresh_evaluations() -> None:
    from tune.stoppers import RLStopper

    # eval every 2 iterations; carried-forward eval values (odd iterations) must not count as new points
    train = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80]
    held_out = [None, 0.50, 0.50, 0.45, 0.45, 0.40, 0.40, 0.30]
    eval_it = [0, 2, 2, 4, 4, 6, 6, 8]
    results = _results(rollout__reward_mean=train, eval__reward__reference_f1=held_out, tune__eval_iteration=eval_it)
    stopper = RLStopper(hacking_component="reference_f1", hacking_window=3, hacking_min_delta=0.01)
    decisions = _run(stopper, results)
    assert decisions == [False] * 5 + [True, False, False]  # the third fresh point (iteration 6) trips it
    record = stopper.stops["t1"]
    assert record["reason"] == "reward_hacking" and record["iteration"] == 6
    assert "rollout/reward_mean rose by" in record["detail"] and "eval/reward/reference_f1 fell by" in record["detail"]
    assert record["values"]["eval/reward/reference_f1_change"] == pytest.approx(-0.1)
    # the training reward of a point is the mean since the previous evaluation: (0.1+0.2)/2, (0.3+0.4)/2, ...
    assert record["values"]["rollout/reward_mean_change"] == pytest.approx(0.4)

    # both rising: learning, not hacking; a change within min_delta: noise
    rising = _results(
        rollout__reward_mean=train,
        eval__reward__reference_f1=[0.1 * i for i in range(8)],
        tune__eval_iteration=list(range(1, 9)),
    )
    assert not any(_run(RLStopper(hacking_component="reference_f1"), rising))
    flat = _results(
        rollout__reward_mean=train,
        eval__reward__reference_f1=[0.5 - 0.001 * i for i in range(8)],
        tune__eval_iteration=list(range(1, 9)),
    )
    assert not any(_run(RLStopper(hacking_component="reference_f1", hacking_min_delta=0.05), flat))
    # a full metric key works too (the reward-model score, eval/reward/model)
    assert RLStopper(hacking_component="eval/reward/model").hacking_key == "eval/reward/model"


def test_gold_drop_stopper_ends_a_trial_whose_gold_falls_while_its_proxy_rises() -> None:
    from tune.stoppers import RLStopper

    # eval every 2 iterations, carried forward between (odd iterations are not new points); gold peaks at 4
    proxy = [None, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8]
    gold = [None, 0.50, 0.50, 0.60, 0.60, 0.55, 0.55, 0.45]
    eval_it = [0, 2, 2, 4, 4, 6, 6, 8]
    results = _results(eval__proxy_reward=proxy, eval__gold_reward=gold, tune__eval_iteration=eval_it)
    stopper = RLStopper(max_gold_drop=0.1, gold_window=3)
    assert stopper.active
    assert _run(stopper, results) == [False] * 7 + [True]  # 0.60 -> 0.45 (> 0.1) at iteration 8; 0.05 at 6 is not
    record = stopper.stops["t1"]
    assert record["reason"] == "gold_drop" and record["iteration"] == 8
    assert (
        "eval/gold_reward fell 0.15 below its best" in record["detail"]
        and "eval/proxy_reward rose" in record["detail"]
    )
    assert record["values"] == pytest.approx({"eval/gold_reward_drop": 0.15, "eval/proxy_reward_change": 0.4})
    # the same gold with the proxy falling too is a worse policy, not over-optimisation; a best older than the
    # window is forgotten; with the check off nothing stops
    falling = _results(eval__proxy_reward=[0.8, 0.6, 0.4, 0.2], eval__gold_reward=[0.5, 0.6, 0.5, 0.4])
    assert not any(_run(RLStopper(max_gold_drop=0.1), falling))
    slow = _results(eval__proxy_reward=[0.1, 0.2, 0.3, 0.4, 0.5], eval__gold_reward=[0.9, 0.84, 0.78, 0.72, 0.66])
    assert not any(_run(RLStopper(max_gold_drop=0.1, gold_window=2), slow))
    assert _run(RLStopper(max_gold_drop=0.1, gold_window=3), slow) == [False, False, True, False, False]
    assert not any(_run(RLStopper(), results))
    # a result without the gold series: warned about once, never a stop
    assert not any(_run(RLStopper(max_gold_drop=0.1), _results(eval__proxy_reward=[0.1, 0.5, 0.9])))


def test_stopper_settings_are_validated() -> None:
    from tune.stoppers import RLStopper, fitted_change

    with pytest.raises(ConfigError, match=r"stop\.hacking_window=1: expected at least 2"):
        RLStopper(hacking_window=1)
    with pytest.raises(ConfigError, match=r"stop\.gold_window=1: expected at least 2"):
        RLStopper(gold_window=1)
    with pytest.raises(ConfigError, match=r"stop\.max_gold_drop=-0.1: expected >= 0"):
        RLStopper(max_gold_drop=-0.1)
    with pytest.raises(ConfigError, match=r"stop\.patience=0"):
        RLStopper(patience=0)
    assert fitted_change([1, 2, 3], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert fitted_change([1], [5.0]) == 0.0


def test_relative_paths_become_absolute_for_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tune.sweep import prepare_sweep

    (tmp_path / "runs" / "sft" / "checkpoints").mkdir(parents=True)
    (tmp_path / "prompts.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    space = _space(tmp_path, "ppo.clip_coef: {choice: [0.1, 0.2]}\n")
    over = ["checkpoint.init_from=runs/sft/checkpoints/best", "data.prompts=prompts.jsonl", "model.name_or_path="]
    base, _ = prepare_sweep(str(DEMO_CONFIG), over, space)
    assert base.checkpoint.init_from == str(tmp_path / "runs" / "sft" / "checkpoints" / "best")
    assert base.data.prompts == str(tmp_path / "prompts.jsonl")
    assert base.data.sft == "builtin:chat"  # not a path: unchanged


def test_deploy_serves_the_best_checkpoint_and_blocks_only_on_a_local_instance(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import types

    from rlchat.cli import tune_cmd as sweep

    calls: list[dict[str, Any]] = []
    fake = types.ModuleType("rlchat.cli.serve_cmd")
    fake.serve_command = lambda **kw: calls.append(kw) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rlchat.cli.serve_cmd", fake)
    assert sweep.deploy_best("/ckpt/step_000004", "10.0.0.1:6379", blocking=False) == 0
    assert calls == [{"checkpoint": "/ckpt/step_000004", "address": "10.0.0.1:6379", "blocking": False}]
    assert "deploying the best checkpoint /ckpt/step_000004" in capsys.readouterr().out
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = load_config(DEMO_CONFIG)
    assert not sweep._connects_to_cluster(None, base)  # local instance: --deploy keeps serving until Ctrl-C
    assert sweep._connects_to_cluster("auto", base)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert sweep._connects_to_cluster(None, base)


# ------------------------------------------------------------------------------------------------- resources


def test_trial_resources_follow_the_trial_config() -> None:
    from tune.sweep import TrialResources, max_concurrent_trials, trial_bundles

    demo = load_config(DEMO_CONFIG)
    inproc = demo.replace(**{"rollout.num_workers": 0, "ray.learner_workers": 0})
    assert trial_bundles(inproc) == [{"CPU": 1.0}]
    assert max_concurrent_trials(inproc, {"CPU": 2.0}) is None  # Tune's own accounting is exact

    # workers: an empty trial bundle + one bundle per rollout worker; learners are counted by the concurrency cap
    actors = demo.replace(**{"rollout.resources": {"rollout": 1}, "ray.learner_resources": {"learner": 1}})
    assert trial_bundles(actors) == [{}, {"CPU": 1.0, "rollout": 1.0}]
    # the two-node test cluster: 1 CPU + learner on the head, 1 CPU + rollout on the worker -> one trial at a time
    assert max_concurrent_trials(actors, {"CPU": 2.0, "learner": 1.0, "rollout": 1.0}) == 1
    assert max_concurrent_trials(demo, {"CPU": 8.0}) == 4
    assert max_concurrent_trials(actors, {"CPU": 0.0}) is None  # autoscaling head only: let pending PGs scale it
    pgf = TrialResources(inproc.to_dict())({"rollout.num_workers": 2, "rollout.num_cpus_per_worker": 0.5})
    assert pgf.bundles == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]


# ------------------------------------------------------------------------------------------------- PBT retarget


def test_pbt_checkpoint_is_copied_and_the_learner_takes_the_mutated_learning_rate_and_kl(tmp_path: Path) -> None:
    """A PBT exploit copies the donor's checkpoint byte for byte; the learner that loads it keeps the Adam moments and
    the schedule position and trains with the trial's mutated learning rate and KL coefficient."""
    import torch

    from rlchat.checkpoint import read_checkpoint
    from rlchat.learner import LocalLearner
    from rlchat.metrics import make_run_dir, write_run_config
    from rlchat.trainer import train
    from tune.sweep import _seed_run_dir

    cfg = load_config(
        DEMO_CONFIG,
        [
            *TINY,
            "ppo.iterations=1",
            "ppo.eval_every=0",
            "checkpoint.every=1",
            "rollout.num_workers=0",
            "ray.learner_workers=0",
        ],
    )
    src_run, _ = train(cfg, tmp_path / "donor", quiet=True)
    src = next((src_run / "checkpoints").glob("step_*"))
    old_state = read_checkpoint(src).load_train_state()
    mutated = cfg.replace(**{"ppo.learning_rate": cfg.ppo.learning_rate * 2, "ppo.kl_coef": 0.5})
    for name, trial_cfg in (("same", cfg), ("mut", mutated)):
        step, _ = _seed_run_dir(tmp_path / name, src, trial_cfg)
        copied = tmp_path / name / "checkpoints" / src.name
        assert step == 1
        for f in ("model.safetensors", "train_state.pt"):
            assert (copied / f).read_bytes() == (src / f).read_bytes(), (name, f)

    learner = LocalLearner(mutated)
    learner.restore(str(tmp_path / "mut" / "checkpoints" / src.name))
    inner = learner.learner
    assert inner.scheduler.base_lrs == pytest.approx([2 * b for b in old_state["scheduler"]["base_lrs"]])
    assert [g["lr"] for g in inner.optimizer.param_groups] == pytest.approx(
        [2 * g["lr"] for g in old_state["optimizer"]["param_groups"]]
    )
    assert inner.kl_ctl.value == 0.5
    assert inner.scheduler.last_epoch == old_state["scheduler"]["last_epoch"]  # the schedule's position stays
    moments = inner.optimizer.state_dict()["state"]
    for k, v in old_state["optimizer"]["state"].items():
        assert torch.equal(moments[k]["exp_avg"], v["exp_avg"])

    # the resumed trials train with their own values: twice the learning rate, the mutated KL coefficient
    lines = {}
    for name, trial_cfg in (("same", cfg), ("mut", mutated)):
        longer = trial_cfg.replace(**{"ppo.iterations": 2})
        write_run_config(make_run_dir(tmp_path / name, "train"), longer)
        run, _ = train(longer, tmp_path / name, resume=True, quiet=True)
        lines[name] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert lines["mut"]["step"] == lines["same"]["step"] == 2
    assert lines["mut"]["ppo/lr"] == pytest.approx(2 * lines["same"]["ppo/lr"])
    assert lines["mut"]["kl/coef"] == 0.5 and lines["same"]["kl/coef"] == cfg.ppo.kl_coef


# ------------------------------------------------------------------------------------------------- results


def _fake_result(
    trial: str, metric: list[float | None], reward: list[float], config: dict[str, Any], **kw: Any
) -> Any:
    import pandas as pd

    rows = []
    for i, (m, r) in enumerate(zip(metric, reward), start=1):
        row = {"tune/iteration": i, "training_iteration": i, "rollout/reward_mean": r, "tune/eval_iteration": i}
        if m is not None:
            row["eval/reward_mean"] = m
        rows.append(row)
    last = {**rows[-1], "trial_id": trial, "kl/ref_kl": 0.1, "ppo/entropy": 2.0, **kw.pop("last", {})}
    return SimpleNamespace(
        metrics=last,
        metrics_dataframe=pd.DataFrame(rows),
        config=config,
        error=kw.pop("error", None),
        path=f"/x/tuner/trial_{trial}",
        checkpoint=None,
        get_best_checkpoint=lambda metric, mode: None,
    )


def test_results_table_csv_plot_and_stop_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tune.results import best_row, collect_rows, plot_trials, write_csv, write_outputs
    from tune.space import load_space
    from tune.stoppers import write_stops

    base = load_config(DEMO_CONFIG, ["ppo.iterations=4"])
    space = load_space(_space(tmp_path, "ppo.clip_coef: {choice: [0.1, 0.2]}\n"), base)
    grid = [
        _fake_result("a_00000", [0.1, 0.2, 0.4, 0.5], [0.1] * 4, {"ppo.clip_coef": 0.1}),
        _fake_result("a_00001", [0.1, 0.6], [0.2, 0.9], {"ppo.clip_coef": 0.2}),  # stopped at 2 by the stopper
        _fake_result("a_00002", [0.0, 0.1], [0.0, 0.0], {"ppo.clip_coef": 0.2}),  # stopped at 2 by ASHA
        _fake_result("a_00003", [None], [0.0], {"ppo.clip_coef": 0.1}, error=RuntimeError("boom\nValueError: bad")),
    ]
    write_stops(tmp_path / "stops.json", {"a_00001": {"reason": "reward_hacking", "detail": "reward up, F1 down"}})
    rows = collect_rows(grid, space, base, tmp_path, "asha")
    reasons = {r.trial_id: (r.stop_reason, r.iterations) for r in rows}
    assert reasons == {
        "a_00000": ("completed", 4),
        "a_00001": ("reward_hacking", 2),
        "a_00002": ("asha", 2),
        "a_00003": ("error", 1),
    }
    assert rows[3].status == "ERROR" and rows[3].stop_detail == "ValueError: bad"
    best = best_row(rows, "max")
    assert best is not None and best.trial_id == "a_00001" and best.best == pytest.approx(0.6)

    write_csv(rows, space, tmp_path / "results.csv")
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == ["a_00000", "a_00001", "a_00002", "a_00003"]
    assert table[1]["stop_reason"] == "reward_hacking" and float(table[0]["eval/reward_mean_best"]) == 0.5
    assert table[0]["ppo.clip_coef"] == "0.1" and math.isnan(float(table[3]["eval/reward_mean_last"]))
    png = plot_trials(rows, space, tmp_path / "trials.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    best = write_outputs(grid, space, base, tmp_path, "asha")
    out = capsys.readouterr().out
    assert "*a_00001" in out and "reward_hacking" in out and "fix for reward_hacking:" in out
    assert load_config(tmp_path / "best_config.yaml").ppo.clip_coef == 0.2
    assert not (tmp_path / "best_checkpoint.txt").exists()  # the fake trials reported no checkpoint


# ------------------------------------------------------------------------------------------------- real sweeps


@pytest.mark.slow
def test_asha_sweep_on_the_demo_space_runs_four_trials(
    ray_local: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlchat.checkpoint import read_checkpoint
    from rlchat.cli.tune_cmd import tune_command

    sweep = tmp_path / "sweep"
    t0 = time.perf_counter()
    rc = tune_command(
        config=str(DEMO_CONFIG),
        overrides=TINY,
        run_dir=str(sweep),
        address=None,
        resume=None,
        space=str(DEMO_SPACE),
        samples=4,
        scheduler="asha",
        deploy=False,
    )
    elapsed = time.perf_counter() - t0
    assert rc == 0
    out = capsys.readouterr().out
    with (sweep / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4, rows
    assert all(r["status"] == "TERMINATED" for r in rows), rows
    assert all(r["stop_reason"] in ("completed", "asha", "ref_kl", "entropy", "reward_hacking") for r in rows)
    assert all(0 < int(r["iterations"]) <= 4 for r in rows)
    lrs = {float(r["ppo.learning_rate"]) for r in rows}
    assert len(lrs) == 4 and all(1e-4 <= lr <= 3e-3 for lr in lrs)  # sampled from the space
    assert all(math.isfinite(float(r["eval/reward_mean_best"])) for r in rows)
    assert (sweep / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert "eval/reward_mean (best)" in out and "results:" in out
    # best config: the base (tiny, in-process) plus the best trial's sampled values
    best = load_config(sweep / "best_config.yaml")
    assert best.model.n_layer == 1 and best.rollout.num_workers == 0
    assert best.ppo.learning_rate in lrs
    ckpt = Path((sweep / "best_checkpoint.txt").read_text().strip())
    assert read_checkpoint(ckpt, expect_stage="ppo").config.ppo.learning_rate == best.ppo.learning_rate
    # each trial's own rlchat run directory
    for r in rows:
        # (a trial ASHA stopped may have logged the iteration it was running when the stop arrived)
        steps = _steps(Path(r["run_dir"]))
        n = int(r["iterations"])
        assert steps == list(range(1, len(steps) + 1)) and n <= len(steps) <= n + 1, (r["trial_id"], steps)
    print(f"4-trial ASHA sweep: {elapsed:.1f} s")


@pytest.mark.slow
def test_sweep_with_deploy_serves_the_best_checkpoint_over_http(
    ray_local: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rlchat tune --deploy` end to end: a real 2-trial sweep, then the best checkpoint answers over real HTTP.

    On a Ray instance the caller already runs (here the session's), --deploy deploys and returns instead of
    serving until Ctrl-C.
    """
    import requests

    from rlchat.cli.tune_cmd import tune_command
    from serve import testing
    from tune.results import BEST_CHECKPOINT_FILE

    monkeypatch.delenv("RLCHAT_API_KEY", raising=False)
    sweep = tmp_path / "sweep"
    short = [o for o in TINY if not o.startswith("ppo.iterations=")]
    short += ["ppo.iterations=2", "ppo.eval_every=1", "checkpoint.every=1"]
    with testing.serve_command_port() as port:
        t0 = time.perf_counter()
        rc = tune_command(
            config=str(DEMO_CONFIG),
            overrides=[*short, f"serve.port={port}"],  # the port the served checkpoint's config carries
            run_dir=str(sweep),
            address=None,
            resume=None,
            space=str(DEMO_SPACE),
            samples=2,
            scheduler="asha",
            deploy=True,
        )
        elapsed = time.perf_counter() - t0
        assert rc == 0  # returned: it did not block
        best = Path((sweep / BEST_CHECKPOINT_FILE).read_text(encoding="utf-8").strip())
        out = capsys.readouterr().out
        url = f"http://127.0.0.1:{port}"
        assert f"deploying the best checkpoint {best}" in out and f"serving {best.resolve()}" in out
        with (sweep / "results.csv").open() as f:
            assert len(list(csv.DictReader(f))) == 2
        ready = requests.get(url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        info = ready.json()
        assert Path(info["checkpoint"]) == best.resolve() and info["stage"] == "ppo", info
        assert requests.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
        body = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 4, "seed": 0}
        r = requests.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    print(f"2-trial sweep + deploy: {elapsed:.1f} s")


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _sweep_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlchat.cli", "tune", "--space", str(DEMO_SPACE), "--run-dir", str(run_dir), *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the tests' shared instance
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group this test started (the sweep driver and the Ray instance it spawned)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_sweep_resumes_after_the_driver_is_killed(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    overrides = [*TINY, "ppo.eval_every=1", "checkpoint.every=1"]
    cmd = _sweep_cmd(sweep, "--config", str(DEMO_CONFIG), "--samples", "2", *overrides)
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline, reported = time.monotonic() + 240, False
        tuner = sweep / "tuner"
        while time.monotonic() < deadline and proc.poll() is None:
            # a checkpoint is resumable once Tune's experiment state (what --resume reads) has registered it
            states = [p.read_text(errors="replace") for p in tuner.glob("experiment_state-*.json")]
            reported = any("checkpoint_0000" in text for text in states)
            if reported:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert reported, "no trial reported a checkpoint in time: " + (tmp_path / "first.log").read_text()[-3000:]
    finally:
        _kill_group(proc)
    assert not (sweep / "results.csv").exists()  # killed mid-sweep

    resume = subprocess.run(
        _sweep_cmd(sweep, "--resume", str(sweep)),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert "resuming sweep" in resume.stdout
    with (sweep / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows), rows
    for r in rows:
        # the run continued from its checkpoint: one history, every iteration once
        steps = _steps(Path(r["run_dir"]))
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= int(r["iterations"]), (r["trial_id"], steps)
    assert any(r["stop_reason"] == "completed" and r["iterations"] == "4" for r in rows), rows
    # at least one trial continued from the checkpoint it had reported before the kill (not from scratch)
    resumed = [
        float(row["tune/resumed_from"])
        for progress in (sweep / "tuner").glob("trial_*/progress.csv")
        for row in csv.DictReader(progress.open())
    ]
    assert max(resumed) >= 1, resumed
    assert (sweep / "trials.png").is_file() and (sweep / "best_config.yaml").is_file()
