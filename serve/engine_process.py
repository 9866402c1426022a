"""The replica's decode loop in a process of its own (``serve.engine_process``, on by default).

Why: a decoding step of the demo-size model is ~300 small torch ops, and every op releases the GIL. In the
replica's own interpreter the HTTP side (uvicorn, Ray Serve's asyncio thread and core-worker threads, SSE chunks,
metrics) takes the GIL back at each of those hand-offs, so a 16-row step that costs 1.85 ms alone took 9-12 ms under
16 streaming clients (profile in ``bench/README.md``, "Serve load"). A second process has its own GIL: the decode
loop runs at its own speed and the replica only moves requests in and tokens out. vLLM's engine core runs apart from
its API server for the same reason.

How: the replica (:class:`EngineProcess`) starts a Python process running :func:`main` with one end of a
``socket.socketpair`` and sends it an :class:`EngineSpec` (where the checkpoint is, device, precision, batch
settings). The child loads the model and runs an ordinary :class:`serve.batching.Batcher` -- the same continuous
batching, deadlines, cancellation and beam thread as in-process -- on its own event loop. Messages are pickled
tuples over the socket (``multiprocessing.connection``):

- replica -> engine: ``("submit", rid, job)``, ``("finish", rid, choices)`` (the request side ended those rows:
  client gone, stop string, safety filter), ``("close",)``.
- engine -> replica: lists of ``("item", rid, StepItem)``, ``("step", rows, queued, seconds, admitted)`` and
  ``("tokens", n)`` (tokens generated outside the steps), one list per event-loop tick (one ``send`` for every job's
  share of a step).

A reader thread in the replica receives them and posts each list to the callers' event loop in one callback. The
replica never loads the weights (only the checkpoint's tokenizer and metadata), so a GPU replica holds one copy.
When the replica dies the socket closes and the engine exits; when the engine dies every request still running gets
an error and :attr:`EngineProcess.alive` turns False (Serve's health check then replaces the replica).

Why not Ray for this (an actor, a compiled graph): an actor call per step costs milliseconds of Python on both
sides, which is what this module takes off the hot path; and the engine must live and die with its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from serve.batching import BatchStats, GenerationJob, SchedulerStopped, StepItem, StreamControl, count_step
from serve.heap import freeze_heap

logger = logging.getLogger(__name__)

FD_ENV = "RLCHAT_ENGINE_FD"
"""The environment variable that tells the child which file descriptor is its end of the socket pair."""

CHILD_COMMAND = "import sys; from serve.engine_process import main; sys.exit(main())"
"""How the child starts: imported by name (not ``-m``), so the classes it pickles are ``serve.engine_process``'s."""

GENERATION_FAILED = 3
"""The engine process's exit code when its scheduler's generation thread died (the reason is on its stderr)."""

WATCH_INTERVAL_S = 0.25
"""How often the engine process checks that its scheduler's generation thread is alive."""

