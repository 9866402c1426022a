"""Generation scheduling for a replica: continuous batching of requests on one generation thread.

Every request becomes a :class:`GenerationJob` (a prompt, its sampling settings, one seed per choice). Its rows
join the replica's running decode batch (:class:`serve.decode_batch.DecodeBatch`) at the next decoding step and
leave it when they end (stop token, stop string, budget, the model's position limit, the request side's
:attr:`StreamControl.finish`, the job's deadline), so a new request never waits for the running ones to finish.

- :class:`BatchRun` is the step loop's state: the jobs in the batch and their replies so far. :meth:`BatchRun.add`
  takes a job at any time; :meth:`BatchRun.step` advances every job by one token. It needs no Ray (unit-tested
  directly; :func:`run_jobs` runs jobs to completion).
- :class:`Batcher` is the replica's scheduler: an asyncio loop that admits waiting jobs (up to
  ``serve.max_batch_size``), runs one :meth:`BatchRun.step` at a time on the single generation thread and hands
  every caller its share of each step (:class:`StepItem`). Beam searches run whole on a second thread, so they do
  not stall the streams of the decode batch.

Why not Ray Serve's ``@serve.batch`` (used before): it forms a batch from its queue and hands it to the method as a
fixed list; a batch runs to completion and Serve has no way to admit a request into a batch that is running. With
lock-step batches a request waited for the running batch to end, and at 16 closed-loop clients the two halves of
the clients alternated (mean batch 8; bench/README.md, "Serve load").
"""

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rlchat.core.errors import RLChatError
from rlchat.core.generation import FINISH_LENGTH, FINISH_STOP, GenerationEngine, SamplingParams
from serve.decode_batch import DecodeBatch, Prefill, RowStep, StartedRow

logger = logging.getLogger(__name__)


class DeadlineExceeded(RLChatError):
    """A job was still waiting for a place in the batch at its :attr:`GenerationJob.deadline` (an overload answer,
    not a server error: the client may retry later)."""


class SchedulerStopped(RuntimeError):
    """The version's scheduler (its generation thread, or its engine process) has stopped: nothing more runs on it
    until Serve replaces the replica. A request it refuses, or that had no token yet, may be retried (a 503)."""


def _device_lost(error: BaseException) -> bool:
    """A device error after which nothing more runs on the device (a CUDA illegal memory access, a device-side
    assert); not out-of-memory, after which the next batch may fit. ``torch.AcceleratorError`` is torch >= 2.8."""
    lost = getattr(torch, "AcceleratorError", None)
    return lost is not None and isinstance(error, lost) and not isinstance(error, torch.OutOfMemoryError)


THREAD_STOPPED = "the replica's generation thread has stopped"

QUEUED_PAST_DEADLINE = (
    "the request reached its deadline while waiting for a place in the generation batch (the server is overloaded); "
    "retry later or allow a longer deadline"
)


@dataclass
class StreamControl:
    """What the request side tells the batch loop between steps: choices to end now (stop string seen, reply
    flagged by the safety filter, client gone). Ended rows report ``finish_reason`` ``stop``; a job whose every
    choice is listed leaves the queue or the batch at the next step."""

    finish: set[int] = field(default_factory=set)
    listener: Callable[[set[int]], None] | None = field(default=None, compare=False, repr=False)
    """Told of every :meth:`end` (the engine process forwards them to its own copy of the job)."""

    def end(self, choices: Any) -> None:
        """End these choices at the next step (an iterable of choice indices)."""
        new = set(choices) - self.finish
        if new:
            self.finish.update(new)
            if self.listener is not None:
                self.listener(new)


@dataclass(frozen=True)
class GenerationJob:
    """One request as the batcher sees it: a prompt, its sampling settings and one seed per choice."""

    prompt: tuple[int, ...]
    params: SamplingParams
    seeds: tuple[int, ...]
    control: StreamControl = field(default_factory=StreamControl, compare=False)
    deadline: float | None = None
    """A ``time.monotonic()`` instant: still queued then, the job ends with :class:`DeadlineExceeded`; running,
    its rows end there with ``finish_reason`` ``length`` (what it generated is its reply). None = no deadline."""
    delivery_interval_s: float = 0.0
    """How often the caller wants the job's new tokens: 0 = after every step; else its steps' tokens are merged and
    handed over at most once per this many seconds (its first tokens and its result always at once). A stream
    sends a chunk per ``serve.stream_interval_s`` anyway, so waking it at every step is wasted event-loop work."""
    streamed: bool = False
    """A client reads the tokens as they come (an SSE stream): such jobs share the scheduler's chunk budget
    (:attr:`Batcher.stream_chunks_per_s`), which lengthens their interval when many decode at once."""


@dataclass
class JobOutput:
    """The generated tokens (stop token included) and finish reason of each choice of a job."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    alternatives: list[list[Any]] | None = None
    """With ``SamplingParams.top_logprobs >= 0``: per choice, per token, ``StepOutput.alternatives``' entry."""


@dataclass
class StepItem:
    """One job's share of one batch step (or of consecutive steps merged, see
    :attr:`GenerationJob.delivery_interval_s`): the new tokens of each choice, and its result once it is complete."""

    tokens: list[list[int]]
    done: JobOutput | Exception | None = None
    alternatives: list[list[Any]] | None = None
    """Per choice, the log-prob entries of this step's new tokens (with ``SamplingParams.top_logprobs >= 0``)."""

    def merge(self, later: "StepItem") -> "StepItem":
        """This item followed by ``later`` (of the same job) as one item; extends this item's lists in place."""
        for mine, new in zip(self.tokens, later.tokens):
            mine.extend(new)
        if self.alternatives is not None and later.alternatives is not None:
            for mine, new in zip(self.alternatives, later.alternatives):
                mine.extend(new)
        self.done = later.done
        return self


