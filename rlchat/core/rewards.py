"""The reward library: every score an assistant turn can earn, weighted by ``cfg.reward``.

One :class:`RewardFunction` is built from :class:`rlchat.core.config.RewardConfig`; it scores one assistant reply
(``__call__``, what the Gymnasium env calls at the end of a turn) or a batch of replies (``score_batch``, where the
learned reward model, the sentence encoder and the safety classifier run one forward per batch). It returns a
:class:`RewardResult`: ``components`` holds each enabled component's **unweighted** value and ``total`` is
``sum(weight[name] * components[name])``.

Components (config key = weight; a weight of 0 disables the component and it is never computed unless
``reward.monitor`` names it, see below). Value, range:

- ``verifiable``: 1 if the reply *is* the reference answer (:func:`verifiable_answer`: exact after trimming, one
  optional "The answer is" / "Answer:" lead-in and trailing "." / "!"; numbers compared as numbers), else 0. {0, 1}
- ``reference_f1``: SQuAD-style token F1 against ``record.reference`` (0 without a reference). [0, 1]
- ``rouge_l``: ROUGE-L F-measure against ``record.reference`` (rouge-score package). [0, 1]
- ``length``: 0 inside [length_min, length_max] tokens, minus the relative distance outside. (-inf, 0]
- ``diversity``: distinct-n of the reply's token ids (unique n-grams / n-grams). [0, 1]
- ``diversity_batch`` (weight ``diversity``): the share of the reply's distinct n-grams that no other reply of the
  batch contains; 0 when scored alone, as there is nothing to compare against. In training the batch is every
  finished (scored) assistant turn one rollout worker samples in one call (``rollout.envs_per_worker`` episodes,
  all their turns; a turn cut by a limit is scored on its cut text too, only a multi-turn context cut is not): the
  workers' envs defer scoring
  and the worker calls ``score_batch`` once. A standalone ``rlchat/Chat-v0`` env scores each reply alone, so there
  the component is always 0. [0, 1]
- ``repetition``: minus the share of the reply's tokens covered by an n-gram that occurs twice or more. [-1, 0]
- ``coherence``: cosine similarity of sentence embeddings, last user message vs reply. [-1, 1]
- ``safety``: -1 if a ``safety_patterns`` regex or the ``safety_classifier`` flags the reply, else 0. {-1, 0}
- ``model``: the learned reward model's score of the whole conversation. R
- ``"pkg.mod:func"`` (``reward.plugins``): a user function ``f(prompt_messages, response_text, response_ids,
  record) -> float``, named by its import path. R

Monitored components (``reward.monitor``, default ``("verifiable",)``): a component named there but weighted 0 is
still computed and reported in ``components`` -- so it is logged as ``rollout/reward/<name>`` and
``eval/reward/<name>`` -- but never added to ``total``. This is how a run trained on the reward model alone
(``reward.model=1``, ``reward.verifiable=0``) keeps measuring the task's checked answer, the *gold* reward it never
sees (docs/ppo.md, "RLHF with a gold check: proxy vs gold reward"). A reference-based monitor (``verifiable``,
``reference_f1``, ``rouge_l``) is computed only for batches whose records carry a reference: without one it would
read 0 and say nothing.

Why ``repetition`` is not ``distinct-n - 1``: distinct-n credits the first occurrence of every n-gram, so a reply
that is one phrase said twice ("a b a b", bigrams) still keeps 2/3; token coverage counts every token of a repeated
n-gram, first occurrence included, so the same reply gets -1. It measures how much of the reply is taken up by
repeats, which is what degenerate loops look like. :func:`repeated_ngram_fraction` (= 1 - distinct-n, "rep-n")
is kept for the PPO guardrail ``ppo.max_repetition``.

Every value is checked: a NaN or infinity from any component raises :class:`rlchat.core.errors.RewardError` naming the
component, never a silent NaN reward. Heavy models (sentence encoder, classifier, reward model) load lazily on the
first batch that needs them, so building a RewardFunction (in every env) is cheap. This module never imports Ray.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rlchat.core.errors import ConfigError, RewardError

if TYPE_CHECKING:
    from rlchat.core.config import RewardConfig
    from rlchat.core.data import Record
    from rlchat.core.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

Message = dict[str, str]

RMScorer = Callable[[list[list[Message]], list[str]], Sequence[float]]
"""``(prompts, responses) -> scores``: a learned reward model as a plain callable (one score per reply)."""

PLUGIN_SIGNATURE = "f(prompt_messages, response_text, response_ids, record) -> float"

#: The built-in components in report order; each is weighted by the RewardConfig field of the same name, except
#: ``diversity_batch``, which shares the ``diversity`` weight.
BUILTIN_COMPONENTS = (
    "verifiable",
    "reference_f1",
    "rouge_l",
    "length",
    "diversity",
    "diversity_batch",
    "repetition",
    "coherence",
    "safety",
    "model",
)


#: Components that need a record's reference: monitored (weight 0) only when some record of the batch has one.
REFERENCE_COMPONENTS = ("verifiable", "reference_f1", "rouge_l")
#: Components ``reward.monitor`` may name: the ones computed without a model (model-backed ones need a weight).
MONITORABLE_COMPONENTS = (*REFERENCE_COMPONENTS, "length", "diversity", "diversity_batch", "repetition")
#: The gold component: the task's checked answer, logged beside the training (proxy) reward as
#: ``eval/gold_reward`` (rlchat/metrics.py ``EVAL_GOLD_REWARD``).
GOLD_COMPONENT = "verifiable"


@dataclass
class RewardResult:
    """The reward of one assistant turn.

    Attributes:
        total: weighted sum of the enabled components (what the env returns as ``reward``).
        components: unweighted value of every enabled component, by name, and of every monitored one
            (``reward.monitor``: reported, never part of ``total``).
    """

    total: float
    components: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Pure scoring functions (each is one component's value; unit-tested against hand-computed numbers)
# --------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def first_number(text: str) -> float | None:
    """The first number written in ``text`` (``-3``, ``1,024``, ``2.5``), or None when there is none.

    The scripted user reads numbers out of references and its own follow-ups with it; the ``verifiable`` reward does
    not (a reply must *be* the answer, :func:`verifiable_answer`).
    """
    m = _NUMBER.search(text)
    if m is None:
        return None
    try:
        return float(m.group().replace(",", ""))
    except ValueError:  # pragma: no cover - the regex only matches parseable numbers
        return None


# A whole answer that is one number: optional sign, digits with optional thousands commas, optional decimals.
_EXACT_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# The one lead-in an answer may carry ("The answer is 7.", "Answer: 7"); anything else around the answer is junk.
_ANSWER_LEAD_IN = re.compile(r"(?:the\s+answer\s+is\s*:?|answer\s*:)\s*", re.IGNORECASE)
_TRAILING_PUNCTUATION = ".!"


def answer_text(text: str) -> str:
    """The answer a reply states: trimmed, one leading "The answer is" / "Answer:" removed, trailing "." / "!" removed.

    ``"The answer is 7."`` -> ``"7"``; ``" 7 "`` -> ``"7"``; ``"7 bananas"`` stays ``"7 bananas"`` (not an answer).
    """
    s = text.strip()
    m = _ANSWER_LEAD_IN.match(s)
    if m is not None and m.end() < len(s):
        s = s[m.end() :]
    return s.rstrip(_TRAILING_PUNCTUATION).rstrip()


def parse_number(text: str) -> float | None:
    """``text`` as a number when it is exactly one (``"-3"``, ``"1,024"``, ``"2.50"``), else None."""
    if _EXACT_NUMBER.fullmatch(text) is None:
        return None
    return float(text.replace(",", ""))


def verifiable_answer(response_text: str, reference: str | None) -> float:
    """The demo task's checked answer: 1.0 if the reply is exactly the reference answer, else 0.0.

    Both sides go through :func:`answer_text` (trim; one optional "The answer is" / "Answer:" lead-in; trailing
    "." and "!"), and what remains must be the whole answer: "7", "7.", "7.0", "+7" and "The answer is 7." match
    "7"; "7 bananas", "7 or 8", "about 7" and "The answer is probably 7" do not. A numeric reference is compared
    numerically (so "7.0" == "7" and "1,024" == "1024"); a free-text reference by normalised exact match (case,
    punctuation and articles ignored: "Paris." matches "paris"). No reference means nothing can be verified: 0.0.

    Why exact and not "the first number matches": that rule paid full reward to replies that bury the answer in
    hedging ("Hmm, I would guess around 7, but please double-check." -- the demo's own ``off_format`` rejected
    replies), so PPO could not prefer the clean answer the task asks for.
    """
    if reference is None:
        return 0.0
    want_text = answer_text(reference)
    got_text = answer_text(response_text)
    want = parse_number(want_text)
    if want is None:
        want_tokens = _normalize_tokens(want_text)
        return float(bool(want_tokens) and _normalize_tokens(got_text) == want_tokens)
    got = parse_number(got_text)
    return float(got is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=1e-9))


_ARTICLES = {"a", "an", "the"}


def _normalize_tokens(text: str) -> list[str]:
    """SQuAD-style normalisation: casefold, punctuation (ASCII or Unicode P*) to spaces, drop articles, split."""
    text = "".join(" " if unicodedata.category(c).startswith("P") or c in string.punctuation else c for c in text)
    return [t for t in text.casefold().split() if t not in _ARTICLES]


def token_f1(prediction: str, reference: str | None) -> float:
    """Token-level F1 between a reply and a reference (the SQuAD v1.1 metric; 0.0 without a reference).

    Both sides are normalised by :func:`_normalize_tokens`; overlap counts each token as often as it occurs in both.
    """
    if reference is None:
        return 0.0
    pred, ref = _normalize_tokens(prediction), _normalize_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_ROUGE_SCORER: Any = None


def rouge_l(prediction: str, reference: str | None) -> float:
    """ROUGE-L F-measure (longest common subsequence) from the ``rouge-score`` package; 0.0 without a reference.

    rouge-score lowercases and keeps ASCII letters and digits only, so non-Latin text scores 0 against itself;
    use ``reference_f1`` for such data.
    """
    global _ROUGE_SCORER
    if reference is None:
        return 0.0
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def length_penalty(n_tokens: int, length_min: int, length_max: int) -> float:
    """0 inside ``[length_min, length_max]``; outside, minus the relative distance to the nearest end.

    ``-(length_min - n) / length_min`` below and ``-(n - length_max) / length_max`` above, so a reply twice as
    long as allowed costs -1 whatever the scale of the range.
    """
    if n_tokens < length_min:
        return -(length_min - n_tokens) / max(length_min, 1)
    if n_tokens > length_max:
        return -(n_tokens - length_max) / max(length_max, 1)
    return 0.0


def ngrams(ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """All contiguous n-grams of ``ids`` in order (empty when ``len(ids) < n``)."""
    if n < 1:
        raise ConfigError(f"reward.ngram={n}: expected n >= 1; use 2")
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(ids: Sequence[int], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / n-grams of one reply; 0.0 when the reply has no n-gram."""
    grams = ngrams(ids, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_fraction(ids: Sequence[int], n: int) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same reply (= 1 - distinct-n; 0 when none).

    This is "rep-n" of Welleck et al. 2019; the PPO guardrail ``ppo.max_repetition`` watches it.
    """
    grams = ngrams(ids, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_penalty(ids: Sequence[int], n: int) -> float:
    """Minus the share of the reply's tokens covered by an n-gram that occurs at least twice in the reply."""
    grams = ngrams(ids, n)
    if not grams:
        return 0.0
    counts = Counter(grams)
    covered = np.zeros(len(ids), dtype=bool)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = True
    return -float(covered.mean())


def batch_distinct_n(batch_ids: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n over a whole batch: unique n-grams of all replies / all n-grams (an eval metric of diversity)."""
    grams = [g for ids in batch_ids for g in ngrams(ids, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def batch_novelty(batch_ids: Sequence[Sequence[int]], n: int) -> list[float]:
    """Per reply: the share of its distinct n-grams that no other reply of the batch contains.

    A batch-level diversity signal each reply can be credited for (identical replies get 0, replies sharing
    nothing get 1). A reply without n-grams, or alone in its batch, gets 0.
    """
    sets = [set(ngrams(ids, n)) for ids in batch_ids]
    if len(sets) < 2:
        return [0.0] * len(sets)
    owners: Counter[tuple[int, ...]] = Counter(g for s in sets for g in s)
    return [sum(1 for g in s if owners[g] == 1) / len(s) if s else 0.0 for s in sets]


def safety_flagged(text: str, patterns: Sequence[re.Pattern[str]]) -> bool:
    """True when any compiled pattern matches anywhere in ``text``."""
    return any(p.search(text) for p in patterns)


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Mean of the token embeddings over the real (mask = 1) tokens: sentence-transformers' pooling.

    Args:
        hidden: (B, T, D) last hidden states.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.

    Returns:
        (B, D) sentence embeddings.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _last_user_text(prompt: Sequence[Message]) -> str:
    """What the reply should address: the last user message (system prompts would dominate a whole-prompt mean)."""
    for msg in reversed(prompt):
        if msg.get("role") == "user":
            return msg.get("content", "")
    return "\n".join(m.get("content", "") for m in prompt)


# --------------------------------------------------------------------------------------------------------------
# Model-backed components (loaded lazily, one forward per batch)
# --------------------------------------------------------------------------------------------------------------


class SentenceEncoder:
    """Any Hugging Face encoder path as a sentence encoder: ``AutoModel`` + mean pooling + L2 normalisation.

    This is how sentence-transformers' all-MiniLM-L6-v2 computes its embeddings (``1_Pooling`` mean tokens +
    ``Normalize``), without depending on sentence-transformers.
    """

    def __init__(self, path: str, max_length: int = 256, batch_size: int = 64) -> None:
        self.path = path
        self.max_length = max_length
        self.batch_size = batch_size
        self._model: Any = None
        self._tok: Any = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(self.path)
            self._model = AutoModel.from_pretrained(self.path).eval()
        except Exception as e:
            raise RewardError(
                f"reward.coherence_model={self.path!r}: cannot load a Hugging Face encoder and tokenizer there "
                f"({e.__class__.__name__}: {e}); pass a local directory with config.json, weights and tokenizer files"
            ) from e

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm sentence embeddings.

        Returns:
            (N, D) float32 array, one L2-normalised row per text.
        """
        import torch

        if self._model is None:
            self._load()
        rows = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self._tok(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = self._model(**enc).last_hidden_state  # (B, T, D)
                emb = mean_pool(hidden.float(), enc["attention_mask"])  # (B, D)
                rows.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0), np.float32)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of ``a[i]`` and ``b[i]`` for every i (both sides embedded in one forward pass)."""
        emb = self.embed(list(a) + list(b))
        ea, eb = emb[: len(a)], emb[len(a) :]
        return [float(x) for x in (ea * eb).sum(-1)]


class SafetyClassifier:
    """A Hugging Face sequence classifier whose label 1 means unsafe (``AutoModelForSequenceClassification``)."""

    def __init__(self, path: str, max_length: int = 256) -> None:
        self.path = path
        self.max_length = max_length
        self._model: Any = None
        self._tok: Any = None

    def unsafe_probs(self, texts: Sequence[str]) -> list[float]:
        """P(label 1) per text, from one forward pass over the batch."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self._model is None:
            try:
                self._tok = AutoTokenizer.from_pretrained(self.path)
                self._model = AutoModelForSequenceClassification.from_pretrained(self.path).eval()
            except Exception as e:
                raise RewardError(
                    f"reward.safety_classifier={self.path!r}: cannot load a sequence-classification model there "
                    f"({e.__class__.__name__}: {e}); pass a local directory with config.json, weights and tokenizer"
                ) from e
            if self._model.config.num_labels < 2:
                raise RewardError(
                    f"reward.safety_classifier={self.path!r}: the model has {self._model.config.num_labels} label(s); "
                    "expected 2 or more with label 1 = unsafe"
                )
        with torch.no_grad():
            enc = self._tok(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            logits = self._model(**enc).logits.float()  # (B, num_labels)
        return [float(p) for p in torch.softmax(logits, dim=-1)[:, 1]]


class CheckpointRMScorer:
    """The learned reward model of a ``rlchat rm`` checkpoint as an :data:`RMScorer` (loaded on first use).

    Each conversation (prompt + reply) is rendered with the checkpoint's chat tokenizer exactly as preference pairs
    are (``render_conversation(messages + [reply])``), right-padded and scored in one forward pass per batch;
    conversations longer than the model's positions keep their last tokens (the reply). A reward model on a
    pretrained encoder with its own tokenizer (``RewardModel.hf_tokenizer``) gets the same conversation as
    template text through ``RewardModel.tokenize``.
    """

    def __init__(self, path: str, batch_size: int = 32) -> None:
        self.path = path
        self.batch_size = batch_size
        self._rm: Any = None
        self._tok: ChatTokenizer | None = None
        self._max_len = 0

    def _load(self) -> None:
        from rlchat.core.checkpoint import (
            load_reward_model,  # lazy: keeps torch/transformers off the env's import path
        )

        self._rm, self._tok, _ckpt = load_reward_model(self.path)
        self._rm.eval()
        config = getattr(getattr(self._rm, "trunk", None), "config", None)
        for attr in ("max_position_embeddings", "n_positions"):
            if isinstance(getattr(config, attr, None), int):
                self._max_len = getattr(config, attr)
                break

    def __call__(self, prompts: list[list[Message]], responses: list[str]) -> list[float]:
        import torch

        if self._rm is None:
            self._load()
        tok = self._tok
        assert tok is not None
        scores: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            convs = [
                list(p) + [{"role": "assistant", "content": r}]
                for p, r in zip(prompts[i : i + self.batch_size], responses[i : i + self.batch_size])
            ]
            if getattr(self._rm, "hf_tokenizer", None) is not None:
                texts = [tok.decode(tok.render_conversation(c)[0]) for c in convs]
                input_ids, attention_mask = self._rm.tokenize(texts, tok, max_length=self._max_len or 512)
                kwargs = {}
            else:
                seqs = [tok.render_conversation(c)[0] for c in convs]
                # the reply's tokens (text + end of turn) follow the prompt rendered for a reply
                starts = [len(tok.render_prompt(c[:-1])) for c in convs]
                if self._max_len:
                    starts = [max(0, st - max(0, len(s) - self._max_len)) for st, s in zip(starts, seqs)]
                    seqs = [s[-self._max_len :] for s in seqs]
                width = max(len(s) for s in seqs)
                input_ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)  # (B, T)
                attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
                reply_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
                for r, (s, st) in enumerate(zip(seqs, starts)):
                    input_ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
                    attention_mask[r, : len(s)] = 1
                    reply_mask[r, st : len(s)] = 1
                # an implicit reward model scores the reply's log-ratio alone (the prompt's would be a per-prompt
                # offset); a scalar one reads the last token and ignores it
                kwargs = {"reply_mask": reply_mask}
            with torch.no_grad():
                out = self._rm(input_ids, attention_mask, **kwargs)  # (B,)
            scores.extend(float(x) for x in out.float().reshape(-1))
        return scores


