"""One typed rank group for every Ray Train stage: PPO's learner, SFT and the reward model.

The driver keeps its loop and calls methods; Ray Train only provides the worker group (placement, devices, the
``torch.distributed`` process group) and its restarts. :class:`RankGroup` starts one ``TorchTrainer.fit()`` per
stage (its start-up costs ~17 s on 2 cores, so never once per step); each rank builds a learner object with a
factory -- a top-level callable ``factory(ctx, *args)`` -- and then serves the driver's calls::

    group = RankGroup(LearnerRank, LearnerRank, (cfg.to_dict(), run_dir), cfg=cfg, run_dir=run_dir)
    metrics, weights, version = group.update(batch_ref, iteration)  # Learner.update on every rank; rank 0's result

The group mirrors the learner class: ``group.update(...)`` exists because ``learner_cls.update`` does (anything
else is an ``AttributeError`` on the driver). A method runs on every rank, in the same order on each (SPMD, so
collectives inside it line up), unless it is marked :func:`rank0_only`; the call returns rank 0's result.
Top-level ``ObjectRef`` arguments are fetched on each rank (one object-store read each); results travel back
through a Ray queue, or through the object store for methods marked ``rank0_only(large_result=True)``. The same
learner object runs in the driver process when there is no Ray (``RankContext()``), called directly.

Errors: a rank's exception comes back as an exception on the driver. An :class:`~rlchat.core.errors.RLChatError`
(a bad config, data or checkpoint) is re-raised as the same type with the same message, so the CLI prints one
clean line; anything else becomes a :class:`RankError` naming the rank and the method. Both carry the rank's
traceback text (``remote_traceback``). The rank itself keeps serving, so a user error never costs a restart.

Fault tolerance: ``ray.learner_max_failures`` is Ray Train's ``FailureConfig(max_failures=...)``. When a rank's
process dies (SIGKILL, OOM, a lost node) Ray Train restarts the whole worker group and the factory runs again on
every rank. Each incarnation of the group carries a token that rank 0 draws and broadcasts; commands and replies
carry it, so a new incarnation never executes a command meant for the old one, and old replies are dropped. When
the driver sees a complete new incarnation it raises :class:`RankGroupRestarted` from the call it was making (or
from the next call); the caller then brings the new learners to its last checkpoint -- the same code path as
``--resume`` (``PPOTrainer.run``, ``stages.train_loop``) -- and goes on. :attr:`RankGroup.generation` counts the
incarnations (0 = the first).

Fault injection for tests wraps the rank's learner, outside every learner method: ``RLCHAT_TEST_RANK_DIE_*``
(:mod:`rlchat.distributed.faults`) SIGKILLs a rank during the Nth call of a method: at its start, some seconds into
it, or once a path appears (e.g. a partial checkpoint's first file, to die mid-save). The driver forwards every
``RLCHAT_TEST_*`` variable to the workers (``RunConfig.worker_runtime_env``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from rlchat.core.errors import ConfigError, RLChatError
from rlchat.distributed import faults

if TYPE_CHECKING:
    from rlchat.core.config import Config

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_RANK0_ATTR = "__rlchat_rank0_only__"
_LARGE_ATTR = "__rlchat_large_result__"

# Message kinds. Driver -> rank: (_CALL, token, call_id, method, args, kwargs, large) or (_CLOSE,).
# Rank -> driver: (kind, token, call_id, rank, payload) with kind one of _HELLO, _READY, _RESULT, _ERROR.
_CALL, _CLOSE = "call", "close"
_HELLO, _READY, _RESULT, _ERROR = "hello", "ready", "result", "error"


def rank0_only(fn: F | None = None, *, large_result: bool = False) -> Any:
    """Mark a learner method that only rank 0 runs (no collectives inside: the other ranks never see the call).

    ``large_result=True`` sends the result through the object store instead of the reply queue (weights, optimizer
    state); the driver receives the value either way. Use as ``@rank0_only`` or ``@rank0_only(large_result=True)``.
    """

    def mark(f: F) -> F:
        setattr(f, _RANK0_ATTR, True)
        setattr(f, _LARGE_ATTR, large_result)
        return f

    return mark(fn) if fn is not None else mark


@dataclass(frozen=True)
class RankContext:
    """Where a learner object runs: handed to the factory on each rank (or built by hand in the driver process).

    Attributes:
        rank, world: data-parallel coordinates (``torch.distributed`` is initialised when ``world > 1``).
        device: the device this rank trains on.
        remote: True on a Ray Train rank: :meth:`share` then puts objects into the object store.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    remote: bool = False

    def share(self, obj: Any) -> Any:
        """``obj`` as the driver should receive it: an ``ObjectRef`` on a Ray rank (the driver hands it on without
        fetching it, e.g. weights to rollout workers), the object itself in the driver process."""
        if not self.remote:
            return obj
        import ray

        return ray.put(obj)


