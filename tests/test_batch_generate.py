"""`rlchat generate`: prompt parsing, shards, one batch in process, the Ray Data job, resume after SIGKILL.

The Ray tests share the session's local Ray (``ray_local``); the kill-and-resume test runs the real CLI in
subprocesses connected to that instance, so no second Ray is started (and none is left behind by the SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlchat.batch_generate import (
    cut_at_stop,
    derive_sample_seed,
    generate,
    generate_rows,
    output_schema,
    plan_shards,
    prompt_of,
    read_prompts,
    shard_input_rows,
)
from rlchat.checkpoint import load_policy, read_checkpoint, save_checkpoint
from rlchat.config import Config, load_config
from rlchat.data import Record, parse_record
from rlchat.distributed.shard_store import JSONL_FILE, MANIFEST_FILE, PARQUET_FILE, ShardStore, settings_differences
from rlchat.errors import ConfigError, DataError
from rlchat.generation import GenerationEngine, SamplingParams
from rlchat.model import PolicyValueModel
from rlchat.rewards import RewardFunction
from rlchat.tokenizer import ChatTokenizer

VOCAB = 4096
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", VOCAB)


@pytest.fixture(scope="module")
def ckpt(tok: ChatTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-size policy checkpoint: 4096-token vocabulary, 1 layer of width 32, 64 positions."""
    cfg = Config().replace(
        **{
            "tokenizer.vocab_size": VOCAB,
            "model.n_layer": 1,
            "model.n_embd": 32,
            "model.n_head": 2,
            "model.n_positions": 64,
            "reward.length": 0.5,  # two reward components: verifiable and length
            "reward.length_max": 4,
        }
    )
    torch.manual_seed(0)
    model = PolicyValueModel.build(cfg, tok)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "step_1", model=model, tokenizer=tok, config=cfg, stage="sft", step=1
    )


@pytest.fixture(scope="module")
def demo_ckpt(tok: ChatTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the demo's model: configs/demo.yaml as is (2 layers of width 64, 4 heads, 256 positions,
    the 4096-token vocabulary), untrained -- the size, not the weights, is what the 1,000-prompt test needs."""
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    torch.manual_seed(0)
    model = PolicyValueModel.build(cfg, tok)
    return save_checkpoint(
        tmp_path_factory.mktemp("demo_ckpt") / "step_60", model=model, tokenizer=tok, config=cfg, stage="ppo", step=60
    )


def _write_prompts(path: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    lines = [json.dumps({"prompt": f"What is {i} + {i % 7}?", "reference": str(i + i % 7), "id": i}) for i in range(n)]
    for index, text in (bad or {}).items():
        lines[index] = text
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Records and prompts (no Ray, no model)
# ---------------------------------------------------------------------------------------------------------------


def parse_prompt_record(obj: dict, source: str = "", fmt: str = "auto") -> Record:
    """What read_prompts does with each line: data's reply-optional path (no placeholder reply)."""
    return parse_record(obj, source, fmt, require_reply=False)


def test_prompt_only_and_reply_less_records_parse_with_datas_validation() -> None:
    rec = parse_prompt_record({"prompt": " Hi\r\nthere ", "reference": "x", "id": 7}, "f.jsonl:1")
    assert rec.messages == [{"role": "user", "content": "Hi\nthere"}]  # normalised by rlchat.data
    assert (rec.format, rec.reference, rec.meta, rec.source) == ("pair", "x", {"id": 7}, "f.jsonl:1")

    rec = parse_prompt_record(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "Q"}]}
    )
    assert [m["role"] for m in rec.messages] == ["system", "user"] and rec.format == "messages"
    rec = parse_prompt_record({"conversations": [{"from": "human", "value": "Q?"}]})
    assert rec.messages == [{"role": "user", "content": "Q?"}] and rec.format == "sharegpt"
    rec = parse_prompt_record({"instruction": "Translate.", "input": "Hello"})
    assert rec.messages == [{"role": "user", "content": "Translate.\n\nHello"}] and rec.format == "alpaca"
    rec = parse_prompt_record({"prompt": "Hi", "system": "Be kind."})
    assert rec.messages == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]

    # records with replies are data's records, unchanged; data's errors are kept
    rec = parse_prompt_record({"prompt": "Q", "response": "A"})
    assert rec.messages[-1] == {"role": "assistant", "content": "A"}
    with pytest.raises(ValueError, match=r"messages\[0\]\.role: expected one of system, user, assistant.*'robot'"):
        parse_prompt_record({"messages": [{"role": "robot", "content": "Hi"}]})
    with pytest.raises(ValueError, match=r"prompt: expected non-empty text"):
        parse_prompt_record({"prompt": "   "})
    with pytest.raises(ValueError, match=r"record: expected the keys of a known format"):
        parse_prompt_record({"question": "Hi"})
    with pytest.raises(ValueError, match=r"end with the user turn the policy answers, found roles \[system\]"):
        parse_prompt_record({"messages": [{"role": "system", "content": "Be brief."}]})