START_TIMEOUT_S = 600.0
"""Longest the replica waits for the engine to load its checkpoint (a large model from a slow disk)."""


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process needs to build its engine and scheduler (pickled to the child)."""

    checkpoint: str
    """A local checkpoint directory (already fetched / unpacked by the replica)."""
    device: str = "cpu"
    precision: str = "auto"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0
    prefill_first: bool = False
    stream_chunks_per_s: float = 0.0
    torch_threads: int = 1
    switch_interval_s: float = 0.0005


@dataclass(frozen=True)
class EngineInfo:
    """What the replica needs to know of the engine it does not hold (the child reports it once loaded)."""

    vocab_size: int
    max_positions: int | None
    device: str
    pid: int


class EngineStartError(RuntimeError):
    """The engine process could not load its checkpoint or exited before it was ready."""


def _portable_error(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (the replica maps its type to an HTTP code), else a RuntimeError with its
    text (a library exception whose constructor takes other arguments than its message)."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any unpicklable exception becomes its text
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _portable(item: StepItem) -> StepItem:
    if isinstance(item.done, BaseException):
        item.done = _portable_error(item.done)
    return item


# ------------------------------------------------------------------------------------------------------------------
# The replica's side
# ------------------------------------------------------------------------------------------------------------------


class EngineProcess:
    """The replica's handle on its engine process; the same interface as :class:`serve.batching.Batcher`
    (``submit``, ``stats``, ``queue_depth``, ``active_rows``, ``alive``, ``close``).

    Args:
        spec: the engine to build.
        observer: optional :class:`serve.batching.BatchObserver` (metrics), called on the callers' event loop.
        start_timeout_s: longest wait for the engine to be ready.

    Raises:
        EngineStartError: the checkpoint could not be loaded (the child's error text), or the child died.
    """

    def __init__(self, spec: EngineSpec, observer: Any = None, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.spec = spec
        self.observer = observer
        self.stats = BatchStats()
        self.queue_depth = 0
        """Jobs the engine had waiting to join its batch at its last reported step."""
        self.active_rows = 0
        """Rows the engine decoded at its last reported step."""
        self._closed = False
        self._dead: str | None = None
        self._callers: dict[int, tuple[asyncio.Queue, asyncio.AbstractEventLoop, int]] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._report_loop: asyncio.AbstractEventLoop | None = None
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env[FD_ENV] = str(child.fileno())
        # The child imports serve/ and rlchat/ as this process does (a Ray runtime_env's working_dir included).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD_COMMAND], env=env, pass_fds=(child.fileno(),), close_fds=True
            )
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        try:
            self.conn.send(spec)
            self.info = self._wait_ready(start_timeout_s)
        except BaseException:
            self._kill()
            raise
        self._reader = threading.Thread(target=self._read, name="rlchat-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> EngineInfo:
        until = time.monotonic() + timeout_s
        while not self.conn.poll(0.1):
            if self.proc.poll() is not None:
                raise EngineStartError(f"the engine process exited with code {self.proc.returncode} while loading "
                                       f"{self.spec.checkpoint}; its log is the replica's stderr")  # fmt: skip
            if time.monotonic() > until:
                raise EngineStartError(f"the engine process did not load {self.spec.checkpoint} in {timeout_s:g} s")
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError) as e:
            raise EngineStartError(f"the engine process closed its connection while loading ({e})") from None
        if kind != "ready":
            raise EngineStartError(str(payload))
        return payload

    # -------------------------------------------------------------------------------------------- public API
    @property
    def alive(self) -> bool:
        """Whether the engine still accepts work (Serve's health check)."""
        return not self._closed and self._dead is None and self.proc.poll() is None

    async def submit(self, job: GenerationJob) -> AsyncIterator[StepItem]:
        """The job's share of every generation step until its :attr:`StepItem.done` (iterate it).

        The request side ends rows with ``job.control.end(...)``; a caller that stops iterating before ``done``
        ends all of them.
        """
        loop = asyncio.get_running_loop()
        self._report_loop = loop  # step counts go to the latest caller's loop (a replica has one)
        if not self.alive:
            raise SchedulerStopped(self._dead or "the replica's engine process has stopped")
        rid = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        n = len(job.seeds)
        self._callers[rid] = (queue, loop, n)
        if self._dead is not None:  # the reader failed the callers it had just before this one registered
            self._callers.pop(rid, None)
            raise SchedulerStopped(self._dead)
        job.control.listener = lambda choices: self._send(("finish", rid, sorted(choices)))
        # The engine gets its own StreamControl (the rows already ended go with it); later ends follow as messages.
        self._send(("submit", rid, replace(job, control=StreamControl(set(job.control.finish)))))
        done = False
        try:
            while True:
                item = await queue.get()
                done = item.done is not None
                yield item
                if done:
                    return
        finally:
            self._callers.pop(rid, None)
            job.control.listener = None
            if not done:
                self._send(("finish", rid, list(range(n))))

    def close(self) -> None:
        """Stop the engine after its current step; requests still running get an error."""
        if self._closed:
            return
        self._closed = True
        self._send(("close",))
        threading.Thread(target=self._reap, name="rlchat-engine-reap", daemon=True).start()

    # -------------------------------------------------------------------------------------------- internals
    def _send(self, msg: tuple) -> None:
        if self._dead is not None:
            return
        try:
            with self._send_lock:
                self.conn.send(msg)
        except (OSError, ValueError) as e:  # the engine is gone: the reader fails the callers
            logger.warning("cannot reach the engine process (%s)", e)

    def _read(self) -> None:
        """The reader thread: every list of engine messages is posted to the callers' event loops at once."""
        while True:
            try:
                msgs = self.conn.recv()
            except (EOFError, OSError):
                break
            out: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepItem]]] = {}
            reports = []
            for msg in msgs:
                if msg[0] == "item":
                    caller = self._callers.get(msg[1])
                    if caller is not None:
                        out.setdefault(caller[1], []).append((caller[0], msg[2]))
                else:
                    reports.append(msg)
            if reports and self._report_loop is not None and self._report_loop not in out:
                out[self._report_loop] = []
            for i, (loop, batch) in enumerate(out.items()):
                with contextlib.suppress(RuntimeError):  # that caller's loop is closed: no one is listening
                    loop.call_soon_threadsafe(self._deliver, batch, reports if i == 0 else [])
        self._fail_callers(self.proc.wait())

    def abort(self, reason: str) -> None:
        """Stop a hung engine now: its requests fail with ``SchedulerStopped(reason)`` (a 503 to retry where no
        token was out yet) and the process is killed. The callers are failed here, not when the process exits: one
        stuck in the kernel (a GPU driver call) exits only once that call returns."""
        if self._dead is None:
            self._fail_callers(reason=reason)
        with contextlib.suppress(OSError):
            self.proc.kill()  # reaped by the reader thread once it exits

    def _fail_callers(self, code: int | None = None, reason: str | None = None) -> None:
        """The engine exited with ``code`` (the reader thread), or was aborted for ``reason``: mark it dead, then
        fail every registered caller. :meth:`submit` registers first and checks :attr:`_dead` after, so a caller
        registered while this runs is either in the list taken here or sees the engine dead."""
        if reason is None:
            if self._dead is not None:  # aborted: its callers were failed then, and the exit is the abort's
                return
            why = "; its generation thread failed (see the replica's stderr)" if code == GENERATION_FAILED else ""
            reason = f"the replica's engine process exited (code {code}){why}"
            if not self._closed:
                logger.error("%s; failing the requests it was running", reason)
        self._dead = reason
        error = SchedulerStopped(self._dead)
        for rid, (queue, loop, n) in list(self._callers.items()):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, StepItem([[] for _ in range(n)], error))
            self._callers.pop(rid, None)

    def _deliver(self, batch: list[tuple[asyncio.Queue, StepItem]], reports: list[tuple]) -> None:
        """On an event loop: hand the items to their callers, count the steps, tell the observer."""
        for queue, item in batch:
            queue.put_nowait(item)
        for msg in reports:
            if msg[0] == "tokens":
                if self.observer is not None:
                    self.observer.on_tokens(msg[1])
                continue
            _, rows, queued, seconds, admitted = msg
            self.queue_depth, self.active_rows = queued, rows
            count_step(self.stats, self.observer, rows, queued, seconds, admitted)

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
        with contextlib.suppress(OSError):
            self.conn.close()

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------------------------
# The engine's side (the child process)
# ------------------------------------------------------------------------------------------------------------------


