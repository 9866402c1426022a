"""RLHF with a gold check: a PPO run trained on the reward model alone still measures the task's checked answer.

The training reward is the proxy (``reward.model``); the ``verifiable`` component is the gold reward, scored on
the same prompts but never part of the reward (``reward.monitor``). Here: the trainer logs both side by side
(``eval/proxy_reward``, ``eval/gold_reward``), the gold-drop guardrail (``ppo.max_gold_drop``) on synthetic
histories, and -- slow -- SFT -> reward model -> PPO on the reward model alone raising held-out gold reward by
the margin the README states.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from tiny_configs import IN_PROCESS, TINY_PPO

from rlchat import metrics as M
from rlchat.config import load_config
from rlchat.errors import ConfigError
from rlchat.ppo import VALUE_LOSS
from rlchat.trainer import Guardrails, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_PPO,
    "ppo.update_epochs=1",
    "ppo.eval_prompts=8",
    *IN_PROCESS,
]


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ proxy and gold in the logs


def test_a_run_without_the_verifiable_reward_still_logs_gold_beside_proxy(tmp_path):
    """reward.verifiable=0: the gold component is scored and logged (rollout/, eval/) but is not in the reward."""
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [*TINY, "reward.verifiable=0", "reward.length=1", "ppo.iterations=2", "ppo.eval_every=1"],
    )
    run, _ = train(cfg, tmp_path / "run", quiet=True)
    lines = _lines(run)
    for r in lines:
        assert {M.ROLLOUT_REWARD_PREFIX + "verifiable", M.EVAL_GOLD_REWARD, M.EVAL_PROXY_REWARD} <= set(r)
        # the total is the length term alone: the monitored gold component adds nothing
        assert r[M.ROLLOUT_REWARD_MEAN] == pytest.approx(r[M.ROLLOUT_REWARD_PREFIX + "length"], abs=1e-6)
        assert r[M.EVAL_PROXY_REWARD] == r[M.EVAL_REWARD_MEAN]
        assert r[M.EVAL_GOLD_REWARD] == r[M.EVAL_REWARD_PREFIX + "verifiable"]
        assert 0.0 <= r[M.EVAL_GOLD_REWARD] <= 1.0 and math.isfinite(r[M.KL_REF_KL])
    assert lines[0][M.GUARD_GOLD_DROP] == 0.0  # one point: nothing to fall from
    assert M.GUARD_GOLD_DROP in lines[1]
    # with no monitor there is no gold series
    off = cfg.replace(**{"reward.monitor": (), "ppo.iterations": 1})
    run, _ = train(off, tmp_path / "off", quiet=True)
    (r,) = _lines(run)
    assert M.EVAL_GOLD_REWARD not in r and M.ROLLOUT_REWARD_PREFIX + "verifiable" not in r
    assert M.EVAL_PROXY_REWARD in r


def reply_score(prompt_messages, response_text, response_ids, record) -> float:
    """A reward plugin that varies with every reply (a tiny random policy's replies all score alike otherwise)."""
    return float(sum(response_ids) % 7)


def test_one_sampling_scores_the_proxy_and_the_gold_as_two_samplings_would(tmp_path):
    """``sampled_scores`` (what ``run_rlhf`` reports) samples each policy once: the total of those episodes equals a
    sampling under the training reward alone, and their monitored checked answer the total of a sampling scored by
    the checked answer alone -- the episodes do not depend on how they are scored."""
    from rlchat.cli.demo import sampled_reward, sampled_scores
    from rlchat.core.checkpoint import resolve_checkpoint_dir
    from rlchat.core.data import load_records

    proxy_reward = ["reward.verifiable=0", "reward.plugins={'test_rlhf_gold:reply_score': 1.0}", "reward.monitor=[]"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*TINY, *proxy_reward, "ppo.iterations=1"])
    run, _ = train(cfg, tmp_path / "run", quiet=True)
    ckpt = resolve_checkpoint_dir(run / "checkpoints" / "latest")
    held_out = load_records(cfg.data.prompts, split="val", cfg=cfg)
    both = sampled_scores(ckpt, cfg, held_out, 6, samples=2, components=["verifiable"])
    proxy = sampled_reward(ckpt, cfg, held_out, 6, samples=2)
    gold = sampled_reward(ckpt, cfg.replace(**{"reward.verifiable": 1.0, "reward.plugins": {}}), held_out, 6, 2)
    assert both["total"] == proxy and both["verifiable"] == gold
    assert proxy["n"] == gold["n"] == 12 and proxy["stderr"] > 0


