"""Prompt-only records (issue #11): accepted wherever a reply is not needed -- PPO prompts, eval, ``rlchat
generate``, ``rlchat data prepare`` -- through data's one reply-optional path, and refused with ``path:line`` where
one is (SFT, reward-model data), raw or prepared.

The PPO runs are in one process (``rollout.num_workers=0``, ``ray.learner_workers=0``, a 1-layer model), as in
tests/test_trainer.py; the prepare and generate tests share the session's local Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from tiny_configs import IN_PROCESS, TINY_PPO

from rlchat.batch_generate import PARQUET_FILE, generate, read_prompts
from rlchat.checkpoint import save_checkpoint
from rlchat.config import Config, load_config
from rlchat.data import builtin_path, load_records, parse_record, read_records, reply_required
from rlchat.errors import DataError
from rlchat.generation import SamplingParams
from rlchat.model import PolicyValueModel
from rlchat.stages import prepare_rm_data, prepare_sft_data
from rlchat.tokenizer import ChatTokenizer
from rlchat.trainer import train

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096
U = {"role": "user", "content": "What is 3 + 4?"}
A = {"role": "assistant", "content": "7"}
S = {"role": "system", "content": "Be brief."}


def _task_prompts(n: int) -> list[tuple[list[dict[str, str]], str]]:
    """The first ``n`` built-in arithmetic tasks as (prompt messages without the reply, reference answer)."""
    out = []
    for rec in read_records([builtin_path("task")]).records[:n]:
        assert rec.reference is not None
        out.append((rec.prompt_messages(), rec.reference))
    return out


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _pair_file(path: Path, n: int, without_reference_every: int = 0) -> Path:
    """``{"prompt": ..., "reference": ...}`` lines (a ``system`` key where the task has one); every
    ``without_reference_every``-th record has no reference."""
    records = []
    for i, (msgs, ref) in enumerate(_task_prompts(n)):
        rec: dict = {"prompt": msgs[-1]["content"]}
        if msgs[0]["role"] == "system":
            rec["system"] = msgs[0]["content"]
        if not (without_reference_every and i % without_reference_every == 0):
            rec["reference"] = ref
        records.append(rec)
    return _write(path, records)


def _messages_file(path: Path, n: int, reference: bool = True) -> Path:
    """``{"messages": [...ending with the user turn]}`` lines, with or without ``reference``."""
    return _write(
        path, [{"messages": msgs, **({"reference": ref} if reference else {})} for msgs, ref in _task_prompts(n)]
    )


# ---------------------------------------------------------------------------------------------------------------
# Parsing: one reply-optional path in rlchat.data
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "fmt", "messages"),
    [
        ({"prompt": "What is 3 + 4?", "reference": "7"}, "pair", [U]),
        ({"prompt": "What is 3 + 4?"}, "pair", [U]),
        ({"prompt": "What is 3 + 4?", "system": "Be brief.", "reference": 7}, "pair", [S, U]),
        ({"prompt": [U]}, "pair", [U]),
        ({"messages": [S, U], "reference": "7"}, "messages", [S, U]),
        ({"messages": [U]}, "messages", [U]),
        ({"conversations": [{"from": "human", "value": "What is 3 + 4?"}]}, "sharegpt", [U]),
        ({"instruction": "What is 3 + 4?"}, "alpaca", [U]),
    ],
)
def test_prompt_only_records_parse_for_prompts(obj: dict, fmt: str, messages: list) -> None:
    rec = parse_record(obj, "p.jsonl:1", require_reply=False)
    assert (rec.format, rec.messages, rec.has_reply) == (fmt, messages, False)
    assert rec.prompt_messages() == messages  # the whole record is the prompt
    assert rec.reference == ("7" if "reference" in obj else None)


def test_records_with_replies_are_unchanged_on_the_reply_optional_path() -> None:
    for obj in ({"messages": [U, A]}, {"prompt": "What is 3 + 4?", "response": "7"}, {"instruction": U["content"]}):
        if "instruction" in obj:
            obj = {**obj, "output": "7"}
        assert parse_record(obj, require_reply=False) == parse_record(obj)
    # a multi-turn prompt ending with a user turn is answered as a whole, not cut at its last reply
    follow_up = {"role": "user", "content": "Now add 1."}
    rec = parse_record({"messages": [U, A, follow_up]}, require_reply=False)
    assert rec.prompt_messages() == [U, A, follow_up] and rec.has_reply
    assert parse_record({"messages": [U, A]}).prompt_messages() == [U]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"messages": [U]}, r"messages: expected at least one assistant message to learn from, found roles \[user\]"),
        ({"conversations": [{"from": "human", "value": "Hi"}]}, r"conversations: expected at least one assistant"),
        ({"prompt": "Hi", "reference": "x"}, r"response: expected the reply to learn from \(a 'response' or"),
        ({"instruction": "Hi"}, r"output: expected the reply to learn from \(a 'output' value\)"),
    ],
)
def test_prompt_only_records_are_refused_where_a_reply_is_required(obj: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message + r".*prompt-only records are accepted as PPO / eval prompts"):
        parse_record(obj)


def test_prompt_only_conversations_must_end_with_the_user_turn() -> None:
    with pytest.raises(ValueError, match=r"messages: expected a prompt-only conversation to end with the user turn"):
        parse_record({"messages": [S]}, require_reply=False)
    with pytest.raises(ValueError, match=r"found roles \[user, system\]"):
        parse_record({"messages": [U, S]}, require_reply=False)
    # still a broken preference pair, not a prompt
    with pytest.raises(ValueError, match=r"record: expected the keys of a known format"):
        parse_record({"prompt": "Hi", "chosen": "Hello"}, require_reply=False)


# ---------------------------------------------------------------------------------------------------------------
# Loading: data.prompts accepts them, SFT / RM refuse them with file:line
# ---------------------------------------------------------------------------------------------------------------


def _cfg(**overrides) -> Config:
    return Config().replace(**{"tokenizer.vocab_size": VOCAB, **overrides})


def test_load_records_accepts_prompt_only_files_as_data_prompts(tmp_path: Path) -> None:
    pairs = _pair_file(tmp_path / "pairs.jsonl", 20, without_reference_every=4)
    msgs = _messages_file(tmp_path / "msgs.jsonl", 20, reference=False)
    for path in (pairs, msgs):
        cfg = _cfg(**{"data.prompts": str(path)})
        assert reply_required(str(path), cfg) is False
        records = load_records(str(path), "all", cfg)
        assert len(records) == 20 and not any(r.has_reply for r in records)
        assert all(r.prompt_messages()[-1]["role"] == "user" for r in records)
    refs = [r.reference for r in load_records(str(pairs), "all", _cfg(**{"data.prompts": str(pairs)}))]
    assert refs.count(None) == 5 and all(r is not None and r.isdigit() for r in refs if r is not None)
    # an explicit caller (e.g. `rlchat eval --data`) needs no config role
    assert len(load_records(str(msgs), "all", _cfg(), require_reply=False)) == 20


def test_sft_and_rm_loaders_refuse_a_prompt_only_file_with_file_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "prompts.jsonl", [{"messages": [U, A]}, {"messages": [S, U]}, {"prompt": "Hi"}])
    tok = ChatTokenizer("cl100k_base", VOCAB)
    # data.sft: the loader SFT uses fails on line 2, as before prompt-only records existed
    cfg = _cfg(**{"data.sft": str(path)})
    with pytest.raises(DataError, match=rf"{path}:2: messages: expected at least one assistant message"):
        prepare_sft_data(cfg, tok, 64)
    # the same file as data.prompts *and* data.sft needs replies everywhere: SFT keeps its file:line error
    with pytest.raises(DataError, match=rf"{path}:2: messages: expected at least one assistant message"):
        prepare_sft_data(_cfg(**{"data.sft": str(path), "data.prompts": str(path)}), tok, 64)
    # reward-model data: same rule
    with pytest.raises(DataError, match=rf"{path}:2: messages: expected at least one assistant message"):
        prepare_rm_data(_cfg(**{"data.preferences": str(path)}), tok, 64)
    # --on-error skip: each prompt-only record is skipped (and reported), not silently learned from
    assert len(load_records(str(path), "all", _cfg(**{"data.sft": str(path), "data.on_error": "skip"}))) == 1
    # a spec no config key names keeps requiring a reply
    with pytest.raises(DataError, match=rf"{path}:2: "):
        load_records(str(path), "all", _cfg())


def test_prepare_keeps_prompt_only_records_and_sft_refuses_the_prepared_dir(ray_local, tmp_path: Path) -> None:
    from rlchat.prepare import format_stats_table, prepare

    src = _write(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": f"What is {i} + 1?", **({"response": str(i + 1)} if i % 2 else {"reference": str(i + 1)})}
            for i in range(10)
        ],
    )
    cfg = _cfg(**{"data.val_fraction": 0.2})
    result = prepare([src], tmp_path / "prepared", cfg, progress=False)
    assert result.stats["kept"] == 10 and result.stats["prompt_only"] == 5 and result.skipped == []
    assert "prompt-only records   5" in format_stats_table(result.stats)
    out = str(result.out)
    # as prompts: every record, the prompt-only ones with their reference
    records = load_records(out, "all", _cfg(**{"data.prompts": out}))
    assert len(records) == 10 and sum(not r.has_reply for r in records) == 5
    # as SFT data: the first prompt-only record, named by the line it was prepared from
    first = next(r for r in pq.read_table(Path(out) / "train.parquet").to_pylist() if r["reference"])
    with pytest.raises(DataError, match=rf"{first['source']}: messages: expected at least one assistant.*row \d+ of"):
        load_records(out, "train", _cfg(**{"data.sft": out}))


# ---------------------------------------------------------------------------------------------------------------
# rlchat generate on a prompt-only file
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy checkpoint of 1 layer of width 32 and 64 positions (untrained: the plumbing is under test)."""
    tok = ChatTokenizer("cl100k_base", VOCAB)
    cfg = _cfg(**{"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.n_positions": 64})
    torch.manual_seed(0)
    model = PolicyValueModel.build(cfg, tok)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "step_1", model=model, tokenizer=tok, config=cfg, stage="sft", step=1
    )


