"""``rlchat serve``: deploy a checkpoint (or a run's best) on Ray Serve and print how to talk to it."""

import contextlib
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Any

from ray import serve as ray_serve

from rlchat.core.config import ServeConfig
from rlchat.core.errors import ConfigError
from rlchat.core.feedback_store import display_url
from rlchat.core.files import JOB_SCRATCH_NOTE, in_job_working_dir, read_key_file
from serve.app import ChatServer
from serve.settings import (
    APP_NAME,
    ENV_API_KEY,
    SHUTDOWN_MARGIN_S,
    active_ingress,
    deployment_options,
    exposure_warning,
    ingress_environment,
    request_lifetime_s,
    resolve_settings,
    ship_checkpoints,
)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on. Why: the Ray that ``rlchat serve`` starts brings a Serve proxy
    that binds with port reuse, so a second ``rlchat serve`` on a busy port started without a word and the two
    servers (two checkpoints) took turns answering one URL.

    Raises:
        ConfigError: the port is taken.
    """
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"{host}:{port} is already in use ({e.strerror}; another rlchat serve?); stop it or pass --port"
            ) from None


def endpoint_url(host: str, port: int) -> str:
    """The base URL of ``host:port`` (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def key_hints(s: ServeConfig) -> tuple[str, str]:
    """How the start-up hints pass the API key: the curl header and ``rlchat chat``'s flags. They name where the key
    is (its file, or ``RLCHAT_API_KEY``) and never the key itself, which would land in the terminal's scrollback;
    ``rlchat chat`` reads ``RLCHAT_API_KEY`` itself, so no flag puts the key in its argv (``ps``). The file is named
    expanded (a quoted ``~`` is not) and read as the server reads it (its first non-blank line)."""
    if not s.api_key:
        return "", ""
    if s.api_key_file:
        path = Path(s.api_key_file).expanduser()
        with contextlib.suppress(OSError):
            if read_key_file(path) == s.api_key:  # the key is the file's (not a serve.api_key beside it)
                quoted = shlex.quote(str(path))
                first_line = f"grep -m1 '[^[:space:]]' {quoted} | tr -d '[:space:]'"
                return f' -H "Authorization: Bearer $({first_line})"', f" --api-key-file {quoted}"
    if os.environ.get(ENV_API_KEY) == s.api_key:
        return f' -H "Authorization: Bearer ${ENV_API_KEY}"', ""
    return ' -H "Authorization: Bearer <serve.api_key>"', ""


def serve_args(
    checkpoint: str | None = None,
    from_run: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    **flags: Any,
) -> dict[str, Any]:
    """The arguments of ``rlchat serve`` as :func:`serve.settings.resolve_settings` takes them (the app builder's).

    Overrides go as typed (``key=value``, the value a string): ``resolve_settings`` reads them as YAML, as it does
    ``serve run``'s, except API keys, which stay the string typed. Flags that were given win over overrides.
    """
    args: dict[str, Any] = {}
    for text in overrides or []:
        if "=" not in text:
            raise ConfigError(f"override {text!r}: expected key=value, e.g. serve.max_batch_size=8")
        key, value = text.split("=", 1)
        args[key.strip()] = value
    args.update({"checkpoint": checkpoint, "from_run": from_run, "config": config})
    args.update({k: v for k, v in flags.items() if v is not None})
    if flags.get("api_key_file") and not flags.get("api_key"):
        args["api_key"] = ""  # the file named on the command line, not a serve.api_key of the config
    return args


def feedback_store_notes(url: str, nodes: int) -> list[str]:
    """What to tell the user about where feedback goes: a SQLite file is one node's (several nodes: each replica
    writes its own), and one in a Ray job's unpacked working directory is deleted with it."""
    if not url.startswith("sqlite"):
        return []
    notes = []
    if nodes > 1:
        notes.append(
            "note: this Ray cluster has several nodes, and a SQLite feedback store is a file on each replica's "
            "own node; set serve.feedback_store: postgresql://... (docs/cluster.md)"
        )
    path = url.removeprefix("sqlite:///").partition("?")[0]
    if in_job_working_dir(path):
        notes.append(
            f"warning: the feedback store {path} {JOB_SCRATCH_NOTE}; give the replicas RLCHAT_FEEDBACK_STORE "
            "(the job's env_vars) or serve.feedback_store"
        )
    return notes


def serve_command(
    checkpoint: str | None = None,
    from_run: str | None = None,
    port: int | None = None,
    host: str | None = None,
    replicas: int | None = None,
    config: str | None = None,
    api_key: str | None = None,
    api_key_file: str | None = None,
    address: str | None = None,
    ingress: str | None = None,
    blocking: bool = True,
    follow: bool = False,
    overrides: list[str] | None = None,
    **_: Any,
) -> int:
    """``rlchat serve``: deploy a checkpoint (or a run's best) and print how to talk to it.

    With ``follow`` (``--from-run RUN --follow``) the replicas watch the run's best checkpoint and swap to each new
    one while the run trains (``serve.follow_interval_s``).

    Returns:
        0 after Ctrl-C (blocking) or once deployed (``--no-blocking``, the app keeps running on the cluster).
    """
    import ray

    from rlchat.distributed.cluster import init_ray

    args = serve_args(
        checkpoint,
        from_run,
        config,
        overrides,
        host=host,
        port=port,
        api_key=api_key,
        api_key_file=api_key_file,
        replicas=replicas,
        follow=follow or None,
        ingress=ingress,
    )
    settings = resolve_settings(args)
    s = settings.config.serve
    address = address or settings.config.ray.address or None  # the config's cluster, as train and tune join it
    starts_local = not ray.is_initialized() and (address or os.environ.get("RAY_ADDRESS") or "local") == "local"
    if starts_local:  # Ray Serve reads its ingress switches from the environment of every Ray process it starts
        os.environ.update(ingress_environment(s.ingress))
        # Direct-ingress replicas stay up 30 s after a stop by default so that an outside load balancer can drop them;
        # this command owns its HAProxy, so Ctrl-C need not wait for that.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    if starts_local:
        check_port_free(s.host, s.port)
    init_ray(address, settings.config.ray.num_cpus)
    settings = ship_checkpoints(settings)  # the object store needs Ray
    shipped = settings.shipped is not None or any(v.shipped is not None for v in settings.versions)
    if shipped and not blocking:
        print(
            "warning: the checkpoint is shipped to the replicas through Ray's object store, which keeps it only while "
            "this process runs; with --no-blocking a replica that restarts later cannot load it. Put it on shared "
            "storage or give a URI (docs/serving.md, multi-node)",
            flush=True,
        )
    try:
        ray_serve.start(http_options={"host": s.host, "port": s.port})
        app = ChatServer.options(**deployment_options(settings)).bind(settings)
        ray_serve.run(app, name=APP_NAME, route_prefix="/")
        url = endpoint_url(s.host, s.port)
        warning = exposure_warning(s.host, s.api_key)
        if warning:
            print(f"warning: {warning}", flush=True)
        auth, chat_key = key_hints(s)
        body = f'{{"model": "{settings.model_name}", "messages": [{{"role": "user", "content": "hi"}}]}}'
        print(f"serving {settings.checkpoint} as model {settings.model_name!r} at {url}")
        for v in settings.versions:
            print(f"  version {v.name!r}: {v.checkpoint} (weight {v.weight:g})")
        if settings.from_run:
            print(f"  following {settings.from_run}: new best checkpoints are served within {s.follow_interval_s:g} s")
        if s.num_gpus:
            print(f"  GPUs per replica: {s.num_gpus:g}")
        if starts_local:
            print(f"  ingress: {s.ingress} (serve.ingress)")
            from serve.metrics import metrics_export_url  # the port of the Ray started here is Ray's random pick

            metrics_url = metrics_export_url()
            if metrics_url is not None:
                print(f"  metrics:       Prometheus text at {metrics_url}")
        elif active_ingress() != s.ingress:
            print(
                f"  note: serve.ingress={s.ingress} applies when rlchat serve starts Ray itself; on this cluster the "
                'ingress is set by the environment of `ray start` (docs/serving.md, "Ingress")',
                flush=True,
            )
        print(f"  web chat:      {url}/")
        print(f"  terminal chat: rlchat chat {url}{chat_key}")
        print(f"  curl:          curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'")
        print(f"  openai:        OpenAI(base_url='{url}/v1', api_key=...)")
        if s.safety_filter:
            print("  safety filter: on")
        print(f"  feedback store: {display_url(s.feedback_store)}", flush=True)
        for note in feedback_store_notes(s.feedback_store, sum(bool(n.get("Alive")) for n in ray.nodes())):
            print(f"  {note}", flush=True)
        if not blocking:
            return 0
        print("Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the shutdown
        wait_s = request_lifetime_s(s) + SHUTDOWN_MARGIN_S
        print(f"stopping: shutting Serve down (requests in flight finish first, at most {wait_s:g} s)", flush=True)
        with contextlib.suppress(Exception):
            ray_serve.shutdown()
    return 0
