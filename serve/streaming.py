"""One choice of a streamed completion on its way out (``serve.app.ChatServer._stream``): incremental text, the
tokens and log-probs that go with it, and the safety filter's hold-back."""

from __future__ import annotations

from collections import deque
from typing import Any

from rlchat.core.text_stream import TextStreamer
from serve.safety import SafetyFilter


class StreamedChoice:
    """One choice of a streamed completion on its way out: its :class:`TextStreamer`, the text and tokens not sent
    yet (chunks are coalesced: ``serve.stream_interval_s``, ``serve.stream_chunks_per_s``), the tokens whose text is
    held back, and whether the safety filter withheld it.

    Why tokens are held: a token's log-prob entry is sent with its text, so text held back (a possible stop string,
    the safety filter's window) holds its tokens too, and a withheld reply never leaves the server as log-prob
    tokens.
    """

    def __init__(self, streamer: TextStreamer) -> None:
        self.streamer = streamer
        self.pending = ""
        self.tokens: list[int] = []
        self.alts: list[Any] = []
        self.held: deque[tuple[int, int, Any]] = deque()  # (end of its text, token, log-prob entry)
        self.last_sent = 0.0
        self.sent = False
        """Some of the reply's text has left the server."""
        self.suspect = False
        """The safety filter flagged the text so far: nothing more is sent until the reply is finished, and then its
        finished text decides, as a plain reply's does. Why not withhold at once: a pattern may match unfinished
        text and not the finished reply (``\\bsea\\b`` while the reply has only reached the "sea" of "seaside"),
        and the same seed must give the same reply, usage included, streamed or not."""
        self.withheld = False
        self.count = 0
        """Tokens generated for this choice (its usage), sent or not."""

    @property
    def over(self) -> bool:
        """Withheld or stopped: the batch may end this row."""
        return self.withheld or self.streamer.stopped

    def push_many(self, toks: list[int]) -> None:
        """A step's tokens at once (no safety filter, no log-probs): text up to a stop string."""
        self.count += len(toks)
        if toks and not self.over:
            piece, used = self.streamer.push_many(toks)
            self.pending += piece
            self.tokens.extend(toks[:used])

    @property
    def sendable(self) -> bool:
        """Text is waiting and may leave now (none while :attr:`suspect`)."""
        return bool(self.pending) and not self.suspect

    def push(self, toks: list[int], alts: list[Any] | None, safety: SafetyFilter | None) -> None:
        """A step's tokens one by one: the safety filter checks the text after each (until it flags it once: then
        :attr:`suspect`), log-probs wait for it."""
        self.count += len(toks)
        for k, t in enumerate(toks):
            if self.over:
                return
            piece = self.streamer.push(t)
            if not self.suspect and safety is not None and safety.flagged(self.streamer.text):
                self.suspect = True  # the hold-back window kept the flagged text unsent; now all of it waits
            self.pending += piece
            self.held.append((len(self.streamer.text), t, alts[k] if alts is not None else None))
            self._release()

    def finish(self, safety: SafetyFilter | None) -> bool:
        """The reply is over: release the held-back text (and every held token with it), then the safety filter's
        last look. True when a last chunk is due (:meth:`take`)."""
        tail = self.streamer.finish()
        self._release()
        if safety is not None and safety.flagged(self.streamer.text):
            self.withheld = True  # nothing unsent leaves
            self.pending, self.tokens, self.alts = "", [], []
            return False
        self.pending += tail
        return bool(self.pending or self.tokens)

    def take(self) -> tuple[str, list[int], list[Any]]:
        """The text, tokens and log-prob entries to send now (cleared)."""
        out = (self.pending, self.tokens, self.alts)
        self.pending, self.tokens, self.alts = "", [], []
        self.sent = self.sent or bool(out[0])
        return out

    def _release(self) -> None:
        st = self.streamer
        while self.held and (self.held[0][0] <= st.released or st.stopped):
            _, t, alt = self.held.popleft()
            self.tokens.append(t)
            if alt is not None:
                self.alts.append(alt)
