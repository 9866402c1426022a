"""The Ray Serve chat endpoint: an OpenAI-compatible HTTP API, a web chat page, and user feedback.

Run it::

    rlchat serve runs/<run>/checkpoints/best --port 8000          # or: rlchat serve --from-run runs/<run>
    serve run serve/serve_config.yaml                               # Ray's CLI (edit the checkpoint path first)
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "rlchat", "messages": [{"role": "user", "content": "hi"}]}'

Routes (one FastAPI app, the ingress of one deployment, ``ChatServer``):

============================== ================================================================================
route                          what
============================== ================================================================================
``POST /v1/chat/completions``  OpenAI chat completions, plain or SSE streaming (``stream: true``, ends with
                               ``data: [DONE]``); ``n``, ``seed``, ``stop``, ``max_tokens`` /
                               ``max_completion_tokens``, ``temperature``, ``top_p``, ``logprobs`` /
                               ``top_logprobs``, ``presence_penalty`` / ``frequency_penalty``, ``logit_bias``;
                               extensions ``top_k``, ``repetition_penalty``, ``num_beams`` (schemas:
                               :mod:`serve.schemas`, published at ``/openapi.json``)
``POST /v1/completions``       OpenAI's legacy text completions: one raw-text prompt continued, no chat template
``GET /v1/models``             the served model (id, stage, step, limits; the checkpoint path only to the operator)
``POST /v1/feedback``          thumbs up/down or a preference, stored in ``serve.feedback_store`` (SQLite or
                               PostgreSQL, :mod:`rlchat.feedback_store`), which ``rlchat rm`` reads (closing the
                               loop back to the reward model); 503 + ``Retry-After`` while the store is down
``GET /healthz``               liveness
``GET /readyz``                one replica's status: checkpoint, stage and step, pid, batching counters (a load
                               balancer probes Serve's ``/-/healthz`` instead: ``/readyz`` is shed under overload)
``GET /``                      the web chat page (``serve/static/index.html``)
============================== ================================================================================

How requests are served, and why:

- **Continuous batching.** Every request, plain or streamed, goes to the replica's :class:`Batcher`
  (``serve/batching.py``): its rows join the running decode batch at the next decoding step (up to
  ``serve.max_batch_size`` requests) and leave it when their reply ends; each request receives its share of every
  step, so streams stream. Rows with different settings share the batch. Per-row seeds make a seeded reply
  independent of what it was batched with. Beam searches run on their own thread and do not stall the batch.
  ``serve.max_batch_size=1`` is batch-1 serving.
- **One generation thread per replica.** The :class:`serve.batching.Batcher` steps the decode batch back to back on
  its own thread and hands each job its tokens once per chunk interval, so the event loop stays free to accept
  requests while the model computes, and torch gets a fixed thread budget (the replica's CPUs) instead of fighting
  other processes for the cores.
- **UTF-8-safe, stop-aware streaming.** :class:`rlchat.text_stream.TextStreamer` decodes tokens incrementally
  (never half a character), holds back text that may be the start of a stop string (stop strings are never shown, as on
  OpenAI), and, with the safety filter on, holds back a window of text so a flagged phrase is withheld before any
  of it is sent. Plain and streamed replies use the same streamer, so they are identical for the same seed. Chunks
  are coalesced to one per ``serve.stream_interval_s`` (20 ms by default) per choice, longer when many streams share
  the replica (``serve.stream_chunks_per_s``, :meth:`serve.batching.Batcher.stream_share_s`): each SSE event is a hop
  through Serve's proxy, and one event per token per client made that hop the bottleneck under load.
- **Safety filter (optional, ``serve.safety_filter``).** The reward library's safety component
  (``reward.safety_patterns`` / ``reward.safety_classifier``) checks every reply; a flagged reply is withheld,
  ``finish_reason`` is ``content_filter`` and the content says so.
- **Long conversations.** Clients send the whole history; when it does not fit the context minus the reply budget,
  :func:`rlchat.tokenizer.fit_history` drops the oldest whole exchanges (never the system message or the latest
  user turn) and the ``X-RLChat-Dropped-Turns`` header says how many (see :meth:`ChatServer._fit_context`).
- **Accepting what clients send.** Null / default values of features the engine lacks and no-op fields are
  accepted; unknown keys are ignored and named in ``X-RLChat-Ignored-Fields`` (a 400 with
  ``serve.strict_requests``); a truly unsupported request (non-empty ``tools``, JSON ``response_format``) is a 400
  naming the field and the alternative (see :mod:`serve.schemas`).
- **Security.** ``serve.api_key`` (or ``RLCHAT_API_KEY``, or ``serve.api_key_file``); paths and pids only to
  requests with the key (or, without a key configured, from loopback); ``/v1/feedback`` size- and rate-limited
  (``serve.feedback_rate_limit``); CORS off unless ``serve.cors_origins`` lists origins.
- **Limits and errors.** API key (``Authorization: Bearer``) -> 401; message count, characters, ``max_tokens``,
  a latest turn that alone exceeds the context, temperature range -> 400 with an OpenAI-style ``{"error": {...}}``
  body; requests for unsupported features (non-empty ``tools``, JSON ``response_format``) -> 400 naming them. A
  malformed body is a 400, never a 500 (a schemathesis fuzz of ``/openapi.json`` checks it).
- **Overload and time.** At most ``serve.max_queued_requests`` admitted requests wait per replica; more get 503 +
  ``Retry-After`` (code ``overloaded``) before any work; ``serve.request_timeout_s`` is a deadline (still queued:
  503 ``queue_timeout``; generating: the reply ends with ``length``); a client that goes away, streamed or plain,
  has its rows ended at the next step (logged as 499). See :mod:`serve.admission`, :meth:`ChatServer._collect`.
- **Metrics.** Prometheus metrics through Ray Serve's metrics API (:mod:`serve.metrics`): TTFT, inter-token latency,
  generated tokens, rows per step, queue depth, rejections, responses by status.
- **Logs.** One line per request (id, status, token counts, finish reasons, latency) without message bodies
  unless ``serve.log_bodies`` is set.
- **Crashes.** A replica whose process dies is replaced by Serve's controller; ``/readyz`` reports the new pid.
- **Feedback store.** Every completion is counted in ``serve.feedback_store`` (id, model version, time; with
  ``serve.transcripts`` also its messages and replies) in the background, so a reply never waits for the database
  and a database outage leaves chat completions unaffected; feedback is written before it is acknowledged.

Our top-level package is also called ``serve``: Ray Serve is always ``from ray import serve as ray_serve`` here.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` annotations of the routes
# that Serve's ingress rewrites (string annotations made it read ``request`` as a query parameter).
import asyncio
import contextlib
import dataclasses
import hmac
import importlib
import json
import logging
import os
import reprlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve as ray_serve

from rlchat.core.errors import ConfigError, RLChatError
from rlchat.core.generation import FINISH_LENGTH, FINISH_STOP, GenerationEngine, SamplingParams
from rlchat.core.text_stream import CONVERSATION_HEADER, DROPPED_TURNS_HEADER, TextStreamer
from rlchat.core.tokenizer import ContextOverflowError, fit_history
from serve.admission import Admission
from serve.asgi import (
    COMPLETION_ID_HEADER,
    MODEL_UNAVAILABLE,
    OVERLOAD_CODES,
    ClosingEventSource,
    api,
)
from serve.batching import DeadlineExceeded, GenerationJob, JobOutput, SchedulerStopped, SubmittedNow, row_seeds
from serve.feedback import FeedbackRecorder
from serve.formats import ChatFormat, CompletionFormat, PlainChoice, ResponseFormat
from serve.heap import freeze_heap
from serve.metrics import REJECT_QUEUE_TIMEOUT, RequestTimer, ServeMetrics
from serve.models import (
    VERSION_HEADER,
    ModelSet,
    ServedVersion,
    VersionSpec,
    bound_version_name,
    current_version,
    follow_run,
    is_uri,
    load_version,
    parse_versions,
    use_version,
)
from serve.safety import SAFETY_HOLDBACK_CHARS, WITHHELD_NOTICE, SafetyFilter
from serve.schemas import (
    IGNORED_FIELDS_HEADER,
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
    error_body,
    parse_chat_request,
    parse_completion_request,
    parse_feedback_request,
)
from serve.settings import (
    DEFAULT_MODEL_NAME,
    DEPLOYMENT_NAME,
    OVERLOAD_RETRY_AFTER_S,
    SHUTDOWN_MARGIN_S,
    AppSettings,
    active_ingress,
    default_model_version,
    deployment_options,
    exposure_warning,
    is_loopback,
    request_lifetime_s,
    resolve_settings,
    ship_checkpoints,
)
from serve.streaming import StreamedChoice

if TYPE_CHECKING:
    from ray.serve import Application


logger = logging.getLogger("ray.serve").getChild("rlchat")

_NAME_REPR = reprlib.Repr()
_NAME_REPR.maxstring = 120  # a client's name as errors quote it: cut, so a 200 KB name is not echoed whole

PLAIN_DELIVERY_S = 0.1
"""A plain (non-streamed) request is handed its new tokens at most this often (its first tokens and its result at
once): it only counts them (metrics), so waking it at every step would be wasted event-loop work."""
GIL_SWITCH_INTERVAL_S = 0.0005
"""The replica process's ``sys.setswitchinterval``. Every torch op releases the GIL, so while the event loop runs
Python the generation thread waits up to this long after each op to get the GIL back, and the event loop as long after
each call that drops it (a socket write, a Ray call); Python's default 5 ms made both stall under load
(bench/README.md, "Serve load")."""
STATIC_DIR = Path(__file__).resolve().parent / "static"
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""``/v1/completions`` budget when the request sets none (OpenAI's default)."""
DISCONNECT_POLL_S = 0.25
"""How often a non-streamed request checks whether its client is still connected (its rows are cancelled if not)."""
CLIENT_CLOSED_REQUEST = 499
"""Status logged and counted for a request whose client went away before its reply (nginx's convention)."""


