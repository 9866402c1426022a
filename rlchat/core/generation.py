"""The generation engine: batched KV-cache sampling for rollouts, chat, eval and serving.

One engine, three ways to drive it::

    engine = GenerationEngine(policy, tokenizer)
    result = engine.generate(prompts, SamplingParams(max_new_tokens=64, temperature=1.0), seeds=[0, 1, 2])
    for token_id, logprob in engine.stream(prompt, params): ...          # chat CLI / Serve
    stream = engine.steps(prompts, params, seeds)                           # rollout workers, lock-step
    for step in stream:                                                     # one batched forward per token
        ... envs step with step.tokens[step.active] ...; stream.finish(rows_the_env_ended)
    batch = stream.result()

How it works and why (the rollout hot path; figures in bench/README.md):
- Prompts are **left-padded** into one batch; position ids count real tokens only (``cumsum(mask) - 1``), the
  same rule :meth:`rlchat.model.PolicyValueModel.forward` uses, so the learner's right-padded recomputation sees
  the very same positions and its log-probs equal the behaviour log-probs (to 1e-5 in fp32, tested).
- The model is run as trunk (:func:`~rlchat.model.resolve_trunk`) + our own LM-head matmul on the **last position
  only**, with a Hugging Face ``DynamicCache`` (a static cache measured no faster on CPU for the tiny models).
  Logits go into preallocated ``(B, V)`` buffers: full-vocabulary tensors allocated per step cost page faults.
- Sampling is **inverse-CDF**: ``cumsum(exp(z - max))`` and a ``searchsorted`` of one uniform per row, instead of
  ``torch.multinomial`` over the full vocabulary (7 ms vs 69 ms per step for 32 rows of a 100k vocabulary on one
  core here, softmax included); over a large vocabulary in two levels, blocks then one block (:func:`_search_blocks`).
  Top-k works in the ``(B, k)`` domain of ``topk``; top-p sorts once.
- Per-row seeds use a counter-based RNG (SplitMix64 of ``(seed, step)``), so a row's uniforms do not depend on the
  other rows: the same seed gives the same output whatever the batch composition (up to float noise of batched
  matmuls, which can flip a token only when a uniform falls within ~1e-7 of a CDF boundary).
- Rows finish at different times (stop ids, stop strings, the caller's :meth:`GenerationStream.finish`, and
  ``max_new_tokens`` or the model's last position, whichever comes first: finish reason ``length``; a long prompt
  ends its own row early instead of failing the batch); once a quarter of the batch has finished, the batch and its
  KV cache are **compacted** to the live rows.

Log-probabilities returned are those of the distribution actually sampled from (after repetition penalty,
min-tokens masking, temperature, top-k and top-p). Greedy decoding (``temperature == 0``) and beam search are
deterministic, so there the log-prob is the model's own (temperature 1, unfiltered, after repetition penalty).

Deviations from ``transformers.generate``: stop strings match on raw UTF-8 bytes of the generated tokens; beam
search ignores temperature / top-k / top-p (always deterministic, length penalty 1).

No Ray import here.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from rlchat.core.errors import ConfigError
from rlchat.core.fast_decode import DecodePrefill, DecodeStep, decode_step_fn, prefill_fn
from rlchat.core.model import PolicyValueModel, autocast_context, logit_transform, resolve_precision, resolve_trunk
from rlchat.core.packed_linear import pack_bf16_weight, packed_linear
from rlchat.core.weight_stamp import WeightStamp

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rlchat.core.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

# --------------------------------------------------------------------------------------------------------------
# Parameters and results
# --------------------------------------------------------------------------------------------------------------


SAMPLING_EPS = 1e-5
"""Temperatures below this decode greedily (vLLM's rule too): dividing logits by a smaller one overflows them."""

LOGIT_CAP = float(torch.finfo(torch.float32).max) * SAMPLING_EPS
"""Largest logit the penalties may leave: a repetition penalty near 0 divides a positive logit into +inf (then
inf - inf = nan in the sampler); capped here, the logit stays finite even after division by a temperature >=
:data:`SAMPLING_EPS`, so the token stays the likeliest by far and its log-prob is finite."""


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. ``temperature == 0`` (or below :data:`SAMPLING_EPS`) is greedy; ``num_beams > 1`` is beam
    search."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens per row (finish reason ``length``)."""
    min_new_tokens: int = 0
    """Stop tokens are masked out (and stop strings ignored) until this many tokens were generated."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (so is any temperature below :data:`SAMPLING_EPS`)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of top tokens with probability mass >= top_p (1 = off)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the prompt or the output (logit / p if > 0 else logit * p)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra ids that end a row (the tokenizer's end-of-turn id always does); the stop token is returned."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a row once the generated text contains them (the completing token is returned)."""
    num_beams: int = 1
    """Beam width; > 1 runs deterministic beam search (chat / eval only, not for rollouts)."""
    seed: int | None = None
    """Base seed when no per-row seeds are given (row i gets a seed derived from (seed, i)); None = random."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token already generated in the row (0 = off)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was already generated in the row (0 = off)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """``(token id, bias)`` pairs added to the logits before sampling (OpenAI's logit_bias)."""
    top_logprobs: int = -1
    """-1 = off; k >= 0: each step also reports the chosen token's log-prob under the processed distribution
    (penalties, bias and temperature applied, before top-k / top-p) and the k likeliest tokens
    (:attr:`StepOutput.alternatives`). Stepwise generation only (not beam search)."""

    def __post_init__(self) -> None:
        # (ok, field, value, expected, fix): the chat CLI, Serve and batch generation show these to users as is.
        checks = [
            (
                self.max_new_tokens >= 1,
                "max_new_tokens",
                self.max_new_tokens,
                "at least 1",
                "ask for at least one new token, e.g. max_new_tokens=64",
            ),
            (
                self.min_new_tokens >= 0,
                "min_new_tokens",
                self.min_new_tokens,
                ">= 0",
                "use 0 to let a row stop at its first token",
            ),
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                "temperature",
                self.temperature,
                ">= 0 (0 = greedy)",
                "use 1.0 for plain sampling, lower for less random output, or 0 for greedy decoding",
            ),
            (
                self.top_k >= 0,
                "top_k",
                self.top_k,
                ">= 0 (0 = off)",
                "use 0 to sample from every token or e.g. 40 to keep the 40 most likely",
            ),
            (
                0 < self.top_p <= 1,
                "top_p",
                self.top_p,
                "in (0, 1] (1 = off)",
                "use 1.0 to turn nucleus sampling off or e.g. 0.9; for deterministic output set temperature=0",
            ),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
                "repetition_penalty",
                self.repetition_penalty,
                "> 0 (1 = off)",
                "use 1.0 to turn it off or e.g. 1.1 to discourage repeats",
            ),
            (
                self.num_beams >= 1,
                "num_beams",
                self.num_beams,
                "at least 1",
                "use 1 for sampling / greedy decoding or e.g. 4 for beam search",
            ),
            (
                all(s for s in self.stop_strings),
                "stop_strings",
                self.stop_strings,
                "non-empty strings",
                "remove the empty string: every text contains it, so it would end each row at once",
            ),
            (
                all(math.isfinite(x) for x in (self.presence_penalty, self.frequency_penalty))
                and all(math.isfinite(b) for _, b in self.logit_bias),
                "presence_penalty / frequency_penalty / logit_bias",
                (self.presence_penalty, self.frequency_penalty),
                "finite numbers",
                "use values such as OpenAI's: penalties in [-2, 2], biases in [-100, 100]",
            ),
            (
                self.top_logprobs >= -1,
                "top_logprobs",
                self.top_logprobs,
                ">= -1 (-1 = off)",
                "use -1 for no log-prob report or e.g. 5 for the 5 likeliest tokens",
            ),
        ]
        for ok, name, value, expected, fix in checks:
            if not ok:
                raise ConfigError(f"SamplingParams.{name}={value!r}: expected {expected}; {fix}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


@dataclass
class GenerationResult:
    """Per prompt: the new tokens (including the stop token), their log-probs, why it ended and the prompt length."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    prompt_lengths: list[int]


@dataclass
class StepOutput:
    """One lock-step of :class:`GenerationStream` over the original rows.

    Attributes:
        tokens: (B,) int64 token generated this step (the pad id where not active).
        logprobs: (B,) float32 its log-prob (0 where not active).
        active: (B,) bool: the row produced a token this step (its last token may be a stop token).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    active: np.ndarray
    alternatives: list[tuple[float, list[int], list[float]] | None] | None = None
    """With ``SamplingParams.top_logprobs >= 0``: per row (None where not active) the chosen token's processed
    log-prob, and the ids and log-probs of the k likeliest tokens."""


# --------------------------------------------------------------------------------------------------------------
# Counter-based per-row random numbers
# --------------------------------------------------------------------------------------------------------------

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014), vectorised; uint64 arithmetic wraps modulo 2**64."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """(B,) uint64 stream keys of per-row seeds (any Python ints, negative ones included)."""
    return _splitmix64(np.array([int(s) % (1 << 64) for s in seeds], dtype=np.uint64))


def row_uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    """(B,) float32 uniforms in [0, 1) for generation step ``step``: a pure function of (key, step)."""
    with np.errstate(over="ignore"):
        x = _splitmix64(keys + _GAMMA * np.uint64(step + 1))
    return ((x >> np.uint64(40)).astype(np.float32)) * np.float32(2.0**-24)


# --------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------


class GenerationEngine:
    """Batched KV-cache decoding with a policy (or any causal LM) and the chat tokenizer.

    Args:
        model: a :class:`~rlchat.model.PolicyValueModel` (its LM is used) or a ``transformers`` causal LM.
        tokenizer: the chat tokenizer: its end-of-turn id always stops a row, its pad id pads prompts.
        precision: ``auto`` / ``bf16`` / ``fp32``, resolved with the model's width exactly as the learner's
            :meth:`~rlchat.model.PolicyValueModel.autocast_dtype` does (see :func:`rlchat.model.resolve_precision`),
            so behaviour and learner log-probs come from the same precision.
    """

    def __init__(
        self, model: PolicyValueModel | PreTrainedModel, tokenizer: ChatTokenizer, precision: str = "auto"
    ) -> None:
        lm = model.lm if isinstance(model, PolicyValueModel) else model
        self.lm: PreTrainedModel = lm
        self.tokenizer = tokenizer
        self.trunk: nn.Module = resolve_trunk(lm)
        head_rows = int(lm.get_output_embeddings().weight.shape[0])
        limit = model.vocab_size if isinstance(model, PolicyValueModel) else tokenizer.n_vocab
        self.vocab_size = min(head_rows, limit)
        self.transform = logit_transform(lm.config)
        text_config = lm.config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)
        self.precision = precision
        params = inspect.signature(self.trunk.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._head_copy: _HeadCopy | None = None  # see _kept_head

    @classmethod
    def for_inference(
        cls,
        model: PolicyValueModel | PreTrainedModel,
        tokenizer: ChatTokenizer,
        precision: str = "auto",
        device: str | torch.device | None = None,
    ) -> GenerationEngine:
        """An engine over a model nothing trains any more (serving, chat): under bf16 the weights are stored in bf16.

        Autocast casts every fp32 weight to bf16 again on each forward (its cast cache lives for one autocast
        context, i.e. one step): at 8 x 512 over cl100k that was 17 ms of a 40 ms one-row step on a CPU, and the head
        snapshot a decode batch takes when it starts re-cast the 100k x 512 head (~100 ms before every first token
        of an idle server). Stored in bf16, the matmuls read the same bf16 weights with no copy. The residual
        stream and the norms then run in bf16 too, so replies can differ from a learner-precision engine's in the
        last bits: right for serving (as inference servers run bf16 checkpoints), wrong for rollouts, whose
        log-probs the learner must reproduce; they use the constructor. Under fp32 the model is left as it is.

        ``device`` (default: where ``model`` is): the language model is cast where it is, then moved there alone
        (not a value head or critic). Moved first, a GPU held the whole fp32 policy at load, and its caching
        allocator keeps that peak reserved for the life of the process.
        """
        engine = cls(model, tokenizer, precision)
        target = engine.device if device is None else torch.device(device)
        dtype = resolve_precision(precision, target, engine.hidden_size)
        if dtype is not None:
            engine.lm.to(dtype)
        engine.lm.to(target)
        return engine

    # ---------------------------------------------------------------- public API
    @property
    def device(self) -> torch.device:
        return self.lm.get_output_embeddings().weight.device

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype the engine runs under (None = fp32)."""
        return resolve_precision(self.precision, self.device, self.hidden_size)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
        deadline: float | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Decode every prompt to completion.

        Args:
            prompts: token ids per prompt (e.g. from ``tokenizer.render_prompt``), any lengths >= 1.
            params: decoding settings.
            seeds: one seed per prompt (same seed -> same output regardless of the rest of the batch).
            deadline: a ``time.monotonic()`` instant: rows still running after the step that passes it end with
                ``length`` (a served request's deadline; beam search included, which runs whole).
            stop: asked after every step, as the deadline: True ends the rows still running (a served request whose
                client went away: nobody reads the rest).

        Returns:
            :class:`GenerationResult` in prompt order.
        """
        if not prompts:
            return GenerationResult([], [], [], [])
        if params.num_beams > 1:
            return _BeamSearch(self, prompts, params, deadline, stop).run()
        stream = GenerationStream(self, prompts, params, seeds)
        everyone = np.arange(len(prompts))
        for _ in stream:
            if (deadline is not None and time.monotonic() >= deadline) or (stop is not None and stop()):
                stream.finish(everyone, FINISH_LENGTH)
        return stream.result()

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[tuple[int, float]]:
        """Yield ``(token_id, logprob)`` as each token is produced (the stop token included) for one prompt.

        With ``num_beams > 1`` the best beam is only known at the end, so its tokens are yielded after the search.
        """
        if params.num_beams > 1:
            res = self.generate([prompt], params)
            yield from zip(res.tokens[0], res.logprobs[0])
            return
        for out in GenerationStream(self, [prompt], params, None):
            if out.active[0]:
                yield int(out.tokens[0]), float(out.logprobs[0])

    def steps(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> GenerationStream:
        """A lock-step :class:`GenerationStream` over ``prompts`` (one batched forward per generated token)."""
        if params.num_beams > 1:
            raise ConfigError(
                f"SamplingParams.num_beams={params.num_beams}: lock-step generation samples one token per row; "
                "use generate() for beam search or set num_beams=1"
            )
        return GenerationStream(self, prompts, params, seeds)

    # ---------------------------------------------------------------- model plumbing (used by the streams)
    def _check_prompts(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, cap_at_limit: bool = False
    ) -> None:
        """Refuse empty prompts, ids outside the vocabulary and prompts the model's positions cannot take.

        With ``cap_at_limit`` (sampling streams) a prompt only needs room for one new token: its row ends with
        ``length`` at the model's limit (:meth:`row_budgets`). Beam search, whose beams share one step count,
        still needs room for ``max_new_tokens`` after the longest prompt.
        """
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ConfigError(
                    f"prompts[{i}] is empty: expected at least one token id (tokenizer.render_prompt ends with the "
                    "assistant token)"
                )
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                raise ConfigError(
                    f"prompts[{i}] holds token id {lo if lo < 0 else hi}: expected ids in [0, {self.vocab_size}); "
                    "encode prompts with the model's tokenizer"
                )
        longest = max(len(p) for p in prompts)
        if self.max_positions and longest >= self.max_positions:
            raise ConfigError(
                f"prompt of {longest} tokens fills the model's {self.max_positions} positions: no room for a new "
                "token; shorten the prompt (keep its last tokens)"
            )
        if not cap_at_limit and self.max_positions and longest + params.max_new_tokens > self.max_positions:
            raise ConfigError(
                f"prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds the model's "
                f"{self.max_positions} positions; shorten the prompt or lower max_new_tokens"
            )

    def row_budgets(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> np.ndarray:
        """(B,) new tokens each row may generate: ``max_new_tokens``, or fewer where the prompt leaves less room
        in the model's positions (the row then ends with ``length`` there instead of failing the whole batch:
        the learner forwards prompt + reply, so it must fit too)."""
        budgets = np.full(len(prompts), params.max_new_tokens, dtype=np.int64)
        if self.max_positions:
            budgets = np.minimum(budgets, self.max_positions - np.array([len(p) for p in prompts], dtype=np.int64))
        return budgets

    def _decoder(self) -> _Decoder:
        """Snapshot the model plumbing for one generation call: precision and the head weight (cut to the vocab).

        Each stream holds its own snapshot, so concurrent calls (Serve's thread pool) never share mutable state.
        """
        dtype = self.autocast_dtype()
        head = self.lm.get_output_embeddings()
        w = head.weight.detach()[: self.vocab_size]
        b = getattr(head, "bias", None)
        packed = self._head_packed(head.weight) if dtype == torch.bfloat16 else None
        if dtype is None:
            w_t = self._head_t(head.weight)
        else:  # with a packed copy the view is not read: no cast of an fp32 head (rollouts under autocast)
            w_t = w.t() if packed is not None else w.to(dtype).t()
        return _Decoder(
            trunk=self.trunk,
            config=self.lm.config,
            cache_kw=self._cache_kw,
            device=self.device,
            dtype=dtype,
            w_t=w_t,
            packed=packed,
            bias=b.detach()[: self.vocab_size].float() if b is not None else None,
            transform=self.transform,
            step=decode_step_fn(self.trunk),
            prefill=prefill_fn(self.trunk),
        )

    def _head_t(self, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 head as (H, V), contiguous on a CPU: a copy kept until the weights change (:meth:`_kept_head`).

        The head is stored (V, H) (tied to the embedding), so ``h @ w.t()`` hands MKL a transposed operand; on an
        AVX2 CPU (AMD EPYC, one thread, cl100k x 512) that ran at half the speed of a contiguous (H, V) operand at
        every batch size: 14.1 vs 6.8 ms for one row, 47 vs 39 ms for 16 (``bench/README.md``, "Serve load",
        eighth session). The copy costs ~175 ms and 4 bytes x V x H there.
        Heads above :data:`HEAD_COPY_MAX_BYTES` are read through the view (a model that large belongs on a GPU).
        GPUs take the view as it is (cuBLAS reads either layout at the same speed).
        """
        w = weight.detach()[: self.vocab_size]
        if w.device.type != "cpu" or w.numel() * w.element_size() > HEAD_COPY_MAX_BYTES:
            return w.t()
        kept = self._kept_head(weight, "fp32 (H, V)", lambda: w.t().contiguous())
        assert kept is not None
        return kept

    def _head_packed(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The bf16 head packed in oneDNN's layout (:mod:`rlchat.core.packed_linear`), kept until the weights change,
        or None where packing does not apply (a GPU, a CPU without bf16 units, a head above the cap): the decoder
        then multiplies by the plain bf16 view. Costs one bf16 copy of the head (2 bytes x V x H, ~60 ms to pack
        cl100k x 512); saves ~6 ms of a one-row and ~8 ms of a 16-row step there."""
        w = weight.detach()[: self.vocab_size]
        if w.device.type != "cpu" or 2 * w.numel() > HEAD_COPY_MAX_BYTES:
            return None
        return self._kept_head(weight, "oneDNN bf16", lambda: pack_bf16_weight(w.to(torch.bfloat16)))

    def _kept_head(
        self, weight: torch.Tensor, kind: str, make: Callable[[], torch.Tensor | None]
    ) -> torch.Tensor | None:
        """A copy of the head weight's rows up to the vocabulary that ``make`` builds, kept across generation calls
        and rebuilt only when the weight changed (:class:`rlchat.core.weight_stamp.WeightStamp`: replaced, updated
        in place, new storage, written through ``.data``). The kept entry holds the weight itself, so a new weight
        can never reuse its address unnoticed. ``make`` may return None (no copy applies): that is kept too."""
        rows = weight.detach()[: self.vocab_size]
        kept = self._head_copy
        if kept is None or kept.kind != kind or kept.weight is not weight or not kept.stamp.matches(weight, rows):
            kept = _HeadCopy(kind, weight, WeightStamp.of(weight, rows), make())
            self._head_copy = kept  # one assignment: a concurrent caller sees the old entry or the new one
        return kept.head


@dataclass(frozen=True)
class _HeadCopy:
    """The engine's kept head copy and what it was copied from (see ``GenerationEngine._kept_head``)."""

    kind: str  # which copy: the fp32 (H, V) one or the oneDNN-packed bf16 one
    weight: torch.Tensor  # the head parameter itself: identity, not just an address
    stamp: WeightStamp  # the rows it was copied from, as they were
    head: torch.Tensor | None  # the copy (None: no copy applies; the decoder reads the weight's view)


HEAD_COPY_MAX_BYTES = 1 << 30
"""Largest head copy the engine keeps (``GenerationEngine._head_t``, ``_head_packed``): cl100k x 512 is 200 MB in
fp32, 100 MB in bf16."""


@dataclass
class _Decoder:
    """Trunk forward with a KV cache plus our LM head on the last position (see the module docstring)."""

    trunk: nn.Module
    config: Any
    cache_kw: str
    device: torch.device
    dtype: torch.dtype | None
    w_t: torch.Tensor  # (H, V) head weight: a kept contiguous copy in fp32 on a CPU, else a transposed view
    packed: torch.Tensor | None  # the bf16 head in oneDNN's packed layout (a CPU with bf16 units), used over w_t
    bias: torch.Tensor | None
    transform: tuple[float, float]
    step: DecodeStep | None = None  # the one-token step without Hugging Face's module stack (rlchat.fast_decode)
    prefill: DecodePrefill | None = None  # the same for a prompt into an empty cache (GPT-2)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        """(B, H) fp32 hidden state of the last input position; ``cache`` is extended in place."""
        with autocast_context(self.dtype, self.device):
            # the one-token step decodes after a prefill; a one-token *prompt* (empty cache) is a prefill
            if self.step is not None and input_ids.shape[1] == 1 and cache.get_seq_length() > 0:
                return self.step(input_ids, mask, pos, cache).float()
            if self.prefill is not None and cache.get_seq_length() == 0:
                return self.prefill(input_ids, mask, pos, cache).float()
            out = self.trunk(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{self.cache_kw: cache},
            )
        return out.last_hidden_state[:, -1].float()

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) fp32 logits of hidden rows (B, H), written into ``out`` (a contiguous buffer) when given."""
        if self.dtype is None and out is not None:
            z = torch.mm(h, self.w_t, out=out)
        elif out is not None:
            z = out.copy_(self._head(h))  # widened to fp32 by the copy: no fp32 temporary
        else:
            z = self._head(h).float()
        if self.bias is not None:
            z += self.bias
        scale, softcap = self.transform
        if scale != 1.0:
            z *= scale
        if softcap > 0:
            z.div_(softcap).tanh_().mul_(softcap)
        return z

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, V) head product in the head's dtype (bf16 here): from the packed copy when there is one."""
        if self.packed is not None:
            return packed_linear(h.to(torch.bfloat16), self.packed)
        return h.to(self.w_t.dtype) @ self.w_t

    def new_cache(self) -> Any:
        """A ``DynamicCache`` for the model, with a full-length layer in place of each sliding-window one.

        Why: ``transformers``' sliding-window cache layer keeps only the window's last columns and counts the
        sequence length itself (its attention-mask size); this engine left-pads rows, merges newcomers' caches row
        by row and trims finished rows' padding (continuous batching, ``serve/decode_batch.py``), which such a layer
        cannot follow (the mask and the keys disagreed: every job of the batch failed). A full-length layer keeps
        every column and the model still applies its window through the attention mask it builds from the config;
        the cost is the memory of the columns beyond the window. Other layer kinds (e.g. linear attention) stay.
        """
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.config)
        except TypeError:  # older transformers without the config argument
            return DynamicCache()
        try:
            from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
        except ImportError:  # older transformers: no per-layer cache classes
            return cache
        layers = getattr(cache, "layers", None) or []
        for i, layer in enumerate(layers):
            if type(layer) is DynamicSlidingWindowLayer:
                layers[i] = DynamicLayer()
        return cache


