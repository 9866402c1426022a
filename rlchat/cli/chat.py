"""``rlchat chat CKPT_OR_URL``: an interactive terminal chat with a checkpoint (in-process) or a running endpoint.

    rlchat chat runs/<run>/checkpoints/best --temperature 0.7
    rlchat chat http://127.0.0.1:8000               # the key from RLCHAT_API_KEY (or --api-key-file)

Replies stream as they are generated; the conversation is kept and sent again each turn. A line ending in ``\\``
continues on the next line, and a line of ``\"\"\"`` opens (and closes) a multi-line block. Commands start with
``/`` (``/help`` lists them); a bad argument prints one line saying what was expected, never a traceback.

Long conversations never hit the model's context: when the history no longer fits (``model.n_positions`` minus
the reply's ``max_tokens``), the oldest whole user+assistant exchanges are left out of what the model sees
(:func:`rlchat.core.tokenizer.fit_history`; in-process here, on the server for an endpoint, which reports the count in
the ``X-RLChat-Dropped-Turns`` header) and the chat says so once per conversation; ``/history`` and ``/save`` still
have every message. With an endpoint, a connection that drops or a malformed stream chunk mid-reply prints one
``error:`` line and the chat goes on: the partial reply is not kept, the question is, and ``/regenerate`` asks again.

Introspection (local checkpoints): ``/probs [K]`` shows, for each token of the last reply, its probability and the
K most likely alternatives under the model (one teacher-forced forward over prompt + reply, see
:func:`token_alternatives`); ``/why`` shows the reward components of the last reply under the checkpoint's
``reward`` config.

The reply text is released by :class:`rlchat.core.text_stream.TextStreamer`, the same streamer the Serve endpoint
uses, so a reply reads the same in the terminal, over HTTP and in the web page.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rlchat.core.errors import RLChatError
from rlchat.core.files import read_key_file
from rlchat.core.text_stream import CONVERSATION_HEADER, DROPPED_TURNS_HEADER, TextStreamer, token_text

if TYPE_CHECKING:
    import torch

    from rlchat.core.tokenizer import ChatTokenizer

Message = dict[str, str]

HELP = """commands:
  /help              this list
  /reset             start a new conversation (the system prompt stays)
  /system TEXT       set the system prompt (/system alone shows it, /system none clears it)
  /temp X            sampling temperature, 0 (greedy) to 2
  /top_p X           nucleus sampling mass in (0, 1]
  /top_k N           sample among the N most likely tokens (0 = off)
  /max_tokens N      longest reply in tokens
  /beams N           beam search with N beams (1 = sampling)
  /settings          show the decoding settings
  /regenerate        replace the last reply with a new one
  /history           show the conversation
  /save FILE         save the conversation as {"messages": [...]} (a .jsonl FILE gets it appended as one line:
                     a data set `rlchat data` reads)
  /load FILE         load a conversation saved with /save (from a .jsonl FILE: its last line)
  /probs [K]         top-K alternatives and probabilities at each token of the last reply (local checkpoint)
  /why               reward components of the last reply under the checkpoint's reward config (local checkpoint)
  /quit              leave (Ctrl-D works too)
input: a line ending in \\ continues on the next line; a line of \"\"\" starts and ends a multi-line block"""


# --------------------------------------------------------------------------------------------------------------
# Introspection: /probs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TokenProbs:
    """One position of a reply under the model: the token, its probability and the top alternatives."""

    token_id: int
    text: str
    prob: float
    alternatives: list[tuple[int, str, float]]
    """(token id, text, probability) of the k most likely tokens at this position, most likely first."""