def test_prompt_of_answers_the_last_user_turn_and_keeps_the_input_reply() -> None:
    u1, a1, u2, a2 = (
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    )
    assert prompt_of(parse_prompt_record({"messages": [u1, a1, u2, a2]})) == ([u1, a1, u2], "6")
    assert prompt_of(parse_prompt_record({"messages": [u1, a1, u2]})) == ([u1, a1, u2], None)
    assert prompt_of(parse_prompt_record({"prompt": "2+2?", "chosen": "4", "rejected": "5"})) == ([u1], None)


def test_read_prompts_fails_with_file_line_or_skips_and_reports(tmp_path: Path, tok: ChatTokenizer) -> None:
    long_prompt = json.dumps({"prompt": "word " * 200})
    path = _write_prompts(
        tmp_path / "p.jsonl", 6, {1: "{not json", 3: '{"messages": [{"role": "bot"}]}', 4: long_prompt}
    )
    with pytest.raises(DataError, match=rf"(?s){path}:2: invalid JSON.*--on-error skip"):
        read_prompts([path], tok, max_prompt_tokens=40)

    got = read_prompts([path], tok, on_error="skip", max_prompt_tokens=40)
    assert [s.source for s in got.skipped] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "content" in got.skipped[1].reason  # data's message: the missing key
    assert "expected at most 40 tokens" in got.skipped[2].reason and "--max-tokens" in got.skipped[2].reason
    assert [r.row for r in got.rows] == [0, 1, 2]  # kept rows are numbered consecutively
    assert [r.record.source for r in got.rows] == [f"{path}:1", f"{path}:3", f"{path}:6"]
    first = got.rows[0]
    assert first.prompt_ids == tok.render_prompt([{"role": "user", "content": "What is 0 + 0?"}])
    assert first.prompt_ids[-1] == tok.role_ids["assistant"]


def test_shards_are_deterministic_and_hash_their_rows(tmp_path: Path, tok: ChatTokenizer) -> None:
    rows = read_prompts([_write_prompts(tmp_path / "a.jsonl", 10)], tok).rows
    shards = plan_shards(rows, 4)
    assert [len(s.rows) for s in shards] == [4, 4, 2] and [s.index for s in shards] == [0, 1, 2]
    assert [s.input_hash for s in shards] == [s.input_hash for s in plan_shards(rows, 4)]
    edited = read_prompts([_write_prompts(tmp_path / "b.jsonl", 10, {5: json.dumps({"prompt": "changed"})})], tok)
    changed = [a.input_hash != b.input_hash for a, b in zip(shards, plan_shards(edited.rows, 4))]
    assert changed == [False, True, False]
    with pytest.raises(ConfigError, match="shard_rows=0"):
        plan_shards(rows, 0)
    # a sample's seed depends only on (seed, row, sample)
    assert derive_sample_seed(3, 5, 1) == derive_sample_seed(3, 5, 1) != derive_sample_seed(3, 5, 0)


def test_cut_at_stop_and_settings_differences() -> None:
    assert cut_at_stop("a, b. c.", [".", ","]) == "a"
    assert cut_at_stop("abc", ["x"]) == "abc" and cut_at_stop("abc", []) == "abc"
    # cut where the first stop string completes, as the Serve endpoint cuts a reply (rlchat.text_stream)
    assert cut_at_stop("abcd", ["abcd", "bc"]) == "a"
    assert cut_at_stop("The result</answer> trailing", ["</answer>", "answer"]) == "The result</"
    old = {"n": 1, "sampling": {"temperature": 0.7, "top_k": 0}}
    assert settings_differences(old, {"n": 1, "sampling": {"temperature": 1.0, "top_k": 0}}) == [
        "sampling.temperature: 0.7 -> 1.0"
    ]


# ---------------------------------------------------------------------------------------------------------------
# One batch, in process (what each Ray Data actor runs)
# ---------------------------------------------------------------------------------------------------------------