class _Outbox:
    """Messages for the replica, sent as one list per event-loop tick; also the child Batcher's observer."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.loop = loop
        self.msgs: list[tuple] = []
        self.admitted = 0

    def put(self, msg: tuple) -> None:
        if not self.msgs:
            self.loop.call_soon(self.flush)  # after the other callers woken by the same step have put theirs
        self.msgs.append(msg)

    def flush(self) -> None:
        msgs, self.msgs = self.msgs, []
        if msgs:
            with contextlib.suppress(OSError):  # the replica is gone: the reader below stops the loop
                self.conn.send(msgs)

    def on_admit(self, n_jobs: int) -> None:
        self.admitted += n_jobs

    def on_step(self, rows: int, queued: int, seconds: float) -> None:
        self.put(("step", rows, queued, seconds, self.admitted))
        self.admitted = 0

    def on_queue(self, queued: int) -> None:
        self.on_step(0, queued, 0.0)  # the replica's count_step reports it as the queue depth alone

    def on_tokens(self, n: int) -> None:
        self.put(("tokens", n))


async def _serve(conn: Connection, spec: EngineSpec, engine: Any) -> int:
    """Run jobs from the replica on a :class:`Batcher` until the replica closes the connection or says close (0),
    or the scheduler's generation thread has died (:data:`GENERATION_FAILED`); returns the exit code."""
    from serve.batching import Batcher

    loop = asyncio.get_running_loop()
    outbox = _Outbox(conn, loop)
    batcher = Batcher(
        engine,
        spec.max_batch_size,
        spec.batch_wait_timeout_s,
        observer=outbox,
        prefill_first=spec.prefill_first,
        stream_chunks_per_s=spec.stream_chunks_per_s,
    )
    jobs: dict[int, GenerationJob] = {}
    tasks: set[asyncio.Task] = set()  # referenced until done (the loop keeps only weak references)
    stopped = loop.create_future()

    async def run(rid: int, job: GenerationJob) -> None:
        try:
            async for item in batcher.submit(job):
                outbox.put(("item", rid, _portable(item)))
        except Exception as e:  # noqa: BLE001 - the job's failure is its result
            outbox.put(("item", rid, StepItem([[] for _ in job.seeds], _portable_error(e))))
        finally:
            jobs.pop(rid, None)

    def on_readable() -> None:
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "submit":
                    jobs[msg[1]] = msg[2]
                    task = loop.create_task(run(msg[1], msg[2]))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif msg[0] == "finish":
                    job = jobs.get(msg[1])
                    if job is not None:
                        job.control.finish.update(msg[2])
                elif msg[0] == "close" and not stopped.done():
                    stopped.set_result(0)
        except (EOFError, OSError):  # the replica is gone
            if not stopped.done():
                stopped.set_result(0)

    async def watch() -> None:
        # The child lives for its scheduler: once the generation thread has died (it failed its jobs with the
        # reason, logged on stderr) every later job would fail too, while the replica's health check, which sees
        # only this process, stayed green. Exiting lets the replica report unhealthy and Serve replace it.
        while not stopped.done():
            await asyncio.sleep(WATCH_INTERVAL_S)
            if not batcher.alive and not stopped.done():
                stopped.set_result(GENERATION_FAILED)

    watcher = loop.create_task(watch())
    loop.add_reader(conn.fileno(), on_readable)
    code = await stopped
    loop.remove_reader(conn.fileno())
    watcher.cancel()
    batcher.close()
    if tasks:  # the jobs' last items (their errors, when the scheduler died) reach the replica before the exit
        await asyncio.wait(tasks, timeout=5.0)
    outbox.flush()
    return code