def token_alternatives(
    model: Any, tokenizer: ChatTokenizer, prompt_ids: Sequence[int], reply_ids: Sequence[int], k: int = 5
) -> list[TokenProbs]:
    """The model's distribution at every reply position, from one teacher-forced forward over prompt + reply.

    Independent of the generation engine: it reads the policy's plain causal-LM logits, so the probabilities are
    the model's own (temperature 1, before top-k / top-p / repetition penalty), whatever decoding produced the reply.

    Args:
        model: a :class:`~rlchat.core.model.PolicyValueModel` (its ``lm`` is used) or any ``transformers`` causal LM.
        tokenizer: the model's tokenizer.
        prompt_ids: the rendered prompt (ends with the assistant start token).
        reply_ids: the reply's tokens as generated (the end-of-turn token included, if it was generated).
        k: alternatives per position.

    Returns:
        One :class:`TokenProbs` per reply token.
    """
    import torch

    if not reply_ids:
        return []
    lm = getattr(model, "lm", model)
    vocab = int(getattr(model, "vocab_size", 0) or tokenizer.n_vocab)
    ids = torch.tensor([list(prompt_ids) + list(reply_ids)], dtype=torch.long, device=_device(lm))
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]  # (T, V)
    finally:
        lm.train(was_training)
    start = len(prompt_ids) - 1  # logits at position t predict token t + 1
    probs = torch.softmax(logits[start : start + len(reply_ids), :vocab].float(), dim=-1)  # (R, V)
    top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)  # (R, k)
    out = []
    for pos, tid in enumerate(reply_ids):
        alts = [
            (int(i), token_text(tokenizer, int(i)), float(p)) for i, p in zip(top_i[pos].tolist(), top_p[pos].tolist())
        ]
        out.append(TokenProbs(int(tid), token_text(tokenizer, int(tid)), float(probs[pos, tid]), alts))
    return out


def _device(module: Any) -> torch.device:
    return next(module.parameters()).device


def format_probs(rows: Sequence[TokenProbs]) -> str:
    """A table: position, token, its probability, and the alternatives with theirs."""
    lines = [f"{'#':>3}  {'token':<16} {'p':>8}   alternatives"]
    for n, r in enumerate(rows, 1):
        alts = "  ".join(f"{json.dumps(t, ensure_ascii=False)} {p:.3g}" for _, t, p in r.alternatives)
        lines.append(f"{n:>3}  {json.dumps(r.text, ensure_ascii=False):<16} {r.prob:8.3g}   {alts}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Backends: a local checkpoint or an HTTP endpoint
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoding:
    """The decoding settings the chat's commands change."""

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    beams: int = 1

    def describe(self) -> str:
        seed = "random" if self.seed is None else self.seed
        stop = ", ".join(json.dumps(s) for s in self.stop) or "none"
        return (
            f"temperature={self.temperature} top_k={self.top_k} top_p={self.top_p} "
            f"repetition_penalty={self.repetition_penalty} max_tokens={self.max_tokens} beams={self.beams} "
            f"seed={seed} stop={stop}"
        )


@dataclass
class Reply:
    """The last reply: its text, why it ended, (local backend) its token ids, and how many of the oldest exchanges
    were left out of the prompt to fit the model's context."""

    text: str = ""
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list)
    dropped_turns: int = 0


"""Response header of the Serve endpoint: how many of the oldest exchanges it left out to fit the context."""


class ReplyInterrupted(RLChatError):
    """The endpoint could not be reached, or its reply broke off (connection dropped, malformed stream chunk).

    Unlike a refusal (an HTTP error status), this is transport trouble: the question is kept so ``/regenerate`` can
    ask again, and the partial reply is dropped rather than kept as if it were the whole answer.
    """