def test_generate_rows_columns_counts_logprobs_rewards_and_batch_independence(ckpt: Path, tmp_path: Path) -> None:
    model, tok, info = load_policy(ckpt)
    engine = GenerationEngine(model.eval(), tok)
    reward_fn = RewardFunction(info.config.reward, tok)
    prompts = read_prompts([_write_prompts(tmp_path / "p.jsonl", 5)], tok)
    items = shard_input_rows(plan_shards(prompts.rows, 8)[0], with_record=True)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_strings=(" the",))
    schema = output_schema(logprobs=True, reward_components=reward_fn.component_names)
    out = generate_rows(engine, params, pa.Table.from_pylist(items), 3, 11, schema, reward_fn)

    assert out.schema == schema and out.num_rows == 15
    rows = out.to_pylist()
    assert [(r["row"], r["sample"]) for r in rows] == [(i, s) for i in range(5) for s in range(3)]
    for r in rows:
        assert r["seed"] == derive_sample_seed(11, r["row"], r["sample"])
        assert r["messages"] == prompts.rows[r["row"]].messages and r["meta"] == json.dumps({"id": r["row"]})
        assert r["prompt_tokens"] == len(prompts.rows[r["row"]].prompt_ids)
        assert 1 <= r["completion_tokens"] == len(r["completion_ids"]) == len(r["logprobs"]) <= 6
        assert all(lp <= 0 for lp in r["logprobs"])
        assert r["finish_reason"] in ("stop", "length")
        assert " the" not in r["reply"]
        assert r["reply"] in tok.decode(r["completion_ids"], skip_special=True)
        assert set(r["reward_components"]) == {"verifiable", "length"}
        total = r["reward_components"]["verifiable"] + 0.5 * r["reward_components"]["length"]
        assert r["reward"] == pytest.approx(total)
    assert len({r["reply"] for r in rows}) > 5  # different seeds, different samples

    # the same (row, sample) gives the same reply whatever else is in the batch
    alone = generate_rows(engine, params, pa.Table.from_pylist(items[3:4]), 3, 11, schema, reward_fn).to_pylist()
    assert [r["completion_ids"] for r in alone] == [r["completion_ids"] for r in rows[9:12]]


# ---------------------------------------------------------------------------------------------------------------
# The Ray Data job (shared local Ray)
# ---------------------------------------------------------------------------------------------------------------


def _stat(store: ShardStore) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(store.shards_dir.glob("part-*.parquet"))}


def test_generate_on_ray_writes_outputs_resumes_and_rejects_other_settings(
    ray_local, ckpt: Path, tmp_path: Path
) -> None:
    inp = _write_prompts(tmp_path / "in.jsonl", 20, {4: '{"prompt": 5}'})
    out = tmp_path / "out"
    params = SamplingParams(max_new_tokens=5, temperature=0.8, seed=5)
    kw = dict(n=2, batch_size=6, concurrency=2, jsonl=True, logprobs=True, rewards=True, on_error="skip")
    res = generate(ckpt, [inp], out, params, shard_rows=4, progress=False, **kw)

    # 1. complete outputs: 19 prompts x 2 samples, in (row, sample) order, Parquet and JSONL alike
    assert (res.prompts, res.samples, res.shards, res.shards_reused) == (19, 38, 5, [])
    assert res.shards_generated == [0, 1, 2, 3, 4]
    assert [s.source for s in res.skipped] == [
        f"{inp}:5"
    ] and "prompt: expected a list of message objects, found a number" in res.skipped[0].reason
    table = pq.read_table(out / PARQUET_FILE)
    assert table.num_rows == 38
    keys = list(zip(table.column("row").to_pylist(), table.column("sample").to_pylist()))
    assert keys == [(r, s) for r in range(19) for s in range(2)]
    assert table.column("source").to_pylist()[8] == f"{inp}:6"  # row 4 is line 6: line 5 was skipped
    jsonl = [json.loads(line) for line in (out / JSONL_FILE).read_text(encoding="utf-8").splitlines()]
    assert jsonl == table.to_pylist()
    assert set(jsonl[0]) >= {"messages", "reply", "finish_reason", "logprobs", "reward", "reward_components"}
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "complete" and manifest["skipped"] == 1
    assert manifest["totals"]["samples"] == 38
    assert manifest["totals"]["completion_tokens"] == sum(table.column("completion_tokens").to_pylist())
    assert sorted(manifest["outputs"]) == [JSONL_FILE, PARQUET_FILE]

    # 2. a rerun generates nothing and leaves every shard file untouched
    store = ShardStore(out)
    before = _stat(store)
    again = generate(ckpt, [inp], out, params, shard_rows=4, progress=False, **kw)
    assert (again.shards_reused, again.shards_generated, again.generate_seconds) == ([0, 1, 2, 3, 4], [], 0.0)
    assert _stat(store) == before and pq.read_table(out / PARQUET_FILE).equals(table)

    # 3. lost shards are regenerated -- only those, identical to before (per-sample seeds; the seed is kept)
    for name in ("part-00001.parquet", "part-00003.parquet"):
        (store.shards_dir / name).unlink()
    kept = {k: v for k, v in before.items() if k not in ("part-00001.parquet", "part-00003.parquet")}
    params_no_seed = SamplingParams(max_new_tokens=5, temperature=0.8)  # the earlier run's seed is reused
    kw2 = {**kw, "batch_size": 4, "concurrency": 1}  # batching and concurrency may change between runs
    third = generate(ckpt, [inp], out, params_no_seed, shard_rows=4, progress=False, **kw2)
    assert (third.shards_reused, third.shards_generated) == ([0, 2, 4], [1, 3])
    assert {k: v for k, v in _stat(store).items() if k in kept} == kept
    regenerated = pq.read_table(out / PARQUET_FILE)
    assert regenerated.column("completion_ids").equals(table.column("completion_ids"))
    runs = json.loads((out / MANIFEST_FILE).read_text())["runs"]
    assert [(r["reused"], r["generated"]) for r in runs] == [
        ([], [0, 1, 2, 3, 4]),  # in shard order, though shards 3 and 4 may finish in either order (concurrency 2)
        ([0, 1, 2, 3, 4], []),
        ([0, 2, 4], [1, 3]),
    ]

    # 4. other settings into the same directory: refused, naming what differs
    with pytest.raises(ConfigError, match=r"other settings \(sampling\.temperature: 0\.8 -> 1\.0\).*new --output"):
        generate(ckpt, [inp], out, SamplingParams(max_new_tokens=5, temperature=1.0), shard_rows=4, **kw)


