"""OpenAI chat-completions request and response models (pydantic), plus OpenAI-style error bodies.

The request model is strict on purpose: a parameter the engine cannot honour is rejected with a 400 that names it
(``tools``, ``logit_bias``, ...), never silently ignored, and an unknown key is an error too (as on OpenAI's API).
Extensions beyond OpenAI's fields follow vLLM's names: ``top_k``, ``repetition_penalty``; plus ``num_beams``
(deterministic beam search, what ``rlchat chat --beams`` uses against an endpoint).

Validation is done from the raw JSON bytes (``model_validate_json(..., strict=True)``), so a string where a
number belongs (``"temperature": "0.5"``) is an error, as on OpenAI, instead of being coerced.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------

#: OpenAI request parameters this server does not implement: rejected with code ``unsupported_parameter``.
UNSUPPORTED_PARAMS: dict[str, str] = {
    "tools": "tool calling is not supported by the rlchat engine",
    "tool_choice": "tool calling is not supported by the rlchat engine",
    "parallel_tool_calls": "tool calling is not supported by the rlchat engine",
    "functions": "function calling is not supported by the rlchat engine",
    "function_call": "function calling is not supported by the rlchat engine",
    "logit_bias": "logit_bias is not supported; use stop strings or repetition_penalty",
    "response_format": "structured output (response_format) is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "the model has no reasoning-effort setting",
    "store": "stored completions are not supported; use POST /v1/feedback to keep user feedback",
    "metadata": "stored-completion metadata is not supported",
    "service_tier": "service tiers are not supported",
    "top_logprobs": "top_logprobs are not returned by this server; `rlchat chat CKPT` has /probs",
}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """The JSON body of an OpenAI API error: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """A request the server refuses, with the HTTP status and the OpenAI-style error fields.

    Args:
        status: HTTP status code (400 invalid request, 401 auth, 404 unknown model/id, 413 body too large).
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


def _loc(loc: tuple[Any, ...]) -> str:
    """pydantic error location -> ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]", "function-after[_check(), str]"):
            continue  # union-branch tags are noise in a user-facing path
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the parameter, what was expected and what was found."""
    errors = e.errors(include_url=False)
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    param = _loc(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({err.get('msg')}); send a JSON object", None)
    if kind == "model_type" or (not param and kind.endswith("_type")):
        return APIError(400, "the request body must be a JSON object of chat-completion parameters", None)
    if kind == "extra_forbidden":
        return APIError(
            400,
            f"unrecognized request argument supplied: {param}; remove it (see GET /docs for the accepted fields)",
            param,
            "unrecognized_parameter",
        )
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


class TextPart(BaseModel):
    """One part of a message's content list; only text parts are accepted (the model reads text only)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of the conversation. ``developer`` is OpenAI's newer name for ``system``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts are concatenated)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_message(self) -> dict[str, str]:
        """``{"role", "content"}`` in rlchat's chat template roles."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    """Send a last chunk (empty ``choices``) carrying the ``usage`` of the whole request."""


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body. Ranges that depend on the server's limits are checked by the app."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    # extensions (vLLM names)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    num_beams: int | None = Field(default=None, ge=1, le=8)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def budget(self) -> int | None:
        """The requested completion-token budget (``max_completion_tokens`` wins, as on OpenAI)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class FeedbackRef(BaseModel):
    """A reference to one choice of an earlier completion."""

    model_config = ConfigDict(extra="forbid", strict=True)

    completion_id: str
    choice_index: int = Field(default=0, ge=0)


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: a thumbs rating, or a preference between two replies.

    Three shapes:
      - thumbs: ``{"completion_id", "choice_index"?, "rating": "up"|"down"}`` (``messages`` + ``content`` may be
        sent too, so any replica, or a restarted one, can record it without its completion cache);
      - preference by id: ``{"chosen": {"completion_id", "choice_index"?}, "rejected": {...}}``;
      - preference by text: ``{"prompt": [messages], "chosen": "text", "rejected": "text"}`` (the record format of
        ``rlchat rm`` itself).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    completion_id: str | None = None
    choice_index: int = Field(default=0, ge=0)
    rating: Literal["up", "down"] | None = None
    messages: list[ChatMessage] | None = None
    content: str | None = None
    prompt: list[ChatMessage] | None = None
    chosen: FeedbackRef | str | None = None
    rejected: FeedbackRef | str | None = None


# --------------------------------------------------------------------------------------------------------------
# Parsing raw bodies
# --------------------------------------------------------------------------------------------------------------

_M = TypeVar("_M", bound=BaseModel)


def _load_object(body: bytes) -> dict[str, Any]:
    """Raw bytes -> a JSON object, or a 400 saying what is wrong with the body."""
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object (Content-Type: application/json)")
    try:
        obj = json.loads(body)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send UTF-8 encoded JSON") from None
    except json.JSONDecodeError as e:
        raise APIError(
            400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, found a JSON {type(obj).__name__}")
    return obj


def _validate(model: type[_M], obj: dict[str, Any]) -> _M:
    try:
        return model.model_validate(obj, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None


def _check_content_parts(messages: Any, field: str) -> None:
    """Name a non-text content part precisely (pydantic would only say "expected a string")."""
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise APIError(
                        400,
                        f"{field}[{i}].content[{j}] has type {kind!r}: only text parts are supported "
                        "(the model reads text only)",
                        f"{field}[{i}].content[{j}]",
                        "unsupported_content",
                    )


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Parse and validate a chat-completions body.

    Raises:
        APIError: 400 with an OpenAI-style message for bad JSON, wrong types, out-of-range values, unknown keys
            and unsupported OpenAI parameters (``tools``, ``logit_bias``, non-zero penalties, ``logprobs``, ...).
    """
    obj = _load_object(body)
    for key, why in UNSUPPORTED_PARAMS.items():
        if key in obj and obj[key] is not None:
            raise APIError(400, f"{key} is not supported: {why}; remove it", key, "unsupported_parameter")
    for key in ("presence_penalty", "frequency_penalty"):
        if obj.get(key) not in (None, 0, 0.0):
            raise APIError(
                400,
                f"{key}={obj[key]!r} is not supported (only 0); use repetition_penalty (e.g. 1.2) instead",
                key,
                "unsupported_parameter",
            )
    if obj.get("logprobs") not in (None, False):
        raise APIError(
            400,
            "logprobs are not returned by this server; remove logprobs (`rlchat chat CKPT` shows them with /probs)",
            "logprobs",
            "unsupported_parameter",
        )
    _check_content_parts(obj.get("messages"), "messages")
    req = _validate(ChatCompletionRequest, obj)
    stops = req.stop_strings()
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: expected up to 4 non-empty strings", "stop", "invalid_value")
    return req


def parse_feedback_request(body: bytes) -> FeedbackRequest:
    """Parse and validate a feedback body (see :class:`FeedbackRequest`).

    Raises:
        APIError: 400 for bad JSON, wrong types, or a body that is none of the three shapes.
    """
    obj = _load_object(body)
    _check_content_parts(obj.get("messages"), "messages")
    _check_content_parts(obj.get("prompt"), "prompt")
    req = _validate(FeedbackRequest, obj)
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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "content_filter"]
    logprobs: None = None


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
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlchat"
    checkpoint: str
    stage: str
    step: int
    max_model_len: int | None = None
    """The model's context in tokens (vLLM's name); longer conversations lose their oldest exchanges."""
    max_messages: int | None = None
    """Most messages a request may send (``serve.max_messages``): ``rlchat chat URL`` keeps within it."""
    max_chars: int | None = None
    """Most characters a request's messages may hold (``serve.max_chars``)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