class LocalBackend:
    """Generates in this process with the checkpoint's policy and the generation engine."""

    def __init__(self, path: str) -> None:
        import torch

        from rlchat.core.checkpoint import load_policy
        from rlchat.core.generation import GenerationEngine

        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        self.model, self.tokenizer, self.checkpoint = load_policy(path)
        self.model.eval()
        precision = self.checkpoint.config.model.precision
        self.engine = GenerationEngine.for_inference(self.model, self.tokenizer, precision=precision)
        self.max_positions = int(self.engine.max_positions or self.checkpoint.config.model.n_positions)
        self.last = Reply()
        self.last_prompt: list[int] = []

    def new_conversation(self) -> None:
        """Nothing to do: a local chat stores nothing (the endpoint backend starts a new conversation id)."""

    def describe(self) -> str:
        c = self.checkpoint
        return f"{c.path} ({c.stage} checkpoint, step {c.step})"

    def stream(self, messages: list[Message], d: Decoding) -> Iterator[str]:
        from rlchat.core.generation import FINISH_LENGTH, FINISH_STOP, SamplingParams
        from rlchat.core.tokenizer import ContextOverflowError, fit_history

        # The reply's room is max_tokens, but at most half the context: a large /max_tokens still leaves the
        # conversation half of it (the reply is then capped at what the prompt leaves, as before).
        reserve = min(d.max_tokens, self.max_positions // 2)
        try:
            fitted, dropped = fit_history(messages, self.tokenizer, self.max_positions - reserve)
        except ContextOverflowError as e:
            if e.needed >= self.max_positions:
                with_system = " and the system prompt" if messages and messages[0]["role"] == "system" else ""
                raise RLChatError(
                    f"your message{with_system} take{'' if with_system else 's'} {e.needed} tokens; the model's "
                    f"context is {self.max_positions} tokens: send a shorter message"
                    + (" (or /system none)" if with_system else "")
                ) from None
            # they fit but leave less than max_tokens: keep only them, and the reply gets what is left
            fitted, dropped = fit_history(messages, self.tokenizer, e.needed)
        prompt = self.tokenizer.render_prompt(fitted)
        room = self.max_positions - len(prompt)  # >= 1
        params = SamplingParams(
            max_new_tokens=min(d.max_tokens, room),
            temperature=d.temperature,
            top_k=d.top_k,
            top_p=d.top_p,
            repetition_penalty=d.repetition_penalty,
            stop_strings=d.stop,
            num_beams=d.beams,
            seed=d.seed,
        )
        streamer = TextStreamer(self.tokenizer, d.stop)
        self.last, self.last_prompt = Reply(dropped_turns=dropped), prompt
        tokens = self.last.token_ids
        gen = self.engine.stream(prompt, params)
        try:
            for token, _ in gen:
                tokens.append(token)
                piece = streamer.push(token)
                if piece:
                    yield piece
                if streamer.stopped:
                    break
            tail = streamer.finish()
            if tail:
                yield tail
        finally:
            getattr(gen, "close", lambda: None)()  # a generator: stop the engine's stream now
            # what was shown: on Ctrl-C the streamer may still hold back text that could begin a stop string
            self.last.text = streamer.text[: streamer.released]
            ended = streamer.stopped or (tokens and tokens[-1] == self.tokenizer.eot_id)
            self.last.finish_reason = FINISH_STOP if ended else FINISH_LENGTH

    def probs(self, k: int) -> list[TokenProbs]:
        return token_alternatives(self.model, self.tokenizer, self.last_prompt, self.last.token_ids, k)

    def why(self, messages: list[Message]) -> tuple[float, dict[str, float], dict[str, float]]:
        """(total, components, weights) of the last reply under the checkpoint's reward config."""
        from rlchat.core.rewards import RewardFunction

        fn = RewardFunction(self.checkpoint.config.reward, self.tokenizer)
        res = fn(messages, self.last.text, self.last.token_ids)
        return res.total, res.components, fn.weights


class RemoteBackend:
    """Talks to a running rlchat (or any OpenAI-compatible) endpoint through the official ``openai`` client.

    The SDK brings retries of failed connections (``max_retries``), timeouts and typed errors; its streaming
    response (``with_streaming_response``) also gives the headers, for the server's ``X-RLChat-Dropped-Turns``.
    The server fits the conversation to the model's context (and reports what it left out); this client only keeps
    each request within the request limits an rlchat server advertises on ``/v1/models`` (``max_messages``,
    ``max_chars``), dropping the oldest exchanges by the same rule, so a long chat never hits those walls either.

    Trouble on the wire (no connection, a connection dropped mid-reply, a stream chunk that is not JSON, a stream
    that ends before a finish reason) is :class:`ReplyInterrupted`; an HTTP error status or an in-band error chunk
    is an :class:`RLChatError` carrying the server's message.
    """

    CONNECT_TIMEOUT_S = 10.0
    READ_TIMEOUT_S = 300.0
    MAX_RETRIES = 2

    def __init__(self, url: str, api_key: str | None) -> None:
        import openai

        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[: -len("/v1")]
        self.client = openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key=api_key or "none",  # the SDK needs a value; a server without a key ignores it
            max_retries=self.MAX_RETRIES,
            timeout=openai.Timeout(self.READ_TIMEOUT_S, connect=self.CONNECT_TIMEOUT_S),
        )
        self.last = Reply()
        try:
            cards = self.client.models.list().data
        except openai.APIConnectionError as e:
            raise RLChatError(f"{self.url}: cannot connect ({_cause_name(e)}); is `rlchat serve` running?") from None
        except openai.APIStatusError as e:
            raise RLChatError(f"{self.url}/v1/models: {_status_message(e)}") from None
        except (openai.APIError, ValueError, TypeError, AttributeError) as e:  # the SDK parsing another page
            raise RLChatError(f"{self.url}/v1/models: not an OpenAI model list ({_first_line(e)})") from None
        self.info: dict[str, Any] = cards[0].model_dump() if cards else {}
        self.model = str(self.info.get("id") or "rlchat")
        self.conversation_id = ""
        self.new_conversation()

    def new_conversation(self) -> None:
        """A fresh ``X-RLChat-Conversation-Id`` for the requests from here on: the server's store groups a
        conversation's completions by it (transcripts, ``rlchat feedback delete`` of the whole chat)."""
        self.conversation_id = uuid.uuid4().hex

    def describe(self) -> str:
        step = f", step {self.info['step']}" if self.info.get("step") is not None else ""
        return f"{self.url} (model {self.model}{step})"

    def _within_limits(self, messages: list[Message]) -> tuple[list[Message], int]:
        """The messages cut to the server's advertised request limits (oldest exchanges first), and how many
        exchanges that left out. Beyond a limit even after that, they go as they are and the server says why."""
        from rlchat.core.tokenizer import ContextOverflowError, drop_oldest_turns

        dropped = 0
        limits = (("max_messages", lambda m: 1, "messages"), ("max_chars", lambda m: len(m["content"]), "characters"))
        for key, cost, unit in limits:
            limit = self.info.get(key)
            if isinstance(limit, int) and limit > 0:
                with contextlib.suppress(ContextOverflowError):
                    messages, n = drop_oldest_turns(messages, cost, limit, unit)
                    dropped += n
        return messages, dropped

    def stream(self, messages: list[Message], d: Decoding) -> Iterator[str]:
        import openai

        messages, trimmed = self._within_limits(messages)
        extra: dict[str, Any] = {}  # vLLM-named extensions the SDK does not know
        if d.top_k:
            extra["top_k"] = d.top_k
        if d.repetition_penalty != 1.0:
            extra["repetition_penalty"] = d.repetition_penalty
        if d.beams > 1:
            extra["num_beams"] = d.beams
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "temperature": d.temperature,
            "top_p": d.top_p,
            "max_tokens": d.max_tokens,
        }
        if d.stop:
            kwargs["stop"] = list(d.stop)
        if d.seed is not None:
            kwargs["seed"] = d.seed
        if extra:
            kwargs["extra_body"] = extra
        kwargs["extra_headers"] = {CONVERSATION_HEADER: self.conversation_id}
        self.last = Reply(dropped_turns=trimmed)
        broke = f"the connection to {self.url} broke mid-reply"
        started = False  # the response began: a connection error now is a reply cut off, not a failed request
        try:
            with self.client.chat.completions.with_streaming_response.create(**kwargs) as response:
                started = True
                with contextlib.suppress(ValueError, TypeError):
                    self.last.dropped_turns += int(response.headers.get(DROPPED_TURNS_HEADER, 0))
                complete = False
                for chunk in response.parse():
                    for piece, finish_reason in _chunk_pieces(chunk):
                        if piece:
                            self.last.text += piece
                            yield piece
                        if finish_reason:
                            self.last.finish_reason = finish_reason
                            complete = True
        except openai.APIStatusError as e:
            if e.status_code == 429 or e.status_code >= 500:  # busy or failing, after the SDK's retries: ask again
                raise ReplyInterrupted(_status_message(e)) from None
            raise RLChatError(_status_message(e)) from None  # refused (400, 401, ...): the server's message
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            if started:
                raise ReplyInterrupted(f"{broke} ({_cause_name(e)})") from None
            raise ReplyInterrupted(f"{self.url}: request failed ({_cause_name(e)}: {_first_line(e)})") from None
        except openai.APIError as e:  # an in-band error chunk once the reply had started
            if getattr(e, "type", None) == "invalid_request_error":  # refused: asking again would fail again
                raise RLChatError(str(e.message)) from None
            raise ReplyInterrupted(str(e.message)) from None  # the server failed (a 500 for a running request)
        except _transport_errors() as e:  # dropped connection, read timeout mid-stream
            raise ReplyInterrupted(f"{broke} ({e.__class__.__name__})") from None
        except ValueError as e:  # the SDK's SSE decoder: a data line that is not JSON (or not UTF-8)
            raise ReplyInterrupted(
                f"the endpoint sent a malformed stream chunk (not JSON): {_first_line(e)}"
            ) from None
        if not complete:
            raise ReplyInterrupted(f"{self.url} closed the stream before the reply was complete")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the SDK's HTTP library raises when a connection breaks mid-stream (the SDK wraps only errors before the
    response starts): ``httpx2.HTTPError`` (openai >= 3) or ``httpx.HTTPError`` (older), and ``OSError``."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(name).HTTPError)
    return tuple(errors)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:160]


