"""Simulated users for multi-turn episodes of ``rlchat/Chat-v0``: who speaks after the assistant.

A :class:`SimulatedUser` decides how an episode opens (:meth:`~SimulatedUser.opening`) and, after every assistant
turn, what the user says next (:meth:`~SimulatedUser.reply`) — or ``None`` to end the conversation, which
terminates the episode. Each user turn, the opening included, carries the reference answer the *next* assistant
turn is scored against (the reward library's verifiable / F1 / ROUGE components read ``record.reference``), so a
follow-up question can be checked too.

Two users ship, and any object with the same two methods plugs in (``ChatEnv(user=...)``):

- :class:`ReplayUser` (``env.user: replay``): replays the dataset. The episode opens with the record's messages up to
  its first assistant reply; after assistant turn k comes the record's user message that followed its k-th
  assistant reply. Turn k is scored against the record's own k-th assistant reply, except that the record's
  ``reference`` (when set) stands for its last reply, as it does in single-turn episodes. Ends when the record
  does.
- :class:`ScriptedUser` (``env.user: scripted``): a user with goals. Its first goal is a correct answer: when the
  turn had a reference and the reply fails :func:`rlchat.core.rewards.verifiable_answer`, it says so and asks again
  (up to ``max_retries`` times). Then it pursues follow-ups: for a numeric reference, a checked arithmetic
  follow-up ("Now add 4 to that.", reference = previous answer + 4); otherwise a generic follow-up question.

Users draw randomness only from the ``rng`` they are given (the env's ``np_random``), so a seeded episode is
reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from rlchat.core.errors import ConfigError
from rlchat.core.rewards import first_number, verifiable_answer

if TYPE_CHECKING:
    from rlchat.core.data import Record

Message = dict[str, str]


@dataclass(frozen=True)
class UserTurn:
    """What the simulated user says next.

    Attributes:
        content: the user message text.
        reference: the answer the next assistant turn is scored against (None: reference-based rewards give 0).
    """

    content: str
    reference: str | None = None


@runtime_checkable
class SimulatedUser(Protocol):
    """The pluggable user interface of multi-turn episodes."""

    def opening(self, record: Record) -> tuple[list[Message], str | None]:
        """The messages the episode starts from (rendered as the first prompt) and the first turn's reference."""
        ...

    def reply(self, conversation: Sequence[Message], record: Record, rng: np.random.Generator) -> UserTurn | None:
        """The next user turn after the assistant's last reply (the last message), or None to end the episode.

        Args:
            conversation: the whole conversation so far, ending with the assistant's reply.
            record: the record the episode was drawn from.
            rng: the env's random generator (the only source of randomness, for reproducible episodes).
        """
        ...


def _segments(messages: Sequence[Message]) -> list[list[Message]]:
    """Split a conversation at its assistant replies: [before reply 1, between 1 and 2, ..., after the last]."""
    segs: list[list[Message]] = [[]]
    for m in messages:
        if m["role"] == "assistant":
            segs.append([])
        else:
            segs[-1].append(m)
    return segs


