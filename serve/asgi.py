"""The HTTP layer around the chat replica: the FastAPI app that ``serve.app.ChatServer`` is the ingress of, its
OpenAPI spec (with the request bodies the routes parse themselves), its ASGI middleware (CORS, Ray Serve's cancelled
``receive()`` read as the client's disconnect, the request's model version scope), the OpenAI-style error handlers,
and the SSE response that gives a stream's place back however it ended.

Why apart from :mod:`serve.app`: none of it knows about models, batching or admission; it is what every route shares
before and after the replica's own work.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' real annotations (see serve/app.py).
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from ray.exceptions import TaskCancelledError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlchat.core.feedback_store import RETRY_AFTER_S
from rlchat.core.text_stream import CONVERSATION_HEADER, DROPPED_TURNS_HEADER
from serve.models import VERSION_HEADER, VersionScope
from serve.schemas import (
    IGNORED_FIELDS_HEADER,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    error_body,
)
from serve.settings import OVERLOAD_RETRY_AFTER_S

logger = logging.getLogger("ray.serve").getChild("rlchat")

COMPLETION_ID_HEADER = "X-RLChat-Completion-Id"
"""Response header: the completion's ``id`` (the key of ``/v1/feedback``). ``X-Request-Id`` is Ray Serve's own
request id (the client's, when it sent one), as OpenAI's ``x-request-id`` is a request id, not the completion's."""
EXPOSED_HEADERS = ("X-Request-Id", COMPLETION_ID_HEADER, DROPPED_TURNS_HEADER, IGNORED_FIELDS_HEADER, VERSION_HEADER)
"""Response headers a browser page on an allowed CORS origin may read."""
MODEL_UNAVAILABLE = "model_unavailable"
"""``code`` of the 503 for a request to a version whose scheduler has stopped, until Serve replaces the replica."""
OVERLOAD_CODES = ("overloaded", "queue_timeout", MODEL_UNAVAILABLE)
"""``code`` of the 503s that shed load or wait for a replacement replica (``Retry-After``:
:data:`serve.settings.OVERLOAD_RETRY_AFTER_S`)."""
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}
"""``code`` of the statuses Starlette's router answers itself (an unknown route, a wrong method)."""


api = FastAPI(
    title="rlchat",
    description="OpenAI-compatible chat completions from an rlchat checkpoint.",
    version="1",
)


REQUEST_BODIES: dict[tuple[str, str], type] = {
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/feedback", "post"): FeedbackRequest,
}
"""Request models of the routes that parse their raw body themselves (strict JSON, OpenAI-style errors): the
OpenAPI spec gets them as request bodies, so ``/docs`` and schema-driven clients see every accepted field."""


def _openapi() -> dict[str, Any]:
    """FastAPI's spec plus the request bodies of :data:`REQUEST_BODIES` (cached, as FastAPI does)."""
    if api.openapi_schema:
        return api.openapi_schema
    spec = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for (path, method), model in REQUEST_BODIES.items():
        op = spec.get("paths", {}).get(path, {}).get(method)
        if op is None:
            continue
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    api.openapi_schema = spec
    return spec


api.openapi = _openapi  # type: ignore[method-assign]

CORS_ORIGINS: list[tuple[str, ...]] = [()]
"""``serve.cors_origins`` of this process's replica (set in :class:`ChatServer`); empty = no CORS headers."""