# ------------------------------------------------------------------------------------ the gold-drop guardrail


def _guard(*overrides: str) -> Guardrails:
    return Guardrails(load_config(None, list(overrides)))


def _evals(guard: Guardrails, points: list[tuple[float, float] | None]) -> list[list[str]]:
    """Feed one iteration per point ((proxy, gold) at an evaluation, None between) and collect what trips."""
    out = []
    for p in points:
        m = {M.ROLLOUT_RESPONSE_LEN: 4.0}
        if p is not None:
            m |= {M.EVAL_PROXY_REWARD: p[0], M.EVAL_GOLD_REWARD: p[1]}
        out.append(guard.check(m))
    return out


OVER_OPTIMISED = [(0.1, 0.30), None, (0.4, 0.50), None, (0.7, 0.45), None, (1.0, 0.35)]
"""Proxy rises at every evaluation; gold peaks at the second (0.50) and falls by 0.05, then 0.15."""


def test_gold_drop_guardrail_trips_when_gold_falls_from_its_best_while_proxy_rises(caplog):
    guard = _guard("ppo.max_gold_drop=0.1", "ppo.gold_window=3")
    with caplog.at_level(logging.WARNING, logger="rlchat.distributed.trainer"):
        tripped = _evals(guard, OVER_OPTIMISED)
    assert tripped == [[]] * 6 + [["gold_drop"]]
    assert "guardrail 'gold_drop' tripped at guard/gold_drop=0.15" in caplog.text
    assert "raise ppo.kl_coef" in caplog.text
    # the metric is written at evaluations only
    m = {M.EVAL_PROXY_REWARD: 1.1, M.EVAL_GOLD_REWARD: 0.3}
    assert guard.check(m) == ["gold_drop"] and m[M.GUARD_GOLD_DROP] == pytest.approx(0.15)  # window: 0.45, 0.35, 0.3
    assert caplog.text.count("guardrail 'gold_drop' tripped") == 1  # warned once per cause


def test_gold_drop_guardrail_needs_the_proxy_to_rise_and_looks_back_over_its_window():
    # the proxy falls with gold: a worse policy, not over-optimisation
    assert not any(_evals(_guard("ppo.max_gold_drop=0.1"), [(1.0, 0.5), (0.6, 0.3), (0.2, 0.1)]))
    # a best older than the window is forgotten: 0.6 -> 0.45 over 4 evaluations, 0.05 per step
    slow = [(0.1 * i, 0.6 - 0.05 * i) for i in range(4)]
    assert not any(_evals(_guard("ppo.max_gold_drop=0.1", "ppo.gold_window=2"), slow))
    assert _evals(_guard("ppo.max_gold_drop=0.1", "ppo.gold_window=4"), slow)[-1] == ["gold_drop"]
    # off by default, yet the drop is still measured
    guard = _guard()
    assert not any(_evals(guard, OVER_OPTIMISED))
    m = {M.EVAL_PROXY_REWARD: 1.1, M.EVAL_GOLD_REWARD: 0.3}
    guard.check(m)
    assert m[M.GUARD_GOLD_DROP] == pytest.approx(0.15)  # window: 0.45, 0.35, 0.3


def test_gold_drop_guardrail_state_survives_a_resume_and_a_rollback_forgets_the_tripping_point():
    guard = _guard("ppo.max_gold_drop=0.1", "ppo.guardrail_action=rollback")
    assert _evals(guard, OVER_OPTIMISED)[-1] == ["gold_drop"]
    # rollback: the weights that scored (1.0, 0.35) are discarded, and so is their point
    assert guard.eval_points == [(0.4, 0.5), (0.7, 0.45)]
    resumed = _guard("ppo.max_gold_drop=0.1", "ppo.guardrail_action=rollback")
    resumed.load_state_dict(guard.state_dict())
    assert resumed.eval_points == guard.eval_points and resumed.first_length == guard.first_length
    assert _evals(resumed, [(0.8, 0.48)]) == [[]]
    assert resumed.load_state_dict({"first_length": 3.0}) is None and resumed.eval_points == []  # old checkpoints


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ppo.max_gold_drop=-0.1", "ppo.max_gold_drop"),
        ("ppo.gold_window=1", "ppo.gold_window"),
    ],
)
def test_gold_drop_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


