"""`rlchat chat`: the commands (in-process), /probs against the engine's own log-probs, and the real program driven
through a pseudo-terminal (pexpect) with a local checkpoint and with the running Serve endpoint."""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pexpect
import pytest

from rlchat.chat import (
    ChatSession,
    Decoding,
    LocalBackend,
    RemoteBackend,
    Reply,
    chat_command,
    format_probs,
    token_alternatives,
)
from rlchat.data import read_records
from rlchat.errors import RLChatError
from rlchat.generation import SamplingParams
from rlchat.tokenizer import fit_history
from serve import testing

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return testing.make_tiny_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", n_positions=128)


@pytest.fixture(scope="module")
def local(ckpt) -> LocalBackend:
    return LocalBackend(str(ckpt))


class FakeBackend:
    """Echoes the last user message: the commands are tested without a model."""

    def __init__(self) -> None:
        self.last = Reply()
        self.calls: list[tuple[list[dict[str, str]], Decoding]] = []
        self.conversations = 1  # new_conversation() calls (/reset, /load) plus the first

    def describe(self) -> str:
        return "fake"

    def new_conversation(self) -> None:
        self.conversations += 1

    def stream(self, messages, d):
        self.calls.append((messages, d))
        self.last = Reply(text=f"echo: {messages[-1]['content']}", finish_reason="stop")
        yield self.last.text


def _session(system: str | None = None) -> tuple[ChatSession, io.StringIO, FakeBackend]:
    out = io.StringIO()
    backend = FakeBackend()
    return ChatSession(backend, Decoding(), system, out), out, backend  # type: ignore[arg-type]


def _run(session: ChatSession, lines: list[str]) -> int:
    it = iter(lines)

    def read(prompt: str) -> str:
        session.out.write(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return session.run(read)


def test_commands_change_settings_and_bad_arguments_get_one_line(tmp_path):
    s, out, backend = _session()
    lines = [
        "/temp 0.3",
        "/top_p 0.9",
        "/top_k 40",
        "/max_tokens 20",
        "/beams 3",
        "/temp warm",
        "/temp 9",
        "/top_p 0",
        "/top_k -1",
        "/max_tokens 1.5",
        "/beams",
        "/nope",
        "/regenerate",
        "hello",
    ]
    assert _run(s, lines) == 0
    text = out.getvalue()
    assert s.decoding == Decoding(temperature=0.3, top_k=40, top_p=0.9, max_tokens=20, beams=3)
    assert backend.calls[-1][1] == s.decoding  # the reply used the changed settings
    for expected in (
        "/temp expects a number in [0, 2], e.g. /temp 0.7 (got 'warm')",
        "/temp expects a number in [0, 2], e.g. /temp 0.7 (got 9)",
        "/top_p expects a number in (0, 1]",
        "/top_k expects an integer in [0, 100000]",
        "/max_tokens expects an integer in [1, 100000], e.g. /max_tokens 128 (got '1.5')",
        "/beams expects an integer in [1, 8], e.g. /beams 4",
        "unknown command /nope; /help lists the commands",
        "/regenerate needs a message to answer",
    ):
        assert expected in text, expected
    assert "Traceback" not in text


def test_conversation_system_regenerate_history_save_load(tmp_path):
    s, out, backend = _session(system="be brief")
    path = tmp_path / "conv.jsonl"
    assert _run(s, ["hi", "second\\", "line", "/regenerate", "/history", f"/save {path}", "/reset", "/history"]) == 0
    assert backend.calls[1][0] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "echo: hi"},
        {"role": "user", "content": "second\nline"},  # a line ending in \ continues
    ]
    assert len(backend.calls) == 3 and backend.calls[2][0] == backend.calls[1][0]  # /regenerate re-asks
    saved = json.loads(path.read_text())["messages"]  # one line
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert read_records([path]).records[0].messages == saved  # a saved chat is a data record for `rlchat data`
    assert "(empty conversation)" not in out.getvalue().split("(new conversation)")[0]

    s2, out2, _ = _session()
    assert _run(s2, [f"/load {path}", "/history", '"""', "multi", "line", '"""', "/system", "/system none"]) == 0
    assert s2.system == "" and s2.turns[:4] == saved[1:]
    assert s2.turns[4] == {"role": "user", "content": "multi\nline"}
    assert "system prompt: 'be brief'" in out2.getvalue()

    _run(s2, [f"/save {path}"])  # .jsonl: appended
    assert len(read_records([path]).records) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}')
    s3, out3, _ = _session()
    _run(s3, [f"/load {bad}", f"/load {tmp_path / 'missing.json'}", "/save", f"/save {tmp_path}/no/such/dir/x"])
    text = out3.getvalue()
    assert "message 0 must be" in text and "cannot read" in text and "/save expects a file name" in text
    assert "cannot write" in text and "Traceback" not in text


