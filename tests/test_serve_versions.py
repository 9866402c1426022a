"""Model versions in one app (canary split, explicit picks, promote / roll back in place), ``--follow``, and where
replicas get checkpoints (``pyarrow.fs`` URIs, shipped copies). Pure pieces run in-process; the Serve tests run on
the session's local Ray and Serve (serve.testing), each with its own small app under its own route."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from rlchat.errors import CheckpointError, ConfigError
from rlchat.feedback_store import FeedbackStore
from serve import testing
from serve.models import (
    VERSION_HEADER,
    ModelSet,
    VersionSpec,
    fetch_checkpoint,
    pack_checkpoint,
    parse_versions,
    unpack_checkpoint,
)
from serve.schemas import APIError

KEY = testing.TEST_API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {
        "a": testing.make_tiny_checkpoint(root / "a", seed=0, step=100),
        "b": testing.make_tiny_checkpoint(root / "b", seed=1, step=200),
    }


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------


def test_parse_versions_checks_names_and_weights():
    specs = parse_versions(
        [{"name": "stable", "checkpoint": "/x", "weight": 90}, {"name": "canary", "checkpoint": "/y", "weight": "10"}],
        alias="rlchat",
    )
    assert [(s.name, s.weight) for s in specs] == [("stable", 90.0), ("canary", 10.0)]
    assert parse_versions(None) == ()
    bad = [
        ([{"name": "a", "checkpoint": "/x"}, {"name": "a", "checkpoint": "/y"}], "appears twice"),
        ([{"name": "a", "checkpoint": "/x", "weight": -1}], "weight"),
        ([{"name": "a", "checkpoint": "/x", "weight": 0}], "every weight is 0"),
        ([{"name": "rlchat", "checkpoint": "/x"}], "app's model name"),
        ([{"name": "a", "checkpoint": "/x", "wieght": 1}], "unknown key"),
        ([{"name": "a"}], "required"),
        ("a", "expected a list"),
    ]
    for raw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            parse_versions(raw, alias="rlchat")
    # every name the alias answers to is taken: an app called "chat" also answers to "rlchat" (the default name)
    with pytest.raises(ConfigError, match="'rlchat'.*picks a version by weight"):
        parse_versions([{"name": "rlchat", "checkpoint": "/x"}], alias="chat")


class _FakeVersion:
    def __init__(self, name: str, weight: float) -> None:
        self.name = name
        self.spec = VersionSpec(name, f"/{name}", weight)
        self.alive = True

    def stalled_s(self, now: float) -> float:
        return 0.0


def test_the_health_check_fails_when_any_served_version_cannot_generate():
    """A dead canary (its scheduler or engine process gone) would answer its share of the alias's traffic, and every
    request naming it, with a 500 forever: the replica must report unhealthy so Serve replaces it, as it does when
    the heaviest version dies."""
    from serve.app import ChatServer

    models = ModelSet("rlchat")
    stable, canary = _FakeVersion("stable", 90), _FakeVersion("canary", 10)
    models.set([stable, canary], {"stable": 90, "canary": 10})  # type: ignore[list-item]
    replica = SimpleNamespace(settings=SimpleNamespace(from_run=None), _follower=None, models=models, stall_after_s=80)
    check = ChatServer.func_or_class.check_health
    check(replica)  # both alive
    canary.alive = False
    with pytest.raises(RuntimeError, match="canary"):
        check(replica)
    canary.alive, stable.alive = True, False
    with pytest.raises(RuntimeError, match="stable"):
        check(replica)


def _last_gauge(metrics: Any, version: str) -> float:
    """The latest queue-depth value queued for Ray under the ``version`` tag."""
    sets = [v for fn, v, tags in metrics._flusher.queue if tags == {"version": version}]  # noqa: SLF001
    return sets[-1]


def test_a_closed_versions_waiting_jobs_leave_the_queue_depth_gauge_and_readyz():
    """A version closed with jobs still waiting (drained past its timeout, or replaced by ``--follow`` under the same
    name) kept its last queue depth in the gauge and in ``/readyz``'s sum for the life of the replica."""
    from serve.metrics import ServeMetrics
    from serve.models import ServedVersion

    metrics = ServeMetrics("m")
    stable, old = metrics.for_version("stable"), metrics.for_version("canary")
    stable.on_queue(2)
    old.on_queue(3)
    assert metrics.snapshot()["queue_depth"] == 5
    new = metrics.for_version("canary")  # a new checkpoint under the same name: its own scheduler, its own count
    new.on_queue(1)
    assert metrics.snapshot()["queue_depth"] == 6 and _last_gauge(metrics, "canary") == 4
    closed: list[bool] = []
    scheduler = SimpleNamespace(close=lambda: closed.append(True))
    version = ServedVersion(VersionSpec("canary", "/c", 10), None, None, None, scheduler, 64, "c", observer=old)  # type: ignore[arg-type]
    version.close()
    assert closed == [True]
    assert metrics.snapshot()["queue_depth"] == 3 and _last_gauge(metrics, "canary") == 1
    old.on_queue(7)  # a late report from the closed scheduler changes nothing
    assert metrics.snapshot()["queue_depth"] == 3 and _last_gauge(metrics, "canary") == 1
    new.close()
    assert metrics.snapshot()["queue_depth"] == 2 and _last_gauge(metrics, "canary") == 0


def test_alias_split_matches_the_weights_exactly_and_names_pick_their_version():
    models = ModelSet("rlchat", ("default",))
    models.set([_FakeVersion("stable", 90), _FakeVersion("canary", 10)], {"stable": 90, "canary": 10})  # type: ignore[list-item]
    counts = Counter(models.pick(None).name for _ in range(1000))  # type: ignore[union-attr]
    assert counts == {"stable": 900, "canary": 100}
    # smooth: the canary's requests are spread out, never in a burst
    picks = [models.pick("rlchat").name for _ in range(20)]  # type: ignore[union-attr]
    assert picks.count("canary") == 2 and picks.index("canary") != picks.index("canary", picks.index("canary") + 1) - 1
    assert models.pick("canary").name == "canary"  # type: ignore[union-attr]
    assert models.pick("default").name in ("stable", "canary")  # type: ignore[union-attr]
    assert models.pick("nope") is None
    models.set(list(models.versions.values()), {"stable": 0, "canary": 100})
    assert {models.pick(None).name for _ in range(50)} == {"canary"}  # type: ignore[union-attr]
    assert models.pick("stable").name == "stable"  # type: ignore[union-attr]