@dataclass
class BatchStats:
    """Counters reported by ``/readyz`` (how well batching works under the current load).

    A "batch" is one decoding step of the replica's decode batch (one batched forward); its size is the rows it
    decoded, so ``rows / batches`` is the mean batch over a period.
    """

    batches: int = 0
    rows: int = 0
    largest: int = 0
    requests: int = 0
    streams: int = 0
    errors: int = 0
    """Requests the server failed (500s, in-band stream failures)."""
    refused: int = 0
    """Requests refused: 4xx, and the 503s that shed load or wait for a replacement replica."""
    sizes: dict[int, int] = field(default_factory=dict)

    @classmethod
    def total(cls, parts: Iterable["BatchStats"]) -> "BatchStats":
        """The counters of several schedulers as one (a replica serving several model versions)."""
        out = cls()
        for p in parts:
            out.batches += p.batches
            out.rows += p.rows
            out.largest = max(out.largest, p.largest)
            out.requests += p.requests
            out.streams += p.streams
            out.errors += p.errors
            out.refused += p.refused
            for k, v in p.sizes.items():
                out.sizes[k] = out.sizes.get(k, 0) + v
        return out

    def add_batch(self, n_rows: int) -> None:
        """Count one decoding step of ``n_rows`` rows."""
        self.batches += 1
        self.rows += n_rows
        self.largest = max(self.largest, n_rows)
        self.sizes[n_rows] = self.sizes.get(n_rows, 0) + 1


class BatchObserver(Protocol):
    """What :class:`Batcher` reports as it runs (e.g. to Prometheus metrics); called on the event loop."""

    def on_step(self, rows: int, queued: int, seconds: float) -> None:
        """After every decoding step: rows decoded, jobs still waiting to join, the step's wall time."""

    def on_admit(self, n_jobs: int) -> None:
        """When ``n_jobs`` waiting jobs join the batch."""

    def on_queue(self, queued: int) -> None:
        """After a generation-loop iteration that decoded no row but changed the waiting list (jobs that left it by
        their deadline or cancellation): ``queued`` jobs still waiting."""

    def on_tokens(self, n: int) -> None:
        """``n`` tokens generated outside the decoding steps: a lone arrival's first token, sampled on the prefill
        thread (:meth:`Batcher._start`), and a beam search's reply (its returned tokens)."""


class _JobState:
    """A job in a :class:`BatchRun`: its rows' handles and its reply so far."""

    def __init__(self, job: GenerationJob, jid: int = 0) -> None:
        n = len(job.seeds)
        self.job = job
        self.jid = jid
        self.handles: list[int] = []
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.reasons: list[str | None] = [None] * n
        self.alts: list[list[Any]] = [[] for _ in range(n)]
        self.new: list[list[int]] = [[] for _ in range(n)]
        self.new_alts: list[list[Any]] = [[] for _ in range(n)]
        self.error: Exception | None = None
        self.reported = False

    def end(self, choice: int, reason: str) -> None:
        if self.reasons[choice] is None:
            self.reasons[choice] = reason

    def record(self, choice: int, out: RowStep) -> None:
        """A token of choice ``choice`` (and its end, if it ended the row)."""
        self.tokens[choice].append(out.token)
        self.new[choice].append(out.token)
        if out.alternative is not None:
            self.alts[choice].append(out.alternative)
            self.new_alts[choice].append(out.alternative)
        if out.reason is not None:
            self.end(choice, out.reason)

    def item(self) -> StepItem:
        """This step's share (and the result once every choice ended); resets the step's new tokens."""
        wants_alts = self.job.params.top_logprobs >= 0
        item = StepItem(self.new, alternatives=self.new_alts if wants_alts else None)
        if self.error is not None:
            item.done = self.error
        elif all(r is not None for r in self.reasons):
            item.done = JobOutput(self.tokens, [str(r) for r in self.reasons], self.alts if wants_alts else None)
        n = len(self.job.seeds)
        self.new, self.new_alts = [[] for _ in range(n)], [[] for _ in range(n)]
        self.reported = item.done is not None
        return item