class RankError(RLChatError):
    """A rank of a :class:`RankGroup` failed in a method (or while building its learner).

    Attributes:
        rank: the rank that failed. method: the method (``"<build>"`` for the factory). remote_type: the remote
        exception's class name. remote_traceback: the rank's traceback text.
    """

    def __init__(
        self, message: str, *, rank: int = -1, method: str = "", remote_type: str = "", remote_traceback: str = ""
    ) -> None:
        super().__init__(message)
        self.rank, self.method = rank, method
        self.remote_type, self.remote_traceback = remote_type, remote_traceback


class RankGroupRestarted(RLChatError):
    """Ray Train restarted the worker group (a rank's process died): the call in flight, if any, is lost and the
    learners are freshly built. The caller restores its last checkpoint into them and continues."""

    def __init__(self, name: str, generation: int) -> None:
        super().__init__(
            f"{name}: a Ray Train worker died and the worker group was restarted (incarnation {generation}); "
            "restoring the last checkpoint"
        )
        self.generation = generation


@dataclass(frozen=True)
class _RemoteFailure:
    """What a rank sends back about an exception (picklable without the exception's class on the driver)."""

    rank: int
    method: str
    module: str
    qualname: str
    message: str
    traceback: str

    @classmethod
    def capture(cls, e: BaseException, rank: int, method: str) -> _RemoteFailure:
        t = type(e)
        text = "".join(traceback.format_exception(t, e, e.__traceback__))
        return cls(rank, method, t.__module__, t.__qualname__, str(e), text)

    def exception(self, group: str) -> Exception:
        """The driver-side exception: the same RLChatError type and message, else a :class:`RankError`."""
        import importlib

        where = f"{group} rank {self.rank} failed in {self.method}()"
        error = RankError(
            f"{where}: {self.qualname}: {self.message}",
            rank=self.rank,
            method=self.method,
            remote_type=self.qualname,
            remote_traceback=self.traceback,
        )
        error.add_note(f"--- traceback on {group} rank {self.rank} ---\n{self.traceback}")
        try:
            cls: Any = importlib.import_module(self.module)
            for part in self.qualname.split("."):
                cls = getattr(cls, part)
            if isinstance(cls, type) and issubclass(cls, RLChatError) and not issubclass(cls, RankError):
                same = cls(self.message)
                same.remote_traceback = self.traceback  # type: ignore[attr-defined]
                same.__cause__ = error
                return same
        except Exception:  # noqa: BLE001 - a class we cannot rebuild: report it as a RankError
            logger.debug("could not rebuild %s.%s on the driver", self.module, self.qualname, exc_info=True)
        logger.error("%s:\n%s", where, self.traceback)
        return error


# ---------------------------------------------------------------------------------------------------- rank side


def _fetch(values: Any) -> Any:
    """Top-level ObjectRefs of an argument tuple or dict, fetched (nested ones stay refs)."""
    import ray

    if isinstance(values, dict):
        return {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in values.items()}
    return [ray.get(v) if isinstance(v, ray.ObjectRef) else v for v in values]


