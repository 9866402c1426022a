"""Helpers for the Serve app's tests and benchmark: tiny checkpoints and one shared local app.

Starting Serve costs ~9 s on 2 cores, so every test module of a pytest session shares one app through
:func:`shared_app` (the first caller deploys it, later callers get the same URL); :func:`shutdown` tears Serve down
and is safe to call more than once. Everything listens on a free loopback port. Tests of ``rlchat serve`` itself
(which deploys over the shared app's name and route) run inside :func:`serve_command_port`, which puts the shared app
back afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEST_API_KEY = "test-key"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tiny_checkpoint(
    directory: str | Path,
    n_layer: int = 1,
    n_embd: int = 32,
    n_head: int = 2,
    n_positions: int = 256,
    vocab_size: int = 4096,
    seed: int = 0,
    step: int = 1,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write an untrained policy checkpoint (stage ``sft``) of a tiny GPT-2 with a small cl100k vocabulary.

    Args:
        directory: where the checkpoint goes.
        overrides: extra dotted config keys stored in the checkpoint's config (e.g. ``serve.*``, ``reward.*``).

    Returns:
        The checkpoint directory.
    """
    from rlchat.core.checkpoint import save_checkpoint
    from rlchat.core.config import Config
    from rlchat.core.model import PolicyValueModel
    from rlchat.core.tokenizer import ChatTokenizer

    cfg = Config().replace(
        **{
            "seed": seed,
            "tokenizer.encoding": "cl100k_base",
            "tokenizer.vocab_size": vocab_size,
            "model.n_layer": n_layer,
            "model.n_embd": n_embd,
            "model.n_head": n_head,
            "model.n_positions": n_positions,
            "model.precision": "fp32",
            **(overrides or {}),
        }
    )
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    model = PolicyValueModel.build(cfg, tok)
    return save_checkpoint(directory, model=model, tokenizer=tok, config=cfg, stage="sft", step=step)


def wait_ready(
    url: str, timeout_s: float = 120.0, not_pid: int | None = None, api_key: str | None = None
) -> dict[str, Any]:
    """Poll ``GET url/readyz`` until it answers 200 (and, with ``not_pid``, from another process). With the app's
    ``api_key`` the answer carries the checkpoint path and the pid (without it, only loopback clients of an app
    without a key see them)."""
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/readyz", timeout=5, headers=headers)
            if r.status_code == 200:
                info = r.json()
                if not_pid is None or info.get("pid") != not_pid:
                    return info
            last = r.status_code
        except requests.RequestException as e:
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"{url}/readyz did not become ready within {timeout_s:.0f} s (last: {last!r})")