def test_file_uri_is_copied_through_pyarrow_into_the_cache(ckpts, tmp_path):
    from rlchat.checkpoint import load_policy

    cache = tmp_path / "cache"
    uri = f"file://{ckpts['a']}"
    path = fetch_checkpoint(VersionSpec("a", uri), cache)
    assert path.is_relative_to(cache) and (path / "meta.json").is_file()
    assert fetch_checkpoint(VersionSpec("a", uri), cache) == path  # once per node
    _, _, info = load_policy(path)
    assert info.step == 100
    with pytest.raises(CheckpointError, match="cannot copy|not a checkpoint"):
        fetch_checkpoint(VersionSpec("a", f"file://{tmp_path}/missing"), cache)
    # the object behind a URI changed (a resumed run re-saved the step): the node copies it again, never the stale copy
    src = tmp_path / "mutable"
    shutil.copytree(ckpts["a"], src)
    first = fetch_checkpoint(VersionSpec("m", f"file://{src}"), cache)
    shutil.rmtree(src)
    shutil.copytree(ckpts["b"], src)
    again = fetch_checkpoint(VersionSpec("m", f"file://{src}"), cache)
    assert again != first and load_policy(again)[2].step == 200


def test_shipped_pack_unpacks_where_the_path_is_gone(ckpts, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ckpts["b"], src)
    data = pack_checkpoint(src)
    shutil.rmtree(src)
    path = unpack_checkpoint(data, "k1", tmp_path / "cache")
    assert (path / "meta.json").is_file() and unpack_checkpoint(data, "k1", tmp_path / "cache") == path
    with pytest.raises(CheckpointError, match="no checkpoint at this path"):
        fetch_checkpoint(VersionSpec("b", str(src)), tmp_path / "cache")
    with pytest.raises(ConfigError, match="shared storage"):
        pack_checkpoint(ckpts["b"], max_bytes=10)
    # a truncated copy: a CheckpointError naming the key, and nothing left in the cache
    cache = tmp_path / "cache2"
    with pytest.raises(CheckpointError, match="k2"):
        unpack_checkpoint(data[: len(data) // 2], "k2", cache)
    assert not cache.exists() or not any(cache.rglob("*partial*")), list(cache.rglob("*"))


def test_replicas_starting_together_copy_a_uri_once_per_node(ckpts, tmp_path, monkeypatch):
    """Replicas of one node that started together each copied the whole checkpoint from its URI (N copies of the
    download and, meanwhile, of the disk), though the cache is meant to copy it once per node."""
    from concurrent.futures import ThreadPoolExecutor

    from pyarrow import fs as pafs

    copies: list[str] = []
    real_copy = pafs.copy_files

    def slow_copy(*args, **kwargs):
        copies.append(args[0])
        time.sleep(0.5)  # a large download
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", slow_copy)
    uri = f"file://{ckpts['a']}"
    with ThreadPoolExecutor(4) as pool:  # four replicas' loader threads (the lock is per open file: as processes)
        paths = list(pool.map(lambda _: fetch_checkpoint(VersionSpec("a", uri), tmp_path / "cache"), range(4)))
    assert len(set(paths)) == 1 and (paths[0] / "meta.json").is_file()
    assert len(copies) == 1, copies


def test_a_shipped_checkpoint_already_on_the_node_is_not_pulled_again(ckpts, tmp_path, monkeypatch):
    """A replica pulled the whole shipped pack (up to 2 GiB) from the object store before looking in its node's
    cache: every replica of a node read it into memory again, and one restarted after the driver had gone
    (``OwnerDiedError``) failed although its node held the unpacked copy."""
    import ray

    src = tmp_path / "driver" / "a"
    shutil.copytree(ckpts["a"], src)
    packed = pack_checkpoint(src)
    shutil.rmtree(src)  # not on this node

    class Ref:  # what ray.put returned on the driver
        def hex(self) -> str:
            return "cd" * 14

    pulls: list[int] = []
    monkeypatch.setattr(ray, "get", lambda ref: (pulls.append(1), packed)[1])
    spec = VersionSpec("a", str(src), shipped=Ref())
    first = fetch_checkpoint(spec, tmp_path / "cache")
    assert pulls == [1] and (first / "meta.json").is_file()

    def gone(ref):
        raise RuntimeError("OwnerDiedError: the owner of this object (the rlchat serve driver) has died")

    monkeypatch.setattr(ray, "get", gone)  # the driver exited; this node's copy is still there
    assert fetch_checkpoint(spec, tmp_path / "cache") == first


def test_the_node_cache_keeps_the_recently_used_copies_and_evicts_the_rest(ckpts, tmp_path):
    """Each deploy of a URI or shipped checkpoint adds a copy on every node (a followed run: one per new best step);
    without eviction the node's disk fills. The ``keep`` most recently used copies stay, and any copy used in the
    last ``grace_s`` (another replica on the node may be loading it), and copies a crashed fetch left half-written
    go once they are old."""
    cache = tmp_path / "cache"
    hour_ago = time.time() - 3600
    paths = []
    for i in range(5):
        src = tmp_path / f"src{i}"
        shutil.copytree(ckpts["a"], src)
        paths.append(fetch_checkpoint(VersionSpec("v", f"file://{src}"), cache, keep=2))
        os.utime(paths[-1], (hour_ago + i, hour_ago + i))  # used an hour ago, in this order

    def entries() -> list[str]:  # what the cache holds but its fill lock (a file beside the copies)
        return sorted(p.name for p in cache.iterdir() if p.name != ".rlchat-fill.lock")

    kept = entries()
    assert kept == sorted(p.name for p in paths[-2:]), kept  # the two most recently used
    # using an older copy again makes it recent: the next fetch evicts the other one
    again = fetch_checkpoint(VersionSpec("v", f"file://{tmp_path}/src3"), cache, keep=2)
    assert again == paths[3] and (again / "meta.json").is_file()
    os.utime(again, (hour_ago + 10, hour_ago + 10))
    src = tmp_path / "src5"
    shutil.copytree(ckpts["a"], src)
    newest = fetch_checkpoint(VersionSpec("v", f"file://{src}"), cache, keep=2)
    assert entries() == sorted([paths[3].name, newest.name])
    # an evicted copy is fetched again when it is asked for
    os.utime(newest, (hour_ago + 11, hour_ago + 11))
    back = fetch_checkpoint(VersionSpec("v", f"file://{tmp_path}/src0"), cache, keep=2)
    assert back == paths[0] and (back / "meta.json").is_file()
    assert entries() == sorted([newest.name, back.name])
    os.utime(newest, (time.time(), time.time()))  # as if another replica had just loaded it
    # a copy used within the grace period stays whatever keep says; a half-written copy goes once it is old
    stale = cache / ".0123456789abcdef0123.partial-1-deadbeef"
    fresh = cache / ".4567456789abcdef0123.partial-2-cafebabe"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (hour_ago - 7 * 3600, hour_ago - 7 * 3600))  # a fetch that died 8 hours ago
    data = pack_checkpoint(ckpts["b"])
    shipped = unpack_checkpoint(data, "k1", cache, keep=1)
    left = {p.name for p in cache.iterdir()}
    assert shipped.name in left and back.name in left and newest.name in left  # all used in the last minutes
    assert fresh.name in left and stale.name not in left
    # keep=0: nothing is evicted
    for entry in cache.iterdir():
        os.utime(entry, (hour_ago, hour_ago))
    unpack_checkpoint(data, "k2", cache, keep=0)
    assert {shipped.name, back.name, newest.name} <= {p.name for p in cache.iterdir()}
    # the cache directory is the user's to choose: anything in it that is not a copy of ours is never touched
    shared = tmp_path / "models"
    (shared / "my-llama-70b").mkdir(parents=True)
    (shared / "my-llama-70b" / "weights.bin").write_text("precious")
    (shared / "notes.txt").write_text("precious")
    (shared / ".hidden-thing.partial-1-x").mkdir()  # looks half-written, but is not one of ours
    for p in shared.iterdir():
        os.utime(p, (hour_ago - 7 * 3600, hour_ago - 7 * 3600))
    for key in ("k3", "k4"):
        unpack_checkpoint(data, key, shared, keep=1)
        for p in shared.iterdir():
            os.utime(p, (hour_ago, hour_ago))
    left = sorted(p.name for p in shared.iterdir())
    assert {"my-llama-70b", "notes.txt", ".hidden-thing.partial-1-x"} <= set(left), left
    assert (shared / "my-llama-70b" / "weights.bin").read_text() == "precious"
    assert len([n for n in left if not n.startswith((".", "my-", "notes"))]) == 1, left  # k3's copy was evicted


# --------------------------------------------------------------------------------------------------------------
# On Serve
# --------------------------------------------------------------------------------------------------------------


def _chat(url: str, model: str | None = None, timeout: float = 60) -> requests.Response:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1}
    if model is not None:
        body["model"] = model
    return requests.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=timeout)


