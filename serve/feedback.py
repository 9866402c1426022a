"""User feedback at the endpoint: ratings and preference pairs into the feedback store, and the replica's memory of
recent completions they refer to.

:class:`FeedbackRecorder` owns one replica's :class:`rlchat.feedback_store.FeedbackStore`: completions are counted
(with ``serve.transcripts``, kept) in the background, so a reply never waits for the database and an outage costs
only those rows (logged once a minute); feedback is written before it is acknowledged (an outage is a 503 with
``Retry-After``); ``POST /v1/feedback`` is rate-limited per client address.
"""

import asyncio
import functools
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rlchat.core.config import ServeConfig
from rlchat.core.feedback_store import (
    RETRY_AFTER_S,
    AlreadyRated,
    FeedbackStore,
    InvalidFeedback,
    RequestRecord,
    StoreUnavailable,
)
from serve.schemas import APIError, FeedbackRef, FeedbackRequest

logger = logging.getLogger("ray.serve").getChild("rlchat")

COMPLETION_CACHE_SIZE = 2048
"""Recent completions a replica remembers so feedback can refer to them by id."""
COMPLETION_CACHE_CHARS = 16_000_000
"""...and at most this many characters of their messages and replies (16-64 MB): 2,048 requests at the size limit
(32,000 characters of messages, 16 long choices) held hundreds of MB per replica."""
STORE_BACKLOG = 256
"""Request rows a replica may have waiting for the database; beyond that (a long outage) they are dropped, logged."""


