"""Response shapes: OpenAI chat completions and text completions, plain and streamed (SSE chunks), with log-probs."""

import json
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from rlchat.core.text_stream import token_text
from rlchat.core.tokenizer import ChatTokenizer
from serve.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
)

PlainChoice = tuple[int, str, str, Sequence[int], Sequence[Any] | None]
"""One choice of a plain reply: index, text, finish reason, tokens and their log-prob alternatives (or None)."""


def _compact(obj: Any) -> str:
    """JSON as Starlette's ``JSONResponse`` writes it (no spaces, no NaN)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _chunk(
    cid: str,
    created: int,
    model: str,
    choices: list[ChunkChoice],
    usage: Usage | None = None,
    null_usage: bool = False,
) -> str:
    """A chat chunk's JSON; ``usage`` null only with ``null_usage`` (``stream_options.include_usage``: OpenAI then
    puts ``"usage": null`` in every chunk but the last), else absent."""
    body = ChatCompletionChunk(id=cid, created=created, model=model, choices=choices, usage=usage).model_dump()
    for choice in body["choices"]:  # as OpenAI: a delta carries only the fields it sets; finish_reason stays (null)
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if usage is None and not null_usage:
        del body["usage"]
    return json.dumps(body, ensure_ascii=False)


class ResponseFormat:
    """How one request's results are shaped: chat completion or text completion, plain and streamed.

    Log-prob entries come from :attr:`rlchat.generation.StepOutput.alternatives` ``(logprob, top ids, top
    logprobs)``; the end-of-turn token is not reported (it is never shown as text).
    """

    def __init__(
        self, cid: str, created: int, model: str, tokenizer: ChatTokenizer, logprobs: bool, include_usage: bool = False
    ) -> None:
        self.cid, self.created, self.model, self.logprobs = cid, created, model, logprobs
        self.include_usage = include_usage
        """``stream_options.include_usage``: a usage chunk ends the stream and the others say ``"usage": null``."""
        self.tokenizer = tokenizer
        # a streamed chunk's JSON up to its choice's index, as _chunk / _json write it (pydantic field order)
        cid_json, model_json = json.dumps(cid, ensure_ascii=False), json.dumps(model, ensure_ascii=False)
        self._head = (
            f'{{"id": {cid_json}, "object": "{self.OBJECT}", "created": {created}, "model": {model_json}, '
            '"choices": [{"index": '
        )

    OBJECT = ""
    """The ``object`` of a streamed chunk."""

    def _entries(
        self, tokens: Sequence[int], alts: Sequence[Any] | None
    ) -> list[tuple[int, float, list[tuple[int, float]]]]:
        if not self.logprobs or alts is None:
            return []
        eot = self.tokenizer.eot_id
        return [
            (t, _floor(lp), [(i, _floor(v)) for i, v in zip(ids, lps)])
            for t, (lp, ids, lps) in zip(tokens, alts)
            if t != eot
        ]

    def _text(self, t: int) -> str:
        return token_text(self.tokenizer, t)


_TOKEN_JSON: "weakref.WeakKeyDictionary[ChatTokenizer, dict[int, tuple[str, str]]]" = weakref.WeakKeyDictionary()
"""Per tokenizer, each token's JSON pieces (:func:`_token_jsons`; at most one entry per token of its vocabulary).
Keyed weakly: every loaded version has a tokenizer of its own, and a cache keyed by (tokenizer, token) kept the
tokenizers of swapped-out versions alive with a version's worth of entries each (the replica grew with every config
update)."""


def _token_jsons(tokenizer: ChatTokenizer) -> Callable[[int], tuple[str, str]]:
    """A token's ``token`` and ``bytes`` values as JSON text, from ``tokenizer``'s cache (a stream with
    ``top_logprobs`` writes ~21 entries per token, most of them tokens seen before). Looked up once per chunk, not
    per entry: the weak mapping makes a reference on every lookup. Runs on the replica's event loop only."""
    cache = _TOKEN_JSON.get(tokenizer)
    if cache is None:
        cache = _TOKEN_JSON[tokenizer] = {}

    def token_json(t: int) -> tuple[str, str]:
        hit = cache.get(t)
        if hit is None:
            raw = "null" if tokenizer.is_special(t) else json.dumps(list(tokenizer.token_bytes(t)))
            hit = cache[t] = (json.dumps(token_text(tokenizer, t), ensure_ascii=False), raw)
        return hit

    return token_json


