"""Small Ray helpers of the distributed layer: connect, reserve the learner, place rollout workers.

Three jobs, each a few lines, so that the trainer, the sweep and the job-submission tests place work the same way:

- :func:`init_ray` connects to ``address`` / ``RAY_ADDRESS`` or starts a local instance. When it connects to an
  existing cluster from a source checkout it ships the checkout as the job's ``working_dir``, so worker processes
  on other nodes import *this* ``rlchat`` / ``envs`` / ``tune`` / ``serve`` (and see ``configs/``) even where the
  project is not installed. Inside a submitted job (``ray job submit --working-dir .``) the job already carries
  its runtime environment, and passing another ``working_dir`` would conflict, so it passes none.
- :func:`placement_group_for_learner` reserves the learner's bundles (GPU, CPUs, custom ``learner`` resource)
  *before* rollout workers are created, so a burst of rollout actors can never take the learner's GPU.
- :func:`rollout_actor_options` turns ``cfg.rollout`` into ``.options(...)`` for rollout actors; a custom
  resource such as ``{"rollout": 1}`` pins them to the rollout node type of ``cluster.yaml``.
- :func:`cluster_capacity_problems` checks offline that a cluster-launcher config (``cluster.yaml``) can host
  every rollout and learner worker a run config asks for, so a typo'd resource name fails in CI, not after an
  hour of waiting for nodes that never come.

Ray is imported inside the functions: importing this module costs nothing, and the core never imports it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlchat.core.errors import ConfigError

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from rlchat.core.config import Config

logger = logging.getLogger(__name__)

#: Paths (gitignore syntax, relative to the project root) never uploaded as a job's working_dir: the virtual
#: environment, run outputs and caches are large and node-specific. Ray also honours ``.gitignore`` by default.
RUNTIME_ENV_EXCLUDES: tuple[str, ...] = (
    ".venv/",
    "venv/",
    "runs/",
    ".git/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "*.egg-info/",
    "build/",
    "dist/",
)


def project_root() -> Path | None:
    """The source checkout this ``rlchat`` was imported from, or None for an installed (non-editable) package.

    Returns:
        The directory holding ``pyproject.toml`` and ``rlchat/``, when there is one.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "rlchat" / "__init__.py").is_file():
        return root
    return None


