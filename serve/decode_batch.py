"""A decode batch that rows join and leave between steps: the engine side of continuous batching.

:class:`DecodeBatch` holds one KV cache for every row that is generating. Each :meth:`DecodeBatch.step`:

1. drops the rows that ended since the last step from the batch and its cache (compaction), and trims cache columns
   that are padding in every remaining row;
2. feeds each running row its last sampled token (one batched trunk pass), unless :meth:`DecodeBatch.feed_ahead`
   already did, right after the previous step;
3. if rows were added since the last step: prefills them in a batch of their own (left-padded);
4. runs the head once over every row's last hidden state; samples the newcomers' first tokens and (with ``early``)
   hands them over at once; merges the newcomers' cache into the running one -- the shorter of the two is
   left-padded along the sequence (zero keys / values, mask 0), so a newcomer whose prompt is longer than the
   running cache pads the existing rows, not the other way round; then samples the running rows. Each row's stop
   conditions are applied to its token.

Why this order (*feed ahead, join at the head*): at a real vocabulary the head is the largest weight (cl100k x 512
in bf16 is 100 MB, the 8 layers of an 8 x 512 trunk 50 MB) and a decoding step on a CPU is bound by reading the
weights, so a step costs about as much for 1 row as for 16 (~19 vs ~23 ms, one thread). A newcomer that joins the
running rows' step shares their head pass, and the running rows are delayed by its prefill only. The scheduler
runs the running rows' trunk pass ahead (:meth:`DecodeBatch.feed_ahead`, once a step's tokens are handed over) and
a joining request's prefill on a second thread as soon as it arrives (:meth:`DecodeBatch.prefill`; for a lone
one-row request its first token too, :meth:`DecodeBatch.start`), so neither is in the newcomer's wait. The other
order, a step of their own for the newcomers (``prefill_first``), reads the whole model once more per arrival:
measured back to back, ~15-20% less throughput for a ~10-25% lower time to first token (bench/README.md, "Serve
load"); it stays as a setting for latency-bound deployments. (On a CPU without bf16 units, fp32, a many-row step is
compute-bound instead: a 16-row step of 8 x 512 over cl100k costs ~4x a one-row one, see :meth:`DecodeBatch.start`.)

Where the cache lives: with the fast one-token step (:mod:`rlchat.core.fast_decode`) each layer's keys / values
are views ``buf[:B, :, s:s + n]`` of a buffer with spare rows and columns. A newcomer's cache is written into spare
rows (:func:`_join_in_place`; leading columns for one longer than the running rows), a departing row's slot is
filled by a row from the batch's end (:func:`_fill_holes`), and trimming padding moves ``s``: no join or departure
copies the cache, where concatenating and index-selecting it (then re-buffering it at the next append) took ~5 of a
~32 ms 16-row step with one arrival and one departure every other step (8 x 512 over cl100k, bf16; bench/README.md,
"Twentieth session"). A buffer without room is replaced once by a bigger one (:func:`_join_into_new_buffers`). The
Hugging Face step (other architectures) keeps its own concatenating cache and the copies.

Rows keep their own positions (real tokens only, ``cumsum(mask) - 1`` at prefill, then +1 per step) and their own
attention mask, exactly as :class:`rlchat.generation.GenerationStream` does for a left-padded batch, so a row's
logits do not depend on what it is batched with (up to float noise of batched matmuls).

Each row has its own :class:`~rlchat.generation.SamplingParams`: logits are computed for the whole batch; the
per-row processing (repetition penalty, presence / frequency penalties, logit bias, min-tokens masking, top
log-probs) is applied row by row where a row asks for it, then rows are sampled in groups of equal sampling settings
(greedy / temperature / top-k / top-p). Random numbers are the engine's counter-based ones,
``row_uniforms(seed_keys([seed]), row_step)``, with the row's own step count, so a seeded row samples exactly what
it samples alone, whenever it joined. The processing mirrors ``GenerationStream._sample`` / ``_pick`` / ``_record``
operation for operation (same tensors, same order); ``tests/test_serve_batching.py`` checks the equality.

Beam search is not handled here (its beams share one step count and reorder the cache every step): the scheduler
runs it whole through :meth:`GenerationEngine.generate` on its own thread.

No Ray import here. One :class:`DecodeBatch` is stepped from one thread; :meth:`DecodeBatch.prefill` and
:meth:`DecodeBatch.start` alone may run on another meanwhile (they read the weights, fill a cache of their own and
touch no state of the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlchat.core.errors import ConfigError
from rlchat.core.fast_decode import kv_buffers
from rlchat.core.generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationEngine,
    SamplingParams,
    _left_pad,
    _StopStrings,
    logit_bias_vector,
    pick_tokens,
    process_logits,
    row_uniforms,
    seed_keys,
)

UNASSIGNED = -1
"""The handle of a row started off the generation thread until :meth:`DecodeBatch.add_started` gives it one."""

MAX_CACHED_SETTINGS = 256
"""Distinct (stop ids, stop strings, logit bias) whose tensors are kept for reuse by later rows (a bound: a long-lived
replica sees ever new logit biases)."""


@dataclass
class RowStep:
    """What one row did in one :meth:`DecodeBatch.step`.

    Attributes:
        handle: the row's handle (from :meth:`DecodeBatch.add`).
        token: the token generated (a stop token included).
        logprob: its log-prob under the distribution sampled from (as ``GenerationResult.logprobs``).
        alternative: with ``top_logprobs >= 0``: ``(chosen log-prob, top ids, top log-probs)`` as in
            :attr:`rlchat.generation.StepOutput.alternatives`; else None.
        reason: ``"stop"`` / ``"length"`` if the row ended with this token, else None.
    """

    handle: int
    token: int
    logprob: float
    alternative: tuple[float, list[int], list[float]] | None
    reason: str | None


@dataclass
class Prefill:
    """Rows' prompts run through the trunk ahead of their step (:meth:`DecodeBatch.prefill`)."""

    hidden: torch.Tensor
    """(n, H) last hidden state of each row."""
    cache: Any
    mask: torch.Tensor
    """(n, P) attention mask of the left-padded prompts."""
    pos: torch.Tensor
    """(n, 1) position of each row's next token."""