def cached_decoding_logits(
    engine: GenerationEngine, rows: Sequence[Sequence[int]], prompt_lengths: Sequence[int]
) -> torch.Tensor:
    """(B, S + 1, V) fp32 logits the engine computes for ``rows``, teacher-forced: a left-padded prefill of each
    row's first ``prompt_lengths[i]`` tokens, then S one-token cached steps feeding the rows' next tokens, with the
    very mask, positions, cache and head a :class:`GenerationStream` uses (S = the shortest row's remaining tokens).

    Index ``k`` holds the logits for the token at ``prompt_lengths[i] + k`` of row ``i``. What for: the load-time
    probe (:func:`rlchat.model.check_model_computation`) compares them with the model's own full forward, so an
    architecture whose cached decoding ignores or misreads the padding mask is refused instead of sampling wrong
    tokens. Run it in eval mode, under ``torch.no_grad()``.
    """
    dec = engine._decoder()
    dev = engine.device
    steps = min(len(r) - n for r, n in zip(rows, prompt_lengths))
    ids, mask = _left_pad([r[:n] for r, n in zip(rows, prompt_lengths)], engine.tokenizer.pad_id, steps)
    mask = mask.to(dev)
    p = ids.shape[1]
    cache = dec.new_cache()
    pos = (mask[:, :p].cumsum(-1) - 1).clamp_(min=0)
    out = [dec.logits(dec.forward(ids.to(dev), mask[:, :p], pos, cache))]
    pos = torch.tensor(list(prompt_lengths), dtype=torch.long, device=dev)[:, None]  # (B, 1) next position
    for s in range(steps):
        nxt = torch.tensor([r[n + s] for r, n in zip(rows, prompt_lengths)], dtype=torch.long, device=dev)
        out.append(dec.logits(dec.forward(nxt[:, None], mask[:, : p + s + 1], pos, cache)))
        pos = pos + 1
    return torch.stack(out, 1)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def process_logits(
    z: torch.Tensor,
    params: SamplingParams,
    step: int,
    history: torch.Tensor | None,
    counts: torch.Tensor | None,
    bias: torch.Tensor | None,
    stop_ids: torch.Tensor,
) -> None:
    """Apply the sampling settings to logits ``z`` in place -- (B, V) rows sharing ``params``, or one (V,) row.

    In order: the repetition penalty over ``history`` (token ids seen so far, (B, T) or (T,)), OpenAI's presence /
    frequency penalties from ``counts`` (tokens generated so far per id), ``logit_bias`` (``bias``, (V,)), and no stop
    token before ``params.min_new_tokens`` (``stop_ids``). One implementation for the engine's lock-step streams and
    the Serve replica's per-row decode batch, so a reply is the same whichever produced it.
    """
    if history is not None and params.repetition_penalty != 1.0:
        g = z.gather(-1, history)
        g = torch.where(g > 0, g / params.repetition_penalty, g * params.repetition_penalty)
        z.scatter_(-1, history, g.clamp_(max=LOGIT_CAP))  # a tiny penalty (5e-324) would make +inf, then nan
    if counts is not None:  # OpenAI's penalties: mu -= c * frequency + (c > 0) * presence
        z.sub_(counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty)
        z.clamp_(max=LOGIT_CAP)
    if bias is not None:
        z.add_(bias)
    if step < params.min_new_tokens:
        z.index_fill_(-1, stop_ids, float("-inf"))


