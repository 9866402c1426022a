"""Run directories, metrics.jsonl / TensorBoard / MLflow logging, the progress line and `rlchat plot`."""

from __future__ import annotations

import json
import math
import re
import sys

import numpy as np
import pytest
import torch

from rlchat import metrics as M
from rlchat.cli import main as cli_main
from rlchat.config import Config, load_config
from rlchat.errors import RLChatError


def _strict_json(line: str) -> dict:
    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=reject)


def test_a_run_dir_inside_a_ray_jobs_uploaded_working_dir_is_warned_about(tmp_path, monkeypatch, capsys):
    """``ray job submit --working-dir .`` runs the command in Ray's unpacked copy of the checkout, which Ray
    deletes: a relative --run-dir (or the default runs/...) there lost the run without a word. Now a warning names
    the directory and the fix; elsewhere nothing is said."""
    from rlchat.core.files import in_job_working_dir

    job = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    assert in_job_working_dir("runs/x") and not in_job_working_dir(tmp_path / "shared" / "runs")
    path = M.make_run_dir("runs/ppo", "train")
    M.make_run_dir(tmp_path / "shared" / "ppo", "train")
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and str(path) in warned[0] and "absolute path on shared storage" in warned[0], warned


def test_make_run_dir_default_names_are_unique_and_laid_out(tmp_path):
    a = M.make_run_dir(None, "sft", root=tmp_path / "runs")
    b = M.make_run_dir(None, "sft", root=tmp_path / "runs")  # same second: gets a -n suffix, never shares
    assert a != b and a.parent == b.parent == tmp_path / "runs"
    assert re.fullmatch(r"sft-\d{8}-\d{6}", a.name) and re.fullmatch(r"sft-\d{8}-\d{6}(-\d+)?", b.name)
    for d in (a, b):
        assert all((d / sub).is_dir() for sub in ("checkpoints", "logs", "plots"))

    explicit = M.make_run_dir(tmp_path / "mine", "rm")
    (explicit / "metrics.jsonl").write_text("{}\n")
    assert M.make_run_dir(str(explicit), "rm") == explicit  # reused for --resume, contents kept
    assert (explicit / "metrics.jsonl").read_text() == "{}\n"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RLChatError, match="is a file; expected a directory"):
        M.make_run_dir(tmp_path / "afile", "sft")


def test_write_run_config_round_trips(tmp_path):
    cfg = Config().replace(**{"ppo.clip_coef": 0.1, "seed": 3})
    path = M.write_run_config(tmp_path, cfg)
    assert path == tmp_path / "config.yaml"
    assert load_config(path) == cfg


def test_metrics_writer_jsonl_tensorboard_and_non_finite(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with M.MetricsWriter(tmp_path, config=Config()) as w:
        w.log(1, {M.SFT_LOSS: 2.5, M.PERF_TOKENS_PER_S: np.float32(100.0), "sft/epoch": 0})
        with caplog.at_level("WARNING"):
            w.log(2, {M.SFT_LOSS: float("nan"), M.PERF_TOKENS_PER_S: torch.tensor(120.0), "note": "warmup"})
            w.log(3, {M.SFT_LOSS: 1.5, M.KL_REF_KL: float("inf")})
        with pytest.raises(ValueError, match="reserved"):
            w.log(4, {"step": 1.0})
        with pytest.raises(TypeError, match="'bad'.*expected a number"):
            w.log(4, {"bad": [1, 2]})
    assert "metric sft/loss is nan at step 2" in caplog.text

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    recs = [_strict_json(line) for line in lines]  # strict JSON: NaN/Infinity never written
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0][M.SFT_LOSS] == 2.5 and recs[0][M.PERF_TOKENS_PER_S] == 100.0 and recs[0]["sft/epoch"] == 0.0
    assert recs[1][M.SFT_LOSS] is None and recs[1]["note"] == "warmup" and recs[1][M.PERF_TOKENS_PER_S] == 120.0
    assert recs[2][M.KL_REF_KL] is None
    assert all(isinstance(r["time"], float) and r["time"] >= 0 for r in recs)
    assert M.read_metrics(tmp_path) == recs

    events = list((tmp_path / M.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / M.TENSORBOARD_DIR))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars(M.SFT_LOSS)]
    assert loss == [(1, 2.5), (3, 1.5)]  # the NaN step is skipped
    assert M.KL_REF_KL not in acc.Tags()["scalars"]  # only ever inf: never written
    assert [e.step for e in acc.Scalars(M.PERF_TOKENS_PER_S)] == [1, 2]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_read_metrics_skips_torn_last_line_and_names_corrupt_lines(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    assert [r["step"] for r in M.read_metrics(tmp_path)] == [1, 2]
    assert M.read_metrics(f) == M.read_metrics(tmp_path)  # the file path works too
    f.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RLChatError, match=r"metrics.jsonl:2: corrupt metrics line"):
        M.read_metrics(tmp_path)
    with pytest.raises(RLChatError, match="no metrics file"):
        M.read_metrics(tmp_path / "nope")