class FeedbackRecorder:
    """One replica's feedback store, recent completions and feedback rate limiter.

    Args:
        cfg: the ``serve`` config (store URL, transcripts, retention, PII scrubbing, rate limit).
    """

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        # No connection yet: the replica serves chat while its database is down (see _call, _record_request).
        self.store = FeedbackStore(
            cfg.feedback_store,
            transcripts=cfg.transcripts,
            transcript_retention_days=cfg.transcript_retention_days,
            request_retention_days=cfg.request_retention_days,
            scrub=cfg.scrub_pii,
        )
        self._store_log = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlchat-store")
        self._store_slots = threading.BoundedSemaphore(STORE_BACKLOG)
        self._store_lock = threading.Lock()
        self._store_pending: list[RequestRecord] = []  # rows waiting for the writer thread
        self._store_writing = False  # a _write_pending is queued or running
        self._store_warned = 0.0
        # completion id -> (messages, reply texts, the label of the version that wrote them)
        self._completions: OrderedDict[str, tuple[list[dict[str, str]], list[str | None], str]] = OrderedDict()
        self._completion_chars: dict[str, int] = {}  # completion id -> characters it holds
        self._chars = 0
        self._feedback_hits: OrderedDict[str, deque[float]] = OrderedDict()

    async def record(self, fb: FeedbackRequest, model_version: str) -> dict[str, Any]:
        """Write one validated feedback request (a rating, or a chosen/rejected pair) and say what was written."""
        if fb.rating is not None:
            assert fb.completion_id is not None
            hit = self._completions.get(fb.completion_id)
            client_text = hit is None  # the text comes from the request (the store checks it against its digests)
            if hit is not None:
                model_version = hit[2]  # the version that wrote the reply, not the one this request was bound to
            prompt, content = self.lookup(fb.completion_id, fb.choice_index, fb.messages, fb.content)
            try:
                record = await self._call(
                    self.store.add_rating,
                    fb.completion_id,
                    fb.choice_index,
                    fb.rating,
                    prompt,
                    content,
                    model_version=model_version,
                    client_text=client_text,
                )
            except AlreadyRated as e:
                if e.same:  # a retry: answered like the first time, minus what it wrote
                    return {"recorded": False, "kind": "rating", "preference_written": False, "duplicate": True}
                raise APIError(409, str(e), "rating", "already_rated") from None
            logger.info("feedback rating=%s id=%s pair_written=%s", fb.rating, fb.completion_id, record is not None)
            return {"recorded": True, "kind": "rating", "preference_written": record is not None}
        if isinstance(fb.chosen, FeedbackRef) and isinstance(fb.rejected, FeedbackRef):
            p1, chosen = self.lookup(fb.chosen.completion_id, fb.chosen.choice_index, None, None)
            p2, rejected = self.lookup(fb.rejected.completion_id, fb.rejected.choice_index, None, None)
            if p1 != p2:
                raise APIError(
                    400,
                    "chosen and rejected answer different conversations; compare replies to one prompt",
                    "rejected",
                    "invalid_value",
                )
            ids = {"chosen_id": fb.chosen.completion_id, "rejected_id": fb.rejected.completion_id}
            prompt, client_text = p1, False
            # the version that wrote the chosen reply (both came from this replica's cache), as for a rating
            model_version = self._completions[fb.chosen.completion_id][2]
        else:
            assert fb.prompt is not None and isinstance(fb.chosen, str) and isinstance(fb.rejected, str)
            prompt, chosen, rejected, ids = [m.as_message() for m in fb.prompt], fb.chosen, fb.rejected, {}
            client_text = True
        try:
            await self._call(
                self.store.add_preference,
                prompt,
                chosen,
                rejected,
                model_version=model_version,
                client_text=client_text,
                **ids,
            )
        except AlreadyRated as e:
            if e.same:  # a retry
                return {"recorded": False, "kind": "preference", "preference_written": False, "duplicate": True}
            raise APIError(409, str(e), "chosen", "already_rated") from None
        logger.info("feedback preference written")
        return {"recorded": True, "kind": "preference", "preference_written": True}

    def rate_limit(self, client: str) -> None:
        """At most ``serve.feedback_rate_limit`` feedback requests per minute per client address (429 beyond)."""
        limit = self.cfg.feedback_rate_limit
        if limit <= 0:
            return
        now = time.monotonic()
        hits = self._feedback_hits.pop(client, None) or deque()
        while hits and now - hits[0] > 60.0:
            hits.popleft()
        self._feedback_hits[client] = hits  # most recently seen last
        while len(self._feedback_hits) > COMPLETION_CACHE_SIZE:
            self._feedback_hits.popitem(last=False)
        if len(hits) >= limit:
            raise APIError(
                429,
                f"too many feedback requests from this address (limit {limit:g} per minute); retry in a minute",
                None,
                "rate_limit_exceeded",
                "rate_limit_error",
            )
        hits.append(now)

    def remember(
        self,
        cid: str,
        model_version: str,
        messages: list[dict[str, str]],
        texts: list[str | None],
        conversation: str | None = None,
    ) -> None:
        """Keep a completion for feedback by id, and count it in the store (in the background) under the client's
        ``conversation`` id (``X-RLChat-Conversation-Id``; None: the completion id)."""
        size = sum(len(m["content"]) for m in messages) + sum(len(t) for t in texts if t is not None)
        self._completions[cid] = (messages, texts, model_version)
        self._chars += size - self._completion_chars.get(cid, 0)
        self._completion_chars[cid] = size
        while len(self._completions) > 1 and (
            len(self._completions) > COMPLETION_CACHE_SIZE or self._chars > COMPLETION_CACHE_CHARS
        ):
            old, _ = self._completions.popitem(last=False)
            self._chars -= self._completion_chars.pop(old)
        self._record_request(cid, model_version, messages, texts, conversation[:200] if conversation else None)

    def _record_request(
        self,
        cid: str,
        model_version: str,
        messages: list[dict[str, str]],
        texts: list[str | None],
        conversation: str | None,
    ) -> None:
        """Count the completion (and, with ``serve.transcripts``, keep its transcript) in the store, in the
        background: the reply never waits for the database, and an outage costs only these rows (logged).

        Rows queue up while the writer thread writes; it then writes all of them in one transaction
        (:meth:`FeedbackStore.record_requests`), so under load the store costs one commit per batch, not per
        request."""
        if not self._store_slots.acquire(blocking=False):
            self._warn_store(f"request {cid} not recorded: {STORE_BACKLOG} rows are already waiting for the store")
            return
        record = RequestRecord(cid, model_version, len(texts), sum(t is None for t in texts), conversation,
                               messages, texts)  # fmt: skip
        with self._store_lock:
            self._store_pending.append(record)
            start, self._store_writing = not self._store_writing, True
        if start:
            try:
                self._store_log.submit(self._write_pending)
            except RuntimeError:  # close() has stopped the writer (the replica is stopping): write it here
                self._write_pending()

    def _write_pending(self) -> None:
        """The writer thread: write what is queued, one transaction per batch, until the queue is empty."""
        while True:
            with self._store_lock:
                batch, self._store_pending = self._store_pending, []
                if not batch:
                    self._store_writing = False
                    return
            try:
                self.store.record_requests(batch)
            except Exception as e:  # noqa: BLE001 - analytics must never fail a reply
                self._warn_store(f"{len(batch)} request(s) not recorded, e.g. {batch[0].request_id}: {e}")
            finally:
                for _ in batch:
                    self._store_slots.release()

    def close(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the request rows still queued or being written (the replica is stopping:
        its process ends next, and the rows with it), then stop the writer thread. Whether every row was written
        (what was not is logged); a blocking call, for a thread off the event loop."""
        until = time.monotonic() + timeout_s
        while time.monotonic() < until:
            with self._store_lock:
                if not self._store_writing:
                    break
            time.sleep(0.02)
        with self._store_lock:
            writing, queued = self._store_writing, len(self._store_pending)
        self._store_log.shutdown(wait=False, cancel_futures=True)
        if writing:
            logger.warning("stopping with request rows not written to the feedback store after %.0f s: %d queued and "
                           "a batch in progress", timeout_s, queued)  # fmt: skip
        return not writing

    def _warn_store(self, message: str) -> None:
        """Log store trouble at most once a minute (an outage would otherwise log every request)."""
        now = time.monotonic()
        if now - self._store_warned >= 60.0:
            self._store_warned = now
            logger.warning("%s (further such warnings are held back for 60 s)", message)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a store write off the event loop. A database outage is a 503 with ``Retry-After`` (nothing was
        written, and the client is told so); feedback that makes no usable pair is a 400."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
        except StoreUnavailable as e:
            logger.warning("feedback not recorded: %s", e)
            raise APIError(
                503,
                f"feedback was not recorded: the feedback store is unavailable; retry in {RETRY_AFTER_S} s",
                None,
                "feedback_store_unavailable",
                "server_error",
            ) from None
        except AlreadyRated:
            raise  # the caller knows a retry from a changed rating
        except InvalidFeedback as e:
            raise APIError(
                400, f"this feedback does not make a usable preference pair: {e}", None, "invalid_value"
            ) from None

    def lookup(
        self, cid: str, index: int, messages: list[Any] | None, content: str | None
    ) -> tuple[list[dict[str, str]], str]:
        """(prompt messages, reply text) of a completion choice: this replica's cache, else the request's copy."""
        hit = self._completions.get(cid)
        if hit is not None:
            prompt, texts, _ = hit
            if index >= len(texts):
                raise APIError(
                    400,
                    f"completion {cid} has {len(texts)} choice(s); choice_index={index}",
                    "choice_index",
                    "invalid_value",
                )
            text = texts[index]
            if text is None:
                raise APIError(
                    400,
                    f"completion {cid} choice {index} was withheld by the safety filter",
                    "completion_id",
                    "invalid_value",
                )
            return prompt, text
        if messages is not None and content is not None:
            return [m.as_message() for m in messages], content
        raise APIError(
            404,
            f"unknown completion id {cid!r} (expired, or served by another replica); send messages and content "
            "with the rating",
            "completion_id",
            "completion_not_found",
        )
