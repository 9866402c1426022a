"""Load test of the Serve chat endpoint: latency and throughput with dynamic batching on and off, in one run.

    python bench/serve_load.py                    # ~4-6 minutes on 2 CPU cores
    python bench/serve_load.py --clients 1 4 --requests-per-client 2

What it does: builds an untrained checkpoint of the demo's model size (configs/demo.yaml: GPT-2, 2 layers, d=64,
4096-token vocabulary, 256 positions), starts a local Ray (2 CPUs) and Serve on a free loopback port, and for each
setting (batching on: ``serve.max_batch_size=16``; off: ``1``) redeploys the app and runs closed-loop clients: each
of C concurrent clients sends requests (``max_tokens=32``, ``temperature=1``, a distinct seed per request) one after
the other, a fixed number each, first streamed (SSE) then plain (``stream=false``). Per level it reports
requests/s, generated tokens/s and the p50/p95/p99 of the time to the first content chunk and to the whole reply.
Traffic goes to 127.0.0.1 only; every loop is bounded by a request count and a timeout.

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


async def run_level(
    url: str, clients: int, per_client: int, max_tokens: int, seed0: int, stream: bool
) -> dict[str, float]:
    """C closed-loop clients, each sending ``per_client`` requests back to back."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    results: list[tuple[float, float, int]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(k: int) -> None:
            for i in range(per_client):
                results.append(await one_request(session, url, seed0 + k * per_client + i, max_tokens, stream))

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
        **{f"full_p{q}": percentile(full, q) for q in (50, 95, 99)},
    }


def batch_counters(url: str) -> tuple[int, int]:
    """(batches, batched rows) the replica has run so far, from ``/readyz``: the mean dynamic batch of a level."""
    import urllib.request

    with urllib.request.urlopen(url + "/readyz", timeout=30) as resp:
        st = json.loads(resp.read())["stats"]
    return st["batches"], st["batched_rows"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests-per-client", type=int, default=0, help="0 = max(4, 192 // clients)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="serve.max_batch_size with batching on")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="serve.batch_wait_timeout_s with batching on")
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--kind", choices=["stream", "plain", "both"], default="both", help="streaming and/or plain")
    args = ap.parse_args()

    import ray
    import torch

    from serve import testing

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            demo = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256}  # configs/demo.yaml's model
            ckpt = testing.make_tiny_checkpoint(Path(tmp) / "demo_size", **demo)
            for mode, batch in (("on", args.batch_size), ("off", 1)):
                url = testing.deploy(
                    ckpt,
                    max_batch_size=batch,
                    batch_wait_timeout_s=args.batch_wait if batch > 1 else 0.0,
                    max_tokens=args.max_tokens,
                    feedback_store=f"sqlite:///{Path(tmp) / 'feedback.db'}",
                    num_cpus=args.replica_cpus,
                )
                kinds = ["stream", "plain"] if args.kind == "both" else [args.kind]
                asyncio.run(run_level(url, 2, 2, args.max_tokens, 10_000, True))  # warm-up
                for kind in kinds:
                    for c in args.clients:
                        per = args.requests_per_client or max(4, 192 // c)
                        b0, n0 = batch_counters(url)
                        r = asyncio.run(run_level(url, c, per, args.max_tokens, 1000 * c, kind == "stream"))
                        b1, n1 = batch_counters(url)
                        r["mean_batch"] = (n1 - n0) / max(b1 - b0, 1)
                        rows.append({"kind": kind, "batching": mode, "clients": c, **r})
                        print(
                            f"{kind:>6} batching {mode:>3} clients {c:>3}: {r['req_s']:6.1f} req/s "
                            f"{r['tok_s']:7.0f} tok/s  first token p50 {r['ttft_p50']:6.0f} ms  "
                            f"full p50 {r['full_p50']:6.0f} ms  mean batch {r['mean_batch']:.1f}",
                            flush=True,
                        )
    finally:
        testing.shutdown()
        ray.shutdown()

    print()
    print(f"{args.max_tokens}-token replies, demo-size model (untrained), 2 CPU cores, loopback; ", end="")
    print("'plain' = stream=false (the first token arrives with the reply).")
    print()
    print(
        "| requests | batching | clients | n | req/s | tokens/s | mean tokens | mean batch "
        "| first token p50 / p95 / p99 (ms) | full reply p50 / p95 / p99 (ms) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["kind"] != "stream", r["batching"] != "on", r["clients"])):
        print(
            f"| {r['kind']} | {r['batching']} | {r['clients']} | {r['requests']} | {r['req_s']:.1f} | "
            f"{r['tok_s']:.0f} | {r['tokens']:.1f} | {r['mean_batch']:.1f} | "
            f"{r['ttft_p50']:.0f} / {r['ttft_p95']:.0f} / {r['ttft_p99']:.0f} | "
            f"{r['full_p50']:.0f} / {r['full_p95']:.0f} / {r['full_p99']:.0f} |"
        )
    by = {(r["kind"], r["batching"], r["clients"]): r for r in rows}
    print()
    for kind in ("stream", "plain"):
        if (kind, "on", 16) in by and (kind, "off", 16) in by:
            gain = by[kind, "on", 16]["req_s"] / by[kind, "off", 16]["req_s"]
            print(f"{kind}: throughput at 16 clients, batching on / off = {gain:.1f}x")
    if ("stream", "on", 1) in by:
        print(f"stream: first-token p50 at 1 client (batching on) = {by['stream', 'on', 1]['ttft_p50']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