def _incarnation_token(world: int, device: torch.device) -> str:
    """A token every rank of this incarnation shares: drawn by rank 0, broadcast over the process group."""
    token = uuid.uuid4().hex
    if world > 1:
        import torch.distributed as dist

        box = [token]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        token = box[0]
    return token


def _rank_main(spec: dict[str, Any]) -> None:
    """``train_loop_per_worker``: the preamble every stage shares, the factory, then serve calls until closed."""
    import ray
    import ray.train
    import ray.train.torch

    from rlchat.distributed.cluster import torch_thread_budget
    from rlchat.distributed.rollout import set_torch_threads

    train_ctx = ray.train.get_context()
    requested, reserved, overlap = spec["threads"]
    set_torch_threads(torch_thread_budget(requested, reserved, train_ctx.get_local_world_size(), overlap))
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    device = ray.train.torch.get_device() if spec["use_gpu"] else torch.device("cpu")
    token = _incarnation_token(world, device)
    name, commands, replies = spec["name"], spec["commands"][rank], spec["replies"]
    try:
        actor = ray.get_runtime_context().current_actor  # lets the driver end a rank stuck in a collective
    except Exception:  # noqa: BLE001 - not an actor (never under Ray Train); shutdown then only asks
        actor = None
    replies.put((_HELLO, token, None, rank, actor))
    ctx = RankContext(rank=rank, world=world, device=device, remote=True)
    learner: Any = None
    build_error: BaseException | None = None
    try:
        # the fault-injection seam: a proxy around the learner when a test armed one (faults.RANK), else the learner
        learner = faults.wrap(spec["factory"](ctx, *_fetch(spec["args"])), faults.RANK, rank)
    except Exception as e:  # reported; the rank then waits for "close", so a user error never costs a restart
        logger.exception("%s rank %d: building the learner failed", name, rank)
        build_error = e
        replies.put((_ERROR, token, None, rank, _RemoteFailure.capture(e, rank, "<build>")))
    else:
        replies.put((_READY, token, None, rank, None))
    while True:
        message = commands.get()
        if message[0] == _CLOSE:
            return
        _, msg_token, call_id, method, args, kwargs, large = message
        if msg_token != token:
            continue  # meant for an earlier incarnation of the group
        try:
            if learner is None:
                raise RLChatError(f"{name} rank {rank}: its learner could not be built ({build_error})")
            result = getattr(learner, method)(*_fetch(args), **_fetch(kwargs))
            if rank != 0:
                result = None  # the other ranks only acknowledge
            elif large:
                result = ray.put(result)
            replies.put((_RESULT, token, call_id, rank, result))
        except Exception as e:  # back to the driver; this rank keeps serving
            logger.exception("%s rank %d failed in %s()", name, rank, method)
            replies.put((_ERROR, token, call_id, rank, _RemoteFailure.capture(e, rank, method)))


# ---------------------------------------------------------------------------------------------------- driver side


