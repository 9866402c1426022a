"""The models a replica serves: named versions (each a checkpoint with its own engine and scheduler), the traffic
split between them, live swaps, and getting a checkpoint onto the replica's node.

A replica holds a :class:`ModelSet`. With ``serve.versions`` (or a deployment ``user_config``) it serves several
checkpoints side by side::

    versions: [{name: stable, checkpoint: /runs/a/checkpoints/step_000200, weight: 90},
               {name: canary, checkpoint: s3://bucket/runs/b/step_000300, weight: 10}]

A request whose ``model`` names a version gets that version; the app's model name (``model_name``, the alias) or no
``model`` picks one by the weights, with a smooth weighted round-robin (nginx's): over any N alias requests each
version gets its share to within one request, with no randomness to make a 90/10 canary look like 85/15. Without
versions the replica serves one version named after the alias, exactly as before.

Changing versions in place (``ChatServer.reconfigure``, from a ``serve deploy`` that changes only the deployment's
``user_config``, and ``--follow``) never drops a request: new and changed versions load first, on a loader thread
(the event loop keeps serving); then the routing table and weights swap in one step; a version that left the table
drains -- requests already running finish on the engine they started with -- and is closed once it is idle.

How a request is bound to its version without threading it through every helper: :meth:`ChatServer._check_model`
stores the chosen :class:`ServedVersion` in a context variable (:func:`use_version`), and the replica's ``engine``,
``tokenizer``, ``batcher`` and ``stats`` resolve through it (:func:`current_version`). An asyncio task (the request)
and the tasks it starts (an SSE stream's sender) carry their own copy of the context, so a request never sees a
version chosen by another one, and a swap in the middle of a request does not move it.

Where a checkpoint comes from (:func:`fetch_checkpoint`), in this order:

1. a URI that ``pyarrow.fs`` understands (``s3://``, ``gs://``, ``hdfs://``, ``file://``, ...): copied once into the
   node's cache (``serve.checkpoint_cache``) and loaded from there;
2. a local path that exists on the replica's node (shared storage, or the driver's own node);
3. a copy the driver shipped through the object store (:func:`ship_checkpoint`): the driver packs the directory
   (tar, uncompressed: weights do not compress) and ``ray.put`` s it once; each node unpacks it once into its cache.
   The object lives as long as the driver process that put it (``rlchat serve``, blocking, or ``serve run``); with
   ``--no-blocking`` or ``serve deploy`` use shared storage or a URI. The pack is held in the driver's memory and
   in the object store, so it is limited to :data:`SHIP_MAX_BYTES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlchat.core.errors import CheckpointError, ConfigError
from serve.settings import DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    from rlchat.core.checkpoint import Checkpoint
    from rlchat.core.config import ServeConfig
    from rlchat.core.generation import GenerationEngine
    from rlchat.core.tokenizer import ChatTokenizer
    from serve.batching import Batcher, BatchStats, GenerationJob, StepItem
    from serve.metrics import VersionMetrics

logger = logging.getLogger("ray.serve").getChild("rlchat")

VERSION_HEADER = "X-RLChat-Model"
"""Response header naming the version that answered (also the body's ``model`` field)."""
SHIP_MAX_BYTES = 2 * 1024**3
"""Largest checkpoint directory shipped through the object store (the driver holds the pack in memory)."""
DRAIN_GRACE_S = 2.0
"""A removed version is closed no sooner than this after it left the routing table (a request that picked it just
before the swap may not have reached its scheduler yet) and only once it has no request in flight."""
DRAIN_TIMEOUT_S = 600.0
"""A removed version still busy after this long is closed anyway (its stragglers then fail), logged."""

_CURRENT: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar("rlchat_served_version", default=None)


# --------------------------------------------------------------------------------------------------------------
# Version specs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionSpec:
    """One served version as configured: a name, where its checkpoint is, and its share of alias traffic.

    Attributes:
        name: what a request's ``model`` names to get this version.
        checkpoint: a local directory (absolute) or a ``pyarrow.fs`` URI.
        weight: relative share of requests for the alias (0 = only explicit requests).
        shipped: an object-store reference to the packed checkpoint (:func:`ship_checkpoint`), or None.
    """

    name: str
    checkpoint: str
    weight: float = 1.0
    shipped: Any = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> tuple[str, str]:
        """What identifies the loaded model: a version whose source is unchanged is not reloaded."""
        return (self.name, self.checkpoint)

    def as_config(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": self.checkpoint, "weight": self.weight}


def is_uri(path: str) -> bool:
    """Whether ``path`` is a URI (``scheme://...``) rather than a local path."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.isidentifier()


def parse_versions(raw: Any, where: str = "serve.versions", alias: str = "") -> tuple[VersionSpec, ...]:
    """Validate a list of ``{name, checkpoint, weight}`` mappings.

    Args:
        raw: the list (from the config, builder args or a ``user_config``); None / empty = no versions.
        where: what to call it in error messages.
        alias: the app's model name, which a version may not take (nor the default name it also answers to).

    Raises:
        ConfigError: not a list of mappings, a missing or unknown key, a duplicate name, a bad weight, weights that
            are all zero.
    """
    if raw is None or raw == [] or raw == ():
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{where}={raw!r}: expected a list of {{name, checkpoint, weight}} mappings")
    specs: list[VersionSpec] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}[{i}]={item!r}: expected a mapping {{name: ..., checkpoint: ..., weight: ...}}")
        unknown = set(item) - {"name", "checkpoint", "weight"}
        if unknown:
            raise ConfigError(f"{where}[{i}]: unknown key(s) {sorted(unknown)}; expected name, checkpoint, weight")
        name, ckpt = str(item.get("name") or ""), str(item.get("checkpoint") or "")
        if not name or not ckpt:
            raise ConfigError(
                f"{where}[{i}]={item!r}: name and checkpoint are required, e.g. {{name: canary, "
                "checkpoint: runs/b/checkpoints/best, weight: 10}"
            )
        if alias and name in (alias, DEFAULT_MODEL_NAME):
            raise ConfigError(
                f"{where}[{i}]: the version name {name!r} is the app's model name, which picks a version by weight; "
                "name the version differently (e.g. stable, canary)"
            )
        try:
            weight = float(item.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = float("nan")
        if not weight >= 0 or weight == float("inf"):
            raise ConfigError(f"{where}[{i}] ({name}): weight={item.get('weight')!r}: expected a number >= 0")
        if any(s.name == name for s in specs):
            raise ConfigError(f"{where}: the version name {name!r} appears twice; names must be unique")
        specs.append(VersionSpec(name, ckpt, weight))
    if sum(s.weight for s in specs) <= 0:
        raise ConfigError(
            f"{where}: every weight is 0, so requests for the app's model name have no version to go to; "
            "give at least one version a weight > 0"
        )
    return tuple(specs)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints on any node
# --------------------------------------------------------------------------------------------------------------


CACHE_GRACE_S = 600.0
"""A cached copy used this recently is never evicted, whatever ``keep`` says: another replica on the node may be
loading it right now."""
PARTIAL_MAX_AGE_S = 6 * 3600.0
"""A half-written copy (``.<key>.partial-*``) older than this was left by a fetch that died (a copy of a large model
from object storage can take many minutes, so only old ones go; the cache may be on storage other nodes share)."""


_CACHE_NAME = re.compile(
    r"(?P<evicting>\.evict-)?(?P<partial>\.)?[0-9a-f]{20}(?(partial)\.partial-\d+-[0-9a-f]{8})(?(evicting)-[0-9a-f]{8})"
)
"""The names :func:`_cache_entry`, the copy in progress (``.<key>.partial-<pid>-<hex>``) and an eviction
(``.evict-<key>-<hex>``) give; nothing else in the cache directory is ever touched (but the fill lock,
``.rlchat-fill.lock``, :func:`_filling`)."""


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "rlchat-checkpoints"


def _cached(entry: Path, keep: int) -> Path | None:
    """``entry`` when this node's cache holds it (see :func:`_use_and_prune`), else None. It is marked used before
    it is looked at, so an eviction running meanwhile passes it over as recently used."""
    now = time.time()
    with contextlib.suppress(OSError):
        os.utime(entry, (now, now))
    return _use_and_prune(entry, keep) if (entry / "meta.json").is_file() else None


def _use_and_prune(entry: Path, keep: int) -> Path:
    """Mark the cached copy ``entry`` used now, then evict the node cache's least recently used copies beyond
    ``keep`` (0: keep all).

    Why: every deploy of a URI or shipped checkpoint adds a copy on each node that runs a replica (a followed run or
    a canary rollout: one per version), so without eviction a node's disk fills with old weights. A copy used within
    :data:`CACHE_GRACE_S` stays; a copy is renamed before it is deleted, so a replica fetching it meanwhile sees no
    ``meta.json`` and copies it again instead of loading a half-deleted directory."""
    now = time.time()
    with contextlib.suppress(OSError):
        os.utime(entry, (now, now))
    if keep <= 0:
        return entry
    copies: list[tuple[float, Path]] = []
    for path in entry.parent.iterdir():
        # only what this module wrote: the directory is the user's to choose and may hold anything else
        ours = _CACHE_NAME.fullmatch(path.name)
        if ours is None or not path.is_dir():
            continue
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue  # another replica removed it meanwhile
        if ours["evicting"] or (ours["partial"] and age > PARTIAL_MAX_AGE_S):
            shutil.rmtree(path, ignore_errors=True)
        elif not ours["evicting"] and not ours["partial"] and path != entry and (path / "meta.json").is_file():
            copies.append((age, path))
    copies.sort()
    for age, path in copies[max(0, keep - 1) :]:
        if age < CACHE_GRACE_S:
            continue
        doomed = path.parent / f".evict-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, doomed)
        except OSError:
            continue  # evicted by another replica already
        logger.info("evicting %s from the checkpoint cache (serve.checkpoint_cache_keep=%d)", path, keep)
        shutil.rmtree(doomed, ignore_errors=True)
    return entry


def _cache_entry(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / hashlib.sha256(key.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _filling(cache: Path) -> Iterator[None]:
    """Hold the node cache's fill lock (an ``flock`` on ``<cache>/.rlchat-fill.lock``): replicas of one node that
    start together copy a checkpoint once -- the first copies, the others then find it cached -- instead of each
    downloading the whole of it. Without ``fcntl`` (not Linux / macOS) there is no lock: each copies, as before."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(cache / ".rlchat-fill.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> Path:
    """Move a fully written ``tmp`` directory to ``final`` (another replica on this node may have won the race)."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "meta.json").is_file():
            raise
    return final


def _checkpoint_root(directory: Path) -> Path:
    """The checkpoint inside a copied tree: the directory itself or its single subdirectory holding meta.json."""
    if (directory / "meta.json").is_file():
        return directory
    found = [p.parent for p in directory.rglob("meta.json")]
    return min(found, key=lambda p: len(p.parts)) if found else directory


def fetch_uri(uri: str, cache_dir: str | Path = "", keep: int = 0) -> Path:
    """Copy the checkpoint at ``uri`` (any ``pyarrow.fs`` filesystem) into the node's cache, once; its local path.
    ``keep``: how many recently used copies the cache keeps (:func:`_use_and_prune`; 0 = all).

    Raises:
        CheckpointError: pyarrow cannot open or copy it.
    """
    from pyarrow import fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
        if info.type != pafs.FileType.Directory:
            raise CheckpointError(
                f"{uri}: not a checkpoint directory ({info.type.name.lower()}); point at the "
                "directory that holds meta.json"
            )
        # the copy is keyed by what is there now, not only by the URI: a step re-saved in place (a resumed run, a
        # mutable prefix) must not keep serving the old weights from this node's cache
        listing = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        version = sorted((f.path, f.size, f.mtime_ns) for f in listing if f.type == pafs.FileType.File)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{uri}: cannot read the checkpoint ({e.__class__.__name__}: {e}); check the URI and "
            "this node's credentials for that storage"
        ) from e
    final = _cache_entry(cache_dir, f"{uri}\n{json.dumps(version)}")
    if (cached := _cached(final, keep)) is not None:
        return cached
    with _filling(final.parent):
        if (cached := _cached(final, keep)) is not None:  # another replica of this node copied it meanwhile
            return cached
        return _copy_uri(uri, filesystem, path, final, keep)


def _copy_uri(uri: str, filesystem: Any, path: str, final: Path, keep: int) -> Path:
    """Copy ``path`` of ``filesystem`` into the node cache's entry ``final`` (written aside, then renamed)."""
    from pyarrow import fs as pafs

    tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        pafs.copy_files(path, str(tmp), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{uri}: cannot copy the checkpoint ({e.__class__.__name__}: {e}); check the URI and "
            "this node's credentials for that storage"
        ) from e
    if not (tmp / "meta.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{uri}: no meta.json there; point at a checkpoint directory (runs/<run>/checkpoints/step_XXXXXX)"
        )
    return _use_and_prune(_publish(tmp, final), keep)


def pack_checkpoint(directory: str | Path, max_bytes: int = SHIP_MAX_BYTES) -> bytes:
    """The checkpoint directory as an uncompressed tar in memory.

    Raises:
        ConfigError: the directory is larger than ``max_bytes``.
    """
    directory = Path(directory)
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    if size > max_bytes:
        raise ConfigError(
            f"{directory}: {size / 2**20:.0f} MiB is more than the {max_bytes / 2**20:.0f} MiB a checkpoint may be "
            "to ship through Ray's object store; put it on shared storage or give a URI (s3://, gs://) instead, and "
            "set serve.ship_checkpoint=never"
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(directory, arcname="checkpoint")
    return buf.getvalue()


def unpack_checkpoint(data: bytes, key: str, cache_dir: str | Path = "", keep: int = 0) -> Path:
    """Unpack a :func:`pack_checkpoint` tar into the node's cache under ``key`` (once per node); its path.
    ``keep``: as for :func:`fetch_uri`."""
    final = _cache_entry(cache_dir, f"shipped:{key}")
    if (cached := _cached(final, keep)) is not None:
        return cached
    with _filling(final.parent):
        if (cached := _cached(final, keep)) is not None:
            return cached
        return _unpack(data, key, final, keep)


def _unpack(data: bytes, key: str, final: Path, keep: int) -> Path:
    """Unpack the tar ``data`` into the node cache's entry ``final`` (written aside, then renamed)."""
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise CheckpointError(
                f"the shipped copy of checkpoint {key!r} cannot be unpacked into {final.parent} ({e}); check the "
                "node's free disk space, or give the replicas a path on shared storage or a URI"
            ) from e
        published = _publish(tmp / "checkpoint", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _use_and_prune(published, keep)


def ship_checkpoint(spec: VersionSpec, mode: str) -> VersionSpec:
    """On the driver: ``ray.put`` the packed checkpoint of ``spec`` when ``mode`` asks for it.

    Args:
        spec: a version whose checkpoint is a local path or a URI (URIs are never shipped).
        mode: ``always``; ``auto`` = when the Ray cluster has more than one node (a replica may land where the path
            does not exist); ``never``.

    Returns:
        ``spec`` with :attr:`VersionSpec.shipped` set, or unchanged.
    """
    import ray

    if mode == "never" or is_uri(spec.checkpoint):
        return spec
    if mode == "auto" and (not ray.is_initialized() or sum(bool(n.get("Alive")) for n in ray.nodes()) <= 1):
        return spec  # no cluster to ship to (e.g. `serve build`, or the builder called to check a config)
    try:
        data = pack_checkpoint(spec.checkpoint)
    except ConfigError:
        if mode == "always":
            raise
        logger.warning(
            "not shipping %s through the object store: it is too large; replicas load it from that path "
            "(shared storage) -- give a URI if other nodes cannot read it",
            spec.checkpoint,
        )
        return spec
    ref = ray.put(data)
    logger.info("shipping %s (%.1f MiB) to the replicas through the object store", spec.checkpoint, len(data) / 2**20)
    return VersionSpec(spec.name, spec.checkpoint, spec.weight, shipped=ref)


def fetch_checkpoint(spec: VersionSpec, cache_dir: str | Path = "", keep: int = 0) -> Path:
    """A local directory holding ``spec``'s checkpoint on this node (see the module docstring for the order).

    Raises:
        CheckpointError: neither a URI, nor a path on this node, nor a shipped copy.
    """
    if is_uri(spec.checkpoint):
        return _checkpoint_root(fetch_uri(spec.checkpoint, cache_dir, keep))
    path = Path(spec.checkpoint)
    if (path / "meta.json").is_file():
        return path
    if spec.shipped is not None:
        import ray

        key = f"{spec.checkpoint}:{spec.shipped.hex()}"
        # unpacked on this node already: no pull of the whole pack (none possible once its owner, the driver, is gone)
        cached = _cached(_cache_entry(cache_dir, f"shipped:{key}"), keep)
        return cached if cached is not None else unpack_checkpoint(ray.get(spec.shipped), key, cache_dir, keep)
    node = ""
    with contextlib.suppress(Exception):
        import ray

        node = f" on node {ray.get_runtime_context().get_node_id()[:12]}"
    raise CheckpointError(
        f"{spec.checkpoint}: no checkpoint at this path{node}; on a multi-node cluster put checkpoints on shared "
        "storage mounted at the same path, give a URI (s3://..., gs://...), or let the driver ship it "
        "(serve.ship_checkpoint=always)"
    )


# --------------------------------------------------------------------------------------------------------------
# Loaded versions
# --------------------------------------------------------------------------------------------------------------


def make_batcher(engine: GenerationEngine, cfg: ServeConfig, observer: Any = None) -> Batcher:
    """A version's scheduler, built as the replica always built its one (``serve.batching.Batcher``).

    Args:
        observer: the version's metrics observer (``serve.metrics.ServeMetrics.for_version``).
    """
    from serve.batching import Batcher

    extra = {"observer": observer} if observer is not None else {}
    return Batcher(
        engine,
        cfg.max_batch_size,
        cfg.batch_wait_timeout_s,
        prefill_first=cfg.prefill_first,
        stream_chunks_per_s=cfg.stream_chunks_per_s,
        **extra,
    )


@dataclass
class _SchedulerUsers:
    """A count shared by the versions that use one scheduler (:meth:`ServedVersion.renamed`)."""

    n: int = 0


class ServedVersion:
    """One loaded version: checkpoint info, tokenizer, engine and its own scheduler, plus a count of the requests
    that are using it (so a removed version is closed only once they are done).

    Exposes the scheduler's ``submit`` / ``stats`` / ``alive``, so the replica's ``batcher`` can be this object.
    """

    def __init__(
        self,
        spec: VersionSpec,
        checkpoint: Checkpoint,
        tokenizer: ChatTokenizer,
        engine: GenerationEngine,
        batcher: Batcher,
        max_positions: int,
        label: str,
        observer: VersionMetrics | None = None,
        users: _SchedulerUsers | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer
        self.engine = engine
        self.scheduler = batcher
        self.max_positions = max_positions
        self.label = label
        self.observer = observer
        self.owns_scheduler = True  # False once handed to a renamed twin (renamed): closing leaves it running
        self.loaded_at = time.time()
        self.inflight = 0
        self.users = users if users is not None else _SchedulerUsers()
        """Requests in flight on the scheduler, counted by every version that has used it (renamed twins share it)."""
        self.progress_at = time.monotonic()
        """When this version last handed a request something (or took its first request after being idle)."""
        self.closed = False

    @property
    def stats(self) -> BatchStats:
        return self.scheduler.stats

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    def __getattr__(self, name: str) -> Any:
        # Anything else a caller asks of "the batcher" (counters, queue depth added by the scheduler's owners).
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    async def submit(self, job: GenerationJob) -> AsyncIterator[StepItem]:
        """The scheduler's ``submit``, counted in :attr:`inflight` until the caller stops iterating; each item it
        hands out is progress (:meth:`stalled_s`)."""
        if self.inflight == 0:
            self.progress_at = time.monotonic()
        self.inflight += 1
        self.users.n += 1
        try:
            async for item in self.scheduler.submit(job):
                self.progress_at = time.monotonic()
                yield item
        finally:
            self.inflight -= 1
            self.users.n -= 1

    @property
    def busy(self) -> int:
        """Requests that closing this version would cut off: every request on its scheduler while it owns it (a
        renamed twin's predecessor may still be answering requests it took before the hand-over), else its own."""
        return self.users.n if self.owns_scheduler else self.inflight

    def stalled_s(self, now: float) -> float:
        """Seconds this version has had requests in flight without handing any of them anything (0 when idle).

        Why: a hung engine (a stuck engine process, a GPU that stopped answering) is still "alive", and requests'
        deadlines are applied by the decoding steps that no longer run, so nothing else notices. Streams get their
        tokens every chunk interval, plain requests every few steps and beam searches at their end, all within a
        request's lifetime."""
        return now - self.progress_at if self.inflight else 0.0

    def abort(self, reason: str) -> None:
        """Stop a hung engine process (:meth:`serve.engine_process.EngineProcess.abort`): its requests fail with a
        503 to retry, and its memory is freed for the replica that replaces this one. A generation thread of the
        replica's own (``serve.engine_process: false``) cannot be stopped: it is only reported."""
        abort = getattr(self.scheduler, "abort", None)
        if abort is not None:
            abort(reason)

    def describe(self, operator: bool, weight: float | None = None) -> dict[str, Any]:
        from serve.settings import default_model_version

        path = self.checkpoint.path
        return {
            "name": self.name,
            "checkpoint": str(path) if operator else default_model_version(path),
            **({"source": self.spec.checkpoint} if operator and self.spec.checkpoint != str(path) else {}),
            "stage": self.checkpoint.stage,
            "step": self.checkpoint.step,
            **({"weight": weight} if weight is not None else {}),
            "inflight": self.inflight,
            "alive": self.alive,
            "loaded_at": int(self.loaded_at),
        }

    def renamed(self, spec: VersionSpec, label: str) -> ServedVersion:
        """This version's model, engine and scheduler under ``spec``'s name and weight, with feedback ``label``:
        a config update that names a loaded checkpoint anew gets no second copy of the model. This object keeps
        answering the requests it has and hands the scheduler over (closing it after its drain leaves it running)."""
        twin = ServedVersion(
            spec,
            self.checkpoint,
            self.tokenizer,
            self.engine,
            self.scheduler,
            self.max_positions,
            label,
            self.observer,
            self.users,
        )
        if self.observer is not None:
            self.observer.rename(spec.name)
        self.observer, self.owns_scheduler = None, False
        return twin

    def close(self) -> None:
        """Stop the scheduler's generation threads or engine process, so the model's memory can be freed (a
        ``Batcher`` waits up to a step for its thread: call it off the event loop), and close its metrics observer
        (jobs it still had waiting leave the queue depth). A version whose scheduler went to a renamed twin only
        marks itself closed."""
        self.closed = True
        if not self.owns_scheduler:
            return
        if self.observer is not None:
            self.observer.close()
        try:
            self.scheduler.close()
        except Exception:  # noqa: BLE001 - closing is best effort: the version is out of the table already
            logger.exception("closing version %r failed", self.name)


def load_version(
    spec: VersionSpec,
    cfg: ServeConfig,
    precision: str,
    device: str,
    label: str = "",
    cache_dir: str = "",
    observer: VersionMetrics | None = None,
) -> ServedVersion:
    """Load ``spec``'s checkpoint (blocking: run it off the event loop) into a ready :class:`ServedVersion`.

    Args:
        spec: the version.
        cfg: the replica's ``serve`` settings (the scheduler's batch size and wait).
        precision: ``model.precision`` (``auto`` = bf16 on a GPU).
        device: ``cpu`` or ``cuda``.
        label: the feedback-store label; empty = ``<run>/<checkpoint dir>``.
        cache_dir: where URIs and shipped checkpoints are copied (``serve.checkpoint_cache``).
        observer: the version's metrics observer (``ServeMetrics.for_version(spec.name)``), passed to the scheduler.
    """
    import torch

    from rlchat.core.checkpoint import POLICY_STAGES, load_policy, read_checkpoint
    from rlchat.core.generation import GenerationEngine
    from serve.engine_process import EngineProcess, EngineSpec
    from serve.settings import default_model_version

    t0 = time.perf_counter()
    path = fetch_checkpoint(spec, cache_dir, cfg.checkpoint_cache_keep)
    if cfg.engine_process:
        # The weights live in the engine process only; this replica reads the tokenizer and metadata.
        ckpt = read_checkpoint(path, expect_stage=POLICY_STAGES)
        tok = ckpt.tokenizer
        engine_spec = EngineSpec(
            str(ckpt.path),
            device=device,
            precision=precision,
            max_batch_size=cfg.max_batch_size,
            batch_wait_timeout_s=cfg.batch_wait_timeout_s,
            prefill_first=cfg.prefill_first,
            stream_chunks_per_s=cfg.stream_chunks_per_s,
            torch_threads=torch.get_num_threads(),
            switch_interval_s=sys.getswitchinterval(),
        )
        scheduler: Any = EngineProcess(engine_spec, observer=observer)
        engine: Any = scheduler.info
    else:
        model, tok, ckpt = load_policy(path)  # on the CPU: cast there, then moved (for_inference)
        model.eval()
        engine = GenerationEngine.for_inference(model, tok, precision=precision, device=device)
        scheduler = make_batcher(engine, cfg, observer)
    max_positions = int(engine.max_positions or ckpt.config.model.n_positions)
    version = ServedVersion(
        spec,
        ckpt,
        tok,
        engine,
        scheduler,
        max_positions,
        label or default_model_version(ckpt.path),
        observer,
    )
    logger.info(
        "loaded version %r from %s (stage %s, step %d) on %s in %.1f s",
        spec.name,
        ckpt.path,
        ckpt.stage,
        ckpt.step,
        device,
        time.perf_counter() - t0,
    )
    return version


class _Binding:
    """The version a request was given; emptied when the request ends, so contexts that outlive it (tasks the
    request's libraries start) do not keep the version, and its model, in memory."""

    __slots__ = ("version",)

    def __init__(self, version: ServedVersion | None = None) -> None:
        self.version = version


class VersionScope:
    """ASGI middleware: each request's version binding lasts exactly as long as the request.

    Why: the binding lives in a context variable, and every task started during a request copies the request's
    context; ``sse_starlette`` starts a watcher task that never ends on the first stream of each event loop, so the
    context of that request, with its version, lived for the replica's life (a swapped-out version, say the first
    checkpoint ``--follow`` served, was never freed). Here the request's context holds a mutable binding that is
    emptied when the request, its stream included, is done.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        binding = _Binding()
        token = _CURRENT.set(binding)
        try:
            await self.app(scope, receive, send)
        finally:
            binding.version = None
            _CURRENT.reset(token)


def use_version(version: ServedVersion) -> None:
    """Bind ``version`` to the current request (its asyncio task's context; :class:`VersionScope` ends it)."""
    binding = _CURRENT.get()
    if binding is None:  # a route called without the middleware (in-process tests)
        _CURRENT.set(_Binding(version))
    else:
        binding.version = version


def bound_version_name() -> str:
    """The name of the version bound to the current request, or "" before one is (a request refused before its
    model was looked up: its metrics carry no version)."""
    binding = _CURRENT.get()
    return "" if binding is None or binding.version is None else binding.version.name


def current_version(default: ServedVersion) -> ServedVersion:
    """The version bound to the current request, else ``default``."""
    binding = _CURRENT.get()
    return default if binding is None or binding.version is None else binding.version


class ModelSet:
    """A replica's versions and the alias's traffic split; :meth:`apply` changes them in place.

    Args:
        alias: the app's model name (requests for it, or for none, are split by weight).
        aliases: other names that mean the alias (``rlchat``, the default model name).
    """

    def __init__(self, alias: str, aliases: Sequence[str] = ()) -> None:
        self.alias = alias
        self.aliases = {alias, *aliases}
        self.versions: dict[str, ServedVersion] = {}
        self.weights: dict[str, float] = {}
        self._credit: dict[str, float] = {}
        self._draining: list[ServedVersion] = []
        self._lock = asyncio.Lock()
        self.swaps = 0

    @property
    def default(self) -> ServedVersion:
        """The heaviest version (what alias-level fields in ``/readyz`` and ``/v1/models`` describe)."""
        return max(self.versions.values(), key=lambda v: self.weights.get(v.name, 0.0))

    def names(self) -> list[str]:
        return list(self.versions)

    def dead(self) -> list[str]:
        """The served versions whose scheduler (or engine process) no longer accepts work."""
        return [name for name, v in self.versions.items() if not v.alive]

    def stalled(self, after_s: float) -> list[str]:
        """The served versions that have had requests in flight for more than ``after_s`` without handing any of
        them anything (:meth:`ServedVersion.stalled_s`)."""
        now = time.monotonic()
        return [name for name, v in self.versions.items() if v.stalled_s(now) > after_s]

    def pick(self, model: str | None) -> ServedVersion | None:
        """The version for a request's ``model``: by name, or by weight for the alias / None; None if unknown.

        The split is a smooth weighted round-robin: each pick adds every version's weight to its credit, takes the
        version with the most credit and subtracts the total from it (deterministic, exact to within one request).
        """
        if model is not None and model not in self.aliases:
            return self.versions.get(model)
        live = [(n, w) for n, w in self.weights.items() if w > 0 and n in self.versions]
        if not live:
            return self.default
        total = sum(w for _, w in live)
        for n, w in live:
            self._credit[n] = self._credit.get(n, 0.0) + w
        name = max(live, key=lambda nw: self._credit[nw[0]])[0]
        self._credit[name] -= total
        return self.versions[name]

    def set(self, versions: Sequence[ServedVersion], weights: dict[str, float]) -> list[ServedVersion]:
        """Swap the table in one step; returns the versions that left it (to be drained)."""
        new = {v.name: v for v in versions}
        gone = [v for n, v in self.versions.items() if new.get(n) is not v]
        self.versions = new
        self.weights = dict(weights)
        self._credit = {n: c for n, c in self._credit.items() if n in new}
        self.swaps += 1
        return gone

    async def apply(
        self,
        specs: Sequence[VersionSpec],
        load: Callable[[VersionSpec], ServedVersion],
        label: Callable[[VersionSpec], str] | None = None,
    ) -> None:
        """Make ``specs`` the served set: load new or changed versions (``load`` runs on a loader thread), swap,
        then drain the versions that were replaced or removed. With ``label`` (a spec's feedback label), a spec
        naming the checkpoint of a version that is leaving takes that version's model over
        (:meth:`ServedVersion.renamed`) instead of loading it again.

        Raises:
            Exception: whatever a load raised; nothing was swapped then (the old set keeps serving).
        """
        async with self._lock:
            loop = asyncio.get_running_loop()
            staying = {
                s.name for s in specs if s.name in self.versions and self.versions[s.name].spec.source == s.source
            }
            spare = {v.spec.checkpoint: v for n, v in self.versions.items() if n not in staying}
            plan: list[tuple[VersionSpec, ServedVersion | None]] = []  # (spec, the loaded version it keeps or takes)
            for spec in specs:
                old = self.versions.get(spec.name)
                if old is not None and old.spec.source == spec.source:
                    plan.append((spec, old))
                elif label is not None and spec.checkpoint in spare:
                    plan.append((spec, spare.pop(spec.checkpoint)))
                else:
                    plan.append((spec, None))
            loaded: list[ServedVersion] = []
            try:  # every load first: one that fails leaves the served set (and what it would hand over) untouched
                for spec, have in plan:
                    if have is None:
                        loading = loop.run_in_executor(None, load, spec)
                        try:
                            loaded.append(await asyncio.shield(loading))
                        except asyncio.CancelledError:  # the thread goes on: close what it loads once it is done
                            loading.add_done_callback(_close_when_loaded)
                            raise
            except BaseException:
                for v in loaded:
                    v.close()
                raise
            fresh, keep = iter(loaded), []
            for spec, have in plan:
                if have is None:
                    keep.append(next(fresh))
                elif have.spec.source == spec.source:
                    keep.append(have)
                else:  # handed over (only planned with a label)
                    assert label is not None
                    keep.append(have.renamed(spec, label(spec)))
            gone = self.set(keep, {s.name: s.weight for s in specs})
            if loaded or gone:
                logger.info(
                    "versions now %s (loaded %s, draining %s)",
                    {s.name: s.weight for s in specs},
                    [v.name for v in loaded],
                    [v.name for v in gone],
                )
            for v in gone:
                self.drain(v)

    def drain(self, version: ServedVersion) -> None:
        """Close ``version`` in the background once it has no request in flight."""
        self._draining.append(version)

        async def wait_idle() -> None:
            t0 = time.monotonic()
            await asyncio.sleep(DRAIN_GRACE_S)
            while version.busy > 0 and time.monotonic() - t0 < DRAIN_TIMEOUT_S:
                await asyncio.sleep(0.1)
            if version.busy > 0:
                logger.warning(
                    "closing version %r with %d request(s) still running after %.0f s",
                    version.name,
                    version.busy,
                    DRAIN_TIMEOUT_S,
                )
            await asyncio.get_running_loop().run_in_executor(None, version.close)  # joins its generation thread
            self._draining.remove(version)
            logger.info("version %r (%s) drained and closed", version.name, version.checkpoint.path)

        asyncio.get_running_loop().create_task(wait_idle())

    @property
    def draining(self) -> list[ServedVersion]:
        return list(self._draining)

    def stats(self) -> BatchStats:
        """The replica's scheduler counters: every served and draining version's, a scheduler that two versions
        share counted once."""
        from serve.batching import BatchStats

        schedulers = {id(v.scheduler): v.stats for v in [*self.versions.values(), *self._draining]}
        return BatchStats.total(schedulers.values())

    def close_all(self) -> None:
        """Close every version, served or draining (the replica is stopping); blocking, off the event loop."""
        for version in [*self.versions.values(), *self._draining]:
            version.close()


def _close_when_loaded(loading: asyncio.Future) -> None:
    """A load whose update was cancelled (the replica is stopping) finished on the loader thread: close the
    version, off the event loop (closing joins its threads), so its engine and memory do not outlive the update."""
    if not loading.cancelled() and loading.exception() is None:
        asyncio.get_running_loop().run_in_executor(None, loading.result().close)


async def follow_run(
    run_dir: str,
    interval_s: float,
    current: Callable[[], Path],
    swap: Callable[[Path], Awaitable[None]],
    retry_s: float | None = None,
) -> None:
    """Every ``interval_s``, look up the run's best checkpoint; when it differs from ``current()``, ``swap`` to it.

    Errors (a run directory mid-write, a checkpoint that fails to load) are logged once per cause and retried at
    the next tick; the served model stays as it is meanwhile. A checkpoint that failed to load is tried again at
    once when its files change, else after ``retry_s`` (default ``max(60 s, 10 ticks)``), doubling up to an hour:
    each try may start an engine process that spends seconds failing, and the cause may pass (memory held by the
    old model, a slow network file system).
    """
    from rlchat.core.checkpoint import find_best_checkpoint

    loop = asyncio.get_running_loop()
    last_error = ""
    first_retry_s = retry_s if retry_s is not None else max(60.0, 10 * interval_s)
    failed: tuple[Path, tuple] | None = None  # the best checkpoint that failed to load, and its files then
    retry_at, backoff_s = 0.0, first_retry_s
    while True:
        await asyncio.sleep(interval_s)
        try:
            best = Path(await loop.run_in_executor(None, find_best_checkpoint, run_dir))
            if best.resolve() != Path(current()).resolve():
                files = await loop.run_in_executor(None, _files_signature, best)
                if failed == (best, files):
                    if time.monotonic() < retry_at:
                        continue  # unchanged since it failed: try again after the backoff
                    backoff_s = min(2 * backoff_s, 3600.0)
                else:
                    backoff_s = first_retry_s
                logger.info("follow: %s has a new best checkpoint %s; loading it", run_dir, best)
                failed, retry_at = (best, files), time.monotonic() + backoff_s
                await swap(best)
                failed = None
            last_error = ""
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - keep serving the current model and retry
            msg = f"{e.__class__.__name__}: {e}"
            if msg != last_error:
                logger.warning(
                    "follow: cannot switch to the best checkpoint of %s yet (%s); retrying every %g s%s",
                    run_dir,
                    msg,
                    interval_s,
                    f", a checkpoint that failed to load when its files change or in {backoff_s:g} s"
                    if failed is not None
                    else "",
                )
                last_error = msg


def _files_signature(directory: Path) -> tuple:
    """The (name, size, mtime) of every file under ``directory``: changes when a checkpoint is rewritten."""
    out = []
    for path in sorted(directory.rglob("*")):
        with contextlib.suppress(OSError):
            st = path.stat()
            out.append((str(path.relative_to(directory)), st.st_size, st.st_mtime_ns))
    return tuple(out)