def project_runtime_env() -> dict[str, Any] | None:
    """The runtime_env that makes workers on other nodes import this checkout (None if installed as a package).

    Returns:
        ``{"working_dir": <checkout>, "excludes": [...]}``, or None when rlchat is an installed package, in which
        case every node must have it installed (``cluster.yaml``'s setup commands do that).
    """
    root = project_root()
    if root is None:
        return None
    return {"working_dir": str(root), "excludes": list(RUNTIME_ENV_EXCLUDES)}


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the driver of a submitted job (it holds the job's runtime_env as JSON).

Ray has no public API that says "this process is a submitted job's driver" before ``ray.init`` (the runtime
context needs a connection; ray-project/ray#28089 asks for a submission-id accessor), so the variable's name is
spelled here rather than imported from ``ray._private.runtime_env.constants``; ``tests/test_cluster_config.py``
checks it still matches Ray's."""


def _in_submitted_job() -> bool:
    """True in the driver of a submitted job: Ray's job manager put the job's runtime_env in the environment."""
    return JOB_CONFIG_ENV in os.environ


def init_ray(address: str | None, num_cpus: int = 0) -> None:
    """Connect to a Ray cluster, or start a local instance; a no-op when Ray is already initialised.

    Resolution order: ``address``, then ``RAY_ADDRESS``, then a new local instance. ``"local"`` forces a new
    instance and ``"auto"`` joins a cluster started on this machine with ``ray start``. A missing address never
    silently joins some other ``ray start`` cluster of this machine (Ray's own default would).

    Args:
        address: ``host:port`` of the GCS, ``ray://host:10001``, ``"auto"``, ``"local"``, or None / ``""``.
        num_cpus: CPUs of a newly started local instance (0 = all); ignored when connecting.

    Raises:
        ConfigError: the cluster rejected the connection because of token authentication (the message says
            which environment variables to set).
    """
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target == "local":
        logger.info("starting a local Ray instance (num_cpus=%s)", num_cpus or "all")
        ray.init(address="local", num_cpus=num_cpus or None)
        return
    runtime_env = None if _in_submitted_job() else project_runtime_env()
    logger.info("connecting to Ray at %s (runtime_env=%s)", target, runtime_env)
    try:
        ray.init(address=target, runtime_env=runtime_env)
    except ray.exceptions.AuthenticationError as e:
        raise ConfigError(
            f"ray.address={target!r}: the cluster requires token authentication ({e}); "
            "export RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN (or its file as "
            "RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head prints it), then retry"
        ) from None


def learner_bundle(cfg: Config) -> dict[str, float]:
    """Resources of one learner worker: ``{CPU: learner_cpus, GPU: 1 if learner_use_gpu, **learner_resources}``.

    The same dict serves as one placement-group bundle and as Ray Train's ``ScalingConfig.resources_per_worker``.
    Zero amounts are left out (Ray rejects zero-valued bundle entries).
    """
    r = cfg.ray
    bundle: dict[str, float] = {"CPU": float(r.learner_cpus), "GPU": 1.0 if r.learner_use_gpu else 0.0}
    bundle.update({k: float(v) for k, v in r.learner_resources.items()})
    return {k: v for k, v in bundle.items() if v > 0}


def placement_group_for_learner(cfg: Config, *, timeout_s: float | None = 600.0) -> PlacementGroup:
    """Reserve ``cfg.ray.learner_workers`` learner bundles so rollout actors cannot starve the learner.

    Call it before creating rollout workers; then schedule learner worker ``i`` with
    ``PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)``. ``PACK`` keeps the learner's GPUs
    on one multi-GPU node when one can hold them (fast collectives) and spreads them otherwise.

    Args:
        cfg: the run config (reads ``ray.learner_workers``, ``learner_cpus``, ``learner_use_gpu``,
            ``learner_resources``).
        timeout_s: wait this long for the reservation (an autoscaling cluster may need minutes to start a GPU
            node); None returns at once and leaves waiting (``pg.ready()``) to the caller.

    Returns:
        The placement group, ready unless ``timeout_s`` is None.

    Raises:
        ConfigError: the cluster could not provide the bundles within ``timeout_s``; the message lists the request
            and what the cluster has.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    n = cfg.ray.learner_workers
    if n < 1:
        raise ConfigError(f"ray.learner_workers={n!r}: expected at least 1; use 1 on a laptop")
    bundle = learner_bundle(cfg)
    if not bundle:
        raise ConfigError(
            f"ray.learner_cpus={cfg.ray.learner_cpus!r}: a learner bundle needs some resource; "
            "set ray.learner_cpus > 0 or ray.learner_use_gpu=true"
        )
    pg = placement_group(
        [dict(bundle) for _ in range(n)], strategy="PACK", name=f"rlchat-learner-{uuid.uuid4().hex[:8]}"
    )
    if timeout_s is None:
        return pg
    if not pg.wait(timeout_s):
        remove_placement_group(pg)
        raise ConfigError(
            f"ray.learner_workers={n}: the cluster could not reserve {n} x {bundle} within {timeout_s:.0f} s "
            f"(cluster resources: {ray.cluster_resources()}); lower ray.learner_workers / ray.learner_cpus, drop "
            "ray.learner_use_gpu / ray.learner_resources, or add a node type that provides them (cluster.yaml)"
        )
    return pg


def rollout_actor_options(cfg: Config) -> dict[str, Any]:
    """``.options(...)`` for a rollout actor: ``num_cpus``, ``num_gpus`` and custom ``resources`` of ``cfg.rollout``.

    Returns:
        ``{"num_cpus": float, "num_gpus": float, "resources": dict[str, float]}``.
    """
    r = cfg.rollout
    return {
        "num_cpus": float(r.num_cpus_per_worker),
        "num_gpus": float(r.num_gpus_per_worker),
        "resources": {k: float(v) for k, v in r.resources.items()},
    }


def rollout_bundle(cfg: Config) -> dict[str, float]:
    """Resources of one rollout worker as a bundle (``CPU`` / ``GPU`` / custom), zero amounts left out."""
    opts = rollout_actor_options(cfg)
    bundle = {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"], **opts["resources"]}
    return {k: v for k, v in bundle.items() if v > 0}


def cluster_capacity_problems(cluster: Mapping[str, Any], cfg: Config) -> list[str]:
    """Why a cluster-launcher config cannot host a run's workers; an empty list when it can.

    Places ``ray.learner_workers`` learner bundles, then ``rollout.num_workers`` rollout bundles, first-fit onto
    the head plus up to ``max_workers`` nodes of each worker type (and at most the global ``max_workers`` worker
    nodes in all), the way Ray's autoscaler would have to. Node types must declare ``CPU`` and ``GPU`` in their
    ``resources`` (cluster.yaml does), since instance-type auto-detection needs cloud access.

    Args:
        cluster: the parsed cluster YAML (``available_node_types``, ``head_node_type``, ``max_workers``).
        cfg: the run config whose requests are checked.

    Returns:
        One readable line per problem (a resource no node type has, a worker too big for every node type, or
        not enough nodes for all workers).
    """
    types: Mapping[str, Any] = cluster.get("available_node_types") or {}
    head = cluster.get("head_node_type")
    global_max = int(cluster.get("max_workers", 0))
    requests = [("learner worker", learner_bundle(cfg))] * cfg.ray.learner_workers
    requests += [("rollout worker", rollout_bundle(cfg))] * cfg.rollout.num_workers

    def provided(name: str) -> dict[str, float]:
        return {k: float(v) for k, v in (types[name].get("resources") or {}).items()}

    def fits(need: Mapping[str, float], have: Mapping[str, float]) -> bool:
        return all(have.get(k, 0.0) >= v for k, v in need.items())

    problems: list[str] = []
    # 1. every requested resource exists somewhere, and each single worker fits on some node type.
    everywhere = {k for name in types for k, v in provided(name).items() if v > 0}
    for what, need in dict(requests).items():  # one check per kind of worker
        missing = sorted(set(need) - everywhere)
        if missing:
            problems.append(f"{what} needs {need}, but no node type provides {missing}")
        elif not any(fits(need, provided(name)) for name in types):
            problems.append(f"{what} needs {need}, more than any single node type provides")
    if problems:
        return problems

    # 2. first-fit placement over the nodes the autoscaler may launch (learner first: it is reserved first).
    open_nodes: list[dict[str, float]] = [provided(head)] if head in types else []
    launched = dict.fromkeys(types, 0)
    for what, need in requests:
        node = next((n for n in open_nodes if fits(need, n)), None)
        if node is None:
            candidates = [
                name
                for name in types
                if name != head
                and launched[name] < int(types[name].get("max_workers", global_max))
                and sum(launched.values()) < global_max
                and fits(need, provided(name))
            ]
            if not candidates:
                fitting = ", ".join(n for n in types if n != head and fits(need, provided(n)))
                msg = (
                    f"no room for another {what} ({need}): max_workers of the node types that fit it ({fitting}) "
                    f"or the global max_workers={global_max} is too small for ray.learner_workers="
                    f"{cfg.ray.learner_workers} and rollout.num_workers={cfg.rollout.num_workers}"
                )
                if msg not in problems:  # one line per kind of worker left over
                    problems.append(msg)
                continue
            launched[candidates[0]] += 1
            node = provided(candidates[0])
            open_nodes.append(node)
        for k, v in need.items():
            node[k] = node.get(k, 0.0) - v
    return problems


def node_cpus() -> int:
    """CPUs of the node this process runs on: Ray's CPU resource of the node (what the user gave Ray), else the
    cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import ray

        if not ray.is_initialized():
            return cores
        me = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == me and node.get("Alive"):
                return max(1, int(node.get("Resources", {}).get("CPU", cores)))
    except Exception:  # noqa: BLE001 - outside Ray, or a Ray without the node table: the affinity count
        logger.debug("node_cpus: Ray's node table unavailable; using the affinity count", exc_info=True)
    return cores


def torch_thread_budget(requested: int, reserved_cpus: float, same_phase_on_node: int, overlap: bool) -> int:
    """Torch threads of one rollout worker or learner rank (``rollout.torch_threads`` / ``ray.learner_threads``).

    ``requested > 0`` is taken as is. ``0`` (auto) is the design that keeps no core idle on one machine: without
    ``rollout.overlap`` the driver runs sample -> update -> sync in turn, so while the rollout workers sample the
    learner waits and vice versa; each phase may then use every core of the node, shared only among the processes
    *of the same phase* there. Ray's CPU reservations still place and count the processes; only the threads
    inside them follow the phases. With overlap both phases run at once, so each process gets its reservation.
    Measured on 2 cores at cl100k (bench/README.md): the 100k-vocabulary update takes half the time on 2 threads.

    Args:
        requested: the config value (0 = auto).
        reserved_cpus: the CPUs Ray reserved for this process (``rollout.num_cpus_per_worker`` / ``learner_cpus``).
        same_phase_on_node: processes of this phase that run at the same time on this node (>= 1).
        overlap: ``rollout.overlap``.
    """
    if requested > 0:
        return requested
    if overlap:
        return max(1, int(reserved_cpus))
    return max(1, node_cpus() // max(1, same_phase_on_node))


def learner_thread_budget(cfg: Config, overlap: bool = False) -> int:
    """Torch threads of a learner in the driver process (``ray.learner_workers=0``: PPO's learner with
    ``overlap=rollout.overlap``, an SFT / RM stage with none): one rank alone on this node."""
    return torch_thread_budget(cfg.ray.learner_threads, cfg.ray.learner_cpus, 1, overlap)


def rollout_workers_per_node(cfg: Config, cpus: int) -> int:
    """How many of the run's rollout workers Ray can place on a node of ``cpus`` CPUs (at most all of them)."""
    per = cfg.rollout.num_cpus_per_worker
    fit = int(cpus // per) if per > 0 else cfg.rollout.num_workers
    return max(1, min(cfg.rollout.num_workers, fit))
