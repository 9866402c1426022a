"""Job entrypoint for tests/test_multinode.py: two-replica Serve apps on a two-node cluster, 1,000 ratings each.

For every store URL given, deploys the chat app with two replicas, at most one per node (so the two nodes' replicas
write into one database), through a head-only Serve proxy on ``--port``; then sends ``--ratings`` thumbs ratings
concurrently over HTTP (each with its own messages and content, as the web page sends them, so either replica can
take it) and prints one JSON line prefixed ``FEEDBACK_RESULT`` with the HTTP statuses. The test reads the rows back
from the databases and the replicas' nodes from the state API itself. Rating ``i`` rates reply ``i`` of prompt
``i // 2``, "up" for even ``i`` and "down" for odd ``i``, so each prompt's two ratings make exactly one pair.

    ray job submit --working-dir . -- python tests/jobs/feedback_load.py --port 8123 \\
        --store pg=postgresql://rlchat@127.0.0.1:5432/rlchat --store sqlite=sqlite:////tmp/feedback.db
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from ray import serve as ray_serve

from rlchat.cluster import init_ray
from serve import testing
from serve.app import ChatServer
from serve.settings import deployment_options, resolve_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", action="append", required=True, metavar="NAME=URL")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ratings", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    init_ray(None, 0)
    ray_serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args.port})
    ckpt = testing.make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="fb-load-")) / "ckpt")
    result: dict[str, dict] = {}
    try:
        for spec in args.store:
            name, url = spec.split("=", 1)
            settings = resolve_settings(
                {
                    "checkpoint": str(ckpt),
                    "feedback_store": url,
                    "replicas": 2,
                    "num_cpus": 0.25,
                    "max_tokens": 8,
                    "feedback_rate_limit": 0,  # 1,000 ratings from one address: no per-client limit here
                }
            )
            app = ChatServer.options(**deployment_options(settings), max_replicas_per_node=1).bind(settings)
            ray_serve.run(app, name=f"fb-{name}", route_prefix=f"/{name}")
            base = f"http://127.0.0.1:{args.port}/{name}"
            testing.wait_ready(base, timeout_s=300)

            def rate(i: int, base: str = base, name: str = name) -> int:
                body = {
                    "completion_id": f"chatcmpl-{name}-{i}",
                    "rating": "up" if i % 2 == 0 else "down",
                    "messages": [{"role": "user", "content": f"{name} question {i // 2}"}],
                    "content": f"{name} answer {i}",
                }
                for _ in range(3):  # a refused connection (proxy warming up) is retried; any HTTP answer is final
                    try:
                        return requests.post(base + "/v1/feedback", json=body, timeout=120).status_code
                    except requests.ConnectionError:
                        time.sleep(1.0)
                return -1

            t0 = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                statuses = Counter(pool.map(rate, range(args.ratings)))
            result[name] = {
                "statuses": {str(k): v for k, v in statuses.items()},
                "seconds": round(time.monotonic() - t0, 1),
            }
            ray_serve.delete(f"fb-{name}")
    finally:
        ray_serve.shutdown()
    print("FEEDBACK_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
