"""Load test of the Serve chat endpoint: continuous batching vs batch-1 serving, in one run.

    python bench/serve_load.py                    # ~3 minutes on 2 CPU cores (streamed, 1 and 16 clients)
    python bench/serve_load.py --clients 1 4 16 64 --kind both
    python bench/serve_load.py --in-process       # the scheduler alone (Batcher, no Ray / HTTP), ~1 minute
    python bench/serve_load.py --ingress haproxy  # Serve's HAProxy ingress (HAProxy -> the replica's own HTTP server)
    python bench/serve_load.py --in-replica       # the decode loop on a replica thread (serve.engine_process=false)
    python bench/serve_load.py --model 8x512 --vocab 0 --requests-per-client 8   # a real vocabulary (cl100k), ~8 min
    python bench/serve_load.py --stagger          # clients start with different reply lengths (no arrival waves)
    python bench/serve_load.py --stream-interval 0.1   # fewer, larger SSE chunks (serve.stream_interval_s)
    python bench/serve_load.py --stream-chunks 0       # no shared chunk budget (serve.stream_chunks_per_s)
    python bench/serve_load.py --repeats 3             # every level and setting 3 times in turn; median ratios

What it does: builds an untrained checkpoint of the demo's model size (configs/demo.yaml: GPT-2, 2 layers, d=64,
4096-token vocabulary, 256 positions; ``--model LxD --vocab 0`` for a GPT-2 trunk of L layers of width D over the
full cl100k vocabulary, where the decoding step, not the HTTP path, is the cost), starts a local Ray (2 CPUs) and
Serve on a free loopback port, and for each level and setting (continuous batching: ``serve.max_batch_size=16``;
batch-1: ``1``; the two alternate level by level) redeploys the app and runs closed-loop clients: each of C
concurrent clients sends requests (``max_tokens=32``, ``temperature=1``, a distinct seed per request) one after the
other, a fixed number each (at least ``--min-requests``, 64, per level in all: the 1-client level's p50 is the
TTFT target's reference), streamed (SSE) and/or plain (``stream=false``). Both settings get the same request mix
(same prompt, ``max_tokens``, seeds, clients and requests per client). Per level it reports requests/s, generated
tokens/s (completion tokens from each reply's ``usage`` over the level's wall time, and its ratio to batch-1 serving
at the same level), the p50/p99 time to the first content chunk (TTFT, measured by the client from sending the
request to the first SSE chunk with text), the p50 inter-token latency (per request: (last token - first token) /
(tokens - 1); the server coalesces SSE chunks, so single chunk gaps are not token gaps), the p50
whole reply, and the mean batch in rows per decoding step (the replica's ``/readyz`` counters over the level). The
1-client TTFT of continuous batching is the reference of the TTFT target (``serve.batch_wait_timeout_s`` defaults to
0, so it is not inflated by an idle wait). The load average is printed, since the 2 cores may be shared. Traffic
goes to 127.0.0.1 only; every loop is bounded by a request count and a timeout.

Untrained weights almost never emit the end-of-turn token, so replies are 32 tokens (the table shows the mean).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(session, url: str, seed: int, max_tokens: int, stream: bool) -> tuple[float, float, int]:
    """(seconds to the first content, seconds to the whole reply, completion tokens) of one request; without
    streaming the first token arrives with the whole reply."""
    body = {
        "model": "rlchat",
        "messages": [{"role": "user", "content": "Tell me something about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        if not stream:
            tokens = (await resp.json())["usage"]["completion_tokens"]
            total = time.perf_counter() - t0
            return total, total, tokens
        async for raw in resp.content:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, tokens


def first_budget(k: int, clients: int, max_tokens: int, stagger: bool) -> int:
    """``max_tokens`` of client k's first request: with ``stagger``, ``1 + k * max_tokens // clients``, so the
    clients' replies end at different steps from the start (else, with equal-length replies from a model that never
    ends a reply early, all of them end at the same step and arrive again together, for the whole run)."""
    return max(1, 1 + k * max_tokens // clients) if stagger and clients > 1 else max_tokens


async def run_level(
    url: str, clients: int, per_client: int, max_tokens: int, seed0: int, stream: bool, stagger: bool = False
) -> dict[str, float]:
    """C closed-loop clients, each sending ``per_client`` requests back to back (see :func:`first_budget`)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    results: list[tuple[float, float, int]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(k: int) -> None:
            for i in range(per_client):
                budget = first_budget(k, clients, max_tokens, stagger) if i == 0 else max_tokens
                results.append(await one_request(session, url, seed0 + k * per_client + i, budget, stream))

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    ttft = [r[0] * 1e3 for r in results]
    full = [r[1] * 1e3 for r in results]
    toks = [r[2] for r in results]
    return {
        "requests": len(results),
        "req_s": len(results) / wall,
        "tok_s": sum(toks) / wall,
        "tokens": statistics.mean(toks),
        **{f"ttft_p{q}": percentile(ttft, q) for q in (50, 95, 99)},
        "itl_p50": percentile([(r[1] - r[0]) * 1e3 / (r[2] - 1) for r in results if r[2] > 1], 50),
        **{f"full_p{q}": percentile(full, q) for q in (50, 95, 99)},
    }


async def run_in_process(
    batcher, prompt: tuple[int, ...], clients: int, per_client: int, max_tokens: int, stagger: bool = False
) -> dict:
    """The scheduler alone: C closed-loop asyncio clients submitting jobs straight to a ``Batcher`` (no HTTP)."""
    from rlchat.generation import SamplingParams
    from serve.batching import GenerationJob

    results: list[tuple[float, float, int]] = []
    b0, n0 = batcher.stats.batches, batcher.stats.rows

    async def client(k: int) -> None:
        for i in range(per_client):
            budget = first_budget(k, clients, max_tokens, stagger) if i == 0 else max_tokens
            params = SamplingParams(max_new_tokens=budget, temperature=1.0)
            t0, first, n = time.perf_counter(), None, 0
            async for item in batcher.submit(GenerationJob(prompt, params, (k * per_client + i,))):
                if first is None and any(item.tokens):
                    first = time.perf_counter() - t0
                n += sum(len(t) for t in item.tokens)
                if item.done is not None:
                    break
            total = time.perf_counter() - t0
            results.append((first if first is not None else total, total, n))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    ttft = [r[0] * 1e3 for r in results]
    return {
        "tok_s": sum(r[2] for r in results) / wall,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile([(r[1] - r[0]) * 1e3 / (r[2] - 1) for r in results if r[2] > 1], 50),
        "mean_batch": (batcher.stats.rows - n0) / max(batcher.stats.batches - b0, 1),
    }


def main_in_process(args: argparse.Namespace) -> int:
    """``--in-process``: the same closed-loop load on the scheduler alone (no Ray, no HTTP)."""
    import torch

    from serve.batching import Batcher

    torch.set_num_threads(1)
    shape = model_shape(args.model, args.vocab)
    engine, prompt = build_engine(args)
    arrivals = "staggered" if args.stagger else "lockstep"
    load = os.getloadavg()[0]
    print(f"scheduler alone (no HTTP), {describe(shape, args.precision)}, {arrivals} arrivals, load {load:.1f}")
    print("| batching | clients | tokens/s | TTFT p50 / p99 (ms) | ITL p50 (ms) | mean batch (rows) |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in args.clients:
        for mode, size in (("continuous", args.batch_size), ("batch-1", 1)):
            batcher = Batcher(engine, size, args.batch_wait if size > 1 else 0.0, prefill_first=args.prefill_first)
            per = args.requests_per_client or max(4, 192 // c)
            r = asyncio.run(run_in_process(batcher, prompt, c, per, args.max_tokens, args.stagger))
            batcher.close()
            print(
                f"| {mode} | {c} | {r['tok_s']:.0f} | {r['ttft_p50']:.1f} / {r['ttft_p99']:.1f} | "
                f"{r['itl_p50']:.1f} | {r['mean_batch']:.1f} |",
                flush=True,
            )
    print_ceiling(engine, prompt, args.batch_size)
    return 0


def build_engine(args: argparse.Namespace) -> tuple[Any, tuple[int, ...]]:
    """The serving engine of the benchmark's model (untrained, as the checkpoint it serves) and its prompt."""
    from rlchat.config import Config
    from rlchat.generation import GenerationEngine
    from rlchat.model import PolicyValueModel
    from rlchat.tokenizer import ChatTokenizer

    shape = model_shape(args.model, args.vocab)
    cfg = Config().replace(**{f"model.{k}": v for k, v in shape.items() if k != "vocab_size"})
    cfg = cfg.replace(**{"tokenizer.vocab_size": shape["vocab_size"], "model.precision": args.precision})
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    engine = GenerationEngine.for_inference(PolicyValueModel.build(cfg, tok).eval(), tok, precision=args.precision)
    return engine, tuple(tok.render_prompt([{"role": "user", "content": "Tell me something about the sea."}]))


def step_seconds(engine: Any, prompt: tuple[int, ...], rows: int, steps: int = 12) -> float:
    """Median seconds of one ``DecodeBatch`` step with ``rows`` rows decoding (one torch thread, nothing else)."""
    from rlchat.generation import SamplingParams
    from serve.decode_batch import DecodeBatch

    batch = DecodeBatch(engine)
    batch.add([prompt] * rows, SamplingParams(max_new_tokens=steps + 4, temperature=1.0), list(range(rows)))
    batch.step()  # the prefill
    batch.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_ceiling(engine: Any, prompt: tuple[int, ...], rows: int) -> None:
    """The most continuous batching can gain over batch-1 serving on this machine: a step of ``rows`` rows makes
    ``rows`` tokens, a one-row step one, so ``rows x t(1) / t(rows)`` (prefills and HTTP not counted). Where the
    step is bound by reading the weights (bf16 matrix units) that is near ``rows``; where it is compute-bound (fp32
    on an AVX2 CPU) a 16-row step costs several one-row steps and no scheduler can reach 6x."""
    import torch

    from rlchat.cli.doctor import cpu_bf16_flags, cpu_model

    torch.set_num_threads(1)
    one, many = step_seconds(engine, prompt, 1), step_seconds(engine, prompt, rows)
    units = ", ".join(cpu_bf16_flags()) or "no bf16 matrix units"
    print(
        f"decoding step alone (one torch thread, {cpu_model()}, {units}; engine dtype "
        f"{engine.autocast_dtype() or 'fp32'}): 1 row {one * 1e3:.1f} ms, "
        f"{rows} rows {many * 1e3:.1f} ms -> continuous batching can reach at most {rows * one / many:.1f}x "
        "batch-1 throughput here"
    )


def model_shape(model: str, vocab: int) -> dict[str, int]:
    """``demo`` or ``LxD`` (layers x width, 64-wide heads) as ``make_tiny_checkpoint`` keywords."""
    if model == "demo":
        return {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256, "vocab_size": vocab}  # configs/demo.yaml
    layers, width = (int(x) for x in model.lower().split("x"))
    return {"n_layer": layers, "n_embd": width, "n_head": max(width // 64, 1), "n_positions": 512, "vocab_size": vocab}


def describe(shape: dict[str, int], precision: str) -> str:
    """The model line of the report."""
    vocab = f"{shape['vocab_size']:,}-token" if shape["vocab_size"] else "full cl100k (100,277-token)"
    return f"GPT-2 {shape['n_layer']} x {shape['n_embd']}, {vocab} vocabulary (untrained), model.precision {precision}"


def batch_counters(url: str) -> tuple[int, int]:
    """(decoding steps, rows decoded) the replica has run so far, from ``/readyz``: the mean batch of a level."""
    import urllib.request

    with urllib.request.urlopen(url + "/readyz", timeout=30) as resp:
        st = json.loads(resp.read())["stats"]
    return st["batches"], st["batched_rows"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests-per-client", type=int, default=0, help="0 = max(4, 192 // clients)")
    ap.add_argument(
        "--min-requests",
        type=int,
        default=64,
        help="at least this many requests per level in all (so the 1-client level's p50, the TTFT target's "
        "reference, is not the median of a handful)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every level and setting this many times, in turn (the targets' ratios per repeat and their median)",
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="serve.max_batch_size with batching on")
    ap.add_argument(
        "--batch-wait", type=float, default=0.0, help="serve.batch_wait_timeout_s with batching on (idle batch only)"
    )
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--model", default="demo", help="demo (2 x 64) or LxD, e.g. 8x512: a GPT-2 trunk")
    ap.add_argument("--vocab", type=int, default=4096, help="tokenizer.vocab_size (0 = the full cl100k, 100,277)")
    ap.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help="the checkpoint's model.precision"
    )
    ap.add_argument("--kind", choices=["stream", "plain", "both"], default="stream", help="streaming and/or plain")
    ap.add_argument("--in-process", action="store_true", help="the scheduler alone: no Ray, no HTTP")
    ap.add_argument(
        "--stagger",
        action="store_true",
        help="client k's first request asks for 1 + k * max_tokens / clients tokens, so replies end at different "
        "steps (default: all of equal length, so all clients arrive again together at every wave)",
    )
    ap.add_argument(
        "--ingress", choices=["proxy", "haproxy"], default="proxy", help="serve.ingress (default: proxy, the config's)"
    )
    ap.add_argument(
        "--in-replica", action="store_true", help="serve.engine_process=false: the decode loop on a replica thread"
    )
    ap.add_argument(
        "--prefill-first",
        action="store_true",
        help="serve.prefill_first=true: a new request's first token from a step of its own (latency over throughput)",
    )
    ap.add_argument(
        "--stream-interval",
        type=float,
        default=0.02,
        help="serve.stream_interval_s: least seconds between a stream's SSE chunks (default 0.02, the config's)",
    )
    ap.add_argument(
        "--stream-chunks",
        type=float,
        default=160.0,
        help="serve.stream_chunks_per_s: SSE chunks per second shared by a replica's streams (default 160, the "
        "config's; 0 = stream_interval_s alone)",
    )
    args = ap.parse_args()
    if args.in_process:
        return main_in_process(args)

    import ray
    import torch

    from serve import testing
    from serve.settings import ingress_environment

    os.environ.update(ingress_environment(args.ingress))  # before Ray starts: every Ray process reads it
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shape = model_shape(args.model, args.vocab)
            ckpt = testing.make_tiny_checkpoint(
                Path(tmp) / "model", **shape, overrides={"model.precision": args.precision}
            )
            kinds = ["stream", "plain"] if args.kind == "both" else [args.kind]
            # continuous and batch-1 alternate level by level (a redeploy each), so that the VM's speed, which drifts
            # within minutes here, weighs on both sides of each ratio alike
            cycle = [
                (k, c, m)
                for k in kinds
                for c in args.clients
                for m in (("continuous", args.batch_size), ("batch-1", 1))
            ]
            for rep, (kind, c, (mode, batch)) in ((i, x) for i in range(args.repeats) for x in cycle):
                url = testing.deploy(
                    ckpt,
                    max_batch_size=batch,
                    batch_wait_timeout_s=args.batch_wait if batch > 1 else 0.0,
                    max_tokens=args.max_tokens,
                    feedback_store=f"sqlite:///{Path(tmp) / 'feedback.db'}",
                    num_cpus=args.replica_cpus,
                    engine_process=not args.in_replica,
                    prefill_first=args.prefill_first,
                    stream_interval_s=args.stream_interval,
                    stream_chunks_per_s=args.stream_chunks,
                )
                asyncio.run(run_level(url, 2, 2, args.max_tokens, 10_000, True))  # warm-up
                per = max(args.requests_per_client or max(4, 192 // c), -(-args.min_requests // c))
                b0, n0 = batch_counters(url)
                r = asyncio.run(run_level(url, c, per, args.max_tokens, 1000 * c, kind == "stream", args.stagger))
                b1, n1 = batch_counters(url)
                r["mean_batch"] = (n1 - n0) / max(b1 - b0, 1)
                r["load"] = os.getloadavg()[0]
                rows.append({"kind": kind, "batching": mode, "clients": c, "repeat": rep, **r})
                print(
                    f"#{rep} {kind:>6} {mode:>10} clients {c:>3}: {r['req_s']:6.1f} req/s {r['tok_s']:7.0f} tok/s  "
                    f"TTFT p50 {r['ttft_p50']:6.0f} ms  ITL p50 {r['itl_p50']:5.1f} ms  "
                    f"mean batch {r['mean_batch']:.1f} rows  load {r['load']:.1f}",
                    flush=True,
                )
    finally:
        testing.shutdown()
        ray.shutdown()

    by = {(r["kind"], r["batching"], r["clients"], r["repeat"]): r for r in rows}
    print()
    print(
        f"{args.max_tokens}-token replies, {describe(model_shape(args.model, args.vocab), args.precision)}, "
        "2 CPU cores, loopback, ingress "
        f"{args.ingress}, decode loop {'on a replica thread' if args.in_replica else 'in the engine process'}, "
        f"{'staggered' if args.stagger else 'lockstep'} arrivals, "
        f"{'prefill first' if args.prefill_first else 'newcomers join the running step'}, SSE chunks at most every "
        f"{args.stream_interval * 1e3:.0f} ms per stream and {args.stream_chunks:g}/s shared; load average "
        f"{load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after; 'plain' = stream=false (TTFT = whole reply)."
    )
    print()
    print(
        "| repeat | requests | batching | clients | n | req/s | tokens/s | vs batch-1 | TTFT p50 / p99 (ms) "
        "| ITL p50 (ms) | reply p50 (ms) | mean batch (rows) | load |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(
        rows, key=lambda r: (r["repeat"], r["kind"] != "stream", r["batching"] != "continuous", r["clients"])
    ):
        base = by.get((r["kind"], "batch-1", r["clients"], r["repeat"]))
        gain = f"{r['tok_s'] / base['tok_s']:.1f}x" if base else "-"
        print(
            f"| {r['repeat']} | {r['kind']} | {r['batching']} | {r['clients']} | {r['requests']} | {r['req_s']:.1f} | "
            f"{r['tok_s']:.0f} | {gain} | {r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | {r['itl_p50']:.1f} | "
            f"{r['full_p50']:.0f} | {r['mean_batch']:.1f} | {r['load']:.1f} |"
        )
    print()
    for kind in ("stream", "plain"):
        gains, ratios = [], []
        for rep in range(args.repeats):
            on, off = by.get((kind, "continuous", 16, rep)), by.get((kind, "batch-1", 16, rep))
            one = by.get((kind, "continuous", 1, rep))
            if on and off:
                gains.append(on["tok_s"] / off["tok_s"])
            if on and one and kind == "stream":
                ratios.append(on["ttft_p50"] / one["ttft_p50"])
        if gains:
            print(
                f"{kind}: tokens/s at 16 clients, continuous / batch-1 = {statistics.median(gains):.1f}x "
                f"(median of {', '.join(f'{x:.1f}x' for x in gains)}; target >= 6x)"
            )
        if ratios:
            print(
                f"{kind}: TTFT p50 at 16 clients / at 1 client = {statistics.median(ratios):.1f}x "
                f"(median of {', '.join(f'{x:.1f}x' for x in ratios)}; target <= 2x)"
            )
    print_ceiling(*build_engine(args), args.batch_size)  # after the levels: nothing else runs now
    return 0


if __name__ == "__main__":
    sys.exit(main())
