"""Evaluation: teacher-forced perplexity/accuracy against a hand computation, and `rlchat eval` end to end
(table, samples, eval.json, win rate with ties, safety hit rate, judge discovery and its clear absence). No Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlchat.checkpoint import save_checkpoint
from rlchat.cli.eval_cmd import eval_command
from rlchat.config import Config, save_config
from rlchat.data import Record
from rlchat.errors import CheckpointError, ConfigError, DataError
from rlchat.evaluation import evaluate_checkpoint, teacher_forced_metrics, win_rate
from rlchat.metrics import (
    EVAL_ACCURACY,
    EVAL_DISTINCT_1,
    EVAL_DISTINCT_2,
    EVAL_PERPLEXITY,
    EVAL_RESPONSE_LEN,
    EVAL_REWARD_MEAN,
    EVAL_SAFETY_HIT_RATE,
    EVAL_WIN_RATE,
)
from rlchat.model import PolicyValueModel, RewardModel
from rlchat.tokenizer import ChatTokenizer

VOCAB = 4096

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How are you today?"}],
    [
        {"role": "system", "content": "Answer with just the number."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 5?"},
        {"role": "assistant", "content": "8"},
    ],
]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", VOCAB)


@pytest.fixture(scope="module")
def cfg() -> Config:
    return Config().replace(
        **{
            "tokenizer.vocab_size": VOCAB,
            "model.n_layer": 1,
            "model.n_embd": 32,
            "model.n_head": 2,
            "model.n_positions": 128,
            "model.precision": "fp32",
            "env.max_turn_tokens": 6,
            "env.max_context": 64,
            "seed": 3,
        }
    )


@pytest.fixture(scope="module")
def policy(cfg, tok) -> PolicyValueModel:
    return PolicyValueModel.build(cfg, tok).eval()


def _hand_metrics(lm: torch.nn.Module, tok: ChatTokenizer, conversations) -> tuple[float, float]:
    """Perplexity and accuracy from the model's own full logits, one conversation at a time."""
    nll, correct, count = 0.0, 0, 0
    for conv in conversations:
        ids, mask = tok.render_conversation(conv)
        with torch.no_grad():
            logits = lm(torch.tensor([ids])).logits[0, :, : tok.n_vocab].double()  # (T, V)
        logp = torch.log_softmax(logits, -1)
        for t in range(1, len(ids)):
            if mask[t]:
                nll -= float(logp[t - 1, ids[t]])
                correct += int(int(logits[t - 1].argmax()) == ids[t])
                count += 1
    return math.exp(nll / count), correct / count


@pytest.mark.parametrize("batch_size", [1, 2])
def test_teacher_forced_metrics_equal_a_hand_computation(policy, tok, batch_size):
    ppl, acc = _hand_metrics(policy.lm, tok, CONVERSATIONS)
    got = teacher_forced_metrics(policy, tok, CONVERSATIONS, batch_size=batch_size)  # 2 = right-padded batch
    assert set(got) == {"perplexity", "accuracy"}
    assert got["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    # a plain transformers LM gives the same numbers as the policy wrapping it
    plain = teacher_forced_metrics(policy.lm, tok, CONVERSATIONS, batch_size=batch_size)
    assert plain["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert plain["accuracy"] == pytest.approx(acc, abs=1e-12)


def test_teacher_forced_metrics_score_only_assistant_tokens(policy, tok):
    only_user = [[{"role": "user", "content": "nothing to score here"}]]
    with pytest.raises(DataError, match="no.*assistant token"):
        teacher_forced_metrics(policy, tok, only_user)
    # user-only conversations add context rows but no scored tokens: the metrics do not move
    mixed = teacher_forced_metrics(policy, tok, CONVERSATIONS + only_user, batch_size=3)
    assert mixed == pytest.approx(teacher_forced_metrics(policy, tok, CONVERSATIONS))


# ------------------------------------------------------------------------------------------------ rlchat eval


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TASK_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}],
     "reference": str(a + b)}
    for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3)]
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cfg, tok, policy) -> dict[str, Path]:
    """runs/sft-a (a policy), runs/rm-a (a reward model), as rlchat sft / rm lay them out, plus held-out data."""
    root = tmp_path_factory.mktemp("eval") / "runs"
    sft = save_checkpoint(
        root / "sft-a" / "checkpoints" / "step_000001", model=policy, tokenizer=tok, config=cfg, stage="sft", step=1
    )
    rm_model = RewardModel.build(cfg, tok)
    rm = save_checkpoint(
        root / "rm-a" / "checkpoints" / "step_000002", model=rm_model, tokenizer=tok, config=cfg, stage="rm", step=2
    )
    data = _write_jsonl(root.parent / "heldout.jsonl", TASK_ROWS)
    eval_cfg = cfg.replace(**{"reward.safety": 1.0, "reward.safety_patterns": ["^"], "reward.reference_f1": 0.5})
    config = root.parent / "eval.yaml"
    save_config(eval_cfg, config)
    return {"root": root, "sft": sft, "rm": rm, "data": data, "config": config}


