"""Incremental reply text shared by the terminal chat and the Serve endpoint (core: no Ray, no CLI).

:class:`TextStreamer` releases the visible text of one reply as tokens arrive -- never half a UTF-8 character, never
a stop string or text that could still become one -- so a reply reads the same in the terminal, over HTTP and in the
web page. :func:`token_text` shows one token for display (special tokens by name, partial UTF-8 bytes as ``<0xNN>``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlchat.core.tokenizer import ChatTokenizer

DROPPED_TURNS_HEADER = "X-RLChat-Dropped-Turns"
"""Response header: how many whole user+assistant exchanges were left out to fit the model's context."""
CONVERSATION_HEADER = "X-RLChat-Conversation-Id"
"""Optional request header grouping a conversation's completions in the store (transcripts, deletion by id); the web
page and ``rlchat chat URL`` send one per conversation."""


class TextStreamer:
    """The visible text of one reply, released incrementally as tokens arrive.

    Args:
        tokenizer: decodes tokens incrementally (never half a UTF-8 character; special tokens are not shown).
        stop_strings: the reply is cut where the first of them completes (stop strings are never shown, as on
            OpenAI's API); text that could still become a stop string is held back until it cannot.
        holdback: characters kept unsent at the end until :meth:`finish` (the Serve safety filter's window).
    """

    def __init__(self, tokenizer: ChatTokenizer, stop_strings: Sequence[str] = (), holdback: int = 0) -> None:
        self._dec = tokenizer.stream_decoder()
        self._stops = [s for s in stop_strings if s]
        self._tables = [_prefix_table(s) for s in self._stops]
        self._states = [0] * len(self._stops)  # per stop string: how much of it the text's end matches
        self._scanned = 0  # characters of the text fed to the matchers
        self._holdback = holdback
        self._text = ""
        self._sent = 0
        self.stopped = False
        """True once a stop string was found (the text is cut there and later tokens are ignored)."""

    @property
    def text(self) -> str:
        """All text so far (sent or held back), cut at a stop string."""
        return self._text

    @property
    def released(self) -> int:
        """How many characters of :attr:`text` were released so far (the rest is held back)."""
        return self._sent

    def push(self, token_id: int) -> str:
        """Add one token; return the newly releasable text (possibly empty)."""
        if self.stopped:
            return ""
        self._text += self._dec.push(token_id)
        return self._release(final=False)

    def push_many(self, token_ids: Sequence[int]) -> tuple[str, int]:
        """Add tokens at once; the same text as :meth:`push` token by token, for less work per token.

        Returns:
            The newly releasable text, and how many of the tokens were taken: all of them, unless a stop string
            ended the reply (then up to the token that completed it; later ones are ignored, as :meth:`push` does).
        """
        if self.stopped:
            return "", 0
        push = self._dec.push
        if not self._stops:
            self._text += "".join([push(t) for t in token_ids])
            return self._release(final=False), len(token_ids)
        taken = 0
        for t in token_ids:
            taken += 1
            self._text += push(t)
            self._scan()
            if self.stopped:
                break  # the first token that completes a stop string: the text is cut there
        return self._release(final=False), taken

    def finish(self) -> str:
        """End of the reply: the rest of the text (an incomplete UTF-8 tail becomes U+FFFD)."""
        if not self.stopped:
            self._text += self._dec.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stops and not self.stopped:
            self._scan()
        if self.stopped:
            final = True
        limit = len(self._text)
        if not final:  # hold back what could still grow into a stop string, and the safety filter's window
            limit -= max(max(self._states) if self._states else 0, self._holdback)
        piece = self._text[self._sent : limit] if limit > self._sent else ""
        self._sent = max(self._sent, limit)
        return piece

    def _scan(self) -> None:
        """Feed the text the matchers have not seen; cut it where a stop string completes first.

        Why a matcher per stop string (Knuth-Morris-Pratt): searching the text and testing every prefix of every
        stop string against its end after each token cost O(reply x stop length) per token; four 46,000-character
        stop strings with ``n=16`` held the replica's event loop for seconds. Here each character costs amortised
        O(1) per stop string, and the matched lengths are also what must be held back.
        """
        text, stops, tables, states = self._text, self._stops, self._tables, self._states
        for i in range(self._scanned, len(text)):
            j = _advance(stops, tables, states, text[i])
            if j >= 0:
                self._text = text[: i + 1 - len(stops[j])]
                self._scanned = len(self._text)
                self.stopped = True
                return
        self._scanned = len(text)


def cut_at_first_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut where the first stop string completes (as :class:`TextStreamer` cuts a reply, whatever the
    tokens), and whether one did. Of several completing at the same character, the longest decides."""
    stops = [s for s in stop_strings if s]
    tables, states = [_prefix_table(s) for s in stops], [0] * len(stops)
    for i, ch in enumerate(text if stops else ""):
        j = _advance(stops, tables, states, ch)
        if j >= 0:
            return text[: i + 1 - len(stops[j])], True
    return text, False


@functools.lru_cache(maxsize=256)
def _prefix_table(s: str) -> tuple[int, ...]:
    """Knuth-Morris-Pratt's table: entry i is the length of the longest proper prefix of ``s[: i + 1]`` that is also
    its suffix (cached: the ``n`` choices of a request, and repeated requests, share their stop strings)."""
    table = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        if s[i] == s[k]:
            k += 1
        table[i] = k
    return tuple(table)


def _advance(stops: Sequence[str], tables: Sequence[tuple[int, ...]], states: list[int], ch: str) -> int:
    """One character into every stop string's matcher (``states``: matched lengths, updated in place); the index of
    the stop string it completes (the longest if several), or -1."""
    done = -1
    for j, s in enumerate(stops):
        k = states[j]
        while k and s[k] != ch:
            k = tables[j][k - 1]
        if s[k] == ch:
            k += 1
        states[j] = k
        if k == len(s) and (done < 0 or k > len(stops[done])):
            done = j
    return done


def token_text(tokenizer: ChatTokenizer, token_id: int) -> str:
    """A token's text for display: special tokens by name, bytes that are not whole UTF-8 characters as ``<0xNN>``."""
    if tokenizer.is_special(token_id):
        return tokenizer.decode([token_id])
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if b < 0x80 else f"<0x{b:02X}>" for b in raw)
