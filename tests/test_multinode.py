"""A real two-node Ray cluster on this machine, driven only through the Job Submission API (marked slow).

The module-scoped ``ray_cluster`` fixture runs ``ray start --head`` (1 CPU, custom resource ``learner``) and a
second ``ray start --address=...`` node (1 CPU, custom resource ``rollout``), both with token authentication and a
token of their own, in a private ``--temp-dir`` with private ports, so it neither joins nor disturbs any other Ray
instance on the machine (other tests' ``ray.init``, other engineers' clusters). Teardown stops exactly the
processes it started: each ``ray start --block`` runs in its own session, and every Ray process of a node
(GCS, raylet, dashboard, agents, workers) stays in that session or below it, so the fixture SIGTERMs the two
``ray start`` processes and then SIGKILLs whatever is left of those sessions and process trees -- never a global
``ray stop``. It fails the run if anything survives.

Jobs are submitted with ``runtime_env={"working_dir": <repo>}`` as a user would (``ray job submit --working-dir
.``), so they also show that worker processes on the other node import the project from the job's working_dir.

- ``placement_probe``: an actor made with :func:`rlchat.cluster.rollout_actor_options` of a config asking for
  ``{"rollout": 1}`` must run on the node that has the ``rollout`` resource.
- ``rlchat train`` and ``rlchat tune`` jobs: each checks the placement of its own actors (filtered by the job's
  driver job id; the cluster is shared by the module's jobs).
- ``feedback_load``: a two-replica Serve app, one replica per node, writes 1,000 concurrent ratings into one
  PostgreSQL database (the session's server, tests/conftest.py) and, the same again, into one SQLite file; all
  1,000 come back from each, and each prompt's opposite ratings make exactly one pair.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process bookkeeping reads /proc (Linux)"),
]

HEAD_CPUS = 1
WORKER_CPUS = 1
HEAD_RESOURCES = {"learner": 1}
WORKER_RESOURCES = {"rollout": 1}
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # two nodes share this host's /dev/shm; Ray's default is 30% of RAM each
START_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 240.0
# Below `make test`'s per-test --timeout=900, so a stuck job fails with its logs instead of a bare timeout.
TRAIN_TIMEOUT_S = 600.0
TUNE_TIMEOUT_S = 840.0


# --------------------------------------------------------------------------------------------------------------
# Processes: which ones are ours (by session and by parentage), read from /proc
# --------------------------------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, session id, start time in clock ticks) of every live, non-zombie process."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # the command name may contain spaces and parentheses
        if fields[0] in ("Z", "X"):
            continue
        table[int(entry)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return table


def _cluster_processes(roots: set[int]) -> dict[int, int]:
    """pid -> start time of the ``ray start`` processes in ``roots``, everything in their sessions, and descendants.

    Each node's ``ray start`` runs in a new session (``start_new_session``), so its GCS, raylet, dashboard, agents
    and workers share its session id; the one exception, a job's driver (the job supervisor starts it in a new
    session), is a descendant of a worker of that node.
    """
    table = _proc_table()
    ours = {pid for pid, (_, sid, _) in table.items() if sid in roots} | (roots & table.keys())
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in table.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return {pid: table[pid][2] for pid in ours}


def _alive(procs: dict[int, int]) -> dict[int, int]:
    """The subset of ``procs`` still running as the same process (start time guards against pid reuse)."""
    table = _proc_table()
    return {pid: start for pid, start in procs.items() if pid in table and table[pid][2] == start}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"({path} unreadable)"


# --------------------------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LocalCluster:
    """A head node plus one worker node of Ray on this machine, with token auth and a private temp dir."""

    root: Path
    token: str
    env: dict[str, str]
    gcs_address: str = ""
    dashboard_url: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    watchdog: subprocess.Popen | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    @classmethod
    def start(cls) -> LocalCluster:
        """Start head and worker, wait until the dashboard answers and both nodes are alive; stop on failure."""
        # Short path: Ray's unix sockets live under <temp-dir>/session_*/sockets (the limit is ~107 bytes).
        root = Path(tempfile.mkdtemp(prefix="rlc-", dir="/tmp"))
        token = secrets.token_hex(32)
        token_path = root / "auth_token"
        token_path.write_text(token)
        token_path.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(
            # Token auth set explicitly for every process of this cluster, with its own token: a mode left unset
            # would follow whatever ~/.ray/auth_token holds, and a node whose mode differs cannot join.
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token_path),
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DEDUP_LOGS="0",
            # `rlchat` / `python` in job entrypoints resolve to this venv (jobs inherit the raylet's env).
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # 2 shared cores: one thread per process unless a config says otherwise.
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        cluster = cls(root=root, token=token, env=env)
        try:
            cluster._start_nodes()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def start_retrying(cls, attempts: int = 2) -> LocalCluster:
        """:meth:`start`, again on a start-up failure: with the other test process busy on the same 2 cores, a
        joining node once timed out fetching its node info from the head's GCS ("The current node timed out during
        startup", a CI run); that is Ray's start-up under load, not what this module tests."""
        for attempt in range(attempts):
            try:
                return cls.start()
            except (RuntimeError, TimeoutError):
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _ray_start(self, name: str, args: list[str], cpus: int, resources: dict[str, int]) -> subprocess.Popen:
        cmd = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--block",  # the process owns the node: SIGTERM to it shuts the node down
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.root / name}",
            # Per-node ports free and explicit: a default (the agent's 52365, ...) may be held by another Ray here.
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            "--disable-usage-stats",
            *args,
        ]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 -- the child keeps writing after we return
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def _start_nodes(self) -> None:
        gcs_port, dashboard_port = _free_port(), _free_port()
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self._ray_start(
            "head",
            [
                "--head",
                f"--port={gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={_free_port()}",
            ],
            HEAD_CPUS,
            HEAD_RESOURCES,
        )
        self._wait(lambda: _connectable("127.0.0.1", gcs_port), "the head's GCS to listen")
        self._ray_start("worker", [f"--address={self.gcs_address}"], WORKER_CPUS, WORKER_RESOURCES)
        self._start_watchdog()
        self._wait(lambda: len(self.alive_nodes()) == 2, "both nodes to register")

    def _start_watchdog(self) -> None:
        """If this test process dies without its teardown (SIGKILL, a CI timeout), shut the two nodes down anyway.

        SIGTERM to a ``ray start --block`` process stops its node's processes (its exit handler kills them).
        """
        pids = " ".join(str(p.pid) for p in self.procs.values())
        script = (
            f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 2; done; "
            f"kill -TERM {pids} 2>/dev/null; sleep 30; kill -KILL {pids} 2>/dev/null; rm -rf '{self.root}'"
        )
        self.watchdog = subprocess.Popen(
            ["/bin/sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"`ray start` of the {name} node exited with {proc.returncode} while waiting for {what}:\n"
                        + _tail(self.root / f"{name}.log")
                    )
            try:
                if ready():
                    return
            except Exception:  # the dashboard is still starting
                pass
            time.sleep(1.0)
        logs = "\n".join(f"--- {n}.log\n{_tail(self.root / f'{n}.log')}" for n in self.procs)
        raise TimeoutError(f"timed out after {START_TIMEOUT_S:.0f} s waiting for {what}\n{logs}")

    def stop(self) -> list[str]:
        """Stop this cluster's processes only; returns descriptions of any that survived (none expected)."""
        if self.watchdog is not None:
            self.watchdog.kill()
            self.watchdog.wait()
        roots = {p.pid for p in self.procs.values()}
        ours = _cluster_processes(roots)
        for name in ("worker", "head"):  # the worker first: the head's GCS should see it leave
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # A graceful stop is quick when idle but takes ~30 s while a task still runs; nothing here needs it.
        deadline = time.monotonic() + 10.0
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        ours.update(_cluster_processes(roots))  # sessions of our nodes may have started processes meanwhile
        for pid in _alive(ours):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():  # reap, so no zombie of ours is left either
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        # a killed process takes a while to exit on a loaded machine (its memory is freed first: /proc shows it
        # with an empty command line, not yet a zombie; seen in a CI run at 0.5 s): poll before calling it a survivor
        until = time.monotonic() + 10.0
        while (survivors := _alive(ours)) and time.monotonic() < until:
            time.sleep(0.2)
        described = []
        for pid in survivors:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            described.append(f"{pid}: {cmdline[:200]}")
        shutil.rmtree(self.root, ignore_errors=True)
        return described

    # -- clients ----------------------------------------------------------------------------------------------

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers with this cluster's token (Ray then adds no token of its own from this process's env)."""
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    def job_client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.headers)

    def state_client(self) -> Any:
        from ray.util.state.api import StateApiClient

        return StateApiClient(address=self.dashboard_url, headers=self.headers)

    def alive_nodes(self) -> list[Any]:
        from ray.util.state.common import ListApiOptions, StateResource

        nodes = self.state_client().list(
            StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
        )
        return [n for n in nodes if n.state == "ALIVE"]

    def actors(self) -> list[Any]:
        from ray.util.state.common import ListApiOptions, StateResource

        return self.state_client().list(
            StateResource.ACTORS, options=ListApiOptions(detail=True, limit=10_000), raise_on_missing_output=False
        )

    def run_job(self, entrypoint: str, timeout_s: float) -> tuple[Any, str]:
        """Submit ``entrypoint`` with the repository as working_dir; wait for a terminal state.

        Returns:
            (job details, job logs); the job is stopped if it is still running at the timeout.
        """
        from ray.job_submission import JobStatus

        from rlchat.cluster import RUNTIME_ENV_EXCLUDES

        client = self.job_client()
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": str(ROOT), "excludes": list(RUNTIME_ENV_EXCLUDES)},
        )
        deadline = time.monotonic() + timeout_s
        while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                logs = client.get_job_logs(job_id)
                pytest.fail(f"job {entrypoint!r} still running after {timeout_s:.0f} s; logs:\n{logs[-6000:]}")
            time.sleep(2.0)
        return client.get_job_info(job_id), client.get_job_logs(job_id)

    def rollout_node_ids(self) -> set[str]:
        return {n.node_id for n in self.alive_nodes() if n.resources_total.get("rollout", 0) > 0}


def _connectable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True


def _assert_succeeded(info: Any, logs: str) -> None:
    from ray.job_submission import JobStatus

    status = f"job {info.entrypoint!r}: {info.status} ({info.message})"
    assert info.status == JobStatus.SUCCEEDED, f"{status}\n{logs[-6000:]}"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalCluster]:
    """One two-node cluster for the module; always stopped, and the run fails if any of its processes survive."""
    cluster = LocalCluster.start_retrying()
    try:
        yield cluster
    finally:
        survivors = cluster.stop()
        assert not survivors, f"Ray processes of the test cluster survived teardown: {survivors}"


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


def test_cluster_has_a_rollout_node_and_a_learner_head(ray_cluster):
    nodes = ray_cluster.alive_nodes()
    assert len(nodes) == 2
    head = [n for n in nodes if n.is_head_node]
    worker = [n for n in nodes if not n.is_head_node]
    assert len(head) == 1 and len(worker) == 1
    assert head[0].resources_total.get("learner") == 1 and "rollout" not in head[0].resources_total
    assert worker[0].resources_total.get("rollout") == 1 and "learner" not in worker[0].resources_total
    assert head[0].resources_total["CPU"] == HEAD_CPUS and worker[0].resources_total["CPU"] == WORKER_CPUS


def test_rollout_actor_runs_on_the_rollout_node(ray_cluster):
    info, logs = ray_cluster.run_job("python tests/jobs/placement_probe.py", PROBE_TIMEOUT_S)
    _assert_succeeded(info, logs)
    lines = [line for line in logs.splitlines() if line.startswith("PROBE_RESULT ")]
    assert len(lines) == 1, logs[-6000:]
    result = json.loads(lines[0].removeprefix("PROBE_RESULT "))

    rollout_nodes = ray_cluster.rollout_node_ids()
    assert len(rollout_nodes) == 1
    (rollout_node,) = rollout_nodes
    assert result["actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"rollout": 1.0}}
    assert result["actor"]["node_id"] == rollout_node
    assert set(result["rollout_node_ids"]) == rollout_nodes
    assert result["driver_node_id"] != rollout_node  # the driver runs on the head: the actor really moved
    # The state API, independent of the job's own report, agrees on where the actor ran.
    probes = [a for a in ray_cluster.actors() if a.class_name == "Probe"]
    assert probes and {a.node_id for a in probes} == {rollout_node}
    # The worker node imported the project from the job's working_dir, unpacked under its own temp dir.
    # Each is the project's own package at the top of that working_dir (the actor's cwd), not ray.tune /
    # ray.serve or a namesake installed in site-packages.
    worker_tmp = (ray_cluster.root / "worker").resolve()
    working_dir = Path(result["actor"]["cwd"]).resolve()
    assert working_dir.is_relative_to(worker_tmp) and "working_dir_files" in working_dir.parts, working_dir
    for module in ("rlchat", "envs", "tune", "serve"):
        path = Path(result["actor"][module]).resolve()
        assert path == working_dir / module / "__init__.py", (module, path)
        assert not path.is_relative_to(ROOT), path


def _job_actors(cluster: LocalCluster, info: Any) -> list[Any]:
    """The actors of one submitted job: those whose job id is the job's driver's.

    The module's cluster outlives each job, and the state API lists every actor the cluster ever had, so an
    unfiltered list would let one job's placement check pass on another job's actors. Actors started by the
    driver's own actors (Tune trials, Ray Train workers, their rollout workers) inherit the driver's job id.
    """
    job_id = getattr(info, "job_id", None) or getattr(getattr(info, "driver_info", None), "id", None)
    assert job_id, f"job {info.submission_id!r} reports no driver job id: {info!r}"
    return [a for a in cluster.actors() if a.job_id == job_id]


def test_train_job_places_rollout_workers_on_the_rollout_node(ray_cluster, tmp_path):
    from rlchat.config import load_config
    from rlchat.metrics import CONFIG_FILE, ROLLOUT_REWARD_MEAN, read_metrics

    run_dir = tmp_path / "train"
    # The run dir is absolute: a job's cwd is its unpacked working_dir, which Ray deletes.
    entrypoint = (
        "rlchat train --config configs/demo.yaml ppo.iterations=2 ppo.eval_every=0 checkpoint.every=1 "
        "rollout.envs_per_worker=128 "
        "'rollout.resources={rollout: 1}' 'ray.learner_resources={learner: 1}' "
        f"--run-dir {run_dir}"
    )
    info, logs = ray_cluster.run_job(entrypoint, TRAIN_TIMEOUT_S)
    _assert_succeeded(info, logs)

    cfg = load_config(run_dir / CONFIG_FILE)
    assert cfg.rollout.resources == {"rollout": 1.0} and cfg.ppo.iterations == 2
    rewards = [r[ROLLOUT_REWARD_MEAN] for r in read_metrics(run_dir) if ROLLOUT_REWARD_MEAN in r]
    assert len(rewards) >= 2 and all(isinstance(r, float) for r in rewards), read_metrics(run_dir)
    assert list((run_dir / "checkpoints").rglob("meta.json")), sorted(p.name for p in run_dir.rglob("*"))

    rollout_nodes = ray_cluster.rollout_node_ids()
    actors = _job_actors(ray_cluster, info)
    workers = [a for a in actors if "Rollout" in a.class_name]
    assert workers, f"no rollout actor in the job's actor table: {sorted({a.class_name for a in actors})}"
    assert {a.node_id for a in workers} <= rollout_nodes
    # The learner's Ray Train workers asked for the `learner` resource, which only the head has.
    (head,) = [n.node_id for n in ray_cluster.alive_nodes() if n.is_head_node]
    learners = [a for a in actors if a.class_name == "RayTrainWorker"]
    assert learners and {a.node_id for a in learners} == {head}, [(a.class_name, a.node_id) for a in learners]


def test_tune_job_runs_two_trials(ray_cluster, tmp_path):
    run_dir = tmp_path / "sweep"
    entrypoint = (
        "rlchat tune --config configs/demo.yaml --space tune/spaces/demo.yaml --samples 2 "
        "ppo.iterations=2 ppo.eval_every=1 ppo.eval_prompts=16 checkpoint.every=1 "
        # the demo space samples and learns inside each trial; here trials use real rollout actors + learners
        "rollout.num_workers=1 ray.learner_workers=1 "
        "'rollout.resources={rollout: 1}' 'ray.learner_resources={learner: 1}' "
        f"--run-dir {run_dir}"
    )
    info, logs = ray_cluster.run_job(entrypoint, TUNE_TIMEOUT_S)
    _assert_succeeded(info, logs)
    # The sweep's results table: the shallowest CSV (Tune's per-trial progress.csv files lie deeper).
    csvs = [p for p in run_dir.rglob("*.csv") if p.name != "progress.csv"]
    tables = sorted(csvs, key=lambda p: len(p.relative_to(run_dir).parts))
    assert tables, sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    rows = [line for line in tables[0].read_text().splitlines()[1:] if line.strip()]
    assert len(rows) == 2, tables[0].read_text()  # one row per trial
    assert list(run_dir.rglob("*.png")), "the sweep wrote no comparison plot"
    # Only this job's actors: the training job before it left rollout actors of its own on the same cluster.
    rollout_nodes = ray_cluster.rollout_node_ids()
    actors = _job_actors(ray_cluster, info)
    workers = [a for a in actors if "Rollout" in a.class_name]
    assert workers, f"the sweep started no rollout actor: {sorted({a.class_name for a in actors})}"
    assert {a.node_id for a in workers} <= rollout_nodes, [(a.class_name, a.node_id) for a in workers]


FEEDBACK_TIMEOUT_S = 600.0


def test_two_replicas_on_two_nodes_write_1000_ratings_into_one_store(ray_cluster, postgres_server, tmp_path):
    from rlchat.feedback_store import FeedbackStore

    n = 1000
    stores = {"pg": postgres_server.create_database(), "sqlite": f"sqlite:///{tmp_path / 'feedback.db'}"}
    args = " ".join(f"--store {name}={url}" for name, url in stores.items())
    entrypoint = f"python tests/jobs/feedback_load.py --port {_free_port()} --ratings {n} {args}"
    info, logs = ray_cluster.run_job(entrypoint, FEEDBACK_TIMEOUT_S)
    _assert_succeeded(info, logs)
    lines = [line for line in logs.splitlines() if line.startswith("FEEDBACK_RESULT ")]
    assert len(lines) == 1, logs[-6000:]
    result = json.loads(lines[0].removeprefix("FEEDBACK_RESULT "))

    all_nodes = {node.node_id for node in ray_cluster.alive_nodes()}
    for name, url in stores.items():
        assert result[name]["statuses"] == {"200": n}, (name, result[name])
        # one replica on each node: both nodes wrote into the one database
        replicas = [a for a in ray_cluster.actors() if a.class_name == f"ServeReplica:fb-{name}:ChatServer"]
        assert len(replicas) == 2 and {a.node_id for a in replicas} == all_nodes, [(a.node_id) for a in replicas]
        store = FeedbackStore(url)
        ratings = store.rows("ratings")
        assert sorted(r["request_id"] for r in ratings) == sorted(f"chatcmpl-{name}-{i}" for i in range(n)), name
        pairs = store.rows("pairs")
        assert sorted(p["chosen_id"] for p in pairs) == sorted(f"chatcmpl-{name}-{i}" for i in range(0, n, 2)), name
        store.close()


SHIPPED_TIMEOUT_S = 480.0


def test_replica_on_the_worker_node_loads_a_checkpoint_shipped_from_the_driver(ray_cluster):
    """#13 item 5: the checkpoint exists only on the driver's node (and not even there once the app is built); the
    replica, forced onto the worker node, loads the copy shipped through the object store and answers."""
    info, logs = ray_cluster.run_job(f"python tests/jobs/serve_shipped.py --port {_free_port()}", SHIPPED_TIMEOUT_S)
    _assert_succeeded(info, logs)
    lines = [line for line in logs.splitlines() if line.startswith("SHIPPED_RESULT ")]
    assert len(lines) == 1, logs[-6000:]
    result = json.loads(lines[0].removeprefix("SHIPPED_RESULT "))
    assert result["checkpoint_gone"] is True
    assert result["status"] == 200 and isinstance(result["content"], str), result
    assert result["step"] == 1 and "only_on_the_driver" not in result["loaded_from"], result
    rollout_nodes = ray_cluster.rollout_node_ids()
    assert result["replica_node_id"] in rollout_nodes and result["driver_node_id"] not in rollout_nodes, result
    replicas = [a for a in ray_cluster.actors() if a.class_name == "ServeReplica:shipped:ChatServer"]
    assert replicas and {a.node_id for a in replicas} <= rollout_nodes, [(a.class_name, a.node_id) for a in replicas]