def test_probs_and_why_need_a_local_checkpoint_and_a_reply():
    s, out, _ = _session()
    _run(s, ["/probs", "hi", "/why", "/probs 0"])
    text = out.getvalue()
    assert "/probs needs a local checkpoint" in text and "/why needs a local checkpoint" in text
    assert "/probs expects an integer in [1, 50]" in text


def test_probs_and_why_explain_only_the_reply_on_screen(local, tmp_path):
    """After /load, the last assistant turn is the loaded one, not what the model generated last: /probs and /why
    must refuse rather than explain a reply that is no longer in the conversation."""
    out = io.StringIO()
    s = ChatSession(local, Decoding(max_tokens=6, temperature=0.0), None, out)
    saved = tmp_path / "a.json"
    _run(s, ["first question", f"/save {saved}", "/max_tokens 3", "second question", "/probs 1"])
    assert "alternatives" in out.getvalue()  # a table for the reply on screen
    out.truncate(0), out.seek(0)
    _run(s, [f"/load {saved}", "/probs 1", "/why"])
    text = out.getvalue()
    assert "/probs explains the last reply" in text and "/why explains the last reply" in text, text


def test_token_alternatives_match_the_engines_greedy_logprobs(local):
    tok = local.tokenizer
    prompt = tok.render_prompt([{"role": "user", "content": "Name a fruit."}])
    res = local.engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0))
    reply, logprobs = res.tokens[0], res.logprobs[0]
    rows = token_alternatives(local.model, tok, prompt, reply, k=4)
    assert [r.token_id for r in rows] == reply
    for r, lp in zip(rows, logprobs):
        assert math.isclose(r.prob, math.exp(lp), rel_tol=1e-4)  # greedy log-probs are the model's own
        assert r.alternatives[0][0] == r.token_id  # greedy picked the most likely token
        probs = [p for _, _, p in r.alternatives]
        assert probs == sorted(probs, reverse=True) and len(probs) == 4 and sum(probs) <= 1 + 1e-6
    table = format_probs(rows)
    assert table.splitlines()[0].split() == ["#", "token", "p", "alternatives"] and len(table.splitlines()) == 9


def test_chat_command_rejects_bad_flags_and_targets(tmp_path):
    with pytest.raises(RLChatError, match="--temperature=3"):
        chat_command(str(tmp_path), temperature=3.0)
    with pytest.raises(RLChatError, match="--beams=0"):
        chat_command(str(tmp_path), beams=0)
    with pytest.raises(RLChatError, match="no such checkpoint"):
        chat_command(str(tmp_path / "missing"))
    with pytest.raises(RLChatError, match="cannot connect"):
        chat_command(f"http://127.0.0.1:{testing.free_port()}")
    with pytest.raises(RLChatError, match="--api-key-file"):  # a key file that cannot be read: one line
        chat_command(f"http://127.0.0.1:{testing.free_port()}", api_key_file=str(tmp_path / "no-key"))