def test_generate_on_a_prompt_only_messages_file(ray_local, ckpt: Path, tmp_path: Path) -> None:
    inp = _messages_file(tmp_path / "prompts.jsonl", 6)
    tok = ChatTokenizer("cl100k_base", VOCAB)
    prompts = read_prompts([inp], tok)
    assert [r.messages for r in prompts.rows] == [m for m, _ in _task_prompts(6)]
    assert all(r.input_reply is None and r.prompt_ids[-1] == tok.role_ids["assistant"] for r in prompts.rows)

    res = generate(ckpt, [inp], tmp_path / "out", SamplingParams(max_new_tokens=4, seed=1), n=2, progress=False)
    assert (res.prompts, res.samples, res.skipped) == (6, 12, [])
    rows = pq.read_table(tmp_path / "out" / PARQUET_FILE).to_pylist()
    assert [r["messages"] for r in rows[::2]] == [m for m, _ in _task_prompts(6)]
    assert all(r["input_reply"] is None and r["reference"] is not None and r["completion_tokens"] >= 1 for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# PPO on a prompt-only file
# ---------------------------------------------------------------------------------------------------------------

TINY = [
    *TINY_PPO,
    "ppo.update_epochs=1",
    "ppo.eval_prompts=8",
    *IN_PROCESS,
]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_ppo_trains_on_a_prompt_only_file_with_references(tmp_path: Path) -> None:
    prompts = _pair_file(tmp_path / "prompts.jsonl", 80, without_reference_every=5)
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [*TINY, f"data.prompts={prompts}", "ppo.iterations=2", "ppo.eval_every=2", "checkpoint.every=2"],
    )
    run, last = train(cfg, tmp_path / "run", quiet=True)
    lines = _metrics(run)
    assert [r["step"] for r in lines] == [1, 2]
    for key in ("rollout/reward_mean", "rollout/reward/verifiable", "ppo/policy_loss", "ppo/value_loss"):
        assert all(math.isfinite(r[key]) for r in lines), key
    assert "eval/reward_mean" in lines[1] and math.isfinite(lines[1]["eval/reward_mean"])
    assert (run / "checkpoints" / "step_000002" / "meta.json").is_file()


def test_ppo_trains_on_prompt_only_messages_without_references(tmp_path: Path) -> None:
    prompts = _messages_file(tmp_path / "prompts.jsonl", 40, reference=False)
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [*TINY, f"data.prompts={prompts}", "ppo.iterations=1", "ppo.eval_every=1", "reward.length=0.5"],
    )
    run, _ = train(cfg, tmp_path / "run", quiet=True)
    (line,) = _metrics(run)
    assert line["rollout/reward/verifiable"] == 0.0  # no reference: nothing to check against
    assert math.isfinite(line["rollout/reward_mean"]) and math.isfinite(line["ppo/value_loss"])
    assert math.isfinite(line["eval/reward_mean"])