class CancelledReceiveIsDisconnect:
    """ASGI middleware: a ``receive()`` that Ray Serve cancelled reads as the client's ``http.disconnect``.

    Once a client has gone, Serve's proxy cancels its request, and a ``receive()`` still waiting raises
    ``TaskCancelledError`` instead of returning the disconnect that ASGI servers send. Whatever was waiting then
    failed as an internal error, logged at ERROR with one or two ~70-line tracebacks: ``sse_starlette``'s listener
    for the disconnect of every stream closed mid-reply, and the body read of a client that gave up before its body
    was read (~870 in a 12-minute soak, ``bench/serve_soak.py``). As a disconnect, they are the 499s they are.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def receive_or_disconnect() -> dict[str, Any]:
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect, send)


class CORSMiddleware:
    """CORS for the origins in ``serve.cors_origins`` (off by default): answers preflights and adds the
    Access-Control headers. Plain ASGI (not ``BaseHTTPMiddleware``), so streams and client disconnects pass
    through untouched; the origins are read per request because each replica sets them from its config."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        origins = CORS_ORIGINS[0]
        if scope["type"] != "http" or not origins:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is None or ("*" not in origins and origin not in origins):
            return await self.app(scope, receive, send)
        cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            # Any header the browser asks for (as Starlette's allow_headers=["*"]): SDKs add their own on every
            # request (the OpenAI JavaScript SDK's x-stainless-*), and a preflight that leaves one out fails them all.
            # The origin check above is the access control; auth is still the API key.
            asked = headers.get("access-control-request-headers", "")
            cors.update(
                {
                    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                    "Access-Control-Allow-Headers": ", ".join(
                        [
                            "Authorization",
                            "Content-Type",
                            CONVERSATION_HEADER,
                            *filter(None, map(str.strip, asked.split(","))),
                        ]
                    ),
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin, Access-Control-Request-Headers",
                }
            )
            return await Response(status_code=204, headers=cors)(scope, receive, send)
        cors["Access-Control-Expose-Headers"] = ", ".join(EXPOSED_HEADERS)

        async def send_with_cors(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in cors.items()
                ]
            await send(message)

        return await self.app(scope, receive, send_with_cors)


api.add_middleware(CORSMiddleware)
api.add_middleware(CancelledReceiveIsDisconnect)
api.add_middleware(VersionScope)  # a request's version binding ends with the request (serve/models.py)


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    if e.status == 503:
        headers = {"Retry-After": str(OVERLOAD_RETRY_AFTER_S if e.code in OVERLOAD_CODES else RETRY_AFTER_S)}
    if e.status == 429:
        headers = {"Retry-After": "60"}
    if e.status == 409:  # final (a changed rating): the openai SDK retries 409s unless told not to
        headers = {"X-Should-Retry": "false"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    msg = f"{request.method} {request.url.path}: {e.detail}"
    code = HTTP_ERROR_CODES.get(e.status_code)
    # e.headers carries what the status requires, e.g. a 405's ``Allow`` (the routes' methods)
    return JSONResponse(
        error_body(msg, "invalid_request_error", None, code), status_code=e.status_code, headers=e.headers
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(f"invalid request: {e.errors()[:1]}"), status_code=400)


@api.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    logger.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body(f"internal server error ({e.__class__.__name__}); see the replica log", "server_error"),
        status_code=500,
    )


DONE_EVENT = b"data: [DONE]"
"""The stream's last SSE event (OpenAI's), as it starts on the wire."""


class ClosingEventSource(EventSourceResponse):
    """An SSE response that runs ``on_close`` once it is over, however it ended, and sends its ``[DONE]`` event
    together with the end of the body.

    ``on_close``: a stream's generator gives its place back in its ``finally``, but one that never started (the
    client gone before the first event was sent) never runs it: the place stayed taken until the stale sweep.

    ``[DONE]`` with the end: OpenAI's synchronous SDK closes the connection as soon as it has read ``[DONE]``.
    ``sse_starlette`` ends the body with a message of its own, which through Serve's proxy is a Ray message and a
    write of its own, so the chunked terminator often came after that close: the proxy logged the client as
    disconnected and cancelled a finished request (23% of the requests of 16 streaming clients), and the connection
    could not be reused. Held back until the end's message, ``[DONE]`` goes in the same message, so in one write.
    """

    def __init__(self, *args: Any, on_close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        held: dict[str, Any] | None = None  # the [DONE] event, until the message that ends the body

        async def send_done_with_end(message: dict[str, Any]) -> None:
            nonlocal held
            if message["type"] == "http.response.body":
                if held is not None:
                    if message.get("more_body", False) and message.get("body", b"").startswith(b":"):
                        await send(message)  # a keep-alive ping (a comment clients ignore) goes first
                        return
                    done, held = held, None
                    if not message.get("more_body", False) and not message.get("body"):
                        await send({**done, "more_body": False})
                        return
                    await send(done)  # an event came after [DONE] (not ours): everything in order
                if message.get("more_body", False) and message.get("body", b"").startswith(DONE_EVENT):
                    held = message
                    return
            await send(message)

        try:
            await super().__call__(scope, receive, send_done_with_end)
        finally:
            await self._on_close()