@dataclass
class StartedRow:
    """A row whose first token was sampled off the generation thread (:meth:`DecodeBatch.start`), for
    :meth:`DecodeBatch.add_started`, which gives it its handle."""

    row: _Row
    prefill: Prefill | None
    """Its state after its first token (that token fed through its own cache); None if the first token ended it."""


class _Settings:
    """Stop conditions and logit bias of a :class:`SamplingParams` as tensors, shared by rows with equal ones."""

    def __init__(self, engine: GenerationEngine, params: SamplingParams) -> None:
        tok, dev, v = engine.tokenizer, engine.device, engine.vocab_size
        stops = sorted({tok.eot_id, *params.stop_token_ids})
        self.stop_ids = frozenset(stops)
        self.stop_ids_t = torch.tensor(stops, dtype=torch.long, device=dev)
        self.stop_strings = _StopStrings(tok, params.stop_strings) if params.stop_strings else None
        self.bias = logit_bias_vector(params.logit_bias, v, dev)  # (V,) or None


class _Row:
    """One generating row: its settings, random key, step count, stop state and penalty state."""

    def __init__(
        self, handle: int, prompt: Sequence[int], params: SamplingParams, settings: _Settings, seed: int, budget: int
    ) -> None:
        self.handle = handle
        self.prompt = prompt
        self.params = params
        self.settings = settings
        self.key = seed_keys([seed])[0]
        # rows sampled together: the settings that change how a row's processed logits become a token
        self.pick_key = (params.greedy, params.temperature, params.top_k, params.top_p)
        self.budget = budget
        self.step = 0
        self.tail = b""
        self.reason: str | None = None
        self.pending: int | None = None  # the token to feed at the next step
        self.seen: list[int] | None = list(prompt) if params.repetition_penalty != 1.0 else None
        self.counts: torch.Tensor | None = None  # (V,) tokens generated so far, for presence / frequency penalties


