"""Job for tests/test_multinode.py: serve a checkpoint that exists only on the driver's node.

The driver (on the head) writes a tiny checkpoint into a temp dir, builds the app with ``serve.ship_checkpoint=always``
(the checkpoint is packed and ``ray.put`` once) and ``serve.resources={rollout: 1}`` (the replica must run on the
worker node), deletes the directory, and only then deploys: the replica can load the model only from the shipped
copy. Prints one ``SHIPPED_RESULT {json}`` line: the chat status and reply, where the replica and the driver ran, and
the path the replica loaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import ray
import requests
from ray import serve as ray_serve

from serve.app import build_app
from serve.testing import make_tiny_checkpoint, wait_ready

KEY = "shipped-key"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ray.init()
    root = Path(tempfile.mkdtemp(prefix="rlchat-shipped-"))
    ckpt = make_tiny_checkpoint(root / "only_on_the_driver")
    app = build_app(
        {
            "checkpoint": str(ckpt),
            "ship_checkpoint": "always",
            "resources": {"rollout": 1},
            "num_cpus": 0,
            "api_key": KEY,
            "checkpoint_cache": str(root / "cache"),
            "feedback_store": f"sqlite:///{root / 'feedback.db'}",
        }
    )
    shutil.rmtree(ckpt)  # packed and put already: from here on it exists only in the object store
    result: dict = {"checkpoint_gone": not ckpt.exists(), "driver_node_id": ray.get_runtime_context().get_node_id()}
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        ray_serve.run(app, name="shipped", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        ready = wait_ready(url, timeout_s=240, api_key=KEY)
        r = requests.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        result.update(
            status=r.status_code,
            content=r.json()["choices"][0]["message"]["content"] if r.ok else r.text,
            replica_node_id=ready.get("node_id"),
            loaded_from=ready.get("checkpoint"),
            step=ready.get("step"),
        )
    finally:
        ray_serve.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    print("SHIPPED_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
