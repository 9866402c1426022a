"""Soak test of the Serve chat endpoint: a mixed, overloaded client population for minutes, watching for leaks.

    python bench/serve_soak.py                          # 6 minutes, 96 clients, the demo model's size (~8 min)
    python bench/serve_soak.py --minutes 20 --clients 128
    python bench/serve_soak.py --swap-every 30        # and a config update every 30 s (canary, promote, roll back)
    python bench/serve_soak.py --ingress haproxy      # through Serve's HAProxy ingress
    python bench/serve_soak.py --rolling-every 60     # and a rolling update every 60 s (Serve replaces the replica)

What it does: builds an untrained checkpoint of the demo's size, starts a local Ray (2 CPUs) and deploys the app
with the product's serving defaults (``serve.max_batch_size`` 16, ``serve.max_queued_requests`` 64,
``serve.request_timeout_s`` 60, engine process, Serve's proxy) plus an API key (so ``/readyz`` shows the replica's
pid to this script) and a SQLite feedback store with its rate limit off. Then C closed-loop clients each send, one
after the other, requests drawn at random (seeded) from what real clients do:

    plain / streamed chat; a stream whose client goes away after its first chunk; a plain request whose client
    gives up after 0.1 s; n=2 with log-probs and 5 top log-probs; /v1/completions; penalties, logit bias and a stop
    string; a 2-beam search; a malformed body (4xx expected); a rating of one of the last 200 replies (/v1/feedback;
    a 409 when that reply was rated already); GET /v1/models.

More clients than a full batch plus the queue (96 > 16 + 64) keep the replica overloaded, so 503s with
``Retry-After`` are expected. Every ``--sample-s`` seconds it records the resident memory (``VmRSS``) of the replica
and of its engine process (the replica's child), the requests waiting and in flight (``/readyz``) and the status
codes so far; a load balancer's probe (``GET /-/healthz``, no key, 2 s limit) and one of ``/readyz`` (reported
only: it is shed under overload like any request) run every second. Clients wait a 503's ``Retry-After`` before
their next request, as the openai SDK does (``--no-retry-after``: at once). With ``--swap-every S`` the app's
versions change every S seconds, as ``serve deploy`` of an edited config does (the controller's ``deploy_apps``; a
lightweight ``user_config`` update): a 90/10 canary of a second checkpoint, the canary promoted, then rolled back to
the first, and again, so versions are loaded, drained and closed all run long; the replica's engine processes are
counted too (one per loaded version). With ``--rolling-every S`` the app's ``args`` change every S seconds (as a
``serve deploy`` of new settings or code does): Serve starts a new replica, then stops the old one once its requests
are done (``graceful_shutdown_timeout_s``); the memory checks then do not apply (no replica lives through the
second half). After the load it waits for the replica to go idle and checks that every place was given back.

Pass criteria printed at the end: no 5xx other than 503, no connection errors the script did not cause, no ERROR
line in the replica's log (Ray's session log directory), every load balancer probe a 200 in time, the replica idle
afterwards (nothing waiting, nothing in flight), and the resident memory of the replica and of its engine processes
(at their usual count) growing less than ``--max-growth-mb`` over the second half of the run. Exit status 1 when one
fails. Traffic goes to 127.0.0.1 only; every loop is bounded by time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

API_KEY = "soak-key"
PROBE_TIMEOUT_S = 2.0
"""The probes' time limit (a load balancer's probe timeout, e.g. 2 s)."""
LB_PROBE = "/-/healthz"
"""What a load balancer probes (docs/serving.md): Serve's proxy answers it, counted as no request."""
PROBED = (LB_PROBE, "/readyz")
"""Probed every second: the load balancer's probe, and the replica's status route (shed under overload, reported)."""
PROMPTS = ("Tell me something about the sea.", "What is two plus two?", "Write a short poem about rain.")
KINDS = {  # kind -> weight: how often a client does it
    "plain": 20,
    "stream": 25,
    "stream_gone": 8,
    "plain_gone": 5,
    "logprobs_n2": 8,
    "completions": 8,
    "penalties": 8,
    "beams": 3,
    "malformed": 6,
    "feedback": 6,
    "models": 3,
}


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (``/proc/PID/status``), NaN when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (``/proc/*/stat``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def chat_body(kind: str, rng: random.Random) -> dict[str, Any]:
    """The chat request body of ``kind``."""
    body: dict[str, Any] = {
        "model": "rlchat",
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.choice((8, 32, 64)),
        "temperature": 1.0,
        "seed": rng.randrange(2**31),
    }
    if kind in ("stream", "stream_gone"):
        body.update(stream=True, stream_options={"include_usage": True})
    elif kind == "logprobs_n2":
        body.update(n=2, logprobs=True, top_logprobs=5)
    elif kind == "penalties":
        body.update(presence_penalty=0.5, frequency_penalty=0.3, logit_bias={"100": -100}, stop=["\n\n"])
    elif kind == "beams":
        body.update(num_beams=2, temperature=0.0, max_tokens=16)
    return body


class Soak:
    """The clients' shared tallies: status codes by kind, unexpected errors, reply ids to rate."""

    def __init__(self, url: str, seed: int, honour_retry_after: bool) -> None:
        self.url = url
        self.honour_retry_after = honour_retry_after
        self.rng = random.Random(seed)
        self.codes: Counter[tuple[str, int]] = Counter()
        self.errors: Counter[str] = Counter()
        self.reply_ids: list[str] = []
        self.requests = 0
        self.retry_after: dict[int, float] = {}
        """Per client: seconds to wait before its next request (a 503's ``Retry-After``, as the openai SDK does)."""

    def _tally(self, kind: str, resp: Any, client: int) -> None:
        """Count ``resp``'s status under ``kind``; a 503's ``Retry-After`` (at most 5 s) is ``client``'s wait."""
        self.codes[kind, resp.status] += 1
        if resp.status == 503:
            self.retry_after[client] = min(float(resp.headers.get("Retry-After", "1")), 5.0)

    async def _send(self, session: Any, kind: str, client: int, method: str, path: str, **kwargs: Any) -> None:
        """One request whose reply is read whole and only tallied."""
        async with session.request(method, self.url + path, **kwargs) as resp:
            await resp.read()
            self._tally(kind, resp, client)

    async def one(self, session: Any, kind: str, rng: random.Random, client: int) -> None:
        """Send one request of ``kind`` for ``client`` and tally its outcome."""
        import aiohttp

        headers = {"Authorization": f"Bearer {API_KEY}"}
        self.requests += 1
        try:
            if kind == "models":
                await self._send(session, kind, client, "GET", "/v1/models", headers=headers)
                return
            if kind == "malformed":
                data = rng.choice(('{"messages": [', '{"messages": 5}', '{"model": "rlchat", "max_tokens": -1}'))
                typed = {**headers, "Content-Type": "application/json"}
                await self._send(session, kind, client, "POST", "/v1/chat/completions", data=data, headers=typed)
                return
            if kind == "feedback":
                if not self.reply_ids:
                    return
                recent = self.reply_ids[-200:]  # a reply rated soon after it came (the cache keeps the last 2,048)
                body = {"completion_id": rng.choice(recent), "rating": rng.choice(("up", "down"))}
                await self._send(session, kind, client, "POST", "/v1/feedback", json=body, headers=headers)
                return
            if kind == "completions":
                body = {"model": "rlchat", "prompt": rng.choice(PROMPTS), "max_tokens": 16, "seed": rng.randrange(99)}
                await self._send(session, kind, client, "POST", "/v1/completions", json=body, headers=headers)
                return
            body = chat_body(kind, rng)
            timeout = aiohttp.ClientTimeout(total=0.1) if kind == "plain_gone" else None
            try:
                async with session.post(
                    self.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout
                ) as resp:
                    if kind == "stream_gone":
                        self._tally(kind, resp, client)
                        if resp.status == 200:
                            await resp.content.readline()  # the first SSE line, then go away
                        resp.close()
                        return
                    raw = await resp.read()
                    self._tally(kind, resp, client)
                    if resp.status == 200 and not body.get("stream"):
                        reply_id = json.loads(raw)["id"]
                        self.reply_ids.append(reply_id)
                        del self.reply_ids[:-200]
            except asyncio.TimeoutError:
                if kind != "plain_gone":
                    raise
                self.codes[kind, 0] += 1  # 0 = the client gave up, as meant
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, KeyError) as e:
            self.errors[f"{kind}: {type(e).__name__}: {str(e)[:80]}"] += 1

    async def client(self, session: Any, k: int, until: float) -> None:
        rng = random.Random(self.rng.randrange(2**31) + k)
        kinds, weights = zip(*KINDS.items())
        while time.monotonic() < until:
            await self.one(session, rng.choices(kinds, weights)[0], rng, k)
            if self.honour_retry_after:
                await asyncio.sleep(self.retry_after.pop(k, 0.0))


def version_plans(a: str, b: str) -> list[list[dict[str, Any]]]:
    """The ``--swap-every`` cycle: a 90/10 canary of ``b``, ``b`` promoted, rolled back to ``a``."""
    return [
        [{"name": "stable", "checkpoint": a, "weight": 90}, {"name": "canary", "checkpoint": b, "weight": 10}],
        [{"name": "canary", "checkpoint": b, "weight": 100}],
        [{"name": "stable", "checkpoint": a, "weight": 100}],
    ]


def deploy_versions(app_args: dict[str, Any], versions: list[dict[str, Any]]) -> None:
    """What ``serve deploy config.yaml`` does for an edited ``versions`` list (the controller's ``deploy_apps``)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {
        "name": "rlchat",
        "route_prefix": "/",
        "import_path": "serve.app:build_app",
        "args": app_args,
        "deployments": [{"name": "ChatServer", "user_config": {"versions": versions}}],
    }
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))


def readyz(url: str) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(url + "/readyz", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def version_names(state: dict[str, Any]) -> str:
    """``/readyz``'s versions, the draining ones with a leading ``-``."""
    return ",".join([v["name"] for v in state["versions"]] + [f"-{v['name']}" for v in state["draining"]])


def busy(state: dict[str, Any]) -> tuple[int, int]:
    """(requests waiting for the batch, requests in flight over all versions) from ``/readyz``."""
    return state["load"]["waiting"], sum(v["inflight"] for v in state["versions"] + state["draining"])


async def probe(session: Any, url: str, until: float, every_s: float, timeout_s: float) -> list[tuple[Any, float]]:
    """A load balancer's probe: ``GET url`` (no key) every ``every_s`` with a ``timeout_s`` limit until ``until``;
    returns (status, or "timeout" / an error's name; seconds) per probe."""
    import aiohttp

    out: list[tuple[Any, float]] = []
    while time.monotonic() < until:
        t = time.perf_counter()
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                await resp.read()
                out.append((resp.status, time.perf_counter() - t))
        except asyncio.TimeoutError:
            out.append(("timeout", time.perf_counter() - t))
        except aiohttp.ClientError as e:
            out.append((type(e).__name__, time.perf_counter() - t))
        await asyncio.sleep(max(0.0, every_s - (time.perf_counter() - t)))
    return out


def plan_update(plans: list[list[dict[str, Any]]], app_args: dict[str, Any]) -> Callable[[int], None]:
    """``--swap-every``'s n-th update: the next plan of ``plans`` (a lightweight ``user_config`` update)."""
    return lambda n: deploy_versions(app_args, plans[n % len(plans)])


def rolling_update(app_args: dict[str, Any]) -> Callable[[int], None]:
    """``--rolling-every``'s n-th update: ``serve.max_messages`` 64 / 63, new args, so Serve replaces the replica."""

    def update(n: int) -> None:
        app_args["max_messages"] = 63 if n % 2 else 64
        deploy_versions(app_args, [])

    return update


async def every(every_s: float, until: float, update: Callable[[int], None]) -> int:
    """``update(n)`` (n = 1, 2, ...) every ``every_s`` seconds until ``until``; returns the updates made."""
    n = 0
    while time.monotonic() + every_s < until:
        await asyncio.sleep(every_s)
        n += 1
        await asyncio.to_thread(update, n)
    return n


async def run(
    url: str, args: argparse.Namespace, plans: list[list[dict[str, Any]]], app_args: dict[str, Any]
) -> tuple[Soak, list[dict[str, Any]], int, dict[str, list[tuple[Any, float]]]]:
    import aiohttp

    soak = Soak(url, args.seed, not args.no_retry_after)
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    until = t0 + args.minutes * 60
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(soak.client(session, k, until)) for k in range(args.clients)]
        if args.swap_every:
            updater = asyncio.create_task(every(args.swap_every, until, plan_update(plans, app_args)))
        elif args.rolling_every:
            updater = asyncio.create_task(every(args.rolling_every, until, rolling_update(app_args)))
        else:
            updater = None
        probers = {
            path: asyncio.create_task(probe(session, url + path, until, 1.0, PROBE_TIMEOUT_S)) for path in PROBED
        }
        while time.monotonic() < until:
            await asyncio.sleep(args.sample_s)
            try:
                state = await asyncio.to_thread(readyz, url)
            except OSError as e:  # urllib's HTTPError (a 503 from Serve's proxy under overload) and URLError
                print(f"{time.monotonic() - t0:6.0f} s  /readyz failed: {e}", flush=True)
                continue
            pid = state["pid"]
            engines = children(pid)
            waiting, inflight = busy(state)
            sample = {
                "t": time.monotonic() - t0,
                "pid": pid,
                "requests": soak.requests,
                "rss_replica": rss_mb(pid),
                "rss_engine": sum(rss_mb(p) for p in engines) if engines else float("nan"),
                "engines": len(engines),
                "versions": version_names(state),
                "waiting": waiting,
                "inflight": inflight,
                "503": sum(n for (_, c), n in soak.codes.items() if c == 503),
                "5xx": sum(n for (_, c), n in soak.codes.items() if c >= 500 and c != 503),
                "errors": sum(soak.errors.values()),
            }
            samples.append(sample)
            print(
                f"{sample['t']:6.0f} s  {sample['requests']:6d} requests  replica {sample['rss_replica']:7.1f} MB  "
                f"engines {len(engines)} {sample['rss_engine']:7.1f} MB [{sample['versions']}]  "
                f"waiting {waiting:3d}  in flight {inflight:3d}  "
                f"503 {sample['503']:5d}  other 5xx {sample['5xx']}  errors {sample['errors']}",
                flush=True,
            )
        await asyncio.gather(*tasks)
        swaps = await updater if updater is not None else 0
        probes = {path: await task for path, task in probers.items()}
    return soak, samples, swaps, probes


def replica_log_errors(ray: Any) -> Counter[str]:
    """ERROR lines of the app's replica logs (Ray's session log directory), by message without ids and numbers."""
    import re

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"  # noqa: SLF001
    out: Counter[str] = Counter()
    for path in logs.glob("replica_rlchat_*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("ERROR"):
                message = line.split(" -- ", 1)[-1]
                out[re.sub(r"[0-9a-f]{8,}|\d+", "N", message)[:120]] += 1
    return out


def growth(samples: list[dict[str, Any]], key: str, same_engines: bool = False) -> float:
    """MB gained over the second half of the run (last sample minus the one at the half); ``same_engines``: only
    samples with the half's most common number of engine processes (a swap loads one more for a while)."""
    half = samples[len(samples) // 2 :]
    if same_engines and half:
        usual = Counter(s["engines"] for s in half).most_common(1)[0][0]
        half = [s for s in half if s["engines"] == usual]
    return half[-1][key] - half[0][key] if len(half) >= 2 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--clients", type=int, default=96)
    ap.add_argument("--sample-s", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--swap-every", type=float, default=0.0, help="seconds between config updates (0: none)")
    ap.add_argument(
        "--no-retry-after",
        action="store_true",
        help="clients send their next request at once after a 503 (default: they wait its Retry-After, as SDKs do)",
    )
    ap.add_argument(
        "--rolling-every", type=float, default=0.0, help="seconds between rolling updates (new args; 0: none)"
    )
    ap.add_argument("--ingress", choices=["proxy", "haproxy"], default="proxy", help="serve.ingress")
    ap.add_argument("--max-growth-mb", type=float, default=30.0, help="allowed RSS growth over the second half")
    args = ap.parse_args()
    if args.swap_every and args.rolling_every:
        ap.error("--swap-every and --rolling-every each deploy the app's config: use one")

    import ray
    import torch

    from serve import testing
    from serve.settings import ingress_environment

    os.environ.update(ingress_environment(args.ingress))  # before Ray starts: every Ray process reads it
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            a = str(testing.make_tiny_checkpoint(Path(tmp) / "a", **bench_shape(), step=100))
            b = str(testing.make_tiny_checkpoint(Path(tmp) / "b", **bench_shape(), seed=1, step=200))
            app_args = {
                "checkpoint": a,
                "api_key": API_KEY,
                "feedback_store": f"sqlite:///{Path(tmp) / 'feedback.db'}",
                "feedback_rate_limit": 0,
            }
            plans = version_plans(a, b)
            url = f"http://127.0.0.1:{testing.start_serve()}"
            deploy_versions(app_args, plans[0] if args.swap_every else [])
            testing.wait_ready(url, api_key=API_KEY)
            soak, samples, swaps, probes = asyncio.run(run(url, args, plans, app_args))
            deadline = time.monotonic() + 90
            while (idle := busy(readyz(url))) != (0, 0) and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(2)
            log_errors = replica_log_errors(ray)
    finally:
        testing.shutdown()
        ray.shutdown()

    print()
    print(
        f"{args.clients} clients for {args.minutes:g} min, {soak.requests} requests, {swaps} "
        f"{'rolling' if args.rolling_every else 'config'} updates ({len({x['pid'] for x in samples})} replica pids "
        f"seen), ingress {args.ingress}; status codes by kind:"
    )
    print()
    print("| kind | " + " | ".join(str(c) for c in sorted({c for _, c in soak.codes})) + " |")
    codes = sorted({c for _, c in soak.codes})
    print("|---|" + "---:|" * len(codes))
    for kind in KINDS:
        print(f"| {kind} | " + " | ".join(str(soak.codes.get((kind, c), 0)) for c in codes) + " |")
    print("\n(0 = the client gave up after 0.1 s, as meant)")
    for err, n in soak.errors.most_common(10):
        print(f"client error x{n}: {err}")
    for err, n in log_errors.most_common(10):
        print(f"replica log ERROR x{n}: {err}")
    g_rep, g_eng = growth(samples, "rss_replica"), growth(samples, "rss_engine", same_engines=True)
    bad_5xx = sum(n for (_, c), n in soak.codes.items() if c >= 500 and c != 503)
    probe_codes = {}
    for path, results in probes.items():
        probe_codes[path] = Counter(str(c) for c, _ in results)
        took = sorted(t for _, t in results)
        print(
            f"probes of {path} (every 1 s, {PROBE_TIMEOUT_S:g} s limit): {len(results)}, {dict(probe_codes[path])}, "
            f"p50 {1000 * took[len(took) // 2]:.0f} ms, p99 {1000 * took[int(len(took) * 0.99)]:.0f} ms"
        )
    cap = args.max_growth_mb
    checks = {
        "no 5xx but 503": bad_5xx == 0,
        "no unexpected client errors": not soak.errors,
        f"no ERROR in the replica's log ({sum(log_errors.values())})": not log_errors,
        "idle afterwards (nothing waiting or in flight)": idle == (0, 0),
        f"every load balancer probe ({LB_PROBE}) a 200 within {PROBE_TIMEOUT_S:g} s": set(probe_codes[LB_PROBE])
        == {"200"},
        f"replica RSS growth over the second half {g_rep:+.1f} MB < {cap:g}": g_rep < cap,
        f"engine processes' RSS growth over the second half (at equal count) {g_eng:+.1f} MB < {cap:g}": g_eng < cap,
    }
    print()
    # no /readyz sample got through the overload, or no replica lived through the second half (rolling updates)
    unmeasured = {name for name in checks if "nan MB" in name or (args.rolling_every and "RSS" in name)}
    for name, ok in checks.items():
        print(f"{'n/a ' if name in unmeasured else 'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for name, ok in checks.items() if name not in unmeasured) else 1


def bench_shape() -> dict[str, int]:
    """The demo model's size (configs/demo.yaml), as ``make_tiny_checkpoint`` keywords."""
    return {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256, "vocab_size": 4096}


if __name__ == "__main__":
    sys.exit(main())
