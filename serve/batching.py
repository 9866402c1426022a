"""Generation scheduling for a replica: requests become rows of one lock-step generation batch.

:class:`BatchRun` advances a batch of :class:`GenerationJob` one token per step (jobs grouped by sampling settings);
:class:`Batcher` feeds it from Ray Serve's ``@serve.batch`` queue on the replica's single generation thread and hands
every caller its share of each step. Pure pieces (:class:`BatchRun`, :func:`run_jobs`) need no Ray and are
unit-tested directly.
"""

import asyncio
import dataclasses
import secrets
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve as ray_serve

from rlchat.generation import FINISH_LENGTH, FINISH_STOP, GenerationEngine, SamplingParams

MAX_CONCURRENT_BATCHES = 8
"""Batches Ray Serve hands to a replica at once. Serve's batch queue forms the next batch as soon as its wait
timeout passes, even while a batch is still generating, so with one batch in flight the queue froze a trickle of
arrivals into many small batches that then ran one after another (measured: a mean batch of 2.8 requests at 16
closed-loop clients). Several in flight let every formed batch reach the replica at once, where
:meth:`Batcher._run_batches` coalesces all that are waiting into one generation batch (up to
``serve.max_batch_size`` requests) when the generation thread is free: a mean batch of ~11 at 16 clients."""


@dataclass
class StreamControl:
    """What the request side tells the batch loop between steps: choices to end now (stop string seen, reply
    flagged by the safety filter, client gone). Ended rows report ``finish_reason`` ``stop``."""

    finish: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class GenerationJob:
    """One request as the batcher sees it: a prompt, its sampling settings and one seed per choice."""

    prompt: tuple[int, ...]
    params: SamplingParams
    seeds: tuple[int, ...]
    control: StreamControl = field(default_factory=StreamControl, compare=False)


@dataclass
class JobOutput:
    """The generated tokens (stop token included) and finish reason of each choice of a job."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    alternatives: list[list[Any]] | None = None
    """With ``SamplingParams.top_logprobs >= 0``: per choice, per token, ``StepOutput.alternatives``' entry."""


@dataclass
class StepItem:
    """One job's share of one batch step: the new tokens of each choice, and its result once it is complete."""

    tokens: list[list[int]]
    done: JobOutput | Exception | None = None
    alternatives: list[list[Any]] | None = None
    """Per choice, the log-prob entries of this step's new tokens (with ``SamplingParams.top_logprobs >= 0``)."""