class _Load:
    """Background clients that chat with ``url`` until stopped, recording every status (and the version that
    answered)."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url = url
        self.stop = threading.Event()
        self.results: list[tuple[int, str]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                r = _chat(self.url)
                self.results.append((r.status_code, r.headers.get(VERSION_HEADER, "")))
            except requests.RequestException as e:
                self.results.append((-1, repr(e)))

    def __enter__(self) -> _Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def _deploy_config(name: str, route: str, ckpt: Path, versions: list[dict[str, Any]]) -> None:
    """What ``serve deploy config.yaml`` does (the controller's apply_config), for one app whose only change between
    calls is the deployment's ``user_config``: a lightweight update, applied by ``ChatServer.reconfigure``."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = {
        "name": name,
        "route_prefix": route,
        "import_path": "serve.app:build_app",
        "args": {
            "checkpoint": str(ckpt),
            "api_key": KEY,
            "num_cpus": 0,
            "max_batch_size": 4,
            "feedback_store": f"sqlite:///{ckpt.parent / 'fb.db'}",
            "model_name": "chat",
        },
        "deployments": [{"name": "ChatServer", "user_config": {"versions": versions}}],
    }
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))


def _wait_versions(url: str, want: dict[str, float], timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            info = testing.wait_ready(url, timeout_s=max(1.0, deadline - time.monotonic()), api_key=KEY)
        except TimeoutError:
            break
        if {v["name"]: v.get("weight") for v in info.get("versions", [])} == want:
            return info
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not reach versions {want}: {info.get('versions')}")


def _check_version_metrics(ray: Any, replies: dict[str, int]) -> None:
    """The ``chat`` app's Prometheus series, summed by ``version``, count each version's own replies; series no
    request has touched yet exist at 0 (the rejections), so a dashboard's expressions are never empty."""

    def by_version(samples: dict, name: str, **labels: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for lab, v in samples.get(name, ()):
            if lab.get("model") == "chat" and all(lab.get(k) == x for k, x in labels.items()):
                out[lab.get("version", "")] = out.get(lab.get("version", ""), 0) + v
        return out

    deadline = time.monotonic() + 45  # Ray's agent exports what replicas recorded every few seconds
    while True:
        samples = testing.scrape_metrics(ray)
        ok = by_version(samples, "ray_rlchat_serve_responses_total", code="200") == replies
        ok = ok and by_version(samples, "ray_rlchat_serve_ttft_seconds_count") == replies
        if ok or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert by_version(samples, "ray_rlchat_serve_responses_total", code="200") == replies
    assert by_version(samples, "ray_rlchat_serve_ttft_seconds_count") == replies
    tokens = by_version(samples, "ray_rlchat_serve_generated_tokens_total")
    assert all(tokens.get(v, 0) >= n for v, n in replies.items()), tokens  # a reply has a token at least
    for name in ("ray_rlchat_serve_batch_rows_count", "ray_rlchat_serve_step_seconds_count"):
        assert set(replies) <= set(by_version(samples, name)), (name, by_version(samples, name))
    assert set(replies) <= set(by_version(samples, "ray_rlchat_serve_queue_depth"))
    # the unknown model's 404 has no version; nothing was shed, and both reasons' series exist at 0
    assert by_version(samples, "ray_rlchat_serve_responses_total", code="404") == {"": 1}
    assert by_version(samples, "ray_rlchat_serve_rejected_requests_total", reason="overloaded") == {"": 0}
    queue_timeout = by_version(samples, "ray_rlchat_serve_rejected_requests_total", reason="queue_timeout")
    assert {v: queue_timeout.get(v) for v in replies} == dict.fromkeys(replies, 0), queue_timeout


def test_canary_split_explicit_pick_promote_and_roll_back_without_dropping_requests(ray_local, ckpts):
    from ray import serve as ray_serve

    port = testing.start_serve()
    url = f"http://127.0.0.1:{port}/versions"
    a, b = str(ckpts["a"]), str(ckpts["b"])
    canary = [{"name": "stable", "checkpoint": a, "weight": 90}, {"name": "canary", "checkpoint": b, "weight": 10}]
    try:
        _deploy_config("rlchat-versions", "/versions", ckpts["a"], canary)
        info = _wait_versions(url, {"stable": 90.0, "canary": 10.0})
        pid = info["pid"]
        assert {v["name"]: v["step"] for v in info["versions"]} == {"stable": 100, "canary": 200}

        # /v1/models: the alias plus both versions
        cards = {c["id"]: c for c in requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["data"]}
        assert set(cards) == {"chat", "stable", "canary"}
        assert (cards["canary"]["parent"], cards["canary"]["weight"], cards["canary"]["step"]) == ("chat", 10, 200)

        # the alias (or no model) splits 90/10, reported in the body and a header; a name picks its version
        served = []
        for i in range(20):
            r = _chat(url, None if i % 2 else "chat")
            assert r.status_code == 200, r.text
            assert r.json()["model"] == r.headers[VERSION_HEADER]
            served.append(r.headers[VERSION_HEADER])
        assert Counter(served) == {"stable": 18, "canary": 2}
        for name in ("canary", "stable"):
            r = _chat(url, name)
            assert r.status_code == 200 and r.json()["model"] == name
        assert _chat(url, "nope").status_code == 404
        # a rating is counted for the version that wrote the reply (the A/B read-out of `rlchat feedback stats`)
        labels = {}
        for name in ("canary", "stable"):
            cid = _chat(url, name).json()["id"]
            fb = {"completion_id": cid, "rating": "up"}
            assert requests.post(f"{url}/v1/feedback", json=fb, headers=AUTH, timeout=30).status_code == 200
            labels[name] = cid
        store = FeedbackStore(f"sqlite:///{ckpts['a'].parent / 'fb.db'}")
        rated = {r["request_id"]: r["model_version"] for r in store.rows("ratings")}
        store.close()
        # each version's label is its name and its checkpoint's (``<version>/<run>/<checkpoint dir>``: here the
        # directory alone)
        expected = {labels["canary"]: f"canary/{ckpts['b'].name}", labels["stable"]: f"stable/{ckpts['a'].name}"}
        assert rated == expected, rated

        # the metrics tell the versions apart (the ``version`` tag): 20 replies from stable, 4 from the canary
        _check_version_metrics(ray_local, {"stable": 20, "canary": 4})

        # promote (0/100), then roll back (100, canary removed), under load: no request fails, no replica restarts
        with _Load(url) as load:
            time.sleep(1.0)
            promoted = [dict(canary[0], weight=0), dict(canary[1], weight=100)]
            _deploy_config("rlchat-versions", "/versions", ckpts["a"], promoted)
            info = _wait_versions(url, {"stable": 0.0, "canary": 100.0})
            n = len(load.results)
            time.sleep(1.5)
            after_promote = [v for _, v in load.results[n + 3 :]]  # requests that started after the swap
            _deploy_config("rlchat-versions", "/versions", ckpts["a"], [dict(canary[0], weight=100)])
            info = _wait_versions(url, {"stable": 100.0})
            time.sleep(1.5)
        statuses = Counter(s for s, _ in load.results)
        assert set(statuses) == {200}, (statuses, [r for r in load.results if r[0] != 200][:5])
        assert len(load.results) >= 6
        assert after_promote and set(after_promote) == {"canary"}, after_promote
        assert info["pid"] == pid  # reconfigured in place, never restarted
        assert {v["name"] for v in info["versions"]} == {"stable"}
        assert _chat(url, "canary").status_code == 404
        r = _chat(url)
        assert r.status_code == 200 and r.headers[VERSION_HEADER] == "stable"
    finally:
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        _get_global_client().deploy_apps(ServeDeploySchema(applications=[]))  # deletes this declarative app only
        deadline = time.monotonic() + 60
        while "rlchat-versions" in ray_serve.status().applications and time.monotonic() < deadline:
            time.sleep(0.5)


def test_follow_swaps_to_each_new_best_checkpoint_while_requests_keep_working(ray_local, ckpts, tmp_path):
    from ray import serve as ray_serve

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts["a"], run / "checkpoints" / "step_000100")
    from serve.app import build_app

    port = testing.start_serve()
    args = {
        "from_run": str(run),
        "follow": True,
        "follow_interval_s": 0.5,
        "api_key": KEY,
        "num_cpus": 0,
        "max_batch_size": 4,
        "feedback_store": f"sqlite:///{tmp_path / 'fb.db'}",
    }
    ray_serve.run(build_app(args), name="rlchat-follow", route_prefix="/follow")
    url = f"http://127.0.0.1:{port}/follow"
    try:
        info = testing.wait_ready(url, api_key=KEY)
        assert info["step"] == 100 and info["follow"]
        pid = info["pid"]
        with _Load(url, clients=2) as load:
            time.sleep(1.0)
            # the trainer's layout: written under a temporary name, then renamed into place
            tmp = run / "checkpoints" / f".step_000200.partial-{os.getpid()}-x"
            shutil.copytree(ckpts["b"], tmp)
            tmp.rename(run / "checkpoints" / "step_000200")
            deadline = time.monotonic() + 60
            while (info := testing.wait_ready(url, api_key=KEY))["step"] != 200:
                assert time.monotonic() < deadline, info
                time.sleep(0.3)
            time.sleep(1.0)
        assert set(s for s, _ in load.results) == {200}, Counter(s for s, _ in load.results)
        assert info["pid"] == pid and info["checkpoint"].endswith("step_000200")
        card = requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["data"][0]
        assert card["step"] == 200
        assert _chat(url).status_code == 200
    finally:
        ray_serve.delete("rlchat-follow")


def test_a_finished_stream_does_not_keep_its_version_in_memory():
    """``sse_starlette`` starts a watcher task, which never ends, on the first stream of each event loop's thread;
    it copies that request's context, and the context held the request's version: a version swapped out (say the
    first checkpoint ``--follow`` served, on a GPU) was never freed. The binding now ends with the request."""
    import asyncio
    import gc
    import weakref

    from sse_starlette.sse import EventSourceResponse

    from serve.models import VersionScope, use_version

    class Version:
        name = "old"

    held = [Version()]
    ref = weakref.ref(held[0])

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        use_version(held[0])  # as the route does (ChatServer._check_model)

        async def events() -> Any:
            yield {"data": "x"}

        await EventSourceResponse(events())(scope, receive, send)

    async def main() -> tuple[list[bytes], bool]:
        sent: list[bytes] = []

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message.get("body", b""))

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "http_version": "1.1"}
        await VersionScope(inner)(scope, receive, send)
        held.clear()  # the version leaves the table and is closed
        gc.collect()
        return sent, ref() is not None  # while the loop, and the watcher, still run

    result: list[Any] = []
    # a thread of its own: sse_starlette starts one watcher per thread, on that thread's first stream
    t = threading.Thread(target=lambda: result.append(asyncio.run(main())))
    t.start()
    t.join(30)
    sent, alive = result[0]
    assert b"data: x" in b"".join(sent)
    assert not alive, "the finished request's context still holds its version"


def test_a_config_update_that_cannot_load_keeps_the_running_replica_serving(ckpts, no_replica_context):
    """A ``user_config`` update whose version cannot load raised from ``reconfigure``: Ray Serve then stopped the
    running replica, and its replacements failed on the same config, so one bad path took the whole app down
    (every request a 503). A replica that is serving now keeps its set and reports the error in ``/readyz``; at
    start-up (before Serve's first health check) a bad config still fails the replica, so a bad deploy is seen."""
    import asyncio
    import json as jsonlib

    route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    good = {"name": "stable", "checkpoint": str(ckpts["a"]), "weight": 90}
    bad_configs = [
        {"versions": [good, {"name": "canary", "checkpoint": str(ckpts["a"].parent / "nope"), "weight": 10}]},
        {"versions": [{**good, "weight": 0}]},
    ]

    async def main() -> None:
        fresh = await testing.inprocess_server(ckpts["a"], engine_process=False)
        try:
            with pytest.raises((CheckpointError, ConfigError)):  # start-up: the replica fails, the deploy is seen
                await fresh.reconfigure(bad_configs[0])
        finally:
            fresh.models.default.close()
        server = await testing.inprocess_server(ckpts["a"], engine_process=False, api_key="k")
        operator = {"Authorization": "Bearer k"}
        try:
            await server.reconfigure({"versions": [good]})
            server.check_health()  # Serve's health checks have begun: the replica is serving
            observers = len(server.metrics._queued)  # noqa: SLF001
            for bad in bad_configs:
                await server.reconfigure(bad)  # no exception: Serve would stop this replica
                await server.applied()  # a serving replica applies updates in the background
                assert server.models.names() == ["stable"]
                reply = await server.chat_completions(testing.post_request(route, body, operator))
                assert reply.status_code == 200
                ready = jsonlib.loads((await server.readyz(testing.post_request("/readyz", {}, operator))).body)
                assert ready["status"] == "ready" and "user_config.versions" in ready["last_update_error"]["error"]
                assert len(server.metrics._queued) == observers  # noqa: SLF001 - a failed load's observer is closed
                # a client without the key learns that an update was refused, not the paths in its error
                stranger = jsonlib.loads((await server.readyz(testing.post_request("/readyz", {}))).body)
                assert stranger["last_update_error"]["at"] == ready["last_update_error"]["at"]
                assert str(ckpts["a"].parent) not in jsonlib.dumps(stranger), stranger
            await server.reconfigure({"versions": [{**good, "weight": 50}]})  # a good update clears it
            await server.applied()  # a serving replica applies updates in the background
            ready = jsonlib.loads((await server.readyz(testing.post_request("/readyz", {}, operator))).body)
            assert "last_update_error" not in ready
        finally:
            for v in server.models.versions.values():
                v.close()

    asyncio.run(main())


def test_a_config_update_loads_in_the_background_while_the_current_set_serves(ckpts, no_replica_context):
    """Serve routes no new request to a replica until ``reconfigure`` returns, and ``reconfigure`` loaded the new
    versions first: adding a canary held back every request for the whole load (5-6 s for a tiny model, minutes for
    a real one). A serving replica now takes the update and loads it in the background; the current set answers
    meanwhile, ``/readyz`` says ``update_pending``, and the newest of several updates wins."""
    import asyncio
    import json as jsonlib
    import time

    route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    stable = {"name": "stable", "checkpoint": str(ckpts["a"]), "weight": 90}
    canary = {"name": "canary", "checkpoint": str(ckpts["b"]), "weight": 10}

    async def main() -> None:
        server = await testing.inprocess_server(ckpts["a"], engine_process=False)
        try:
            await server.reconfigure({"versions": [stable]})  # start-up: loaded before the replica serves
            server.check_health()
            load = server._load_version  # noqa: SLF001

            def slow_load(spec):
                time.sleep(1.5)
                return load(spec)

            server._load_version = slow_load  # noqa: SLF001 - a large checkpoint's load
            t = time.perf_counter()
            await server.reconfigure({"versions": [stable, {**canary, "weight": 5}]})
            await server.reconfigure({"versions": [stable, canary]})  # arrives while the first loads: it wins
            assert time.perf_counter() - t < 0.5
            reply = await server.chat_completions(testing.post_request(route, body))
            assert reply.status_code == 200 and reply.headers["x-rlchat-model"] == "stable"
            ready = jsonlib.loads((await server.readyz(testing.post_request("/readyz", {}))).body)
            assert ready["update_pending"] is True and [v["name"] for v in ready["versions"]] == ["stable"]
            await server.applied()
            ready = jsonlib.loads((await server.readyz(testing.post_request("/readyz", {}))).body)
            assert "update_pending" not in ready and "last_update_error" not in ready
            assert {v["name"]: v["weight"] for v in ready["versions"]} == {"stable": 90.0, "canary": 10.0}
        finally:
            for v in server.models.versions.values():
                v.close()

    asyncio.run(main())


def test_versions_from_a_config_update_label_their_feedback_rows_with_their_name(ckpts):
    """Feedback rows are labelled ``<version>/<run>/<checkpoint>`` so ``rlchat feedback stats`` compares a canary
    with stable; versions added by the documented promote path (``user_config``, the app's args a plain checkpoint)
    were labelled without their name, and with ``serve.model_version`` set every version had that one label."""
    import asyncio

    from serve.settings import default_model_version

    async def main() -> None:
        for model_version, expect in (("", default_model_version), ("prod-v1", lambda _: "prod-v1")):
            server = await testing.inprocess_server(ckpts["a"], engine_process=False, model_version=model_version)
            try:
                await server.reconfigure(
                    {
                        "versions": [
                            {"name": "stable", "checkpoint": str(ckpts["a"]), "weight": 90},
                            {"name": "canary", "checkpoint": str(ckpts["b"]), "weight": 10},
                        ]
                    }
                )
                labels = {n: v.label for n, v in server.models.versions.items()}
                assert labels == {
                    "stable": f"stable/{expect(ckpts['a'])}",
                    "canary": f"canary/{expect(ckpts['b'])}",
                }, labels
            finally:
                for v in [*server.models.versions.values(), *server.models.draining]:
                    v.close()

    asyncio.run(main())


def test_a_replica_started_later_in_a_followed_run_loads_the_runs_best_checkpoint_now(ckpts, tmp_path):
    """``--follow``: the driver resolves the run's best checkpoint once, at deploy; a replica started later (a
    crash restart, a scale-up) loaded that path, which the trainer may have pruned by then: it failed to start
    with a message about shared storage. It now loads the run's best checkpoint as of its own start."""
    import asyncio

    from serve.settings import resolve_settings

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts["a"], run / "checkpoints" / "step_000100")
    settings = resolve_settings({"from_run": str(run), "follow": True, "num_cpus": 1, "engine_process": False})
    shutil.copytree(ckpts["b"], run / "checkpoints" / "step_000200")  # the trainer's next best...
    shutil.rmtree(run / "checkpoints" / "step_000100")  # ...and it pruned the old one

    async def main() -> None:
        from serve.app import ChatServer

        cls = ChatServer.func_or_class
        server = cls.__new__(cls)
        await cls.__init__(server, settings)
        try:
            assert server.models.default.checkpoint.step == 200
        finally:
            if server._follower is not None:  # noqa: SLF001
                server._follower.cancel()  # noqa: SLF001
            server.models.default.close()

    asyncio.run(main())


def test_a_versions_update_on_a_followed_run_is_refused_not_undone_later(ckpts, tmp_path, no_replica_context):
    """``serve.follow`` serves one version, the run's best: a ``user_config`` update naming versions was applied
    and then undone, silently, by the follower's next tick. It is refused now, and ``/readyz`` says why.
    (Found by review.)"""
    import asyncio

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts["a"], run / "checkpoints" / "step_000100")

    async def main() -> tuple[list[str], dict]:
        server = await testing.inprocess_server(
            None, engine_process=False, from_run=str(run), follow=True, follow_interval_s=0.05
        )
        try:
            server.check_health()  # serving: the follower runs, updates apply in the background
            pinned = {"name": "pinned", "checkpoint": str(ckpts["b"]), "weight": 1}
            await server.reconfigure({"versions": [pinned]})
            await server.applied()
            await asyncio.sleep(0.3)  # a few of the follower's ticks
            ready = json.loads((await server.readyz(testing.post_request("/readyz", {}))).body)
            return server.models.names(), ready
        finally:
            if server._follower is not None:  # noqa: SLF001
                server._follower.cancel()  # noqa: SLF001
            for v in [*server.models.versions.values(), *server.models.draining]:
                v.close()

    names, ready = asyncio.run(main())
    assert names == ["rlchat"]
    assert "follow" in ready["last_update_error"]["error"], ready


def test_follow_tries_a_best_checkpoint_that_failed_to_load_again_only_once_it_changes(ckpts, tmp_path, caplog):
    """A best checkpoint that fails to load (corrupt weights) was loaded again at every tick, for as long as it
    stayed the run's best: with ``serve.engine_process`` each try started an engine process that spent ~6 s of CPU
    failing, and "loading it" was logged at every tick. It is tried again once its files change, or after a
    backoff that doubles (the cause may pass: memory, a slow file system)."""
    import asyncio
    import logging

    from serve.models import follow_run
    from serve.models import logger as models_logger

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts["a"], run / "checkpoints" / "step_000100")
    shutil.copytree(ckpts["b"], run / "checkpoints" / "step_000200")
    current = run / "checkpoints" / "step_000100"
    tries: list[Path] = []

    async def swap(path: Path) -> None:
        tries.append(path)
        raise CheckpointError(f"{path}: model weights are truncated")

    async def until(n: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(tries) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def main() -> None:
        task = asyncio.create_task(follow_run(str(run), 0.01, lambda: current, swap))
        await until(1)
        await asyncio.sleep(0.5)  # 50 ticks: none tries it again (the default backoff is 60 s)
        assert len(tries) == 1, len(tries)
        (run / "checkpoints" / "step_000200" / "extra.txt").write_text("rewritten")  # the trainer rewrote it
        await until(2)
        assert len(tries) == 2, len(tries)
        task.cancel()
        # unchanged files are tried again after the backoff, which doubles (the cause may have passed)
        tries.clear()
        task = asyncio.create_task(follow_run(str(run), 0.01, lambda: current, swap, retry_s=0.2))
        t0 = time.monotonic()
        await until(3)
        task.cancel()
        assert len(tries) == 3 and time.monotonic() - t0 >= 0.6 - 0.05, (len(tries), time.monotonic() - t0)

    with caplog.at_level(logging.INFO, logger=models_logger.name):
        asyncio.run(main())
    assert sum("loading it" in r.getMessage() for r in caplog.records) == 5
    assert "retrying every 0.01 s" in caplog.text  # was "every 0 s"


def test_a_config_update_naming_a_loaded_checkpoint_reuses_its_model(ckpts, monkeypatch):
    """A replica started from the docs' YAML loads the app's checkpoint as the alias's version, then Serve's first
    ``reconfigure`` names that same checkpoint ``stable`` beside a ``canary``: it was loaded a second time (three
    models resident until the first drained, on every replica start: on a GPU, a second copy of a large model). A
    renamed version loaded it again too. A loaded checkpoint under a new name now reuses its engine and scheduler;
    the old name drains without closing them."""
    import asyncio

    import serve.models as models_module

    loads: list[str] = []
    monkeypatch.setattr(models_module, "DRAIN_GRACE_S", 0.0)
    route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def main() -> None:
        server = await testing.inprocess_server(ckpts["a"], engine_process=False)
        real_load = server._load_version  # noqa: SLF001

        def counting_load(spec: VersionSpec) -> Any:
            loads.append(spec.name)
            return real_load(spec)

        server._load_version = counting_load  # noqa: SLF001
        try:
            engine = server.models.default.engine
            await server.reconfigure(
                {
                    "versions": [
                        {"name": "stable", "checkpoint": str(ckpts["a"]), "weight": 90},
                        {"name": "canary", "checkpoint": str(ckpts["b"]), "weight": 10},
                    ]
                }
            )
            assert loads == ["canary"], loads  # not the app's own checkpoint again
            assert server.models.versions["stable"].engine is engine
            # an update that would rename one version but cannot load another changes nothing: the version it would
            # have handed over still owns its model and reports under its name
            server.check_health()  # serving: a bad update is refused, not raised
            bad = {"name": "broken", "checkpoint": str(ckpts["a"].parent / "nope"), "weight": 1}
            await server.reconfigure({"versions": [{"name": "prod", "checkpoint": str(ckpts["b"]), "weight": 1}, bad]})
            await server.applied()  # a serving replica applies updates in the background
            assert set(server.models.names()) == {"stable", "canary"} and loads == ["canary", "broken"]
            canary = server.models.versions["canary"]
            assert canary.owns_scheduler and canary.observer is not None and canary.observer.version == "canary"
            await server.reconfigure({"versions": [{"name": "prod", "checkpoint": str(ckpts["b"]), "weight": 1}]})
            await server.applied()  # a serving replica applies updates in the background
            assert loads == ["canary", "broken"], loads  # renamed, not reloaded
            for _ in range(100):  # the old names drain (no request in flight) and are closed
                if not server.models.draining:
                    break
                await asyncio.sleep(0.05)
            assert not server.models.draining
            reply = await server.chat_completions(testing.post_request(route, {**body, "model": "prod"}))
            assert reply.status_code == 200 and server.models.versions["prod"].alive
            assert server.models.versions["prod"].label.startswith("prod/")
        finally:
            for v in server.models.versions.values():
                v.close()

    asyncio.run(main())


def test_a_rollback_right_after_a_promote_lets_the_canarys_requests_finish(ckpts, monkeypatch):
    """Promote hands the canary's scheduler to the new ``stable`` (no second copy of the model); a rollback right
    after drains that ``stable``. Its drain waited only for its own requests, so a request that had started on the
    canary before the promote lost its scheduler mid-reply. It now waits for every request on the scheduler.
    (Found by review.)"""
    import asyncio
    import time

    import serve.models as models_module

    monkeypatch.setattr(models_module, "DRAIN_GRACE_S", 0.0)
    a, b = str(ckpts["a"]), str(ckpts["b"])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "model": "canary", "seed": 1}

    async def main() -> Any:
        server = await testing.inprocess_server(ckpts["a"], engine_process=False)
        try:
            await server.reconfigure(
                {"versions": [{"name": "stable", "checkpoint": a, "weight": 90}, {"name": "canary", "checkpoint": b}]}
            )
            server.check_health()  # serving: updates apply in the background
            batch = server.models.versions["canary"].scheduler._run.batch  # noqa: SLF001
            fast = batch.step
            batch.step = lambda *args: (time.sleep(0.03), fast(*args))[1]  # ~1.2 s of steps
            reply = asyncio.ensure_future(server.chat_completions(testing.post_request("/v1/chat/completions", body)))
            while not server.models.versions["canary"].inflight:
                await asyncio.sleep(0.01)
            await server.reconfigure({"versions": [{"name": "stable", "checkpoint": b, "weight": 100}]})  # promote
            await server.applied()
            await server.reconfigure({"versions": [{"name": "stable", "checkpoint": a, "weight": 100}]})  # roll back
            await server.applied()
            return await asyncio.wait_for(reply, 60)
        finally:
            for v in [*server.models.versions.values(), *server.models.draining]:
                v.close()

    reply = asyncio.run(main())
    assert reply.status_code == 200, reply.body[:300]
    assert json.loads(reply.body)["usage"]["completion_tokens"] == 40


def test_retrieving_the_alias_card_leaves_the_canary_split_alone(ckpts):
    """``GET /v1/models/<a name of the alias>`` checked the name by picking a version, which takes a turn in the
    weighted split: a client that retrieves the model before each chat (50/50 weights) got the canary every time.
    (Found by review.)"""
    import asyncio

    from serve.settings import DEFAULT_MODEL_NAME

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

    async def main() -> Counter:
        server = await testing.inprocess_server(ckpts["a"], engine_process=False, model_name="mychat")
        try:
            versions = [
                {"name": "stable", "checkpoint": str(ckpts["a"]), "weight": 50},
                {"name": "canary", "checkpoint": str(ckpts["b"]), "weight": 50},
            ]
            await server.reconfigure({"versions": versions})
            served: Counter = Counter()
            for _ in range(10):
                card = await server.model(DEFAULT_MODEL_NAME, testing.post_request("/v1/models/x", {}))
                assert card["id"] == DEFAULT_MODEL_NAME
                reply = await server.chat_completions(testing.post_request("/v1/chat/completions", body))
                served[reply.headers[VERSION_HEADER.lower()]] += 1
            with pytest.raises(APIError) as unknown:
                await server.model("nope", testing.post_request("/v1/models/nope", {}))
            assert unknown.value.status == 404
            return served
        finally:
            for v in [*server.models.versions.values(), *server.models.draining]:
                v.close()

    assert asyncio.run(main()) == {"stable": 5, "canary": 5}


def test_a_rollback_to_the_apps_own_shipped_checkpoint_works_on_a_node_without_it(ckpts, tmp_path, monkeypatch):
    """On a multi-node cluster the driver ships the app's checkpoint through the object store; the documented
    rollback names it under ``stable``. Its shipped copy was looked up by (name, checkpoint), and the app's own
    name is the alias's, so the rollback looked for the driver's path on the replica's node and was refused.
    (Found by review; ``ray.get`` stands in for the object store, the driver's path is gone from this "node".)"""
    import asyncio
    import dataclasses

    import ray

    from serve.app import ChatServer
    from serve.settings import resolve_settings

    own = tmp_path / "driver" / "a"
    shutil.copytree(ckpts["a"], own)
    packed = pack_checkpoint(own)

    class Ref:  # what ray.put returned on the driver
        def hex(self) -> str:
            return "ab" * 14

    monkeypatch.setattr(ray, "get", lambda ref: packed)
    args = {"checkpoint": str(own), "num_cpus": 1, "engine_process": False, "checkpoint_cache": str(tmp_path / "c")}
    settings = dataclasses.replace(resolve_settings(args), shipped=Ref())
    shutil.rmtree(own.parent)  # not on this node
    stable = {"name": "stable", "checkpoint": str(own), "weight": 90}
    canary = {"name": "canary", "checkpoint": str(ckpts["b"]), "weight": 10}

    async def main() -> list[list[str]]:
        cls = ChatServer.func_or_class
        server = cls.__new__(cls)
        await cls.__init__(server, settings)
        seen = []
        try:
            for versions in ([stable, canary], [{**canary, "weight": 100}], [{**stable, "weight": 100}]):
                await server.reconfigure({"versions": versions})
                server.check_health()  # serving: later updates apply in the background
                await server.applied()
                assert server._update_error is None, server._update_error  # noqa: SLF001
                seen.append(sorted(server.models.names()))
            return seen
        finally:
            for v in [*server.models.versions.values(), *server.models.draining]:
                v.close()

    # canary 10%, promote, roll back to the app's own checkpoint
    assert asyncio.run(main()) == [["canary", "stable"], ["canary"], ["stable"]]


def test_a_drained_version_is_collected_though_the_replica_froze_its_heap(ckpts, monkeypatch):
    """The replica freezes its start-up heap (``serve/heap.py``: garbage collections skip it), and a version
    loaded at start is part of it. A frozen object in a garbage cycle is never collected: were a version's model
    caught in one, every swap (``--follow`` swaps at each new best checkpoint) would keep a model for the life of the
    replica. Reference counting frees it: nothing of a drained version is left once it has closed."""
    import asyncio
    import gc
    import weakref

    import serve.models as models_module

    monkeypatch.setattr(models_module, "DRAIN_GRACE_S", 0.0)

    async def main() -> tuple[bool, bool]:
        server = await testing.inprocess_server(ckpts["a"], engine_process=False)
        try:
            assert gc.get_freeze_count() > 0
            old = server.models.default
            version, model = weakref.ref(old), weakref.ref(old.engine.lm)
            del old
            await server.reconfigure({"versions": [{"name": "next", "checkpoint": str(ckpts["b"]), "weight": 1}]})
            for _ in range(200):  # drained, then closed (on a loader thread)
                await asyncio.sleep(0.05)
                gc.collect()  # a collection as the allocator would run one: it skips frozen objects
                if version() is None and model() is None:
                    break
            return version() is None, model() is None
        finally:
            for v in server.models.versions.values():
                v.close()

    version_gone, model_gone = asyncio.run(main())
    assert version_gone and model_gone, (version_gone, model_gone)


def test_a_version_still_loading_when_its_update_is_cancelled_is_closed_once_loaded():
    """The replica stopping cancels its follower or update while a version loads on the loader thread; the thread
    goes on and its version was left open (an engine process, and on a GPU its memory, until the process ended).
    (Found by review.)"""
    import asyncio

    class Closable(_FakeVersion):
        closed = False

        def close(self) -> None:
            self.closed = True

    made: list[Closable] = []

    def slow_load(spec: VersionSpec) -> Closable:
        time.sleep(0.3)
        made.append(Closable(spec.name, 1))
        return made[-1]

    async def main() -> None:
        models = ModelSet("rlchat")
        models.set([Closable("rlchat", 1)], {"rlchat": 1.0})  # type: ignore[list-item]
        task = asyncio.ensure_future(models.apply([VersionSpec("rlchat", "/ckpt/new")], slow_load))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(100):
            if made and made[0].closed:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert len(made) == 1 and made[0].closed


def test_a_replica_stopping_during_a_config_update_leaves_no_version_open(ckpts, no_replica_context):
    """Serve stops a replica (``__del__``) while a config update loads in the background: the update went on after
    the shutdown closed the served set, swapped its version in, and nothing closed it. (Found by review.)"""
    import asyncio

    async def main() -> list:
        server = await testing.inprocess_server(ckpts["a"], engine_process=False)
        server.check_health()  # serving: updates load in the background
        load = server._load_version  # noqa: SLF001
        server._load_version = lambda spec: (time.sleep(0.5), load(spec))[1]  # noqa: SLF001 - a load takes a while
        await server.reconfigure({"versions": [{"name": "canary", "checkpoint": str(ckpts["b"]), "weight": 1}]})
        await _app_del(server)
        await asyncio.sleep(1.0)  # the loader thread is done by now
        return [*server.models.versions.values(), *server.models.draining]

    versions = asyncio.run(main())
    assert versions and all(v.closed for v in versions), [(v.name, v.closed) for v in versions]


async def _app_del(server: Any) -> None:
    """The app's own ``__del__`` (Serve's ingress wrapper adds the ASGI app's shutdown, which needs Serve)."""
    own = next(c for c in type(server).__mro__ if c.__name__ == "ChatServer" and c is not type(server))
    await own.__del__(server)


def test_readyz_stats_count_every_versions_requests(ckpts, no_replica_context):
    """``/readyz`` ``stats`` (requests, errors, refused, batches) were the default version's scheduler counters: a
    canary's requests, refusals and failures were missing, so its errors did not show there at all. They are now
    the replica's, every version's schedulers summed (a scheduler shared by two versions counted once)."""
    import asyncio
    import json as jsonlib

    route = "/v1/chat/completions"
    body = {"model": "canary", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def main() -> None:
        server = await testing.inprocess_server(
            None,
            engine_process=False,
            versions=[
                {"name": "stable", "checkpoint": str(ckpts["a"]), "weight": 1},
                {"name": "canary", "checkpoint": str(ckpts["b"]), "weight": 0},
            ],
        )
        try:
            assert (await server.chat_completions(testing.post_request(route, body))).status_code == 200
            with pytest.raises(APIError):
                await server.chat_completions(testing.post_request(route, {**body, "max_tokens": 10**6}))
            stable = {**body, "model": "stable"}
            assert (await server.chat_completions(testing.post_request(route, stable))).status_code == 200
            ready = jsonlib.loads((await server.readyz(testing.post_request("/readyz", {}))).body)
            st = ready["stats"]
            assert (st["requests"], st["refused"], st["errors"]) == (2, 1, 0), st
            steps = sum(v.stats.batches for v in server.models.versions.values())
            assert st["batches"] == steps >= 2 and sum(st["batch_sizes"].values()) == st["batches"]
        finally:
            for v in server.models.versions.values():
                v.close()

    asyncio.run(main())
