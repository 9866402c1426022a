"""`rlchat data prepare` through Ray Data on the shared local Ray, and `rlchat data stats`."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlchat.cli import main
from rlchat.cli.prepare_cmd import stats_command
from rlchat.config import Config, save_config
from rlchat.data import PREPARED_SCHEMA, Record, load_records
from rlchat.errors import DataError
from rlchat.prepare import format_stats_table, load_stats, prepare
from rlchat.tokenizer import ChatTokenizer

FIXTURES = Path(__file__).parent / "fixtures"


def _cfg() -> Config:
    return Config().replace(
        **{
            "tokenizer.vocab_size": 4096,
            "data.min_quality": 0.5,
            "data.val_fraction": 0.2,
            "data.near_dedup_threshold": 0.8,
        }
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file of each format (the ShareGPT one gzipped), plus two pairs that are near duplicates."""
    d = tmp_path_factory.mktemp("inputs")
    for f in (FIXTURES / "data_formats").iterdir():
        if f.name == "sharegpt.jsonl":
            (d / "sharegpt.jsonl.gz").write_bytes(gzip.compress(f.read_bytes()))
        else:
            shutil.copy(f, d / f.name)
    story = "The quick brown fox jumps over the lazy dog near the river bank today."
    near = [{"prompt": "Tell me a story.", "response": story}, {"prompt": "Tell me a story.", "response": story + "!"}]
    (d / "near_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in near))
    return d


@pytest.fixture(scope="module")
def prepared(ray_local, inputs: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("prepared")
    return prepare([inputs], out, _cfg(), progress=False)


def test_prepare_writes_parquet_stats_and_plot(prepared, inputs: Path) -> None:
    out, stats = prepared.out, prepared.stats
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "stats.png", "train.parquet", "val.parquet"]
    assert (out / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    # 19 lines: 5 messages (1 exact duplicate, 1 below min_quality 0.5), 3 sharegpt, 3 alpaca, 3 + 2 pair (1 near
    # duplicate), 3 preference
    assert stats["lines"] == 19 and stats["read"] == 19 and stats["skipped"] == 0
    assert stats["read_by_format"] == {"alpaca": 3, "messages": 5, "pair": 5, "preference": 3, "sharegpt": 3}
    assert stats["filtered"] == {"low_quality": 1}
    assert stats["duplicates_removed"] == {"exact": 1, "near": 1}
    assert stats["kept"] == 16 and stats["train"] == 13 and stats["val"] == 3
    assert stats["records_by_format"] == {"alpaca": 3, "messages": 3, "pair": 4, "preference": 3, "sharegpt": 3}
    assert stats["turns"]["max"] == 5 and stats["turns"]["min"] == 2
    assert stats["roles"] == {"system": 3, "user": 18, "assistant": 21}
    assert stats["tokenizer"]["vocab_size"] == 4096 and stats["filters"]["min_quality"] == 0.5
    assert stats["quality"]["count"] == 7 and stats["quality"]["missing"] == 9


def test_prepared_rows_hold_token_ids_and_match_the_core_path(prepared, inputs: Path) -> None:
    tok = ChatTokenizer("cl100k_base", 4096)
    train = pq.read_table(prepared.out / "train.parquet")
    assert train.schema.remove_metadata() == PREPARED_SCHEMA
    meta = json.loads(train.schema.metadata[b"rlchat"])
    assert meta["tokenizer"]["n_vocab"] == tok.n_vocab
    for row in train.to_pylist():
        rec = Record.from_row(row)
        if rec.is_preference:
            assert row["chosen_ids"] == tok.render_conversation(rec.messages + rec.chosen)[0]
            assert row["input_ids"] is None
        else:
            ids, mask = tok.render_conversation(rec.messages)
            assert row["input_ids"] == ids and row["loss_mask"] == mask and row["n_tokens"] == len(ids)
        assert row["prompt_ids"] == tok.render_prompt(rec.prompt_messages())
    # The Ray Data job and the in-process path (load_records on the raw files) agree on records and split.
    cfg = _cfg()
    for split in ("train", "val"):
        assert load_records(str(prepared.out), split) == load_records(str(inputs), split, cfg)


def test_prepare_fails_at_the_first_bad_line_and_writes_nothing(ray_local, inputs: Path, tmp_path: Path) -> None:
    bad = tmp_path / "in"
    shutil.copytree(inputs, bad)
    shutil.copy(FIXTURES / "corrupted.jsonl", bad / "zz_corrupted.jsonl")
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare([bad], out, _cfg(), progress=False)
    assert str(e.value).startswith(f"{bad / 'zz_corrupted.jsonl'}:2: invalid JSON: ")
    assert not (out / "train.parquet").exists()


def test_prepare_applies_the_configured_max_line_bytes(ray_local, tmp_path: Path) -> None:
    # data.max_line_bytes reaches the driver's reader and the Ray Data tasks: a line under the 1 MiB default but
    # over a small configured limit is a bad record, and the error names the key, its value and a fix.
    small = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    big = {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "ok"}]}
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps(small) + "\n" + json.dumps(big) + "\n")
    cfg = _cfg().replace(**{"data.max_line_bytes": 4096, "data.val_fraction": 0.0})
    with pytest.raises(DataError) as e:
        prepare([f], tmp_path / "out", cfg, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: line is ") and "expected at most 4,096 bytes" in msg
    assert "data.max_line_bytes=4096" in msg and "data.max_line_bytes=8192" in msg
    assert not (tmp_path / "out" / "train.parquet").exists()
    # raised as the message says, the line is read
    result = prepare([f], tmp_path / "out", cfg.replace(**{"data.max_line_bytes": 8192}), progress=False)
    assert result.stats["kept"] == 2 and result.stats["skipped"] == 0


def test_prepare_command_skip_mode_reports_each_line(ray_local, tmp_path: Path, capsys) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    save_config(Config().replace(**{"tokenizer.vocab_size": 4096}), cfg_file)
    corrupted = str(FIXTURES / "corrupted.jsonl")
    code = main(
        ["data", "prepare", corrupted, "--out", str(tmp_path / "out"), "--on-error", "skip", "-c", str(cfg_file)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"skipped {corrupted}:2: invalid JSON" in printed
    assert f"skipped {corrupted}:3: messages[0].role: expected one of system, user, assistant" in printed
    assert f"skipped {corrupted}:4: bytes are not valid UTF-8 at byte 47 (0xe9)" in printed
    assert "skipped 3 bad record(s)" in printed
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["skipped"] == 3 and stats["kept"] == 2
    assert [s["source"] for s in stats["skipped_lines"]] == [f"{corrupted}:{i}" for i in (2, 3, 4)]
    # fail mode through the CLI: exit code 2 and one clean error line naming file:line
    code = main(["data", "prepare", corrupted, "--out", str(tmp_path / "out2"), "-c", str(cfg_file)])
    assert code == 2
    err = capsys.readouterr().err  # the progress bar shares stderr
    assert f"\nerror: {corrupted}:2: invalid JSON" in err and "Traceback" not in err


def test_stats_command_prints_the_table(prepared, capsys) -> None:
    assert stats_command(str(prepared.out)) == 0
    out = capsys.readouterr().out
    assert "read 19  skipped 0  filtered 1  duplicates 2  kept 16 (train 13, val 3)" in out
    for row in ("messages", "preference", "turns per record", "tokens / conversation", "assistant turns"):
        assert row in out
    assert "low_quality 1" in out and "exact 1  near 1" in out and "roles (messages)      system 3" in out
    assert "quality               n 7  missing 9  min 0.60" in out
    # stats.json path and a directory without stats.json (computed from the Parquet files) work too
    assert load_stats(prepared.out / "stats.json")["kept"] == 16
    no_json = prepared.out.parent / "no_json"
    no_json.mkdir(exist_ok=True)
    shutil.copy(prepared.out / "train.parquet", no_json / "train.parquet")
    assert "records               13 (train 13, val 0)" in format_stats_table(load_stats(no_json))
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_stats(prepared.out.parent)