LOGPROB_FLOOR = -9999.0
"""What a log-prob of -inf (a token the sampler masked) or NaN is written as: OpenAI's own floor; ``-Infinity`` is
not JSON."""


def _floor(v: Any) -> float:
    x = float(v)
    return x if math.isfinite(x) else LOGPROB_FLOOR


def _number(v: float) -> str:
    """A (finite, :func:`_floor`) log-prob as JSON text, as ``json.dumps`` writes a float."""
    return repr(float(v))


class ChatFormat(ResponseFormat):
    OBJECT = "chat.completion.chunk"

    def _logprobs_json(self, tokens: Sequence[int], alts: Sequence[Any] | None) -> str:
        """:meth:`_logprobs` as JSON text, written directly (the same object once parsed; tests/test_serve_api.py).

        Why: a streamed request with ``n=16`` and ``top_logprobs: 20`` built ~84,000 pydantic objects on the
        replica's event loop (~0.5 s for 250 tokens, while every other stream waited); this writes the same JSON
        from cached per-token pieces."""
        token_json, entries = _token_jsons(self.tokenizer), []
        for t, lp, top in self._entries(tokens, alts):
            text, raw = token_json(t)
            alternatives = []
            for i, v in top:
                a_text, a_raw = token_json(i)
                alternatives.append(f'{{"token": {a_text}, "logprob": {_number(v)}, "bytes": {a_raw}}}')
            entries.append(
                f'{{"token": {text}, "logprob": {_number(lp)}, "bytes": {raw}, '
                f'"top_logprobs": [{", ".join(alternatives)}]}}'
            )
        return f'{{"content": [{", ".join(entries)}], "refusal": null}}'

    def _logprobs(self, tokens: Sequence[int], alts: Sequence[Any] | None) -> ChoiceLogprobs | None:
        if not self.logprobs:
            return None
        content = [
            TokenLogprob(
                token=self._text(t),
                logprob=lp,
                bytes=list(self.tokenizer.token_bytes(t)) if not self.tokenizer.is_special(t) else None,
                top_logprobs=[
                    TopLogprob(
                        token=self._text(i),
                        logprob=v,
                        bytes=list(self.tokenizer.token_bytes(i)) if not self.tokenizer.is_special(i) else None,
                    )
                    for i, v in top
                ],
            )
            for t, lp, top in self._entries(tokens, alts)
        ]
        return ChoiceLogprobs(content=content)

    def plain_body(self, choices: Sequence[PlainChoice], usage: Usage) -> bytes:
        """The response model's dump with each choice's log-probs from :meth:`_logprobs_json` spliced in as text.

        Why: ``n=16`` x ``top_logprobs: 20`` x 500 tokens is ~12 MB of JSON; as pydantic objects, or written, parsed
        back and encoded again, it held the replica's event loop ~2 s. The splices are safe: a JSON string value
        never holds an unescaped quote, so the first ``"logprobs":null`` / ``"choices":[]`` is the key itself."""
        parts = []
        for i, text, reason, tokens, alts in choices:
            message = AssistantMessage(content=text)
            choice = _compact(Choice(index=i, message=message, finish_reason=reason).model_dump())  # type: ignore[arg-type]
            if self.logprobs:
                choice = choice.replace('"logprobs":null', f'"logprobs":{self._logprobs_json(tokens, alts)}', 1)
            parts.append(choice)
        body = _compact(
            ChatCompletion(id=self.cid, created=self.created, model=self.model, choices=[], usage=usage).model_dump()
        )
        return body.replace('"choices":[]', f'"choices":[{",".join(parts)}]', 1).encode()

    def first_chunk(self, n: int) -> str | None:
        roles = [ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)]
        return _chunk(self.cid, self.created, self.model, roles, null_usage=self.include_usage)

    def delta_chunk(self, i: int, text: str, tokens: Sequence[int], alts: Sequence[Any]) -> str:
        # written directly, not through the response models (the same JSON once parsed, tests/test_serve_api.py)
        content = json.dumps(text, ensure_ascii=False)
        logprobs = self._logprobs_json(tokens, alts) if self.logprobs else "null"
        usage = ', "usage": null' if self.include_usage else ""
        return (
            f'{self._head}{i}, "delta": {{"content": {content}}}, "finish_reason": null, "logprobs": {logprobs}}}], '
            f'"system_fingerprint": null{usage}}}'
        )

    def final_chunk(self, finals: list[tuple[int, str]]) -> str:
        choices = [ChunkChoice(index=i, delta=Delta(), finish_reason=r) for i, r in finals]  # type: ignore[arg-type]
        return _chunk(self.cid, self.created, self.model, choices, null_usage=self.include_usage)

    def usage_chunk(self, usage: Usage) -> str:
        return _chunk(self.cid, self.created, self.model, [], usage)


