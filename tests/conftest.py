"""Shared pytest fixtures: one local Ray instance per session, tiny configs, thread budgets, and a throwaway
PostgreSQL server for the feedback-store tests.

Start-up costs dominate on 2 cores (imports ~4 s, ray.init 2-4 s), so every Ray test of a test process shares one
instance (`make test` runs two test processes, whole modules each: pytest-xdist `--dist loadfile`).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Hermetic: no hub downloads, quiet Ray, one torch thread per process unless a test asks for more.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Apps a test deploys without a feedback store would write the default ./feedback.db into the checkout (the
# replicas' working directory): give them one in a temp dir instead (a test of the default unsets it).
_FEEDBACK_DIR = tempfile.mkdtemp(prefix="rlchat-tests-feedback-")
os.environ["RLCHAT_FEEDBACK_STORE"] = f"sqlite:///{_FEEDBACK_DIR}/feedback.db"  # never a user's real database
atexit.register(shutil.rmtree, _FEEDBACK_DIR, True)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (2 CPUs, no dashboard): a new one, never a cluster some other
    test process (``make test`` runs two) started with ``ray start`` (tests/test_multinode.py)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


HEAVIEST_FIRST = (
    "test_rlhf_gold.py",
    "test_demo.py",
    "test_multinode.py",
    "test_ppo_ray.py",
    "test_learner_faults.py",
    "test_tune.py",
    "test_relative_paths.py",
    "test_batch_generate.py",
    "test_serve_versions.py",
    "test_serve.py",
    "test_chat_cli.py",
    "test_rm.py",
    "test_serve_cli.py",
    "test_sft.py",
    "test_feedback_store.py",
)
"""Modules by test time, longest first (one test process on the 2-vCPU VM: test_demo 336 s, test_rlhf_gold 329 --
first, as its one module fixture cannot be split --, test_multinode 239, test_ppo_ray 173, test_learner_faults 128,
test_tune 92, ...); every other module follows in its usual order.

`make test` hands whole modules to two test processes (pytest-xdist ``--dist loadfile --no-loadscope-reorder``)
in this order, so the longest start first and the short ones fill in at the end. xdist's own order (most tests
first) started the few-test, several-minute modules last and left one process running alone for minutes."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file and test order kept otherwise


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tests run with one torch thread (several test processes may share the 2 cores)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _thawed_heap():
    """An in-process replica (``serve.testing.inprocess_server``) freezes the heap of the process it starts in
    (``serve/heap.py``): in a Serve replica that is its own, here it is pytest's. Thawed after each test, so the
    garbage cycles of one test's objects are still collected."""
    import gc

    yield
    gc.unfreeze()


@pytest.fixture
def no_replica_context(monkeypatch):
    """For a replica built in process (``serve.testing.inprocess_server``): there is no Serve replica context, so
    the routes that read one (``/readyz``) get a stand-in replica id."""
    from types import SimpleNamespace

    import serve.app as app_module

    replica = SimpleNamespace(replica_id=SimpleNamespace(unique_id="r"))
    monkeypatch.setattr(app_module.ray_serve, "get_replica_context", lambda: replica)


# --------------------------------------------------------------------------------------------------------------
# PostgreSQL: Debian's `postgresql` package (`make postgres`), one unprivileged server per session
# --------------------------------------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb`` and ``pg_ctl`` (else PATH's), or None."""

    def version(path: str) -> int:
        m = re.search(r"/postgresql/(\d+)/", path)
        return int(m.group(1)) if m else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path and shutil.which("initdb") else None


@dataclass
class PostgresServer:
    """A PostgreSQL cluster in a temp dir, listening on 127.0.0.1:port, superuser ``rlchat`` with trust auth.

    PostgreSQL refuses to run as root, so as root every server command runs as ``nobody`` (``runuser``), which
    owns the data directory -- as the web-page test uses Debian's Chromium, nothing here needs a system service.
    """

    bin_dir: Path
    root: Path
    port: int
    user: str = "rlchat"
    as_user: list[str] = field(default_factory=list)
    watchdog: subprocess.Popen | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [*self.as_user, str(self.bin_dir / args[0]), *args[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}\n{tail}")
        return out

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o", opts,
                  "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def connect_admin(self):  # noqa: ANN201 - psycopg.Connection
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its ``postgresql://`` URL."""
        from psycopg import sql

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with self.connect_admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def is_running(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (initdb into a temp dir, pg_ctl start; stopped at the end).

    Skipped, with the reason, only when the PostgreSQL binaries are not installed (``make postgres`` installs
    them; CI runs ``make test``, which does).
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (make postgres, or apt-get install -y postgresql)")
    root = Path(tempfile.mkdtemp(prefix="rlchat-pg-", dir="/tmp"))  # short: the socket path limit is ~107 bytes
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    server = PostgresServer(bin_dir, root, _free_port(), as_user=as_user)
    server._run("initdb", "-D", str(server.data), "-U", server.user, "--auth=trust", "-E", "UTF8", "--locale=C")
    for attempt in range(3):
        try:
            server.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            server.port = _free_port()  # another process took the port between probe and bind
    # If this pytest process dies without its teardown, stop the server and remove its files anyway.
    stop = " ".join([*as_user, str(bin_dir / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "stop"])
    server.watchdog = subprocess.Popen(
        ["/bin/sh", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 2; done; {stop}; rm -rf '{root}'"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield server
    finally:
        server.watchdog.kill()
        server.watchdog.wait()
        if server.is_running():
            with contextlib.suppress(Exception):
                server.stop("immediate")
        deadline = time.monotonic() + 10
        while server.is_running() and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