def _assistant_replies(messages: Sequence[Message]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def _n_assistant(conversation: Sequence[Message]) -> int:
    return sum(1 for m in conversation if m["role"] == "assistant")


class ReplayUser:
    """Replays the record's own user messages, one per assistant turn (see the module docstring)."""

    def opening(self, record: Record) -> tuple[list[Message], str | None]:
        return [dict(m) for m in _segments(record.messages)[0]], self._reference(record, 0)

    @staticmethod
    def _reference(record: Record, k: int) -> str | None:
        """The answer to assistant turn k: the record's k-th reply (its ``reference`` stands for the last one)."""
        replies = _assistant_replies(record.messages)
        reference = getattr(record, "reference", None)
        if reference is not None and (k == len(replies) - 1 or not replies):
            return reference
        return replies[k] if k < len(replies) else None

    def reply(self, conversation: Sequence[Message], record: Record, rng: np.random.Generator) -> UserTurn | None:
        k = _n_assistant(conversation)  # assistant turns taken so far
        segs = _segments(record.messages)
        if k >= len(segs):
            return None
        users = [m["content"] for m in segs[k] if m["role"] == "user"]
        if not users:
            return None
        return UserTurn("\n\n".join(users), self._reference(record, k))


GENERIC_FOLLOW_UPS = (
    "Can you say that in fewer words?",
    "Can you give an example?",
    "Why is that?",
    "Are you sure?",
)
"""Follow-up questions of the scripted user when the answer is not a number (no reference to check)."""


class ScriptedUser:
    """A user with goals: get a correct answer, then ask follow-up questions (see the module docstring).

    Args:
        max_retries: how many times the user asks again after a wrong checked answer before moving on.
        follow_ups: generic follow-up questions, picked with the env's rng.
        max_addend: arithmetic follow-ups add a number drawn from ``1..max_addend`` to the previous answer.
    """

    def __init__(
        self, max_retries: int = 1, follow_ups: Sequence[str] = GENERIC_FOLLOW_UPS, max_addend: int = 9
    ) -> None:
        if max_retries < 0 or max_addend < 1 or not follow_ups:
            raise ConfigError(
                f"ScriptedUser(max_retries={max_retries}, max_addend={max_addend}, {len(follow_ups)} follow-ups): "
                "expected max_retries >= 0, max_addend >= 1 and at least one follow-up question"
            )
        self.max_retries = max_retries
        self.follow_ups = tuple(follow_ups)
        self.max_addend = max_addend
        # Per-episode state would break reuse across envs; everything is derived from the conversation instead.

    def opening(self, record: Record) -> tuple[list[Message], str | None]:
        return [dict(m) for m in record.prompt_messages()], getattr(record, "reference", None)

    def reply(self, conversation: Sequence[Message], record: Record, rng: np.random.Generator) -> UserTurn | None:
        reference, question, retries = self._state(conversation, record)
        answer = conversation[-1]["content"] if conversation and conversation[-1]["role"] == "assistant" else ""
        # Goal 1: a correct checked answer (ask again, keeping the same reference).
        if reference is not None and verifiable_answer(answer, reference) == 0.0 and retries < self.max_retries:
            return UserTurn(f"That is not right. {question}".strip(), reference)
        # Goal 2: follow-ups. A numeric reference gets a checked arithmetic follow-up.
        value = first_number(reference) if reference is not None else None
        if value is not None:
            c = int(rng.integers(1, self.max_addend + 1))
            return UserTurn(f"Now add {c} to that.", _fmt(value + c))
        return UserTurn(self.follow_ups[int(rng.integers(len(self.follow_ups)))], None)

    def _state(self, conversation: Sequence[Message], record: Record) -> tuple[str | None, str, int]:
        """(reference of the last turn, the question it answered, retries already spent on it).

        The scripted user's own messages encode its state ("That is not right." = a retry; "Now add c to that." =
        reference + c), so the user stays stateless and one instance can serve many envs.
        """
        reference: str | None = getattr(record, "reference", None)
        question = next((m["content"] for m in reversed(record.prompt_messages()) if m["role"] == "user"), "")
        retries = 0
        n_open = len(record.prompt_messages())
        for m in conversation[n_open:]:
            if m["role"] != "user":
                continue
            text = m["content"]
            if text.startswith("That is not right."):
                retries += 1
            elif text.startswith("Now add ") and reference is not None:
                value, c = first_number(reference), first_number(text)
                reference = _fmt(value + c) if value is not None and c is not None else None
                question, retries = text, 0
            else:
                reference, question, retries = None, text, 0
        return reference, question, retries


def _fmt(x: float) -> str:
    """A number as the demo task writes answers: integers without a decimal point."""
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else repr(float(x))


def make_user(kind: str, **kwargs: Any) -> SimulatedUser:
    """The simulated user named by ``env.user`` (``replay`` or ``scripted``)."""
    if kind == "replay":
        return ReplayUser()
    if kind == "scripted":
        return ScriptedUser(**kwargs)
    raise ConfigError(f"env.user={kind!r}: expected one of 'replay', 'scripted' (or pass a SimulatedUser object)")
