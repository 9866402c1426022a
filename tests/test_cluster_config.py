"""cluster.yaml against Ray's own autoscaler schema, configs/gpu.yaml against cluster.yaml, and rlchat.cluster.

All offline: Ray's ``prepare_config`` fills the AWS defaults from the installed package (no cloud calls), and
``validate_config`` checks the result with ``ray-schema.json``, which rejects unknown keys. ``validate_config``
alone would fail with "Missing 'cluster_synced_files'": it expects a config already prepared.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rlchat import cluster as rc
from rlchat.config import load_config
from rlchat.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_YAML = ROOT / "configs" / "gpu.yaml"


def _cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validated(config: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --------------------------------------------------------------------------------------------------------------
# cluster.yaml
# --------------------------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_schema():
    prepared = _validated(_cluster())
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and set(types) == {"head", "rollout_gpu", "learner_gpu"}
    assert types["head"]["resources"]["GPU"] == 0
    assert types["rollout_gpu"]["resources"]["GPU"] == 1 and types["rollout_gpu"]["resources"]["rollout"] == 1
    assert types["learner_gpu"]["resources"]["GPU"] > 1
    assert types["learner_gpu"]["resources"]["learner"] == types["learner_gpu"]["resources"]["GPU"]
    for name in ("rollout_gpu", "learner_gpu"):
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    # prepare_config merges the common setup commands into the head's / workers' lists.
    head_setup = " && ".join(prepared["head_setup_commands"])
    worker_setup = " && ".join(prepared["worker_setup_commands"])
    for setup in (head_setup, worker_setup):
        assert "pip install -q -e ~/rlchat" in setup and "torch==" in setup
    assert "whl/cpu" in head_setup and "whl/cpu" not in worker_setup  # CUDA torch only where the GPUs are


def test_cluster_yaml_propagates_token_auth_to_every_node():
    prepared = _validated(_cluster())
    # The one token reaches the head through file_mounts and the workers through the head's file_mounts sync.
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert prepared["file_mounts"]["~/rlchat"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), prepared[key]
    assert any("export RAY_AUTH_MODE=token" in c for c in prepared["worker_setup_commands"])
    assert "**/.venv" in prepared["rsync_exclude"] and "**/runs" in prepared["rsync_exclude"]


def test_cluster_yaml_starts_ray_with_the_default_serve_ingress_and_says_how_to_switch():
    from rlchat.config import Config
    from serve.settings import INGRESS_ENVIRONMENT

    prepared = _validated(_cluster())
    haproxy = [f"{k}=1" for k in INGRESS_ENVIRONMENT["haproxy"]]
    want_haproxy = Config().serve.ingress == "haproxy"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all(all(s in c for s in haproxy) == want_haproxy for c in starts), prepared[key]
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    assert all(s in text for s in haproxy), "cluster.yaml must say how to turn serve.ingress=haproxy on"


@pytest.mark.parametrize(
    ("where", "typo"),
    [((), "max_wrkers"), (("available_node_types", "rollout_gpu"), "min_wokers"), (("auth",), "ssh_usr")],
)
def test_unknown_cluster_key_is_rejected(where, typo):
    config = _cluster()
    node = config
    for key in where:
        node = node[key]
    node[typo] = 1
    with pytest.raises(jsonschema.ValidationError, match=f"'{typo}' was unexpected"):
        _validated(config)


def test_validate_alone_needs_a_prepared_config():
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(_cluster())


# --------------------------------------------------------------------------------------------------------------
# configs/gpu.yaml and its fit on cluster.yaml
# --------------------------------------------------------------------------------------------------------------


def test_gpu_config_validates():
    cfg = load_config(GPU_YAML)
    assert cfg.rollout.resources == {"rollout": 1.0} and cfg.rollout.num_gpus_per_worker == 1.0
    assert cfg.ray.learner_use_gpu and cfg.ray.learner_resources == {"learner": 1.0}
    assert cfg.ray.learner_workers >= 2  # DDP across the learner node's GPUs
    assert cfg.model.precision == "bf16"
    assert cfg.model.n_layer * cfg.model.n_embd > 2 * 64  # bigger than the demo's tiny model
    assert cfg.rollout_batch_size % cfg.ppo.num_minibatches == 0


def test_cluster_provides_every_resource_gpu_config_requests():
    cfg = load_config(GPU_YAML)
    types = _cluster()["available_node_types"]
    # Spelled out (the placement check below covers it too): each requested custom resource and GPU count exists.
    for need in (rc.rollout_bundle(cfg), rc.learner_bundle(cfg)):
        assert any(all(t["resources"].get(k, 0) >= v for k, v in need.items()) for t in types.values()), need
    learner_nodes = [t for t in types.values() if t["resources"].get("learner", 0) > 0]
    learner_slots = sum(t["resources"]["learner"] * t["max_workers"] for t in learner_nodes)
    assert learner_slots >= cfg.ray.learner_workers
    rollout_nodes = [t for t in types.values() if t["resources"].get("rollout", 0) > 0]
    assert sum(t["resources"]["rollout"] * t["max_workers"] for t in rollout_nodes) >= cfg.rollout.num_workers
    assert rc.cluster_capacity_problems(_cluster(), cfg) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"rollout.resources": {"rollot": 1}}, "no node type provides ['rollot']"),
        ({"rollout.num_gpus_per_worker": 2}, "more than any single node type provides"),
        ({"ray.learner_workers": 5}, "no room for another learner worker"),
        ({"rollout.num_workers": 8, "ppo.num_minibatches": 8}, "no room for another rollout worker"),
    ],
)
def test_capacity_check_reports_what_does_not_fit(overrides, expected):
    cfg = load_config(GPU_YAML, overrides)
    problems = rc.cluster_capacity_problems(_cluster(), cfg)
    assert len(problems) == 1 and expected in problems[0], problems


def test_capacity_check_honours_the_global_max_workers():
    cfg = load_config(GPU_YAML)
    config = _cluster()
    config["max_workers"] = 4  # 4 rollout nodes + the learner node need 5
    (problem,) = rc.cluster_capacity_problems(config, cfg)
    assert "global max_workers=4" in problem


# --------------------------------------------------------------------------------------------------------------
# rlchat.cluster helpers
# --------------------------------------------------------------------------------------------------------------


def test_actor_options_and_bundles_follow_the_config():
    cfg = load_config(GPU_YAML)
    assert rc.rollout_actor_options(cfg) == {"num_cpus": 3.0, "num_gpus": 1.0, "resources": {"rollout": 1.0}}
    assert rc.learner_bundle(cfg) == {"CPU": 8.0, "GPU": 1.0, "learner": 1.0}
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert rc.rollout_actor_options(demo) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {}}
    assert rc.learner_bundle(demo) == {"CPU": 1.0}  # no zero-valued GPU entry: Ray rejects those in bundles
    assert rc.rollout_bundle(demo) == {"CPU": 1.0}


def test_project_runtime_env_ships_the_checkout_without_venv_or_runs():
    env = rc.project_runtime_env()
    assert env is not None and Path(env["working_dir"]) == ROOT
    for excluded in (".venv/", "runs/", ".git/"):
        assert excluded in env["excludes"]


class _FakeRay:
    """Records ray.init calls instead of starting Ray."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    fake = _FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    return fake