class BatchRun:
    """Continuous batching on the generation thread: jobs join with :meth:`add`, :meth:`step` advances them all.

    Each step first applies the request side's wishes (:attr:`StreamControl.finish`: those rows end with ``stop``;
    a passed :attr:`GenerationJob.deadline`: the job's rows end with ``length``), then runs one
    :meth:`DecodeBatch.step` for every row of every job, whatever its settings. A job is reported complete
    (:attr:`StepItem.done`) at the step its last choice ends. A job that cannot start (a prompt beyond the context, a
    bad logit bias) gets its error as its result at the next step and never touches the others. Beam-search jobs
    (``num_beams > 1``) run whole at the next step (:class:`Batcher` runs them on their own thread instead).

    Args:
        engine: the generation engine.
        jobs: jobs to start with (more can join with :meth:`add`).
        keep_history: keep every job's state after it was reported (:attr:`tokens`, :attr:`reasons`; for tests and
            :func:`run_jobs`); a long-lived scheduler sets False.
        prefill_first: jobs that join get a step of their own (:class:`DecodeBatch`), and no trunk pass runs
            ahead (:meth:`feed_ahead` does nothing).
    """

    def __init__(
        self,
        engine: GenerationEngine,
        jobs: Sequence[GenerationJob] = (),
        keep_history: bool = True,
        prefill_first: bool = False,
    ) -> None:
        self.engine = engine
        self.prefill_first = prefill_first
        self.batch = DecodeBatch(engine, prefill_first)
        self.keep_history = keep_history
        self.history: list[_JobState] = []
        self._live: dict[int, _JobState] = {}  # job id -> state, until reported
        self._rows: dict[int, tuple[_JobState, int]] = {}  # row handle -> (job, choice)
        self._next_id = 0
        self.total_rows = 0
        self.last_rows = 0
        """Rows decoded by the last step (the size of that batch)."""
        for job in jobs:
            self.add(job)

    # ---------------------------------------------------------------- legacy views (keep_history=True)
    @property
    def jobs(self) -> list[GenerationJob]:
        return [s.job for s in self.history]

    @property
    def tokens(self) -> list[list[list[int]]]:
        return [s.tokens for s in self.history]

    @property
    def reasons(self) -> list[list[str | None]]:
        return [s.reasons for s in self.history]

    @property
    def rows(self) -> int:
        """Rows (choices) of every job added so far."""
        return self.total_rows

    # ---------------------------------------------------------------- scheduling
    @property
    def live_jobs(self) -> int:
        """Jobs added and not reported complete yet."""
        return len(self._live)

    @property
    def active_rows(self) -> int:
        """Rows generating (or waiting for their prefill at the next step)."""
        return self.batch.rows

    def add(self, job: GenerationJob, prefill: Prefill | None = None) -> int:
        """Add a job; its rows are prefilled (unless ``prefill``, from :meth:`DecodeBatch.prefill` of its rows'
        prompts, is given) and decode their first token at the next :meth:`step`.

        Returns:
            The job's id: the key of its items in :meth:`step_items`, its index in :meth:`step`'s list.
        """
        state = _JobState(job)
        jid = self._register(state)
        if job.params.num_beams > 1:
            return jid  # runs whole at the next step
        n = len(job.seeds)
        try:
            state.handles = self.batch.add([job.prompt] * n, job.params, job.seeds, prefill)
        except Exception as e:  # noqa: BLE001 - this job's own failure is its result
            state.error = e
            return jid
        for c, h in enumerate(state.handles):
            self._rows[h] = (state, c)
        return jid

    def adopt(self, state: "_JobState", started: StartedRow | None) -> int:
        """Take in a one-row job whose first token was already handed over (:meth:`Batcher._start`): ``state`` holds
        that token, ``started`` the row for :meth:`DecodeBatch.add_started` (None with ``state.error`` set). Returns
        the job's id, as :meth:`add`."""
        jid = self._register(state)
        if started is not None and state.error is None:
            state.handles = [self.batch.add_started(started)]
            self._rows[state.handles[0]] = (state, 0)
        return jid

    def _register(self, state: "_JobState") -> int:
        """Give a job its id and make it live (reported by the next :meth:`step_items`); returns the id."""
        state.jid = jid = self._next_id
        self._next_id += 1
        self.total_rows += len(state.job.seeds)
        if self.keep_history:
            self.history.append(state)
        self._live[jid] = state
        return jid

    def step_items(
        self, now: float | None = None, early: Callable[[dict[int, StepItem]], None] | None = None
    ) -> dict[int, StepItem]:
        """Advance every live job by one token.

        Args:
            now: the ``time.monotonic()`` instant deadlines are checked against (default: now).
            early: called with the items of the jobs that joined at this step (their first tokens) as soon as those
                are sampled, before the running rows are (:meth:`DecodeBatch.step`); those jobs are then not in the
                returned dict.

        Returns:
            Per live job id: its new tokens, and its result once complete (the job is then no longer live).
        """
        now = time.monotonic() if now is None else now
        # 1. the request side's wishes and deadlines (rows ended here generate nothing more)
        for state in self._live.values():
            job = state.job
            ended = [c for c in range(len(job.seeds)) if c in job.control.finish and state.reasons[c] is None]
            for c in ended:
                state.end(c, FINISH_STOP)
            if job.deadline is not None and now >= job.deadline:
                if state.error is None and not any(state.tokens):
                    # taken in at this step, no token yet: to its client it is still queued (a 503 to retry, not
                    # an empty 200)
                    state.error = DeadlineExceeded(QUEUED_PAST_DEADLINE)
                for c in range(len(job.seeds)):
                    if state.reasons[c] is None:
                        ended.append(c)
                    state.end(c, FINISH_LENGTH)
            if ended and state.handles:
                self.batch.finish([state.handles[c] for c in ended])
        # 2. beam searches (run whole; the scheduler keeps them out of the decode batch)
        for state in self._live.values():
            if state.job.params.num_beams > 1 and state.error is None and None in state.reasons:
                self._run_beam(state)
        # 3. one token for every live row
        self.last_rows = 0
        handed: set[int] = set()  # jobs whose items went to ``early``

        def first_tokens(outs: list[RowStep]) -> None:
            self.last_rows += len(outs)
            jids = self._record(outs)
            handed.update(jids)
            early(self._items(jids))  # type: ignore[misc]

        if self.batch.rows:
            try:
                outs = self.batch.step(first_tokens if early is not None else None)
                self.last_rows += len(outs)
            except Exception as e:  # noqa: BLE001 - every job of the batch fails with it; a fresh batch follows
                self._fail_batch(e)
                outs = []
            self._record(outs)
        # 4. each live job's share; completed jobs leave
        return self._items([jid for jid in self._live if jid not in handed])

    def _record(self, outs: list[RowStep]) -> set[int]:
        """Add a step's tokens to their jobs; the ids of the jobs they belong to."""
        jids = set()
        for out in outs:
            state, c = self._rows[out.handle]
            jids.add(state.jid)
            state.record(c, out)
        return jids

    def _items(self, jids: Iterable[int]) -> dict[int, StepItem]:
        """These live jobs' shares of the step; the completed ones leave."""
        items = {}
        for jid in jids:
            state = self._live[jid]
            items[jid] = state.item()
            if state.reported:
                del self._live[jid]
                for h in state.handles:
                    self._rows.pop(h, None)
        return items

    def feed_ahead(self) -> None:
        """The running rows' trunk pass of the next step, now (:meth:`DecodeBatch.feed_ahead`): the scheduler calls
        it once a step's items are handed over, so a job added meanwhile waits for its prefill and one head pass."""
        if not self.batch.rows:
            return
        try:
            self.batch.feed_ahead()
        except Exception as e:  # noqa: BLE001 - as a failed step: the batch's jobs fail at the next step_items
            self._fail_batch(e)

    def _fail_batch(self, error: Exception) -> None:
        """Every job of the decode batch fails with ``error`` (reported by the next :meth:`step_items`); a fresh
        batch takes the jobs that come next.

        Raises:
            error: a device error other than out-of-memory (a CUDA illegal memory access, a device-side assert):
                it poisons the device's context, so every later step would fail too; the generation thread stops
                on it (every job gets it) and the health check lets Serve replace the replica.
        """
        if _device_lost(error):
            raise error
        logger.exception("decode step failed; failing the %d jobs of the batch", len(self._live))
        for state in self._live.values():
            if state.handles and state.error is None and None in state.reasons:
                state.error = error  # a job whose rows all ended before this step keeps its reply
            # the new batch numbers its rows from 0 again: a failed job's old handles would name a later job's rows
            # (ended for it when its client leaves, dropped when its error is reported)
            state.handles = []
        self.batch = DecodeBatch(self.engine, self.prefill_first)
        self._rows.clear()

    def step(self) -> list[StepItem | None] | None:
        """:meth:`step_items` as a list over every job added (``keep_history`` only).

        Returns:
            Per job: its new tokens (and its result once complete), or None once it was reported complete;
            None when every job has been reported.
        """
        if not self._live:
            return None
        items = self.step_items()
        return [items.get(j) for j in range(self._next_id)]

    def _run_beam(self, state: _JobState) -> None:
        job = state.job
        try:
            n = len(job.seeds)
            res = self.engine.generate(  # ends when every choice was ended (its client left), as a sampled job's rows
                [list(job.prompt)] * n,
                job.params,
                list(job.seeds),
                deadline=job.deadline,
                stop=lambda: len(job.control.finish) >= n,
            )
        except Exception as e:  # noqa: BLE001 - this job's own failure is its result
            state.error = e
            return
        for c in range(len(job.seeds)):
            state.tokens[c] = list(res.tokens[c])
            state.new[c] = list(res.tokens[c])
            state.reasons[c] = res.finish_reasons[c]