class DecodeBatch:
    """Rows with their own prompts, settings and seeds, decoded together one token per :meth:`step`.

    Args:
        engine: the generation engine (its model, tokenizer and position limit).
        prefill_first: latency over throughput (``serve.prefill_first``): the step after rows arrive prefills and
            samples them alone and the running rows take their next token at the step after, so a newcomer's first
            token does not wait for the running rows' trunk pass, head rows and sampling; it costs one more pass of
            the whole model per arrival. :meth:`feed_ahead` does nothing then (the running rows are fed at the step
            that samples them).
    """

    def __init__(self, engine: GenerationEngine, prefill_first: bool = False) -> None:
        self.engine = engine
        self.prefill_first = prefill_first
        self._dec = engine._decoder()  # noqa: SLF001 - the engine's own plumbing: same head, precision, cache
        self._device = engine.device
        self._pad = engine.tokenizer.pad_id
        self._settings: dict[tuple, _Settings] = {}
        self._rows: list[_Row] = []  # batch order = the cache's batch dimension
        self._new: list[_Row] = []  # added, not in the batch yet
        self._ready: dict[int, Prefill] = {}  # first handle of rows added with their prefill done -> that prefill
        self._by_handle: dict[int, _Row] = {}
        self._next_handle = 0
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (B, L) attention mask over the cache's columns
        self._pos: torch.Tensor | None = None  # (B, 1) position of each row's next token
        self._buf: torch.Tensor | None = None  # (3, rows, V) scratch of _scratch
        self._ahead: torch.Tensor | None = None  # (B, H) the running rows' hidden states fed by feed_ahead
        self._fresh: list[Prefill] | None = None  # prefilled, not merged yet (_merge_fresh)

    # ---------------------------------------------------------------- public API
    @property
    def rows(self) -> int:
        """Rows still generating (prefilled or waiting for their prefill at the next step)."""
        return sum(r.reason is None for r in self._rows) + sum(r.reason is None for r in self._new)

    @property
    def cache_length(self) -> int:
        """Columns of the shared KV cache (longest live prompt + its tokens, plus padding not trimmed yet)."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    def prefill(self, prompts: Sequence[Sequence[int]], dec: Any = None) -> Prefill:
        """Run prompts through the trunk now, for an :meth:`add` to come: the one part of adding rows that is safe on
        another thread while this batch steps (its own cache; the weights are only read).

        The scheduler starts it when a request arrives at a running batch, on a second thread: the prefill then
        overlaps the step in progress (on a 2-core CPU the engine's step holds one core) instead of following it.
        The prompts are assumed checked (``GenerationEngine._check_prompts``). ``dec``: the engine snapshot to run
        (default: the batch's own).
        """
        dec = self._dec if dec is None else dec
        with torch.no_grad():
            ids, mask = _left_pad(prompts, self._pad, 0)
            ids, mask = ids.to(self._device), mask.to(self._device)
            cache = dec.new_cache()
            pos = (mask.cumsum(-1) - 1).clamp_(min=0)
            h = dec.forward(ids, mask, pos, cache)
            new_pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self._device)[:, None]
        return Prefill(h, cache, mask, new_pos)

    def add(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seeds: Sequence[int],
        prefill: Prefill | None = None,
    ) -> list[int]:
        """Queue rows for the next step (their prefill runs there, unless ``prefill`` is theirs, from
        :meth:`prefill` of these prompts); returns one handle per row.

        Raises:
            ConfigError: an empty prompt, an id outside the vocabulary, a prompt that fills the model's positions,
                beam search, a logit bias outside the vocabulary, or a seed count that does not match. Nothing is
                added then.
        """
        if params.num_beams > 1:
            raise ConfigError(
                f"SamplingParams.num_beams={params.num_beams}: a decode batch samples one token per row; "
                "run beam search with GenerationEngine.generate"
            )
        if len(seeds) != len(prompts):
            raise ConfigError(f"seeds has {len(seeds)} entries: expected one per prompt ({len(prompts)})")
        if not prompts:
            return []
        self.engine._check_prompts(prompts, params, cap_at_limit=True)  # noqa: SLF001 - same rules as steps()
        settings = self._settings_for(params, keep=True)
        budgets = self.engine.row_budgets(prompts, params)
        if prefill is not None and int(prefill.hidden.shape[0]) != len(prompts):
            raise ConfigError(f"a prefill of {prefill.hidden.shape[0]} rows for {len(prompts)} prompts")
        first = self._take_handles(len(prompts))
        if prefill is not None:
            self._ready[first] = prefill
        rows = [
            self._new_row(first + i, prompt, params, settings, seed, budget)
            for i, (prompt, seed, budget) in enumerate(zip(prompts, seeds, budgets.tolist()))
        ]
        for row in rows:
            self._new.append(row)
            self._by_handle[row.handle] = row
        return [row.handle for row in rows]

    def start(
        self, prompt: Sequence[int], params: SamplingParams, seed: int, first: Callable[[RowStep], None]
    ) -> StartedRow:
        """A row's prefill, first token and the feed of that token, off the generation thread (safe beside a step).

        The scheduler runs it on its prefill thread for a request that arrives alone at a running batch: its first
        token is sampled and handed to ``first`` as soon as the prompt has been through the trunk and the head, not
        after the step in progress and the whole batch's head pass. On a CPU where a many-row step is compute-bound
        (AVX2 fp32: a 16-row step of 8 x 512 over cl100k costs ~4x a one-row step), that wait was most of a joining
        request's time to first token; on a 2-core machine the generation thread holds one core and this runs on the
        other. The token is then fed through the row's own cache, so :meth:`add_started` hands the batch a row that
        joins like a prefilled newcomer: the next step runs no trunk pass for it and samples its second token.
        (Disaggregated serving does the same across machines: the prefill worker returns the first token and the
        KV cache.) The same weights, sampler and random numbers as a step, so the tokens are the ones :meth:`add`
        gives (up to float noise of batched matmuls).

        Raises:
            ConfigError: as :meth:`add` (the prompt is checked here, before any forward).
        """
        if params.num_beams > 1:
            raise ConfigError("DecodeBatch.start: beam search runs whole through GenerationEngine.generate")
        self.engine._check_prompts([prompt], params, cap_at_limit=True)  # noqa: SLF001 - same rules as add()
        budget = int(self.engine.row_budgets([prompt], params)[0])
        settings = self._settings_for(params, keep=False)
        row = self._new_row(UNASSIGNED, prompt, params, settings, seed, budget)  # its handle: add_started's
        dec = self._dec  # one snapshot for the whole start (the step may take a fresh one when the batch idles)
        with torch.no_grad():
            ready = self.prefill([prompt], dec)
            z = dec.logits(ready.hidden)
            (out,) = _sample_rows([row], z, torch.empty_like(z), self._device)
            first(out)
            if row.reason is not None:
                return StartedRow(row, None)
            mask = torch.cat([ready.mask, torch.ones_like(ready.mask[:, :1])], 1)
            pending = torch.tensor([[out.token]], dtype=torch.long, device=self._device)
            h = dec.forward(pending, mask, ready.pos, ready.cache)
        return StartedRow(row, Prefill(h, ready.cache, mask, ready.pos + 1))

    def add_started(self, started: StartedRow) -> int:
        """Queue a row from :meth:`start` for the next step (on the generation thread); returns its handle (given
        here: the batch that started it may have been replaced since, after a failed step).

        Raises:
            ConfigError: the row ended at its first token (it has nothing left to generate).
        """
        if started.prefill is None:
            raise ConfigError("a row that ended at its first token has nothing to add")
        row = started.row
        row.handle = self._take_handles(1)
        self._ready[row.handle] = started.prefill
        self._new.append(row)
        self._by_handle[row.handle] = row
        return row.handle

    def _take_handles(self, n: int) -> int:
        """The first of ``n`` consecutive new handles."""
        first = self._next_handle
        self._next_handle += n
        return first

    def _settings_for(self, params: SamplingParams, keep: bool) -> _Settings:
        """The stop / bias tensors of ``params``: shared with earlier rows when cached; ``keep`` caches new ones
        (the generation thread only: another thread builds its own)."""
        key = (params.stop_token_ids, params.stop_strings, params.logit_bias)
        settings = self._settings.get(key)
        if settings is None:
            settings = _Settings(self.engine, params)
            if keep:
                if len(self._settings) >= MAX_CACHED_SETTINGS:  # rows keep theirs; only the lookup is dropped
                    self._settings.clear()
                self._settings[key] = settings
        return settings

    def _new_row(
        self, handle: int, prompt: Sequence[int], params: SamplingParams, settings: _Settings, seed: int, budget: int
    ) -> _Row:
        row = _Row(handle, list(prompt), params, settings, int(seed), int(budget))
        if params.presence_penalty or params.frequency_penalty:
            row.counts = torch.zeros(self.engine.vocab_size, dtype=torch.float32, device=self._device)
        return row

    def finish(self, handles: Sequence[int], reason: str = FINISH_STOP) -> None:
        """End rows now (they generate nothing more and leave the batch at the next step); ended rows are skipped."""
        for h in handles:
            row = self._by_handle.get(int(h))
            if row is not None and row.reason is None:
                row.reason = reason

    def step(self, early: Callable[[list[RowStep]], None] | None = None) -> list[RowStep]:
        """One token for every live row, the rows added since the last step included (their first).

        Args:
            early: called with the newcomers' first tokens as soon as they are sampled, before the running rows'
                sampling (~0.25 ms a row at 100k ids); those rows are then not in the returned list. A newcomer's
                first token is what its client waits for, the running rows' tokens only pace their streams.

        Returns:
            One :class:`RowStep` per row that generated a token (and was not handed to ``early``), in batch order.
        """
        with torch.no_grad():
            self._compact()
            if not self._rows:  # idle: take a fresh snapshot of the head, so reloaded weights are used from here on
                self._dec = self.engine._decoder()  # noqa: SLF001
            if self.prefill_first and self._new:  # the newcomers alone (at the batch's end), then merged
                first = len(self._rows)
                z = self._dec.logits(self._prefill(), out=self._scratch(len(self._rows) - first)[0])
                outs = self._sample_and_record(z, first, len(self._rows), offset=first)
                self._merge_fresh()
                return outs
            h, self._ahead = (self._ahead if self._ahead is not None else self._feed()), None
            running = len(self._rows)
            if self._new:
                fresh = self._prefill()  # the newcomers sit at the batch's end
                h = fresh if h is None else torch.cat([h, fresh], 0)
            if h is None:
                return []
            z = self._dec.logits(h, out=self._scratch(len(self._rows))[0])  # (B, V) fp32, one pass of the head
            if early is None or running in (0, len(self._rows)):
                self._merge_fresh()
                return self._sample_and_record(z, 0, len(self._rows))
            firsts = self._sample_and_record(z, running, len(self._rows))
            try:
                early(firsts)
            finally:  # the newcomers' cache joins the running one once their first tokens are out
                self._merge_fresh()
            return self._sample_and_record(z, 0, running)

    def feed_ahead(self) -> None:
        """Run the running rows' trunk pass of the next :meth:`step` now (no-op if done or if no row runs).

        The scheduler calls it once a step's tokens are handed over: requests that arrive meanwhile join at the next
        step, where only their own prefill and the shared head pass are left. Rows ended before that step are dropped
        from the states fed here as from the cache.
        """
        if self.prefill_first:
            return
        with torch.no_grad():
            self._compact()
            if self._rows and self._ahead is None:
                self._ahead = self._feed()

    # ---------------------------------------------------------------- internals
    def _compact(self) -> None:
        """1. Drop ended rows (batch and cache), then cache columns that are padding in every row."""
        ended = {row.handle for row in self._new if row.reason is not None}
        for h in ended:
            self._by_handle.pop(h, None)
        if ended:
            self._new = [r for r in self._new if r.reason is None]
            for first, p in list(self._ready.items()):  # a group that lost rows is prefilled again, smaller
                if any(first <= h < first + int(p.hidden.shape[0]) for h in ended):
                    del self._ready[first]
        live = [i for i, r in enumerate(self._rows) if r.reason is None]
        if len(live) == len(self._rows):
            return
        for r in self._rows:
            if r.reason is not None:
                self._by_handle.pop(r.handle, None)
        if not live:
            self._rows, self._cache, self._mask, self._pos, self._ahead = [], None, None, None, None
            return
        order = _fill_holes(self._cache, live)  # in place: the rows after the last live one move
        if order is None:  # not the fast step's buffers: a compacted copy of the cache
            order = live
            self._cache.reorder_cache(torch.tensor(live, dtype=torch.long, device=self._device))
        idx = torch.tensor(order, dtype=torch.long, device=self._device)
        if self._ahead is not None:
            self._ahead = self._ahead.index_select(0, idx)
        self._rows = [self._rows[i] for i in order]
        self._mask = self._mask.index_select(0, idx)
        self._pos = self._pos.index_select(0, idx)
        used = torch.nonzero(self._mask.any(0)).flatten()
        first = int(used[0]) if len(used) else 0
        if first > 0:  # the rows that needed these columns have left
            self._mask = self._mask[:, first:]
            _map_kv(self._cache, lambda t: t[:, :, first:])

    def _feed(self) -> torch.Tensor | None:
        """2. The running rows' last tokens through the model: their (B, H) hidden states (None if none)."""
        if not self._rows:
            return None
        pending = torch.tensor([r.pending for r in self._rows], dtype=torch.long, device=self._device)
        ones = torch.ones(len(self._rows), 1, dtype=self._mask.dtype, device=self._device)
        self._mask = torch.cat([self._mask, ones], 1)
        h = self._dec.forward(pending[:, None], self._mask, self._pos, self._cache)
        self._pos += 1
        return h

    def _prefill(self) -> torch.Tensor | None:
        """3. The new rows' last hidden states: those added with a :class:`Prefill` take theirs, the others are
        prefilled now (one left-padded batch). They join the batch's rows now (sampled with it); their caches join
        the running one at :meth:`_merge_fresh`."""
        if not self._new:
            return None
        new, self._new = self._new, []
        order: list[_Row] = []
        parts: list[Prefill] = []
        rest: list[_Row] = []
        i = 0
        while i < len(new):
            ready = self._ready.pop(new[i].handle, None)
            if ready is None:
                rest.append(new[i])
                i += 1
                continue
            n = int(ready.hidden.shape[0])
            order.extend(new[i : i + n])
            parts.append(ready)
            i += n
        if rest:
            parts.append(self.prefill([r.prompt for r in rest]))
            order.extend(rest)
        self._fresh = parts
        self._rows.extend(order)
        return parts[0].hidden if len(parts) == 1 else torch.cat([p.hidden for p in parts], 0)

    def _merge_fresh(self) -> None:
        """3b. The prefilled newcomers' cache, mask and positions appended to the running ones (after the
        running rows: the batch order of :attr:`_rows`). It may copy the whole running cache (a buffer without room,
        the Hugging Face step), so :meth:`step` runs it after handing the newcomers' first tokens over."""
        parts, self._fresh = self._fresh or [], None
        for p in parts:
            if self._cache is None:
                self._cache, self._mask, self._pos = p.cache, p.mask, p.pos
                continue
            old, new = self._mask.shape[1], p.mask.shape[1]
            width = max(old, new)
            fast = self._dec.step is not None  # the Hugging Face step appends by concatenation anyway
            joined = fast and (
                _join_in_place(self._cache, p.cache, old, new)
                or _join_into_new_buffers(self._cache, p.cache, old, new)
            )
            if not joined:
                _merge_kv(self._cache, p.cache, width)
            self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(p.mask, width, 1)], 0)
            self._pos = torch.cat([self._pos, p.pos], 0)

    def _sample_and_record(self, logits: torch.Tensor, lo: int, hi: int, offset: int = 0) -> list[RowStep]:
        """4. Per-row logit processing, sampling and stop conditions (:func:`_sample_rows`) for the rows ``lo:hi`` of
        the batch (``logits``: the head output of rows ``offset:``; rows ``lo:hi`` are modified)."""
        _, e_buf = self._scratch(hi - lo)
        return _sample_rows(self._rows[lo:hi], logits[lo - offset : hi - offset], e_buf, self._device)

    def _scratch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous (rows, V) fp32 buffers for the logits and the sampler's exp, kept across steps.

        Fresh tensors of that size (6 MB each at 16 rows x 100k ids) come from new pages every step: in a profile
        of 8 x 512 over cl100k the sampler's ``cumsum`` and ``sub`` took ~5 of a 32 ms 16-row step with them,
        ~1.5 in place (the engine's own streams keep such buffers too).
        """
        if self._buf is None or self._buf.shape[1] < rows:
            v = self.engine.vocab_size
            self._buf = torch.empty(2, max(rows, 1), v, dtype=torch.float32, device=self._device)
        return self._buf[0, :rows], self._buf[1, :rows]


def _sample_rows(rows: Sequence[_Row], z: torch.Tensor, e_buf: torch.Tensor, device: torch.device) -> list[RowStep]:
    """Per-row logit processing, sampling per settings group, then each row's stop conditions, for ``rows`` and
    their logits ``z`` (modified); ``e_buf``: the sampler's (rows, V) scratch. Rows' state advances."""
    # a. per-row processing, as GenerationStream._sample does it for a batch of one setting
    alts: dict[int, tuple[float, list[int], list[float]]] = {}
    tops: dict[int, tuple[torch.Tensor, list[int], list[float]]] = {}
    for i, r in enumerate(rows):
        p, s = r.params, r.settings
        zi = z[i]
        hist = torch.tensor(r.seen, dtype=torch.long, device=device) if r.seen is not None else None
        process_logits(zi, p, r.step, hist, r.counts, s.bias, s.stop_ids_t)
        if p.top_logprobs >= 0:  # the processed distribution (temperature applied; 0 = greedy reads as 1)
            full = torch.log_softmax(zi[None] / (1.0 if p.greedy else p.temperature), -1)  # (1, V)
            k = min(p.top_logprobs, full.shape[1])
            top_v, top_i = full.topk(k, dim=-1) if k else (full[:, :0], full[:, :0].long())
            tops[i] = (full[0], top_i[0].tolist(), top_v[0].tolist())
    # b. sampling, one group per distinct (greedy, temperature, top_k, top_p)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.pick_key, []).append(i)
    toks = torch.empty(len(rows), dtype=torch.long, device=device)
    lps = torch.empty(len(rows), dtype=torch.float32, device=device)
    for idx in groups.values():
        whole = len(idx) == len(rows)
        zg = z if whole else z[torch.tensor(idx, device=device)]
        group = [rows[i] for i in idx]
        t, lp = pick_tokens(zg, group[0].params, lambda g=group: _uniforms(g), e_buf[: len(group)])
        if whole:
            toks, lps = t, lp
        else:
            sel = torch.tensor(idx, device=device)
            toks[sel], lps[sel] = t, lp
    for i, (full, ti, tv) in tops.items():
        alts[i] = (float(full[toks[i]]), ti, tv)
    # c. record tokens and stop conditions (stop token / stop string first, then budget or position limit)
    out = []
    toks_l, lps_l = toks.tolist(), lps.tolist()
    for i, r in enumerate(rows):
        t = toks_l[i]
        r.step += 1
        reason = None
        if t in r.settings.stop_ids:
            reason = FINISH_STOP
        ss = r.settings.stop_strings
        if ss is not None:
            r.tail, hit = ss.push(r.tail, t)
            if hit and r.step > r.params.min_new_tokens:
                reason = FINISH_STOP
        if reason is None and r.step >= r.budget:
            reason = FINISH_LENGTH
        if r.counts is not None:
            r.counts[t] += 1.0
        if r.seen is not None:
            r.seen.append(t)
        r.pending = t
        r.reason = reason
        out.append(RowStep(r.handle, t, lps_l[i], alts.get(i), reason))
    return out


def _uniforms(rows: Sequence[_Row]) -> np.ndarray:
    """(n,) float32 uniforms: each row's own ``row_uniforms(key, step)`` (rows that joined at other times differ in
    step, so rows are drawn in groups of equal step)."""
    keys = np.array([r.key for r in rows], dtype=np.uint64)
    steps = np.array([r.step for r in rows])
    out = np.empty(len(rows), dtype=np.float32)
    for s in np.unique(steps).tolist():
        sel = steps == s
        out[sel] = row_uniforms(keys[sel], int(s))
    return out


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``x`` left-padded with zeros along ``dim`` to ``width``."""
    extra = width - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim)


