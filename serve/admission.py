"""A replica's admission control: how many completion requests it holds, and which are refused.

A request is admitted once its body is read and before it is parsed, and holds its place until it is over. Places
are bounded by a full batch plus ``serve.max_queued_requests``; beyond that a request is refused with a 503 and
``Retry-After`` (code ``overloaded``) before any generation work. Why the replica's own count and not the
scheduler's queue: a burst that arrives before any of it reaches the scheduler must still be bounded, and counting
only requests without a first token refused a burst from idle that the batch would have taken at once.
"""

from __future__ import annotations

import time

from rlchat.core.config import ServeConfig
from serve.metrics import REJECT_OVERLOADED, ServeMetrics
from serve.schemas import APIError
from serve.settings import OVERLOAD_RETRY_AFTER_S

STALE_WAITING_S = 300.0
"""Without a deadline (``serve.request_timeout_s: 0``), an admitted request holds its place for at most this long."""


class Admission:
    """One replica's places: :attr:`waiting` (admitted, no first token yet) and :attr:`generating` (first token out,
    not over yet), each request id -> when it was admitted (``time.monotonic()``).

    Args:
        cfg: the ``serve`` config (``max_batch_size``, ``max_queued_requests``, ``request_timeout_s``).
        metrics: counts the refusals (``rlchat_serve_rejections``).
    """

    def __init__(self, cfg: ServeConfig, metrics: ServeMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.waiting: dict[str, float] = {}
        self.generating: dict[str, float] = {}

    def admit(self, cid: str) -> None:
        """Admit a completion request, or refuse it (503 + ``Retry-After``, code ``overloaded``) when a full batch
        and ``serve.max_queued_requests`` more are already admitted: running + queued <= ``max_batch_size`` +
        ``max_queued_requests``. Runs at the route once the body is read (``ChatServer._body``: a slow
        upload must not hold a place) and before it is parsed, so a refusal costs no generation work.

        The route's own counts are used, not the scheduler's queue: a request holds its place from admission (a
        burst that arrives before any of it reaches the scheduler is still bounded) until it is over
        (:meth:`released`). Counting only the requests without a first token refused a burst from idle beyond
        ``max_queued_requests``, though the batch would have taken it at once.
        """
        limit = self.cfg.max_queued_requests
        now = time.monotonic()
        # one batch's worth, however many versions are served: Serve's max_ongoing_requests is sized the same way
        capacity = self.cfg.max_batch_size
        if len(self.waiting) + len(self.generating) >= capacity + (limit or 1024):
            # a safety net (every path of the routes releases its place): forget waiting entries older than any
            # request can wait (its deadline, else STALE_WAITING_S)
            horizon = now - (self.cfg.request_timeout_s + 5.0 if self.cfg.request_timeout_s else STALE_WAITING_S)
            for stale in [k for k, t in self.waiting.items() if t < horizon]:
                del self.waiting[stale]
        queued = len(self.waiting) + len(self.generating) - capacity
        if limit and queued >= limit:
            self.metrics.reject(REJECT_OVERLOADED)
            raise APIError(
                503,
                f"the server is overloaded: a full batch and {queued} more requests are already waiting on this "
                f"replica (serve.max_queued_requests={limit}); retry after {OVERLOAD_RETRY_AFTER_S} s",
                None,
                "overloaded",
                "server_error",
            )
        self.waiting[cid] = now

    def started(self, cid: str) -> None:
        """The request got its first token (or its result): no longer waiting, it now holds a place in the batch
        (:meth:`admit`) until :meth:`released`."""
        admitted = self.waiting.pop(cid, None)
        if admitted is not None:
            self.generating[cid] = admitted

    def released(self, cid: str) -> None:
        """The request is over (answered, refused, or its client left): it holds no place any more."""
        self.waiting.pop(cid, None)
        self.generating.pop(cid, None)

    def deadline(self, t0: float) -> float | None:
        """The ``time.monotonic()`` deadline of a request that arrived at ``t0`` (``time.perf_counter()``), from
        ``serve.request_timeout_s`` (None: no deadline). Still queued then -> 503 ``queue_timeout``; generating ->
        its rows end with ``length``."""
        timeout = self.cfg.request_timeout_s
        return time.monotonic() + timeout - (time.perf_counter() - t0) if timeout > 0 else None