def run_jobs(engine: GenerationEngine, jobs: Sequence[GenerationJob]) -> list[JobOutput | Exception]:
    """Run jobs to completion in one batch (what a replica does step by step): one result or exception per job."""
    run = BatchRun(engine, jobs)
    results: list[JobOutput | Exception | None] = [None] * len(jobs)
    while (items := run.step()) is not None:
        for j, item in enumerate(items):
            if item is not None and item.done is not None:
                results[j] = item.done
    return [r if r is not None else RuntimeError("job produced no result") for r in results]


class SubmittedNow:
    """The items of ``submit(job)``, with the job submitted at once rather than at the first ``async for`` turn.

    A streamed reply's generator only starts once the HTTP response does; under load the replica's event loop gets
    there in several turns (headers, the SSE task group, the role chunk), each queued behind other streams' chunks,
    and the job reached the scheduler only after them (a profile at 16 clients: ~6 ms of a ~70 ms time to first
    token). Here the first item is asked for (so the job sent) as soon as this object is made.

    :meth:`aclose` ends the submission (its rows end at the next step); an object dropped without it is closed by
    the event loop's async-generator finalizer once its first item has come.
    """

    def __init__(self, items: AsyncIterator[StepItem]) -> None:
        self._items = items
        self._first: asyncio.Future | None = asyncio.ensure_future(items.__anext__())
        self._first.add_done_callback(self._arrived)
        self.first_at: float | None = None
        """When the first item arrived (``time.perf_counter()``): a stream's time to first token, whenever its
        response then gets to take it."""

    def _arrived(self, first: asyncio.Future) -> None:
        self.first_at = time.perf_counter()
        if not first.cancelled():
            first.exception()  # retrieved: no "exception was never retrieved"

    def __aiter__(self) -> "SubmittedNow":
        return self

    def first(self) -> asyncio.Future | None:
        """The future of the first item, to wait on without taking it (None once it was taken)."""
        return self._first

    async def __anext__(self) -> StepItem:
        if self._first is not None:
            first, self._first = self._first, None
            return await first
        return await self._items.__anext__()

    async def aclose(self) -> None:
        if self._first is not None:
            self._first.cancel()  # raises in the submission's wait: its cleanup ends the job's rows
            self._first = None
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):  # already running its cleanup (cancelled just above)
                await aclose()


def row_seeds(seed: int | None, n: int) -> tuple[int, ...]:
    """One seed per choice: derived from the request's seed (reproducible), or random."""
    if seed is None:
        return tuple(secrets.randbits(62) for _ in range(n))
    return tuple(int(seed) * 1_000_003 + i for i in range(n))