def _layers(cache: Any) -> list[Any]:
    """The per-layer key / value holders of a ``transformers`` ``DynamicCache`` (``layers[i].keys / .values``)."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        raise RuntimeError(
            f"continuous batching needs a DynamicCache with per-layer keys / values (transformers >= 4.56); got "
            f"{type(cache).__name__}; upgrade transformers or set serve.max_batch_size=1"
        )
    return list(layers)


def _map_kv(cache: Any, fn: Any) -> None:
    """Apply ``fn`` to every layer's (B, heads, L, d) keys and values."""
    for layer in _layers(cache):
        if getattr(layer, "is_initialized", True) and layer.keys is not None and layer.keys.numel():
            layer.keys, layer.values = fn(layer.keys), fn(layer.values)


def _fill_holes(cache: Any, live: list[int]) -> list[int] | None:
    """Drop ended rows from a cache whose layers are views of the fast step's buffers
    (:func:`rlchat.core.fast_decode.kv_buffers`) without copying it: each live row past the first ``len(live)``
    rows moves into an ended row's slot and the views shrink to ``len(live)`` rows. Returns the new batch order
    (old row indices), or None when a layer is not such a view (the caller copies the live rows instead).

    Why: copying the whole cache on every departure (and again when the next step's append found a new tensor)
    cost ~4 ms of a ~32 ms 16-row step at a real vocabulary with a request leaving every other step (8 x 512 over
    cl100k, bf16, one thread); moving the few rows that end up past the batch's end costs microseconds.
    """
    found = [kv_buffers(layer) for layer in _layers(cache)]
    if not found or any(f is None for f in found):
        return None
    n_live, alive = len(live), set(live)
    movers = iter(j for j in live if j >= n_live)
    order = [i if i in alive else next(movers) for i in range(n_live)]
    holes = [i for i in range(n_live) if order[i] != i]
    src = torch.tensor([order[i] for i in holes], dtype=torch.long)
    dst = torch.tensor(holes, dtype=torch.long)
    for layer, (kb, vb, s) in zip(_layers(cache), found):
        n = layer.keys.shape[2]
        if holes:
            src_d, dst_d = src.to(kb.device), dst.to(kb.device)
            kb[dst_d, :, s : s + n] = kb[src_d, :, s : s + n]
            vb[dst_d, :, s : s + n] = vb[src_d, :, s : s + n]
        layer.keys, layer.values = kb[:n_live, :, s : s + n], vb[:n_live, :, s : s + n]
    return order


