"""Job entrypoint for tests/test_multinode.py: where do rollout-type actors land on a real multi-node cluster?

Submitted through the Job Submission API with the repository as ``working_dir``. It connects with
:func:`rlchat.cluster.init_ray` (inside a job: the job's address and runtime_env), creates one actor with
:func:`rlchat.cluster.rollout_actor_options` of a config asking for ``{"rollout": 1}``, and prints one JSON line
(prefixed ``PROBE_RESULT``) with the node ids and the files the actor imported, which the test reads from the job
logs. Run by hand::

    ray job submit --address http://HEAD:8265 --working-dir . -- python tests/jobs/placement_probe.py
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import ray

from rlchat.cluster import init_ray, rollout_actor_options
from rlchat.config import load_config

PROJECT_PACKAGES = ("rlchat", "envs", "tune", "serve")
"""The project's top-level packages; ``tune`` and ``serve`` share their names with ray.tune / ray.serve."""


@ray.remote
class Probe:
    """Stands in for a rollout worker: reports where it runs and which project files it imported."""

    def where(self) -> dict[str, str]:
        # By name on purpose: the point is to show which `tune` / `serve` this worker resolves -- our top-level
        # packages from the job's working_dir, not ray.tune / ray.serve or an installed namesake. (A bare
        # `import tune` / `import serve` is what CONVENTIONS.md rules out everywhere else.)
        found = {name: importlib.import_module(name).__file__ for name in PROJECT_PACKAGES}
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            **{name: str(path) for name, path in found.items()},
            "cwd": os.getcwd(),
        }


def main() -> int:
    overrides = sys.argv[1:] or ["rollout.resources={rollout: 1}"]
    cfg = load_config("configs/demo.yaml", overrides)
    init_ray(cfg.ray.address or None)
    options = rollout_actor_options(cfg)
    probe = Probe.options(**options).remote()
    where = ray.get(probe.where.remote(), timeout=120)
    rollout_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("rollout", 0) > 0]
    result = {
        "driver_node_id": ray.get_runtime_context().get_node_id(),
        "actor": where,
        "actor_options": options,
        "rollout_node_ids": rollout_nodes,
    }
    print("PROBE_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