def test_rewind_drops_steps_after_a_resumed_checkpoint(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 6):
            w.log(step, {"a": float(step)})
    with M.MetricsWriter(tmp_path, tensorboard=False) as w:  # the resumed run, from the step-3 checkpoint
        assert w.rewind(3) == 2
        w.log(4, {"a": 40.0})
    assert [(r["step"], r["a"]) for r in M.read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_mlflow_logging_to_a_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rlchat-test")
    cfg = Config().replace(**{"ppo.clip_coef": 0.1})
    with M.MetricsWriter(tmp_path / "run", config=cfg, tensorboard=False, mlflow_uri=uri) as w:
        w.log(1, {M.ROLLOUT_REWARD_MEAN: 0.25, M.KL_REF_KL: float("nan")})
        w.log(2, {M.ROLLOUT_REWARD_MEAN: 0.5, M.KL_REF_KL: 0.01})
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("rlchat-test").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["ppo.clip_coef"] == "0.1"
    hist = client.get_metric_history(run.info.run_id, M.ROLLOUT_REWARD_MEAN)
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.25), (2, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, M.KL_REF_KL)] == [(2, 0.01)]


def test_mlflow_requested_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(RLChatError, match="mlflow package is not installed; pip install mlflow"):
        M.MetricsWriter(tmp_path, tensorboard=False, mlflow_uri="file:///tmp/x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/x")
    with pytest.raises(RLChatError, match="MLFLOW_TRACKING_URI"):
        M.MetricsWriter(tmp_path, tensorboard=False)
    M.MetricsWriter(tmp_path, tensorboard=False, mlflow_uri="").close()  # "" turns MLflow off


def test_format_progress_line():
    line = M.format_progress(
        10,
        40,
        {M.ROLLOUT_REWARD_MEAN: 0.4123, M.KL_REF_KL: 0.031, M.PERF_TOKENS_PER_S: 1234.0, "other": 1},
        elapsed_s=30.0,
    )
    assert line == "step 10/40 (25%) | reward 0.412 | KL 0.0310 | 1.2k tok/s | 00:30 < ETA 01:30"
    line = M.format_progress(0, 100, {M.SFT_LOSS: float("nan")}, elapsed_s=3725.0)
    assert line == "step 0/100 (0%) | loss nan | 1:02:05 < ETA ?"
    assert M.format_progress(3, 0, {M.SFT_LOSS: 2.0}, 1.0).startswith("step 3 | loss 2.0000")