def _wait_serving(url: str, checkpoint: Path, timeout_s: float = 120.0, api_key: str | None = None) -> None:
    """Poll ``/readyz`` until the replica answering is one that loaded ``checkpoint`` (a redeploy has rolled out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = wait_ready(url, timeout_s=max(1.0, deadline - time.monotonic()), api_key=api_key)
        if Path(info["checkpoint"]) == Path(checkpoint).resolve():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} still serves {info['checkpoint']} after {timeout_s:.0f} s, not {checkpoint}")
        time.sleep(0.25)


@dataclass(frozen=True)
class TestApp:
    """A deployed app: its base URL, checkpoint, API key and feedback store URL."""

    __test__ = False  # not a pytest test class

    url: str
    checkpoint: Path
    api_key: str
    feedback_store: str
    port: int


_SHARED: dict[str, Any] = {}


def start_serve(port: int | None = None) -> int:
    """Start Serve (HTTP on 127.0.0.1:port) on the connected Ray; returns the port."""
    from ray import serve as ray_serve

    if "port" in _SHARED:
        return int(_SHARED["port"])
    port = port or free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    _SHARED["port"] = port
    return port


def deploy(checkpoint: str | Path, name: str = "rlchat", route_prefix: str = "/", **args: Any) -> str:
    """Deploy (or redeploy) an app of the checkpoint under ``route_prefix``; returns its base URL once ready."""
    from ray import serve as ray_serve

    from serve.app import build_app

    port = start_serve()
    ray_serve.run(build_app({"checkpoint": str(checkpoint), **args}), name=name, route_prefix=route_prefix)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_ready(url, api_key=args.get("api_key"))
    return url


def _shared_app_args(feedback_store: str) -> dict[str, Any]:
    return {
        "api_key": TEST_API_KEY,
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.05,
        "feedback_store": feedback_store,
        # transcripts on (with scrubbing) so the store tests see served chats; the product's default is off
        "transcripts": True,
        "scrub_pii": True,
        "max_tokens": 64,
        "feedback_rate_limit": 0,  # the session's tests rate many replies from one address within a minute
        "num_cpus": 0,  # no CPU reservation: the session app must never block later tests' Ray Train workers
    }


def shared_app(root: str | Path) -> TestApp:
    """The session's shared test app (deployed on first use under ``root``): API key, batching up to 8, a SQLite
    feedback store ``root/feedback.db`` with transcripts on."""
    if "app" in _SHARED:
        return _SHARED["app"]
    root = Path(root)
    ckpt = make_tiny_checkpoint(root / "tiny_ckpt")
    store = f"sqlite:///{root / 'feedback.db'}"
    url = deploy(ckpt, **_shared_app_args(store))
    app = TestApp(url=url, checkpoint=ckpt, api_key=TEST_API_KEY, feedback_store=store, port=_SHARED["port"])
    _SHARED["app"] = app
    return app


@contextlib.contextmanager
def serve_command_port() -> Iterator[int]:
    """For a test that deploys through :func:`rlchat.cli.serve_cmd.serve_command` (``rlchat serve``, ``rlchat tune
    --deploy``).

    ``serve_command`` always deploys application ``rlchat`` at ``/`` -- the name and route of the shared app -- and
    starts Serve on the port it is given, so the test gets a port to pass it: the running Serve's (Serve keeps its
    first HTTP options), else a free one. Afterwards the shared app, if the session has one, is deployed again with
    its own checkpoint and settings; otherwise the ``rlchat`` app is deleted (Serve was started here for other
    apps), or Serve is shut down (``serve_command`` started it).

    Yields:
        The port ``serve_command`` should listen on (its ``port`` argument, or ``serve.port`` in the config).
    """
    from ray import serve as ray_serve

    from serve.settings import APP_NAME

    port = int(_SHARED.get("port") or free_port())
    try:
        yield port
    finally:
        app: TestApp | None = _SHARED.get("app")
        if app is not None:
            deploy(app.checkpoint, name=APP_NAME, route_prefix="/", **_shared_app_args(app.feedback_store))
            _wait_serving(app.url, app.checkpoint, api_key=app.api_key)
        elif "port" in _SHARED:
            with contextlib.suppress(Exception):  # not deployed: nothing to delete
                ray_serve.delete(APP_NAME)
        else:
            with contextlib.suppress(Exception):
                ray_serve.shutdown()


def shutdown() -> None:
    """Shut Serve down (idempotent)."""
    from ray import serve as ray_serve

    if _SHARED:
        _SHARED.clear()
        with contextlib.suppress(Exception):  # Ray may already be gone at session end
            ray_serve.shutdown()


def scrape_metrics(ray: Any, prefix: str = "rlchat_serve_") -> dict[str, list[tuple[dict[str, str], float]]]:
    """The Prometheus samples of Ray's metrics agents (every live node's ``MetricsExportPort``) whose name contains
    ``prefix``, as name -> [(labels, value)]; a label exported empty reads as absent."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node["Alive"] or not port:
            continue
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if prefix in sample.name:
                    labels = {k: v for k, v in sample.labels.items() if v != ""}
                    out.setdefault(sample.name, []).append((labels, sample.value))
    return out


async def inprocess_server(checkpoint: str | Path | None, **args: Any) -> Any:
    """The replica class itself (``serve.app.ChatServer``), built in this process without Ray Serve, for tests that
    need to control its scheduler (a slow step, a failure) and call its routes with :func:`post_request`; ``args``
    as for :func:`deploy` (``checkpoint`` None: ``args`` name the model, e.g. ``from_run``)."""
    import inspect

    from serve.app import ChatServer
    from serve.settings import resolve_settings

    model = {"checkpoint": str(checkpoint)} if checkpoint is not None else {}
    settings = resolve_settings({**model, "num_cpus": 1, "api_key": "", **args})
    cls = ChatServer.func_or_class
    server = cls.__new__(cls)
    started = cls.__init__(server, settings)  # Serve's ingress wrapper makes __init__ a coroutine
    if inspect.isawaitable(started):
        await started
    return server


def slow_steps(server: Any, seconds: float) -> None:
    """Make an in-process replica's (:func:`inprocess_server`, ``engine_process=False``) decoding steps each take
    ``seconds`` longer: a request then waits or runs long enough for a test to act meanwhile."""
    import time

    batch = server.models.default.scheduler._run.batch  # noqa: SLF001
    fast = batch.step
    batch.step = lambda *a: (time.sleep(seconds), fast(*a))[1]


def post_request(
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    leaves: bool = False,
    client: str = "127.0.0.1",
) -> Any:
    """A Starlette request for an in-process route: ``body`` as JSON, from a client (loopback unless ``client``
    names its address) that stays connected (``leaves``: that disconnects once its body is read)."""
    import asyncio
    import json

    from starlette.requests import Request

    raw = json.dumps(body).encode()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if not leaves:
            await asyncio.Event().wait()  # connected until cancelled
        return {"type": "http.disconnect"}

    pairs = {"content-type": "application/json", "content-length": str(len(raw)), **(headers or {})}
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in pairs.items()],
        "query_string": b"",
        "client": (client, 50000),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
        "http_version": "1.1",
        "root_path": "",
    }
    return Request(scope, receive)