# `rlchat chat` with each generated token after the first held back by TOKEN_DELAY_S (argv[1]): a reply then takes
# long enough that a test can tell streamed output (text arriving token by token) from a reply printed at once.
SLOW_CHAT = """
import sys, time
from rlchat import generation
from rlchat.cli import main

delay = float(sys.argv[1])
plain_stream = generation.GenerationEngine.stream

def slow_stream(self, prompt, params):
    for i, item in enumerate(plain_stream(self, prompt, params)):
        if i:
            time.sleep(delay)
        yield item

generation.GenerationEngine.stream = slow_stream
sys.exit(main(["chat", *sys.argv[2:]]))
"""
TOKEN_DELAY_S = 0.4


def _spawn(*args: str, token_delay_s: float | None = None) -> pexpect.spawn:
    argv = ["-m", "rlchat.cli", "chat", *args]
    if token_delay_s is not None:
        argv = ["-c", SLOW_CHAT, str(token_delay_s), *args]
    child = pexpect.spawn(
        sys.executable,
        argv,
        cwd=str(ROOT),
        env={**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"},
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    child.expect("type a message")
    child.banner = child.before  # type: ignore[attr-defined]
    child.expect("you> ")
    return child


def _say(child: pexpect.spawn, line: str, until: str = "you> ") -> str:
    child.sendline(line)
    child.expect_exact(until)
    return child.before


NOTES = (" [max_tokens reached]", " [interrupted]", " [withheld by the safety filter]")


def _reply_text(out: str) -> str:
    """The reply in the output of one turn: what follows ``assistant> ``, without the trailing note."""
    assert "assistant> " in out, out
    text = out.split("assistant> ", 1)[1].rstrip("\r\n")
    for note in NOTES:
        text = text.removesuffix(note)
    return text


def test_terminal_chat_with_a_local_checkpoint_through_a_pty(ckpt, tmp_path):
    child = _spawn(str(ckpt), "--max-tokens", "6", "--seed", "0", "--system", "You are terse.")
    try:
        assert f"rlchat chat with {ckpt} (sft checkpoint, step 1)" in child.banner
        out = _say(child, "Hello there")
        assert _reply_text(out).strip(), out  # the model said something (an untrained one: 6 tokens of noise)
        out = _say(child, "/temp hot")
        assert "/temp expects a number" in out
        out = _say(child, "/probs 3")
        assert "alternatives" in out and len([x for x in out.splitlines() if x.strip()[:1].isdigit()]) >= 1
        out = _say(child, "/why")
        assert "reward" in out and "verifiable" in out
        child.sendline("first line\\")
        child.expect_exact("...> ")
        _say(child, "second line")
        out = _say(child, "/history")
        assert "1 system: You are terse." in out and "first line" in out and "second line" in out
        path = tmp_path / "c.json"
        out = _say(child, f"/save {path}")
        assert "saved 5 messages" in out
        out = _say(child, "/beams 2")
        out = _say(child, "/regenerate")
        assert "assistant> " in out
        out = _say(child, "/load /nonexistent/file.json")
        assert "cannot read" in out
        assert "Traceback" not in child.before
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert json.loads(path.read_text())["messages"][2]["role"] == "assistant"


def test_terminal_chat_streams_the_reply_as_it_is_generated(ckpt):
    """The reply's first text is on the terminal while the rest is still being generated.

    Generation is slowed to one token per TOKEN_DELAY_S, so an 8-token reply takes ~3 s: printed at once (buffered,
    or generated in full before printing) it would arrive in one read, just before the next prompt.
    """
    n_tokens = 8
    child = _spawn(str(ckpt), "--max-tokens", str(n_tokens), "--seed", "0", token_delay_s=TOKEN_DELAY_S)
    try:
        child.sendline("Tell me a story.")
        child.expect_exact("assistant> ")
        arrivals: list[tuple[float, str]] = [(time.monotonic(), child.buffer)] if child.buffer else []
        while "you> " not in "".join(text for _, text in arrivals):
            arrivals.append((time.monotonic(), child.read_nonblocking(4096, timeout=60)))
        end = arrivals[-1][0]
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    full = "".join(text for _, text in arrivals)
    reply = _reply_text("assistant> " + full.rsplit("you> ", 1)[0])
    assert reply.strip(), full
    # the first read that carried visible reply text: what had arrived by then begins the reply, and the rest of
    # the reply (and the next prompt) came later, while the later tokens were being generated
    k = next(i for i, (_, text) in enumerate(arrivals) if text.strip())
    first_at, so_far = arrivals[k][0], "".join(text for _, text in arrivals[: k + 1])
    assert "you> " not in so_far and reply.startswith(so_far) and len(so_far) < len(reply), arrivals
    assert end - first_at >= 2 * TOKEN_DELAY_S, arrivals
    with_text = [text for _, text in arrivals if text.strip() and "you> " not in text]
    assert len(with_text) >= 2, arrivals  # the reply came in several pieces, not in one write


@pytest.fixture(scope="session")
def serve_app(ray_local, tmp_path_factory) -> testing.TestApp:
    """The session's shared Serve app (deployed once, whichever test module asks first)."""
    yield testing.shared_app(tmp_path_factory.mktemp("serve_app"))
    testing.shutdown()


@pytest.mark.slow
def test_terminal_chat_with_the_endpoint_through_a_pty(serve_app):
    app = serve_app
    child = _spawn(app.url, "--api-key", app.api_key, "--max-tokens", "5", "--seed", "1", "--stop", "zzqq")
    try:
        assert f"rlchat chat with {app.url} (model rlchat, step 1)" in child.banner
        out = _say(child, "Hi!")
        assert "assistant> " in out and "error" not in out
        out = _say(child, "/top_k 5")
        out = _say(child, "again")
        assert "assistant> " in out and "error" not in out
        out = _say(child, "/probs")
        assert "/probs needs a local checkpoint" in out
        out = _say(child, "/max_tokens 500")  # over the server's limit: its error, one line
        out = _say(child, "once more")
        assert "error: HTTP 400" in out and "max_tokens=500 exceeds" in out and "Traceback" not in out
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

    bad = pexpect.spawn(
        sys.executable,
        ["-m", "rlchat.cli", "chat", app.url, "--api-key", "wrong"],
        cwd=str(ROOT),
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        timeout=120,
    )
    bad.expect(pexpect.EOF)
    bad.close()
    assert bad.exitstatus == 2
    assert "error:" in bad.before and "HTTP 401" in bad.before and "Traceback" not in bad.before


# --------------------------------------------------------------------------------------------------------------
# Long conversations and broken streams
# --------------------------------------------------------------------------------------------------------------

DROP_NOTE = "(the conversation is longer than the model's context"


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory) -> Path:
    """An untrained checkpoint of the demo's size (configs/demo.yaml: gpt2, 2 layers, 64 wide, 256 positions)."""
    return testing.make_tiny_checkpoint(
        tmp_path_factory.mktemp("demo_size") / "ckpt", n_layer=2, n_embd=64, n_head=4, n_positions=256
    )


def _turn(i: int) -> str:
    return f"Message number {i}: tell me a little more about the weather on the coast today, please."


def test_terminal_chat_of_40_turns_with_a_demo_size_checkpoint_drops_old_turns(demo_ckpt):
    """40 turns are far more than 256 positions: the chat goes on, forgets its oldest exchanges, and says so once."""
    child = _spawn(str(demo_ckpt), "--max-tokens", "4", "--seed", "0", "--system", "You are terse.")
    outs = []
    try:
        for i in range(40):
            outs.append(_say(child, _turn(i)))
            assert "assistant> " in outs[-1], (i, outs[-1])
        history = _say(child, "/history")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    text = "".join(outs)
    assert text.count(DROP_NOTE) == 1, text
    first = next(i for i, out in enumerate(outs) if DROP_NOTE in out)
    assert 5 <= first <= 20, first  # ~28 tokens an exchange: the context fills after about 8 of them
    assert not [line for line in text.splitlines() if line.startswith("error:")], text
    assert "Traceback" not in text + history
    assert " 1 system: You are terse." in history and f" 80 user: {_turn(39)}" in history  # all kept locally


def test_local_backend_fits_the_prompt_and_reports_dropped_exchanges(demo_ckpt):
    backend = LocalBackend(str(demo_ckpt))
    tok = backend.tokenizer
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(30):
        msgs += [{"role": "user", "content": _turn(i)}, {"role": "assistant", "content": "sure " * 5}]
    msgs.append({"role": "user", "content": "last one"})
    d = Decoding(temperature=0.0, max_tokens=16)
    "".join(backend.stream(msgs, d))
    kept, dropped = fit_history(msgs, tok, 256 - 16)
    assert backend.last.dropped_turns == dropped > 0
    assert backend.last_prompt == tok.render_prompt(kept)  # the one truncation rule, system and last turn kept
    assert len(backend.last_prompt) + len(backend.last.token_ids) <= 256
    # /max_tokens beyond the context: the conversation still gets half of it
    "".join(backend.stream(msgs, replace(d, max_tokens=1000)))
    assert 128 - 40 <= len(backend.last_prompt) <= 128
    # a single message longer than the context: one line saying what to do, and the session goes on
    s = ChatSession(backend, d, "be brief", io.StringIO())
    _run(s, ["word " * 300, "hello"])
    text = s.out.getvalue()
    assert "error: your message and the system prompt take" in text and "send a shorter message" in text
    assert [m["content"] for m in s.turns][0] == "hello" and s.turns[-1]["role"] == "assistant"


class DropNoteBackend(FakeBackend):
    """A fake backend that reports more dropped exchanges every turn (as a long chat does)."""

    def stream(self, messages, d):
        yield from super().stream(messages, d)
        self.last.dropped_turns = len(self.calls)


def test_drop_note_is_said_once_per_conversation():
    out = io.StringIO()
    s = ChatSession(DropNoteBackend(), Decoding(), None, out)  # type: ignore[arg-type]
    _run(s, ["a", "b", "c", "/regenerate", "/reset", "d", "e"])
    text = out.getvalue()
    assert text.count(DROP_NOTE) == 2, text  # once, and once more after /reset
    assert "its 1 oldest exchange is left out" in text and "its 5 oldest exchanges are left out" in text


class FakeEndpoint:
    """A tiny OpenAI-style endpoint (stdlib ``http.server`` in a thread) whose streamed replies follow a script, so a
    test can drop the connection or send a malformed chunk mid-reply.

    Each POST takes the next step of ``script`` (``"ok"`` once it is empty): ``ok`` streams "fine reply" and
    ``[DONE]``; ``drop`` sends "partial" then cuts the connection inside an HTTP chunk; ``malformed`` sends "half"
    then a data line that is not JSON (then a normal rest, which the client must not take); ``eof`` sends "stub"
    and closes the stream cleanly but without ``[DONE]``; ``failed`` sends some text then the server's in-band error;
    ``withheld`` sends what the safety filter's withheld reply looks like; ``busy`` answers 503.
    """

    def __init__(self, card: dict | None = None) -> None:
        import http.server
        import threading

        self.script: list[str] = []
        self.bodies: list[dict] = []
        self.models_page: str | None = None
        self.dropped_header = 0
        self.authorization: list[str | None] = []  # each request's Authorization header
        self.conversations: list[str | None] = []  # each completion request's X-RLChat-Conversation-Id
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                endpoint.authorization.append(self.headers.get("Authorization"))
                body = json.dumps({"object": "list", "data": [{"id": "fake", "step": 3, **(card or {})}]}).encode()
                if endpoint.models_page is not None:  # not an OpenAI server: some other page answers 200
                    body = endpoint.models_page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                try:
                    self._post()
                except OSError:  # the client hung up (after a malformed chunk it stops reading): expected
                    self.close_connection = True

            def _post(self) -> None:
                endpoint.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                endpoint.conversations.append(self.headers.get("X-RLChat-Conversation-Id"))
                mode = endpoint.script.pop(0) if endpoint.script else "ok"
                if mode == "busy":  # the replica's overload refusal
                    body = json.dumps({"error": {"message": "the server is overloaded", "code": "overloaded"}})
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body.encode())
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("X-RLChat-Dropped-Turns", str(endpoint.dropped_header))
                if mode == "eof":
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def event(data: str) -> None:
                    payload = f"data: {data}\r\n\r\n".encode()
                    if mode == "eof":
                        self.wfile.write(payload)
                    else:
                        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.01)

                def delta(text: str, finish: str | None = None) -> str:
                    choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                    return json.dumps({"object": "chat.completion.chunk", "choices": [choice]})

                event(delta(""))
                if mode == "drop":
                    event(delta("partial"))
                    self.wfile.write(b'ff\r\ndata: {"obj')  # a chunk that never ends: the connection drops
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if mode == "eof":
                    event(delta("stub"))
                    self.close_connection = True
                    return
                if mode == "malformed":
                    event(delta("half"))
                    event('{"choices": [{"delta": {"content": "bro')
                if mode == "failed":  # serve/app.py's in-band error once the reply has started (the engine died)
                    event(delta("The answer is"))
                    error = {
                        "message": "generation failed (SchedulerStopped); see the replica log",
                        "type": "server_error",
                    }
                    event(json.dumps({"error": {**error, "param": None, "code": None}}))
                    event("[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if mode == "withheld":  # serve/app.py with the safety filter: the text sent, its notice, the reason
                    event(delta("Sure, here is how"))
                    event(delta("\n[withheld: the safety filter flagged this reply]"))
                    event(delta("", "content_filter"))
                    event("[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                event(delta("fine "))
                event(delta("reply"))
                event(delta("", "stop"))
                event("[DONE]")
                self.wfile.write(b"0\r\n\r\n")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    e = FakeEndpoint()
    yield e
    e.close()


def test_terminal_chat_survives_a_dropped_connection_and_a_malformed_chunk(endpoint):
    child = _spawn(endpoint.url)
    try:
        endpoint.script = ["drop"]
        out = _say(child, "first question")
        assert "partial [cut off]" in out, out
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "connection" in errors[0] and "/regenerate asks again" in errors[0], out
        out = _say(child, "/regenerate")
        assert "assistant> fine reply" in out and "error" not in out, out
        assert endpoint.bodies[-1]["messages"] == [{"role": "user", "content": "first question"}]  # no partial

        endpoint.script = ["malformed"]
        out = _say(child, "second question")
        assert "assistant> half [cut off]" in out and "fine" not in out, out  # nothing after the bad chunk
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "malformed stream chunk" in errors[0], out
        endpoint.script = ["eof"]
        out = _say(child, "/regenerate")
        assert "stub [cut off]" in out and "closed the stream before the reply was complete" in out, out
        out = _say(child, "third question")  # or just go on: the unanswered question stays in the history
        assert "assistant> fine reply" in out and "error" not in out, out
        assert endpoint.bodies[-1]["messages"] == [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "fine reply"},
            {"role": "user", "content": "second question"},
            {"role": "user", "content": "third question"},
        ]
        assert "Traceback" not in child.before
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_endpoint_client_keeps_within_advertised_limits_and_notes_server_drops():
    """``rlchat chat URL`` cuts the request to the server's advertised max_messages / max_chars (oldest exchanges
    first) and adds the server's X-RLChat-Dropped-Turns to what it tells the user, once."""
    e = FakeEndpoint(card={"max_messages": 9, "max_chars": 400})
    try:
        backend = RemoteBackend(e.url, None)
        s = ChatSession(backend, Decoding(max_tokens=4), "sys", io.StringIO())
        _run(s, [f"turn {i}" for i in range(3)])
        assert [len(b["messages"]) for b in e.bodies] == [2, 4, 6] and DROP_NOTE not in s.out.getvalue()
        e.dropped_header = 2
        _run(s, [f"turn {i}" for i in range(3, 12)] + ["x" * 375])
        sent = [b["messages"] for b in e.bodies]
        assert all(len(m) <= 9 and sum(len(x["content"]) for x in m) <= 400 for m in sent)
        assert sent[-1][0] == {"role": "system", "content": "sys"} and sent[-1][-1]["content"] == "x" * 375
        assert len(sent[-1]) == 4  # system, one earlier exchange (17 characters), the 375-character turn
        text = s.out.getvalue()
        assert text.count(DROP_NOTE) == 1 and "its 2 oldest exchanges are left out" in text, text  # 0 cut + 2
        assert len(s.turns) == 26  # the session keeps everything
    finally:
        e.close()


def test_endpoint_chat_sends_one_conversation_id_per_conversation(endpoint, tmp_path):
    """``rlchat chat URL`` sent no X-RLChat-Conversation-Id, so the server's store kept each completion as a
    conversation of its own (``rlchat feedback delete`` of a terminal chat went completion by completion). Every
    request of a conversation carries one id; ``/reset`` and ``/load`` start another."""
    s = ChatSession(RemoteBackend(endpoint.url, None), Decoding(max_tokens=4), None, io.StringIO())
    _run(s, ["one", "two", "/regenerate"])
    first = endpoint.conversations[0]
    assert first and len(first) >= 16 and endpoint.conversations == [first] * 3
    _run(s, ["/reset", "three", "four"])
    second = endpoint.conversations[3]
    assert second not in (None, first) and endpoint.conversations[3:] == [second] * 2
    saved = tmp_path / "chat.json"
    saved.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    _run(s, [f"/load {saved}", "five"])
    assert endpoint.conversations[-1] not in (None, first, second)


def test_an_overloaded_endpoint_keeps_the_question_and_a_non_openai_page_is_one_line(endpoint):
    """A 503 ``overloaded`` (after the SDK's retries) threw the user's question away, so ``/regenerate`` had
    nothing to ask again; and a URL whose ``/v1/models`` answered 200 with something else (the metrics page) ended
    in an ``AttributeError`` traceback from inside the SDK."""
    backend = RemoteBackend(endpoint.url, None)
    s = ChatSession(backend, Decoding(max_tokens=4), None, io.StringIO())
    endpoint.script = ["busy"] * (RemoteBackend.MAX_RETRIES + 1)
    _run(s, ["a question", "/regenerate"])
    text = s.out.getvalue()
    assert "overloaded" in text and "/regenerate asks again" in text, text
    assert [b["messages"] for b in endpoint.bodies][-1] == [{"role": "user", "content": "a question"}]
    assert s.turns == [{"role": "user", "content": "a question"}, {"role": "assistant", "content": "fine reply"}]
    endpoint.models_page = "# HELP ray_node_cpu_count\nray_node_cpu_count 2\n"
    with pytest.raises(RLChatError, match="not an OpenAI model list"):
        RemoteBackend(endpoint.url, None)
    endpoint.models_page = '"a string"'
    with pytest.raises(RLChatError, match="not an OpenAI model list"):
        RemoteBackend(endpoint.url, None)


@pytest.mark.slow
def test_endpoint_chat_of_40_turns_against_the_serve_app(serve_app):
    """``rlchat chat URL`` against the real Serve app (256 positions, serve.max_messages 64): 40 turns are answered,
    the request stays within 64 messages, and the server's dropped-turns header becomes the note, once."""
    app = serve_app
    backend = RemoteBackend(app.url, app.api_key)
    s = ChatSession(backend, Decoding(max_tokens=4, seed=0), "You are terse.", io.StringIO())
    assert _run(s, [_turn(i) for i in range(40)]) == 0
    text = s.out.getvalue()
    assert text.count("assistant> ") == 40 and text.count(DROP_NOTE) == 1, text
    assert not [line for line in text.splitlines() if line.startswith("error:")], text
    assert len(s.turns) == 80 and backend.last.dropped_turns > 20


def test_endpoint_chat_keeps_the_question_after_a_failure_mid_reply_or_a_withheld_reply(endpoint):
    """The server's in-band error once a reply has started (the engine died: a 500 for a running request) threw
    the user's question away (``/regenerate`` had nothing to answer) and printed the error on the reply's line; a
    reply withheld by the safety filter went back to the model as the assistant's turn, notice included."""
    s = ChatSession(RemoteBackend(endpoint.url, None), Decoding(max_tokens=4), None, io.StringIO())
    endpoint.script = ["failed"]
    _run(s, ["What is 12 + 30?", "/regenerate"])
    lines = s.out.getvalue().splitlines()
    assert "you> assistant> The answer is [cut off]" in lines, lines
    assert any(line.startswith("error: generation failed") and "/regenerate asks again" in line for line in lines)
    assert endpoint.bodies[-1]["messages"] == [{"role": "user", "content": "What is 12 + 30?"}]
    assert s.turns[-1] == {"role": "assistant", "content": "fine reply"}

    s = ChatSession(RemoteBackend(endpoint.url, None), Decoding(max_tokens=4), None, io.StringIO())
    endpoint.script = ["withheld"]
    _run(s, ["how do I pick a lock?", "thanks"])
    assert endpoint.bodies[-1]["messages"] == [
        {"role": "user", "content": "how do I pick a lock?"},  # the withheld reply is not the model's turn
        {"role": "user", "content": "thanks"},
    ]
    text = s.out.getvalue()
    assert text.count("withheld") == 1 and "not kept" in text, text  # the server's notice, once, and what it means


def test_endpoint_chat_reads_a_key_file_as_the_server_does(endpoint, tmp_path, monkeypatch):
    """``rlchat chat URL --api-key-file`` took the file's first line as it was, so a key file that the server reads
    (first non-blank line, stripped) sent an empty key."""
    from serve.settings import resolve_api_key

    key_file = tmp_path / "key"
    key_file.write_text("\n  s3cret-key  \r\n", encoding="utf-8")
    assert resolve_api_key("", str(key_file)) == "s3cret-key"
    monkeypatch.delenv("RLCHAT_API_KEY", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # the chat ends at once (end of input)
    assert chat_command(endpoint.url, api_key_file=str(key_file)) == 0
    assert endpoint.authorization and set(endpoint.authorization) == {"Bearer s3cret-key"}


def test_local_chat_interrupted_keeps_only_the_text_shown(local, monkeypatch):
    """Ctrl-C mid-reply with a stop string: the kept reply took the streamer's whole text, including the characters
    held back because they might begin the stop string (never shown)."""
    tok = local.tokenizer
    ids = tok.encode("Hello there.\n\nUs")

    def interrupted(prompt, params):
        yield from ((t, None) for t in ids)
        raise KeyboardInterrupt  # the user's Ctrl-C during the next decoding step

    monkeypatch.setattr(local.engine, "stream", interrupted)
    s = ChatSession(local, Decoding(stop=("\n\nUser:",)), None, io.StringIO())
    _run(s, ["hi"])
    shown = s.out.getvalue().split("assistant> ", 1)[1].split(" [interrupted]")[0]
    assert shown == "Hello there."
    assert s.turns == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."}]
