"""Models: the policy with its value head, tiny demo models, vocabulary bridging and the reward model.

- :class:`PolicyValueModel` wraps any ``transformers`` causal LM (a local path, a hub id, or a tiny model built from
  :class:`~rlchat.core.config.ModelConfig`) plus a scalar value head, either on the policy's own trunk (``critic:
  shared``) or on a second trunk of the same config (``critic: separate``). One causal forward gives log-probs,
  entropy and values for every position, aligned so that position ``t`` holds the quantities *for generating token t*.
- :func:`load_lm` bridges vocabularies: chat special tokens the model lacks get new embedding rows initialised
  from the mean embedding (tied weights stay tied); a pretrained model whose vocabulary is not the chosen tiktoken
  encoding is refused, unless ``model.reinit_embeddings`` asks to re-initialise the embeddings. The vocabulary is
  checked against the tokenizer files shipped with the model; without any, the embedding must have the tokenizer's
  size (or the BPE's, missing only chat tokens, or that size padded to a multiple of 8-128).
- :func:`check_model_computation` probes every pretrained LM once at load: a model whose own logits rlchat's trunk +
  head + KV-cache decoding would not reproduce (BERT-style decoders, Mamba, BART-style decoders) is refused instead of
  training and sampling on silently wrong numbers; :func:`resolve_trunk` is the one place that finds the trunk.
- :class:`RewardModel` puts a scalar head on any ``AutoModel``: encoders (BERT, DistilBERT, RoBERTa, MiniLM) score
  from the first token, causal LMs from the last real token.

Why log-probs are computed the way they are (measured on this 2-core CPU, see docs/ARCHITECTURE.md "Costs"):
the vocabulary dominates, so log-probs and entropy are computed **only at action positions** and **in row chunks**
by :class:`ChunkedLogprobs`, a custom autograd function that never keeps ``(rows, V)`` logits alive: its backward
recomputes each chunk's logits instead of storing them (like fused linear-cross-entropy kernels). The maths is
checked against plain autograd ``log_softmax`` of the full logits (values and gradients) in tests/test_model.py;
no ``out=`` arguments are used, because ``torch._log_softmax(out=<non-contiguous view>)`` silently wrote wrong
values in torch 2.13.

Precision: weights stay fp32 (master weights); :func:`resolve_precision` picks a bf16 autocast dtype on GPUs and
on CPUs with bf16 matrix units (AMX / AVX512-BF16), where 2048^2 matmuls ran ~6x faster than fp32 - on CPUs only
for models at least :data:`CPU_BF16_MIN_HIDDEN` wide (narrower ones measured slower in bf16).

No Ray import here: this module runs in one plain process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rlchat.core.errors import CheckpointError, ConfigError, TokenizerError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rlchat.core.config import Config, ModelConfig
    from rlchat.core.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
SCORE_HEAD_FILE = "score_head.safetensors"
POLICY_META_FILE = "rlchat_policy.json"
REWARD_META_FILE = "rlchat_reward_model.json"
CRITIC_DIR = "critic"

# Text whose ids must agree between a pretrained model's own tokenizer and ours for the vocabularies to match:
# words, digits, punctuation, whitespace runs and multi-byte characters exercise every branch of the BPE regex.
_PROBE_TEXT = "Hello world! The quick brown fox jumps over 13 lazy dogs.\n  Naïve café, 東京, emoji 🙂 -- ok?"

# Encoder-only model types: the reward model scores them from the first ([CLS]) token, not the last one.
ENCODER_MODEL_TYPES = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "ernie",
        "modernbert",
        "mpnet",
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
    }
)

# Encoders whose embeddings number positions from pad_token_id + 1 and find padding by comparing ids with the pad id
# (fairseq's convention); newer transformers mark them with ``create_position_ids_from_input_ids`` on the class.
OFFSET_POSITION_MODEL_TYPES = frozenset(
    {
        "camembert",
        "data2vec-text",
        "longformer",
        "mpnet",
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
    }
)

# --------------------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX-BF16 or AVX512-BF16), read from ``/proc/cpuinfo`` flags.

    On CPUs without them PyTorch emulates bf16 matmuls, which is slower than fp32, so ``precision: auto`` must not
    pick bf16 there. Non-Linux systems report False (no cpuinfo to read).
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return bool(flags & {"amx_bf16", "avx512_bf16"})
    return False


CPU_BF16_MIN_HIDDEN = 128
"""Narrowest model for which ``precision: auto`` uses bf16 on a CPU. Measured here (1 thread, AMX, 4096 vocab): at
width 64 bf16 autocast was slower (learner step 225 vs 154 ms; generation 0.4-0.9x) because per-op casts cost more
than the tiny matmuls save; at 128 it broke even (290 vs 300 ms, 1.08x generation); at 256 and 512 it was 1.6-2x
faster for the learner and 1.15-1.4x for generation."""


def resolve_precision(precision: str, device: torch.device, hidden_size: int | None = None) -> torch.dtype | None:
    """The autocast dtype for ``model.precision`` on ``device``, or None for plain fp32.

    Args:
        precision: ``auto`` (bf16 on GPUs that support it and on CPUs with bf16 matrix units, else fp32), ``bf16``
            (always, even where it is emulated) or ``fp32``.
        device: where the model runs.
        hidden_size: the model's width; with ``auto`` on a CPU, models narrower than :data:`CPU_BF16_MIN_HIDDEN`
            stay fp32 (None = no width rule). The policy and the generation engine both pass it, so rollouts and
            the learner always run at the same precision.

    Returns:
        ``torch.bfloat16`` when autocast should be used, else None. Training keeps fp32 weights (serving's
        ``GenerationEngine.for_inference`` stores them in this dtype once).

    Raises:
        ConfigError: an unknown precision name.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ConfigError(f"model.precision={precision!r}: expected one of 'auto', 'bf16', 'fp32'")
    if device.type == "cuda":
        # bf16 units only: torch counts emulation (a T4, a V100) as support unless told not to
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type == "cpu":
        wide_enough = hidden_size is None or hidden_size >= CPU_BF16_MIN_HIDDEN
        return torch.bfloat16 if cpu_has_bf16() and wide_enough else None
    return None


