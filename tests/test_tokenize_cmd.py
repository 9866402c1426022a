"""``rlchat tokenize``: ids equal ChatTokenizer's, pieces shown safely, the chat loss mask marked exactly."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from rlchat.errors import DataError, TokenizerError
from rlchat.tokenize_cmd import parse_chat, read_input, render_marked, token_rows, tokenize_command
from rlchat.tokenizer import ChatTokenizer

TEXT = "Hello, wörld 👋 <|end|>\nbye"
CHAT = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4 👍"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base")


def _field(out: str, name: str) -> list[int]:
    """The list printed on the ``name: [...]`` line."""
    line = next(x for x in out.splitlines() if x.startswith(f"{name}: ["))
    return ast.literal_eval(line.split(": ", 1)[1])


def _table(out: str) -> list[list[str]]:
    """Rows of the token table (after its header), split into columns (piece = rest of the line)."""
    lines = out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.split()[:2] == ["#", "id"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("tokens:"):
            break
        rows.append(line.split(None, len(header) - 1))
    return rows


def test_plain_ids_pieces_and_totals(tok, capsys):
    assert tokenize_command(TEXT, encoding=None, vocab_size=None, chat=False) == 0
    out = capsys.readouterr().out
    ids = tok.encode(TEXT)
    assert out.startswith("encoding: cl100k_base (n_vocab 100,277)")
    assert _field(out, "ids") == ids
    rows = _table(out)
    assert [int(r[1]) for r in rows] == ids
    assert [int(r[0]) for r in rows] == list(range(len(ids)))
    # Each piece is a Python literal of the token's exact bytes: str when valid UTF-8, bytes for part of a char.
    for r, i in zip(rows, ids):
        value = ast.literal_eval(r[3])
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        assert raw == tok.token_bytes(i) and int(r[2]) == len(raw)
    assert any(r[3].startswith("b'") for r in rows), "the emoji is split into byte tokens"
    assert "'\\n'" in out or "\\n" in out  # newlines are visible, not raw
    n_bytes = len(TEXT.encode())
    assert f"tokens: {len(ids)}  bytes: {n_bytes}  chars: {len(TEXT)}  bytes/token: {n_bytes / len(ids):.2f}" in out


def test_special_token_text_stays_plain(tok, capsys):
    tokenize_command("<|end|>", encoding=None, vocab_size=None, chat=False)
    ids = _field(capsys.readouterr().out, "ids")
    assert tok.eot_id not in ids and len(ids) > 1


def test_vocab_size_and_encoding_override(capsys):
    tokenize_command(TEXT, encoding="cl100k_base", vocab_size=4096, chat=False)
    out = capsys.readouterr().out
    assert out.startswith("encoding: cl100k_base@4096 (n_vocab 4,096)")
    ids = _field(out, "ids")
    assert ids == ChatTokenizer("cl100k_base", 4096).encode(TEXT)
    assert max(ids) < 4096


def test_file_input_equals_literal(tmp_path, capsys):
    f = tmp_path / "note.txt"
    f.write_text(TEXT, encoding="utf-8")
    assert read_input(str(f)) == (TEXT, str(f))
    assert read_input("not/a/file.txt") == ("not/a/file.txt", None)
    tokenize_command(str(f), encoding=None, vocab_size=None, chat=False)
    from_file = capsys.readouterr().out
    assert f"input: {f}" in from_file.splitlines()[0]
    tokenize_command(TEXT, encoding=None, vocab_size=None, chat=False)
    assert _field(from_file, "ids") == _field(capsys.readouterr().out, "ids")


def test_binary_file_is_a_clean_error(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_input(str(f))


def test_chat_mask_marks_exactly_the_assistant_tokens(tok, capsys):
    assert tokenize_command(json.dumps(CHAT), encoding=None, vocab_size=None, chat=True) == 0
    out = capsys.readouterr().out
    ids, mask = tok.render_conversation(CHAT)
    assert _field(out, "ids") == ids and _field(out, "mask") == mask
    # Independently: per message, the role token is never trained; assistant text + <|end|> always is.
    expected = []
    for m in CHAT:
        n = len(tok.render_turn(m["role"], m["content"]))
        expected += [0] + [int(m["role"] == "assistant")] * (n - 1)
    assert mask == expected
    rows = _table(out)
    assert [int(r[2]) for r in rows] == expected  # the table's mask column
    assert [int(r[1]) for r in rows] == ids
    marked = next(x for x in out.splitlines() if x.startswith("<|system|>"))
    assert marked == (
        "<|system|>Be terse.<|end|><|user|>2+2?<|end|><|assistant|>[[4 👍<|end|>]]"
        "<|user|>and 3+3?<|end|><|assistant|>[[6<|end|>]]"
    )
    assert f"tokens: {len(ids)}  trained (mask 1): {sum(mask)}  special: 10" in out


def test_render_marked_keeps_split_characters_whole(tok):
    ids, mask = tok.render_conversation([{"role": "assistant", "content": "👋👋"}])
    assert render_marked(tok, ids, mask) == "<|assistant|>[[👋👋<|end|>]]"
    rows = token_rows(tok, ids, mask)
    assert rows[0].special and rows[0].piece == "<|assistant|>" and rows[0].mask == 0
    assert rows[-1].piece == "<|end|>" and rows[-1].mask == 1


def test_parse_chat_forms():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert parse_chat(json.dumps(msgs)) == (msgs, None)
    assert parse_chat(json.dumps({"messages": msgs, "id": 3})) == (msgs, None)
    assert parse_chat(json.dumps({"prompt": "hi", "response": "hello"})) == (msgs, None)
    assert parse_chat(json.dumps({"prompt": "hi"})) == (msgs[:1], None)
    assert parse_chat("just text") == ([{"role": "user", "content": "just text"}], None)
    # JSONL: the first record.
    jsonl = "\n".join(json.dumps({"messages": m}) for m in (msgs, msgs[:1])) + "\n"
    got, note = parse_chat(jsonl, "chats.jsonl")
    assert got == msgs and "first record" in note
    # Text that only looks like JSON is one user message, with a note saying so.
    got, note = parse_chat("[not json", None)
    assert got == [{"role": "user", "content": "[not json"}] and "not valid JSON" in note


def test_parse_chat_errors_name_the_place():
    with pytest.raises(DataError, match=r"chats.jsonl:1: message 1 has role 'bot'; expected one of system, user"):
        parse_chat('{"messages": [{"role": "bot", "content": "x"}]}\n{}\n', "chats.jsonl")
    with pytest.raises(DataError, match=r"input: message 1 is .*expected \{\"role\""):
        parse_chat('[{"role": "user"}]')
    with pytest.raises(DataError, match=r"chat.json:1: not valid JSON"):
        parse_chat("{oops", "chat.json")
    with pytest.raises(DataError, match="expected a JSON list of messages"):
        parse_chat('{"text": "x"}')


def test_chat_from_jsonl_file(tmp_path, tok, capsys):
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"messages": CHAT[:3]}) + "\n" + json.dumps({"messages": CHAT}) + "\n", encoding="utf-8")
    tokenize_command(str(f), encoding=None, vocab_size=None, chat=True)
    captured = capsys.readouterr()
    assert _field(captured.out, "ids") == tok.render_conversation(CHAT[:3])[0]
    assert "first record" in captured.err


def test_bad_encoding_raises_tokenizer_error():
    with pytest.raises(TokenizerError, match="unknown tiktoken encoding"):
        tokenize_command("hi", encoding="no_such_base", vocab_size=None, chat=False)


def _cli(*args: str, cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlchat.cli", "tokenize", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def test_cli_tokenize_subprocess(tmp_path, tok):
    """The real CLI wiring: a chat file tokenizes; a bad encoding is one error line with exit code 2."""
    f = tmp_path / "chat.json"
    f.write_text(json.dumps(CHAT), encoding="utf-8")
    ok = _cli("--chat", str(f), cwd=str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert _field(ok.stdout, "mask") == tok.render_conversation(CHAT)[1]
    bad = _cli("--encoding", "no_such_base", "hi", cwd=str(tmp_path))
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.startswith("error: tokenizer.encoding='no_such_base': unknown tiktoken encoding")
    assert "Traceback" not in bad.stderr


def test_bad_chat_input_prints_nothing_before_the_error(capsys):
    with pytest.raises(DataError, match="message 1 has role 'bot'"):
        tokenize_command('[{"role": "bot", "content": "x"}]', encoding=None, vocab_size=None, chat=True)
    assert capsys.readouterr().out == ""