class CompletionFormat(ResponseFormat):
    OBJECT = "text_completion"

    def __init__(self, cid: str, created: int, model: str, tokenizer: ChatTokenizer, logprobs: bool) -> None:
        super().__init__(cid, created, model, tokenizer, logprobs)
        self._running: dict[int, tuple[Any, int]] = {}
        """Per streamed choice: its text decoder and the text offset its next token starts at."""

    def _logprobs(
        self, tokens: Sequence[int], alts: Sequence[Any] | None, choice: int | None = None
    ) -> CompletionLogprobs | None:
        """Legacy logprobs. ``text_offset`` is each token's character offset in the completion's text (as vLLM
        gives it without ``echo``): it runs on across a stream's chunks of ``choice``, and counts the text the tokens
        decode to (a token holding half a character adds nothing until the character is whole), not the display
        form of ``tokens`` (``<0xNN>``)."""
        if not self.logprobs:
            return None
        dec, offset = self._running.get(choice, (None, 0)) if choice is not None else (None, 0)
        dec = dec or self.tokenizer.stream_decoder()
        out = CompletionLogprobs()
        if alts is not None:
            eot = self.tokenizer.eot_id
            for t, (lp, ids, lps) in zip(tokens, alts):
                if t != eot:
                    out.tokens.append(self._text(t))
                    out.token_logprobs.append(lp)
                    top = {self._text(i): v for i, v in zip(ids, lps)}
                    top.setdefault(self._text(t), lp)  # OpenAI: the sampled token too (up to logprobs + 1 entries)
                    out.top_logprobs.append(top)
                    out.text_offset.append(offset)
                offset += len(dec.push(t))
        if choice is not None:
            self._running[choice] = (dec, offset)
        return out

    def choice(self, i: int, text: str, reason: str, tokens: Sequence[int], alts: Sequence[Any] | None) -> Any:
        return CompletionChoice(index=i, text=text, finish_reason=reason, logprobs=self._logprobs(tokens, alts))  # type: ignore[arg-type]

    def plain_body(self, choices: Sequence[PlainChoice], usage: Usage) -> bytes:
        listed = [self.choice(*c) for c in choices]
        body = Completion(id=self.cid, created=self.created, model=self.model, choices=listed, usage=usage)
        return _compact(body.model_dump()).encode()

    def _json(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        body = Completion(id=self.cid, created=self.created, model=self.model, choices=choices, usage=usage)
        return json.dumps(body.model_dump(), ensure_ascii=False)

    def first_chunk(self, n: int) -> str | None:
        return None

    def delta_chunk(self, i: int, text: str, tokens: Sequence[int], alts: Sequence[Any]) -> str:
        if not self.logprobs:  # the common chunk, written directly (the model's JSON, tests/test_serve_api.py)
            content = json.dumps(text, ensure_ascii=False)
            return (
                f'{self._head}{i}, "text": {content}, "finish_reason": null, "logprobs": null}}], "usage": null, '
                '"system_fingerprint": null}'
            )
        return self._json([CompletionChoice(index=i, text=text, logprobs=self._logprobs(tokens, alts, i))])

    def final_chunk(self, finals: list[tuple[int, str]]) -> str:
        return self._json([CompletionChoice(index=i, text="", finish_reason=r) for i, r in finals])  # type: ignore[arg-type]

    def usage_chunk(self, usage: Usage) -> str:
        return self._json([], usage)
