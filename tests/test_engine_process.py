"""The replica's decode loop in its own process (serve/engine_process.py): a real child process, no Ray.

The child's replies must equal the in-process scheduler's for the same jobs (the same Batcher runs there), ends and
cancellations must reach it, its errors must keep their type (the replica maps them to HTTP codes), and a dead child
must fail the running requests instead of hanging them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from rlchat.checkpoint import load_policy
from rlchat.generation import FINISH_LENGTH, FINISH_STOP, GenerationEngine, SamplingParams
from serve import testing
from serve.batching import GenerationJob, JobOutput, StepItem, run_jobs
from serve.engine_process import EngineProcess, EngineSpec, EngineStartError
from serve.metrics import ServeMetrics


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return testing.make_tiny_checkpoint(tmp_path_factory.mktemp("engine") / "tiny", n_positions=128)


@pytest.fixture(scope="module")
def local(checkpoint) -> GenerationEngine:
    model, tok, _ = load_policy(checkpoint)
    return GenerationEngine(model.eval(), tok, precision="auto")


@pytest.fixture(scope="module")
def proc(checkpoint):
    ep = EngineProcess(EngineSpec(str(checkpoint), max_batch_size=8))
    yield ep
    ep.close()


def _prompt(engine: GenerationEngine, text: str) -> tuple[int, ...]:
    return tuple(engine.tokenizer.render_prompt([{"role": "user", "content": text}]))


async def _collect(ep: EngineProcess, job: GenerationJob) -> tuple[list[StepItem], JobOutput | BaseException]:
    items = []
    async for item in ep.submit(job):
        items.append(item)
        if item.done is not None:
            return items, item.done
    raise AssertionError("the stream ended without a result")


def test_replies_equal_the_in_process_scheduler(proc, local):
    assert proc.info.vocab_size == local.vocab_size and proc.info.max_positions == 128
    assert proc.info.pid != os.getpid() and proc.alive
    jobs = [
        GenerationJob(_prompt(local, "hello"), SamplingParams(max_new_tokens=9, temperature=1.0), (1, 2)),
        GenerationJob(_prompt(local, "a much longer question about the sea"), SamplingParams(max_new_tokens=5), (3,)),
        GenerationJob(_prompt(local, "greedy"), SamplingParams(max_new_tokens=7, temperature=0.0), (4,)),
        GenerationJob(
            _prompt(local, "penalties"),
            SamplingParams(max_new_tokens=6, temperature=0.7, top_k=20, frequency_penalty=1.0, top_logprobs=2),
            (5,),
        ),
        GenerationJob(_prompt(local, "beam"), SamplingParams(max_new_tokens=5, temperature=0.0, num_beams=2), (6,)),
    ]
    want = run_jobs(local, jobs)
    b0 = proc.stats.batches

    async def main():
        return await asyncio.gather(*(_collect(proc, j) for j in jobs))

    got = asyncio.run(main())
    for (items, out), ref, job in zip(got, want, jobs):
        assert isinstance(out, JobOutput), out
        assert out.tokens == ref.tokens and out.finish_reasons == ref.finish_reasons
        # the streamed shares add up to the reply
        assert [sum((it.tokens[c] for it in items), []) for c in range(len(job.seeds))] == out.tokens
    assert got[3][1].alternatives is not None and len(got[3][1].alternatives[0]) == len(got[3][1].tokens[0])
    assert proc.stats.batches > b0 and proc.stats.largest >= 2  # the engine's steps are counted in this process


def test_the_observer_counts_every_generated_token_and_the_queue_through_the_engine_process(checkpoint, local):
    """The replica's metrics (``ServeMetrics``, the handle's observer) count the engine's tokens: decoded rows, a
    beam search's reply (run on the engine's beam thread) included; the queue depth ends at 0."""
    metrics = ServeMetrics("m")
    ep = EngineProcess(EngineSpec(str(checkpoint), max_batch_size=2), observer=metrics.for_version(""))
    jobs = [
        GenerationJob(_prompt(local, f"question {i}"), SamplingParams(max_new_tokens=6 + i), (i,)) for i in range(4)
    ]
    jobs.append(GenerationJob(_prompt(local, "beam"), SamplingParams(max_new_tokens=5, num_beams=2), (9,)))

    async def main():
        outs = await asyncio.gather(*(_collect(ep, j) for j in jobs))
        await asyncio.sleep(0.5)  # the last counts follow within the scheduler's report interval
        return outs

    try:
        got = asyncio.run(main())
    finally:
        ep.close()
    replies = sum(len(t) for _, out in got for t in out.tokens)
    assert replies >= 4 and metrics.snapshot()["generated_tokens"] == replies
    assert metrics.snapshot()["queue_depth"] == 0


def test_ends_and_cancellation_reach_the_engine(proc, local):
    long = SamplingParams(max_new_tokens=100, min_new_tokens=100, temperature=1.0)

    async def main():
        job = GenerationJob(_prompt(local, "stop me"), long, (7, 8))
        items = []
        async for item in proc.submit(job):
            items.append(item)
            if len(items) == 1:
                job.control.end([1])  # the request side saw a stop string in choice 1
            if item.done is not None:
                break
        out = items[-1].done
        assert out.finish_reasons == [FINISH_LENGTH, FINISH_STOP]
        assert len(out.tokens[0]) == 100 and len(out.tokens[1]) < 100

        rows0 = proc.stats.rows
        gone = proc.submit(GenerationJob(_prompt(local, "client leaves"), long, (9,)))
        await gone.__anext__()
        await gone.aclose()  # a caller that stops iterating: the engine drops its row
        await asyncio.sleep(0.5)
        probe = await _collect(proc, GenerationJob(_prompt(local, "x"), SamplingParams(max_new_tokens=1), (1,)))
        assert isinstance(probe[1], JobOutput)
        assert proc.stats.rows - rows0 < 60  # not the abandoned row's 100 steps

    asyncio.run(main())


def test_engine_errors_keep_their_type(proc, local):
    too_long = GenerationJob(tuple([1] * 128), SamplingParams(max_new_tokens=4), (1,))
    ref = run_jobs(local, [too_long])[0]
    assert isinstance(ref, ValueError)
    _, out = asyncio.run(_collect(proc, too_long))
    assert type(out) is type(ref) and str(out) == str(ref)
    ok = GenerationJob(_prompt(local, "still fine"), SamplingParams(max_new_tokens=3), (2,))
    assert isinstance(asyncio.run(_collect(proc, ok))[1], JobOutput)  # the failure touched no one else


def test_a_dead_engine_fails_running_requests(checkpoint, local):
    ep = EngineProcess(EngineSpec(str(checkpoint)))
    job = GenerationJob(_prompt(local, "x"), SamplingParams(max_new_tokens=50), (1,))
    os.kill(ep.info.pid, signal.SIGSTOP)  # the job cannot finish before the kill below

    async def main():
        async def killer():
            await asyncio.sleep(0.3)
            os.kill(ep.info.pid, signal.SIGKILL)

        task = asyncio.create_task(killer())
        _, out = await asyncio.wait_for(_collect(ep, job), 30)
        await task
        return out

    out = asyncio.run(main())
    assert isinstance(out, RuntimeError) and "engine process exited" in str(out)
    assert not ep.alive
    with pytest.raises(RuntimeError, match="engine process"):
        asyncio.run(_collect(ep, job))
    ep.close()


def test_an_engine_whose_generation_thread_died_exits_so_the_replica_reports_unhealthy(
    checkpoint, local, tmp_path, monkeypatch
):
    """The child's scheduler thread failing (a bug, a CUDA error) fails its jobs; the child must then exit, or every
    later request would fail with a 500 while the replica's health check, which watches the process, stayed green.
    The failure is injected into the real child through a ``sitecustomize`` on the path it inherits."""
    (tmp_path / "sitecustomize.py").write_text(
        "import serve.batching as b\n"
        "def _boom(self):\n"
        "    raise RuntimeError('injected generation-thread failure')\n"
        "b.Batcher._generate_step = _boom\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EngineProcess(EngineSpec(str(checkpoint)))
    try:
        job = GenerationJob(_prompt(local, "x"), SamplingParams(max_new_tokens=5), (1,))
        _, out = asyncio.run(asyncio.wait_for(_collect(ep, job), 30))
        assert isinstance(out, RuntimeError) and "injected generation-thread failure" in str(out)
        assert ep.proc.wait(timeout=20) == 3
        deadline = time.monotonic() + 10
        while ep.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not ep.alive
        with pytest.raises(RuntimeError, match="generation thread failed"):
            asyncio.run(_collect(ep, job))
    finally:
        ep.close()


def test_a_checkpoint_the_engine_cannot_load_is_a_start_error(tmp_path):
    with pytest.raises(EngineStartError, match="no_such_checkpoint"):
        EngineProcess(EngineSpec(str(tmp_path / "no_such_checkpoint")), start_timeout_s=120)


def test_close_stops_the_child(checkpoint):
    ep = EngineProcess(EngineSpec(str(checkpoint)))
    ep.close()
    assert not ep.alive
    assert ep.proc.wait(timeout=20) == 0


def test_a_bf16_engine_stores_its_weights_in_bf16_once(checkpoint):
    """Serving under bf16 keeps bf16 weights: no step re-casts them and a batch's head snapshot is not a copy.

    Autocast casts fp32 weights again on every forward, and the snapshot a batch takes when it starts re-cast the whole
    head (at a 100k vocabulary ~100 ms before a first token): both are gone when the weights are stored in bf16.
    """
    import torch

    from serve.engine_process import load_engine

    engine = load_engine(EngineSpec(str(checkpoint), precision="bf16"))
    dtypes = {p.dtype for p in engine.lm.parameters()}
    assert dtypes == {torch.bfloat16}
    head = engine.lm.get_output_embeddings().weight
    assert engine._decoder().w_t.data_ptr() == head.data_ptr()  # a view of the stored weight, not a cast copy
    prompt = _prompt(engine, "Hello there")
    greedy = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0)).tokens[0]
    assert len(greedy) >= 1
    # fp32 (and auto on a narrow model) leaves the weights as they are: the learner-precision path is unchanged
    fp32 = load_engine(EngineSpec(str(checkpoint), precision="fp32"))
    assert {p.dtype for p in fp32.lm.parameters()} == {torch.float32}


def test_an_engine_for_a_gpu_is_cast_before_it_moves_and_only_its_language_model_moves(checkpoint, monkeypatch):
    """Loading for a GPU moved the whole fp32 policy (its value head, a separate critic's trunk) to the device and
    cast it there: the GPU's peak was the fp32 size, which its caching allocator keeps reserved for the life of the
    process (every served version and ``--follow`` swap is a process of its own). The language model is now cast on
    the CPU, then moved alone. ``meta`` stands in for the GPU."""
    import torch

    from serve.engine_process import load_engine

    moved: list[tuple[str, set]] = []
    real_to = torch.nn.Module.to

    def spy(self, *args, **kwargs):
        if any(str(a) == "meta" for a in [*args, *kwargs.values()]):
            moved.append((type(self).__name__, {p.dtype for p in self.parameters()}))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    engine = load_engine(EngineSpec(str(checkpoint), precision="bf16", device="meta"))
    assert engine.device.type == "meta" and {p.dtype for p in engine.lm.parameters()} == {torch.bfloat16}
    assert moved and all(name != "PolicyValueModel" and dtypes == {torch.bfloat16} for name, dtypes in moved), moved


def test_a_request_submitted_as_the_engine_dies_fails_instead_of_waiting_forever(checkpoint, local):
    """The reader thread marks the engine dead and fails the callers it has; a request that passed ``submit``'s
    liveness check and registered just after that list was taken (a thread switch between the two) waited for an
    item forever. Simulated at that exact point: the registration itself lets the reader's failure run first."""
    ep = EngineProcess(EngineSpec(str(checkpoint)))

    class DiesFirst(dict):
        def __setitem__(self, key, value):
            ep._fail_callers(-9)  # noqa: SLF001 - what the reader thread does, right before this registration
            super().__setitem__(key, value)

    ep._callers = DiesFirst()  # noqa: SLF001
    job = GenerationJob(_prompt(local, "x"), SamplingParams(max_new_tokens=5), (1,))
    try:
        with pytest.raises(RuntimeError, match="engine process exited"):
            asyncio.run(asyncio.wait_for(_collect(ep, job), 10))
    finally:
        ep._dead = None  # noqa: SLF001 - the child is alive: let close() stop it
        ep.close()