@dataclass
class BatchStats:
    """Counters reported by ``/readyz`` (how well batching works under the current load)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    requests: int = 0
    streams: int = 0
    errors: int = 0
    sizes: dict[int, int] = field(default_factory=dict)

    def add_batch(self, n_jobs: int, n_rows: int) -> None:
        self.batches += 1
        self.rows += n_rows
        self.largest = max(self.largest, n_jobs)
        self.sizes[n_jobs] = self.sizes.get(n_jobs, 0) + 1


def _group_key(params: SamplingParams) -> SamplingParams:
    """Jobs whose settings differ only in their budget (and base seed) share one lock-step stream."""
    if params.num_beams > 1:
        return params
    return dataclasses.replace(params, max_new_tokens=1, seed=None)


class _Group:
    """The jobs of a batch that share sampling settings: one lock-step stream (or one beam search)."""

    def __init__(self, engine: GenerationEngine, jobs: Sequence[GenerationJob], idx: Sequence[int]) -> None:
        self.engine = engine
        self.jobs = jobs
        self.rows = [(j, c) for j in idx for c in range(len(jobs[j].seeds))]  # stream row -> (job, choice)
        self.prompts = [list(jobs[j].prompt) for j, _ in self.rows]
        self.seeds = [jobs[j].seeds[c] for j, c in self.rows]
        self.budgets = np.array([jobs[j].params.max_new_tokens for j, _ in self.rows])
        self.params = jobs[idx[0]].params
        self.stop_ids = {engine.tokenizer.eot_id, *self.params.stop_token_ids}
        self.max = int(self.budgets.max())
        self.done = False
        self.stream = None
        if self.params.num_beams > 1:
            engine._check_prompts(self.prompts, self.params)  # noqa: SLF001 - fail at batch start, not mid-batch
        else:  # the prefill runs here; a prompt beyond the context raises now
            run_params = dataclasses.replace(self.params, max_new_tokens=self.max, seed=None)
            self.stream = engine.steps(self.prompts, run_params, self.seeds)

    def step(self, run: "BatchRun") -> None:  # noqa: UP037 - defined below; no __future__ annotations here
        """Generate one token per live row (a beam search runs whole) and record tokens and finish reasons."""
        if self.stream is None:
            res = self.engine.generate(self.prompts, self.params, self.seeds)
            for r, (j, c) in enumerate(self.rows):
                run.tokens[j][c] = list(res.tokens[r])
                run.new[j][c] = list(res.tokens[r])
                run.reasons[j][c] = res.finish_reasons[r]
            self.done = True
            return
        stream = self.stream
        # 1. rows the request side asked to end (their reply is complete for the client)
        asked = [
            r for r, (j, c) in enumerate(self.rows) if c in self.jobs[j].control.finish and run.reasons[j][c] is None
        ]
        if asked:
            stream.finish(asked, FINISH_STOP)
            for r in asked:
                j, c = self.rows[r]
                run.reasons[j][c] = FINISH_STOP
        # 2. one batched forward
        out = next(stream, None)
        if out is not None:
            for r in np.flatnonzero(out.active).tolist():
                j, c = self.rows[r]
                t = int(out.tokens[r])
                run.tokens[j][c].append(t)
                run.new[j][c].append(t)
                if out.alternatives is not None:
                    run.alts[j][c].append(out.alternatives[r])
                    run.new_alts[j][c].append(out.alternatives[r])
            # 3. rows at their own budget end with "length" (the stream runs to the group's largest budget)
            over = np.flatnonzero(stream.active & (stream.num_steps >= self.budgets))
            if len(over):
                stream.finish(over, FINISH_LENGTH)
                for r in over.tolist():
                    j, c = self.rows[r]
                    run.reasons[j][c] = FINISH_LENGTH
        # 4. rows the engine ended itself: a stop token or stop string ("stop"), or the group's last step
        active = stream.active
        for r, (j, c) in enumerate(self.rows):
            if run.reasons[j][c] is None and not active[r]:
                toks = run.tokens[j][c]
                at_limit = len(toks) >= self.max and not (toks and toks[-1] in self.stop_ids)
                run.reasons[j][c] = FINISH_LENGTH if at_limit else FINISH_STOP
        self.done = not active.any()


class BatchRun:
    """Lock-step generation of one dynamic batch, advanced one token per :meth:`step` (on the generation thread).

    Jobs are grouped by sampling settings (:func:`_group_key`); each step advances every group once. A job is
    reported complete (:attr:`StepItem.done`) at the step its last choice ends, so a short request does not wait
    for the longest one of its batch. A group that cannot start (e.g. a prompt beyond the context) is retried job by
    job, so one bad request never fails the others; a job's own failure is its result.

    Args:
        engine: the generation engine.
        jobs: the batch.
    """

    def __init__(self, engine: GenerationEngine, jobs: Sequence[GenerationJob]) -> None:
        self.jobs = jobs
        self.tokens: list[list[list[int]]] = [[[] for _ in job.seeds] for job in jobs]
        self.reasons: list[list[str | None]] = [[None] * len(job.seeds) for job in jobs]
        self.new: list[list[list[int]]] = [[[] for _ in job.seeds] for job in jobs]
        self.alts: list[list[list[Any]]] = [[[] for _ in job.seeds] for job in jobs]
        self.new_alts: list[list[list[Any]]] = [[[] for _ in job.seeds] for job in jobs]
        self.errors: list[Exception | None] = [None] * len(jobs)
        self.reported = [False] * len(jobs)
        self.groups: list[_Group] = []
        keyed: dict[SamplingParams, list[int]] = {}
        for i, job in enumerate(jobs):
            keyed.setdefault(_group_key(job.params), []).append(i)
        for idx in keyed.values():
            try:
                self.groups.append(_Group(engine, jobs, idx))
            except Exception as e:  # noqa: BLE001 - retried / reported per job
                for i in idx:
                    try:
                        self.groups.append(_Group(engine, jobs, [i]))
                    except Exception as e1:  # noqa: BLE001
                        self.errors[i] = e1 if len(idx) > 1 else e

    @property
    def rows(self) -> int:
        return sum(len(job.seeds) for job in self.jobs)

    def step(self) -> list[StepItem | None] | None:
        """Advance every group by one token.

        Returns:
            Per job: its new tokens (and its result once complete), or None once it was reported complete;
            None when every job has been reported.
        """
        if all(self.reported):
            return None
        self.new = [[[] for _ in job.seeds] for job in self.jobs]
        self.new_alts = [[[] for _ in job.seeds] for job in self.jobs]
        for g in self.groups:
            if not g.done:
                try:
                    g.step(self)
                except Exception as e:  # noqa: BLE001 - e.g. a failed beam search: its jobs fail, not the batch
                    g.done = True
                    for j, _ in g.rows:
                        self.errors[j] = self.errors[j] or e
        items: list[StepItem | None] = []
        for j in range(len(self.jobs)):
            if self.reported[j]:
                items.append(None)
                continue
            wants_alts = self.jobs[j].params.top_logprobs >= 0
            item = StepItem(self.new[j], alternatives=self.new_alts[j] if wants_alts else None)
            if self.errors[j] is not None:
                item.done = self.errors[j]
            elif all(r is not None for r in self.reasons[j]):
                alts = self.alts[j] if wants_alts else None
                item.done = JobOutput(self.tokens[j], [str(r) for r in self.reasons[j]], alts)
            self.reported[j] = item.done is not None
            items.append(item)
        return items


def run_jobs(engine: GenerationEngine, jobs: Sequence[GenerationJob]) -> list[JobOutput | Exception]:
    """Run a batch to completion (what a replica does step by step): one result or exception per job, in order."""
    run = BatchRun(engine, jobs)
    results: list[JobOutput | Exception | None] = [None] * len(jobs)
    while (items := run.step()) is not None:
        for j, item in enumerate(items):
            if item is not None and item.done is not None:
                results[j] = item.done
    return [r if r is not None else RuntimeError("job produced no result") for r in results]


def row_seeds(seed: int | None, n: int) -> tuple[int, ...]:
    """One seed per choice: derived from the request's seed (reproducible), or random."""
    if seed is None:
        return tuple(secrets.randbits(62) for _ in range(n))
    return tuple(int(seed) * 1_000_003 + i for i in range(n))