def _join_in_place(cache: Any, new: Any, width: int, new_width: int) -> bool:
    """Write a prefilled newcomer's cache (``new``, ``new_width`` columns) into the spare rows of the running
    cache's buffers (``width`` columns), right-aligned, both left-padded to the wider of the two; False (nothing
    changed) when a layer is not a view of the fast step's buffers or lacks the spare rows or leading columns.

    Columns a row gains on the left are zeroed: they are masked out, and zeros (not a buffer's stale bytes, which
    may read as nan) keep the masked attention exact.
    """
    layers, fresh = _layers(cache), _layers(new)
    found = [kv_buffers(layer) for layer in layers]
    total = max(width, new_width)
    for layer, other, f in zip(layers, fresh, found):
        if f is None or layer.keys.shape[2] != width or other.keys.shape[2] != new_width:
            return False
        kb, _, s = f
        b, k = layer.keys.shape[0], other.keys.shape[0]
        if b + k > kb.shape[0] or s < total - width or other.keys.dtype != kb.dtype:
            return False
    for layer, other, (kb, vb, s) in zip(layers, fresh, found):
        b, k = layer.keys.shape[0], other.keys.shape[0]
        s0 = s - (total - width)  # the first column of the joined views
        pad = total - new_width
        for buf, part in ((kb, other.keys), (vb, other.values)):
            buf[:b, :, s0:s].zero_()
            buf[b : b + k, :, s0 : s0 + pad].zero_()
            buf[b : b + k, :, s0 + pad : s0 + total] = part
        layer.keys, layer.values = kb[: b + k, :, s0 : s0 + total], vb[: b + k, :, s0 : s0 + total]
    return True