def _cause_name(e: BaseException) -> str:
    """The underlying exception's class name (``ConnectError``) of an SDK connection error."""
    return (e.__cause__ or e).__class__.__name__


def _status_message(e: Any) -> str:
    """``HTTP 400: <the server's message>`` of an SDK status error."""
    body = getattr(e, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
    return f"HTTP {e.status_code}: {message or _first_line(e)}"


def _chunk_pieces(chunk: Any) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice of an OpenAI ``chat.completion.chunk`` (as the SDK parsed it).

    Raises:
        ReplyInterrupted: the chunk does not have the chunk shape.
    """
    out = []
    try:
        for c in getattr(chunk, "choices", None) or []:
            delta = getattr(c, "delta", None)
            piece = (getattr(delta, "content", None) if delta is not None else None) or ""
            reason = getattr(c, "finish_reason", None) or ""
            if not isinstance(piece, str) or not isinstance(reason, str):
                raise TypeError("content and finish_reason must be strings")
            out.append((piece, reason))
    except (AttributeError, TypeError) as e:
        raise ReplyInterrupted(f"the endpoint sent a malformed stream chunk ({e})") from None
    return out


# --------------------------------------------------------------------------------------------------------------
# The REPL
# --------------------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A command was used wrongly: its message is printed as one line."""


def _number(arg: str, cmd: str, kind: type, lo: float, hi: float, lo_open: bool = False, example: str = "") -> Any:
    """Parse a command argument as ``kind`` within ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), else UsageError."""
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    expected = f"{cmd} expects {'an integer' if kind is int else 'a number'} in {rng}, e.g. {cmd} {example}"
    try:
        value = kind(arg)
    except (TypeError, ValueError):
        raise UsageError(f"{expected} (got {arg!r})" if arg else expected) from None
    if (kind is float and not math.isfinite(value)) or value < lo or value > hi or (lo_open and value == lo):
        raise UsageError(f"{expected} (got {arg})")
    return value


class ChatSession:
    """The conversation, the decoding settings and the commands; I/O through ``out`` and an input function."""

    def __init__(self, backend: LocalBackend | RemoteBackend, decoding: Decoding, system: str | None, out: TextIO):
        self.backend = backend
        self.decoding = decoding
        self.system = system or ""
        self.turns: list[Message] = []
        self.out = out
        self.dropped_noted = False
        """Whether this conversation was told that its oldest turns no longer reach the model (said once)."""

    # ---------------------------------------------------------------------------------------------- helpers
    def messages(self) -> list[Message]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.turns

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def reply(self) -> None:
        """Stream the assistant's answer to the conversation so far and append it."""
        self.out.write("assistant> ")
        self.out.flush()
        gen = self.backend.stream(self.messages(), self.decoding)
        interrupted = False
        broken: ReplyInterrupted | None = None
        said = False
        try:
            for piece in gen:
                self.out.write(piece)
                self.out.flush()
                said = True
        except KeyboardInterrupt:
            interrupted = True
        except ReplyInterrupted as e:
            broken = e
        except RLChatError:
            self.say()  # the "assistant> " line ends before the caller prints the error
            raise
        finally:
            getattr(gen, "close", lambda: None)()
        last = self.backend.last
        note = " [interrupted]" if interrupted else ""
        if broken is not None:
            note = " [cut off]" if said else "(no reply)"
        elif not interrupted and last.finish_reason == "length":
            note = " [max_tokens reached]"
        elif not interrupted and last.finish_reason == "content_filter":
            note = "\n(content_filter: this reply is not kept in the conversation; the question stays open)"
        self.say(note)
        self._note_dropped(last.dropped_turns)
        if broken is not None:
            # a partial reply is not an answer: keep the question so /regenerate (or the next message) goes on
            self.say(f"error: {broken}; the question is kept: /regenerate asks again, or type your next message")
            return
        if interrupted and not last.text:
            return  # nothing was said: the question stays unanswered (/regenerate asks again)
        if not interrupted and last.finish_reason == "content_filter":
            return  # not the model's answer: sent back, it would condition every later turn on a flagged reply
        self.turns.append({"role": "assistant", "content": last.text})

    def _note_dropped(self, dropped: int) -> None:
        """Say once per conversation that its oldest turns no longer reach the model (every turn would be noise:
        once a chat is longer than the context, each new turn pushes out another old one)."""
        if dropped <= 0 or self.dropped_noted:
            return
        self.dropped_noted = True
        self.say(
            f"(the conversation is longer than the model's context: its {dropped} oldest exchange"
            f"{'s are' if dropped > 1 else ' is'} left out of what the model sees, and more will be as it grows; "
            "/history and /save keep everything; /reset starts afresh)"
        )

    def _local(self, cmd: str) -> LocalBackend:
        if not isinstance(self.backend, LocalBackend):
            raise UsageError(f"{cmd} needs a local checkpoint (it reads the model itself): rlchat chat CKPT_DIR")
        last = self.backend.last
        if not self.turns or self.turns[-1]["role"] != "assistant" or not last.token_ids:
            raise UsageError(f"{cmd} explains the last reply; there is none yet")
        if last.text != self.turns[-1]["content"]:  # e.g. a conversation loaded after it: not the reply on screen
            raise UsageError(f"{cmd} explains the last reply this session generated; ask again (or /regenerate)")
        return self.backend

    # ---------------------------------------------------------------------------------------------- commands
    def command(self, line: str) -> bool:
        """Run one /command; return False when the chat should end."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        name = name.lower()
        d = self.decoding
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.turns = []
            self.dropped_noted = False
            self.backend.new_conversation()
            self.say("(new conversation)")
        elif name == "/system":
            if not arg:
                self.say(
                    f"system prompt: {self.system!r}" if self.system else "no system prompt (/system TEXT sets one)"
                )
            elif arg.lower() == "none":
                self.system = ""
                self.say("(system prompt cleared)")
            else:
                self.system = arg
                self.say("(system prompt set)")
        elif name == "/temp":
            self.decoding = replace(d, temperature=_number(arg, "/temp", float, 0, 2, example="0.7"))
            self.say(f"(temperature {self.decoding.temperature})")
        elif name == "/top_p":
            self.decoding = replace(d, top_p=_number(arg, "/top_p", float, 0, 1, lo_open=True, example="0.9"))
            self.say(f"(top_p {self.decoding.top_p})")
        elif name == "/top_k":
            self.decoding = replace(d, top_k=_number(arg, "/top_k", int, 0, 100000, example="40"))
            self.say(f"(top_k {self.decoding.top_k})")
        elif name == "/max_tokens":
            self.decoding = replace(d, max_tokens=_number(arg, "/max_tokens", int, 1, 100000, example="128"))
            self.say(f"(max_tokens {self.decoding.max_tokens})")
        elif name == "/beams":
            self.decoding = replace(d, beams=_number(arg, "/beams", int, 1, 8, example="4"))
            self.say(f"(beams {self.decoding.beams})")
        elif name == "/settings":
            self.say(self.decoding.describe())
        elif name == "/regenerate":
            if self.turns and self.turns[-1]["role"] == "assistant":
                self.turns.pop()
            if not self.turns or self.turns[-1]["role"] != "user":
                raise UsageError("/regenerate needs a message to answer; type one first")
            self.reply()
        elif name == "/history":
            msgs = self.messages()
            if not msgs:
                self.say("(empty conversation)")
            for i, m in enumerate(msgs, 1):
                self.say(f"{i:>3} {m['role']}: {m['content']}")
        elif name == "/save":
            self._save(arg)
        elif name == "/load":
            self._load(arg)
        elif name == "/probs":
            k = _number(arg, "/probs", int, 1, 50, example="5") if arg else 5
            self.say(format_probs(self._local("/probs").probs(k)))
            self.say("(the model's own probabilities: temperature 1, before top-k/top-p/repetition penalty)")
        elif name == "/why":
            backend = self._local("/why")
            total, comps, weights = backend.why(self.messages()[:-1])
            self.say(f"reward {total:+.4f} = sum of weight x component")
            for c, v in comps.items():
                self.say(f"  {c:<16} {v:+.4f}  x {weights.get(c, 0.0):g}")
            if not comps:
                self.say("  (no reward component is enabled in the checkpoint's reward config)")
            self.say("(components that need a reference answer score 0 here: a chat has none)")
        else:
            raise UsageError(f"unknown command {name}; /help lists the commands")
        return True

    def _save(self, arg: str) -> None:
        if not arg:
            raise UsageError("/save expects a file name, e.g. /save chat.json")
        path = Path(arg).expanduser()
        line = json.dumps({"messages": self.messages()}, ensure_ascii=False) + "\n"
        append = path.name.endswith(".jsonl")  # a .jsonl file collects chats: one record per line
        try:
            with open(path, "a" if append else "w", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:
            raise UsageError(f"/save: cannot write {path}: {e.strerror or e}") from None
        self.say(f"({'appended' if append else 'saved'} {len(self.messages())} messages to {path})")

    def _load(self, arg: str) -> None:
        if not arg:
            raise UsageError("/load expects a file name, e.g. /load chat.json")
        path = Path(arg).expanduser()
        try:
            text = path.read_text("utf-8")
            if path.name.endswith(".jsonl"):  # the last chat appended to a collection
                text = ([x for x in text.splitlines() if x.strip()] or [""])[-1]
            data = json.loads(text)
        except OSError as e:
            raise UsageError(f"/load: cannot read {path}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"/load: {path} is not JSON ({e})") from None
        msgs = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(msgs, list):
            raise UsageError(f'/load: {path}: expected {{"messages": [...]}} as written by /save')
        for i, m in enumerate(msgs):
            ok = isinstance(m, dict) and isinstance(m.get("content"), str)
            if not ok or m.get("role") not in ("system", "user", "assistant"):
                raise UsageError(
                    f"/load: {path}: message {i} must be {{'role': system|user|assistant, 'content': text}}"
                )
        system = [m["content"] for m in msgs if m["role"] == "system"]
        self.system = system[0] if system else self.system
        self.turns = [{"role": m["role"], "content": m["content"]} for m in msgs if m["role"] != "system"]
        self.dropped_noted = False
        self.backend.new_conversation()
        self.say(f"(loaded {len(self.turns)} messages from {path})")

    # ---------------------------------------------------------------------------------------------- the loop
    def run(self, read: Any = input) -> int:
        self.say(f"rlchat chat with {self.backend.describe()}")
        self.say("type a message; /help lists the commands, /quit leaves")
        while True:
            try:
                line = self._read_message(read)
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:
                self.say("\n(/quit or Ctrl-D leaves)")
                continue
            if line is None or not line.strip():
                continue
            try:
                if line.lstrip().startswith("/"):
                    if not self.command(line):
                        return 0
                    continue
                self.turns.append({"role": "user", "content": line})
                try:
                    self.reply()
                except RLChatError:
                    self.turns.pop()
                    raise
            except UsageError as e:
                self.say(str(e))
            except RLChatError as e:
                self.say(f"error: {e}")

    def _read_message(self, read: Any) -> str | None:
        """One message: a line, a ``\\``-continued line, or a ``\"\"\"`` block."""
        first = read("you> ")
        if first.strip() == '"""':
            block: list[str] = []
            while (line := read("...> ")).strip() != '"""':
                block.append(line)
            return "\n".join(block)
        lines = [first]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(read("...> "))
        return "\n".join(lines)


def chat_command(
    target: str,
    api_key: str | None = None,
    system: str | None = None,
    api_key_file: str | None = None,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    max_tokens: int = 64,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    beams: int = 1,
    **_: Any,
) -> int:
    """``rlchat chat``: chat with a checkpoint directory (in-process) or an endpoint URL.

    Returns:
        0 when the user leaves.

    Raises:
        RLChatError: the checkpoint cannot be loaded, the endpoint cannot be reached, or a decoding flag is out of
            range (the CLI prints it as one line).
    """
    import os

    checks = [
        (0 <= temperature <= 2, "--temperature", temperature, "a number in [0, 2]"),
        (top_k >= 0, "--top-k", top_k, "an integer >= 0"),
        (0 < top_p <= 1, "--top-p", top_p, "a number in (0, 1]"),
        (repetition_penalty > 0, "--repetition-penalty", repetition_penalty, "a number > 0"),
        (max_tokens >= 1, "--max-tokens", max_tokens, "an integer >= 1"),
        (1 <= beams <= 8, "--beams", beams, "an integer in [1, 8]"),
    ]
    for ok, flag, value, expected in checks:
        if not ok:
            raise RLChatError(f"{flag}={value}: expected {expected}")
    decoding = Decoding(temperature, top_k, top_p, repetition_penalty, max_tokens, tuple(stop or ()), seed, beams)
    if target.startswith(("http://", "https://")):
        if not api_key and api_key_file:
            try:
                api_key = read_key_file(api_key_file)
            except OSError as e:
                raise RLChatError(f"--api-key-file {api_key_file}: cannot read it ({e.strerror})") from None
        backend: LocalBackend | RemoteBackend = RemoteBackend(target, api_key or os.environ.get("RLCHAT_API_KEY"))
    else:
        backend = LocalBackend(target)
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401 - line editing and history for input()
    return ChatSession(backend, decoding, system, sys.stdout).run()