def load_engine(spec: EngineSpec) -> Any:
    """The generation engine of ``spec``'s checkpoint (the same loading as an in-process replica)."""
    from rlchat.core.checkpoint import load_policy
    from rlchat.core.generation import GenerationEngine

    model, tok, _ = load_policy(spec.checkpoint)  # on the CPU: cast there, then moved (for_inference)
    model.eval()
    return GenerationEngine.for_inference(model, tok, precision=spec.precision, device=spec.device)


def main() -> int:
    """The engine process: read the spec, load, say ready (or why not), serve until the replica goes."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s engine %(process)d -- %(message)s")
    conn = Connection(int(os.environ.pop(FD_ENV)))
    spec: EngineSpec = conn.recv()
    import torch

    torch.set_num_threads(max(1, spec.torch_threads))
    sys.setswitchinterval(spec.switch_interval_s)
    try:
        engine = load_engine(spec)
    except Exception as e:  # noqa: BLE001 - the replica raises it with this text
        conn.send(("failed", f"{spec.checkpoint}: {type(e).__name__}: {e}"))
        return 1
    freeze_heap()  # no full garbage collection walks the model and libraries mid-step (serve/heap.py)
    info = EngineInfo(int(engine.vocab_size), engine.max_positions, str(engine.device), os.getpid())
    conn.send(("ready", info))  # the engine's own device: where the weights went, not the spec echoed back
    return asyncio.run(_serve(conn, spec, engine))