class RankGroup:
    """The driver's handle on ``cfg.ray.learner_workers`` ranks, each holding one learner object (module docstring).

    Args:
        learner_cls: the class of the learner objects; the group's methods mirror its public methods.
        factory: a top-level callable ``factory(ctx: RankContext, *args) -> learner`` run on every rank (the class
            itself works). It runs again on every rank after a restart.
        args: its arguments (picklable; top-level ObjectRefs are fetched on each rank).
        cfg: the run config: ``ray.learner_workers`` ranks with ``ray.learner_cpus`` CPUs, a GPU each when
            ``ray.learner_use_gpu``, ``ray.learner_resources``, ``ray.learner_threads`` torch threads (auto:
            :func:`rlchat.distributed.cluster.torch_thread_budget`), ``ray.learner_max_failures`` restarts.
        run_dir: the run directory (Ray Train's own files go to ``run_dir/ray_train``).
        name: what messages call the group (``learner``, ``sft``, ``rm``).
        overlap: whether rollouts sample while this group trains (the thread budget then keeps to the reservation).
        timeout_s: the longest a call may take before the driver gives up.

    Raises:
        ConfigError: ``ray.learner_workers < 1``.
    """

    def __init__(
        self,
        learner_cls: type,
        factory: Callable[..., Any],
        args: tuple[Any, ...] = (),
        *,
        cfg: Config,
        run_dir: str | Path,
        name: str = "learner",
        overlap: bool = False,
        timeout_s: float = 1800.0,
    ) -> None:
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        r = cfg.ray
        if r.learner_workers < 1:
            raise ConfigError(f"ray.learner_workers={r.learner_workers!r}: a rank group needs at least 1 worker")
        self.learner_cls, self.name, self.world, self.timeout_s = learner_cls, name, r.learner_workers, timeout_s
        self.max_failures = r.learner_max_failures
        self.generation = -1  # 0 once the first incarnation is up
        self._token: str | None = None
        self._retired: set[str] = set()
        self._ready: dict[str, set[int]] = {}
        self._actors: dict[str, dict[int, Any]] = {}
        self._call_id = 0
        self._results: dict[int, Any] = {}
        self._closed = False
        # queues are tiny actors owned by this driver: they outlive every incarnation of the worker group and hold
        # only commands, small results and ObjectRefs
        self._commands = [Queue(actor_options={"num_cpus": 0}) for _ in range(self.world)]
        self._replies = Queue(actor_options={"num_cpus": 0})
        scaling = ray.train.ScalingConfig(
            num_workers=self.world,
            use_gpu=r.learner_use_gpu,
            resources_per_worker={"CPU": r.learner_cpus, **r.learner_resources},
        )
        test_env = faults.forwarded_env()
        run_config = ray.train.RunConfig(
            name=f"{name}-{int(time.time() * 1000)}",
            storage_path=str(Path(run_dir).resolve() / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=r.learner_max_failures),
            worker_runtime_env={"env_vars": test_env} if test_env else None,  # type: ignore[call-arg]  # Train V2
        )
        spec = {
            "name": name,
            "factory": factory,
            "args": tuple(args),
            "commands": self._commands,
            "replies": self._replies,
            "threads": (r.learner_threads, r.learner_cpus, overlap),
            "use_gpu": r.learner_use_gpu,
        }
        self.trainer = TorchTrainer(_rank_main, train_loop_config=spec, scaling_config=scaling, run_config=run_config)
        self._fit_error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, name=f"rlchat-{name}-ranks", daemon=True)
        self._thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # surfaced by the next wait
            self._fit_error = e

    # ------------------------------------------------------------------------------------------------ calls
    def __getattr__(self, method: str) -> Callable[..., Any]:
        cls = self.__dict__.get("learner_cls")
        if cls is None or method.startswith("_") or not callable(getattr(cls, method, None)):
            raise AttributeError(f"{type(self).__name__} has no learner method {method!r}")

        def remote_method(*args: Any, **kwargs: Any) -> Any:
            return self.call(method, *args, **kwargs)

        remote_method.__name__ = method
        return remote_method

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``learner.method(*args, **kwargs)`` on every rank (rank 0 only if marked) and return rank 0's result.

        Raises:
            RankGroupRestarted: the worker group restarted before or during the call (the call is lost).
            RLChatError: a rank raised one (same type and message); RankError: a rank raised anything else, or the
                worker group stopped for good (Ray Train gave up after ``ray.learner_max_failures`` restarts).
        """
        fn = getattr(self.learner_cls, method, None)
        if method.startswith("_") or not callable(fn):
            raise AttributeError(f"{self.learner_cls.__name__} has no method {method!r}")
        if self._closed:
            raise RLChatError(f"{self.name}: the rank group was shut down; no more calls")
        deadline = time.monotonic() + self.timeout_s
        self._poll(deadline, block=False)  # a restart between calls is reported now, before sending anything
        while self._token is None:
            self._poll(deadline)
        large = bool(getattr(fn, _LARGE_ATTR, False))
        ranks = [0] if getattr(fn, _RANK0_ATTR, False) else list(range(self.world))
        self._call_id += 1
        self._results = {}
        message = (_CALL, self._token, self._call_id, method, tuple(args), dict(kwargs), large)
        for r in ranks:
            self._commands[r].put(message)
        while len(self._results) < len(ranks):
            self._poll(deadline)
        result = self._results[0]
        if large:
            import ray

            result = ray.get(result)
        return result

    def _poll(self, deadline: float, block: bool = True) -> None:
        """Handle the next reply (block: waiting up to a second at a time until ``deadline``)."""
        from ray.util.queue import Empty

        while True:
            try:
                message = self._replies.get(timeout=1.0) if block else self._replies.get(block=False)
            except Empty:
                if not block:
                    return
                if not self._thread.is_alive():
                    self._raise_stopped()
                if time.monotonic() > deadline:
                    raise RankError(
                        f"{self.name}: no answer from the rank group within {self.timeout_s:.0f} s"
                    ) from None
                continue
            self._handle(message)
            if block:
                return

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind, token, call_id, rank, payload = message
        if token in self._retired:
            return  # from an incarnation that is gone
        if kind == _HELLO:
            self._actors.setdefault(token, {})[rank] = payload
        elif kind == _READY:
            ready = self._ready.setdefault(token, set())
            ready.add(rank)
            if len(ready) == self.world and token != self._token:
                if self._token is not None:
                    self._retired.add(self._token)
                self._token, self.generation = token, self.generation + 1
                self._results = {}
                logger.info("%s: %d rank(s) up (incarnation %d)", self.name, self.world, self.generation)
                if self.generation > 0:
                    raise RankGroupRestarted(self.name, self.generation)
        elif kind == _ERROR:
            # a failed build (no call id) of any live incarnation, or a failure of the call in flight
            if call_id is None or (token == self._token and call_id == self._call_id):
                raise payload.exception(self.name)
        elif kind == _RESULT and token == self._token and call_id == self._call_id:
            self._results[rank] = payload

    def _raise_stopped(self) -> None:
        from ray.util.queue import Empty

        while True:  # a rank's last error explains more than Ray Train's summary
            try:
                self._handle(self._replies.get(block=False))
            except Empty:
                break
        error = self._fit_error

        def first_line(e: BaseException) -> str:
            lines = str(e).strip().splitlines()
            return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__

        failures = getattr(error, "worker_failures", None) or {}
        if failures:  # Ray Train's WorkerGroupError: one exception per failed rank
            why = "; ".join(f"rank {rank}: {first_line(e)}" for rank, e in sorted(failures.items()))
        else:
            why = first_line(error) if error is not None else "it finished"
        raise RankError(
            f"{self.name}: the Ray Train worker group stopped ({why}); after a worker dies Ray Train restarts the "
            f"group at most ray.learner_max_failures={self.max_failures} times -- continue the run with --resume",
            remote_type=type(error).__name__ if error is not None else "",
            remote_traceback=str(error or ""),
        ) from error

    # ------------------------------------------------------------------------------------------------ shutdown
    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every rank and end the ``fit()``; a rank that does not stop within ``timeout_s`` is killed."""
        import ray

        if self._closed:
            return
        self._closed = True
        try:
            if self._thread.is_alive():
                self._close_queues()
                self._thread.join(timeout_s)
            if self._thread.is_alive():  # stuck in a call or a collective: end the processes
                logger.warning("%s: ranks did not stop within %.0f s; killing them", self.name, timeout_s)
                for actors in self._actors.values():
                    for actor in actors.values():
                        if actor is not None:
                            with contextlib.suppress(Exception):  # already gone
                                ray.kill(actor, no_restart=True)
                self._close_queues()  # for an incarnation Ray Train may still start
                self._thread.join(timeout_s)
        finally:
            for q in [*self._commands, self._replies]:
                with contextlib.suppress(Exception):  # already gone
                    q.shutdown(force=True)

    def _close_queues(self) -> None:
        for q in self._commands:
            with contextlib.suppress(Exception):  # already gone
                q.put((_CLOSE,))