class Batcher:
    """A replica's generation scheduler: dynamic batches from ``@serve.batch``, run on one generation thread.

    Args:
        engine: the generation engine.
        max_batch_size: most requests in one generation batch (``serve.max_batch_size``; 1 = batch-1 serving).
        batch_wait_timeout_s: longest wait to fill a batch (``serve.batch_wait_timeout_s``).
    """

    def __init__(self, engine: GenerationEngine, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.stats = BatchStats()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlchat-generate")
        self._waiting: deque[tuple[list[GenerationJob], asyncio.Queue]] = deque()
        self._runner: asyncio.Task | None = None
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def submit(self, job: GenerationJob) -> AsyncIterator[StepItem]:
        """The job's share of every generation step until its :attr:`StepItem.done` (iterate it)."""
        return self._batch(job)

    @property
    def alive(self) -> bool:
        """Whether the generation thread still accepts work (Serve's health check)."""
        return not self.pool._shutdown  # noqa: SLF001 - ThreadPoolExecutor has no public flag

    @ray_serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _batch(self, jobs: list[GenerationJob]) -> AsyncIterator[list[StepItem | type[StopIteration]]]:
        """The dynamic batch: one item per job per generation step; each caller iterates its own items.

        Serve's batch is queued for :meth:`_run_batches`, which merges it with every other batch waiting at that
        moment (see :data:`MAX_CONCURRENT_BATCHES`), runs one :class:`BatchRun` and hands each batch its slice of
        every step.
        """
        queue: asyncio.Queue = asyncio.Queue()
        self._waiting.append((list(jobs), queue))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run_batches())
        while (items := await queue.get()) is not None:
            if isinstance(items, BaseException):
                raise items
            yield items

    async def _run_batches(self) -> None:
        """Run the waiting batches, merged up to ``serve.max_batch_size`` requests, one generation batch at a time."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            taken: list[tuple[list[GenerationJob], asyncio.Queue]] = []
            n_jobs = 0
            while self._waiting and (not taken or n_jobs + len(self._waiting[0][0]) <= self.max_batch_size):
                taken.append(self._waiting.popleft())
                n_jobs += len(taken[-1][0])
            jobs = [job for batch, _ in taken for job in batch]
            try:
                run = await loop.run_in_executor(self.pool, BatchRun, self.engine, jobs)
                self.stats.add_batch(len(jobs), run.rows)
                while (items := await loop.run_in_executor(self.pool, run.step)) is not None:
                    start = 0
                    for batch, queue in taken:
                        part = items[start : start + len(batch)]
                        queue.put_nowait([StopIteration if item is None else item for item in part])
                        start += len(batch)
            except Exception as e:  # noqa: BLE001 - the callers of this generation batch get the error
                for _, queue in taken:
                    queue.put_nowait(e)
                continue
            for _, queue in taken:
                queue.put_nowait(None)