def test_init_ray_starts_a_local_instance_without_an_address(fake_ray):
    rc.init_ray(None, num_cpus=2)
    # "local", not None: Ray's None would join any `ray start` cluster found on this machine.
    assert fake_ray.calls == [{"address": "local", "num_cpus": 2}]


def test_init_ray_ships_the_checkout_when_joining_a_cluster(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    rc.init_ray(None)
    (call,) = fake_ray.calls
    assert call["address"] == "10.0.0.1:6379"
    assert call["runtime_env"]["working_dir"] == str(ROOT)
    rc.init_ray("ray://head:10001")  # an explicit address wins over RAY_ADDRESS
    assert fake_ray.calls[-1]["address"] == "ray://head:10001"


def test_init_ray_inside_a_submitted_job_keeps_the_jobs_runtime_env(fake_ray, monkeypatch):
    # Ray's job manager sets both; a second working_dir would conflict with the job's own.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    rc.init_ray(None)
    assert fake_ray.calls == [{"address": "127.0.0.1:6379", "runtime_env": None}]


def test_learner_placement_group_reserves_resources_rollouts_cannot_take(ray_local):
    ray = ray_local
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg = load_config(None, {"ray.learner_workers": 2, "ray.learner_cpus": 0.75})
    pg = rc.placement_group_for_learner(cfg, timeout_s=60)
    try:
        assert pg.bundle_specs == [{"CPU": 0.75}, {"CPU": 0.75}]

        @ray.remote(num_cpus=0.75)
        def where() -> str:
            return ray.get_runtime_context().get_placement_group_id() or ""

        inside = where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 1)).remote()
        assert ray.get(inside, timeout=60) == pg.id.hex()
        # Whatever the session's CPUs, a rollout task that would fit beside the reservation but not in what the
        # reservation leaves cannot start.
        outside = where.options(num_cpus=ray.cluster_resources()["CPU"] - 1.5 + 0.25).remote()
        ready, _ = ray.wait([outside], timeout=2.0)
        assert ready == []
        ray.cancel(outside, force=True)
    finally:
        remove_placement_group(pg)


def test_learner_placement_group_that_cannot_be_placed_says_what_to_change(ray_local):
    cfg = load_config(None, {"ray.learner_resources": {"learner": 1}})
    with pytest.raises(ConfigError, match=r"ray.learner_workers=1: the cluster could not reserve .*'learner': 1.0"):
        rc.placement_group_for_learner(cfg, timeout_s=1)


def test_job_config_env_name_matches_rays() -> None:
    """rlchat spells the submitted-job variable instead of importing ray._private; it must still be Ray's name."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from rlchat.distributed.cluster import JOB_CONFIG_ENV

    assert JOB_CONFIG_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR
