"""Prometheus metrics of the chat endpoint, through Ray Serve's metrics API (:mod:`ray.serve.metrics`).

Each replica records into Ray's metrics agent on its node, which serves them in Prometheus text format on the
node's metrics export port (``ray start --metrics-export-port=8080``; ``ray.nodes()[i]["MetricsExportPort"]``).
Ray prefixes every name with ``ray_`` and gives counters a ``_total`` suffix; Serve adds the ``deployment``,
``replica`` and ``application`` tags, and every metric here carries ``model`` (the app's model name, the alias) and
``version`` (the served version that did the work: each version's scheduler reports through its own
:class:`VersionMetrics`, and the routes tag a request's samples with the version it was given; a single-version app's
one version is named after the app's model name). ``version`` is empty (absent in Prometheus) only where no version
was chosen yet: refusals at admission and responses refused before the request's model was looked up. The
metrics, their PromQL and a Grafana panel list are in docs/serving.md, "Metrics".

Two feeds:

- the routes (:mod:`serve.app`): time to first token and inter-token latency per request (:class:`RequestTimer`),
  one response per request by HTTP status (:meth:`ServeMetrics.response`), refusals by reason;
- the scheduler: each loaded version's scheduler gets its own :class:`VersionMetrics` observer
  (:meth:`ServeMetrics.for_version`; ``on_step`` after every decoding step, ``on_admit`` when jobs join the batch,
  ``on_queue`` when waiting jobs leave without a step, ``on_tokens`` for tokens generated outside the steps: first
  tokens from the prefill thread, beam searches) -> generated tokens, rows per step, step time, queue depth. The
  observer is closed with its version, so jobs a closed scheduler left waiting leave the queue depth.

Every recorder also keeps a plain running total (:attr:`ServeMetrics.totals`) that ``/readyz`` reports, so tests and
operators without Prometheus see the same numbers.

Recording is deferred: the hot paths (every decoding step, every delivered token) only append to a queue, and a
daemon thread (``rlchat-metrics``) passes the samples to Ray every :data:`FLUSH_INTERVAL_S`. Ray's ``record`` drops
the GIL around its C++ call, and a thread that drops the GIL while another runs Python waits up to the interpreter's
switch interval to get it back: on the event loop, ~20 samples per decoding step stalled every stream of the
replica (bench/README.md, "Serve load"). The flush thread waiting instead costs nobody.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

TTFT_SECONDS = "rlchat_serve_ttft_seconds"
INTER_TOKEN_SECONDS = "rlchat_serve_inter_token_seconds"
GENERATED_TOKENS = "rlchat_serve_generated_tokens"
BATCH_ROWS = "rlchat_serve_batch_rows"
STEP_SECONDS = "rlchat_serve_step_seconds"
QUEUE_DEPTH = "rlchat_serve_queue_depth"
ADMITTED_JOBS = "rlchat_serve_admitted_jobs"
REJECTED_REQUESTS = "rlchat_serve_rejected_requests"
DEADLINE_TRUNCATED = "rlchat_serve_deadline_truncated_requests"
RESPONSES = "rlchat_serve_responses"

REJECT_OVERLOADED = "overloaded"
"""Refused at the route: ``serve.max_queued_requests`` requests were already waiting (503)."""
REJECT_QUEUE_TIMEOUT = "queue_timeout"
"""Still waiting for the batch at its ``serve.request_timeout_s`` deadline (503)."""

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
"""Time-to-first-token buckets: from a warm batch-1 step to a long queue under the default 60 s deadline."""
TOKEN_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
"""Inter-token and step-time buckets: a tiny model's 1 ms step to a stalled one."""
ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
"""Rows per decoding step (powers of two up to large GPU batches)."""
logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.25
"""How often the ``rlchat-metrics`` thread passes queued samples to Ray (Ray's agent exports every few seconds)."""
GAUGE_REFRESH_S = 5.0
"""How often the ``rlchat-metrics`` thread sets the queue-depth gauges again though they did not change: Ray's
metrics agent drops a gauge series not reported within two export intervals, so an idle replica's depth (0) vanished
from Prometheus 15-20 s after its last change."""


def metrics_export_url() -> str | None:
    """Where Ray's metrics agent on this node serves the Prometheus text (its ``MetricsExportPort`` in
    ``ray.nodes()``: random unless ``ray start --metrics-export-port`` set it), or None; Ray must be initialised."""
    import ray

    here = ray.util.get_node_ip_address()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    node = next((n for n in nodes if n.get("NodeManagerAddress") == here), nodes[0] if nodes else None)
    return None if node is None else f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


class _Deferred:
    """A Ray metric whose ``observe`` / ``inc`` / ``set`` only queue the sample; :class:`_Flusher` records it."""

    def __init__(self, metric: Any, flusher: _Flusher) -> None:
        self.metric = metric
        self._put = flusher.queue.append

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._put((self.metric.observe, value, tags))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._put((self.metric.inc, value, tags))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._put((self.metric.set, value, tags))

    def touch(self, tags: dict[str, str] | None = None) -> None:
        """Create a counter's series at 0 (``inc`` refuses 0; Ray exports a series only once it was recorded), so
        PromQL over it is 0 rather than empty before its first event."""
        self._put((self.metric._record, 0.0, tags))  # noqa: SLF001 - the recording that inc does after its check


class _Flusher:
    """The daemon thread that records queued samples into Ray's metrics every :data:`FLUSH_INTERVAL_S`."""

    def __init__(self) -> None:
        self.queue: deque[tuple[Any, float, dict[str, str] | None]] = deque()
        self.refresh: Callable[[], None] | None = None
        """Called every :data:`GAUGE_REFRESH_S` to queue the gauges' current values again."""
        self._thread = threading.Thread(target=self._run, name="rlchat-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        refreshed = time.monotonic()
        while True:
            time.sleep(FLUSH_INTERVAL_S)
            if self.refresh is not None and time.monotonic() - refreshed >= GAUGE_REFRESH_S:
                refreshed = time.monotonic()
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - a metric must never take the replica down
                    logger.debug("refreshing the gauges failed", exc_info=True)
            self.flush()

    def flush(self) -> None:
        """Record every queued sample now (samples queued meanwhile by other threads are taken too)."""
        while self.queue:
            fn, value, tags = self.queue.popleft()
            try:
                fn(value, tags)
            except Exception:  # noqa: BLE001 - a metric must never take the replica down
                logger.debug("recording a metric sample failed", exc_info=True)


class ServeMetrics:
    """A replica's Prometheus metrics (created once per replica); :meth:`for_version` gives each version's scheduler
    its observer. The ``version`` arguments are the ``version`` tag (empty: no version known).

    Args:
        model: the app's model name (the ``model`` tag of every metric).
    """

    def __init__(self, model: str) -> None:
        from ray.serve import metrics

        self._flusher = _Flusher()

        def made(metric: Any) -> Any:
            # a fresh dict each time: Serve adds its deployment/replica tags to the dict it is given, in place
            metric.set_default_tags({"model": model, "version": ""})
            return _Deferred(metric, self._flusher)

        self.ttft = made(
            metrics.Histogram(
                TTFT_SECONDS,
                description="Seconds from a request's arrival at the replica to its first generated token.",
                boundaries=LATENCY_BUCKETS_S,
                tag_keys=("model", "version"),
            )
        )
        self.inter_token = made(
            metrics.Histogram(
                INTER_TOKEN_SECONDS,
                description="Seconds between consecutive generated tokens of one request (one sample per step).",
                boundaries=TOKEN_BUCKETS_S,
                tag_keys=("model", "version"),
            )
        )
        self.generated = made(
            metrics.Counter(
                GENERATED_TOKENS,
                description="Tokens generated by the replica's engine (cancelled and truncated rows included).",
                tag_keys=("model", "version"),
            )
        )
        self.batch_rows = made(
            metrics.Histogram(
                BATCH_ROWS,
                description="Rows (choices) in each decoding step of the replica's batch.",
                boundaries=ROW_BUCKETS,
                tag_keys=("model", "version"),
            )
        )
        self.step_seconds = made(
            metrics.Histogram(
                STEP_SECONDS,
                description="Seconds per decoding step of the replica's batch.",
                boundaries=TOKEN_BUCKETS_S,
                tag_keys=("model", "version"),
            )
        )
        self.queue_depth = made(
            metrics.Gauge(
                QUEUE_DEPTH,
                description="Requests waiting to join the replica's batch (as of the scheduler's latest change).",
                tag_keys=("model", "version"),
            )
        )
        self.admitted = made(
            metrics.Counter(
                ADMITTED_JOBS,
                description="Requests that joined the replica's running batch.",
                tag_keys=("model", "version"),
            )
        )
        self.rejected = made(
            metrics.Counter(
                REJECTED_REQUESTS,
                description="Requests refused with 503: reason overloaded (queue full) or queue_timeout (deadline).",
                tag_keys=("model", "version", "reason"),
            )
        )
        self.truncated = made(
            metrics.Counter(
                DEADLINE_TRUNCATED,
                description="Requests whose generation reached serve.request_timeout_s (ended with 'length').",
                tag_keys=("model", "version"),
            )
        )
        self.responses = made(
            metrics.Counter(
                RESPONSES,
                description="Completion requests answered, by HTTP status (499 = the client went away).",
                tag_keys=("model", "version", "code"),
            )
        )
        self._lock = threading.Lock()  # on_step may run on the generation thread, the rest on the event loop
        self._names: set[str] = set()  # versions whose series exist
        # Per scheduler (one observer per loaded version; two share a name while --follow or a changed source
        # swaps one in for another): a name's gauge and /readyz's queue_depth are sums over the open ones.
        self._queued: dict[VersionMetrics, int] = {}
        self.totals: dict[str, Any] = {
            "generated_tokens": 0,
            "steps": 0,
            "queue_depth": 0,
            "rejected": {},
            "deadline_truncated": 0,
            "responses": {},
        }
        self.rejected.touch({"reason": REJECT_OVERLOADED})  # refused at admission: before a version is chosen
        self._flusher.refresh = self.refresh_gauges

    def for_version(self, version: str) -> VersionMetrics:
        """A new observer for one loaded version's scheduler (its samples tagged ``version``); creates the
        version's queue-depth and ``queue_timeout`` series at 0 the first time the name is seen. Close it with the
        scheduler (:meth:`VersionMetrics.close`), so the jobs it still had waiting leave the queue depth."""
        observer = VersionMetrics(self, version)
        with self._lock:
            self._queued[observer] = 0
            self._first_seen(version)
        return observer

    def _first_seen(self, version: str) -> None:
        """(Under the lock.) A version name's queue-depth and ``queue_timeout`` series start at 0 when first seen."""
        if version not in self._names:
            self._names.add(version)
            self.rejected.touch({"reason": REJECT_QUEUE_TIMEOUT, "version": version})
            self.queue_depth.set(0, {"version": version})

    # ---------------------------------------------------------------------------------- scheduler observer
    def record_step(self, rows: int, seconds: float, version: str = "") -> None:
        """One decoding step of ``rows`` live rows (one token each) took ``seconds``."""
        tags = {"version": version}
        if rows > 0:
            self.generated.inc(rows, tags)
            self.batch_rows.observe(rows, tags)
        self.step_seconds.observe(seconds, tags)
        with self._lock:
            self.totals["generated_tokens"] += rows
            self.totals["steps"] += 1

    def on_admit(self, n_jobs: int, version: str = "") -> None:
        """``n_jobs`` requests joined the running batch."""
        if n_jobs > 0:
            self.admitted.inc(n_jobs, {"version": version})

    def on_tokens(self, n: int, version: str = "") -> None:
        """``n`` tokens generated outside the decoding steps (a first token from the prefill thread, a beam search)."""
        if n > 0:
            self.generated.inc(n, {"version": version})
            with self._lock:
                self.totals["generated_tokens"] += n

    def rename(self, observer: VersionMetrics, version: str) -> None:
        """Move ``observer`` (and the jobs it has waiting) from its version's name to ``version``."""
        with self._lock:
            old, observer.version = observer.version, version
            self._first_seen(version)
            for name in (old, version):
                total = sum(n for o, n in self._queued.items() if o.version == name)
                self.queue_depth.set(total, {"version": name})

    def set_queued(self, observer: VersionMetrics, queued: int | None) -> None:
        """``observer``'s scheduler has ``queued`` jobs waiting (None: it closed); sets its name's gauge to the
        sum over that name's open schedulers. A report from a closed one changes nothing."""
        with self._lock:
            if observer not in self._queued:
                return
            if queued is None:
                del self._queued[observer]
            else:
                self._queued[observer] = queued
            name_total = sum(n for o, n in self._queued.items() if o.version == observer.version)
            self.totals["queue_depth"] = sum(self._queued.values())
            # under the lock: two schedulers' reports must reach the gauge in the order their sums were taken
            self.queue_depth.set(name_total, {"version": observer.version})

    def refresh_gauges(self) -> None:
        """Set each open version's queue-depth gauge again (:data:`GAUGE_REFRESH_S`); a closed version's series
        (set to 0 when it closed) is left to age out."""
        with self._lock:
            totals: dict[str, int] = {}
            for observer, queued in self._queued.items():
                totals[observer.version] = totals.get(observer.version, 0) + queued
            for name, total in totals.items():
                self.queue_depth.set(total, {"version": name})

    # ---------------------------------------------------------------------------------- routes
    def response(self, code: int, version: str = "") -> None:
        """One completion request answered with HTTP ``code`` (in-band stream errors count as their status)."""
        self.responses.inc(1, tags={"version": version, "code": str(code)})
        with self._lock:
            self.totals["responses"][str(code)] = self.totals["responses"].get(str(code), 0) + 1

    def reject(self, reason: str, version: str = "") -> None:
        """A request refused under load (:data:`REJECT_OVERLOADED`, :data:`REJECT_QUEUE_TIMEOUT`)."""
        self.rejected.inc(1, tags={"version": version, "reason": reason})
        with self._lock:
            self.totals["rejected"][reason] = self.totals["rejected"].get(reason, 0) + 1

    def deadline_truncated(self, version: str = "") -> None:
        """A request's generation was ended by its deadline (finish reason ``length``)."""
        self.truncated.inc(1, {"version": version})
        with self._lock:
            self.totals["deadline_truncated"] += 1

    def snapshot(self) -> dict[str, Any]:
        """A copy of :attr:`totals` (``/readyz``'s ``load`` section)."""
        with self._lock:
            return {k: dict(v) if isinstance(v, dict) else v for k, v in self.totals.items()}

    def timer(self, t0: float, version: str = "") -> RequestTimer:
        """A :class:`RequestTimer` for a request that arrived at ``t0`` (``time.perf_counter()``), served by
        ``version``."""
        return RequestTimer(self, t0, version)


class VersionMetrics:
    """One version's scheduler observer (:class:`serve.batching.BatchObserver`): the replica's
    :class:`ServeMetrics`, its samples tagged with the version's name (:meth:`ServeMetrics.for_version`)."""

    def __init__(self, metrics: ServeMetrics, version: str) -> None:
        self.metrics = metrics
        self.version = version

    def on_step(self, rows: int, queued: int, seconds: float) -> None:
        self.metrics.record_step(rows, seconds, self.version)
        self.on_queue(queued)

    def on_admit(self, n_jobs: int) -> None:
        self.metrics.on_admit(n_jobs, self.version)

    def on_tokens(self, n: int) -> None:
        self.metrics.on_tokens(n, self.version)

    def on_queue(self, queued: int) -> None:
        self.metrics.set_queued(self, queued)

    def close(self) -> None:
        """The scheduler closed: the jobs it had waiting no longer count (its later reports are ignored)."""
        self.metrics.set_queued(self, None)

    def rename(self, version: str) -> None:
        """The scheduler now serves version ``version`` (a renamed version): its samples carry that tag."""
        self.metrics.rename(self, version)


class RequestTimer:
    """Time to first token and inter-token latency of one request, fed with each step's new-token count.

    Args:
        metrics: the replica's metrics.
        t0: when the request arrived (``time.perf_counter()``).
        version: the version serving the request (the samples' ``version`` tag).
    """

    def __init__(self, metrics: ServeMetrics, t0: float, version: str = "") -> None:
        self.metrics = metrics
        self.t0 = t0
        self.tags = {"version": version}
        self.last: float | None = None
        self.first_token_s: float | None = None

    def tokens(self, n_new: int, now: float, steps: int = 1) -> None:
        """``n_new`` tokens (over all choices) of ``steps`` decoding steps arrived at ``now`` (``perf_counter()``).

        Steps handed over together (a stream's tokens come once per chunk interval) count as ``steps`` inter-token
        samples of their mean gap, so the histogram keeps one sample per step of the request.
        """
        if n_new <= 0:
            return
        if self.last is None:
            self.first_token_s = now - self.t0
            self.metrics.ttft.observe(self.first_token_s, self.tags)
        else:
            steps = max(1, steps)
            gap = (now - self.last) / steps
            for _ in range(steps):
                self.metrics.inter_token.observe(gap, self.tags)
        self.last = now