@dataclass
class _Waiting:
    """A submitted job and where its items go: its caller's queue on its caller's event loop."""

    job: GenerationJob
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    prefill: Future | None = None
    """Started on the prefill thread when it arrived alone at a running batch (:class:`Batcher`): a one-row job's
    first token (:meth:`Batcher._start`, a :class:`_Started`), else its rows' prefill (a :class:`Prefill`)."""
    first_on_thread: bool = False
    """``prefill`` is :meth:`Batcher._start`, which hands the first token over itself."""
    held: StepItem | None = None
    """Steps' items not handed over yet (:attr:`GenerationJob.delivery_interval_s`); generation thread only."""
    last: float | None = None
    """When items were last handed over (``time.monotonic()``); None until the first tokens were."""

    def due(self, item: StepItem, now: float, shared_s: float = 0.0) -> bool:
        """Whether to hand over now: the result, the first tokens, or the job's interval has passed (a streamed
        job's: at least ``shared_s``, its share of the chunk budget, :meth:`Batcher.stream_share_s`)."""
        interval = max(self.job.delivery_interval_s, shared_s) if self.job.streamed else self.job.delivery_interval_s
        if item.done is not None or interval <= 0:
            return True
        if self.last is None:
            return any(item.tokens)
        return now - self.last >= interval

    def cancelled(self) -> bool:
        return all(c in self.job.control.finish for c in range(len(self.job.seeds)))

    def settle(self, now: float) -> StepItem | None:
        """The final item of a job that never joined: cancelled (empty reply) or past its deadline; else None."""
        n = len(self.job.seeds)
        if self.cancelled():  # nothing generated: an empty, complete reply for anyone still listening
            return StepItem([[] for _ in range(n)], JobOutput([[] for _ in range(n)], [FINISH_STOP] * n))
        if self.job.deadline is not None and now >= self.job.deadline:
            return StepItem([[] for _ in range(n)], DeadlineExceeded(QUEUED_PAST_DEADLINE))
        return None


@dataclass
class _Started:
    """A one-row job started on the prefill thread: its state (the first token, handed over already) and its row."""

    state: _JobState
    row: StartedRow | None
    """None if the first token ended it (its result is out: nothing to add) or a failure after it (``state.error``)."""


BEAM_SETTLE_INTERVAL_S = 0.1
"""How often beam searches waiting for the beam thread are checked for a client that left (deadlines: on time)."""

REPORT_INTERVAL_S = 0.1
"""Longest a step's counts (``BatchStats``, the observer) wait for a post of items (jobs with a delivery interval)."""

STREAM_SHARE_CAP_S = 0.25
"""Longest interval the chunk budget gives a stream (:meth:`Batcher.stream_share_s`): a chat page still reads as a
stream (a few tokens per chunk) however many streams share the replica."""


def _deliver(batch: list[tuple[asyncio.Queue, StepItem]]) -> None:
    """On the event loop: hand one step's items to their callers."""
    for queue, item in batch:
        queue.put_nowait(item)


def count_step(
    stats: BatchStats,
    observer: BatchObserver | None,
    rows: int,
    queued: int,
    seconds: float,
    admitted: int,
    tokens: int = 0,
) -> None:
    """On the event loop: count one iteration of the generation loop (``rows`` decoded, ``admitted`` jobs joined,
    ``queued`` still waiting, ``tokens`` first tokens handed over from the prefill thread) and tell the observer;
    shared by the in-process :class:`Batcher` and the engine process's handle. An iteration that decoded nothing
    (its waiting jobs settled, its rows all ended) still reports the queue depth, so a replica's gauge falls to 0
    when the last waiting job leaves without a step after it."""
    if rows:
        stats.add_batch(rows)
    if observer is not None:
        if admitted:
            observer.on_admit(admitted)
        if rows:
            observer.on_step(rows, queued, seconds)
        else:
            observer.on_queue(queued)
        if tokens:
            observer.on_tokens(tokens)