def test_format_progress_eta_uses_the_steps_run_since_resume():
    # resumed at step 9 of 10: one step took 10 s, so one more takes ~10 s, not 10 s / 9
    line = M.format_progress(9, 10, {M.SFT_LOSS: 2.0}, elapsed_s=10.0, done=1)
    assert line == "step 9/10 (90%) | loss 2.0000 | 00:10 < ETA 00:10"
    # a fresh run (done == step, the default) gives the mean step over all steps
    assert M.format_progress(5, 10, {}, elapsed_s=50.0, done=5) == M.format_progress(5, 10, {}, 50.0)
    assert M.format_progress(5, 10, {}, elapsed_s=50.0).endswith("00:50 < ETA 00:50")
    # resumed but nothing run yet in this process: no ETA to give
    assert M.format_progress(9, 10, {}, elapsed_s=0.0, done=0).endswith("00:00 < ETA ?")


def test_attach_log_file_writes_rlchat_records_and_detaches(tmp_path):
    import logging

    run = M.make_run_dir(tmp_path / "run", "sft")
    handler = M.attach_log_file(run, "sft")
    log = logging.getLogger("rlchat.some_module")
    old_level = logging.getLogger("rlchat").level
    logging.getLogger("rlchat").setLevel(logging.INFO)
    try:
        log.info("first line")
    finally:
        M.detach_log_file(handler)
    log.info("after detach")
    handler2 = M.attach_log_file(run, "sft")  # appended to (resume), not truncated
    try:
        log.warning("second line")
    finally:
        M.detach_log_file(handler2)
        logging.getLogger("rlchat").setLevel(old_level)
    text = (run / "logs" / "sft.log").read_text()
    assert "INFO rlchat.some_module: first line" in text and "WARNING rlchat.some_module: second line" in text
    assert "after detach" not in text
    assert handler not in logging.getLogger("rlchat").handlers and handler2 not in logging.getLogger("rlchat").handlers


def test_metric_groups():
    assert M.metric_group(M.SFT_VAL_LOSS) == M.metric_group(M.PPO_VALUE_LOSS) == "loss"
    assert M.metric_group(M.SFT_VAL_PERPLEXITY) == "perplexity"
    assert M.metric_group(M.RM_VAL_ACCURACY) == M.metric_group(M.EVAL_WIN_RATE) == "accuracy"
    assert M.metric_group(M.ROLLOUT_REWARD_MEAN) == M.metric_group("rollout/reward/verifiable") == "reward"
    assert M.metric_group(M.KL_REF_KL) == M.metric_group(M.PPO_APPROX_KL) == M.metric_group(M.KL_COEF) == "kl"
    assert M.metric_group(M.PPO_ENTROPY) == "entropy" and M.metric_group(M.SFT_LR) == "lr"
    assert M.metric_group(M.PERF_TOKENS_PER_S) == M.metric_group(M.PERF_SAMPLE_S) == "throughput"
    assert M.metric_group(M.PPO_CLIPFRAC) == "ppo"


def _fake_run(run_dir, n: int = 60) -> None:
    rng = np.random.default_rng(0)
    with M.MetricsWriter(run_dir, tensorboard=False) as w:
        for step in range(1, n + 1):
            rec = {
                M.SFT_LOSS: 3.0 * math.exp(-step / 20) + 0.1 * rng.random(),
                M.SFT_LR: 1e-3 * min(1.0, step / 10),
                M.PERF_TOKENS_PER_S: 1000 + 50 * rng.random(),
                M.ROLLOUT_REWARD_MEAN: 1 - math.exp(-step / 15) + 0.05 * rng.standard_normal(),
                M.KL_REF_KL: 0.002 * step,
                M.PPO_CLIPFRAC: 0.1,
            }
            if step % 10 == 0:
                rec |= {
                    M.SFT_VAL_LOSS: 3.0 * math.exp(-step / 25),
                    M.SFT_VAL_PERPLEXITY: math.exp(3.0 * math.exp(-step / 25)),
                    M.SFT_VAL_ACCURACY: 0.3 + step / 100,
                    M.EVAL_REWARD_MEAN: 1 - math.exp(-step / 15),
                }
            w.log(step, rec)


