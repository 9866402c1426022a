"""Preference pairs from a policy's own samples, labelled by a rater (rlchat/core/policy_pairs.py)."""

from __future__ import annotations

import json

import pytest

from rlchat.config import Config, RewardConfig
from rlchat.core.policy_pairs import policy_pairs, write_pairs
from rlchat.data import Record, load_records
from rlchat.errors import ConfigError
from rlchat.rewards import RewardFunction
from rlchat.tokenizer import ChatTokenizer
from serve.testing import make_tiny_checkpoint

# A stand-in checker an untrained tiny policy passes about half the time: its replies are random tokens, and about
# half of them hold a comma or a full stop (the safety component scores a pattern match -1, else 0)
RATER = RewardConfig(verifiable=0.0, safety=1.0, safety_patterns=("[,.]",))


def _prompts(n: int) -> list[Record]:
    return [
        Record(
            messages=[{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}],
            reference=str(i + 1),
            source=f"test:{i}",
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("policy") / "ckpt")


def _cfg() -> Config:
    return Config().replace(**{"env.max_turn_tokens": 16, "model.precision": "fp32", "rollout.temperature": 1.0})


def test_pairs_take_each_prompts_best_and_worst_sample_by_the_raters_score(checkpoint):
    records = _prompts(12)
    pairs, stats = policy_pairs(checkpoint, records, _cfg(), samples=4, min_margin=0.5, rater=RATER, seed=3)
    assert stats.prompts == 12 and stats.pairs == len(pairs) and stats.pairs + stats.tied + stats.empty == 12
    assert stats.pairs >= 6  # ~86% of prompts have one passing and one failing reply among 4
    tok = ChatTokenizer.from_config(Config().replace(**{"tokenizer.vocab_size": 4096}).tokenizer)
    rate = RewardFunction(RATER, tok)
    by_prompt = {json.dumps(r.prompt_messages()): r for r in records}
    for p in pairs:
        assert p.is_preference and p.format == "preference" and p.source.startswith("policy:")
        rec = by_prompt[json.dumps(p.messages)]
        chosen, rejected = p.chosen[0]["content"], p.rejected[0]["content"]
        s_c = rate(p.messages, chosen, tok.encode(chosen), rec).total
        s_r = rate(p.messages, rejected, tok.encode(rejected), rec).total
        assert s_c == 0.0 and s_r == -1.0 and "," not in chosen and "." not in chosen and p.meta["margin"] >= 0.5
    again, _ = policy_pairs(checkpoint, records, _cfg(), samples=4, min_margin=0.5, rater=RATER, seed=3)
    assert [(p.chosen, p.rejected) for p in again] == [(p.chosen, p.rejected) for p in pairs]  # seeded


def test_a_high_margin_leaves_only_ties_and_bad_settings_are_refused(checkpoint):
    pairs, stats = policy_pairs(checkpoint, _prompts(4), _cfg(), samples=2, min_margin=1.5, rater=RATER)
    assert pairs == [] and stats.tied + stats.empty == 4 and stats.tied > 0
    with pytest.raises(ConfigError, match="samples=1"):
        policy_pairs(checkpoint, _prompts(2), _cfg(), samples=1)
    with pytest.raises(ConfigError, match="min_margin=0"):
        policy_pairs(checkpoint, _prompts(2), _cfg(), min_margin=0)


def test_written_pairs_load_as_preference_data(checkpoint, tmp_path):
    pairs, _ = policy_pairs(checkpoint, _prompts(16), _cfg(), samples=4, min_margin=0.5, rater=RATER)
    path = write_pairs(pairs, tmp_path / "pairs" / "policy_pairs.jsonl")
    cfg = Config().replace(**{"tokenizer.vocab_size": 4096, "data.val_fraction": 0.0})
    loaded = load_records(str(path), split="train", cfg=cfg)
    assert len(loaded) == len(pairs) and all(r.is_preference for r in loaded)
    assert sorted(r.chosen[0]["content"] for r in loaded) == sorted(p.chosen[0]["content"] for p in pairs)


def test_more_pairs_per_prompt_reject_each_distinct_failing_reply_once(checkpoint):
    records = _prompts(12)
    one, _ = policy_pairs(checkpoint, records, _cfg(), samples=6, min_margin=0.5, rater=RATER, seed=5)
    many, stats = policy_pairs(
        checkpoint, records, _cfg(), samples=6, min_margin=0.5, rater=RATER, seed=5, max_pairs_per_prompt=3
    )
    assert len(many) > len(one) and stats.pairs == len(many)
    by_prompt: dict[str, list] = {}
    for p in many:
        by_prompt.setdefault(json.dumps(p.messages), []).append(p)
    for group in by_prompt.values():
        rejected = [p.rejected[0]["content"] for p in group]
        assert len(group) <= 3 and len(set(rejected)) == len(rejected)
        assert all("," not in p.chosen[0]["content"] and "." not in p.chosen[0]["content"] for p in group)
        assert all(("," in r or "." in r) for r in rejected)
    # the first pair of each prompt is the single-pair choice
    assert {(p.chosen[0]["content"], p.rejected[0]["content"]) for p in one} <= {
        (p.chosen[0]["content"], p.rejected[0]["content"]) for p in many
    }