def pick_tokens(
    z: torch.Tensor,
    params: SamplingParams,
    uniforms: Callable[[], np.ndarray],
    e_buf: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy / top-k / top-p / plain sampling of rows sharing ``params`` from processed (B, V) logits ``z``
    (modified in place): (B,) token ids and (B,) log-probs under the sampling distribution.

    ``uniforms()`` gives each row's (B,) uniform draw (called only when sampling): per-row keys make a row's draw
    independent of its batch. ``e_buf``: optional (B, V) scratch for plain sampling. One implementation
    for the engine's streams and the Serve replica's decode batch.
    """
    if params.greedy:
        tok = z.argmax(-1)
        lp = z.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(z, -1)
        return tok, lp
    if params.temperature != 1.0:
        z.div_(params.temperature)
    u = torch.from_numpy(uniforms()).to(z.device)[:, None]  # (B, 1)
    if 0 < params.top_k < z.shape[1]:
        vals, idx = z.topk(params.top_k, dim=-1)  # (B, k) sorted descending
        j, lp = _inverse_cdf(vals, u, params.top_p, sorted_desc=True)
        return idx.gather(1, j).squeeze(1), lp
    if params.top_p < 1.0:
        vals, idx = z.sort(dim=-1, descending=True)
        j, lp = _inverse_cdf(vals, u, params.top_p, sorted_desc=True)
        return idx.gather(1, j).squeeze(1), lp
    j, lp = _inverse_cdf(z, u, 1.0, sorted_desc=False, e_buf=e_buf)
    return j.squeeze(1), lp


def logit_bias_vector(
    logit_bias: Sequence[tuple[int, float]], vocab_size: int, device: torch.device
) -> torch.Tensor | None:
    """(V,) fp32 logit offsets of ``SamplingParams.logit_bias`` (None when empty); an id outside the vocabulary is a
    ConfigError."""
    if not logit_bias:
        return None
    out = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    for tid, bias in logit_bias:
        if not 0 <= tid < vocab_size:
            raise ConfigError(
                f"SamplingParams.logit_bias: token id {tid} is outside the vocabulary (0..{vocab_size - 1}); "
                "use ids from the model's tokenizer"
            )
        out[tid] = bias
    return out


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded ids and a (B, P + extra) attention-mask buffer (1 on prompts and the generated slots)."""
    b, p = len(prompts), max(len(x) for x in prompts)
    ids = np.full((b, p), pad_id, dtype=np.int64)
    mask = np.ones((b, p + extra), dtype=np.int64)
    for i, x in enumerate(prompts):
        ids[i, p - len(x) :] = x
        mask[i, : p - len(x)] = 0
    return torch.from_numpy(ids), torch.from_numpy(mask)


class _StopStrings:
    """Detects stop strings in generated UTF-8 bytes, keeping a short byte tail per row (O(1) per token)."""

    def __init__(self, tokenizer: ChatTokenizer, strings: Sequence[str]) -> None:
        self.tok = tokenizer
        self.needles = [s.encode("utf-8") for s in strings]
        self.keep = max((len(n) for n in self.needles), default=0)

    def push(self, tail: bytes, token_id: int) -> tuple[bytes, bool]:
        """Append a token to ``tail``; return the new tail and whether a stop string ends inside the new token."""
        new = self.tok.token_bytes(token_id) if not self.tok.is_special(token_id) else b""
        buf = tail + new
        hit = False
        if new:
            for n in self.needles:
                if buf.find(n, max(0, len(buf) - len(new) - len(n) + 1)) >= 0:
                    hit = True
                    break
        return buf[-self.keep :] if self.keep else b"", hit


class GenerationStream:
    """Lock-step sampling over a batch: iterating yields one :class:`StepOutput` per generated token.

    Created by :meth:`GenerationEngine.steps` (and used by ``generate`` / ``stream``). The next batched forward
    runs lazily at the start of the next step, so rows ended with :meth:`finish` in between cost nothing more.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seeds: Sequence[int] | None,
    ) -> None:
        if seeds is not None and len(seeds) != len(prompts):
            raise ConfigError(f"seeds has {len(seeds)} entries: expected one per prompt ({len(prompts)})")
        self.engine = engine
        self.params = params
        self.batch_size = b = len(prompts)
        self.prompt_lengths = [len(p) for p in prompts]
        tok = engine.tokenizer
        self._pad = tok.pad_id
        self._tokens: list[list[int]] = [[] for _ in range(b)]
        self._logprobs: list[list[float]] = [[] for _ in range(b)]
        self._reasons: list[str | None] = [None] * b
        self._active = np.ones(b, dtype=bool)
        self._step = 0
        self._done = b == 0
        if self._done:
            return
        engine._check_prompts(prompts, params, cap_at_limit=True)
        self._budget = engine.row_budgets(prompts, params)  # (B,) new tokens per row (the model's limit)
        self._last_pos = (engine.max_positions or 0) - 1
        self._was_training = engine.lm.training
        engine.lm.eval()  # before the decoder snapshot: the fast one-token step exists for eval mode only
        self._dec = engine._decoder()
        self._device = dev = engine.device
        v = engine.vocab_size

        # 1. per-row random keys: explicit seeds, or derived from params.seed, or drawn from torch's global RNG
        if seeds is None:
            if params.seed is not None:
                base = seed_keys([params.seed])[0]
                seeds = [int(x) for x in _splitmix64(base + np.arange(b, dtype=np.uint64))]
            else:
                seeds = torch.randint(0, 2**62, (b,)).tolist()
        self._keys = seed_keys(seeds)

        # 2. stop conditions
        stops = sorted({tok.eot_id, *params.stop_token_ids})
        self._stop_ids = np.array(stops, dtype=np.int64)
        self._stop_ids_t = torch.tensor(stops, dtype=torch.long, device=dev)
        self._stop_strings = _StopStrings(tok, params.stop_strings) if params.stop_strings else None
        self._tails = [b""] * b

        # 3. left-padded prefill into a fresh KV cache
        n = params.max_new_tokens
        ids, mask = _left_pad(prompts, self._pad, n)
        self._p = ids.shape[1]
        self._mask = mask.to(dev)
        self._slot_rows = np.arange(b)  # compact slot -> original row
        self._pos = torch.tensor(self.prompt_lengths, dtype=torch.long, device=dev)[:, None]  # (B, 1) next position
        if params.repetition_penalty != 1.0:
            hist = ids.clone()
            for i, x in enumerate(prompts):  # pad slots repeat the row's first token: no spurious penalty
                hist[i, : self._p - len(x)] = x[0]
            self._hist = torch.cat([hist, torch.zeros(b, n, dtype=torch.long)], 1).to(dev)
        self._counts = None  # (B, V) tokens generated so far per row, for presence / frequency penalties
        if params.presence_penalty or params.frequency_penalty:
            self._counts = torch.zeros(b, v, dtype=torch.float32, device=dev)
        self._bias = logit_bias_vector(params.logit_bias, v, dev)  # (V,) or None
        self._alts: list | None = None
        # (B, V) scratch reused every step (fresh full-vocabulary tensors per step cost page faults on CPU)
        plain = not params.greedy and params.top_k == 0 and params.top_p == 1.0
        self._buf_z: torch.Tensor | None = torch.empty(b, v, dtype=torch.float32, device=dev)
        self._buf_e = torch.empty(b, v, dtype=torch.float32, device=dev) if plain else None
        self._pending: torch.Tensor | None = None
        self._cache = self._dec.new_cache()
        with torch.no_grad():
            pos = (self._mask[:, : self._p].cumsum(-1) - 1).clamp_(min=0)
            self._h = self._dec.forward(ids.to(dev), self._mask[:, : self._p], pos, self._cache)

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> StepOutput:
        if self._done:
            raise StopIteration
        with torch.no_grad():
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._advance(self._maybe_compact(pending))
            tokens, logprobs = self._sample()
        return self._record(tokens.cpu().numpy(), logprobs.cpu().numpy())

    def finish(self, rows: Sequence[int] | np.ndarray, reason: str = FINISH_STOP) -> None:
        """End ``rows`` (original indices) now, e.g. because their env episode ended; their outputs are kept."""
        for r in np.asarray(rows, dtype=np.int64).reshape(-1):
            if self._active[r]:
                self._active[r] = False
                self._reasons[r] = reason
        if not self._active.any():
            self._close()

    def result(self) -> GenerationResult:
        """Run any remaining steps and return every row's tokens, log-probs and finish reason."""
        for _ in self:
            pass
        reasons = [r or FINISH_LENGTH for r in self._reasons]
        return GenerationResult(self._tokens, self._logprobs, reasons, self.prompt_lengths)

    @property
    def active(self) -> np.ndarray:
        """(B,) bool copy: rows still generating."""
        return self._active.copy()

    @property
    def num_steps(self) -> int:
        """Tokens generated so far (per active row)."""
        return self._step

    # ---------------------------------------------------------------- internals
    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._cache = None
            self._pending = None
            self._buf_z = self._buf_e = None
            self.engine.lm.train(self._was_training)

    def _maybe_compact(self, pending: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from the batch and the KV cache once at least a quarter of the slots are finished.

        Returns:
            ``pending`` (the (Bc,) tokens to feed next) restricted to the kept slots.
        """
        live = self._active[self._slot_rows]
        n_live = int(live.sum())
        if n_live == len(live) or n_live > 0.75 * len(live):
            return pending
        keep = np.flatnonzero(live)
        idx = torch.from_numpy(keep).to(self._device)
        self._cache.reorder_cache(idx)
        self._slot_rows = self._slot_rows[keep]
        self._keys = self._keys[keep]
        self._mask = self._mask.index_select(0, idx)
        self._pos = self._pos.index_select(0, idx)
        if self.params.repetition_penalty != 1.0:
            self._hist = self._hist.index_select(0, idx)
        if self._counts is not None:
            self._counts = self._counts.index_select(0, idx)
        return pending.index_select(0, idx)

    def _advance(self, pending: torch.Tensor) -> None:
        """Feed the (Bc,) tokens sampled last step through the model (one batched forward)."""
        length = self._p + self._step
        self._h = self._dec.forward(pending[:, None], self._mask[:, :length], self._pos, self._cache)
        self._pos += 1
        if self._last_pos > 0:
            # a row that ended at the model's limit stays in the batch until compaction and is still fed (its output
            # is ignored); keep its position inside the position table (live rows never get here: row_budgets)
            self._pos.clamp_(max=self._last_pos)

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one token per slot; returns (Bc,) tokens and (Bc,) log-probs under the sampling distribution."""
        p = self.params
        bc = self._h.shape[0]
        z = self._dec.logits(self._h, self._buf_z[:bc] if self._buf_z is not None else None)  # (Bc, V)
        hist = self._hist[:, : self._p + self._step] if p.repetition_penalty != 1.0 else None
        process_logits(z, p, self._step, hist, self._counts, self._bias, self._stop_ids_t)
        alts = None
        if p.top_logprobs >= 0:  # the processed distribution (temperature applied; 0 = greedy reads as 1)
            full = torch.log_softmax(z / (1.0 if p.greedy else p.temperature), -1)  # (Bc, V)
            k = min(p.top_logprobs, full.shape[1])
            top_v, top_i = full.topk(k, dim=-1) if k else (full[:, :0], full[:, :0].long())
            alts = (full, top_v, top_i)
        tok, lp = self._pick(z, bc)
        if alts is not None:
            full, top_v, top_i = alts
            chosen = full.gather(1, tok[:, None]).squeeze(1).cpu().numpy()
            tv, ti = top_v.cpu().numpy(), top_i.cpu().numpy()
            self._alts = [(float(chosen[j]), ti[j].tolist(), tv[j].tolist()) for j in range(bc)]
        return tok, lp

    def _pick(self, z: torch.Tensor, bc: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy / top-k / top-p / plain sampling from the processed (Bc, V) logits ``z`` (modified in place)."""
        e_buf = self._buf_e[:bc] if self._buf_e is not None else None
        return pick_tokens(z, self.params, lambda: row_uniforms(self._keys, self._step), e_buf)

    def _record(self, toks: np.ndarray, lps: np.ndarray) -> StepOutput:
        """Store this step's tokens for live rows, apply stop conditions, and build the full-batch StepOutput."""
        b, p = self.batch_size, self.params
        out_tok = np.full(b, self._pad, dtype=np.int64)
        out_lp = np.zeros(b, dtype=np.float32)
        rows = self._slot_rows
        live = self._active[rows]
        out_active = np.zeros(b, dtype=bool)
        out_active[rows[live]] = True
        out_tok[rows[live]] = toks[live]
        out_lp[rows[live]] = lps[live]
        stopped = live & np.isin(toks, self._stop_ids)
        self._step += 1
        ss = self._stop_strings
        can_stop = self._step > p.min_new_tokens
        for j in np.flatnonzero(live):
            r = rows[j]
            t = int(toks[j])
            self._tokens[r].append(t)
            self._logprobs[r].append(float(lps[j]))
            if ss is not None:
                self._tails[r], hit = ss.push(self._tails[r], t)
                if hit and can_stop:
                    stopped[j] = True
        alternatives: list[tuple[float, list[int], list[float]] | None] | None = None
        if self._alts is not None:
            alternatives = [None] * b
            for j in np.flatnonzero(live):
                alternatives[rows[j]] = self._alts[j]
            self._alts = None
        if self._counts is not None:
            self._counts.scatter_add_(
                1, torch.from_numpy(toks).to(self._device)[:, None], torch.ones(len(toks), 1, device=self._device)
            )
        for j in np.flatnonzero(stopped):
            self._active[rows[j]] = False
            self._reasons[rows[j]] = FINISH_STOP
        for r in np.flatnonzero(self._active & (self._step >= self._budget)):  # max_new_tokens or the model's limit
            self._reasons[r] = FINISH_LENGTH
            self._active[r] = False
        if self._active.any():
            self._pending = torch.from_numpy(toks).to(self._device)
            if p.repetition_penalty != 1.0:
                self._hist[:, self._p + self._step - 1] = self._pending
        else:
            self._close()
        return StepOutput(out_tok, out_lp, out_active, alternatives)


def _inverse_cdf(
    z: torch.Tensor,
    u: torch.Tensor,
    top_p: float,
    sorted_desc: bool,
    e_buf: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample an index per row of logits ``z`` (B, n) by inverse CDF, with optional nucleus cut.

    Args:
        z: logits (``-inf`` for excluded entries); sorted descending along the row when ``sorted_desc``.
        u: (B, 1) uniforms in [0, 1).
        top_p: nucleus mass (1 = none); requires ``sorted_desc``.
        e_buf: optional contiguous (B, n) scratch buffer.

    Returns:
        (B, 1) sampled index into the row and (B,) its log-prob under the (renormalised) sampled distribution.
    """
    m = z[:, :1] if sorted_desc else z.amax(-1, keepdim=True)  # (B, 1); amax: max without the indices (6x faster)
    e = torch.sub(z, m, out=e_buf) if e_buf is not None else z - m
    e.exp_()
    if top_p < 1.0:
        c = e.cumsum(-1)
        keep = (c - e) < top_p * c[:, -1:]  # mass before the token < top_p: the smallest set reaching top_p
        e.mul_(keep)
    if e.shape[1] >= 2 * CDF_BLOCK:
        j, total = _search_blocks(e, u)
    else:
        c = e.cumsum(-1)
        total = e.sum(-1, keepdim=True)  # pairwise summation: more accurate than c[:, -1] for the log-prob
        j = _search_row(c, u * c[:, -1:])
    lp = (z.gather(1, j) - m - total.log()).squeeze(1)
    return j, lp


CDF_BLOCK = 1024
"""Entries per block of :func:`_search_blocks`."""


def _search_row(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, 1) first index where the non-decreasing rows ``c`` (B, n) pass ``t`` (B, 1), never past the last index
    with positive mass (``t`` can round up to a row's total)."""
    j = torch.searchsorted(c, t, right=True)
    return torch.minimum(j, torch.searchsorted(c, c[:, -1:].contiguous(), right=False))


def _search_blocks(e: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse-CDF index of ``u`` (B, 1) in rows of masses ``e`` (B, n) in two levels: block sums (one
    vectorised reduction), the block whose cumulative sum passes ``u`` x total, then a cumulative sum of that block
    only. Returns the (B, 1) index and the (B, 1) row totals.

    Why: a cumulative sum over the whole row is a sequential scan: over 100k ids it was 1.5 ms of a 16-row
    serving step (25 ms at 8 x 512 over cl100k, one thread); block sums + one block cost ~0.1 ms. The draw is the
    same inverse CDF: both accumulate in fp32, so the two differ only where a uniform falls within rounding
    (~1e-6 of the total) of a boundary, as often from an exact float64 CDF as each other (tests/test_generation.py).
    """
    b, n = e.shape
    nb = n // CDF_BLOCK
    sums = e.new_empty(b, nb + 1)  # the last block holds the n % CDF_BLOCK entries left (maybe none)
    torch.sum(e[:, : nb * CDF_BLOCK].view(b, nb, CDF_BLOCK), -1, out=sums[:, :nb])
    sums[:, nb] = e[:, nb * CDF_BLOCK :].sum(-1)
    cb = sums.cumsum(-1)
    t = u * cb[:, -1:]
    blk = _search_row(cb, t)  # (B, 1): cb[blk - 1] <= t < cb[blk], a block with positive mass
    before = torch.where(blk > 0, cb.gather(1, (blk - 1).clamp_(min=0)), 0.0)
    idx = blk * CDF_BLOCK + torch.arange(CDF_BLOCK, device=e.device)  # (B, CDF_BLOCK); the last block is short
    inside = idx < n
    w = e.gather(1, idx.clamp_(max=n - 1)).mul_(inside).cumsum_(-1).add_(before)
    return blk * CDF_BLOCK + _search_row(w, t), sums.sum(-1, keepdim=True)


# --------------------------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Hyp:
    score: float
    tokens: list[int]
    logprobs: list[float]
    reason: str


@dataclass
class _BeamState:
    finished: list[_Hyp] = field(default_factory=list)
    done: bool = False


class _BeamSearch:
    """Deterministic beam search (length penalty 1: hypotheses ranked by mean token log-prob), batched over prompts.

    Stops a prompt once ``num_beams`` hypotheses finished and no running beam can beat the worst of them
    (``transformers``' ``early_stopping=False`` rule); unfinished beams at ``max_new_tokens`` end with ``length``.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        deadline: float | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.engine, self.params, self.prompts, self.deadline, self.stop = engine, params, prompts, deadline, stop
        engine._check_prompts(prompts, params)

    def run(self) -> GenerationResult:
        with torch.no_grad(), _eval_mode(self.engine.lm):
            return self._run()

    def _run(self) -> GenerationResult:
        eng, p, prompts = self.engine, self.params, self.prompts
        dec = eng._decoder()
        dev, tok, k = eng.device, eng.tokenizer, p.num_beams
        b, n = len(prompts), p.max_new_tokens
        stop_ids = {tok.eot_id, *p.stop_token_ids}
        stop_t = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
        ss = _StopStrings(tok, p.stop_strings) if p.stop_strings else None

        ids, mask = _left_pad(prompts, tok.pad_id, n)
        plen = ids.shape[1]
        mask = mask.to(dev)
        cache = dec.new_cache()
        pos0 = (mask[:, :plen].cumsum(-1) - 1).clamp_(min=0)
        h = dec.forward(ids.to(dev), mask[:, :plen], pos0, cache)
        # expand every prompt to k beams
        cache.batch_repeat_interleave(k)
        h = h.repeat_interleave(k, 0)
        mask = mask.repeat_interleave(k, 0)
        pos = torch.tensor(self._lens(), dtype=torch.long, device=dev).repeat_interleave(k)[:, None]
        hist = None
        if p.repetition_penalty != 1.0:
            hist = ids.clone()
            for i, x in enumerate(prompts):
                hist[i, : plen - len(x)] = x[0]
            hist = torch.cat([hist, torch.zeros(b, n, dtype=torch.long)], 1).to(dev).repeat_interleave(k, 0)

        scores = torch.full((b, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # only beam 0 is live at first: all beams hold the same prompt
        beam_tokens: list[list[int]] = [[] for _ in range(b * k)]
        beam_lps: list[list[float]] = [[] for _ in range(b * k)]
        tails = [b""] * (b * k)
        states = [_BeamState() for _ in range(b)]
        for step in range(n):
            z = dec.logits(h)  # (B*k, V)
            if hist is not None:
                hh = hist[:, : plen + step]
                g = z.gather(1, hh)
                z.scatter_(1, hh, torch.where(g > 0, g / p.repetition_penalty, g * p.repetition_penalty))
            if step < p.min_new_tokens:
                z.index_fill_(1, stop_t, float("-inf"))
            logp = torch.log_softmax(z, -1)  # (B*k, V)
            v = logp.shape[1]
            cand = (scores.view(-1, 1) + logp).view(b, k * v)
            top_s, top_i = cand.topk(2 * k, dim=-1)  # (B, 2k)
            top_s_np, top_i_np = top_s.cpu().numpy(), top_i.cpu().numpy()
            src_beam, src_tok = top_i_np // v, top_i_np % v
            tok_lp = (
                logp.view(b, k, v)[
                    torch.arange(b, device=dev)[:, None],
                    torch.from_numpy(src_beam).to(dev),
                    torch.from_numpy(src_tok).to(dev),
                ]
                .cpu()
                .numpy()
            )
            next_src = np.zeros(b * k, dtype=np.int64)
            next_tok = np.full(b * k, tok.pad_id, dtype=np.int64)
            next_score = np.full(b * k, -np.inf, dtype=np.float32)
            new_tokens: list[list[int]] = []
            new_lps: list[list[float]] = []
            new_tails: list[bytes] = []
            length = step + 1
            for i in range(b):
                st = states[i]
                filled = 0
                if not st.done:
                    for c in range(2 * k):
                        if not np.isfinite(top_s_np[i, c]):
                            break
                        src = i * k + int(src_beam[i, c])
                        t = int(src_tok[i, c])
                        seq = beam_tokens[src] + [t]
                        lps = beam_lps[src] + [float(tok_lp[i, c])]
                        tail, hit = ss.push(tails[src], t) if ss is not None else (b"", False)
                        if t in stop_ids or (hit and length > p.min_new_tokens):
                            if c < k:  # a stop candidate counts only if it ranks among the top k
                                st.finished.append(_Hyp(float(top_s_np[i, c]) / length, seq, lps, FINISH_STOP))
                            continue
                        slot = i * k + filled
                        next_src[slot], next_tok[slot], next_score[slot] = src, t, top_s_np[i, c]
                        new_tokens.append(seq)
                        new_lps.append(lps)
                        new_tails.append(tail)
                        filled += 1
                        if filled == k:
                            break
                    best_running = float(next_score[i * k]) / length if filled else -np.inf
                    if len(st.finished) >= k:
                        worst = sorted(hyp.score for hyp in st.finished)[-k]
                        if best_running <= worst:
                            st.done = True
                    if filled == 0:
                        st.done = True
                for f in range(filled, k):  # dead slots of a finished / short prompt
                    slot = i * k + f
                    next_src[slot] = i * k
                    new_tokens.append([])
                    new_lps.append([])
                    new_tails.append(b"")
                if st.done:
                    next_score[i * k : (i + 1) * k] = -np.inf
            beam_tokens, beam_lps, tails = new_tokens, new_lps, new_tails  # already in slot order
            late = self.deadline is not None and time.monotonic() >= self.deadline  # ends as at the budget
            late = late or (self.stop is not None and self.stop())
            if all(s.done for s in states) or step == n - 1 or late:
                scores = torch.from_numpy(next_score).to(dev).view(b, k)
                break
            idx = torch.from_numpy(next_src).to(dev)
            cache.reorder_cache(idx)
            mask = mask.index_select(0, idx)
            pos = pos.index_select(0, idx)
            scores = torch.from_numpy(next_score).to(dev).view(b, k)
            nt = torch.from_numpy(next_tok).to(dev)
            if hist is not None:
                hist = hist.index_select(0, idx)
                hist[:, plen + step] = nt
            h = dec.forward(nt[:, None], mask[:, : plen + step + 1], pos, cache)
            pos = pos + 1

        return self._collect(states, scores.cpu().numpy(), beam_tokens, beam_lps)

    def _lens(self) -> list[int]:
        return [len(x) for x in self.prompts]

    def _collect(
        self, states: list[_BeamState], scores: np.ndarray, beam_tokens: list[list[int]], beam_lps: list[list[float]]
    ) -> GenerationResult:
        k = self.params.num_beams
        out = GenerationResult([], [], [], self._lens())
        for i, st in enumerate(states):
            hyps = list(st.finished)
            if len(hyps) < k:  # running beams compete too ("length")
                for f in range(k):
                    seq = beam_tokens[i * k + f]
                    if seq and np.isfinite(scores[i, f]):
                        hyps.append(_Hyp(float(scores[i, f]) / len(seq), seq, beam_lps[i * k + f], FINISH_LENGTH))
            if not hyps:  # every candidate was masked: nothing was generated
                hyps = [_Hyp(0.0, [], [], FINISH_LENGTH)]
            best = max(hyps, key=lambda hyp: hyp.score)
            out.tokens.append(best.tokens)
            out.logprobs.append(best.logprobs)
            out.finish_reasons.append(best.reason)
        return out