# --------------------------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------------------------


def _node_id() -> str:
    """The Ray node this replica runs on (``/readyz``, for the operator)."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informational only
        return ""


@dataclasses.dataclass
class _StreamOutcome:
    """Whether a streamed response was logged and counted yet: once, as a 200, an in-band error or a 499, by its
    generator or (a client gone before the first event, so the generator never ran) by the response's close."""

    logged: bool = False


def _refused_before_start(first: asyncio.Future) -> Exception | None:
    """The failure in a submission's first item (done ``first``) before any token -- its deadline in the queue, a
    failed prefill, a submission that raised -- else None (the reply has begun)."""
    if first.cancelled():
        return None
    err = first.exception()
    if isinstance(err, StopAsyncIteration):
        return RuntimeError("the batch ended without a result")
    if err is not None:
        return err if isinstance(err, Exception) else None
    item = first.result()
    if isinstance(item.done, Exception) and not any(item.tokens):
        return item.done
    return None


@ray_serve.deployment(name=DEPLOYMENT_NAME)
@ray_serve.ingress(api)
class ChatServer:
    """One replica: the policy, its tokenizer, the generation engine and the HTTP routes.

    Args:
        settings: resolved by :func:`resolve_settings` on the driver.
    """

    def __init__(self, settings: AppSettings) -> None:
        import torch

        torch.set_num_threads(max(1, int(settings.num_cpus)))
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the replica is its own process: this is its setting
        self.settings = settings
        self.cfg = settings.config.serve
        self.model_name = settings.model_name
        self._behind_haproxy = active_ingress() == "haproxy"  # Ray's switches, inherited by this replica's process
        self.created = int(time.time())
        self.device = "cuda" if self.cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.cfg.num_gpus > 0 and self.device == "cpu":  # it would hold the GPU and serve ~10x slower, silently
            raise ConfigError(
                f"serve.num_gpus={self.cfg.num_gpus:g} reserved a GPU, but this replica sees no CUDA device "
                f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                "install a CUDA build of torch on the GPU nodes, or set serve.num_gpus=0 to serve on CPUs"
            )
        # The versions (serve/models.py): one per checkpoint, each with its engine and scheduler. `engine`,
        # `tokenizer`, `batcher`, `stats`, `checkpoint`, `max_positions` and `model_version` are properties that
        # resolve to the version bound to the current request (_check_model), else the default version.
        self.stall_after_s = request_lifetime_s(self.cfg) + SHUTDOWN_MARGIN_S
        """A version with requests in flight that hands none of them anything for this long has a hung engine: the
        health check fails so Serve replaces the replica (no request can still be within its deadline by then)."""
        self.metrics = ServeMetrics(self.model_name)  # each version's scheduler observes through for_version(name)
        self.models = ModelSet(self.model_name, (DEFAULT_MODEL_NAME,))
        initial = [self._load_version(spec) for spec in self._start_specs()]
        self.models.set(initial, {v.name: v.spec.weight for v in initial})
        self._follower: asyncio.Task | None = None
        if settings.from_run:
            self._start_follower()
        tok, ckpt = self.tokenizer, self.checkpoint
        self.safety = SafetyFilter(settings.config.reward, tok) if self.cfg.safety_filter else None
        if self.safety is not None and not (
            settings.config.reward.safety_patterns or settings.config.reward.safety_classifier
        ):
            logger.warning(
                "serve.safety_filter is on but reward.safety_patterns and reward.safety_classifier are empty, so "
                "nothing is ever flagged; set one of them (e.g. reward.safety_patterns=['badword'])"
            )
        self.feedback = FeedbackRecorder(self.cfg)
        self.admission = Admission(self.cfg, self.metrics)
        self._serving = False  # set by the first health check (reconfigure)
        self._update_error: dict[str, Any] | None = None  # the latest refused config update (/readyz)
        self._next_update: tuple[dict[str, Any]] | None = None  # received while serving, not applied yet
        self._updater: asyncio.Task | None = None  # applies them in the background (reconfigure)
        # Through the imported module: Serve's ingress ships this class by value, so its methods' globals are a copy
        # and a bare `CORS_ORIGINS` here would not be the list the middleware (imported normally) reads.
        importlib.import_module("serve.asgi").CORS_ORIGINS[0] = tuple(self.cfg.cors_origins)
        logger.info(
            "loaded %s (stage %s, step %d); max_batch_size=%d, safety_filter=%s, auth=%s",
            ckpt.path,
            ckpt.stage,
            ckpt.step,
            self.cfg.max_batch_size,
            self.cfg.safety_filter,
            bool(self.cfg.api_key),
        )
        freeze_heap()  # the start-up heap out of every later garbage collection's walk (serve/heap.py)

    # ------------------------------------------------------------------------------------------------ versions
    def _start_specs(self) -> tuple[VersionSpec, ...]:
        """What this replica loads at start: the settings' versions; for a followed run, the run's best checkpoint
        as of now (the driver resolved it at deploy, and a replica that starts later -- a restart, a scale-up --
        may find that one pruned by the trainer)."""
        specs = self.settings.version_specs()
        run = self.settings.from_run
        if not run or self.settings.versions or specs[0].shipped is not None:
            return specs  # a shipped copy: this node cannot see the run (the follower cannot either)
        from rlchat.core.checkpoint import find_best_checkpoint

        try:
            best = find_best_checkpoint(run)
        except RLChatError as e:
            logger.warning("run %s: no best checkpoint now (%s); loading the one resolved at deploy", run, e)
            return specs
        return (dataclasses.replace(specs[0], checkpoint=str(best)),)

    def _label(self, spec: VersionSpec) -> str:
        """A version's feedback-store label: ``serve.model_version`` or ``<run>/<checkpoint>``, after its name
        when it is a named version (app args or a config update)."""
        label = self.cfg.model_version or default_model_version(spec.checkpoint)
        return label if spec.name == self.model_name else f"{spec.name}/{label}"

    def _load_version(self, spec: VersionSpec) -> ServedVersion:
        """Load one version (blocking; :meth:`reconfigure` and the follower run it on a loader thread)."""
        label = self._label(spec)
        observer = self.metrics.for_version(spec.name)
        try:
            return load_version(
                spec,
                self.cfg,
                self.settings.config.model.precision,
                self.device,
                label=label,
                cache_dir=self.cfg.checkpoint_cache,
                observer=observer,
            )
        except BaseException:
            observer.close()  # a version that never loaded reports nothing
            raise

    @property
    def served(self) -> ServedVersion:
        """The version answering the current request (bound by :meth:`_check_model`), else the default one."""
        return current_version(self.models.default)

    @property
    def engine(self) -> GenerationEngine:
        return self.served.engine

    @property
    def tokenizer(self) -> Any:
        return self.served.tokenizer

    @property
    def batcher(self) -> Any:
        """The current version's scheduler (``submit``, ``stats``, ``alive``), counting its requests in flight."""
        return self.served

    @property
    def stats(self) -> Any:
        return self.served.stats

    @property
    def checkpoint(self) -> Any:
        return self.served.checkpoint

    @property
    def max_positions(self) -> int:
        return self.served.max_positions

    @property
    def model_version(self) -> str:
        """The feedback-store label of the current version (``serve.model_version``, else ``<run>/<ckpt>``)."""
        return self.served.label

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's in-place update (a ``serve deploy`` that changes only the deployment's ``user_config``).

        ``user_config: {versions: [{name, checkpoint, weight}, ...]}`` becomes the served set: new or changed
        versions load before they take traffic, then weights and versions swap at once, and removed versions drain
        (requests already running finish on them). An empty list goes back to the app's own checkpoint(s).

        On a replica that is serving, the update is applied in the background (:meth:`_apply_updates`): the
        current set answers meanwhile. A bad update (a version that cannot load, bad weights) is then logged and
        shown in ``/readyz`` (``last_update_error``), and the replica keeps its set: raising would make Serve stop
        it, and its replacements would fail on the same config, taking the app down. At start-up (before Serve's
        first health check) it loads here and raises, so a deploy with a bad config fails where the operator sees it.
        """
        if not self._serving:  # start-up: the versions load before the replica takes traffic
            await self._reconfigure(user_config)
            self._update_error = None
            return
        # Serving: Serve routes no new request to a replica until reconfigure returns (it is UPDATING meanwhile),
        # so loading here held back all traffic for the whole load (seconds for a tiny model, minutes for a real
        # one). The update is applied in the background instead, one at a time, the latest received winning; the
        # current set serves meanwhile and /readyz says update_pending.
        self._next_update = (user_config,)
        if self._updater is None or self._updater.done():
            self._updater = asyncio.get_running_loop().create_task(self._apply_updates())

    async def _apply_updates(self) -> None:
        """Apply the latest received config update until none is left (see :meth:`reconfigure`)."""
        while self._next_update is not None:
            (user_config,), self._next_update = self._next_update, None
            try:
                await self._reconfigure(user_config)
            except Exception as e:  # noqa: BLE001 - refused: the replica keeps its set and says why in /readyz
                why = str(e) if str(e).startswith("user_config.versions") else f"user_config.versions: {e}"
                self._update_error = {"error": why, "at": int(time.time())}
                logger.error("config update refused, still serving %s: %s", self.models.names(), e)
            else:
                self._update_error = None

    async def applied(self) -> None:
        """Wait until every config update received so far is applied or refused (tests; ``/readyz`` shows
        ``update_pending`` meanwhile)."""
        while self._updater is not None and not self._updater.done():
            await asyncio.wait({self._updater})  # not the task's outcome: a cancelled updater is not our cancel

    async def _reconfigure(self, user_config: dict[str, Any]) -> None:
        raw = (user_config or {}).get("versions")
        if raw is None:
            return
        if raw and self.settings.from_run:  # else applied, then undone by the follower's next swap
            raise ConfigError(
                f"user_config.versions: this app follows the run {self.settings.from_run} (serve.follow) and serves "
                "its best checkpoint alone; to serve other versions, deploy them without --follow"
            )
        specs = parse_versions(raw, "user_config.versions", self.model_name) or self.settings.version_specs()
        # the driver's shipped copies, by checkpoint: a rollback names the app's own checkpoint under another name
        own = {v.checkpoint: v for v in self.settings.version_specs()}
        resolved = []
        for spec in specs:
            if spec.checkpoint in own:  # keeps the driver's shipped copy, if any
                resolved.append(VersionSpec(spec.name, spec.checkpoint, spec.weight, own[spec.checkpoint].shipped))
            elif not is_uri(spec.checkpoint) and not Path(spec.checkpoint).is_absolute():
                raise ConfigError(
                    f"user_config.versions: {spec.name}: checkpoint {spec.checkpoint!r} is relative; a replica runs "
                    "in another directory: give an absolute path or a URI"
                )
            else:
                resolved.append(spec)
        await self.models.apply(resolved, self._load_version, self._label)

    def _start_follower(self) -> None:
        """``serve.follow``: watch the run's best checkpoint and swap to each new one (:func:`follow_run`)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop in this constructor: check_health starts it
        run = self.settings.from_run

        async def swap(path: Path) -> None:
            await self.models.apply([VersionSpec(self.model_name, str(path), 1.0)], self._load_version)

        self._follower = loop.create_task(
            follow_run(run, self.cfg.follow_interval_s, lambda: self.models.default.checkpoint.path, swap)
        )

    # ------------------------------------------------------------------------------------------------ helpers
    def _operator(self, request: Request) -> bool:
        """Whether the request may see paths and pids: it carries the API key, or no key is configured and it comes
        from this machine (loopback). Behind ``serve.ingress: haproxy`` every request reaches the replica from
        HAProxy on its node (Ray's HAProxy sets no ``X-Forwarded-For``), so there a loopback address proves nothing
        and only the key does. Another reverse proxy on the same host likewise makes every client loopback: set a
        key."""
        key = self.cfg.api_key
        if key:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
        if self._behind_haproxy:
            return False
        return request.client is not None and is_loopback(request.client.host)

    def _update_error_for(self, operator: bool) -> dict[str, Any]:
        """The refused config update for ``/readyz``: its error names checkpoint paths or URIs (which may carry
        credentials), so a client that is not the operator only learns that, and when, an update was refused."""
        assert self._update_error is not None
        if operator:
            return self._update_error
        why = "a config update was refused; its error is shown with the API key (or, with no key, from this machine)"
        return {"error": why, "at": self._update_error["at"]}

    def _auth(self, request: Request) -> None:
        key = self.cfg.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            what = "no API key was sent" if not header else "the API key is not valid"
            raise APIError(
                401,
                f"{what}; send the server's key as 'Authorization: Bearer <key>'",
                None,
                "invalid_api_key",
            )

    async def _body(self, request: Request) -> bytes:
        """The request body, read before the request is admitted (:meth:`serve.admission.Admission.admit`): a
        client still sending it holds no place in the queue, and one that stalls is cut off after
        ``serve.body_timeout_s`` (408). Read chunk by chunk, so a body without ``Content-Length`` (chunked) is
        refused (413) once it passes the limit, not after it was buffered whole."""
        limit = 4 * self.cfg.max_chars + 65536
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            raise APIError(413, f"the request body has {size} bytes; the limit is {limit}", None, "body_too_large")

        async def read() -> bytes:
            chunks, n = [], 0
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise APIError(
                        413, f"the request body has more than {limit} bytes, the limit", None, "body_too_large"
                    )
                chunks.append(chunk)
            return b"".join(chunks)

        from starlette.requests import ClientDisconnect

        timeout = self.cfg.body_timeout_s
        try:
            return await (asyncio.wait_for(read(), timeout) if timeout > 0 else read())
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on; two in 3.10
            raise APIError(
                408,
                f"the request body did not arrive within {timeout:g} s (serve.body_timeout_s); send the whole body "
                "within that time",
                None,
                "request_timeout",
            ) from None
        except ClientDisconnect:  # logged and counted as a client that left (nobody reads the answer)
            raise APIError(
                CLIENT_CLOSED_REQUEST,
                "the client closed the connection while sending the body",
                None,
                "client_disconnected",
            ) from None

    def _check_limits(self, req: ChatCompletionRequest) -> tuple[list[dict[str, str]], list[int], SamplingParams, int]:
        """Server limits, the messages the model sees, their prompt, the sampling settings and the number of
        exchanges dropped to fit the context, of a valid request (400 otherwise)."""

        s = self.cfg
        self._check_model(req.model)
        if len(req.messages) > s.max_messages:
            raise APIError(
                400,
                f"messages has {len(req.messages)} entries; this server accepts at most {s.max_messages}",
                "messages",
                "too_many_messages",
            )
        messages = [m.as_message() for m in req.messages]
        chars = sum(len(m["content"]) for m in messages)
        if chars > s.max_chars:
            raise APIError(
                400,
                f"the messages hold {chars} characters; this server accepts at most {s.max_chars}",
                "messages",
                "too_many_characters",
            )
        budget = req.budget()
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        limit = self._reply_limit(self.served)
        if budget is not None and budget > limit:
            why = (
                ""
                if limit == s.max_tokens
                else f" (the model's {self.max_positions} positions less the shortest prompt)"
            )
            raise APIError(
                400, f"{param}={budget} exceeds this server's limit of {limit}{why}", param, "invalid_value"
            )
        messages, dropped = self._fit_context(messages, budget, param)
        prompt = self.tokenizer.render_prompt(messages)
        room = self.max_positions - len(prompt)  # >= budget (or >= 1 without one): _fit_context made sure
        if budget is None:
            budget = min(s.max_tokens, room)
        top = (req.top_logprobs or 0) if req.logprobs else -1
        params = self._sampling_params(req, budget, top, req.num_beams or 1)
        return messages, prompt, params, dropped

    def _check_model(self, model: str | None) -> None:
        """Bind the request to its version: the one ``model`` names, or one by weight for the app's name (404 for
        an unknown name). Everything after this (tokenizer, context, engine, scheduler) is that version's."""
        version = self.models.pick(model)
        if version is None:
            names = ", ".join(repr(n) for n in dict.fromkeys([self.model_name, *self.models.names()]) if n)
            raise APIError(
                404,
                f"the model {_NAME_REPR.repr(model)} does not exist on this server; it serves {names} "
                "(GET /v1/models)",
                "model",
                "model_not_found",
            )
        use_version(version)

    def _reply_limit(self, v: ServedVersion) -> int:
        """The longest chat reply ``v`` grants: ``serve.max_tokens``, cut to what its context leaves after the
        shortest chat prompt (one short user message), so the limit ``/v1/models`` advertises can be met."""
        shortest = len(v.tokenizer.render_prompt([{"role": "user", "content": "x"}]))
        return max(1, min(self.cfg.max_tokens, v.max_positions - shortest))

    def _check_ids(self, ids: list[int]) -> list[int]:
        """A prompt sent as token ids, checked against this version's vocabulary (a 400 naming the first bad id)."""
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"prompt: token id {bad} is outside this model's vocabulary of {vocab} tokens (ids 0-{vocab - 1})",
                "prompt",
                "invalid_value",
            )
        return ids

    def _sampling_params(self, req: SamplingFields, budget: int, top_logprobs: int, beams: int = 1) -> SamplingParams:
        """The engine's settings for a valid request (a 400 for values the engine refuses)."""
        bias = req.bias()
        vocab = self.engine.vocab_size
        for tid, _ in bias:
            if tid >= vocab:
                raise APIError(
                    400,
                    f"logit_bias: token id {tid} is outside the model's vocabulary (0..{vocab - 1})",
                    "logit_bias",
                    "invalid_value",
                )
        try:
            nucleus = 1.0 if req.top_p is None else req.top_p
            return SamplingParams(
                max_new_tokens=budget,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_k=1 if nucleus == 0 else req.top_k or 0,  # top_p 0: a nucleus of the likeliest token alone
                top_p=nucleus or 1.0,
                repetition_penalty=req.repetition_penalty or 1.0,
                stop_strings=req.stop_strings(),
                num_beams=beams,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias=bias,
                top_logprobs=top_logprobs,
            )
        except ConfigError as e:
            raise APIError(400, str(e), None, "invalid_value") from None

    def _fit_context(
        self, messages: list[dict[str, str]], budget: int | None, param: str
    ) -> tuple[list[dict[str, str]], int]:
        """The messages cut to the context (oldest exchanges first, :func:`fit_history`) and how many exchanges
        that dropped.

        With ``max_tokens`` given, the prompt must leave that many tokens (OpenAI's rule; else a 400). Without it,
        the history is fitted to leave the reply ``serve.max_tokens`` but at most a quarter of the context; if the
        system message and the latest user turn alone leave less, only they are kept and the reply gets the rest.
        """
        n = self.max_positions
        reserve = budget if budget is not None else min(self.cfg.max_tokens, n // 4)
        try:
            return fit_history(messages, self.tokenizer, n - reserve)
        except ContextOverflowError as e:
            if budget is None and e.needed < n:
                return fit_history(messages, self.tokenizer, e.needed)  # only the pinned messages
            pinned = (
                f"the system message and the latest user message are {e.needed} tokens as a prompt (earlier turns "
                "are dropped to fit the context, these two never are)"
            )
            bad = "messages"
            if budget is None or e.needed >= n:
                msg = f"{pinned}: more than the model's context of {n} tokens; shorten the latest message"
            elif budget >= n:
                msg, bad = (
                    f"{param}={budget} leaves no room in the model's context of {n} tokens; lower {param}",
                    param,
                )
            else:
                msg = (
                    f"{pinned}; with {param}={budget} that is more than the model's context of {n} tokens; lower "
                    f"{param} to at most {n - e.needed} or shorten the latest message"
                )
            raise APIError(400, msg, bad, "context_length_exceeded") from None

    def _finish_text(self, tokens: Sequence[int], stops: Sequence[str]) -> tuple[str, bool, bool]:
        """The visible text of a whole reply, whether the safety filter withholds it, and whether a stop string
        ended it."""
        st = TextStreamer(self.tokenizer, stops)
        for t in tokens:
            st.push(t)
        st.finish()
        flagged = self.safety is not None and self.safety.flagged(st.text)
        return (WITHHELD_NOTICE if flagged else st.text), flagged, st.stopped

    @contextlib.contextmanager
    def _refusals(self, cid: str, t0: float) -> Iterator[None]:
        """Around a route's checks (auth, admission, body): a refusal is counted and logged, and whatever ends the
        request there -- a refusal, a client gone mid-body, a bug -- gives its place in the queue back (leaked
        places would answer every later request 503 ``overloaded``)."""
        try:
            yield
        except APIError as e:
            self.admission.released(cid)
            self._count_failure(e.status, e.code)
            self._log(cid, e.status, t0, error=e.code or e.type)
            raise
        except asyncio.CancelledError:  # Serve cancels the handler when its client leaves (e.g. mid-body)
            self.admission.released(cid)
            self._log(cid, CLIENT_CLOSED_REQUEST, t0, error="client_disconnected")
            raise
        except BaseException:
            self.admission.released(cid)
            raise

    @contextlib.contextmanager
    def _released_on_error(self, cid: str) -> Iterator[None]:
        """Around :meth:`_respond`: a request that ends with an exception gives its place back (a stream whose
        response was returned gives it back when that response is over, :class:`ClosingEventSource`)."""
        try:
            yield
        except BaseException:
            self.admission.released(cid)
            raise

    def _count_failure(self, status: int, code: str | None) -> None:
        """Count a request that got no reply in ``/readyz``'s stats: ``refused`` (4xx, and the 503s that shed load or
        wait for a replacement replica: a healthy replica under overload refuses many) or ``errors`` (the server
        failed it). A client that left (499) is neither: its response is counted by code alone."""
        if status == CLIENT_CLOSED_REQUEST:
            return
        if status < 500 or code in OVERLOAD_CODES:
            self.stats.refused += 1
        else:
            self.stats.errors += 1

    def _queue_timeout(self, cid: str, t0: float, stream: bool) -> APIError:
        """The 503 of a request that reached its deadline before it joined the batch (logged and counted)."""
        waited = time.perf_counter() - t0
        self.metrics.reject(REJECT_QUEUE_TIMEOUT, self.served.name)
        self._log(cid, 503, t0, stream=stream, error=REJECT_QUEUE_TIMEOUT)
        return APIError(
            503,
            f"the request waited {waited:.1f} s for a place in the generation batch and reached its deadline "
            f"(serve.request_timeout_s={self.cfg.request_timeout_s:g}): the server is overloaded; retry after "
            f"{OVERLOAD_RETRY_AFTER_S} s",
            None,
            REJECT_QUEUE_TIMEOUT,
            "server_error",
        )

    def _failure(self, err: Exception, cid: str, t0: float, stream: bool) -> Exception:
        """What to raise for a job that failed before its response started (logged and counted): a 503
        ``queue_timeout`` for its deadline in the queue, a 503 ``model_unavailable`` when its version's scheduler
        has stopped, a 400 for a request error, else ``err`` itself (500)."""
        user_error = isinstance(err, RLChatError)
        shed = (
            REJECT_QUEUE_TIMEOUT if isinstance(err, DeadlineExceeded)
            else MODEL_UNAVAILABLE if isinstance(err, SchedulerStopped)
            else None
        )  # fmt: skip
        self._count_failure(503 if shed else 400 if user_error else 500, shed)
        if isinstance(err, DeadlineExceeded):
            return self._queue_timeout(cid, t0, stream=stream)
        if isinstance(err, SchedulerStopped):  # nothing was sent (a plain reply, or a stream before its first
            # token): safe to retry, on a replacement replica
            self._log(cid, 503, t0, stream=stream, error=MODEL_UNAVAILABLE)
            return APIError(
                503,
                f"{err}; this replica is being replaced: retry after {OVERLOAD_RETRY_AFTER_S} s",
                None,
                MODEL_UNAVAILABLE,
                "server_error",
            )
        self._log(cid, 400 if user_error else 500, t0, stream=stream, error=err.__class__.__name__)
        return APIError(400, str(err), None, "invalid_value") if user_error else err

    async def _watch(self, fut: asyncio.Future, request: Request | None) -> bool:
        """Wait for ``fut`` while watching the client (every :data:`DISCONNECT_POLL_S`): True once ``fut`` is
        done, False if the client went away first."""
        while True:
            done, _ = await asyncio.wait((fut,), timeout=DISCONNECT_POLL_S)
            if done:
                return True
            if request is not None and await request.is_disconnected():
                return False

    def _note_deadline(self, job: GenerationJob, out: JobOutput) -> None:
        """Count a reply that its deadline cut short (a ``length`` row below its budget after the deadline)."""
        if job.deadline is None or time.monotonic() < job.deadline:
            return
        budget = job.params.max_new_tokens
        if any(r == FINISH_LENGTH and len(t) < budget for t, r in zip(out.tokens, out.finish_reasons)):
            self.metrics.deadline_truncated(self.served.name)

    async def _collect(
        self, job: GenerationJob, cid: str, timer: RequestTimer, request: Request | None
    ) -> JobOutput | Exception | None:
        """Run a plain (non-streamed) job to its result, watching its client.

        Every :data:`DISCONNECT_POLL_S` the request checks ``request.is_disconnected()``; a client that went away
        (or a cancelled handler: Serve cancels it when the HTTP connection closes) gets its rows finished at the
        batch's next step, as a closed stream does, instead of generating up to ``max_tokens`` for nobody.

        Returns:
            The job's output or its exception; None when the client went away first.
        """

        async def consume() -> JobOutput | Exception:
            try:
                # closed on the way out, not by the garbage collector: the version counts the request in flight
                # until then (a removed version drains by that count), and an exception's traceback can hold the
                # generator in a cycle
                async with contextlib.aclosing(self.batcher.submit(job)) as items:
                    async for item in items:
                        n_new = sum(len(t) for t in item.tokens)
                        if n_new or item.done is not None:
                            self.admission.started(cid)
                        timer.tokens(n_new, time.perf_counter(), max(map(len, item.tokens), default=0))
                        if item.done is not None:
                            return item.done
            except Exception as e:  # noqa: BLE001 - reported like a job's own failure
                return e
            return RuntimeError("the batch ended without a result")

        task = asyncio.ensure_future(consume())
        finished = False
        try:
            if not await self._watch(task, request):
                return None
            finished = True
            return task.result()
        finally:
            self.admission.released(cid)
            if not finished:  # the batch ends these rows at its next step; the task then ends by itself
                job.control.end(range(len(job.seeds)))

    def _log(self, cid: str, status: int, t0: float, **fields: Any) -> None:
        self.metrics.response(status, bound_version_name())
        parts = " ".join(f"{k}={v}" for k, v in fields.items())
        logger.info("chat id=%s status=%d latency_ms=%.0f %s", cid, status, (time.perf_counter() - t0) * 1e3, parts)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self, request: Request) -> JSONResponse:
        """Readiness of the replica that answers (no key needed): 200 ``ready``, or 503 ``unhealthy`` naming the
        versions whose scheduler or engine process has stopped (``check_health``'s test, which makes Serve stop
        routing to the replica and replace it). Not a load balancer's probe: it is routed, queued and shed like any
        request; a load balancer probes Serve's proxy (``/-/healthz``, docs/serving.md). Paths and the pid only for
        the operator (see :meth:`_operator`)."""
        ctx = ray_serve.get_replica_context()
        st = self.models.stats()  # every version's: the request binds none
        operator = self._operator(request)
        dead, stalled = self.models.dead(), self.models.stalled(self.stall_after_s)
        return JSONResponse(status_code=503 if dead or stalled else 200, content={
            "status": "unhealthy" if dead or stalled else "ready",
            **({"dead_versions": dead} if dead else {}),
            **({"stalled_versions": stalled} if stalled else {}),
            **({"last_update_error": self._update_error_for(operator)} if self._update_error else {}),
            **({"update_pending": True} if self._updater is not None and not self._updater.done() else {}),
            "model": self.model_name,
            "checkpoint": str(self.checkpoint.path) if operator else default_model_version(self.checkpoint.path),
            "stage": self.checkpoint.stage,
            "step": self.checkpoint.step,
            "replica": ctx.replica_id.unique_id,
            **({"pid": os.getpid(), "node_id": _node_id()} if operator else {}),
            "device": self.device,
            "versions": [v.describe(operator, self.models.weights.get(n)) for n, v in self.models.versions.items()],
            "draining": [v.describe(operator) for v in self.models.draining],
            "swaps": self.models.swaps - 1,
            **({"follow": {"interval_s": self.cfg.follow_interval_s}} if self.settings.from_run else {}),
            "auth": bool(self.cfg.api_key),
            "safety_filter": self.cfg.safety_filter,
            "batching": {
                "max_batch_size": self.cfg.max_batch_size,
                "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
                "prefill_first": self.cfg.prefill_first,
            },
            "stats": {
                "requests": st.requests,
                "streams": st.streams,
                "errors": st.errors,
                "refused": st.refused,
                "batches": st.batches,
                "batched_rows": st.rows,
                "largest_batch": st.largest,
                "batch_sizes": {str(k): v for k, v in sorted(st.sizes.items())},
            },
            "load": {
                "max_queued_requests": self.cfg.max_queued_requests,
                "request_timeout_s": self.cfg.request_timeout_s,
                "waiting": len(self.admission.waiting),
                **self.metrics.snapshot(),
            },
        })  # fmt: skip

    @api.get("/v1/models", response_model=ModelList)
    async def models(self, request: Request) -> dict[str, Any]:
        """The app's model name (the alias: described by its heaviest version) and, with several versions, one card
        per version (``parent`` = the alias, ``weight`` = its share of the alias's requests)."""
        self._auth(request)
        return ModelList(data=self._cards(self._operator(request))).model_dump()

    @api.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        """One model's card (OpenAI's retrieve-model route: ``client.models.retrieve(name)``)."""
        self._auth(request)
        for c in self._cards(self._operator(request)):
            if c.id == model_id:
                return c.model_dump()
        if model_id not in self.models.aliases:  # checked without a pick: a pick takes a turn in the canary split
            self._check_model(model_id)  # not a version's name (its card is above) nor the alias's: a 404
        # a name the alias answers to (``default``, ``rlchat``): the alias's card under that name
        return self._cards(self._operator(request))[0].model_copy(update={"id": model_id}).model_dump()

    def _cards(self, operator: bool) -> list[ModelCard]:
        """The cards of ``/v1/models``: the alias, then one per version when there are several."""

        def card(model_id: str, v: ServedVersion, **extra: Any) -> ModelCard:
            path = v.checkpoint.path
            return ModelCard(
                id=model_id,
                created=int(v.loaded_at),
                checkpoint=str(path) if operator else default_model_version(path),
                stage=v.checkpoint.stage,
                step=v.checkpoint.step,
                max_model_len=v.max_positions,
                max_messages=self.cfg.max_messages,
                max_chars=self.cfg.max_chars,
                max_tokens=self._reply_limit(v),
                **extra,
            )

        cards = [card(self.model_name, self.models.default)]
        if self.models.names() != [self.model_name]:
            w = self.models.weights
            cards += [card(n, v, parent=self.model_name, weight=w.get(n)) for n, v in self.models.versions.items()]
        return cards

    @api.post(
        "/v1/chat/completions",
        responses={200: {"model": ChatCompletion, "description": "a completion, or SSE chunks with stream: true"}},
    )
    async def chat_completions(self, request: Request) -> Response:
        t0 = time.perf_counter()
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        with self._refusals(cid, t0):
            self._auth(request)
            body = await self._body(request)
            self.admission.admit(cid)
            req, ignored = parse_chat_request(body, strict=self.cfg.strict_requests)
            messages, prompt, params, dropped = self._check_limits(req)
        fmt = ChatFormat(
            cid, int(time.time()), self.served.name, self.tokenizer, bool(req.logprobs), req.include_usage()
        )
        conversation = request.headers.get(CONVERSATION_HEADER)
        with self._released_on_error(cid):
            return await self._respond(req, fmt, messages, prompt, params, dropped, ignored, t0, request, conversation)

    @api.post(
        "/v1/completions",
        responses={200: {"model": Completion, "description": "a completion, or SSE chunks with stream: true"}},
    )
    async def completions(self, request: Request) -> Response:
        """OpenAI's legacy text completions: the prompt is continued as raw text (no chat template)."""
        t0 = time.perf_counter()
        cid = f"cmpl-{uuid.uuid4().hex}"
        with self._refusals(cid, t0):
            self._auth(request)
            body = await self._body(request)
            self.admission.admit(cid)
            req, ignored = parse_completion_request(body, strict=self.cfg.strict_requests)
            self._check_model(req.model)
            text = req.text()
            if len(text) > self.cfg.max_chars:
                raise APIError(
                    400,
                    f"the prompt holds {len(text)} characters; this server accepts at most {self.cfg.max_chars}",
                    "prompt",
                    "too_many_characters",
                )
            budget = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
            if budget > self.cfg.max_tokens:
                raise APIError(
                    400,
                    f"max_tokens={budget} exceeds this server's limit of {self.cfg.max_tokens}",
                    "max_tokens",
                    "invalid_value",
                )
            ids = req.token_ids()
            prompt = self.tokenizer.encode(text) if ids is None else self._check_ids(ids)
            if len(prompt) + budget > self.max_positions:
                raise APIError(
                    400,
                    f"the prompt is {len(prompt)} tokens; with max_tokens={budget} that is more than the model's "
                    f"context of {self.max_positions} tokens; lower max_tokens or shorten the prompt",
                    "prompt",
                    "context_length_exceeded",
                )
            top = -1 if req.logprobs is None else req.logprobs
            params = self._sampling_params(req, budget, top)
        fmt = CompletionFormat(cid, int(time.time()), self.served.name, self.tokenizer, req.logprobs is not None)
        with self._released_on_error(cid):
            return await self._respond(req, fmt, None, prompt, params, 0, ignored, t0, request)

    async def _respond(
        self,
        req: SamplingFields,
        fmt: ResponseFormat,
        messages: list[dict[str, str]] | None,
        prompt: list[int],
        params: SamplingParams,
        dropped: int,
        ignored: list[str],
        t0: float,
        request: Request | None = None,
        conversation: str | None = None,
    ) -> Response:
        """Generate and answer, plain or streamed, in ``fmt``'s shape (chat or text completion). A plain request
        whose client goes away while it waits is cancelled (:meth:`_collect`). ``conversation``: the client's
        conversation id, stored with the completion."""
        cid = fmt.cid
        seeds = row_seeds(req.seed, req.choices())
        headers = {COMPLETION_ID_HEADER: cid, DROPPED_TURNS_HEADER: str(dropped), VERSION_HEADER: fmt.model}
        if ignored:
            # header values are latin-1 on the wire: percent-encode whatever a client put in its key names
            headers[IGNORED_FIELDS_HEADER] = ",".join(quote(k, safe="[]._-") for k in ignored)[:1000]
            logger.info("chat id=%s ignored unknown request fields: %s", cid, headers[IGNORED_FIELDS_HEADER])
        if self.cfg.log_bodies:
            logged = messages if messages is not None else self.tokenizer.decode(prompt)
            logger.info("chat id=%s messages=%s", cid, json.dumps(logged, ensure_ascii=False))
        if req.stream:
            self.stats.streams += 1
            job = GenerationJob(
                tuple(prompt),
                params,
                seeds,
                deadline=self.admission.deadline(t0),
                delivery_interval_s=self.cfg.stream_interval_s,
                streamed=True,
            )
            items = SubmittedNow(self.batcher.submit(job))  # queued now, not once the response starts
            # The response starts once the job has its first item: a refusal before it (its deadline in the queue,
            # a failed prefill) is then a real status, a 503 with Retry-After the SDKs retry, not an error chunk
            # after a 200.
            first = items.first()
            assert first is not None  # nothing has taken it yet
            started = False
            try:
                started = await self._watch(first, request)
            finally:  # not started: the client went away, or Serve cancelled the handler when its connection closed
                if not started:
                    self.admission.released(cid)  # its place in the queue
                    job.control.end(range(len(seeds)))
                    await items.aclose()
                    self._log(cid, CLIENT_CLOSED_REQUEST, t0, stream=True, error="client_disconnected")
            if not started:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            self.admission.started(cid)  # it has its first item: no longer waiting, whatever happens to the response
            refused = _refused_before_start(first)
            if refused is not None:
                await items.aclose()
                raise self._failure(refused, cid, t0, stream=True)
            outcome = _StreamOutcome()
            events = self._stream(req, fmt, messages, prompt, params, job, items, t0, outcome, conversation)

            async def over() -> None:  # however the response ended, even before its generator started
                self.admission.released(cid)
                await items.aclose()  # ends the job's rows unless it is done
                if not outcome.logged:  # the client was gone before the first event: the generator never ran
                    outcome.logged = True
                    self._log(cid, CLIENT_CLOSED_REQUEST, t0, stream=True, error="client_disconnected")

            return ClosingEventSource(events, ping=15, headers=headers, on_close=over)

        self.stats.requests += 1
        # its steps' tokens in one item per PLAIN_DELIVERY_S: only the first (TTFT) and the result matter here
        job = GenerationJob(
            tuple(prompt), params, seeds, deadline=self.admission.deadline(t0), delivery_interval_s=PLAIN_DELIVERY_S
        )
        try:
            out = await self._collect(job, cid, self.metrics.timer(t0, fmt.model), request)
        except asyncio.CancelledError:  # Serve cancels the handler when the client's connection closes
            self._log(cid, CLIENT_CLOSED_REQUEST, t0, stream=False, error="client_disconnected")
            raise
        if out is None:  # the client went away: its rows were cancelled, nobody reads an answer
            self._log(cid, CLIENT_CLOSED_REQUEST, t0, stream=False, error="client_disconnected")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if isinstance(out, Exception):
            raise self._failure(out, cid, t0, stream=False)
        choices: list[PlainChoice] = []
        texts: list[str | None] = []
        reasons: list[str] = []
        for i, (tokens, reason) in enumerate(zip(out.tokens, out.finish_reasons)):
            text, flagged, stopped = self._finish_text(tokens, params.stop_strings)
            if flagged:
                reason = "content_filter"
            elif stopped:
                reason = FINISH_STOP
            alts = out.alternatives[i] if out.alternatives is not None and not flagged else None
            choices.append((i, text, reason, [] if flagged else tokens, alts))  # nothing of a flagged reply leaves
            texts.append(None if flagged else text)
            reasons.append(reason)
        self._note_deadline(job, out)
        n_out = sum(len(t) for t in out.tokens)
        usage = Usage(prompt_tokens=len(prompt), completion_tokens=n_out, total_tokens=len(prompt) + n_out)
        if messages is not None:
            self.feedback.remember(cid, self.model_version, messages, texts, conversation)
        self._log(
            cid,
            200,
            t0,
            stream=False,
            n=len(seeds),
            messages=len(messages or ()),
            dropped_turns=dropped,
            prompt_tokens=len(prompt),
            completion_tokens=n_out,
            finish=",".join(reasons),
        )
        if self.cfg.log_bodies:
            logger.info("chat id=%s replies=%s", cid, json.dumps(texts, ensure_ascii=False))
        # with log-probs the body can be megabytes (n=16 x top_logprobs=20): written on a worker thread, so the
        # event loop goes on serving every other request meanwhile
        if fmt.logprobs:
            body = await asyncio.to_thread(fmt.plain_body, choices, usage)
        else:
            body = fmt.plain_body(choices, usage)
        return Response(body, media_type="application/json", headers=headers)

    async def _stream(
        self,
        req: SamplingFields,
        fmt: ResponseFormat,
        messages: list[dict[str, str]] | None,
        prompt: list[int],
        params: SamplingParams,
        job: GenerationJob,
        items: SubmittedNow,
        t0: float,
        outcome: _StreamOutcome,
        conversation: str | None = None,
    ) -> AsyncIterator[dict[str, str]]:
        """SSE events of one streamed completion (OpenAI chunk format, then ``[DONE]``) of ``job``, whose ``items``
        were submitted already."""

        cid = fmt.cid
        n = len(job.seeds)
        holdback = SAFETY_HOLDBACK_CHARS if self.safety is not None else 0
        choices = [StreamedChoice(TextStreamer(self.tokenizer, params.stop_strings, holdback)) for _ in range(n)]
        # the item's tokens at once (to a stop string); token by token when the safety filter checks the text or
        # log-probs wait for their text
        one_by_one = self.safety is not None or fmt.logprobs
        reasons: list[str] = [FINISH_LENGTH] * n
        done = False
        first_token_ms = None
        timer = self.metrics.timer(t0, fmt.model)
        last: list[str] = []  # the closing chunks (or the in-band error), written once the reply is recorded

        try:
            first = fmt.first_chunk(n)
            if first is not None:
                yield {"data": first}
            result: JobOutput | Exception = RuntimeError("the batch ended without a result")

            def flush(i: int) -> str:
                return fmt.delta_chunk(i, *choices[i].take())

            arrived = items.first_at  # the first item's arrival, not when this generator got to it (headers, role)
            async for item in items:
                now, arrived = (time.perf_counter() if arrived is None else arrived), None
                n_new = sum(len(t) for t in item.tokens)
                if n_new or item.done is not None:
                    self.admission.started(cid)
                timer.tokens(n_new, now, max(map(len, item.tokens), default=0))
                if first_token_ms is None and any(item.tokens):
                    first_token_ms = (now - t0) * 1e3
                for i, toks in enumerate(item.tokens):
                    c = choices[i]
                    alts = item.alternatives[i] if item.alternatives is not None else None
                    if one_by_one:
                        c.push(toks, alts, self.safety)
                    else:
                        c.push_many(toks)
                    if c.over:
                        job.control.end([i])  # no more tokens needed: the batch ends this row
                    if c.sendable and now - c.last_sent >= self.cfg.stream_interval_s:
                        yield {"data": flush(i)}
                        c.last_sent = now
                if item.done is not None:
                    result = item.done
                    break
            for i in range(n):
                if choices[i].sendable:
                    yield {"data": flush(i)}
            if isinstance(result, Exception):
                raise result
            self._note_deadline(job, result)
            reasons = list(result.finish_reasons)
            done = True
            finals = []
            for i, c in enumerate(choices):
                if not c.withheld and c.finish(self.safety):
                    last.append(flush(i))
                if c.withheld:
                    last.append(fmt.delta_chunk(i, ("\n" if c.sent else "") + WITHHELD_NOTICE, [], []))
                    reasons[i] = "content_filter"
                elif c.streamer.stopped:
                    reasons[i] = FINISH_STOP
                finals.append((i, reasons[i]))
            last.append(fmt.final_chunk(finals))
            n_out = sum(c.count for c in choices)
            if req.include_usage():
                usage = Usage(prompt_tokens=len(prompt), completion_tokens=n_out, total_tokens=len(prompt) + n_out)
                last.append(fmt.usage_chunk(usage))
            last.append("[DONE]")
            # recorded (ratable by its id) and counted before the closing chunks go: a client that closes the
            # connection once it has its finish_reason, before [DONE], has had its whole reply
            if messages is not None:
                texts = [None if c.withheld else c.streamer.text for c in choices]
                self.feedback.remember(cid, self.model_version, messages, texts, conversation)
            self._log(
                cid,
                200,
                t0,
                stream=True,
                n=n,
                messages=len(messages or ()),
                prompt_tokens=len(prompt),
                completion_tokens=n_out,
                first_token_ms=f"{first_token_ms or 0:.0f}",
                finish=",".join(reasons),
            )
            outcome.logged = True
        except Exception as e:  # noqa: BLE001 - the response has started: report in-band, as OpenAI does
            # (a deadline in the queue cannot reach here: the response starts with the job's first item)
            done = True
            user_error = isinstance(e, RLChatError)
            self._count_failure(400 if user_error else 500, None)
            if not user_error:
                logger.exception("chat id=%s: generation failed", cid)
            self._log(cid, 400 if user_error else 500, t0, stream=True, error=e.__class__.__name__)
            outcome.logged = True
            kind = "invalid_request_error" if user_error else "server_error"
            msg = str(e) if user_error else f"generation failed ({e.__class__.__name__}); see the replica log"
            last = [json.dumps(error_body(msg, kind)), "[DONE]"]
        finally:
            self.admission.released(cid)
            if done:
                await items.aclose()  # its version stops counting it in flight now, not when it is collected
            else:  # the client went away: the batch ends this request's rows at its next step
                job.control.end(range(n))
                await items.aclose()
                if not outcome.logged:
                    outcome.logged = True
                    self._log(
                        cid,
                        CLIENT_CLOSED_REQUEST,
                        t0,
                        stream=True,
                        error="client_disconnected",
                        completion_tokens=sum(c.count for c in choices),
                    )
        for data in last:  # recorded and counted already: a client may close once it has its finish_reason
            yield {"data": data}

    def _feedback_client(self, request: Request) -> str:
        """Whom the feedback rate limit counts: the client's address; behind ``serve.ingress: haproxy`` the ingress
        as a whole. Ray's HAProxy reaches the replica from loopback and sets no ``X-Forwarded-For``, and uvicorn
        trusts that header from loopback, so there the address is whatever the client wrote in it."""
        if self._behind_haproxy:
            return "haproxy"
        return request.client.host if request.client is not None else "?"

    @api.post("/v1/feedback")
    async def feedback_route(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        self.feedback.rate_limit(self._feedback_client(request))
        fb = parse_feedback_request(await self._body(request), strict=self.cfg.strict_requests)
        messages = len(fb.messages or ()) + len(fb.prompt or ())
        if messages > self.cfg.max_messages:
            raise APIError(
                400,
                f"the feedback holds {messages} messages; this server accepts at most {self.cfg.max_messages}",
                "prompt" if fb.prompt else "messages",
                "too_many_messages",
            )
        for what, chars in zip(("conversation", "reply text"), fb.text_chars()):
            if chars > self.cfg.max_chars:
                raise APIError(
                    400,
                    f"the feedback's {what} holds {chars} characters; this server accepts at most "
                    f"{self.cfg.max_chars}",
                    None,
                    "too_many_characters",
                )
        return await self.feedback.record(fb, self.model_version)

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica (a rolling update, a scale-down, ``serve shutdown``), once its
        requests are done or ``graceful_shutdown_timeout_s`` is near: the request rows still queued for the feedback
        store are written (they died with the process before) and the engines are stopped. Serve's FastAPI ingress
        wrapper runs the ASGI app's shutdown first, then this. Bounded: half of :data:`SHUTDOWN_MARGIN_S` for the rows,
        so the replica is done before Serve kills it even after a request that used its whole lifetime."""
        pending = [t for t in (self._follower, self._updater) if t is not None and not t.done()]
        for task in pending:  # a load they began is closed when it finishes (ModelSet.apply)
            task.cancel()
        if pending:
            await asyncio.wait(pending)  # not swapped in after the set below is closed
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self.feedback.close, SHUTDOWN_MARGIN_S / 2)
            await loop.run_in_executor(None, self.models.close_all)
        except Exception:  # noqa: BLE001 - a destructor must not raise: log what failed
            logger.exception("stopping the replica")

    def check_health(self) -> None:
        """Serve's periodic health check: every served version's scheduler must still accept work (a dead canary
        would fail its share of the traffic, and every request naming it, until the replica is replaced)."""
        self._serving = True  # health checks begin once the replica runs: config updates no longer fail it
        if self.settings.from_run and self._follower is None:
            self._start_follower()  # the constructor had no running event loop to start it on
        dead = self.models.dead()
        if dead:
            raise RuntimeError(f"the scheduler of model version(s) {', '.join(dead)} has stopped")
        stalled = self.models.stalled(self.stall_after_s)
        if stalled:
            why = (
                f"model version(s) {', '.join(stalled)} made no progress for {self.stall_after_s:g} s with requests "
                "in flight: a hung engine"
            )
            logger.error("%s; stopping it, so its requests can be retried, and Serve replaces the replica", why)
            for name in stalled:
                self.models.versions[name].abort(why)
            raise RuntimeError(f"{why} (see the replica's log and stderr); Serve replaces the replica")


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------


def build_app(args: dict[str, Any]) -> "Application":
    """The Serve application builder (``serve run serve.app:build_app checkpoint=...`` / ``serve_config.yaml``).

    Args:
        args: see :func:`resolve_settings`.
    """
    settings = ship_checkpoints(resolve_settings(args))  # builders run with Ray connected
    s = settings.config.serve
    warning = exposure_warning(s.host, s.api_key) if "host" in args else None
    if warning:
        logger.warning(warning)
    return ChatServer.options(**deployment_options(settings)).bind(settings)
