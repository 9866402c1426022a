"""OpenAI-compatible request and response models (pydantic), published in the OpenAPI spec, plus error bodies.

What real clients send is accepted (issue #13): the OpenAI SDKs, LangChain-style wrappers and chat UIs routinely
send null or default values of features this server does not have (``"tools": null``, ``"tool_choice": "none"``,
``"response_format": {"type": "text"}``, an echoed assistant message with ``"refusal": null``), and no-op fields
(``store``, ``metadata``, ``user``, ``service_tier``, ``parallel_tool_calls``). Those behave as absent. A request for
something the engine truly cannot do (a non-empty ``tools`` list, ``response_format`` ``json_schema``, a ``tool``
message) is a 400 that names the field and the alternative. Keys OpenAI does not define are ignored and named in
the ``X-RLChat-Ignored-Fields`` response header (vLLM's choice: accept and warn), or rejected with a 400
``unrecognized_parameter`` when ``serve.strict_requests`` is on.

Extensions beyond OpenAI's fields follow vLLM's names: ``top_k``, ``repetition_penalty``; plus ``num_beams``
(deterministic beam search, what ``rlchat chat --beams`` uses against an endpoint).

Validation is done on the parsed JSON in pydantic's strict mode, so a string where a number belongs
(``"temperature": "0.5"``) is an error, as on OpenAI, instead of being coerced.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_CHARS = 1000
"""Longest stop string accepted: ample for any real stop sequence, and it bounds the work of matching them."""


IGNORED_FIELDS_HEADER = "X-RLChat-Ignored-Fields"
"""Response header naming the request keys the server did not recognise and ignored (comma-separated paths)."""

# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """The JSON body of an OpenAI API error: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """A request the server refuses, with the HTTP status and the OpenAI-style error fields.

    Args:
        status: HTTP status code (400 invalid request, 401 auth, 404 unknown model/id, 413 body too large, 429 rate
            limited, 503 store unavailable).
        message: what was wrong and how to fix it.
        param: the offending request parameter (dotted path), when there is one.
        code: a machine-readable code (``unsupported_parameter``, ``context_length_exceeded``, ...).
        type_: the OpenAI error type.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def unsupported(param: str, message: str) -> APIError:
    """A 400 ``unsupported_parameter`` naming ``param``; ``message`` says what is not supported and the alternative."""
    return APIError(400, f"{param}: {message}", param, "unsupported_parameter")


_UNION_TAGS = ("str", "list[TextPart]", "function-after[_check(), str]", "FeedbackRef", "list[str]", "none")


def _loc(loc: tuple[Any, ...]) -> str:
    """pydantic error location -> ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or (isinstance(part, str) and part.startswith(("list[", "dict[", "literal["))):
            continue  # union-branch tags are noise in a user-facing path
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the parameter, what was expected and what was found."""
    errors = e.errors(include_url=False)
    if not errors:
        return APIError(400, "invalid request body", None, "invalid_value")
    err = errors[0]
    param = _loc(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return APIError(
            400, f"the request body is not valid JSON ({err.get('msg')}); send a JSON object", None, "invalid_value"
        )
    if kind == "model_type" or (not param and kind.endswith("_type")):
        return APIError(400, "the request body must be a JSON object of request parameters", None, "invalid_value")
    if kind == "missing":
        return APIError(400, f"missing required parameter: {param}", param, "missing_required_parameter")
    found = err.get("input")
    shown = repr(found)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return APIError(400, f"invalid value for {param}: {err.get('msg')} (found {shown})", param, "invalid_value")


# --------------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    """Unknown keys are kept in ``model_extra`` so the app can name them (header) or refuse them (strict mode)."""

    model_config = ConfigDict(extra="allow", strict=True)


def extra_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the keys of ``model`` (and its nested models) that no field declares."""
    out = [f"{prefix}{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                where = f"{prefix}{name}[{i}]." if isinstance(value, list) else f"{prefix}{name}."
                out += extra_fields(item, where)
    return out


class TextPart(_Lenient):
    """One part of a message's content list; only text parts are accepted (the model reads text only)."""

    type: Literal["text"]
    text: str


class RefusalPart(_Lenient):
    """An assistant turn's refusal as a content part (as OpenAI's SDK types echo one back); read as its text."""

    type: Literal["refusal"]
    refusal: str


class ChatMessage(_Lenient):
    """One message of the conversation. ``developer`` is OpenAI's newer name for ``system``.

    ``name``, ``refusal`` (an echoed assistant message), and null / empty ``tool_calls`` / ``function_call`` /
    ``audio`` are accepted. An assistant message whose ``content`` is null reads as its ``refusal`` (or empty).
    """

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Annotated[TextPart | RefusalPart, Field(discriminator="type")]] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None

    def text(self) -> str:
        """The content as one string (text parts are concatenated)."""
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, TextPart) else p.refusal for p in self.content)

    def as_message(self) -> dict[str, str]:
        """``{"role", "content"}`` in rlchat's chat template roles."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}

    def check(self, where: str) -> None:
        """Refuse what only tool calling could mean; a 400 naming the field and the alternative."""
        if self.role in ("tool", "function"):
            raise unsupported(
                f"{where}.role",
                f"{self.role!r} messages carry tool results, and tool calling is not supported; send the result as "
                "a user message instead",
            )
        if self.tool_calls or self.function_call or self.audio:
            field = "tool_calls" if self.tool_calls else "function_call" if self.function_call else "audio"
            raise unsupported(
                f"{where}.{field}",
                "tool calls / audio in messages are not supported; send the assistant's text as content",
            )
        if self.content is None and self.role != "assistant":
            raise APIError(
                400,
                f"{where}.content: a {self.role} message needs content (a string)",
                f"{where}.content",
                "missing_required_parameter",
            )


class StreamOptions(_Lenient):
    include_usage: bool | None = None
    """Send a last chunk (empty ``choices``) carrying the ``usage`` of the whole request."""
    include_obfuscation: bool | None = None
    """Accepted and ignored: chunks carry no random padding (a mitigation for networks this endpoint is not on)."""


class ResponseFormat(_Lenient):
    """Only ``{"type": "text"}`` (the default) is served; JSON modes are refused with a 400."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingFields(_Lenient):
    """Decoding fields shared by chat completions and completions."""

    model: str | None = None
    """The model to use: the served model's name (``GET /v1/models``); optional."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)  # 0 (OpenAI allows it): the likeliest token only
    n: int | None = Field(default=None, ge=1, le=16)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """Subtracted from the logit of every token that already occurs in the reply (OpenAI's definition)."""
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """Subtracted from a token's logit once per time it already occurs in the reply."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias in [-100, 100] added to its logit before sampling."""
    user: str | None = None
    """Accepted and ignored (no per-user state)."""
    # extensions (vLLM names)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def choices(self) -> int:
        return 1 if self.n is None else self.n

    def include_usage(self) -> bool:
        return bool(self.stream_options is not None and self.stream_options.include_usage)

    def bias(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as sorted ``(token id, bias)`` pairs (a 400 for keys that are not ids or out-of-range
        biases; ids beyond the vocabulary are checked by the app)."""
        out = []
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 18:  # "²".isdigit() holds, but int("²") fails
                raise APIError(
                    400,
                    f'logit_bias: key {key!r} is not a token id; use token ids as strings, e.g. {{"1234": -100}}',
                    "logit_bias",
                    "invalid_value",
                )
            if not -100.0 <= value <= 100.0:
                raise APIError(
                    400, f"logit_bias[{key}]={value}: expected a bias in [-100, 100]", "logit_bias", "invalid_value"
                )
            out.append((int(key), float(value)))
        return tuple(sorted(out))

    def check_common(self) -> None:
        stops = self.stop_strings()
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: expected up to 4 non-empty strings", "stop", "invalid_value")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(
                400, f"stop: each stop string may be at most {MAX_STOP_CHARS} characters", "stop", "invalid_value"
            )
        self.bias()


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions`` body. Ranges that depend on the server's limits are checked by the app."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """The reply budget; wins over ``max_tokens`` (as on OpenAI)."""
    logprobs: bool | None = None
    """Return each reply token's log-prob (``choices[i].logprobs.content``)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With ``logprobs``: also the this many likeliest tokens at each position."""
    # accepted no-ops: null / default values of features the engine does not have
    store: bool | None = None
    """Accepted and ignored: nothing is stored for OpenAI's dashboard (``POST /v1/feedback`` keeps feedback)."""
    metadata: dict[str, str] | None = None
    """Accepted and ignored."""
    service_tier: str | None = None
    """Accepted and ignored (one tier)."""
    parallel_tool_calls: bool | None = None
    """Accepted without tools (no tools are called)."""
    tools: list[dict[str, Any]] | None = None
    """Only null or an empty list: tool calling is not supported."""
    tool_choice: str | dict[str, Any] | None = None
    """Only null, ``"none"`` or ``"auto"`` (without tools both mean: answer in text)."""
    functions: list[dict[str, Any]] | None = None
    """Deprecated form of tools: only null or an empty list."""
    function_call: str | dict[str, Any] | None = None
    """Deprecated form of tool_choice: only null, ``"none"`` or ``"auto"``."""
    response_format: ResponseFormat | None = None
    """Only ``{"type": "text"}``."""
    modalities: list[str] | None = None
    """Only ``["text"]``."""
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    safety_identifier: str | None = None
    """Accepted and ignored, as ``user`` (no per-user state)."""
    prompt_cache_key: str | None = None
    """Accepted and ignored (prompt caching is not exposed)."""
    prompt_cache_retention: str | None = None
    """Accepted and ignored."""
    prompt_cache_options: dict[str, Any] | None = None
    """Accepted and ignored."""
    verbosity: str | None = None
    """Accepted and ignored (a hint; the model has no verbosity setting)."""
    moderation: dict[str, Any] | None = None
    """Only null or ``{}``: the server's own filter is ``serve.safety_filter``."""
    # extension
    num_beams: int | None = Field(default=None, ge=1, le=8)
    """Deterministic beam search of this width (``n`` must be 1)."""

    def budget(self) -> int | None:
        """The requested completion-token budget (``max_completion_tokens`` wins, as on OpenAI)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        """Refuse what the engine cannot do (400 naming the field and the alternative); the rest is a no-op."""
        self.check_common()
        for i, m in enumerate(self.messages):
            m.check(f"messages[{i}]")
        no_tools = "tool calling is not supported by the rlchat engine; describe the tool in the system message and "
        no_tools += "parse the reply text instead"
        for key in ("tools", "functions"):
            if getattr(self, key):
                raise unsupported(key, no_tools)
        for key in ("tool_choice", "function_call"):
            value = getattr(self, key)
            if value is not None and value not in ("none", "auto"):
                raise unsupported(key, f"{value!r} asks for a tool call; {no_tools}")
        rf = self.response_format
        if rf is not None and rf.type != "text":
            raise unsupported(
                "response_format",
                f"{rf.type!r} (structured output) is not supported; ask for the format in the prompt and validate "
                'the reply yourself, or send {"type": "text"}',
            )
        if self.modalities is not None and self.modalities not in (["text"], []):
            raise unsupported("modalities", 'only text output is supported; send ["text"] or leave it out')
        for key, why in (
            ("audio", "audio output is not supported; leave it out"),
            ("prediction", "predicted outputs are not supported; leave it out"),
            ("web_search_options", "web search is not supported; put the text in the messages instead"),
        ):
            if getattr(self, key):
                raise unsupported(key, why)
        if self.reasoning_effort is not None:
            raise unsupported("reasoning_effort", "the model has no reasoning-effort setting; leave it out")
        if self.moderation:  # asked to moderate: ignoring it would leave the client believing it happened
            raise unsupported(
                "moderation",
                "per-request moderation is not supported; the server's safety filter is serve.safety_filter",
            )
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        if (self.num_beams or 1) > 1:
            if self.choices() > 1:
                raise APIError(400, "num_beams > 1 is deterministic: use n=1 with it", "n", "invalid_value")
            for key in ("logprobs", "presence_penalty", "frequency_penalty", "logit_bias"):
                if getattr(self, key):
                    raise unsupported(key, "not available with beam search (num_beams > 1); use num_beams=1")


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` body (OpenAI's legacy text completions): the prompt is continued as raw text, with
    no chat template. One prompt per request."""

    prompt: str | list[str] | list[int] | list[list[int]]
    """The text to continue, or its token ids (OpenAI's forms: a list holding one string, or one list of ids, is
    accepted too)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """The completion budget; default 16, as on OpenAI."""
    logprobs: int | None = Field(default=None, ge=0, le=20)
    """Return each completion token's log-prob and this many likeliest tokens at each position."""
    echo: bool | None = None
    """Only false: the prompt is not repeated in the completion."""
    suffix: str | None = None
    """Only null (no insertion)."""
    best_of: int | None = Field(default=None, ge=1, le=16)
    """Only null or equal to ``n`` (no server-side ranking)."""

    def token_ids(self) -> list[int] | None:
        """The prompt's token ids when it was sent as ids, else None."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            return list(p)  # type: ignore[arg-type]
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], list):
            return list(p[0])
        return None

    def text(self) -> str:
        """The prompt's text ("" when it was sent as token ids)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if self.prompt and isinstance(self.prompt[0], str) else ""

    def check(self) -> None:
        self.check_common()
        ids = self.token_ids()
        if ids is not None:
            if any(t < 0 for t in ids):
                raise APIError(400, "prompt: token ids are non-negative integers", "prompt", "invalid_value")
            if not ids:
                raise APIError(400, "prompt: expected at least one token id", "prompt", "invalid_value")
            return self._check_options()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise unsupported("prompt", f"send one prompt per request (found a list of {len(self.prompt)})")
        if not self.text():
            raise APIError(400, "prompt: expected non-empty text or token ids", "prompt", "invalid_value")
        self._check_options()

    def _check_options(self) -> None:
        if self.echo:
            raise unsupported("echo", "the prompt is not echoed; prepend it to the completion yourself")
        if self.suffix:
            raise unsupported("suffix", "insertion (suffix) is not supported; leave it out")
        if self.best_of is not None and self.best_of != self.choices():
            raise unsupported("best_of", "server-side ranking is not supported; use n and pick a choice yourself")


class FeedbackRef(_Lenient):
    """A reference to one choice of an earlier completion."""

    completion_id: str = Field(max_length=200)
    choice_index: int = Field(default=0, ge=0, le=64)


class FeedbackRequest(_Lenient):
    """``POST /v1/feedback``: a thumbs rating, or a preference between two replies.

    Three shapes:
      - thumbs: ``{"completion_id", "choice_index"?, "rating": "up"|"down"}`` (``messages`` + ``content`` may be
        sent too, so any replica, or a restarted one, can record it without its completion cache);
      - preference by id: ``{"chosen": {"completion_id", "choice_index"?}, "rejected": {...}}``;
      - preference by text: ``{"prompt": [messages], "chosen": "text", "rejected": "text"}`` (the record format of
        ``rlchat rm`` itself).
    Text sent by the client is stored marked as client text (untrusted); sizes are limited by ``serve.max_chars``.
    """

    completion_id: str | None = Field(default=None, max_length=200)
    choice_index: int = Field(default=0, ge=0, le=64)
    rating: Literal["up", "down"] | None = None
    messages: list[ChatMessage] | None = None
    content: str | None = None
    prompt: list[ChatMessage] | None = None
    chosen: FeedbackRef | str | None = None
    rejected: FeedbackRef | str | None = None

    def text_chars(self) -> tuple[int, int]:
        """Characters of client-sent text: of the conversation (messages or prompt), and of the longest reply text
        (content, chosen or rejected). ``serve.max_chars`` bounds each, as it bounds a chat request's messages: a
        conversation chat accepted must be ratable with its reply."""
        conversation = sum(len(m.text()) for m in (self.messages or []) + (self.prompt or []))
        replies = [self.content or "", *(x for x in (self.chosen, self.rejected) if isinstance(x, str))]
        return conversation, max(map(len, replies))


# --------------------------------------------------------------------------------------------------------------
# Parsing raw bodies
# --------------------------------------------------------------------------------------------------------------

_M = TypeVar("_M", bound=BaseModel)


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in the parsed JSON ``value`` (keys included) cannot be encoded as UTF-8. A loop over a
    stack, not recursion: ``json.loads`` reads bodies nested deeper than Python's recursion limit allows to walk."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _load_object(body: bytes) -> dict[str, Any]:
    """Raw bytes -> a JSON object, or a 400 saying what is wrong with the body."""
    if not body.strip():
        raise APIError(
            400,
            "the request body is empty; send a JSON object (Content-Type: application/json)",
            None,
            "invalid_value",
        )
    try:
        # decoded strictly first: json.loads(bytes) would also take UTF-16/32 and UTF-8-encoded surrogates
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(
            400, "the request body is not UTF-8 text; send UTF-8 encoded JSON", None, "invalid_value"
        ) from None
    except json.JSONDecodeError as e:
        raise APIError(
            400,
            f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
            None,
            "invalid_value",
        ) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", None, "invalid_value") from None
    except ValueError:  # an integer past Python's 4,300-digit limit for int(str)
        raise APIError(
            400, "the request body holds a number too long to read (over 4,300 digits)", None, "invalid_value"
        ) from None
    # JSON may spell an unpaired UTF-16 surrogate (\ud83d: a JavaScript string cut inside an emoji); Python keeps it
    # in the str, and the first encode to UTF-8 (the tokenizer, the feedback store) fails. Only \u escapes can
    # carry one (the strict decode above refused raw surrogate bytes), so the walk runs only for such bodies.
    if (b"\\ud" in body or b"\\uD" in body) and _has_lone_surrogate(obj):
        raise APIError(
            400,
            "the request body has text with an unpaired UTF-16 surrogate (e.g. \\ud83d without its pair: a string "
            "cut inside an emoji); send valid Unicode text",
            None,
            "invalid_value",
        )
    if not isinstance(obj, dict):
        raise APIError(
            400, f"the request body must be a JSON object, found a JSON {type(obj).__name__}", None, "invalid_value"
        )
    return obj


def _validate(model: type[_M], obj: dict[str, Any], strict: bool) -> tuple[_M, list[str]]:
    """Validate ``obj``; returns the model and the unknown keys it held (a 400 for them when ``strict``)."""
    try:
        req = model.model_validate(obj, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", None, "invalid_value") from None
    ignored = extra_fields(req)
    if strict and ignored:
        raise APIError(
            400,
            f"unrecognized request argument supplied: {ignored[0]}; remove it (see GET /docs for the accepted "
            "fields; this server has serve.strict_requests on)",
            ignored[0],
            "unrecognized_parameter",
        )
    return req, ignored


def _check_content_parts(messages: Any, field: str) -> None:
    """Name a non-text content part precisely (pydantic would only say "expected a string")."""
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        allowed = ("text", "refusal") if isinstance(m, dict) and m.get("role") == "assistant" else ("text",)
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in allowed:
                    raise APIError(
                        400,
                        f"{field}[{i}].content[{j}] has type {kind!r}: only text parts are supported "
                        "(the model reads text only)",
                        f"{field}[{i}].content[{j}]",
                        "unsupported_content",
                    )


def parse_chat_request(body: bytes, strict: bool = False) -> tuple[ChatCompletionRequest, list[str]]:
    """Parse and validate a chat-completions body.

    Args:
        body: the raw request body.
        strict: refuse unknown keys (``serve.strict_requests``) instead of ignoring them.

    Returns:
        The request and the dotted paths of the unknown keys that were ignored.

    Raises:
        APIError: 400 with an OpenAI-style message for bad JSON, wrong types, out-of-range values, unknown keys in
            strict mode and requests for unsupported features (``tools``, ``response_format`` json, ...).
    """
    obj = _load_object(body)
    _check_content_parts(obj.get("messages"), "messages")
    req, ignored = _validate(ChatCompletionRequest, obj, strict)
    req.check()
    return req, ignored


def parse_completion_request(body: bytes, strict: bool = False) -> tuple[CompletionRequest, list[str]]:
    """Parse and validate a ``/v1/completions`` body (see :func:`parse_chat_request`)."""
    obj = _load_object(body)
    req, ignored = _validate(CompletionRequest, obj, strict)
    req.check()
    return req, ignored


def parse_feedback_request(body: bytes, strict: bool = False) -> FeedbackRequest:
    """Parse and validate a feedback body (see :class:`FeedbackRequest`).

    Raises:
        APIError: 400 for bad JSON, wrong types, or a body that is none of the three shapes.
    """
    obj = _load_object(body)
    _check_content_parts(obj.get("messages"), "messages")
    _check_content_parts(obj.get("prompt"), "prompt")
    req, _ = _validate(FeedbackRequest, obj, strict)
    for i, m in enumerate(req.messages or []):
        m.check(f"messages[{i}]")
    for i, m in enumerate(req.prompt or []):
        m.check(f"prompt[{i}]")
    thumbs = req.rating is not None
    by_text = isinstance(req.chosen, str) or isinstance(req.rejected, str)
    by_id = isinstance(req.chosen, FeedbackRef) or isinstance(req.rejected, FeedbackRef)
    if thumbs:
        if req.completion_id is None:
            raise APIError(400, "a rating needs completion_id (the id of the completion it rates)", "completion_id")
        if req.chosen is not None or req.rejected is not None or req.prompt is not None:
            raise APIError(400, "send either a rating or a preference (chosen/rejected), not both", "rating")
    elif by_text:
        if not (isinstance(req.chosen, str) and isinstance(req.rejected, str) and req.prompt):
            raise APIError(
                400, "a preference by text needs prompt (messages), chosen (text) and rejected (text)", "prompt"
            )
    elif by_id:
        if not (isinstance(req.chosen, FeedbackRef) and isinstance(req.rejected, FeedbackRef)):
            raise APIError(400, "a preference by id needs both chosen and rejected references", "chosen")
    else:
        raise APIError(
            400,
            'expected a rating ({"completion_id", "rating": "up"|"down"}) or a preference '
            '({"chosen", "rejected"} as completion references or as texts with "prompt")',
            None,
            "missing_required_parameter",
        )
    return req


# --------------------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    """One reply token: its text, log-prob (under the model's distribution after penalties, ``logit_bias`` and
    temperature; before top-k / top-p), UTF-8 bytes and the likeliest alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


FinishReason = Literal["stop", "length", "content_filter"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy log-prob shape: parallel lists, one entry per completion token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A ``/v1/completions`` response (and, with ``object`` ``text_completion``, each streamed chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlchat"
    checkpoint: str | None = None
    """The checkpoint served: its absolute path with an API key, else only ``<run>/<checkpoint dir>``."""
    stage: str
    step: int
    max_model_len: int | None = None
    """The model's context in tokens (vLLM's name); longer conversations lose their oldest exchanges."""
    max_messages: int | None = None
    """Most messages a request may send (``serve.max_messages``): ``rlchat chat URL`` keeps within it."""
    max_chars: int | None = None
    """Most characters a request's messages may hold (``serve.max_chars``)."""
    max_tokens: int | None = None
    """Largest ``max_tokens`` a request may ask for (``serve.max_tokens``)."""
    parent: str | None = None
    """On a version's card: the app's model name, whose requests are split between versions by ``weight``."""
    weight: float | None = None
    """On a version's card: its relative share of requests for ``parent`` (0 = only requests naming it)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