# ------------------------------------------------------------------------------------ RLHF end to end (slow)


def _demo_sft_data(cfg, out: Path) -> Path:
    """The demo's SFT set without Ray Data: chat + the task's *train* split (its val split stays held out)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlchat.data import RECORD_SCHEMA, load_records

    out.mkdir(parents=True)
    for split in ("train", "val"):
        recs = load_records("builtin:chat", split, cfg) + load_records("builtin:task", split, cfg)
        pq.write_table(
            pa.Table.from_pylist([r.to_row() for r in recs], schema=RECORD_SCHEMA), out / f"{split}.parquet"
        )
    return out


JUDGE_SFT = {"sft.epochs": 25}
"""The reward model's start: the demo's SFT policy; the RLHF settings themselves are the demo's ``--full`` run
(:data:`rlchat.cli.demo.RLHF_PPO` and its neighbours), run here in-process."""
GOLD_MARGIN = 0.05
"""The target (issue #14, stated in README.md): held-out gold reward (sampled) gained by PPO on the reward model
alone."""


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory):
    """The demo's SFT (the judge's start), then :func:`rlchat.cli.demo.run_rlhf`: a 5-epoch SFT policy, an implicit
    reward model from the judge, PPO (GRPO) whose reward is that model alone, and the held-out gold and proxy of
    both policies sampled at the rollout temperature, as ``rlchat demo --full`` reports them."""
    from rlchat.cli.demo import run_rlhf
    from rlchat.stages import run_sft

    tmp = tmp_path_factory.mktemp("rlhf")
    base = load_config(
        ROOT / "configs" / "demo.yaml", ["ray.learner_workers=0", "rollout.num_workers=0", "checkpoint.every=0"]
    )
    base = base.replace(**{"data.sft": str(_demo_sft_data(base, tmp / "sft_data"))})
    judge_dir, _ = run_sft(base.replace(**JUDGE_SFT), tmp / "judge", quiet=True, use_ray=False)
    out = run_rlhf(base, tmp / "rlhf", judge=judge_dir / "checkpoints" / "best", quiet=True, use_ray=False)
    return {**out, "run": Path(out["run_dir"]) / "ppo", "rm": out["rm_final"]}


@pytest.mark.slow
def test_rlhf_run_logs_proxy_and_gold_against_kl_and_draws_the_overoptimisation_curve(rlhf_run):
    """The gold check on a real RLHF run: proxy and gold logged side by side against KL, the over-optimisation
    curve drawn, the reward model above issue #14's 0.85, and the learner optimising its proxy."""
    run = rlhf_run["run"]
    assert rlhf_run["rm"][M.RM_VAL_ACCURACY] >= 0.85, rlhf_run["rm"]
    lines = _lines(run)
    assert all(M.ROLLOUT_REWARD_PREFIX + "verifiable" in r for r in lines)
    evals = [r for r in lines if M.EVAL_GOLD_REWARD in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(M.EVAL_PROXY_REWARD in r and M.KL_REF_KL in r and M.GUARD_GOLD_DROP in r for r in evals)
    assert M.plot_run(run)[-1] == run / "plots" / M.OVEROPTIMISATION_PLOT
    proxy = rlhf_run["proxy"]
    assert proxy["ppo"]["mean"] > proxy["sft"]["mean"], proxy  # the learner did optimise its reward
    assert all(r[VALUE_LOSS] == 0.0 for r in lines)  # GRPO: no critic was trained


@pytest.mark.slow
def test_ppo_on_the_reward_model_alone_raises_held_out_gold_reward(rlhf_run):
    # measured on 2 cores (docs/ppo.md; all 200 held-out prompts x 4 sampled replies, noise ~0.04): gold 0.150 ->
    # 0.266 (seed 0), 0.172 -> 0.281 (seed 1); with a 4-epoch reward model +0.06-0.09, too close to the margin
    from rlchat.cli.demo import format_rlhf

    gold = rlhf_run["gold"]
    assert gold["ppo"]["mean"] - gold["sft"]["mean"] >= GOLD_MARGIN, gold
    assert "PPO raised the held-out gold reward it never sees" in format_rlhf(rlhf_run)
