"""Continuous batching (serve/batching.py, serve/decode_batch.py) on a tiny model: no Ray, no HTTP.

Rows join a running decode batch and leave it; a seeded reply equals the same request run alone whenever it
joined and whatever it shared the batch with; control, deadlines and beam search never hold up other requests.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest
import torch

from rlchat.config import Config
from rlchat.generation import FINISH_LENGTH, FINISH_STOP, GenerationEngine, SamplingParams
from rlchat.model import PolicyValueModel
from rlchat.tokenizer import ChatTokenizer
from serve.batching import (
    Batcher,
    BatchRun,
    DeadlineExceeded,
    GenerationJob,
    JobOutput,
    SchedulerStopped,
    StepItem,
    SubmittedNow,
    run_jobs,
)
from serve.decode_batch import DecodeBatch
from serve.metrics import ServeMetrics

VOCAB = 4096


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", VOCAB)


@pytest.fixture(scope="module")
def engine(tok) -> GenerationEngine:
    sizes = {"tokenizer.vocab_size": VOCAB, "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2}
    cfg = Config().replace(**sizes, **{"model.n_positions": 128})
    return GenerationEngine(PolicyValueModel.build(cfg, tok).eval(), tok, precision="fp32")


def _prompt(tok, text: str) -> tuple[int, ...]:
    return tuple(tok.render_prompt([{"role": "user", "content": text}]))


def _solo(engine: GenerationEngine, job: GenerationJob) -> tuple[list[list[int]], list[str], list | None]:
    """The job's tokens, finish reasons and log-prob entries when it runs alone, through the engine's own stream."""
    stream = engine.steps([list(job.prompt)] * len(job.seeds), job.params, list(job.seeds))
    alts: list[list] = [[] for _ in job.seeds]
    for out in stream:
        if out.alternatives is not None:
            for r, a in enumerate(out.alternatives):
                if a is not None:
                    alts[r].append(a)
    res = stream.result()
    return res.tokens, res.finish_reasons, (alts if job.params.top_logprobs >= 0 else None)


def _drive(run: BatchRun, arrivals: dict[int, list[GenerationJob]]) -> tuple[dict[int, JobOutput], dict, dict]:
    """Step ``run`` to completion, adding ``arrivals[s]`` before step s (with the running rows' trunk pass run ahead
    after each step, as the Batcher runs it); results and first / last step per job."""
    results: dict[int, JobOutput] = {}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    step = 0
    while step in arrivals or run.live_jobs or any(s > step for s in arrivals):
        for job in arrivals.get(step, []):
            run.add(job)
        step += 1
        handed: dict[int, StepItem] = {}
        for jid, item in {**run.step_items(early=handed.update), **handed}.items():
            if any(item.tokens):
                first.setdefault(jid, step)
            if item.done is not None:
                assert isinstance(item.done, JobOutput), item.done
                results[jid], last[jid] = item.done, step
        run.feed_ahead()  # as the Batcher does once a step's tokens are handed over
    return results, first, last


# --------------------------------------------------------------------------------------------------------------
# Joining, leaving, equality with a solo run
# --------------------------------------------------------------------------------------------------------------


def test_a_job_added_mid_generation_joins_before_the_first_one_finishes(engine, tok):
    a = GenerationJob(_prompt(tok, "first"), SamplingParams(max_new_tokens=12, temperature=1.0), (1,))
    b = GenerationJob(_prompt(tok, "second, a bit later"), SamplingParams(max_new_tokens=4, temperature=1.0), (2,))
    results, first, last = _drive(BatchRun(engine, keep_history=False), {0: [a], 3: [b]})
    assert first[1] == 4  # b's first token came at the very next step after it arrived
    assert first[1] < last[0] and last[1] < last[0]  # the steps overlapped: b ran and finished inside a's run
    assert len(results[0].tokens[0]) == 12 and len(results[1].tokens[0]) == 4


def test_a_newcomer_and_the_running_rows_take_their_tokens_in_the_same_step(engine, tok):
    """A newcomer joins the running rows at the next step: its first token and their next one come from one step
    (one pass of the head, the largest weight at a real vocabulary), not from a step of its own."""
    batch = DecodeBatch(engine)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    old = batch.add([_prompt(tok, "first")] * 2, params, [1, 2])
    assert [o.handle for o in batch.step()] == old
    (new,) = batch.add([_prompt(tok, "a later, longer question")], params, [3])
    assert [o.handle for o in batch.step()] == [*old, new]


def test_prefill_first_gives_a_newcomer_a_step_of_its_own(engine, tok, monkeypatch):
    """``serve.prefill_first``: the step after rows arrive prefills and samples them alone (their first token does
    not wait for the running rows' pass); the running rows take their next token at the step after, and nothing
    runs ahead."""
    batch = DecodeBatch(engine, prefill_first=True)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    old = batch.add([_prompt(tok, "first")] * 2, params, [1, 2])
    assert [o.handle for o in batch.step()] == old
    calls = _count_forwards(batch, monkeypatch)
    batch.feed_ahead()
    assert calls == []
    (new,) = batch.add([_prompt(tok, "a later, longer question")], params, [3])
    assert [o.handle for o in batch.step()] == [new]  # the newcomer alone
    assert sorted(o.handle for o in batch.step()) == sorted([*old, new])  # then everyone, in one decode step
    assert calls == [1, 3]


def test_rows_added_with_their_prefill_skip_it_at_the_step_and_sample_the_same(engine, tok, monkeypatch):
    """``DecodeBatch.prefill`` (run by the scheduler's prefill thread while a step is in progress) gives ``add`` the
    rows' trunk pass: with the running rows fed ahead, the step that takes them runs no trunk pass at all, and every
    token is the one the in-step prefill samples; a group that lost a row before joining is prefilled again."""
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    prompts = [_prompt(tok, "a later, longer question")] * 2
    runs = []
    for given in (False, True, "one left"):
        batch = DecodeBatch(engine)
        batch.add([_prompt(tok, "first")] * 2, params, [1, 2])
        batch.step()
        batch.feed_ahead()
        pre = batch.prefill(prompts) if given else None
        calls = _count_forwards(batch, monkeypatch)
        new = batch.add(prompts, params, [3, 4], pre)
        if given == "one left":
            batch.finish(new[:1])
        outs = [{o.handle: o.token for o in batch.step()}]
        assert calls == {False: [2], True: [], "one left": [1]}[given]
        while batch.rows:
            outs.append({o.handle: o.token for o in batch.step()})
        runs.append(outs)
    assert runs[0] == runs[1]
    assert [{h: t for h, t in o.items() if h != 2} for o in runs[0]] == runs[2]  # handle 2: the row that left


def _trace_starts(monkeypatch) -> list[tuple[int, ...]]:
    """The prompts of the jobs :meth:`Batcher._start` runs on the prefill thread from now on."""
    started: list[tuple[int, ...]] = []
    start = Batcher._start

    def traced_start(self, w):
        started.append(w.job.prompt)
        return start(self, w)

    monkeypatch.setattr(Batcher, "_start", traced_start)
    return started


def test_a_lone_arrival_at_a_running_batch_gets_its_first_token_from_the_prefill_thread(engine, tok, monkeypatch):
    """The Batcher starts a lone arrival at a running batch on its prefill thread, beside the step in progress: its
    prefill, its first token (handed over from there) and the feed of that token; the step after takes it in as a
    running row. Its first token does not wait for the step in progress (slowed to 0.3 s here), and its reply is the
    one it gets alone. A job arriving at an idle batch is prefilled by its step, as are arrivals in a burst (the
    previous one less than half a step before: one trunk pass for all of them at the step)."""
    threads: list[str] = []
    prefill = DecodeBatch.prefill

    def traced(self, prompts, *args):
        threads.append(threading.current_thread().name)
        return prefill(self, prompts, *args)

    monkeypatch.setattr(DecodeBatch, "prefill", traced)
    joining = GenerationJob(_prompt(tok, "a later question"), SamplingParams(max_new_tokens=5), (2,))

    async def main() -> tuple[list[StepItem], float]:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        batch, fast_step = batcher._run.batch, batcher._run.batch.step  # noqa: SLF001
        batch.step = lambda *a: (time.sleep(0.3), fast_step(*a))[1]  # the step in progress outlasts the start
        try:
            running = GenerationJob(_prompt(tok, "first"), SamplingParams(max_new_tokens=20, temperature=1.0), (1,))
            first_items: list = []
            task = asyncio.create_task(_collect(batcher, running, first_items))
            while not first_items:  # it runs; and this arrival comes a step after it (not in its burst)
                await asyncio.sleep(0.001)
            t0 = time.monotonic()
            items = batcher.submit(joining)
            first = await asyncio.wait_for(items.__anext__(), 60)
            ttft = time.monotonic() - t0
            assert first.tokens[0] and first.done is None
            async for item in items:
                if item.done is not None:
                    return [await asyncio.wait_for(task, 60), item], ttft
            raise AssertionError("no result")
        finally:
            batcher.close()

    (_, joined), ttft = asyncio.run(main())
    assert sorted(threads) == ["rlchat-generate", "rlchat-prefill_0"]  # its prefill ran once, on that thread
    assert ttft < 0.25, ttft  # not behind the 0.3 s step in progress
    assert joined.done.tokens == _solo(engine, joining)[0]

    started = _trace_starts(monkeypatch)
    a_job = GenerationJob(_prompt(tok, "question a"), SamplingParams(max_new_tokens=3), (3,))
    b_job = GenerationJob(_prompt(tok, "question b"), SamplingParams(max_new_tokens=3), (4,))

    async def burst() -> list[StepItem]:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        batch, fast_step = batcher._run.batch, batcher._run.batch.step  # noqa: SLF001
        batch.step = lambda *a: (time.sleep(0.2), fast_step(*a))[1]
        try:  # a 0.2 s step first (the scheduler's measure of a step), then a at the idle batch and b just after
            warm = GenerationJob((1, 2), SamplingParams(max_new_tokens=2), (1,))
            await asyncio.wait_for(_collect(batcher, warm), 60)
            a_task = asyncio.create_task(_collect(batcher, a_job))
            while not batcher.active_rows:
                await asyncio.sleep(0.001)
            return await asyncio.wait_for(asyncio.gather(a_task, _collect(batcher, b_job)), 60)
        finally:
            batcher.close()

    a_out, b_out = asyncio.run(burst())
    assert started == []  # a found the batch idle; b came right after a (its burst) while a's step ran
    assert a_out.done.tokens == _solo(engine, a_job)[0] and b_out.done.tokens == _solo(engine, b_job)[0]


def test_a_started_job_that_fails_after_its_first_token_ends_with_the_error_not_a_second_start(
    engine, tok, monkeypatch
):
    """If the prefill thread fails after handing the first token over, the job ends with that error at the next
    step; it is not started again (that would send a second first token). The running job is unaffected."""
    from serve.decode_batch import RowStep

    def broken(self, prompt, params, seed, first):
        first(RowStep(-1, 7, -1.0, None, None))
        raise RuntimeError("feed failed")

    monkeypatch.setattr(DecodeBatch, "start", broken)
    joining = GenerationJob(_prompt(tok, "a later question"), SamplingParams(max_new_tokens=5), (2,))

    async def main() -> tuple[list[StepItem], StepItem]:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        batch, fast_step = batcher._run.batch, batcher._run.batch.step  # noqa: SLF001
        batch.step = lambda *a: (time.sleep(0.05), fast_step(*a))[1]
        try:
            running = GenerationJob(_prompt(tok, "first"), SamplingParams(max_new_tokens=8, temperature=1.0), (1,))
            first_items: list = []
            task = asyncio.create_task(_collect(batcher, running, first_items))
            while not first_items:
                await asyncio.sleep(0.001)
            log: list = []
            await asyncio.wait_for(_collect(batcher, joining, log), 60)
            return [item for _, item in log], await asyncio.wait_for(task, 60)
        finally:
            batcher.close()

    items, other = asyncio.run(main())
    assert [i.tokens for i in items] == [[[7]], [[]]]
    assert isinstance(items[-1].done, RuntimeError) and "feed failed" in str(items[-1].done)
    assert isinstance(other.done, JobOutput) and len(other.done.tokens[0]) == 8


def _slow_batcher(engine, step_s: float) -> Batcher:
    batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
    batch, fast_step = batcher._run.batch, batcher._run.batch.step  # noqa: SLF001
    batch.step = lambda *a: (time.sleep(step_s), fast_step(*a))[1]
    return batcher


async def _running_job(batcher: Batcher, tok) -> asyncio.Task:
    """A long job decoding, its first token out (so the next arrival is a lone one)."""
    running = GenerationJob(_prompt(tok, "first"), SamplingParams(max_new_tokens=12, temperature=1.0), (1,))
    first_items: list = []
    task = asyncio.create_task(_collect(batcher, running, first_items))
    while not first_items:
        await asyncio.sleep(0.001)
    return task


async def _beside_a_running_job(batcher: Batcher, tok, make_job) -> list[StepItem]:
    """The items of ``make_job()``, submitted alone while a long job decodes on ``batcher`` (closed after)."""
    try:
        task = await _running_job(batcher, tok)
        log: list = []
        await asyncio.wait_for(_collect(batcher, make_job(), log), 60)
        await asyncio.wait_for(task, 60)
        return [item for _, item in log]
    finally:
        batcher.close()


def test_a_started_job_is_never_also_started_by_the_step(engine, tok, monkeypatch):
    """The generation thread must not take a lone arrival in before its start is registered: it would prefill and
    sample it too, and the caller would get two first tokens (seen with a slow ``prefill_pool.submit``, as on the
    pool's first use, which starts its thread)."""
    joining = GenerationJob(_prompt(tok, "a later question"), SamplingParams(max_new_tokens=5), (2,))

    async def main() -> list[StepItem]:
        batcher = _slow_batcher(engine, 0.02)
        submit = batcher.prefill_pool.submit

        def slow_submit(*args, **kwargs):
            future = submit(*args, **kwargs)
            time.sleep(0.1)  # the generation thread runs several steps meanwhile
            return future

        batcher.prefill_pool.submit = slow_submit
        return await _beside_a_running_job(batcher, tok, lambda: joining)

    items = asyncio.run(main())
    delivered = [t for item in items for t in item.tokens[0]]
    assert delivered == items[-1].done.tokens[0] == _solo(engine, joining)[0][0]


def test_a_lone_arrival_that_leaves_before_its_start_runs_is_never_started(engine, tok, monkeypatch):
    """A lone arrival whose start is still queued on the prefill thread when it settles (its deadline passed while
    waiting; a client that left) must not be started after all: that prefill and head pass would be work for
    nobody, on the core the running batch needs."""
    started = _trace_starts(monkeypatch)
    gate = threading.Event()
    prompt = _prompt(tok, "a later question")

    async def main() -> list[StepItem]:
        batcher = _slow_batcher(engine, 0.3)
        try:
            task = await _running_job(batcher, tok)
            batcher.prefill_pool.submit(gate.wait, 60)  # the prefill thread is busy: the start below waits
            await asyncio.sleep(0.35)  # a lone arrival, a step after the running job's first token
            # its deadline passes during the 0.3 s step in progress: it is settled before any step admits it
            leaving = GenerationJob(prompt, SamplingParams(max_new_tokens=5), (2,), deadline=time.monotonic() + 0.05)
            items = [item async for item in batcher.submit(leaving)]
            gate.set()
            await asyncio.wait_for(task, 60)
            await asyncio.sleep(0.3)  # the prefill thread is free again: a start still queued would run now
            return items
        finally:
            gate.set()
            batcher.close()

    items = asyncio.run(main())
    assert isinstance(items[-1].done, DeadlineExceeded), items[-1]
    assert prompt not in started, started


def test_a_started_job_past_its_deadline_keeps_its_first_token(engine, tok):
    """A started job whose deadline passes before the step takes it in is not a queue timeout: its first token is
    out, so it ends like a running job at its deadline, ``length``, with what it generated.

    The step in progress is held until the job's first token is out and its deadline has passed (a slow step of
    0.3, then 0.6 s, raced a loaded CI: the event loop submitted the job late in the step, the next step took it in
    before its deadline, and the job got a second token)."""
    armed, held, release = threading.Event(), threading.Event(), threading.Event()
    batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
    batch, fast_step = batcher._run.batch, batcher._run.batch.step  # noqa: SLF001

    def step(*args):
        if armed.is_set():
            held.set()
            release.wait(30)
        return fast_step(*args)

    batch.step = step

    async def main() -> list[StepItem]:
        try:
            task = await _running_job(batcher, tok)
            armed.set()
            while not held.is_set():  # the generation thread waits inside a step: nothing is admitted meanwhile
                await asyncio.sleep(0.005)
            prompt, params = _prompt(tok, "a later question"), SamplingParams(max_new_tokens=5)
            job = GenerationJob(prompt, params, (2,), deadline=time.monotonic() + 0.1)
            log: list = []
            collecting = asyncio.create_task(_collect(batcher, job, log))
            while not log or time.monotonic() < job.deadline + 0.05:  # its first token (prefill thread), then late
                await asyncio.sleep(0.01)
            release.set()
            await asyncio.wait_for(collecting, 60)
            await asyncio.wait_for(task, 60)
            return [item for _, item in log]
        finally:
            release.set()
            batcher.close()

    items = asyncio.run(main())
    assert len(items[0].tokens[0]) == 1  # the first token, from the prefill thread
    done = items[-1].done
    assert isinstance(done, JobOutput), done
    assert done.finish_reasons == [FINISH_LENGTH] and done.tokens[0] == items[0].tokens[0]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_a_row_started_off_the_generation_thread_continues_in_the_batch_as_if_added(
    engine, tok, monkeypatch, temperature
):
    """``DecodeBatch.start`` (what the prefill thread runs for a lone arrival): the row's prefill, its first token
    (handed to ``first`` at once) and the feed of that token through its own cache; ``add_started`` then puts it in
    the batch, whose next step runs no trunk pass for it and samples its second token. Every token of both rows is
    the one ``add`` gives."""
    params = SamplingParams(max_new_tokens=6, temperature=temperature)
    prompt = _prompt(tok, "a later, longer question")
    runs = []
    for started in (False, True):
        batch = DecodeBatch(engine)
        (old,) = batch.add([_prompt(tok, "first")], params, [1])
        batch.step()
        batch.feed_ahead()
        tokens: dict[int, list[int]] = {}
        if started:
            firsts = []
            row = batch.start(prompt, params, 3, firsts.append)
            assert [o.reason for o in firsts] == [None] and row.prefill is not None
            tokens["new"] = [firsts[0].token]
            calls = _count_forwards(batch, monkeypatch)
            new = batch.add_started(row)
            assert new == row.row.handle != old
        else:
            calls = _count_forwards(batch, monkeypatch)
            (new,) = batch.add([prompt], params, [3])
        outs = batch.step()
        assert calls == ([] if started else [1])  # the started row brought its state: no trunk pass for it
        while True:
            for o in outs:
                tokens.setdefault("new" if o.handle == new else "old", []).append(o.token)
            if not batch.rows:
                break
            outs = batch.step()
        runs.append(tokens)
    assert runs[0] == runs[1]
    assert len(runs[1]["new"]) == 6


def test_a_started_row_takes_its_handle_from_the_batch_it_joins(engine, tok):
    """``add_started`` gives the row its handle, so a row started before a failed step replaced the batch cannot
    collide with the new batch's rows."""
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    old_batch, new_batch = DecodeBatch(engine), DecodeBatch(engine)
    (running,) = new_batch.add([_prompt(tok, "first")], params, [1])
    new_batch.step()
    started = old_batch.start(_prompt(tok, "a later question"), params, 2, lambda out: None)
    joined = new_batch.add_started(started)
    assert joined != running
    seen: dict[int, int] = {}
    while new_batch.rows:
        for o in new_batch.step():
            seen[o.handle] = seen.get(o.handle, 0) + 1
    assert seen == {running: 3, joined: 3}  # each its own tokens: 4 - 1 and 4 - 1 (its first came from start)


def test_a_row_that_ends_at_its_first_token_is_not_left_to_the_batch(engine, tok):
    """A started row whose first token ends it (budget 1, here) reports ``length`` with that token and carries no
    state to add: the scheduler hands its result over and never adds it."""
    batch = DecodeBatch(engine)
    firsts = []
    row = batch.start(_prompt(tok, "hi"), SamplingParams(max_new_tokens=1), 5, firsts.append)
    assert row.prefill is None
    assert [o.reason for o in firsts] == [FINISH_LENGTH]
    assert batch.rows == 0


def test_a_newcomers_first_token_is_handed_over_before_the_running_rows_are_sampled(engine, tok):
    """With ``early``, the newcomers' first tokens leave the step as soon as they are sampled: the running rows are
    sampled after (their tokens come back from the step, the newcomers' do not), and every token is the one the
    step samples without ``early``."""
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    runs = []
    for early in (False, True):
        batch = DecodeBatch(engine)
        old = batch.add([_prompt(tok, "first")] * 2, params, [1, 2])
        batch.step()
        (new,) = batch.add([_prompt(tok, "a later, longer question")], params, [3])
        handed: list[tuple[list[int], list[int]]] = []

        def take(outs, batch=batch, old=old, handed=handed):  # the running rows' step counts when it is called
            handed.append(([o.handle for o in outs], [batch._by_handle[h].step for h in old]))

        outs = batch.step(take if early else None)
        runs.append({o.handle: o.token for o in outs})
        if early:
            assert handed == [([new], [1, 1])]  # the newcomer alone, the running rows not sampled yet
            assert [o.handle for o in outs] == old
            runs[-1][new] = batch._by_handle[new].pending
    assert runs[0] == runs[1]


def _count_forwards(batch: DecodeBatch, monkeypatch) -> list[int]:
    """Rows of each trunk pass ``batch`` runs from now on."""
    calls: list[int] = []
    forward = batch._dec.forward

    def counted(ids, *args, **kwargs):
        calls.append(int(ids.shape[0]))
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(batch._dec, "forward", counted)
    return calls


def test_feed_ahead_leaves_a_newcomer_only_its_prefill_and_the_head(engine, tok, monkeypatch):
    """``feed_ahead`` runs the running rows' trunk pass of the next step right after a step (once its tokens are
    handed over), so a request that arrives meanwhile waits at the next step for its own prefill and one head pass
    only; rows ended in between leave the pre-computed states too."""
    batch = DecodeBatch(engine)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    old = batch.add([_prompt(tok, "first")] * 3, params, [1, 2, 3])
    batch.step()
    calls = _count_forwards(batch, monkeypatch)
    batch.feed_ahead()
    batch.feed_ahead()  # idempotent: the pass is run once
    assert calls == [3]
    batch.finish([old[1]])  # a client leaves between the pass and the step
    (new,) = batch.add([_prompt(tok, "a later, longer question")], params, [4])
    assert [o.handle for o in batch.step()] == [old[0], old[2], new]
    assert calls == [3, 1]  # the step itself ran the newcomer's prefill only
    batch.step()
    assert calls == [3, 1, 3]  # no pass ahead: the step runs the running rows' own


@pytest.mark.parametrize("prefill_first", [False, True], ids=["join", "prefill-first"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_replies_equal_solo_runs_for_prompts_of_any_length_joining_at_any_step(
    engine, tok, temperature, prefill_first
):
    texts = ["hi", "a much longer question that makes the prompt longer than the running cache " * 2, "mid size?"]
    params = [SamplingParams(max_new_tokens=n, temperature=temperature) for n in (20, 9, 14)]
    jobs = [GenerationJob(_prompt(tok, t), p, (100 + i, 200 + i)) for i, (t, p) in enumerate(zip(texts, params))]
    # job 1's prompt is longer than the cache when it joins (the running rows get left-padded); job 2's is shorter
    assert len(jobs[1].prompt) > len(jobs[0].prompt) + 3 > len(jobs[2].prompt)
    run = BatchRun(engine, keep_history=False, prefill_first=prefill_first)
    results, _, _ = _drive(run, {0: [jobs[0]], 3: [jobs[1]], 5: [jobs[2]]})
    for jid, job in enumerate(jobs):
        tokens, reasons, _ = _solo(engine, job)
        assert results[jid].tokens == tokens, f"job {jid}"
        assert results[jid].finish_reasons == reasons


def _sliding_window_engine(tok, kind: str) -> GenerationEngine:
    """A tiny Hugging Face model whose layers attend through a sliding window (``transformers`` builds its cache
    with sliding-window layers: they keep only the window's columns and count positions themselves)."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
              "initializer_range": 0.2}  # fmt: skip
    cfg = {
        "mistral": lambda: MistralConfig(**common),  # Mistral-7B-v0.1's default window, 4096
        "mistral-window-8": lambda: MistralConfig(**common, sliding_window=8),
        "qwen2-window-8": lambda: Qwen2Config(
            **common, use_sliding_window=True, sliding_window=8, max_window_layers=0
        ),
    }[kind]()
    torch.manual_seed(0)
    return GenerationEngine(AutoModelForCausalLM.from_config(cfg).eval(), tok, precision="fp32")


@pytest.mark.parametrize("prefill_first", [False, True], ids=["join", "prefill-first"])
@pytest.mark.parametrize("kind", ["mistral", "mistral-window-8", "qwen2-window-8"])
def test_sliding_window_models_batch_continuously_with_the_replies_they_give_alone(tok, kind, prefill_first):
    """Rows joining and leaving a running batch of a sliding-window model (Mistral's default config, Gemma 2/3,
    Phi-3 mini, ...): the merge of a newcomer's cache and the trim of a finished row's padding must keep the cache
    and the attention mask in agreement (they raised a size mismatch and failed every job of the batch), and each
    reply is the model's own, past the window too (checked against a full recomputation without a cache)."""
    import torch

    engine = _sliding_window_engine(tok, kind)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    prompts = [(10, 11, 12, 13), tuple(range(100, 119)), (300, 301, 302, 303, 304, 305, 306)]
    jobs = [GenerationJob(p, greedy, (i,)) for i, p in enumerate(prompts)]
    run = BatchRun(engine, keep_history=False, prefill_first=prefill_first)
    # job 1 is longer than the running cache when it joins; job 2 joins past an 8-token window, after job 0 left
    results, _, _ = _drive(run, {0: [jobs[0]], 2: [jobs[1]], 13: [jobs[2]]})
    lm = engine.lm
    for jid, job in enumerate(jobs):
        ids = list(job.prompt)
        with torch.no_grad():
            for _ in range(greedy.max_new_tokens):
                ids.append(int(lm(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert results[jid].tokens == [ids[len(job.prompt) :]], f"job {jid}"


def test_rows_with_different_settings_share_the_batch_and_keep_their_own_processing(engine, tok):
    """Penalties, logit bias, min tokens, top-k / top-p, stop ids and top log-probs are per row."""
    p = _prompt(tok, "tell me a story")
    stop = tok.encode(" the")[0]
    settings = [
        SamplingParams(max_new_tokens=10, temperature=0.8, top_k=20, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, presence_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(max_new_tokens=10, temperature=0.0, logit_bias=((stop, 6.0),), stop_token_ids=(stop,)),
        SamplingParams(max_new_tokens=10, temperature=0.0, logit_bias=((stop, 6.0),), stop_token_ids=(stop,),
                       min_new_tokens=3),
        SamplingParams(max_new_tokens=10, temperature=1.0, top_logprobs=3),
        SamplingParams(max_new_tokens=10, temperature=1.0, stop_strings=("e",)),
    ]  # fmt: skip
    jobs = [GenerationJob(p[: len(p) - i], s, (7 + i,)) for i, s in enumerate(settings)]
    results, _, _ = _drive(BatchRun(engine, keep_history=False), {0: jobs[:3], 2: jobs[3:]})
    for jid, job in enumerate(jobs):
        tokens, reasons, alts = _solo(engine, job)
        assert results[jid].tokens == tokens, f"job {jid}"
        assert results[jid].finish_reasons == reasons
        if alts is not None:  # (chosen log-prob, top ids, top log-probs) per token
            got = results[jid].alternatives[0]
            assert [a[1] for a in got] == [a[1] for a in alts[0]]
            flat = [x for a in got for x in (a[0], *a[2])]
            assert flat == pytest.approx([x for a in alts[0] for x in (a[0], *a[2])], abs=1e-5)
    assert results[2].finish_reasons == [FINISH_STOP] and results[2].tokens[0] == [stop]  # the bias made it stop
    assert len(results[3].tokens[0]) == 4 and results[3].tokens[0][-1] == stop  # ... but not before 3 tokens


def test_rows_leave_and_the_batch_and_cache_compact(engine, tok):
    batch = DecodeBatch(engine)
    long_prompt = _prompt(tok, "a long prompt " * 6)
    short_prompt = _prompt(tok, "short")
    (h_long,) = batch.add([long_prompt], SamplingParams(max_new_tokens=2, temperature=1.0), [1])
    h_short = batch.add([short_prompt] * 2, SamplingParams(max_new_tokens=6, temperature=1.0), [2, 3])
    batch.step()
    assert batch.rows == 3 and batch.cache_length == len(long_prompt)
    outs = batch.step()
    assert [o.reason for o in outs if o.handle == h_long] == [FINISH_LENGTH]
    batch.finish([h_short[1]])
    outs = batch.step()  # the long row and the finished short row left; padding only they needed is trimmed
    assert [o.handle for o in outs] == [h_short[0]]
    assert batch.rows == 1 and batch.cache_length == len(short_prompt) + 2


def test_rows_join_and_leave_inside_the_cache_buffers_and_reply_as_alone(engine, tok):
    """Past the first join, arrivals take spare rows of the fast step's key / value buffers and departures move the
    last rows into the freed slots: the cache is not copied per arrival or departure (it was twice each, a sixth of a
    16-row step at a real vocabulary), and every reply is still the one its request gets alone -- a newcomer longer
    than the running cache (leading columns), one shorter, rows leaving from the middle of the batch."""
    from rlchat.core.fast_decode import kv_buffers

    batch = DecodeBatch(engine)
    assert batch._dec.step is not None  # noqa: SLF001 - the fast step: the buffers are its own
    prompts = [_prompt(tok, t) for t in ("one", "two words", "three words here", "four", "a five word prompt")]
    params = [SamplingParams(max_new_tokens=n, temperature=1.0) for n in (3, 12, 5, 14, 9)]
    got: dict[int, list[int]] = {}
    jobs: dict[int, GenerationJob] = {}

    def add(prompt, p, seed) -> None:
        (h,) = batch.add([prompt], p, [seed])
        jobs[h] = GenerationJob(prompt, p, (seed,))

    def step() -> None:
        for out in batch.step():
            got.setdefault(out.handle, []).append(out.token)

    def buffer() -> int:
        found = kv_buffers(batch._cache.layers[0])  # noqa: SLF001
        assert found is not None
        return found[0].data_ptr()

    add(prompts[0], params[0], 1)
    step()
    add(prompts[1], params[1], 2)  # the first join: new buffers with room
    step()
    ptr = buffer()
    for i in (2, 3):  # more joins while row 0 leaves (budget 3) from the batch's front
        add(prompts[i], params[i], 1 + i)
        step()
        assert buffer() == ptr
    width = batch.cache_length
    longer = tuple(range(100, 100 + width + 5))  # longer than the running cache: its rows gain leading columns
    add(longer, SamplingParams(max_new_tokens=6, temperature=1.0), 9)
    step()
    assert batch.cache_length == width + 5 and buffer() == ptr  # (the running rows were fed one column first)
    add(prompts[4], params[4], 5)
    while batch.rows:
        step()
        if batch._cache is not None:  # noqa: SLF001
            assert buffer() == ptr
    for h, job in jobs.items():
        tokens, _, _ = _solo(engine, job)
        assert got[h] == tokens[0], f"row {h}"


def test_a_bad_job_fails_alone(engine, tok):
    good = GenerationJob(_prompt(tok, "fine"), SamplingParams(max_new_tokens=3, temperature=1.0), (1,))
    too_long = GenerationJob(tuple([5] * 200), SamplingParams(max_new_tokens=3), (2,))
    bad_bias = GenerationJob(_prompt(tok, "x"), SamplingParams(max_new_tokens=3, logit_bias=((VOCAB + 5, 1.0),)), (3,))
    run = BatchRun(engine, [good, too_long, bad_bias])
    items = run.step()
    assert isinstance(items[1].done, Exception) and "positions" in str(items[1].done)
    assert isinstance(items[2].done, Exception) and "logit_bias" in str(items[2].done)
    while (items := run.step()) is not None:
        pass
    assert len(run.tokens[0][0]) == 3 and run.reasons[0] == [FINISH_LENGTH]


def test_jobs_of_a_failed_batch_never_touch_the_rows_of_the_batch_that_replaces_it(engine, tok, monkeypatch):
    """A failed trunk pass replaces the decode batch, whose handles start again from 0: the failed jobs must not end
    or drop the rows of jobs added after it (a client of the failed job that leaves, a report of its error)."""
    params = SamplingParams(max_new_tokens=5, min_new_tokens=5, temperature=1.0)
    a = GenerationJob(_prompt(tok, "first"), params, (1,))
    run = BatchRun(engine, [a], keep_history=False)
    run.step_items()
    calls = {"n": 0}
    real = DecodeBatch.feed_ahead

    def fail_once(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return real(self)

    monkeypatch.setattr(DecodeBatch, "feed_ahead", fail_once)
    run.feed_ahead()  # fails: a's batch is replaced
    b = GenerationJob(_prompt(tok, "second"), params, (2,))
    jb = run.add(b)
    a.control.finish.add(0)  # a's client leaves before a's error is reported
    items = run.step_items()
    assert isinstance(items[0].done, RuntimeError) and "out of memory" in str(items[0].done)
    tokens = list(items[jb].tokens[0])
    for _ in range(10):  # bounded: a job whose row was taken from it would stay live forever
        if not run.live_jobs:
            break
        items = run.step_items()
        tokens += items[jb].tokens[0]
        done = items[jb].done
    assert isinstance(done, JobOutput) and done.finish_reasons == [FINISH_LENGTH] and len(tokens) == 5


def test_a_device_error_stops_the_scheduler_so_that_the_replica_is_replaced(engine, tok, monkeypatch):
    """A CUDA error such as an illegal memory access poisons the device's context: every later step fails too. A
    failed step used to fail its batch and start a fresh one, so the scheduler stayed alive (the replica healthy)
    and failed every later request with a 500. Now the generation thread stops on it, every job gets the error,
    and the health check (``alive``) lets Serve replace the replica. Any other failure, out-of-memory included,
    still fails only its batch (tests above)."""
    import asyncio
    import time

    import torch

    def lost(self, *args):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    async def main() -> None:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        try:
            monkeypatch.setattr(DecodeBatch, "step", lost)
            job = GenerationJob(_prompt(tok, "hi"), SamplingParams(max_new_tokens=4, temperature=1.0), (1,))
            item = await _collect(batcher, job)
            # no token yet: a 503 to retry on the replacement (SchedulerStopped), caused by the device error
            assert isinstance(item.done, SchedulerStopped) and isinstance(item.done.__cause__, torch.AcceleratorError)
            until = time.monotonic() + 10
            while batcher.alive and time.monotonic() < until:
                await asyncio.sleep(0.01)
            assert not batcher.alive
            beams = SamplingParams(max_new_tokens=4, num_beams=2)
            for params in (SamplingParams(max_new_tokens=4), beams):  # nothing more runs on the broken device
                with pytest.raises(SchedulerStopped):
                    await _collect(batcher, GenerationJob(_prompt(tok, "hi"), params, (1,)))
        finally:
            batcher.close()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------------------------
# Control and deadlines
# --------------------------------------------------------------------------------------------------------------


def test_a_job_whose_every_choice_is_finished_leaves_at_the_next_step(engine, tok):
    keep = GenerationJob(_prompt(tok, "keep"), SamplingParams(max_new_tokens=8, temperature=1.0), (1,))
    gone = GenerationJob(_prompt(tok, "gone"), SamplingParams(max_new_tokens=8, temperature=1.0), (2, 3))
    run = BatchRun(engine, [keep, gone], keep_history=False)
    run.step_items()
    run.step_items()
    gone.control.finish.update({0, 1})  # the client went away
    items = run.step_items()
    assert items[1].tokens == [[], []] and items[1].done.finish_reasons == [FINISH_STOP, FINISH_STOP]
    assert [len(t) for t in items[1].done.tokens] == [2, 2]
    assert run.active_rows == 1 and run.last_rows == 1  # only the other job's row was decoded


def test_a_running_job_ends_with_length_at_its_deadline(engine, tok):
    job = GenerationJob(_prompt(tok, "late"), SamplingParams(max_new_tokens=50, temperature=1.0), (1,), deadline=100.0)
    run = BatchRun(engine, [job], keep_history=False)
    for _ in range(3):
        assert run.step_items(now=99.0)[0].done is None
    done = run.step_items(now=100.0)[0].done
    assert isinstance(done, JobOutput) and done.finish_reasons == [FINISH_LENGTH] and len(done.tokens[0]) == 3


async def _collect(batcher: Batcher, job: GenerationJob, log: list | None = None, tag: str = "") -> StepItem:
    async for item in batcher.submit(job):
        if log is not None:
            log.append((tag, item))
        if item.done is not None:
            return item
    raise AssertionError("no result")


def test_batcher_queued_jobs_meet_deadline_and_cancellation_and_report_depth(engine, tok):
    class Observer:
        def __init__(self) -> None:
            self.steps: list[tuple[int, int]] = []
            self.admits: list[int] = []
            self.queues: list[int] = []  # iterations without a decoding step

        def on_step(self, rows: int, queued: int, seconds: float) -> None:
            assert seconds >= 0
            self.steps.append((rows, queued))

        def on_admit(self, n_jobs: int) -> None:
            self.admits.append(n_jobs)

        def on_queue(self, queued: int) -> None:
            self.queues.append(queued)

        def on_tokens(self, n: int) -> None:
            raise AssertionError("batch-1 serving starts no job on the prefill thread, and this test runs no beams")

    obs = Observer()

    async def main() -> None:
        batcher = Batcher(engine, max_batch_size=1, batch_wait_timeout_s=0.0, observer=obs)
        batch, fast_step = batcher._run.batch, batcher._run.batch.step  # noqa: SLF001
        batch.step = lambda *a: (time.sleep(0.005), fast_step(*a))[1]  # a model slow enough to outlast the deadline
        p = _prompt(tok, "hello")
        running = GenerationJob(p, SamplingParams(max_new_tokens=100, temperature=1.0), (1,))
        late = GenerationJob(p, SamplingParams(max_new_tokens=5), (2,), deadline=time.monotonic() + 0.05)
        cancelled = GenerationJob(p, SamplingParams(max_new_tokens=5), (3,))
        waits = GenerationJob(p, SamplingParams(max_new_tokens=5), (4,))
        tasks = [asyncio.create_task(_collect(batcher, j)) for j in (running, late, cancelled, waits)]
        for _ in range(1000):
            if batcher.active_rows:
                break
            await asyncio.sleep(0.001)
        assert batcher.queue_depth == 3 and batcher.active_rows == 1
        cancelled.control.finish.add(0)
        await asyncio.sleep(0.1)
        running.control.finish.add(0)  # let the rest through
        r_running, r_late, r_cancelled, r_waits = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert isinstance(r_late.done, DeadlineExceeded)
        assert r_cancelled.done.tokens == [[]]  # dropped from the queue without generating
        assert isinstance(r_waits.done, JobOutput) and len(r_waits.done.tokens[0]) == 5
        assert batcher.queue_depth == 0 and batcher.active_rows == 0
        assert batcher.stats.largest == 1 and batcher.stats.batches == len(obs.steps)

    asyncio.run(main())
    assert obs.admits == [1, 1] and all(rows == 1 for rows, _ in obs.steps)
    assert max(queued for _, queued in obs.steps) == 3  # three jobs were waiting behind the first


@pytest.mark.parametrize("leaves_by", ["deadline", "cancellation"])
def test_queue_depth_returns_to_zero_when_waiting_jobs_leave_without_a_further_step(engine, tok, leaves_by):
    """The replica's queue-depth gauge (``ServeMetrics``) must read 0 once nothing waits, also when the last waiting
    job left by its deadline or its client going away in the same iteration as the running job ended (no decoding
    step after it): it stayed at 1 on an idle replica."""
    metrics = ServeMetrics("m")

    async def main() -> None:
        batcher = Batcher(engine, max_batch_size=1, batch_wait_timeout_s=0.0, observer=metrics.for_version(""))
        batch, fast_step = batcher._run.batch, batcher._run.batch.step  # noqa: SLF001
        batch.step = lambda *a: (time.sleep(0.005), fast_step(*a))[1]  # a model slow enough to outlast the wait
        try:
            p = _prompt(tok, "hello")
            deadline = time.monotonic() + 0.5 if leaves_by == "deadline" else None
            long = SamplingParams(max_new_tokens=1000, min_new_tokens=1000, temperature=1.0)
            running = GenerationJob(p, long, (1,), deadline=deadline)
            waiting = GenerationJob(p, SamplingParams(max_new_tokens=5), (2,), deadline=deadline)
            tasks = [asyncio.create_task(_collect(batcher, j)) for j in (running, waiting)]
            for _ in range(2000):
                if metrics.snapshot()["queue_depth"] == 1:
                    break
                await asyncio.sleep(0.001)
            assert batcher.queue_depth == 1 and metrics.snapshot()["queue_depth"] == 1
            if leaves_by == "cancellation":  # both clients go away at once: the waiting job never joins
                running.control.finish.add(0)
                waiting.control.finish.add(0)
            r_running, r_waiting = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            assert isinstance(r_running.done, JobOutput)
            assert isinstance(r_waiting.done, DeadlineExceeded) or r_waiting.done.tokens == [[]]
            await asyncio.sleep(0.3)  # counts ride with the items, or follow within REPORT_INTERVAL_S
            assert batcher.queue_depth == 0
            assert metrics.snapshot()["queue_depth"] == 0
        finally:
            batcher.close()

    asyncio.run(main())


def test_batcher_caller_that_stops_iterating_ends_its_rows(engine, tok):
    async def main() -> None:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        batch, fast_step = batcher._run.batch, batcher._run.batch.step  # noqa: SLF001
        batch.step = lambda *a: (time.sleep(0.005), fast_step(*a))[1]
        job = GenerationJob(_prompt(tok, "bye"), SamplingParams(max_new_tokens=100, temperature=1.0), (1,))
        agen = batcher.submit(job)
        await agen.__anext__()
        await agen.aclose()  # what a cancelled request handler does
        assert job.control.finish == {0}
        for _ in range(100):
            if batcher.active_rows == 0:
                break
            await asyncio.sleep(0.01)
        assert batcher.active_rows == 0 and batcher.stats.rows < 20  # it did not run to its 100 tokens

    asyncio.run(main())


# --------------------------------------------------------------------------------------------------------------
# Continuous batching and beam search through the Batcher
# --------------------------------------------------------------------------------------------------------------


def test_batcher_admits_arrivals_into_the_running_batch_with_unchanged_replies(engine, tok):
    log: list[tuple[str, StepItem]] = []
    a = GenerationJob(_prompt(tok, "first one"), SamplingParams(max_new_tokens=100, temperature=1.0), (11,))
    b = GenerationJob(_prompt(tok, "the second, longer request"), SamplingParams(max_new_tokens=6), (12,))

    async def main() -> tuple[StepItem, StepItem]:
        batcher = Batcher(engine, max_batch_size=8, batch_wait_timeout_s=0.0)
        ta = asyncio.create_task(_collect(batcher, a, log, "a"))
        while sum(tag == "a" for tag, _ in log) < 3:
            await asyncio.sleep(0.001)
        rb = await _collect(batcher, b, log, "b")
        return await ta, rb

    ra, rb = asyncio.run(main())
    order = [tag for tag, item in log if item.done is not None]
    assert order == ["b", "a"]  # b joined the running batch and finished inside a's run
    assert ra.done.tokens == _solo(engine, a)[0] and rb.done.tokens == _solo(engine, b)[0]


def test_a_beam_search_does_not_stall_the_decode_batch(engine, tok, monkeypatch):
    """The beam job is held inside its search until the sampled stream has finished: only possible if the stream
    keeps stepping on the generation thread while the beam thread is busy."""
    release = threading.Event()
    started = threading.Event()
    real_generate = engine.generate

    def slow_generate(prompts, params, seeds=None, **limits):
        if params.num_beams > 1:
            started.set()
            assert release.wait(60), "the stream never finished while the beam search ran"
        return real_generate(prompts, params, seeds, **limits)

    monkeypatch.setattr(engine, "generate", slow_generate)
    beam = GenerationJob(_prompt(tok, "beam"), SamplingParams(max_new_tokens=6, num_beams=3), (1,))
    stream = GenerationJob(_prompt(tok, "stream"), SamplingParams(max_new_tokens=16, temperature=1.0), (2,))

    async def main() -> tuple[StepItem, StepItem]:
        batcher = Batcher(engine, max_batch_size=8, batch_wait_timeout_s=0.0)
        tb = asyncio.create_task(_collect(batcher, beam))
        while not started.is_set():
            await asyncio.sleep(0.001)
        rs = await asyncio.wait_for(_collect(batcher, stream), 60)
        release.set()
        return await asyncio.wait_for(tb, 60), rs

    rb, rs = asyncio.run(main())
    assert isinstance(rs.done, JobOutput) and len(rs.done.tokens[0]) == 16
    monkeypatch.setattr(engine, "generate", real_generate)
    assert rb.done.tokens == engine.generate([list(beam.prompt)], beam.params, [1]).tokens


def test_generated_tokens_count_first_tokens_from_the_prefill_thread_and_beam_searches(engine, tok, monkeypatch):
    """``rlchat_serve_generated_tokens`` counts every token the engine generated: a lone arrival's first token,
    sampled and handed over on the prefill thread (:meth:`Batcher._start`), and a beam search's reply, which runs
    on its own thread, were left out."""
    started = _trace_starts(monkeypatch)
    metrics = ServeMetrics("m")
    running = GenerationJob(_prompt(tok, "first"), SamplingParams(max_new_tokens=12, temperature=1.0), (1,))
    joining = GenerationJob(_prompt(tok, "a later question"), SamplingParams(max_new_tokens=5), (2,))
    beam = GenerationJob(_prompt(tok, "beam"), SamplingParams(max_new_tokens=6, num_beams=3), (3,))

    async def main() -> list[StepItem]:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0, observer=metrics.for_version(""))
        batch, fast_step = batcher._run.batch, batcher._run.batch.step  # noqa: SLF001
        batch.step = lambda *a: (time.sleep(0.05), fast_step(*a))[1]
        try:
            first_items: list = []
            task = asyncio.create_task(_collect(batcher, running, first_items))
            while not first_items:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.06)  # a step after the first arrival: a lone arrival, started on the thread
            outs = await asyncio.wait_for(asyncio.gather(task, _collect(batcher, joining)), 60)
            outs.append(await asyncio.wait_for(_collect(batcher, beam), 60))
            await asyncio.sleep(0.3)  # counts ride with the items, or follow within REPORT_INTERVAL_S
            return outs
        finally:
            batcher.close()

    outs = asyncio.run(main())
    assert started == [joining.prompt]
    replies = [len(t) for out in outs for t in out.done.tokens]
    assert replies == [12, len(outs[1].done.tokens[0]), len(outs[2].done.tokens[0])] and min(replies) > 0
    assert metrics.snapshot()["generated_tokens"] == sum(replies)


def test_batcher_close_waits_for_the_step_in_flight(engine, tok, monkeypatch):
    """close() returns once the generation thread has left its step: a process that exits right after it (the
    engine process, the benchmark) must not kill the thread inside a torch op, which aborts the process
    ("terminate called without an active exception") instead of exiting 0."""
    entered = threading.Event()
    real = BatchRun.step_items

    def slow(self, now=None):  # noqa: ANN001, ANN202 - a step long enough to close() during it
        entered.set()
        time.sleep(0.5)
        return real(self, now)

    monkeypatch.setattr(BatchRun, "step_items", slow)

    async def main() -> None:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        job = GenerationJob(_prompt(tok, "one"), SamplingParams(max_new_tokens=50, temperature=1.0), (1,))
        task = asyncio.ensure_future(_collect(batcher, job))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        batcher.close()
        assert not batcher._thread.is_alive()  # noqa: SLF001 - the thread itself, not the alive flag
        assert not isinstance((await task).done, JobOutput)  # the job ended with an error, not a reply

    asyncio.run(main())


def test_batcher_close_stops_the_generation_thread(engine, tok):
    async def main() -> None:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        job = GenerationJob(_prompt(tok, "one"), SamplingParams(max_new_tokens=3, temperature=1.0), (1,))
        assert isinstance((await _collect(batcher, job)).done, JobOutput) and batcher.alive
        batcher.close()
        for _ in range(500):
            if not batcher.alive:
                break
            await asyncio.sleep(0.01)
        assert not batcher.alive
        with pytest.raises(RuntimeError, match="stopped"):
            await _collect(batcher, job)

    asyncio.run(main())


@pytest.mark.parametrize(
    "extreme",
    [{"repetition_penalty": 5e-324}, {"repetition_penalty": 1e-45, "top_logprobs": 2}, {"temperature": 1e-45},
     {"temperature": 1e-45, "top_p": 0.5}, {"repetition_penalty": 5e-324, "temperature": 0.0}],
    ids=["tiny-repetition-penalty", "with-logprobs", "tiny-temperature", "tiny-temperature-top-p", "greedy"],
)  # fmt: skip
def test_extreme_accepted_settings_sample_finite_tokens_on_both_paths(engine, tok, extreme):
    """Settings the API accepts (repetition_penalty > 0, temperature >= 0) but that overflow the logits (a seen
    token's logit / 5e-324 = inf, inf - inf = nan) must still give in-vocabulary tokens and finite log-probs: the
    schema fuzz found a 500 ('index 4096 is out of bounds') from such a request. A temperature too small to divide by
    is greedy decoding."""
    import math

    params = SamplingParams(max_new_tokens=6, **{"temperature": 1.0, **extreme})
    job = GenerationJob(_prompt(tok, "hi hi hi"), params, (3,))
    tokens, _, _ = _solo(engine, job)
    assert len(tokens[0]) == 6 and all(0 <= t < VOCAB for t in tokens[0])
    results, _, _ = _drive(BatchRun(engine, keep_history=False), {0: [job]})
    assert results[0].tokens == tokens
    batch = DecodeBatch(engine)
    batch.add([job.prompt], params, [3])
    steps = [o for _ in range(6) for o in batch.step()]
    assert [o.token for o in steps] == tokens[0] and all(math.isfinite(o.logprob) for o in steps)


def test_submitted_now_queues_the_job_before_anyone_iterates_and_aclose_ends_it(engine, tok):
    """``SubmittedNow`` sends the job at once (a streamed reply's generator starts only when the HTTP response does);
    its items are the submission's, and closing it before the end ends the job's rows."""

    async def main() -> None:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        try:
            p = _prompt(tok, "hello")
            whole = GenerationJob(p, SamplingParams(max_new_tokens=6, temperature=1.0), (5,))
            items = SubmittedNow(batcher.submit(whole))
            for _ in range(2000):  # nobody iterates: the job runs anyway
                if batcher.stats.rows:
                    break
                await asyncio.sleep(0.001)
            assert batcher.stats.rows >= 1
            got = [item async for item in items]
            assert got[-1].done.tokens == [[t for item in got for t in item.tokens[0]]]
            assert len(got[-1].done.tokens[0]) == 6

            gone = GenerationJob(p, SamplingParams(max_new_tokens=10_000, temperature=1.0), (6,))
            items = SubmittedNow(batcher.submit(gone))
            await asyncio.sleep(0.05)
            await items.aclose()  # a client that left before its stream started
            for _ in range(2000):
                if not batcher.active_rows:
                    break
                await asyncio.sleep(0.001)
            assert batcher.active_rows == 0

            dropped = GenerationJob(p, SamplingParams(max_new_tokens=10_000, temperature=1.0), (7,))
            items = SubmittedNow(batcher.submit(dropped))
            await asyncio.sleep(0.05)
            del items  # a response that never started its body: nobody closes it
            gc.collect()
            for _ in range(2000):
                if not batcher.active_rows:
                    break
                await asyncio.sleep(0.001)
            assert batcher.active_rows == 0  # the loop's async-generator finalizer ended the rows
        finally:
            batcher.close()

    asyncio.run(main())


def _slow_decoders(monkeypatch, seconds: float) -> None:
    """Every decoder the engine makes from now on sleeps ``seconds`` per forward pass (a bigger model's step)."""
    real = GenerationEngine._decoder

    def slow_decoder(self):
        dec = real(self)
        forward = dec.forward

        def slow(*a, **kw):
            time.sleep(seconds)
            return forward(*a, **kw)

        dec.forward = slow
        return dec

    monkeypatch.setattr(GenerationEngine, "_decoder", slow_decoder)


def test_a_beam_search_ends_at_its_deadline(engine, tok, monkeypatch):
    """Beam search runs whole (off the decode batch); an accepted request's deadline must still end it, with
    ``length`` and the best beam so far, not run it to its budget past the deadline."""
    _slow_decoders(monkeypatch, 0.01)
    params = SamplingParams(max_new_tokens=100, min_new_tokens=100, num_beams=2)
    job = GenerationJob(_prompt(tok, "beams"), params, (1,), deadline=time.monotonic() + 0.2)
    t0 = time.monotonic()
    (out,) = run_jobs(engine, [job])
    assert isinstance(out, JobOutput), out
    assert time.monotonic() - t0 < 0.9  # 100 slow steps would take over a second
    assert out.finish_reasons == [FINISH_LENGTH] and 0 < len(out.tokens[0]) < 100


def test_a_beam_search_whose_client_left_ends_and_frees_the_beam_thread(engine, tok, monkeypatch):
    """A sampled job's rows end at the next step once its client leaves; a beam search read only its deadline, so
    an abandoned one ran on to its budget and every later beam search queued behind it on the one beam thread."""
    _slow_decoders(monkeypatch, 0.02)
    long = GenerationJob(
        _prompt(tok, "beams"), SamplingParams(max_new_tokens=100, min_new_tokens=100, num_beams=2), (1,)
    )
    short = GenerationJob(_prompt(tok, "next"), SamplingParams(max_new_tokens=2, num_beams=2), (2,))

    async def main() -> float:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        try:
            gone = asyncio.create_task(_collect(batcher, long))
            await asyncio.sleep(0.2)  # the long search is running
            long.control.end([0])  # its client went away
            t0 = time.monotonic()
            item = await asyncio.wait_for(_collect(batcher, short), 30)
            assert isinstance(item.done, JobOutput) and len(item.done.tokens[0]) <= 2
            waited = time.monotonic() - t0
            left = await asyncio.wait_for(gone, 30)
            assert len(left.done.tokens[0]) < 100  # ended, not run to its budget
            return waited
        finally:
            batcher.close()

    waited = asyncio.run(main())
    assert waited < 1.0, f"the next beam search waited {waited:.1f} s (100 slow steps take 2 s)"


def test_a_queued_beam_search_meets_its_deadline_and_its_clients_leaving_while_another_runs(engine, tok, monkeypatch):
    """Beam searches run one at a time; one waiting behind a long one was settled only when its turn came: its
    deadline's 503 (``queue_timeout``) arrived when the running search ended (seconds late), and a waiting search
    whose client left kept its place until then. Now both are settled while they wait."""
    _slow_decoders(monkeypatch, 0.02)
    beams = SamplingParams(max_new_tokens=60, min_new_tokens=60, num_beams=2)
    running = GenerationJob(_prompt(tok, "beams"), beams, (1,))  # ~60 slow steps: over a second
    waiting = GenerationJob(_prompt(tok, "next"), beams, (2,), deadline=time.monotonic() + 0.4)
    gone = GenerationJob(_prompt(tok, "gone"), beams, (3,))

    async def main() -> tuple[float, StepItem, int]:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        try:
            first = asyncio.create_task(_collect(batcher, running))
            await asyncio.sleep(0.1)  # the first search is running; the next two wait for the beam thread
            t0 = time.monotonic()
            late = asyncio.create_task(_collect(batcher, waiting))
            left = asyncio.create_task(_collect(batcher, gone))
            await asyncio.sleep(0.1)
            gone.control.end([0])  # the third one's client went away while it waited
            item = await asyncio.wait_for(late, 30)
            waited = time.monotonic() - t0
            await asyncio.sleep(0.3)
            queued = len(batcher._beams)  # noqa: SLF001 - the search whose client left is no longer waiting
            await asyncio.wait_for(asyncio.gather(first, left), 30)
            return waited, item, queued
        finally:
            batcher.close()

    waited, item, queued = asyncio.run(main())
    assert isinstance(item.done, DeadlineExceeded)
    assert waited < 0.9, f"the queued beam search's deadline (0.4 s) was answered after {waited:.1f} s"
    assert queued == 0


def test_a_beam_search_waiting_at_close_gets_the_error_at_once(engine, tok, monkeypatch):
    """``close()`` answers every waiting job at once; a beam search waiting behind a running one got its
    SchedulerStopped only when the running one ended (up to its deadline, a minute by default)."""
    import serve.batching as batching

    release = threading.Event()
    real = batching.run_jobs

    def held(engine, jobs):  # the running beam search: ends when released
        release.wait(10)
        return real(engine, jobs)

    monkeypatch.setattr(batching, "run_jobs", held)
    beams = SamplingParams(max_new_tokens=2, num_beams=2)

    async def main() -> tuple[float, StepItem]:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        running = asyncio.create_task(_collect(batcher, GenerationJob(_prompt(tok, "hi"), beams, (1,))))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(_collect(batcher, GenerationJob(_prompt(tok, "hi"), beams, (2,))))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)
        asyncio.get_running_loop().call_later(2.0, release.set)  # the running search ends 2 s later
        item = await asyncio.wait_for(waiting, 15)
        waited = time.monotonic() - t0
        await asyncio.wait_for(running, 15)
        return waited, item

    waited, item = asyncio.run(main())
    assert isinstance(item.done, SchedulerStopped)
    assert waited < 0.5, f"answered {waited:.1f} s after close()"


@pytest.mark.parametrize("budget", [0.0, 10.0])
def test_streamed_jobs_share_the_chunk_budget(engine, tok, budget):
    """``serve.stream_chunks_per_s``: streamed jobs are handed their tokens at most every ``streams / budget``
    seconds (up to 0.25 s), so their total hand-overs per second stay about fixed as streams are added; their
    first tokens come at once, their tokens are all there, and a job that is not streamed keeps its own interval."""
    n_tokens = 40

    def job(seed: int, streamed: bool) -> GenerationJob:
        params = SamplingParams(max_new_tokens=n_tokens, temperature=1.0, min_new_tokens=n_tokens)
        return GenerationJob(_prompt(tok, f"q{seed}"), params, (seed,), delivery_interval_s=0.0, streamed=streamed)

    async def main() -> dict[str, list[tuple[float, StepItem]]]:
        batcher = Batcher(engine, max_batch_size=8, batch_wait_timeout_s=0.05, stream_chunks_per_s=budget)
        fast_step = batcher._run.batch.step  # noqa: SLF001
        batcher._run.batch.step = lambda *a: (time.sleep(0.01), fast_step(*a))[1]  # noqa: SLF001 - >= 0.4 s in all
        logs: dict[str, list[tuple[float, StepItem]]] = {}

        async def collect(tag: str, j: GenerationJob) -> None:
            log = logs.setdefault(tag, [])
            async for item in batcher.submit(j):
                log.append((time.monotonic(), item))

        try:
            jobs = {f"s{i}": job(i, True) for i in range(4)} | {"plain": job(9, False)}
            await asyncio.wait_for(asyncio.gather(*(collect(t, j) for t, j in jobs.items())), 120)
        finally:
            batcher.close()
        return logs

    logs = asyncio.run(main())
    for tag, log in logs.items():
        assert log[0][1].tokens[0], tag  # the first token at once
        assert sum(len(item.tokens[0]) for _, item in log) == n_tokens, tag
        assert log[-1][1].done is not None
    assert len(logs["plain"]) >= n_tokens - 1  # its own interval (0): every step
    for tag in ("s0", "s1", "s2", "s3"):
        times = [t for t, _ in logs[tag]]
        if budget == 0:
            assert len(times) >= n_tokens - 1, tag
        else:  # four streams at 10 chunks/s: 0.4 s, capped at 0.25 s; 40 steps of >= 10 ms: at most ~3 hand-overs
            assert 2 <= len(times) <= 4, (tag, len(times))
            gaps = [b - a for a, b in zip(times, times[1:-1])]  # the result comes at once, after any gap
            assert all(g >= 0.24 for g in gaps), gaps


def test_jobs_that_ended_before_a_failed_step_keep_their_replies(engine, tok):
    """A decoding step that fails (an out-of-memory error) fails the jobs still decoding; a job whose every row had
    ended before it -- at its deadline (a complete ``length`` reply) or by its client's wish -- keeps its reply.
    (Found by review: the step's error replaced it.)"""
    run = BatchRun(engine, keep_history=False)
    t = time.monotonic()
    params = SamplingParams(max_new_tokens=50, temperature=1.0, min_new_tokens=50)
    timed = run.add(GenerationJob(_prompt(tok, "a"), params, (1,), deadline=t + 100))
    ended = GenerationJob(_prompt(tok, "b"), params, (2,))
    left = run.add(ended)
    running = run.add(GenerationJob(_prompt(tok, "c"), params, (3,)))
    tokens: dict[int, list[int]] = {timed: [], left: []}
    for _ in range(3):
        items = run.step_items(now=t)
        for jid in tokens:
            tokens[jid] += items[jid].tokens[0]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory in the decoding step")

    run.batch.step = out_of_memory
    ended.control.end([0])
    items = run.step_items(now=t + 200)  # past the first job's deadline
    assert items[timed].done == JobOutput([tokens[timed]], [FINISH_LENGTH])
    assert items[left].done == JobOutput([tokens[left]], [FINISH_STOP])
    assert isinstance(items[running].done, torch.OutOfMemoryError)
    assert len(tokens[timed]) == 3


def test_closing_before_the_generation_thread_started_fails_the_waiting_job(engine, tok):
    """A version closed just as its first request arrives (the job queued, the generation thread not started yet):
    the job ends with :class:`SchedulerStopped` (a 503 to retry) instead of waiting forever. (Found by review.)"""

    async def main() -> StepItem:
        batcher = Batcher(engine, max_batch_size=4, batch_wait_timeout_s=0.0)
        job = GenerationJob(_prompt(tok, "x"), SamplingParams(max_new_tokens=3), (1,))
        first = asyncio.ensure_future(batcher.submit(job).__anext__())
        await asyncio.sleep(0)  # the submit ran: the job is queued, the thread's start is scheduled
        assert batcher._thread is None and batcher.queue_depth == 1  # noqa: SLF001
        batcher.close()
        return await asyncio.wait_for(first, 10)

    item = asyncio.run(main())
    assert isinstance(item.done, SchedulerStopped) and item.tokens == [[]]