def _join_into_new_buffers(cache: Any, new: Any, width: int, new_width: int) -> bool:
    """The running rows and a newcomer's (as :func:`_join_in_place`) copied into new buffers with room to grow --
    spare rows for the next arrivals, leading columns for a longer newcomer, trailing ones for the next steps -- so
    that the joins, departures and steps after this one run in place. One copy of the cache, which the merge by
    concatenation also made (and the next step's append a second one). False (nothing changed) when a layer's
    columns are not the mask's (a layer that keeps a window of its own)."""
    layers, fresh = _layers(cache), _layers(new)
    if any(a.keys.shape[2] != width or b.keys.shape[2] != new_width for a, b in zip(layers, fresh)):
        return False
    total = max(width, new_width)
    for layer, other in zip(layers, fresh):
        b, k = layer.keys.shape[0], other.keys.shape[0]
        rows = b + k + max(4, (b + k) // 2)
        lead, trail = max(16, total // 4), max(64, total // 2)
        parts = [(layer.keys, other.keys), (layer.values, other.values)]
        bufs = []
        for old, part in parts:
            buf = old.new_zeros((rows, old.shape[1], lead + total + trail, old.shape[3]))
            buf[:b, :, lead + total - width : lead + total] = old
            buf[b : b + k, :, lead + total - new_width : lead + total] = part
            bufs.append(buf)
        layer._rlchat_kv = (bufs[0], bufs[1])
        layer.keys, layer.values = bufs[0][: b + k, :, lead : lead + total], bufs[1][: b + k, :, lead : lead + total]
    return True


def _merge_kv(cache: Any, new: Any, width: int) -> None:
    """Append ``new``'s rows to ``cache``'s along the batch, both left-padded to ``width`` columns."""
    for layer, other in zip(_layers(cache), _layers(new)):
        layer.keys = torch.cat([_pad_left(layer.keys, width, 2), _pad_left(other.keys, width, 2)], 0)
        layer.values = torch.cat([_pad_left(layer.values, width, 2), _pad_left(other.values, width, 2)], 0)