# --------------------------------------------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------------------------------------------


def load_plugin(spec: str) -> Callable[..., float]:
    """Import a user reward function from ``"package.module:function"`` and check its signature.

    Raises:
        RewardError: malformed path, import failure, missing attribute, not callable, or a signature that cannot
            take ``(prompt_messages, response_text, response_ids, record)``.
    """
    where = f"reward.plugins[{spec!r}]"
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"{where}: expected an import path 'package.module:function', e.g. 'mypkg.rewards:score'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise RewardError(
            f"{where}: importing module {module_name!r} failed ({e.__class__.__name__}: {e}); make sure the package "
            "is installed or on PYTHONPATH (on a cluster: in the job's working_dir or py_modules)"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"{where}: module {module_name!r} has no attribute {attr!r}; check the function name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"{where}: {attr!r} is a {type(obj).__name__}, not callable; expected {PLUGIN_SIGNATURE}")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: trust them, the call checks the result
        return obj
    try:
        sig.bind([], "", [], None)
    except TypeError as e:
        raise RewardError(f"{where}: {attr}{sig} cannot be called as {PLUGIN_SIGNATURE} ({e})") from None
    return obj


# --------------------------------------------------------------------------------------------------------------
# The composite
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    prompts: list[list[Message]]
    responses: list[str]
    ids: list[list[int]]
    records: list[Any]