def autocast_context(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left- and right-padded copies of a row get the same positions.

    Args:
        attention_mask: (B, T) 1 for real tokens, 0 for padding.

    Returns:
        (B, T) int64: 0 for the first real token, +1 per real token; padding positions get 0 (they are masked out).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row, for left or right padding (0 for an all-padding row)."""
    mask = attention_mask.long()
    t = mask.shape[1]
    return (t - 1 - mask.flip(1).argmax(1)).clamp_(min=0)


# --------------------------------------------------------------------------------------------------------------
# Building and loading models
# --------------------------------------------------------------------------------------------------------------


def build_tiny_lm(cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    """A small randomly initialised causal LM of ``cfg.arch`` sized by ``cfg`` (the demo and test models).

    Args:
        cfg: ``arch`` (gpt2 / llama / qwen2), ``n_layer``, ``n_embd``, ``n_head``, ``n_positions``, ``dropout``.
        vocab_size: embedding rows, normally ``tokenizer.n_vocab``.

    Returns:
        A ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` in fp32 with tied input/output
        embeddings (at a small width the embedding is most of the parameters) and SDPA attention.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if cfg.n_embd % cfg.n_head:
        raise ConfigError(
            f"model.n_embd={cfg.n_embd}: expected a multiple of model.n_head ({cfg.n_head}); change either value"
        )
    common: dict[str, Any] = {"vocab_size": vocab_size, "tie_word_embeddings": True, "use_cache": True}
    if cfg.arch == "gpt2":
        config = GPT2Config(
            n_positions=cfg.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=None,
            eos_token_id=None,
            **common,
        )
        model_cls: Any = GPT2LMHeadModel
    elif cfg.arch in ("llama", "qwen2"):
        config_cls: Any = LlamaConfig if cfg.arch == "llama" else Qwen2Config
        config = config_cls(
            hidden_size=cfg.n_embd,
            intermediate_size=4 * cfg.n_embd,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.n_positions,
            attention_dropout=cfg.dropout,
            bos_token_id=None,
            eos_token_id=None,
            **common,
        )
        model_cls = LlamaForCausalLM if cfg.arch == "llama" else Qwen2ForCausalLM
    else:
        raise ConfigError(f"model.arch={cfg.arch!r}: expected one of 'gpt2', 'llama', 'qwen2'")
    config._attn_implementation = "sdpa"
    return model_cls(config).float()


def resolve_trunk(lm: nn.Module) -> nn.Module:
    """The trunk of a causal LM (embeddings + blocks + final norm, no LM head), which rlchat runs itself.

    Why not just ``lm.base_model``: Hugging Face finds it through ``base_model_prefix``, and some causal LMs name
    an attribute they do not have (``Llama4ForCausalLM`` and ``MllamaForCausalLM`` say ``language_model`` but keep
    the trunk in ``model``); ``base_model`` (and ``get_decoder()``) then return the LM itself, whose output has no
    ``last_hidden_state``. Every trunk rlchat runs (learner, critic, reward model, engine, evaluation) comes from
    here so that all of them agree.

    Args:
        lm: a ``transformers`` causal LM (or any module with ``base_model``).

    Returns:
        ``lm.base_model`` unless that is ``lm`` itself; then ``lm.model``, or the one child module that is a
        ``PreTrainedModel``.

    Raises:
        ConfigError: no such trunk can be found.
    """
    base = getattr(lm, "base_model", lm)
    if base is not lm:
        return base
    from transformers import PreTrainedModel

    inner = getattr(lm, "model", None)
    if isinstance(inner, PreTrainedModel):
        return inner
    children = [m for m in lm.children() if isinstance(m, PreTrainedModel)]
    if len(children) == 1:
        return children[0]
    names = ", ".join(n for n, m in lm.named_children() if isinstance(m, PreTrainedModel)) or "none"
    raise ConfigError(
        f"{type(lm).__name__}: no base model (trunk) to run: base_model_prefix="
        f"{getattr(lm, 'base_model_prefix', '')!r} names no attribute and the pretrained sub-models are {names} "
        "(expected exactly one); use a decoder-only causal LM such as Llama, Qwen, Mistral, Gemma or GPT-2"
    )


def _embedding_rows(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]


def _vocabulary_matches(path: str, tokenizer: ChatTokenizer) -> bool | None:
    """Whether the tokenizer shipped next to a pretrained model agrees with ours; None when it cannot be told.

    Our own checkpoints carry ``rlchat_tokenizer.json`` (compared by encoding and special ids); other models are
    compared by encoding a probe text with their Hugging Face tokenizer and with ours.
    """
    d = Path(path)
    if (d / "rlchat_tokenizer.json").is_file():
        from rlchat.core.tokenizer import ChatTokenizer

        other = ChatTokenizer.load(d)
        return other.enc.name == tokenizer.enc.name and other.special_ids == tokenizer.special_ids
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
    if d.is_dir() and not any((d / f).is_file() for f in tokenizer_files):
        return None
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path)
        theirs = list(hf(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
    except Exception as e:  # no tokenizer files, offline hub id, unsupported tokenizer class
        logger.info("could not load the tokenizer of %s to compare vocabularies (%s)", path, e.__class__.__name__)
        return None
    return theirs == tokenizer.encode(_PROBE_TEXT)


def _mean_resize(model: PreTrainedModel, n_vocab: int) -> None:
    """Grow the embeddings to ``n_vocab`` rows; new rows (input and untied output) = the mean of the old rows.

    The mean keeps the next-token distribution nearly unchanged for the new ids (Hewitt 2021,
    https://nlp.stanford.edu/~johnhew/vocab-expansion.html); ``resize_token_embeddings`` re-ties tied weights.
    """
    old = _embedding_rows(model)
    model.resize_token_embeddings(n_vocab, mean_resizing=False)
    with torch.no_grad():
        emb: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]
        emb[old:] = emb[:old].mean(0)
        out: Any = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[old:] = out.weight[:old].mean(0)
            if getattr(out, "bias", None) is not None:
                out.bias[old:] = out.bias[:old].mean()


def _reinit_embeddings(model: PreTrainedModel, n_vocab: int) -> None:
    """Resize to ``n_vocab`` rows and draw every embedding row afresh (the model must relearn them)."""
    model.resize_token_embeddings(n_vocab, mean_resizing=False)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        emb: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]
        emb.normal_(0.0, std)
        out: Any = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight.normal_(0.0, std)
            if getattr(out, "bias", None) is not None:
                out.bias.zero_()


EMBEDDING_PAD_MULTIPLES = (8, 16, 32, 64, 128)
"""Multiples that models round their embedding rows up to (``resize_token_embeddings(pad_to_multiple_of=...)``,
Megatron-style padding). A model with no tokenizer files whose embedding is exactly the tokenizer's ``n_vocab``
rounded up to one of these is accepted; :class:`PolicyValueModel` never samples the padded rows."""


def _unverified_rows_fit(rows: int, n_ranks: int, n_vocab: int) -> bool:
    """Whether an embedding of ``rows`` rows plausibly belongs to the tokenizer when no tokenizer file can tell.

    Accepted: exactly ``n_vocab`` rows; ``n_ranks <= rows < n_vocab`` (the BPE without some or all of our chat
    tokens, which :func:`_mean_resize` adds); ``n_vocab`` rounded up to one of :data:`EMBEDDING_PAD_MULTIPLES`.
    Anything else, in particular a larger embedding (GPT-2's 50,257 rows under a 4,096-id tokenizer), is another
    tokenizer's model: its rows would be read with ids that mean different text.
    """
    if n_ranks <= rows <= n_vocab:
        return True
    return any(rows == -(-n_vocab // m) * m for m in EMBEDDING_PAD_MULTIPLES)


def bridge_vocabulary(model: PreTrainedModel, tokenizer: ChatTokenizer, source: str, reinit: bool) -> None:
    """Make ``model``'s embedding cover every id of ``tokenizer`` (see the module docstring).

    Args:
        model: a model loaded from ``source``.
        tokenizer: the chat tokenizer the model will be fed.
        source: the path / hub id the model came from (for the vocabulary check and error messages).
        reinit: ``model.reinit_embeddings``: re-initialise the embeddings instead of refusing a mismatch.

    Raises:
        TokenizerError: the pretrained vocabulary is not the tokenizer's encoding and ``reinit`` is False.
    """
    rows = _embedding_rows(model)
    n_ranks = len(tokenizer.enc._mergeable_ranks)
    matches = _vocabulary_matches(source, tokenizer)
    verified = matches is not None
    if matches is None:
        # No tokenizer files to compare with: only the embedding's size can tell, so it must be this tokenizer's
        # (see _unverified_rows_fit); a merely larger embedding is another vocabulary, not spare room.
        matches = _unverified_rows_fit(rows, n_ranks, tokenizer.n_vocab)
        if matches:
            logger.info(
                "%s: no tokenizer files to compare vocabularies with; %d embedding rows fit %s (%d ids), assuming it",
                source,
                rows,
                tokenizer.enc.name,
                tokenizer.n_vocab,
            )
    if not matches:
        if reinit:
            logger.warning(
                "%s: vocabulary does not match %s; re-initialising all %d embedding rows (model.reinit_embeddings)",
                source,
                tokenizer.enc.name,
                tokenizer.n_vocab,
            )
            _reinit_embeddings(model, tokenizer.n_vocab)
            return
        evidence = (
            "its own tokenizer"
            if verified
            else f"no tokenizer files, and {rows} rows is neither {tokenizer.n_vocab} (the tokenizer's ids), "
            f"{n_ranks}-{tokenizer.n_vocab} (its BPE without chat tokens) nor {tokenizer.n_vocab} rounded up to a "
            f"multiple of {', '.join(map(str, EMBEDDING_PAD_MULTIPLES))}"
        )
        raise TokenizerError(
            f"model.name_or_path={source!r}: its vocabulary ({rows} embedding rows, {evidence}) does not match "
            f"the tokenizer {tokenizer.enc.name} ({n_ranks} BPE ranks + chat specials); token ids would be "
            "meaningless. Fix: set tokenizer.encoding (and tokenizer.vocab_size) to the model's own encoding (e.g. "
            "a .tiktoken file), or set model.reinit_embeddings=true to re-initialise the embeddings (the model "
            "must then relearn them)"
        )
    if rows < tokenizer.n_vocab:
        logger.info(
            "%s: adding %d embedding rows for chat tokens (mean-initialised)", source, tokenizer.n_vocab - rows
        )
        _mean_resize(model, tokenizer.n_vocab)


def load_lm(cfg: ModelConfig, tokenizer: ChatTokenizer, check: bool = True) -> PreTrainedModel:
    """The policy LM: a tiny model built from ``cfg`` when ``name_or_path`` is empty, else a pretrained one.

    Args:
        cfg: the model section of the config.
        tokenizer: the chat tokenizer (its ``n_vocab`` sizes the embedding; its pad id is recorded in the config).
        check: run :func:`check_model_computation` on a pretrained model (False only for a second copy of weights
            that were just checked, e.g. the separate critic's trunk).

    Returns:
        An fp32 causal LM whose embedding covers every tokenizer id.

    Raises:
        TokenizerError: vocabulary mismatch (see :func:`bridge_vocabulary`).
        CheckpointError: ``name_or_path`` cannot be loaded.
        ConfigError: an architecture rlchat would run wrongly (see :func:`check_model_computation`).
    """
    if not cfg.name_or_path:
        model = build_tiny_lm(cfg, tokenizer.n_vocab)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"model.name_or_path={cfg.name_or_path!r}: cannot load a causal LM ({e}); expected a local directory "
                "with config.json + weights, or a hub id available in the local Hugging Face cache"
            ) from None
        bridge_vocabulary(model, tokenizer, cfg.name_or_path, cfg.reinit_embeddings)
    model.config.pad_token_id = tokenizer.pad_id
    if cfg.name_or_path and check:  # rlchat's own tiny architectures are known to pass (tests/test_generation.py)
        check_model_computation(model, tokenizer, cfg.name_or_path)
    return model


PROBE_RTOL = 1e-3
"""Largest difference :func:`check_model_computation` accepts between rlchat's logits and the model's own, as a
fraction of the largest reference logit. fp32 reordering (batched, padded, cached vs one full row) stays near 1e-6
of it on the architectures rlchat supports; the wrong computations it exists to catch differ by 0.1 or more."""

_UNSUPPORTED_FIX = (
    "Fix: use a decoder-only causal LM such as Llama, Qwen, Mistral, Gemma or GPT-2 (model.name_or_path), or leave "
    "model.name_or_path empty for a tiny model of model.arch"
)


def check_model_computation(lm: PreTrainedModel, tokenizer: ChatTokenizer, source: str) -> None:
    """Refuse a pretrained LM whose own forward rlchat's computation would not reproduce (a few-token probe).

    Why: rlchat never calls the model's LM forward. The learner runs the trunk with its own attention mask and
    position ids (counted from the mask, any padding side) and applies the output embedding (+ bias, logit scale,
    soft-cap) itself; the engine left-pads prompts and decodes one token at a time with a KV cache and the full
    ``(B, L)`` padding mask. Every decoder-only transformer (Llama, Qwen, Mistral, Gemma, GPT-2, ...) computes the
    same logits that way, but ``AutoModelForCausalLM`` also loads models that do not, and their tokens and log-probs
    were then silently wrong: BERT-style decoders (``is_decoder=True``), whose prediction head is dense + activation
    + LayerNorm before the output embedding; Mamba / FalconMamba, whose one-token step broadcast the padding mask
    into a copy of the step per mask column; BART-style ``*ForCausalLM`` decoders, which take positions from the
    cache or the input length instead of rlchat's position ids, shifting left-padded rows. Rather than list
    architectures, the probe compares, on two rows of tokenizer ids (one left-padded) in fp32 and eval mode:

    1. trunk + rlchat's head vs ``lm(row).logits`` on an unpadded row (the LM head);
    2. the learner's padded forward (:func:`_trunk_forward` with rlchat's mask and position ids) vs each row alone;
    3. the engine's prefill + two cached one-token steps
       (:func:`rlchat.core.generation.cached_decoding_logits`) vs each row alone.

    Cost: about eight forwards of at most 6 tokens, once per pretrained model loaded (the built-in tiny models
    are not probed).

    Args:
        lm: the loaded fp32 causal LM, vocabulary already bridged to ``tokenizer``.
        tokenizer: the chat tokenizer (probe ids, pad id, vocabulary size).
        source: ``model.name_or_path`` (for the message).

    Raises:
        ConfigError: the logits differ by more than :data:`PROBE_RTOL` of their scale, or rlchat's forward call
            fails on the model; it names the architecture, what differs, and the fix.
    """
    from rlchat.core.generation import GenerationEngine, cached_decoding_logits

    arch = type(lm).__name__
    model_type = str(getattr(lm.config, "model_type", "?"))
    head_rows = int(lm.get_output_embeddings().weight.shape[0])
    v = min(head_rows, tokenizer.n_vocab)
    ids = [i for i in tokenizer.encode(_PROBE_TEXT) if i < v] + list(range(10))  # ids every row of the head has
    rows = [ids[:6], ids[6:10]]
    prefix = f"model.name_or_path={source!r}: {arch} (model_type {model_type!r}) cannot be run by rlchat"

    def compare(pairs: list[tuple[torch.Tensor, torch.Tensor]], what: str) -> None:
        """Refuse with ``what`` when any (rlchat's, the model's) logits pair differs beyond the tolerance."""
        rel = max(float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-6) for got, ref in pairs)
        logger.debug("%s: probe %r: relative logit difference %.3g", source, stage, rel)
        if not rel <= PROBE_RTOL:  # nan included
            raise ConfigError(
                f"{prefix}: {what} (logits differ from the model's own forward by {rel:.3g} of their scale, more "
                f"than {PROBE_RTOL:g}). {_UNSUPPORTED_FIX}"
            )

    device = lm.get_output_embeddings().weight.device
    was_training = lm.training
    lm.eval()
    stage = "its own forward"
    try:
        with torch.no_grad():
            refs = [lm(torch.tensor([r], device=device), use_cache=False).logits[0, :, :v].float() for r in rows]
            policy = PolicyLM(lm, precision="fp32", vocab_size=v)
            weight, bias = policy.head_weight()
            transform = logit_transform(lm.config)

            def head(h: torch.Tensor) -> torch.Tensor:  # the learner's logits (chunked_logprobs' soft-capped path)
                z = chunk_logits(h.reshape(-1, h.shape[-1]), weight, bias, transform[0], None).view(*h.shape[:-1], -1)
                return transform[1] * torch.tanh(z / transform[1]) if transform[1] > 0 else z

            # 1. the LM head: the trunk's own forward of an unpadded row, then rlchat's head
            stage = "the trunk's forward"
            trunk = resolve_trunk(lm)
            h = trunk(input_ids=torch.tensor([rows[0]], device=device), use_cache=False).last_hidden_state
            compare(
                [(head(h[0]), refs[0])],
                "rlchat runs the trunk and applies the output embedding itself; this model's LM head is more "
                "than that",
            )
            # 2. the learner: one full row and one left-padded row, rlchat's mask and position ids
            stage = "the learner's padded forward (attention_mask and position_ids)"
            t = len(rows[0])
            batch = torch.full((2, t), tokenizer.pad_id, dtype=torch.long, device=device)
            mask = torch.zeros((2, t), dtype=torch.long, device=device)
            for i, r in enumerate(rows):
                batch[i, t - len(r) :] = torch.tensor(r)
                mask[i, t - len(r) :] = 1
            z = head(_trunk_forward(trunk, batch, mask))  # (2, T, V)
            compare(
                [(z[i, t - len(r) :], refs[i]) for i, r in enumerate(rows)],
                "rlchat pads batches and passes position ids counted from the attention mask; this model's logits "
                "for a left-padded row differ from the same row unpadded (it ignores those position ids or that mask)",
            )
            # 3. the engine: left-padded prefill, then two one-token steps with the KV cache and the padding mask
            stage = "the generation engine's cached decoding"
            lengths = [len(r) - 2 for r in rows]
            z = cached_decoding_logits(GenerationEngine(lm, tokenizer, precision="fp32"), rows, lengths)
            compare(
                [(z[i], refs[i][n - 1 :]) for i, n in enumerate(lengths)],
                "rlchat's generation engine decodes one token at a time with a KV cache and the padding mask of the "
                "batch; its cached decoding with padding masks differs from its full forward",
            )
    except ConfigError:
        raise
    except Exception as e:  # the model's forward rejects what rlchat passes (an argument, the cache, the mask)
        raise ConfigError(f"{prefix}: {stage} fails on it ({type(e).__name__}: {e}). {_UNSUPPORTED_FIX}") from e
    finally:
        lm.train(was_training)


# --------------------------------------------------------------------------------------------------------------
# Chunked log-probs and entropy
# --------------------------------------------------------------------------------------------------------------


def logit_transform(config: Any) -> tuple[float, float]:
    """``(scale, softcap)`` that a model applies to ``lm_head`` outputs (1.0 and 0.0 for plain models).

    Cohere multiplies logits by ``logit_scale``, Granite divides them by ``logits_scaling`` and Gemma 2/3 soft-cap
    them with ``final_logit_softcapping``; the learner and the generation engine both apply this so their log-probs
    agree with the model's own forward.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(text, "logit_scale", None):
        scale *= float(text.logit_scale)
    if getattr(text, "logits_scaling", None):
        scale /= float(text.logits_scaling)
    return scale, float(getattr(text, "final_logit_softcapping", None) or 0.0)


# The chunked log-prob maths lives in its own pure module; these names stay importable from here.
from rlchat.core.logprobs import ChunkedLogprobs, chunk_logits, chunked_logprobs  # noqa: E402,F401

# --------------------------------------------------------------------------------------------------------------
# Policy + value
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PolicyOutput:
    """What one learner forward returns; every tensor is (B, T) float32 and position t is *for generating token t*.

    Attributes:
        logprobs: ``log pi(x_t | x_<t)`` at action positions, 0 elsewhere and at t = 0.
        entropy: ``H(pi(. | x_<t))`` at action positions (0 elsewhere, or everywhere if not computed).
        values: ``V(x_<t)`` (the value of the state the token was chosen in); 0 at t = 0.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor


def _trunk_forward(
    trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    """(B, T, H) last hidden state of a base model; causal trunks get padding-independent position ids."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if causal:
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        kwargs["use_cache"] = False
    else:
        positions = _encoder_position_ids(trunk, attention_mask)
        if positions is not None:
            kwargs["position_ids"] = positions
    return trunk(**kwargs).last_hidden_state


def _encoder_position_ids(trunk: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """(B, T) position ids for RoBERTa-family encoders, from the attention mask; None for other encoders.

    RoBERTa, XLM-R, CamemBERT, ... derive positions from the token ids: every id equal to ``config.pad_token_id``
    (1) counts as padding, and real tokens are numbered from ``pad_token_id + 1``. Under the chat tokenizer id 1 is
    an ordinary BPE token, so every position after it would be shifted. Counting real tokens from the mask keeps
    RoBERTa's offset (real token k at ``padding_idx + k``, padding at ``padding_idx``, as HF computes it) without
    reading the ids. BERT-style encoders number right-padded rows ``0..T-1`` by default, which is already right.
    """
    emb = getattr(trunk, "embeddings", None)
    padding_idx = getattr(emb, "padding_idx", None)
    offset_style = hasattr(type(emb), "create_position_ids_from_input_ids") or (
        str(getattr(trunk.config, "model_type", "")) in OFFSET_POSITION_MODEL_TYPES
    )
    if emb is None or padding_idx is None or not offset_style:
        return None
    mask = attention_mask.long()
    return mask.cumsum(-1) * mask + int(padding_idx)


class PolicyLM(nn.Module):
    """A causal LM as a policy: the log-probs of chosen tokens, and nothing else.

    The frozen reference of the PPO KL penalty is one (:meth:`frozen_copy`); :class:`PolicyValueModel` adds the
    value head (and the critic trunk). Keeping the reference to the LM alone matters: a copy of the whole
    :class:`PolicyValueModel` also carried the value head and, with ``model.critic: separate``, a second trunk the
    KL never reads, in memory and in every reference pass.

    Attributes:
        lm: the ``transformers`` causal LM (fp32 weights).
        precision: ``model.precision`` (resolved per call against the parameters' device).
        vocab_size: ids the policy may choose: ``min(head rows, tokenizer.n_vocab)``; rows beyond (a pretrained
            model's padded vocabulary) are never sampled and not part of the learner's softmax either.
    """

    def __init__(self, lm: PreTrainedModel, precision: str = "auto", vocab_size: int | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.hidden_size = int(lm.config.get_text_config().hidden_size)
        self.precision = precision
        head_rows = int(lm.get_output_embeddings().weight.shape[0])
        self.vocab_size = min(head_rows, vocab_size) if vocab_size else head_rows

    def frozen_copy(self) -> PolicyLM:
        """A frozen (no grad, eval mode) copy of this policy's LM: the reference of the KL penalty."""
        ref = PolicyLM(copy.deepcopy(self.lm), precision=self.precision, vocab_size=self.vocab_size).eval()
        ref.requires_grad_(False)
        return ref

    @property
    def trunk(self) -> nn.Module:
        """The policy's base model (embeddings + blocks + final norm, no LM head); see :func:`resolve_trunk`."""
        return resolve_trunk(self.lm)

    @property
    def device(self) -> torch.device:
        return self.lm.get_output_embeddings().weight.device

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of this model's forwards (None = fp32); see :func:`resolve_precision`."""
        return resolve_precision(self.precision, self.device, self.hidden_size)

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's (V, H) weight and optional (V,) bias, cut to :attr:`vocab_size` rows."""
        head = self.lm.get_output_embeddings()
        b = getattr(head, "bias", None)
        v = self.vocab_size
        return head.weight[:v], (b[:v] if b is not None else None)

    def action_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        chunk_size: int = 1024,
    ) -> torch.Tensor:
        """(B, T) float32 ``log pi(x_t | x_<t)`` at action positions, 0 elsewhere: the log-probs of
        :meth:`PolicyValueModel.forward` (same arguments) without entropy, values or a critic pass."""
        with autocast_context(self.autocast_dtype(), self.device):
            h = _trunk_forward(self.trunk, input_ids, attention_mask)  # (B, T, H)
        return self._token_logprobs(h, input_ids, action_mask, False, chunk_size, temperature)[0]

    def _token_logprobs(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        action_mask: torch.Tensor | None,
        compute_entropy: bool,
        chunk_size: int,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) log-probs and entropy at action positions (0 elsewhere) from the trunk's hidden states (B, T, H)."""
        b, t = input_ids.shape
        if action_mask is None:
            sel = torch.ones(b, t - 1, dtype=torch.bool, device=input_ids.device)
        else:
            sel = action_mask[:, 1:] != 0  # (B, T-1)
        rows_b, rows_t = sel.nonzero(as_tuple=True)
        weight, bias = self.head_weight()
        lp, ent = chunked_logprobs(
            h[rows_b, rows_t],
            weight,
            bias,
            input_ids[rows_b, rows_t + 1],
            chunk_size=chunk_size,
            compute_entropy=compute_entropy,
            matmul_dtype=self.autocast_dtype(),
            transform=logit_transform(self.lm.config),
            temperature=temperature,
        )
        zeros = torch.zeros(b, t, dtype=torch.float32, device=input_ids.device)
        return zeros.index_put((rows_b, rows_t + 1), lp), zeros.index_put((rows_b, rows_t + 1), ent)


class PolicyValueModel(PolicyLM):
    """A causal LM policy (:class:`PolicyLM`) plus a value head, on a shared trunk or on a separate critic trunk.

    Attributes:
        lm, precision, vocab_size: as in :class:`PolicyLM`.
        value_head: ``nn.Linear(hidden, 1)``.
        critic: the separate critic trunk (a base ``AutoModel`` of the same config) or None when shared.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        critic: Any = None,
        precision: str = "auto",
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(lm, precision=precision, vocab_size=vocab_size)
        self.critic = critic
        trunk_config: Any = (critic if critic is not None else lm).config
        hidden = int(trunk_config.get_text_config().hidden_size)
        self.value_head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.value_head.weight.normal_(0.0, 1.0 / math.sqrt(hidden) * 0.1)
            self.value_head.bias.zero_()

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(cls, cfg: Config, tokenizer: ChatTokenizer) -> PolicyValueModel:
        """From the config: the LM (tiny or pretrained, vocabulary bridged), the critic if separate, the value head.

        Initialisation is seeded by ``cfg.seed`` (without disturbing the global RNG), so every process that builds
        the same config gets the same weights.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            lm = load_lm(cfg.model, tokenizer)
            # critic-free estimators (ppo.advantage grpo / rloo) allocate no critic trunk
            separate = cfg.model.critic == "separate" and cfg.ppo.advantage == "gae"
            critic = resolve_trunk(load_lm(cfg.model, tokenizer, check=False)) if separate else None
            return cls(lm, critic, precision=cfg.model.precision, vocab_size=tokenizer.n_vocab)

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        compute_entropy: bool = True,
        chunk_size: int = 1024,
        temperature: float = 1.0,
    ) -> PolicyOutput:
        """Log-probs, entropy and values of every (action) position in one causal forward.

        Args:
            input_ids: (B, T) token ids, left- or right-padded.
            attention_mask: (B, T) 1 for real tokens.
            action_mask: (B, T) 1 where the token was chosen by the policy; log-probs / entropy are computed only
                there. None = every position 1..T-1.
            compute_entropy: False skips the entropy (zeros).
            chunk_size: rows of the LM-head block; a 100k vocabulary never materialises (B*T, V) logits.
            temperature: the LM's logits are divided by it after the head, the model's logit scale and soft-cap --
                the generation engine's order -- so log-probs of sampled tokens equal the behaviour log-probs of
                rollouts at that temperature (the PPO learner passes ``rollout.temperature``). Values do not
                depend on it.

        Returns:
            :class:`PolicyOutput` with (B, T) float32 tensors aligned as documented there; log-probs and entropy
            are those of the tempered distribution.

        Raises:
            ConfigError: a temperature that is not positive and finite.
        """
        with autocast_context(self.autocast_dtype(), self.device):
            h = _trunk_forward(self.trunk, input_ids, attention_mask)  # (B, T, H)
            hc = h if self.critic is None else _trunk_forward(self.critic, input_ids, attention_mask)
        # 1. values: V(x_<t) is the head at position t-1
        v = self.value_head(hc.float()).squeeze(-1)  # (B, T)
        values = F.pad(v[:, :-1], (1, 0))
        # 2. log-probs / entropy at action positions only
        logprobs, entropy = self._token_logprobs(h, input_ids, action_mask, compute_entropy, chunk_size, temperature)
        return PolicyOutput(logprobs=logprobs, entropy=entropy, values=values)

    def bootstrap_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) float32 ``V(state after the last real token)``: the bootstrap value of a truncated episode."""
        with autocast_context(self.autocast_dtype(), self.device):
            trunk = self.critic if self.critic is not None else self.trunk
            h = _trunk_forward(trunk, input_ids, attention_mask)  # (B, T, H)
        last = last_token_index(attention_mask)
        return self.value_head(h[torch.arange(h.shape[0], device=h.device), last].float()).squeeze(-1)

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """HF-format LM (``config.json`` + ``model.safetensors``), ``value_head.safetensors``, ``critic/`` if
        separate and ``rlchat_policy.json``. Safetensors only: nothing is pickled."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(d)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}, d / VALUE_HEAD_FILE
        )
        if self.critic is not None:
            self.critic.save_pretrained(d / CRITIC_DIR)
        meta = {"critic": "separate" if self.critic is not None else "shared", "vocab_size": self.vocab_size}
        (d / POLICY_META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path, cfg: Config | None = None) -> PolicyValueModel:
        """Load what :meth:`save_pretrained` wrote.

        Args:
            directory: the model directory (or a checkpoint directory holding it).
            cfg: supplies ``model.precision`` (default ``auto``).

        Raises:
            CheckpointError: missing or unreadable files.
        """
        from transformers import AutoModel, AutoModelForCausalLM

        d = Path(directory)
        if not (d / "config.json").is_file():
            raise CheckpointError(
                f"{d}: no config.json; expected a directory written by PolicyValueModel.save_pretrained"
            )
        try:
            lm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
            critic = (
                AutoModel.from_pretrained(d / CRITIC_DIR, dtype=torch.float32) if (d / CRITIC_DIR).is_dir() else None
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{d}: cannot load the model weights ({e})") from None
        meta_file = d / POLICY_META_FILE
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        precision = cfg.model.precision if cfg is not None else "auto"
        model = cls(lm, critic, precision=precision, vocab_size=meta.get("vocab_size"))
        head_file = d / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise CheckpointError(f"{d}: {VALUE_HEAD_FILE} is missing; the checkpoint is incomplete")
        model.value_head.load_state_dict(load_file(head_file))
        return model


# --------------------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------------------


def _use_chat_pad_row(trunk: Any, tokenizer: ChatTokenizer) -> None:
    """Make the chat tokenizer's pad id the input embedding's ``padding_idx`` (the row that gets no gradient).

    Encoders set it to their own pad id (0 for BERT / DistilBERT, 1 for RoBERTa), which under the chat tokenizer is
    an ordinary token id ("!" / '"'): ``nn.Embedding`` would never update that row, so the token could not learn.
    """
    emb = trunk.get_input_embeddings()
    if getattr(emb, "padding_idx", None) is not None and emb.padding_idx != tokenizer.pad_id:
        emb.padding_idx = tokenizer.pad_id


def is_encoder(config: Any) -> bool:
    """Whether a model config is encoder-only (scored from its first token) rather than a causal LM."""
    return str(getattr(config, "model_type", "")) in ENCODER_MODEL_TYPES


class RewardModel(nn.Module):
    """A scalar head on any ``AutoModel`` trunk, trained on preference pairs (``rlchat rm``).

    Attributes:
        trunk: the base model (encoder or causal LM trunk), fp32.
        score_head: ``nn.Linear(hidden, 1)``.
        causal: True for causal trunks (score at the last real token), False for encoders (first token).
        hf_tokenizer: the pretrained model's own Hugging Face tokenizer when it has one that is not ours (e.g. a
            BERT WordPiece); texts must then be encoded with :meth:`tokenize`, not with the chat tokenizer.
    """

    def __init__(self, trunk: Any, hf_tokenizer: Any = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.causal = not is_encoder(trunk.config)
        hidden = int(trunk.config.get_text_config().hidden_size)
        self.score_head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.score_head.weight.normal_(0.0, 1.0 / math.sqrt(hidden + 1))
            self.score_head.bias.zero_()
        self.hf_tokenizer = hf_tokenizer

    @classmethod
    def build(cls, cfg: Config, tokenizer: ChatTokenizer) -> RewardModel:
        """``cfg.rm.name_or_path`` (an encoder or a causal LM) or, when empty, a tiny trunk of ``cfg.model.arch``.

        A pretrained model that ships its own tokenizer files (and is not an rlchat export) keeps that tokenizer
        (:attr:`hf_tokenizer`); otherwise its embedding is bridged to the chat tokenizer like the policy's.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            if cfg.rm.init_from:
                # InstructGPT's recipe: the SFT policy's trunk already reads the task (here: the arithmetic behind a
                # wrong answer); a reward model learned on top of it generalises far better than one from scratch.
                from rlchat.core.checkpoint import load_policy

                if cfg.rm.name_or_path:
                    raise ConfigError(
                        f"rm.init_from={cfg.rm.init_from!r} and rm.name_or_path={cfg.rm.name_or_path!r}: both name "
                        "the reward model's starting trunk; keep one"
                    )
                policy, _, _ = load_policy(cfg.rm.init_from, expect_tokenizer=tokenizer)
                return cls(resolve_trunk(policy.lm))
            path = cfg.rm.name_or_path
            if not path:
                return cls(resolve_trunk(build_tiny_lm(cfg.model, tokenizer.n_vocab)))
            from transformers import AutoModel, AutoTokenizer

            try:
                trunk = AutoModel.from_pretrained(path, dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise CheckpointError(
                    f"rm.name_or_path={path!r}: cannot load a model ({e}); expected a local directory with "
                    "config.json + weights, or a hub id available in the local Hugging Face cache"
                ) from None
            hf_tok = None
            if not (Path(path) / "rlchat_tokenizer.json").is_file() and _vocabulary_matches(path, tokenizer) is False:
                hf_tok = AutoTokenizer.from_pretrained(path)
            if hf_tok is None:
                bridge_vocabulary(trunk, tokenizer, path, cfg.model.reinit_embeddings)
                _use_chat_pad_row(trunk, tokenizer)
            return cls(trunk, hf_tok)

    @property
    def device(self) -> torch.device:
        return self.score_head.weight.device

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores.

        Args:
            input_ids: (B, T) ids (chat-tokenizer ids, or :attr:`hf_tokenizer` ids when set).
            attention_mask: (B, T) 1 for real tokens; any padding side for causal trunks, right padding for encoders.
            reply_mask: unused (the score is read at one token); accepted so that every reward model takes the
                scorer's arguments (:class:`ImplicitRewardModel` sums over it).

        Returns:
            (B,) float32 scores: from the last real token for causal LMs, the first token for encoders.
        """
        h = _trunk_forward(self.trunk, input_ids, attention_mask, causal=self.causal)  # (B, T, H)
        if self.causal:
            idx = last_token_index(attention_mask)
        else:
            idx = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        return self.score_head(h[torch.arange(h.shape[0], device=h.device), idx].float()).squeeze(-1)

    def tokenize(
        self, texts: list[str], tokenizer: ChatTokenizer, max_length: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode plain texts for :meth:`forward`, right-padded: with :attr:`hf_tokenizer` if set, else ``tokenizer``.

        Returns:
            input_ids (B, T) and attention_mask (B, T) int64 on the model's device.
        """
        if self.hf_tokenizer is not None:
            enc = self.hf_tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        rows = [tokenizer.encode(t)[:max_length] or [tokenizer.pad_id] for t in texts]
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def save_pretrained(self, directory: str | Path) -> None:
        """HF-format trunk, ``score_head.safetensors``, the HF tokenizer when it has one, and a small meta file."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.trunk.save_pretrained(d)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.score_head.state_dict().items()}, d / SCORE_HEAD_FILE
        )
        if self.hf_tokenizer is not None:
            self.hf_tokenizer.save_pretrained(d)
        meta = {"causal": self.causal, "hf_tokenizer": self.hf_tokenizer is not None}
        (d / REWARD_META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RewardModel:
        """Load what :meth:`save_pretrained` wrote.

        Raises:
            CheckpointError: missing or unreadable files.
        """
        from transformers import AutoModel, AutoTokenizer

        d = Path(directory)
        head_file = d / SCORE_HEAD_FILE
        if not (d / "config.json").is_file() or not head_file.is_file():
            raise CheckpointError(
                f"{d}: expected config.json and {SCORE_HEAD_FILE} written by RewardModel.save_pretrained"
            )
        meta_file = d / REWARD_META_FILE
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        try:
            trunk = AutoModel.from_pretrained(d, dtype=torch.float32)
            hf_tok = AutoTokenizer.from_pretrained(d) if meta.get("hf_tokenizer") else None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{d}: cannot load the reward model ({e})") from None
        model = cls(trunk, hf_tok)
        model.score_head.load_state_dict(load_file(head_file))
        return model


IMPLICIT_REFERENCE_DIR = "reference"
"""Sub-directory of an implicit reward model's checkpoint holding its frozen starting LM (the log-ratio's base)."""


class ImplicitRewardModel(nn.Module):
    """A causal LM as a reward model: ``r(x, y) = beta * sum_t log(pi(y_t | ...) / pi_start(y_t | ...))``.

    DPO's implicit reward (Rafailov et al. 2023), used as an explicit reward model as in PRIME (Cui et al. 2025)
    ("implicit PRM"). Why beside :class:`RewardModel`: a scalar head sees a reply once, at its last token, and on
    the arithmetic task a 2-layer trunk trained that way ranks a nearby wrong number barely above chance (61-64%,
    docs/ppo.md), although the same trunk *generates* the right number: the log-ratio keeps the LM head's
    per-token supervision, so the Bradley-Terry loss on these scores (which is the DPO loss) teaches the model
    which digits are right, not a pooled feature. The reference is the starting LM, frozen and saved with the
    checkpoint (``reference/``) so the scorer needs nothing else.

    Attributes:
        policy: the trained LM (:class:`PolicyLM`).
        reference: its frozen starting copy.
        beta: scale of the log-ratio.
    """

    causal = True
    hf_tokenizer = None

    def __init__(self, policy: PolicyLM, reference: PolicyLM | None = None, beta: float = 0.1) -> None:
        super().__init__()
        self.policy = policy
        self.reference = reference if reference is not None else policy.frozen_copy()
        self.reference.requires_grad_(False)
        self.beta = float(beta)

    @classmethod
    def build(cls, cfg: Config, tokenizer: ChatTokenizer) -> ImplicitRewardModel:
        """From ``cfg.rm.init_from`` (a policy checkpoint: the usual start), ``cfg.rm.name_or_path`` (a causal LM) or
        a tiny LM of ``cfg.model.arch``; the reference is a frozen copy of that start.

        Raises:
            ConfigError: both starts given, or ``name_or_path`` is an encoder.
        """
        rm = cfg.rm
        if rm.init_from and rm.name_or_path:
            raise ConfigError(
                f"rm.init_from={rm.init_from!r} and rm.name_or_path={rm.name_or_path!r}: both name the reward "
                "model's starting LM; keep one"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            if rm.init_from:
                from rlchat.core.checkpoint import load_policy

                loaded, _, _ = load_policy(rm.init_from, expect_tokenizer=tokenizer)
                lm = loaded.lm
            else:
                if rm.name_or_path:
                    from transformers import AutoConfig

                    try:
                        encoder = is_encoder(AutoConfig.from_pretrained(rm.name_or_path))
                    except (OSError, ValueError):
                        encoder = False  # load_lm says what is wrong with the path
                    if encoder:
                        raise ConfigError(
                            f"rm.kind=implicit with rm.name_or_path={rm.name_or_path!r}: the implicit reward is a "
                            "causal LM's log-ratio and this is an encoder; use a causal LM, or rm.kind=scalar"
                        )
                lm = load_lm(dataclasses.replace(cfg.model, name_or_path=rm.name_or_path), tokenizer)
        return cls(PolicyLM(lm, precision=cfg.model.precision, vocab_size=tokenizer.n_vocab), beta=rm.beta)

    @property
    def trunk(self) -> nn.Module:
        return self.policy.trunk

    @property
    def lm(self) -> PreTrainedModel:
        return self.policy.lm

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def train(self, mode: bool = True) -> ImplicitRewardModel:
        super().train(mode)
        self.reference.eval()  # dropout never perturbs the base of the ratio
        return self

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores.

        Args:
            input_ids: (B, T) chat-tokenizer ids, right-padded.
            attention_mask: (B, T) 1 for real tokens.
            reply_mask: (B, T) 1 on the tokens to score (the reply); None = every real token after the first.
                Training leaves it None: the prompt's terms are equal in both replies of a pair and cancel.

        Returns:
            (B,) float32 ``beta * sum_t mask_t * (log pi - log pi_start)``.
        """
        mask = attention_mask if reply_mask is None else reply_mask * attention_mask
        lp = self.policy.action_logprobs(input_ids, attention_mask, mask)  # (B, T), 0 off the mask
        with torch.no_grad():
            ref = self.reference.action_logprobs(input_ids, attention_mask, mask)  # (B, T)
        return self.beta * (lp - ref).sum(-1)

    def save_pretrained(self, directory: str | Path) -> None:
        """The trained LM (HF format), the reference in ``reference/``, and the meta file saying ``implicit``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.policy.lm.save_pretrained(d)
        self.reference.lm.save_pretrained(d / IMPLICIT_REFERENCE_DIR)
        meta = {
            "kind": "implicit",
            "beta": self.beta,
            "vocab_size": self.policy.vocab_size,  # the softmax's ids (a padded head has more rows)
            "causal": True,
            "hf_tokenizer": False,
        }
        (d / REWARD_META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path, cfg: Config | None = None) -> ImplicitRewardModel:
        """Load what :meth:`save_pretrained` wrote.

        Raises:
            CheckpointError: missing or unreadable files.
        """
        from transformers import AutoModelForCausalLM

        d = Path(directory)
        meta = json.loads((d / REWARD_META_FILE).read_text(encoding="utf-8"))
        precision = cfg.model.precision if cfg is not None else "auto"
        try:
            lms = [
                AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (d, d / IMPLICIT_REFERENCE_DIR)
            ]
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"{d}: cannot load the implicit reward model ({e}); expected config.json + weights and "
                f"{IMPLICIT_REFERENCE_DIR}/ written by ImplicitRewardModel.save_pretrained"
            ) from None
        vocab = meta.get("vocab_size")
        policy, reference = (PolicyLM(lm, precision=precision, vocab_size=vocab) for lm in lms)
        return cls(policy, reference.eval(), beta=float(meta.get("beta", 0.1)))


def reward_model_from_pretrained(
    directory: str | Path, cfg: Config | None = None
) -> RewardModel | ImplicitRewardModel:
    """Load a reward-model checkpoint's weights of either kind (the meta file says which)."""
    meta_file = Path(directory) / REWARD_META_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    if meta.get("kind") == "implicit":
        return ImplicitRewardModel.from_pretrained(directory, cfg)
    return RewardModel.from_pretrained(directory)


def build_reward_model(cfg: Config, tokenizer: ChatTokenizer) -> RewardModel | ImplicitRewardModel:
    """The reward model ``cfg.rm.kind`` names, before training."""
    if cfg.rm.kind == "implicit":
        return ImplicitRewardModel.build(cfg, tokenizer)
    return RewardModel.build(cfg, tokenizer)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total