def test_eval_command_prints_table_and_samples_and_writes_eval_json(runs, capsys):
    out = runs["root"].parent / "out"
    rc = eval_command(
        str(runs["sft"]),
        baseline=str(runs["sft"]),  # itself: every reply is identical, so every comparison is a tie
        data=str(runs["data"]),
        config=str(runs["config"]),
        out=str(out),
        samples=2,
        max_prompts=4,
    )
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("reward (mean)", "verifiable", "reference_f1", "perplexity", "token accuracy", "distinct-2"):
        assert label in text
    assert "win rate vs baseline: 0.500 (0 wins, 4 ties, 0 losses" in text
    assert str(runs["rm"]) in text  # the judge found beside the run is named
    assert text.count("--- sample") == 2 and "[reference] 3" in text

    result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    m = result["metrics"]
    assert result["num_prompts"] == 4 and result["stage"] == "sft" and result["step"] == 1
    assert m[EVAL_WIN_RATE] == 0.5
    assert result["win_rate"]["judge_source"].startswith("found ")
    assert m[EVAL_SAFETY_HIT_RATE] == 1.0  # the pattern "^" flags every reply
    rows = result["examples"]
    assert len(rows) == 4 and rows[0]["prompt"] == TASK_ROWS[0]["messages"][:1]
    assert m[EVAL_REWARD_MEAN] == pytest.approx(sum(r["reward"] for r in rows) / 4)
    assert m[EVAL_RESPONSE_LEN] == pytest.approx(sum(len(r["reply_ids"]) for r in rows) / 4)
    all_ids = [t for r in rows for t in r["reply_ids"]]
    assert m[EVAL_DISTINCT_1] == pytest.approx(len(set(all_ids)) / len(all_ids))
    bigrams = [tuple(r["reply_ids"][i : i + 2]) for r in rows for i in range(len(r["reply_ids"]) - 1)]
    assert m[EVAL_DISTINCT_2] == pytest.approx(len(set(bigrams)) / len(bigrams) if bigrams else 0.0)
    for r in rows:  # reward = 1 x verifiable + 0.5 x reference_f1 + 1 x safety (-1 when flagged)
        c = r["components"]
        assert c["safety"] == -1.0 and r["safety_flagged"] is True
        assert r["reward"] == pytest.approx(c["verifiable"] + 0.5 * c["reference_f1"] + c["safety"])
    # perplexity/accuracy are the teacher-forced metrics of the reference conversations
    assert m[EVAL_PERPLEXITY] > 1.0 and 0.0 <= m[EVAL_ACCURACY] <= 1.0
    assert result["baseline"]["metrics"][EVAL_PERPLEXITY] == pytest.approx(m[EVAL_PERPLEXITY])


def test_eval_reference_perplexity_matches_teacher_forced_metrics(runs, policy, tok, cfg):
    from rlchat.data import load_records

    records = load_records(str(runs["data"]), "all", cfg)
    result = evaluate_checkpoint(runs["sft"], records, cfg, max_prompts=3)
    expected = teacher_forced_metrics(policy, tok, [r["messages"] for r in TASK_ROWS[:3]])
    assert result["metrics"][EVAL_PERPLEXITY] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert result["metrics"][EVAL_SAFETY_HIT_RATE] is None  # no filter configured: not measured, not 0
    assert result["baseline"] is None and EVAL_WIN_RATE not in result["metrics"]


def test_eval_baseline_without_any_reward_model_says_how_to_get_one(tmp_path, monkeypatch, cfg, tok, policy):
    monkeypatch.chdir(tmp_path)  # no ./runs/rm-* to discover
    ckpt = tmp_path / "lone" / "step_000001"
    save_checkpoint(ckpt, model=policy, tokenizer=tok, config=cfg, stage="sft", step=1)

    records = [Record(messages=[{"role": "user", "content": "hi"}])]
    with pytest.raises(ConfigError, match=r"reward\.model_path.*rlchat rm"):
        evaluate_checkpoint(ckpt, records, cfg, baseline=ckpt)


def test_eval_refuses_a_reward_model_checkpoint(runs):
    with pytest.raises(CheckpointError, match="stage"):
        eval_command(str(runs["rm"]), data=str(runs["data"]), samples=0)


def test_win_rate_counts_wins_losses_and_ties_by_the_judges_scores():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    scores = {"good": 2.0, "bad": -1.0, "same": 0.5, "also same": 0.5}

    def judge(ps, replies):  # a stub judge: the score depends on the reply only
        assert len(ps) == len(replies)
        return [scores[r] for r in replies]

    replies = ["good", "bad", "good", "same", "same"]
    baseline = ["bad", "good", "bad", "also same", "same"]  # win, loss, win, equal scores (tie), identical (tie)
    result = win_rate(judge, prompts, replies, baseline)
    assert (result["wins"], result["losses"], result["ties"]) == (2, 1, 2)
    assert result["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    flipped = win_rate(judge, prompts, baseline, replies)
    assert (flipped["wins"], flipped["losses"]) == (1, 2) and flipped["win_rate"] == pytest.approx(2 / 5)


def test_eval_json_defaults_to_the_run_not_inside_the_checkpoint(runs, capsys):
    """A checkpoint is written once, atomically; eval results go to <run>/eval/<step>/eval.json."""
    rc = eval_command(str(runs["sft"]), data=str(runs["data"]), config=str(runs["config"]), samples=0, max_prompts=2)
    assert rc == 0
    expected = runs["root"] / "sft-a" / "eval" / "step_000001" / "eval.json"
    assert f"wrote {expected}" in capsys.readouterr().out
    assert json.loads(expected.read_text(encoding="utf-8"))["num_prompts"] == 2
    assert not (runs["sft"] / "eval.json").exists()