class RewardFunction:
    """The composite reward of ``cfg.reward``: enabled components, their weights, and the total.

    Args:
        cfg: the reward section of the config (weights, ranges, patterns, model paths, plugins).
        tokenizer: the policy's tokenizer; a trailing end-of-turn id is stripped from ``response_ids``.
        rm_scorer: ``(prompts, responses) -> scores`` for the ``model`` component; default: the checkpoint at
            ``cfg.model_path`` (loaded on first use).

    Raises:
        ConfigError: a model-backed component is weighted but has no model path, or a safety regex is invalid.
        RewardError: a plugin cannot be imported or has the wrong signature.
    """

    def __init__(self, cfg: RewardConfig, tokenizer: ChatTokenizer, rm_scorer: RMScorer | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.weights: dict[str, float] = {}
        for name in BUILTIN_COMPONENTS:
            w = float(getattr(cfg, "diversity" if name == "diversity_batch" else name))
            if w != 0.0:
                self.weights[name] = w
        if ("diversity" in self.weights or "repetition" in self.weights) and cfg.ngram < 1:
            raise ConfigError(f"reward.ngram={cfg.ngram}: expected n >= 1 for the diversity/repetition components")
        self._patterns: list[re.Pattern[str]] = []
        for p in cfg.safety_patterns:
            try:
                self._patterns.append(re.compile(p, re.IGNORECASE))
            except re.error as e:
                raise ConfigError(f"reward.safety_patterns: {p!r} is not a valid regex ({e}); fix or remove it") from e
        if "safety" in self.weights and not self._patterns and not cfg.safety_classifier:
            logger.warning(
                "reward.safety=%s but neither reward.safety_patterns nor reward.safety_classifier is set, so nothing "
                "is ever flagged; set one of them or reward.safety=0 to silence this",
                cfg.safety,
            )
        self._encoder: SentenceEncoder | None = None
        if "coherence" in self.weights:
            if not cfg.coherence_model:
                raise ConfigError(
                    f"reward.coherence={cfg.coherence}: the coherence component needs reward.coherence_model "
                    "(a local Hugging Face sentence-encoder directory); set it or reward.coherence=0"
                )
            self._encoder = SentenceEncoder(cfg.coherence_model)
        self._classifier = SafetyClassifier(cfg.safety_classifier) if cfg.safety_classifier else None
        self._rm: RMScorer | None = rm_scorer
        if "model" in self.weights and rm_scorer is None:
            if not cfg.model_path:
                raise ConfigError(
                    f"reward.model={cfg.model}: the learned reward needs reward.model_path (a checkpoint written by "
                    "`rlchat rm`); set it or reward.model=0"
                )
            self._rm = CheckpointRMScorer(cfg.model_path)
        self._plugins: dict[str, Callable[..., Any]] = {}
        for spec, w in cfg.plugins.items():
            if float(w) != 0.0:
                self._plugins[spec] = load_plugin(spec)
                self.weights[spec] = float(w)
        self.monitor: list[str] = []
        for name in cfg.monitor:
            if name not in MONITORABLE_COMPONENTS:
                raise ConfigError(
                    f"reward.monitor: {name!r} cannot be monitored; expected names from "
                    f"{', '.join(MONITORABLE_COMPONENTS)} (a model-backed component or plugin needs a weight != 0)"
                )
            if name not in self.weights and name not in self.monitor:
                self.monitor.append(name)
        if any(n in self.monitor for n in ("diversity", "diversity_batch", "repetition")) and cfg.ngram < 1:
            raise ConfigError(f"reward.ngram={cfg.ngram}: expected n >= 1 for the monitored n-gram components")

    @property
    def component_names(self) -> list[str]:
        """Names of the enabled (weight != 0) components, in the order they appear in ``components``."""
        return list(self.weights)

    @property
    def monitor_names(self) -> list[str]:
        """Monitored-only components (``reward.monitor`` with weight 0): reported after the enabled ones, never
        added to ``total``."""
        return list(self.monitor)

    def __call__(
        self,
        prompt_messages: Sequence[Message],
        response_text: str,
        response_ids: Sequence[int],
        record: Record | None = None,
    ) -> RewardResult:
        """Score one assistant reply (a batch of one: ``diversity_batch`` is 0; use ``score_batch`` for a batch)."""
        return self.score_batch([list(prompt_messages)], [response_text], [list(response_ids)], [record])[0]

    def score_batch(
        self,
        prompts: Sequence[Sequence[Message]],
        responses: Sequence[str],
        response_ids: Sequence[Sequence[int]],
        records: Sequence[Record | None] | None = None,
    ) -> list[RewardResult]:
        """Score a batch of replies; model-backed components run one batched forward.

        Args:
            prompts: B conversations, each the messages the reply answers.
            responses: B reply texts.
            response_ids: B reply token ids (a trailing end-of-turn id is ignored).
            records: B source records (references, metadata) or None.

        Returns:
            B results, in order.

        Raises:
            RewardError: a component returned a non-finite or non-numeric value, or a plugin raised.
        """
        n = len(responses)
        if not (len(prompts) == n == len(response_ids)) or (records is not None and len(records) != n):
            raise RewardError(
                f"score_batch: got {len(prompts)} prompts, {n} responses, {len(response_ids)} id lists and "
                f"{'no' if records is None else len(records)} records; expected the same number of each"
            )
        eot = self.tokenizer.eot_id
        ids = [list(x[:-1]) if len(x) and x[-1] == eot else list(x) for x in response_ids]
        batch = _Batch([list(p) for p in prompts], list(responses), ids, list(records) if records else [None] * n)
        values: dict[str, list[float]] = {name: self._component(name, batch) for name in self.weights}
        has_reference = any(getattr(r, "reference", None) is not None for r in batch.records)
        for name in self.monitor:  # reported, never weighted (see the module docstring)
            if has_reference or name not in REFERENCE_COMPONENTS:
                values[name] = self._component(name, batch)
        results = []
        for i in range(n):
            comps: dict[str, float] = {}
            for name, vals in values.items():
                comps[name] = _finite(name, vals[i], i, batch.responses[i])
            total = sum(self.weights[name] * v for name, v in comps.items() if name in self.weights)
            results.append(RewardResult(total=_finite("total", total, i, batch.responses[i]), components=comps))
        return results

    # ------------------------------------------------------------------------------------------------ components
    def _component(self, name: str, b: _Batch) -> list[Any]:
        cfg = self.cfg
        refs = [getattr(r, "reference", None) for r in b.records]
        if name == "verifiable":
            return [verifiable_answer(t, ref) for t, ref in zip(b.responses, refs)]
        if name == "reference_f1":
            return [token_f1(t, ref) for t, ref in zip(b.responses, refs)]
        if name == "rouge_l":
            return [rouge_l(t, ref) for t, ref in zip(b.responses, refs)]
        if name == "length":
            return [length_penalty(len(x), cfg.length_min, cfg.length_max) for x in b.ids]
        if name == "diversity":
            return [distinct_n(x, cfg.ngram) for x in b.ids]
        if name == "diversity_batch":
            return batch_novelty(b.ids, cfg.ngram)
        if name == "repetition":
            return [repetition_penalty(x, cfg.ngram) for x in b.ids]
        if name == "coherence":
            assert self._encoder is not None
            return self._encoder.similarity([_last_user_text(p) for p in b.prompts], b.responses)
        if name == "safety":
            flags = [safety_flagged(t, self._patterns) for t in b.responses]
            if self._classifier is not None:
                probs = self._classifier.unsafe_probs(b.responses)
                flags = [f or p > 0.5 for f, p in zip(flags, probs)]
            return [-1.0 if f else 0.0 for f in flags]
        if name == "model":
            assert self._rm is not None
            scores = list(self._rm(b.prompts, b.responses))
            if len(scores) != len(b.responses):
                raise RewardError(
                    f"reward component 'model': the scorer returned {len(scores)} scores for {len(b.responses)} "
                    "replies; expected one score per reply"
                )
            return scores
        fn = self._plugins[name]
        out = []
        for p, t, x, r in zip(b.prompts, b.responses, b.ids, b.records):
            try:
                out.append(fn(p, t, x, r))
            except Exception as e:
                raise RewardError(f"reward plugin {name!r} raised {e.__class__.__name__}: {e}") from e
        return out


def _finite(name: str, value: Any, row: int, text: str) -> float:
    """``float(value)``, or a RewardError naming the component when it is not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RewardError(
            f"reward component {name!r} returned {value!r} ({type(value).__name__}) for reply {row} "
            f"({text[:60]!r}); expected a finite float"
        ) from None
    if not math.isfinite(v):
        raise RewardError(
            f"reward component {name!r} returned {v} for reply {row} ({text[:60]!r}); expected a finite float. "
            "A NaN/inf reward would silently poison PPO: fix the component (plugins must return finite numbers)"
        )
    return v