def _post(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """Run ``fn(*args)`` on ``loop`` from the generation thread; a closed loop has no one left to tell."""
    with contextlib.suppress(RuntimeError):  # the loop is closed (its callers are gone)
        loop.call_soon_threadsafe(fn, *args)


class Batcher:
    """A replica's generation scheduler: continuous batching on one generation thread, beam search on another.

    The generation thread runs decoding steps back to back while any job is decoding, and posts each step's items to
    the callers' event loop (one callback per step), so work on the event loop (HTTP, streaming) never delays the
    next step; after posting it runs the running rows' trunk pass of the next step (:meth:`BatchRun.feed_ahead`). A
    job that arrives alone at a running batch with room for it is started at once on a third thread
    (``prefill_pool``), beside the step in progress: a one-row job's prefill and first token (handed over from
    there, :meth:`_start`), a many-row job's prefill; the step that takes it runs only the shared head pass for it.
    Waiting jobs join the decode batch at the next step, up to ``max_batch_size`` jobs decoding at once; when the
    batch is idle, the first arrival waits up to ``batch_wait_timeout_s`` so that a burst is prefilled together.
    Jobs still waiting at their :attr:`GenerationJob.deadline` end with :class:`DeadlineExceeded`; waiting jobs
    whose every choice is in :attr:`StreamControl.finish` (the client left) are dropped, as is a caller that stops
    iterating :meth:`submit` before its job is done. A beam search that has started ends at its deadline with its best
    hypothesis so far (a finished one: ``stop``; a running one: ``length``); one still waiting for the beam thread
    at its deadline ends with :class:`DeadlineExceeded`.

    Args:
        engine: the generation engine.
        max_batch_size: most requests decoding at once (``serve.max_batch_size``; 1 = batch-1 serving).
        batch_wait_timeout_s: longest wait to gather a burst when the batch is idle (``serve.batch_wait_timeout_s``).
        prefill_first: new jobs get a step of their own (``serve.prefill_first``; :class:`DecodeBatch`).
        observer: optional :class:`BatchObserver` (metrics), called on the event loop.
        stream_chunks_per_s: the chunk budget of streamed jobs (``serve.stream_chunks_per_s``; 0 = none): about
            this many hand-overs per second among all of them (:meth:`stream_share_s`).
    """

    def __init__(
        self,
        engine: GenerationEngine,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        observer: BatchObserver | None = None,
        prefill_first: bool = False,
        stream_chunks_per_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.stream_chunks_per_s = float(stream_chunks_per_s)
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self.observer = observer
        self.stats = BatchStats()
        self.beam_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlchat-beam")
        self.prefill_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlchat-prefill")
        self._run = BatchRun(engine, keep_history=False, prefill_first=prefill_first)
        self._jobs: dict[int, _Waiting] = {}  # live job id -> its caller (generation thread only)
        self._cond = threading.Condition()
        self._waiting: deque[_Waiting] = deque()  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._closed = False
        self._beams: deque[_Waiting] = deque()
        self._beam_runner: asyncio.Task | None = None
        self._active_rows = 0
        self._reports: list[tuple] = []  # steps not counted yet: they ride with the next post (generation thread)
        self._reports_since = 0.0
        self._ahead_s = 0.0  # seconds of the trunk pass run ahead of the next step (generation thread)
        self._step_s = 0.0  # the last step's seconds (written by the generation thread; read by submit)
        self._last_submit = 0.0  # time.monotonic() of the last submit (event loop)
        self._kick_pending = False
        self._report_loop: asyncio.AbstractEventLoop | None = None  # where stats are counted (the first caller's)

    # ---------------------------------------------------------------- public API
    async def submit(self, job: GenerationJob) -> AsyncIterator[StepItem]:
        """The job's share of every generation step until its :attr:`StepItem.done` (iterate it).

        A caller that stops iterating before ``done`` (a client that went away) ends the job's rows.
        """
        loop = asyncio.get_running_loop()
        waiting = _Waiting(job, asyncio.Queue(), loop)
        if self._report_loop is None:
            self._report_loop = loop
        if self._closed:
            raise SchedulerStopped(THREAD_STOPPED)
        if job.params.num_beams > 1:
            self._beams.append(waiting)
            if self._beam_runner is None or self._beam_runner.done():
                self._beam_runner = loop.create_task(self._run_beams())
        else:
            with self._cond:
                if self._closed:
                    raise SchedulerStopped(THREAD_STOPPED)
                self._waiting.append(waiting)
                # a lone arrival joining a running batch: started now, beside the step in progress. Arrivals in a
                # burst (the previous one less than half a step ago) are prefilled together by the step: one pass of
                # the trunk for all of them, and the prefill thread would take the core the burst's HTTP handling
                # needs (lockstep waves, 8 x 512 over cl100k, AVX2: p50 TTFT 338 -> 385 ms with every lone arrival
                # of a wave started on the thread; bench/README.md, "Serve load", eighth session)
                now = time.monotonic()
                apart = now - self._last_submit >= 0.5 * self._step_s
                self._last_submit = now
                early = apart and len(self._waiting) == 1 and 0 < self._run.live_jobs < self.max_batch_size
                # registered before the generation thread can take the job (it takes _cond): else the step could
                # start it as well and the caller would get two first tokens
                if early and len(job.seeds) == 1:
                    waiting.prefill = self.prefill_pool.submit(self._start, waiting)
                    waiting.first_on_thread = True
                elif early:
                    waiting.prefill = self.prefill_pool.submit(self._prefill, job)
            if not self._kick_pending:  # wake the thread once this tick's other submits are queued too
                self._kick_pending = True
                loop.call_soon(self._kick)
        done = False
        try:
            while True:
                item = await waiting.queue.get()
                done = item.done is not None
                yield item
                if done:
                    return
        finally:
            if not done:
                job.control.end(range(len(job.seeds)))

    def _start(self, w: _Waiting) -> _Started:
        """On the prefill thread: a lone one-row job's prefill, first token and the feed of that token
        (:meth:`DecodeBatch.start`), beside the step in progress; the first token is handed to the caller from here.

        Why: a request arriving at a running batch otherwise waits for the step in progress and then for the step
        that takes it in, i.e. for two passes of the whole batch's head. Where a many-row step is compute-bound (an
        AVX2 CPU in fp32: ~70 ms at 16 rows of 8 x 512 over cl100k, ~17 ms at one), that wait was most of its time to
        first token; here it is its own prefill and a one-row head pass on the other core. An error before the
        first token (a bad prompt) propagates: the step then adds the job and reports it as the job's result.
        """
        job = w.job
        state = _JobState(job)

        def hand_over(out: RowStep) -> None:
            state.record(0, out)
            w.last = time.monotonic()  # read by the generation thread only after this start's future is done
            _post(w.loop, _deliver, [(w.queue, state.item())])

        try:
            started = self._run.batch.start(job.prompt, job.params, job.seeds[0], hand_over)
        except Exception as e:
            if not state.tokens[0]:
                raise  # nothing handed over yet: the step starts the job as any other
            logger.exception("feeding a started job's first token failed; failing that job")
            state.error = e  # its first token is out: the job ends with this error at the next step
            return _Started(state, None)
        return _Started(state, started if started.prefill is not None else None)

    def _prefill(self, job: GenerationJob) -> Prefill:
        """On the prefill thread: the job's rows through the trunk (:meth:`DecodeBatch.prefill`), while the
        generation thread runs the step in progress. Why a thread: a request that arrives at a running batch
        otherwise waits for that step (half a ~30 ms step on average at 8 x 512 over cl100k) and then for its own
        prefill (~9 ms); on a 2-core CPU the step holds one core and the other is mostly idle, so here the two
        overlap. The weights are only read; the prefill has its own cache."""
        prompts = [job.prompt] * len(job.seeds)
        self.engine._check_prompts(prompts, job.params, cap_at_limit=True)  # noqa: SLF001 - add()'s rules
        return self._run.batch.prefill(prompts)

    @staticmethod
    def _prefilled(w: _Waiting) -> Prefill | _Started | None:
        """What the prefill thread did for a joining job: waited for if it has started; one that has not started
        is cancelled (the step prefills it together with the other newcomers: one pass of the trunk for all)."""
        if w.prefill is None or w.prefill.cancel():  # True for one cancelled at admission too
            return None
        try:
            return w.prefill.result()
        except Exception:  # noqa: BLE001 - the step prefills it again and reports its error if it is the job's
            return None

    def _kick(self) -> None:
        """On the event loop, after the submits of one tick: start or wake the generation thread, so that a burst
        arriving at an idle batch is prefilled together even with ``batch_wait_timeout_s=0``."""
        self._kick_pending = False
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._generate, name="rlchat-generate", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stream_share_s(self) -> float:
        """The least interval between hand-overs to each streamed job now: ``streams / stream_chunks_per_s``
        seconds, up to :data:`STREAM_SHARE_CAP_S` (generation thread).

        Why: every hand-over of a stream becomes an SSE chunk, i.e. an event-loop wake-up in the replica and a hop
        through Serve's proxy, on the cores that decode. With a fixed interval shorter than a step, 16 streams cost
        16 hops per step; a budget keeps the total per second about fixed as streams are added, so a lone stream
        still gets its tokens every ``serve.stream_interval_s`` while 16 get larger chunks (bench/README.md, 8 x 512
        over cl100k on 2 cores, 16 streaming clients: 362 -> 410 tokens/s, 5.3-5.6x -> 6.0-6.4x batch-1).
        """
        if self.stream_chunks_per_s <= 0:
            return 0.0
        streams = sum(w.job.streamed for w in self._jobs.values())
        return min(STREAM_SHARE_CAP_S, streams / self.stream_chunks_per_s)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting to join the decode batch (beam searches waiting for their thread included)."""
        return len(self._waiting) + len(self._beams)

    @property
    def active_rows(self) -> int:
        """Rows in the decode batch (admitted and not ended at the last step)."""
        return self._active_rows

    @property
    def alive(self) -> bool:
        """Whether the generation thread still accepts work (Serve's health check)."""
        return not self._closed and (self._thread is None or self._thread.is_alive())

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the generation thread after its current step and wait for it (up to ``timeout_s``); jobs still
        waiting or decoding get an error.

        Waiting matters to a process that exits right after: a daemon thread killed inside a torch op aborts the
        process ("terminate called without an active exception") instead of letting it exit 0 -- seen with a
        30 ms step at a real vocabulary.
        """
        with self._cond:
            self._closed = True
            self._cond.notify()
        thread = self._thread  # None now stays None: _kick starts no thread once closed
        if thread is None:  # closed before any thread ran: nobody else answers the jobs already queued
            self._fail_all(SchedulerStopped(THREAD_STOPPED))
        elif thread is not threading.current_thread():
            thread.join(timeout_s)
        self.prefill_pool.shutdown(wait=True, cancel_futures=True)
        self.beam_pool.shutdown(wait=False, cancel_futures=True)  # a beam search running finishes on its own

    # ---------------------------------------------------------------- the generation thread
    def _generate(self) -> None:
        """Admit waiting jobs and run decoding steps back to back; sleep while there is nothing to do."""
        try:
            while self._generate_step():
                pass
        except Exception as e:  # noqa: BLE001 - a bug in the loop itself: fail every caller rather than hang them
            logger.exception("the generation thread failed")
            if _device_lost(e):  # a job without a token may be retried on the replica that replaces this one
                stopped = SchedulerStopped(f"the replica's device failed ({type(e).__name__}: {e})")
                stopped.__cause__ = e
                self._fail_all(stopped)
            else:
                self._fail_all(e)
        else:
            self._fail_all(SchedulerStopped(THREAD_STOPPED))

    def _fail_all(self, error: Exception) -> None:
        """Stop taking work; every job still waiting or decoding ends with ``error``."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
        for w in [*waiting, *self._jobs.values()]:
            _post(w.loop, _deliver, [(w.queue, StepItem([[] for _ in w.job.seeds], error))])
        self._jobs.clear()

    def _generate_step(self) -> bool:
        """One iteration of the generation thread: settle and admit waiting jobs, one step; False to stop."""
        run = self._run
        settled: list[tuple[_Waiting, StepItem]] = []
        with self._cond:
            while not self._waiting and not run.live_jobs and not self._closed:
                self._active_rows = 0
                if self._reports:  # counts held back for a later post: there is none before the next request
                    self._post_reports([])
                self._cond.wait()
            if self._closed:
                return False
            if not run.live_jobs and self.batch_wait_timeout_s > 0 and self.max_batch_size > 1:
                until = time.monotonic() + self.batch_wait_timeout_s  # idle: a burst shares one prefill
                while len(self._waiting) < self.max_batch_size and (left := until - time.monotonic()) > 0:
                    self._cond.wait(left)
            now = time.monotonic()
            for w in list(self._waiting):
                if w.first_on_thread and (w.prefill.running() or w.prefill.done()):
                    continue  # its start may have handed a token over: it joins, and the batch applies its end
                item = w.settle(now)
                if item is not None:
                    if w.prefill is not None and not w.prefill.cancel() and w.first_on_thread:
                        continue  # its start began meanwhile: it joins, as above
                    self._waiting.remove(w)  # a prefill still queued for it was cancelled: work for nobody
                    settled.append((w, item))
            admit: list[_Waiting] = []
            later: list[_Waiting] = []
            while self._waiting and run.live_jobs + len(admit) + len(later) < self.max_batch_size:
                w = self._waiting.popleft()
                f = w.prefill
                if run.live_jobs and f is not None and not f.done() and not f.cancel():
                    later.append(w)  # running on the prefill thread: joins at a later step, this one is not held up
                else:
                    admit.append(w)  # a cancelled prefill is done by the step, with the other newcomers
            self._waiting.extendleft(reversed(later))
            queued = len(self._waiting)
        first_tokens = 0  # sampled on the prefill thread (their steps' counts leave them out)
        for w in admit:
            pre = self._prefilled(w)
            if not isinstance(pre, _Started):
                self._jobs[run.add(w.job, pre)] = w
                continue
            first_tokens += sum(map(len, pre.state.tokens))
            if pre.row is not None or pre.state.error is not None:
                self._jobs[run.adopt(pre.state, pre.row)] = w
            # else: its first token ended it, and that result was handed over with the token
        self._active_rows = run.active_rows

        def hand_over_first_tokens(early: dict[int, StepItem]) -> None:  # before the running rows are sampled
            for loop, batch in self._due(early, time.monotonic(), {}).items():
                _post(loop, _deliver, batch)

        t0 = time.perf_counter()
        stepped = run.live_jobs > 0
        items = run.step_items(early=hand_over_first_tokens) if stepped else {}
        seconds = time.perf_counter() - t0 + self._ahead_s  # the step's trunk pass may have run ahead of it
        self._ahead_s = 0.0
        rows = run.last_rows if stepped else 0
        if rows:  # a step that decoded rows (a lone arrival is one that comes half of it after the last)
            self._step_s = seconds
        self._active_rows = run.active_rows
        out: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepItem]]] = {}
        for w, item in settled:
            out.setdefault(w.loop, []).append((w.queue, item))
        now = time.monotonic()
        out = self._due(items, now, out)
        if stepped or settled or admit:  # the waiting list changed or rows were decoded: count it
            self._reports.append((rows, queued, seconds, len(admit), first_tokens))
            if not self._reports_since:
                self._reports_since = now
        # steps whose items all wait for their interval post nothing (the event loop sleeps on), unless their counts
        # (/readyz, metrics) have waited REPORT_INTERVAL_S
        if out or (self._reports and now - self._reports_since >= REPORT_INTERVAL_S):
            self._post_reports(list(out.items()))
        t0 = time.perf_counter()
        run.feed_ahead()  # the tokens are handed over: the next step's trunk pass now, not in a newcomer's wait
        self._ahead_s = time.perf_counter() - t0
        return True

    def _post_reports(self, out: list[tuple[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepItem]]]]) -> None:
        """Post ``out``'s items to their loops, with the counts not reported yet riding on the first post."""
        reports, self._reports, self._reports_since = self._reports, [], 0.0
        if not out:
            _post(self._report_loop, self._deliver_step, [], reports)
        for i, (loop, batch) in enumerate(out):
            _post(loop, self._deliver_step, batch, reports if i == 0 else [])

    def _due(
        self,
        items: dict[int, StepItem],
        now: float,
        out: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepItem]]],
    ) -> dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepItem]]]:
        """Add to ``out`` (per caller loop) the items due now; the others are held and merged with the next ones
        (:meth:`_Waiting.due`: a stream is handed its tokens at most once per chunk interval)."""
        shared_s = self.stream_share_s()
        for jid, item in items.items():
            w = self._jobs[jid] if item.done is None else self._jobs.pop(jid)
            if w.held is not None:  # merge with what the caller has not been handed yet
                item = w.held.merge(item)
                w.held = None
            if not w.due(item, now, shared_s):
                w.held = item
                continue
            if w.last is not None or any(item.tokens):
                w.last = now
            out.setdefault(w.loop, []).append((w.queue, item))
        return out

    def _deliver_step(self, batch: list[tuple[asyncio.Queue, StepItem]], reports: list[tuple]) -> None:
        """On the event loop: hand steps' items to their callers, count the steps and tell the observer."""
        _deliver(batch)
        for report in reports:
            count_step(self.stats, self.observer, *report)

    # ---------------------------------------------------------------- beam search (event loop + beam thread)
    def _settle_waiting_beams(self) -> float:
        """On the event loop, while a beam search runs: answer the beam searches waiting behind it that are past
        their deadline (:class:`DeadlineExceeded`: the app's 503 ``queue_timeout``), whose client left, or, once the
        scheduler is closed, every one (:class:`SchedulerStopped`), as waiting sampled jobs are answered; returns the
        seconds until the next check (the nearest deadline, at most :data:`BEAM_SETTLE_INTERVAL_S`)."""
        now = time.monotonic()
        waiting = list(self._beams)
        self._beams.clear()
        for w in waiting:
            item = w.settle(now)
            if item is None and self._closed:
                item = StepItem([[] for _ in w.job.seeds], SchedulerStopped(THREAD_STOPPED))
            if item is None:
                self._beams.append(w)
            else:
                w.queue.put_nowait(item)
        deadlines = [w.job.deadline - now for w in self._beams if w.job.deadline is not None]
        return max(min([BEAM_SETTLE_INTERVAL_S, *deadlines]), 0.001)

    async def _run_beams(self) -> None:
        """Beam searches one after another on their own thread (the decode batch keeps stepping meanwhile)."""
        loop = asyncio.get_running_loop()
        while self._beams:
            w = self._beams.popleft()
            item = w.settle(time.monotonic())
            if item is None and self._closed:  # the generation thread stopped (e.g. on a device error)
                item = StepItem([[] for _ in w.job.seeds], SchedulerStopped(THREAD_STOPPED))
            if item is None:
                try:
                    running = loop.run_in_executor(self.beam_pool, run_jobs, self.engine, [w.job])
                    while not (await asyncio.wait({running}, timeout=self._settle_waiting_beams()))[0]:
                        pass
                    out = running.result()[0]
                except Exception as e:  # noqa: BLE001 - the thread is gone (shutdown)
                    out = e
                tokens = out.tokens if isinstance(out, JobOutput) else [[] for _ in w.job.seeds]
                item = StepItem([list(t) for t in tokens], out)
                if self.observer is not None and any(tokens):
                    self.observer.on_tokens(sum(map(len, tokens)))
            w.queue.put_nowait(item)