def test_plot_run_writes_one_png_per_group(tmp_path):
    _fake_run(tmp_path)
    paths = M.plot_run(tmp_path)
    assert [p.name for p in paths] == [
        "loss.png",
        "perplexity.png",
        "accuracy.png",
        "reward.png",
        "kl.png",
        "lr.png",
        "throughput.png",
        "ppo.png",
    ]
    for p in paths:
        assert (
            p.parent == tmp_path / "plots" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        )


def test_plot_command_prints_paths_and_errors_clearly(tmp_path, capsys):
    _fake_run(tmp_path, n=5)
    assert cli_main(["plot", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "plots" / "loss.png") in printed
    assert cli_main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl; expected a run directory" in capsys.readouterr().err
    (tmp_path / "e2").mkdir()
    (tmp_path / "e2" / "metrics.jsonl").write_text('{"step": 1, "note": "x"}\n')
    with pytest.raises(RLChatError, match="no numeric metrics to plot"):
        M.plot_run(tmp_path / "e2")


def test_gold_drop_hand_values():
    # (proxy, gold) per evaluation, oldest first
    assert M.gold_drop([], 3) == M.gold_drop([(0.1, 0.5)], 3) == (0.0, 0.0)
    assert M.gold_drop([(0.1, 0.2), (0.3, 0.4), (0.5, 0.6)], 3) == (0.0, 0.0)  # gold still rising: best is newest
    drop, rise = M.gold_drop([(0.1, 0.2), (0.3, 0.6), (0.5, 0.5), (0.9, 0.3)], 3)
    assert (drop, rise) == pytest.approx((0.3, 0.6))  # best gold 0.6 at proxy 0.3; newest (0.9, 0.3)
    assert M.gold_drop([(0.1, 0.9), (0.3, 0.6), (0.5, 0.5)], 2) == pytest.approx((0.1, 0.2))  # 0.9 is out of window
    assert M.gold_drop([(0.5, 0.6), (0.2, 0.4)], 3) == pytest.approx((0.2, -0.3))  # proxy fell too: no hacking


def _over_optimised_run(run_dir, gold: bool = True) -> None:
    """Synthetic PPO metrics: proxy rises with KL; gold peaks at sqrt(KL) ~ 1.5 and falls (Gao et al.'s shape)."""
    with M.MetricsWriter(run_dir, tensorboard=False) as w:
        for step in range(1, 41):
            kl = 0.1 * step
            rec = {M.ROLLOUT_REWARD_MEAN: 0.5 * math.sqrt(kl), M.KL_REF_KL: kl}
            if step % 5 == 0:
                d = math.sqrt(kl)
                rec |= {M.EVAL_REWARD_MEAN: 0.6 * d, M.EVAL_PROXY_REWARD: 0.6 * d}
                if gold:
                    rec |= {M.EVAL_GOLD_REWARD: d * (1.0 - d / 3.0), M.EVAL_REWARD_PREFIX + "verifiable": 0.0}
            w.log(step, rec)


def test_plot_run_draws_proxy_and_gold_against_sqrt_kl(tmp_path):
    _over_optimised_run(tmp_path)
    paths = M.plot_run(tmp_path)
    over = tmp_path / "plots" / M.OVEROPTIMISATION_PLOT
    assert over in paths and over.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and over.stat().st_size > 10000
    import matplotlib.image as mpimg

    img = mpimg.imread(over)  # (H, W, 4): drawn, not blank
    assert img.shape[0] > 300 and img.shape[1] > 500 and float(img[..., :3].std()) > 0.05


def test_plot_run_skips_the_overoptimisation_curve_without_a_gold_series(tmp_path):
    _over_optimised_run(tmp_path, gold=False)
    paths = M.plot_run(tmp_path)
    assert paths and M.OVEROPTIMISATION_PLOT not in [p.name for p in paths]
    assert not (tmp_path / "plots" / M.OVEROPTIMISATION_PLOT).exists()