def test_generate_fails_on_a_bad_record_before_starting_any_work(ckpt: Path, tmp_path: Path) -> None:
    inp = _write_prompts(tmp_path / "in.jsonl", 5, {2: '{"messages": []}'})
    with pytest.raises(DataError, match=rf"{inp}:3: messages: expected at least one message"):
        generate(ckpt, [inp], tmp_path / "out", SamplingParams(max_new_tokens=4), progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"--beams 2 with --n 3"):
        generate(ckpt, [inp], tmp_path / "out", SamplingParams(num_beams=2), n=3)
    with pytest.raises(ConfigError, match=r"leaves no room for a prompt in the model's 64 positions"):
        generate(ckpt, [inp], tmp_path / "out", SamplingParams(max_new_tokens=64))


def _cli(ckpt: Path, inp: Path, out: Path, address: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rlchat.cli",
        "generate",
        str(ckpt),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--n",
        "2",
        "--batch-size",
        "8",
        "--max-tokens",
        "8",
        "--seed",
        "1",
        "--address",
        address,
    ]


def test_cli_generate_1000_prompts_killed_halfway_resumes_without_regenerating(
    ray_local, demo_ckpt: Path, tmp_path: Path
) -> None:
    """Issue 8's "Done when" with a demo-size checkpoint: complete outputs; SIGKILL once some shards exist; the
    rerun only fills the gaps."""
    ckpt = demo_ckpt
    model_cfg = read_checkpoint(ckpt).config.model
    assert model_cfg == load_config(ROOT / "configs" / "demo.yaml").model  # the demo's model, not a smaller one
    inp = _write_prompts(tmp_path / "prompts.jsonl", 1000)
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    store_dir = out / "shards"

    # 1. start, wait for the first finished shard, SIGKILL the driver
    log = tmp_path / "first_run.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(_cli(ckpt, inp, out, address), cwd=ROOT, env=env, stdout=fh, stderr=fh)
        try:
            deadline = time.monotonic() + 240
            while not list(store_dir.glob("part-*.parquet")):
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "no shard was written within 240 s"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    store = ShardStore(out)
    killed = _stat(store)
    assert 1 <= len(killed) < 4, f"the first run finished {len(killed)} of 4 shards before the kill"
    assert not (out / PARQUET_FILE).exists()
    assert json.loads((out / MANIFEST_FILE).read_text())["status"] == "running"

    # 2. rerun the same command: it completes, reusing the finished shards untouched
    done = subprocess.run(
        _cli(ckpt, inp, out, address), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"shards: 4 total, {len(killed)} already written, {4 - len(killed)} generated now" in done.stdout
    after = _stat(store)
    assert {k: after[k] for k in killed} == killed  # same inode, same mtime: not rewritten
    assert len(after) == 4 and not list(out.rglob(".*.tmp-*"))

    table = pq.read_table(out / PARQUET_FILE, columns=["row", "sample", "completion_tokens", "finish_reason"])
    pairs = list(zip(table.column("row").to_pylist(), table.column("sample").to_pylist()))
    assert len(pairs) == 2000 and len(set(pairs)) == 2000  # nothing lost, nothing twice
    assert pairs == [(r, s) for r in range(1000) for s in range(2)]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    reused = sorted(int(name[5:10]) for name in killed)
    assert manifest["runs"][-1]["reused"] == reused
    assert sorted(manifest["runs"][-1]["generated"]) == sorted(set(range(4)) - set(reused))
    assert manifest["status"] == "complete" and manifest["totals"]["samples"] == 2000
