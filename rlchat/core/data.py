"""Conversation data: read, normalise, validate, filter, deduplicate and split chat records. No Ray here.

Every data path of rlchat goes through this module: ``rlchat data prepare`` (whose Ray Data job in
:mod:`rlchat.distributed.prepare` calls these functions inside its map tasks), and :func:`load_records`, which the SFT,
reward-model and PPO stages use to get :class:`Record` objects from a built-in data set, a prepared directory or a
raw file. One implementation of parsing, validation, filtering, deduplication and splitting serves both, so a
prepared directory and a raw file read directly give the same records and the same train/val split.

Formats (auto-detected per file from its first record, or forced with ``--format`` / ``data.format``):

==============  ==========================================================================================
``messages``    OpenAI chat: ``{"messages": [{"role": "user", "content": "Hi"}, ...]}``
``sharegpt``    ``{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}``
``alpaca``      ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional)
``pair``        ``{"prompt": "...", "response": "..."}`` (or ``"completion"``)
``preference``  ``{"prompt": "...", "chosen": "...", "rejected": "..."}`` (strings or message lists)
==============  ==========================================================================================

Optional metadata on any record: ``quality`` (number), ``safety`` (string), ``reference`` (the answer a reward
checks against), ``system`` (a system prompt), ``meta`` (an object); any other key is kept in ``Record.meta``.

Prompt-only records. A PPO prompt set, an eval set or the input of ``rlchat generate`` needs no reply: the policy
writes it. So a record may leave the reply out -- ``{"prompt": "...", "reference": "..."}`` (pair), a ``messages``
/ ``conversations`` list that ends with the user turn to answer, an alpaca ``instruction`` without ``output`` --
wherever the caller passes ``require_reply=False`` (:func:`parse_record`, threaded through :func:`process_chunk`,
:func:`collect`, :func:`read_records` and :func:`load_records`, which decides it from the role the data plays in
the config: see :func:`reply_required`). SFT and reward-model data keep requiring a reply, and a prompt-only record
there fails with ``path:line`` like any other bad record. ``rlchat data prepare`` accepts prompt-only records (it
does not know which stage the files are for); loading the prepared directory as SFT data refuses them, naming the
``path:line`` the record came from.

The pipeline, in order (each step is a function here):

1. :func:`iter_chunks` reads raw lines (bytes, with their line numbers) in chunks; a line longer than
   ``max_line_bytes`` is measured but not kept.
2. :func:`process_chunk` decodes each line (:func:`decode_line`: UTF-8, BOM, NUL bytes, JSON), parses and
   validates it into a :class:`Record` (:func:`parse_record`, which normalises text and roles), tokenizes it
   (:func:`tokenize_record`), finds the first filter it fails (:func:`filter_reason`) and computes its
   deduplication key and MinHash signature. Pure and per-chunk: this is what Ray Data runs in parallel.
3. :class:`Collector` consumes rows in input order: applies the error policy (``fail`` raises the first error
   as a :class:`~rlchat.core.errors.DataError` naming ``path:line``; ``skip`` records every skipped line with its
   reason), enforces one format per file, counts filtered records by reason and removes exact and near
   duplicates (:class:`Deduplicator`, MinHash LSH from ``datasketch``). The first occurrence wins.
4. :func:`split_rows` assigns the seeded train/val split (see its docstring for why it is hash-based).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import math
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from rlchat.core.errors import DataError

if TYPE_CHECKING:
    from rlchat.core.config import Config, DataConfig
    from rlchat.core.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

Message = dict[str, str]

FORMATS = ("messages", "sharegpt", "alpaca", "pair", "preference")
"""Record formats, in the order auto-detection tries them (see :func:`detect_format`)."""
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
"""Accepted role names (case-insensitive) and the role each one becomes."""

MAX_LINE_BYTES = 1 << 20
"""Default of ``data.max_line_bytes``: the longest accepted JSONL line (1 MiB, ~250k tokens). Longer lines are
reported as bad records and never loaded into memory; the config key raises the limit for really long records."""
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
BUILTIN = ("task", "chat", "prefs")
"""Names of the built-in demo data sets (``builtin:task`` etc., files in ``rlchat/demo_data/``)."""
CHUNK_LINES = 512
"""Lines per chunk handed to one :func:`process_chunk` call (one Ray Data task processes one chunk)."""
MINHASH_PERM = 128
"""MinHash permutations: the Jaccard estimate's standard error is about 1/sqrt(128) ~ 0.09."""
MINHASH_SEED = 1
SHINGLE_CHARS = 5
"""Near-dedup shingles are character 5-grams of the lower-cased, whitespace-collapsed text: chat turns are often
shorter than the word 5-grams used for web documents, and character shingles still see small edits."""

_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# C0 controls except tab and newline, DEL, C1 controls, and stray BOM / zero-width no-break spaces.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_TRAILING_WS_RE = re.compile(r"[ \t]+\n")
_BLANK_LINES_RE = re.compile(r"\n{3,}")
_PREFIX_KEYS = {
    "messages": ("messages", "system"),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system"),
    "pair": ("prompt", "response", "completion", "system"),
    "preference": ("prompt", "chosen", "rejected", "system", "messages"),
}
_META_ALIASES = {
    "quality": "quality",
    "quality_score": "quality",
    "safety": "safety",
    "safety_rating": "safety",
    "reference": "reference",
    "reference_answer": "reference",
}

# ---------------------------------------------------------------------------------------------------------------
# Records and their Parquet schema
# ---------------------------------------------------------------------------------------------------------------

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
RECORD_SCHEMA = pa.schema(
    [
        ("messages", MESSAGES_TYPE),
        ("chosen", MESSAGES_TYPE),
        ("rejected", MESSAGES_TYPE),
        ("reference", pa.string()),
        ("quality", pa.float64()),
        ("safety", pa.string()),
        ("source", pa.string()),
        ("format", pa.string()),
        ("meta", pa.string()),  # JSON text: free-form metadata has no fixed schema
    ]
)
"""Columns of one :class:`Record` as a Parquet row (:meth:`Record.to_row`)."""
TOKEN_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),  # conversation: the whole rendered conversation
        ("loss_mask", pa.list_(pa.int8())),  # conversation: 1 on assistant tokens (see ChatTokenizer)
        ("prompt_ids", pa.list_(pa.int32())),  # render_prompt(prompt_messages()): ends with <|assistant|>
        ("chosen_ids", pa.list_(pa.int32())),  # preference: prompt + chosen rendered
        ("rejected_ids", pa.list_(pa.int32())),  # preference: prompt + rejected rendered
        ("turn_tokens", pa.list_(pa.int32())),  # tokens of each message's text (prompt, chosen, rejected)
        ("n_tokens", pa.int32()),  # conversation length (preference: the longer side)
        ("n_turns", pa.int32()),  # messages (preference: prompt + chosen)
    ]
)
"""Token columns :func:`tokenize_record` adds; prepared Parquet files hold RECORD_SCHEMA + TOKEN_SCHEMA."""
PREPARED_SCHEMA = pa.schema(list(RECORD_SCHEMA) + list(TOKEN_SCHEMA))
WORK_SCHEMA = pa.schema(
    list(PREPARED_SCHEMA)
    + [
        ("path", pa.string()),
        ("line", pa.int64()),
        ("error", pa.string()),  # why the line is bad (without the "path:line: " prefix), else null
        ("filter", pa.string()),  # the first filter the record fails, else null
        ("dedup_key", pa.string()),
        ("minhash", pa.list_(pa.uint64())),  # MinHash signature when near-dedup is on
    ]
)
"""Rows :func:`process_chunk` returns: prepared columns plus the bookkeeping the :class:`Collector` needs."""


@dataclass
class Record:
    """One normalised, validated conversation or preference pair.

    Attributes:
        messages: the conversation; for a preference record, the shared prompt messages.
        chosen: preference records: the preferred continuation (assistant message(s)).
        rejected: preference records: the dispreferred continuation.
        reference: a reference answer for rewards (the demo task: the checked answer).
        quality: optional quality score (``data.min_quality`` filters on it).
        safety: optional safety rating, kept as given.
        source: ``path:line`` the record came from (error messages and stats point here).
        format: the detected or forced input format (one of :data:`FORMATS`).
        meta: every other key of the input record, e.g. ``id``, ``source``, ``category``.
    """

    messages: list[Message]
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None
    reference: str | None = None
    quality: float | None = None
    safety: str | None = None
    source: str = ""
    format: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_preference(self) -> bool:
        return self.chosen is not None and self.rejected is not None

    @property
    def has_reply(self) -> bool:
        """Whether the record carries a reply to learn from (False: a prompt-only record, see the module doc)."""
        return self.is_preference or any(m["role"] == "assistant" for m in self.messages)

    def prompt_messages(self) -> list[Message]:
        """The context a policy answers (preference: the shared prompt).

        A conversation ending with an assistant message is answered anew from the messages before that reply; one
        ending with a user (or system) message -- a prompt-only record, or a multi-turn prompt such as
        ``[user, assistant, user]`` -- is answered as a whole: cutting it at its last assistant message would drop
        the very turn the policy is asked to answer.
        """
        if self.is_preference or not self.messages or self.messages[-1]["role"] != "assistant":
            return list(self.messages)
        return list(self.messages[:-1])

    def to_row(self) -> dict[str, Any]:
        """A Parquet row in :data:`RECORD_SCHEMA` (``meta`` becomes JSON text)."""
        return {
            "messages": [dict(m) for m in self.messages],
            "chosen": None if self.chosen is None else [dict(m) for m in self.chosen],
            "rejected": None if self.rejected is None else [dict(m) for m in self.rejected],
            "reference": self.reference,
            "quality": self.quality,
            "safety": self.safety,
            "source": self.source,
            "format": self.format,
            "meta": json.dumps(self.meta, ensure_ascii=False, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Record:
        """Inverse of :meth:`to_row`; extra columns (token ids, bookkeeping) are ignored."""

        def msgs(v: Any) -> list[Message] | None:
            return None if v is None else [{"role": m["role"], "content": m["content"]} for m in v]

        meta = row.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        quality = row.get("quality")
        return cls(
            messages=msgs(row["messages"]) or [],
            chosen=msgs(row.get("chosen")),
            rejected=msgs(row.get("rejected")),
            reference=row.get("reference"),
            quality=None if quality is None else float(quality),
            safety=row.get("safety"),
            source=row.get("source") or "",
            format=row.get("format") or "",
            meta=dict(meta),
        )


@dataclass(frozen=True)
class Skipped:
    """A bad input line (or file) that ``on_error=skip`` left out."""

    source: str
    """``path:line`` (or ``path`` for a file-level problem such as an empty file)."""
    reason: str


@dataclass
class ReadResult:
    """What :func:`read_records` returns."""

    records: list[Record]
    skipped: list[Skipped]
    counts_by_format: dict[str, int]


# ---------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Unicode NFC, newlines to ``\\n``, control characters removed, trailing spaces and blank-line runs trimmed.

    Why: the same text typed on two systems (composed vs decomposed accents, CRLF vs LF) must tokenize and
    deduplicate identically, and control characters are invisible noise a model should never learn to emit.
    Inner spacing and tabs are kept: they carry meaning in code.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    # controls out before composing: after it, a control character between a letter and its accent left them
    # apart, and a second pass (a store keeps normalised text, its reader normalises again) composed them
    text = unicodedata.normalize("NFC", _CONTROL_RE.sub("", text))
    text = _TRAILING_WS_RE.sub("\n", text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def normalize_role(role: str) -> str | None:
    """``human``/``gpt``/``bot``/... -> ``user``/``assistant``; None for an unknown role."""
    return ROLE_ALIASES.get(role.strip().lower())


# ---------------------------------------------------------------------------------------------------------------
# Reading raw lines
# ---------------------------------------------------------------------------------------------------------------


def _jtype(value: Any) -> str:
    """The JSON type of a parsed value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: Any, limit: int = 40) -> str:
    """A short rendering of a found value: its JSON type and (truncated) text."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{_jtype(value)} ({text})"


def is_data_file(path: Path) -> bool:
    return path.name.endswith(DATA_SUFFIXES)


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, directories as their ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` files (recursive, sorted).

    Raises:
        DataError: a path does not exist, a file has an unsupported extension, or nothing is left to read.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_data_file(f))
            if not found:
                raise DataError(
                    f"{p}: directory holds no data files; expected files ending in {', '.join(DATA_SUFFIXES)}"
                )
            files.extend(found)
        elif p.is_file():
            if not is_data_file(p):
                raise DataError(
                    f"{p}: unsupported file type; expected a file ending in {', '.join(DATA_SUFFIXES)} "
                    "(JSON Lines, optionally gzipped, or Parquet)"
                )
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory; pass existing data files or directories")
    if not files:
        raise DataError("no input files given; pass one or more .jsonl / .jsonl.gz / .parquet files or directories")
    return files


class FileReadError(DataError):
    """A file cannot be read or decompressed past some line (``line`` is 0 when it cannot be opened)."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}" if line else f"{path}: {reason}")
        self.line = line
        self.reason = reason


def iter_raw_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield ``(line number, bytes or None, size in bytes)`` for each line of a ``.jsonl`` / ``.jsonl.gz`` file.

    A line longer than ``max_line_bytes`` comes back as ``None`` with its size: it is read in 1 MiB pieces and
    dropped, so a corrupt multi-GB "line" never sits in memory.

    Raises:
        FileReadError: the file cannot be opened or decompressed (names the line reached).
    """
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    line = 0
    try:
        with opener(path, "rb") as f:
            while True:
                data = f.readline(max_line_bytes + 1)
                if not data:
                    return
                line += 1
                if len(data) > max_line_bytes and not data.endswith(b"\n"):
                    size = len(data)
                    while True:
                        more = f.readline(1 << 20)
                        size += len(more)
                        if not more or more.endswith(b"\n"):
                            break
                    yield line, None, size
                else:
                    yield line, data, len(data)
    except (OSError, EOFError, zlib.error) as e:
        raise FileReadError(
            path,
            line + 1 if line else 0,
            f"cannot read the file ({e.__class__.__name__}: {e}); expected a readable "
            f"{'gzip-compressed ' if path.name.endswith('.gz') else ''}JSON Lines file",
        ) from None


def iter_parquet_rows(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """Rows of a Parquet file as JSON lines (``(row number, bytes, size)``), so they take the JSONL path.

    Columns this module writes besides the record (token ids, ``format``) are dropped; ``meta`` JSON text is
    unpacked, so a prepared file can be read back as raw input.
    """
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise FileReadError(
            path, 0, f"cannot read Parquet ({e.__class__.__name__}: {e}); expected a Parquet file"
        ) from None
    drop = set(TOKEN_SCHEMA.names) | {"format"}
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            obj = {k: v for k, v in row.items() if v is not None and k not in drop}
            if isinstance(obj.get("meta"), str):
                with contextlib.suppress(json.JSONDecodeError):
                    obj["meta"] = json.loads(obj["meta"])
            data = json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8")
            yield n, data, len(data)


def iter_chunks(
    paths: Sequence[Path], chunk_lines: int = CHUNK_LINES, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[dict[str, Any]]:
    """Read files into chunks of raw lines: the unit of work of :func:`process_chunk` (and of one Ray task).

    Blank lines are dropped here. A file with no non-blank line yields a chunk whose ``file_error`` says it is
    empty; a read failure yields one with the failure (at the line reached), after the lines read before it.

    Args:
        paths: the input files.
        chunk_lines: lines per chunk.
        max_line_bytes: ``data.max_line_bytes``; longer lines come back as ``None`` data. Every chunk records the
            limit it was read with, so :func:`process_chunk` reports the limit that actually applied.

    Yields:
        ``{"path": str, "lines": list[int], "data": list[bytes | None], "sizes": list[int],
        "file_error": str | None, "error_line": int, "max_line_bytes": int}``
    """

    def chunk(path: str, lines: list[int], data: list[bytes | None], sizes: list[int]) -> dict[str, Any]:
        return {
            "path": path,
            "lines": lines,
            "data": data,
            "sizes": sizes,
            "file_error": None,
            "error_line": 0,
            "max_line_bytes": max_line_bytes,
        }

    for path in paths:
        name = str(path)
        lines: list[int] = []
        data: list[bytes | None] = []
        sizes: list[int] = []
        n_records = 0
        source = iter_parquet_rows(path) if path.name.endswith(".parquet") else iter_raw_lines(path, max_line_bytes)
        try:
            for line, raw, size in source:
                if raw is not None and not raw.strip(b" \t\r\n"):
                    continue
                if raw is not None and line == 1 and raw.startswith(_BOM) and not raw[3:].strip(b" \t\r\n"):
                    continue
                lines.append(line)
                data.append(raw)
                sizes.append(size)
                n_records += 1
                if len(lines) >= chunk_lines:
                    yield chunk(name, lines, data, sizes)
                    lines, data, sizes = [], [], []
        except FileReadError as e:
            if lines:
                yield chunk(name, lines, data, sizes)
            yield {**chunk(name, [], [], []), "file_error": e.reason, "error_line": e.line}
            continue
        if lines:
            yield chunk(name, lines, data, sizes)
        if n_records == 0:
            yield {
                **chunk(name, [], [], []),
                "file_error": "empty file (no records); expected one JSON object per line",
            }


def _suggest_limit(size: int) -> int:
    """A round ``data.max_line_bytes`` (a power of two) that admits a line of ``size`` bytes."""
    return 1 << max(size - 1, 1).bit_length()


def decode_line(data: bytes | None, size: int, line: int, max_line_bytes: int = MAX_LINE_BYTES) -> dict[str, Any]:
    """Bytes of one line -> the JSON object on it.

    Accepts a UTF-8 BOM at the start of a line and CRLF endings.

    Raises:
        ValueError: with the reason (without ``path:line``) for an oversized line, a UTF-16 file, NUL bytes,
            invalid UTF-8, invalid JSON or a JSON value that is not an object.
    """
    if data is None:
        raise ValueError(
            f"line is {size:,} bytes; expected at most {max_line_bytes:,} bytes per record "
            f"(data.max_line_bytes={max_line_bytes}); if such long records are intended, raise the limit in the "
            f"config (data: {{max_line_bytes: {_suggest_limit(size)}}}, or the override "
            f"data.max_line_bytes={_suggest_limit(size)}), otherwise split the conversation or remove the line"
        )
    if line == 1 and data.startswith(_UTF16_BOMS):
        raise ValueError("the file is UTF-16 encoded; expected UTF-8; convert it, e.g. iconv -f UTF-16 -t UTF-8")
    if data.startswith(_BOM):
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(
            f"NUL byte at byte {nul + 1}; expected UTF-8 JSON text (is this a binary or UTF-16 file? "
            'write the character as the JSON escape "\\u0000" if it is really meant)'
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"bytes are not valid UTF-8 at byte {e.start + 1} (0x{data[e.start]:02x}); expected UTF-8 text; "
            "re-encode the file, e.g. iconv -f latin1 -t utf-8"
        ) from None
    try:
        obj = json.loads(text.rstrip())
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}; expected one JSON object per line") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply; expected one flat JSON object per line") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object ({{...}}) per line, found {_show(obj)}")
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------------------------


class _Bad(ValueError):
    """A validation failure: field, expected, found (and a fix); rendered without the path:line prefix."""

    def __init__(self, field: str, expected: str, found: str, fix: str = "") -> None:
        super().__init__(f"{field}: expected {expected}, found {found}" + (f"; {fix}" if fix else ""))


def detect_format(obj: dict[str, Any]) -> str | None:
    """The format a record's keys point to (null values count as absent), or None.

    The reply keys are not needed to recognise a format: ``{"prompt": ...}`` is a prompt-only ``pair`` and
    ``{"instruction": ...}`` a prompt-only ``alpaca`` record, so that a file mixing records with and without
    replies is one format, and a prompt-only record where a reply is required is told "the reply is missing" rather
    than "unknown format". A ``prompt`` with only one of ``chosen`` / ``rejected`` stays unrecognised: it is a
    broken preference pair, not a prompt.
    """

    def has(k: str) -> bool:
        return obj.get(k) is not None

    if has("chosen") and has("rejected"):
        return "preference"
    if has("messages"):
        return "messages"
    if has("conversations"):
        return "sharegpt"
    if has("instruction"):
        return "alpaca"
    if has("prompt") and not (has("chosen") or has("rejected")):
        return "pair"
    return None


def _text(value: Any, field: str) -> str:
    """A message body: a string, or OpenAI content parts ``[{"type": "text", "text": ...}]``; normalised."""
    if isinstance(value, list):
        parts: list[str] = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _Bad(f"{field}[{j}]", 'a text part {"type": "text", "text": "..."}', _show(part))
            parts.append(part["text"])
        value = "\n".join(parts)
    if not isinstance(value, str):
        raise _Bad(field, "a string", _show(value))
    text = normalize_text(value)
    if not text:
        raise _Bad(field, "non-empty text", "an empty string after normalisation" if value else "an empty string")
    return text


def _messages(value: Any, field: str, role_keys: tuple[str, ...], content_keys: tuple[str, ...]) -> list[Message]:
    if not isinstance(value, list):
        raise _Bad(field, "a list of message objects", _show(value))
    if not value:
        raise _Bad(field, "at least one message", "an empty list")
    out: list[Message] = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise _Bad(where, f"an object with {role_keys[0]!r} and {content_keys[0]!r}", _show(m))
        rk = next((k for k in role_keys if k in m), None)
        if rk is None:
            raise _Bad(where, f"a {role_keys[0]!r} key", f"keys {sorted(m)}")
        ck = next((k for k in content_keys if k in m), None)
        if ck is None:
            raise _Bad(where, f"a {content_keys[0]!r} key", f"keys {sorted(m)}")
        raw_role = m[rk]
        if not isinstance(raw_role, str):
            raise _Bad(f"{where}.{rk}", "a string role", _show(raw_role))
        role = normalize_role(raw_role)
        if role is None:
            raise _Bad(
                f"{where}.{rk}",
                f"one of {', '.join(ROLES)} (or an alias: {', '.join(k for k in ROLE_ALIASES if k not in ROLES)})",
                repr(raw_role),
            )
        out.append({"role": role, "content": _text(m[ck], f"{where}.{ck}")})
    return out


PROMPT_ONLY_FIX = (
    "prompt-only records are accepted as PPO / eval prompts (data.prompts, rlchat eval --data) and by "
    "`rlchat generate`, not as SFT or reward-model data; add the assistant reply, or use this file as data.prompts"
)
"""The fix a prompt-only record gets where a reply is required (SFT, reward-model data, ``rlchat data`` checks)."""


def _roles(messages: list[Message]) -> str:
    return f"roles [{', '.join(m['role'] for m in messages)}]"


def _require_assistant(messages: list[Message], field: str) -> None:
    """A preference side must hold a reply (prompt-only makes no sense for chosen / rejected)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad(field, "at least one assistant message to learn from", _roles(messages))


def _check_reply(messages: list[Message], field: str, require_reply: bool) -> None:
    """A conversation holds an assistant reply, or (``require_reply=False``) is a prompt ending with a user turn.

    Why the last message must be the user's in a prompt-only record: it is the turn the policy answers; a
    conversation of only a system prompt, or one ending with a system message, gives the policy nothing to reply to
    and is far more likely a truncated record than an intended prompt.
    """
    if any(m["role"] == "assistant" for m in messages):
        return
    if require_reply:
        raise _Bad(field, "at least one assistant message to learn from", _roles(messages), PROMPT_ONLY_FIX)
    if messages[-1]["role"] != "user":
        raise _Bad(
            field,
            "a prompt-only conversation to end with the user turn the policy answers",
            _roles(messages),
            "add the user message (or the assistant reply, for SFT data)",
        )


def check_reply(rec: Record, require_reply: bool = True) -> None:
    """Raise ``ValueError`` (field, expected, found; no ``path:line``) if ``rec`` lacks a reply that is required.

    What :func:`load_records` applies to a prepared directory (``rlchat data prepare`` keeps prompt-only records),
    with the same message :func:`parse_record` gives a raw file.
    """
    if not rec.is_preference:
        _check_reply(rec.messages, "messages", require_reply)


def _with_system(obj: dict[str, Any], messages: list[Message]) -> list[Message]:
    if obj.get("system") is None:
        return messages
    system = _text(obj["system"], "system")
    if messages and messages[0]["role"] == "system":
        raise _Bad("system", "one system prompt", "both a 'system' key and a leading system message")
    return [{"role": "system", "content": system}, *messages]


def _continuation(value: Any, field: str) -> list[Message]:
    """A preference side: a string (one assistant message), a message object, or a list of messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, field)}]
    if isinstance(value, dict):
        value = [value]
    msgs = _messages(value, field, ("role", "from"), ("content", "value"))
    _require_assistant(msgs, field)
    return msgs


def _parse_preference(obj: dict[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
    prompt_key = "prompt" if obj.get("prompt") is not None else "messages"
    raw_prompt = obj.get(prompt_key)
    if raw_prompt is None:
        # Implicit prompt (Anthropic HH style): chosen and rejected are whole conversations sharing a prefix.
        chosen = _messages(obj.get("chosen"), "chosen", ("role", "from"), ("content", "value"))
        rejected = _messages(obj.get("rejected"), "rejected", ("role", "from"), ("content", "value"))
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":  # the split is before the diverging reply
            n -= 1
        if n == 0:
            raise _Bad(
                "prompt",
                "a 'prompt' key, or chosen/rejected conversations that share their opening messages",
                "neither",
            )
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs:
                raise _Bad(side, "a reply after the shared prompt", "nothing")
            _require_assistant(msgs, side)
    else:
        if isinstance(raw_prompt, str):
            prompt = [{"role": "user", "content": _text(raw_prompt, prompt_key)}]
        else:
            prompt = _messages(raw_prompt, prompt_key, ("role", "from"), ("content", "value"))
        chosen = _continuation(obj.get("chosen"), "chosen")
        rejected = _continuation(obj.get("rejected"), "rejected")
    if chosen == rejected:
        raise _Bad("chosen", "a reply different from 'rejected'", "the same text after normalisation")
    return _with_system(obj, prompt), chosen, rejected


def _parse_metadata(obj: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Metadata fields -> Record keyword arguments; unknown keys go to ``meta``."""
    out: dict[str, Any] = {"reference": None, "quality": None, "safety": None, "meta": {}}
    used = set(_PREFIX_KEYS[fmt])
    for key, value in obj.items():
        if key in used or value is None:
            continue
        target = _META_ALIASES.get(key)
        if target == "quality":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _Bad(key, "a finite number", _show(value))
            out["quality"] = float(value)
        elif target == "safety":
            if not isinstance(value, str):
                raise _Bad(key, "a string rating such as 'safe'", _show(value))
            out["safety"] = normalize_text(value)
        elif target == "reference":
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise _Bad(key, "a string (or number) answer", _show(value))
            out["reference"] = normalize_text(str(value))
        elif key in ("meta", "metadata"):
            if not isinstance(value, dict):
                raise _Bad(key, "an object", _show(value))
            out["meta"].update(value)
        else:
            out["meta"][key] = value
    return out


def parse_record(obj: dict[str, Any], source: str = "", fmt: str = "auto", require_reply: bool = True) -> Record:
    """Validate and normalise one parsed JSON object into a :class:`Record`.

    Args:
        obj: the JSON object of one line.
        source: ``path:line``, stored on the record.
        fmt: a name from :data:`FORMATS`, or ``"auto"`` to detect it from the keys.
        require_reply: False accepts prompt-only records (no ``response`` / ``output`` / assistant message; see the
            module doc) -- for prompts, eval and generation inputs. True (SFT, reward-model data) refuses them.

    Raises:
        ValueError: the reason (field, expected, found; without ``path:line``) the record is invalid.
    """
    if fmt == "auto":
        detected = detect_format(obj)
        if detected is None:
            raise _Bad(
                "record",
                "the keys of a known format: messages, conversations (sharegpt), instruction+output (alpaca), "
                "prompt+response|completion (pair) or chosen+rejected (preference)"
                + ("" if require_reply else "; or a prompt-only prompt, instruction, messages or conversations"),
                f"keys {sorted(obj)}",
                "fix the record or pass --format",
            )
        fmt = detected
    elif fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")

    def need(key: str) -> Any:
        if obj.get(key) is None:
            raise _Bad(key, f"a value (required by the {fmt} format)", f"keys {sorted(obj)}")
        return obj[key]

    def missing_reply(key: str, alias: str = "") -> _Bad:
        expected = f"the reply to learn from (a {key!r}" + (f" or {alias!r}" if alias else "") + " value)"
        return _Bad(key, expected, f"keys {sorted(obj)}", PROMPT_ONLY_FIX)

    chosen = rejected = None
    if fmt == "messages":
        messages = _with_system(obj, _messages(need("messages"), "messages", ("role",), ("content",)))
        _check_reply(messages, "messages", require_reply)
    elif fmt == "sharegpt":
        messages = _messages(need("conversations"), "conversations", ("from", "role"), ("value", "content"))
        messages = _with_system(obj, messages)
        _check_reply(messages, "conversations", require_reply)
    elif fmt == "alpaca":
        instruction = _text(need("instruction"), "instruction")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _Bad("input", "a string", _show(extra))
        extra = normalize_text(extra or "")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}]
        if obj.get("output") is not None:
            messages.append({"role": "assistant", "content": _text(obj["output"], "output")})
        elif require_reply:
            raise missing_reply("output")
        messages = _with_system(obj, messages)
    elif fmt == "pair":
        key = "response" if obj.get("response") is not None else "completion"
        prompt = need("prompt")
        if obj.get(key) is None and require_reply:
            raise missing_reply("response", "completion")
        if isinstance(prompt, str):
            prompt_msgs = [{"role": "user", "content": _text(prompt, "prompt")}]
        else:
            prompt_msgs = _messages(prompt, "prompt", ("role", "from"), ("content", "value"))
        if obj.get(key) is not None:
            messages = _with_system(obj, [*prompt_msgs, {"role": "assistant", "content": _text(obj[key], key)}])
        else:
            messages = _with_system(obj, prompt_msgs)
            _check_reply(messages, "prompt", require_reply)
    else:
        need("chosen")
        need("rejected")
        messages, chosen, rejected = _parse_preference(obj)
    meta = _parse_metadata(obj, fmt)
    return Record(messages=messages, chosen=chosen, rejected=rejected, source=source, format=fmt, **meta)


# ---------------------------------------------------------------------------------------------------------------
# Tokens, filters, dedup keys
# ---------------------------------------------------------------------------------------------------------------


def all_messages(rec: Record) -> list[Message]:
    """Every message of a record: conversation, or prompt + chosen + rejected."""
    return [*rec.messages, *(rec.chosen or []), *(rec.rejected or [])]


def tokenize_record(rec: Record, tok: ChatTokenizer) -> dict[str, Any]:
    """The token columns of :data:`TOKEN_SCHEMA` for one record, rendered with the one chat template."""
    turn_tokens = [len(tok.encode(m["content"])) for m in all_messages(rec)]
    out: dict[str, Any] = {name: None for name in TOKEN_SCHEMA.names}
    out["turn_tokens"] = turn_tokens
    out["prompt_ids"] = tok.render_prompt(rec.prompt_messages())
    if rec.is_preference:
        assert rec.chosen is not None and rec.rejected is not None
        out["chosen_ids"] = tok.render_conversation(rec.messages + rec.chosen)[0]
        out["rejected_ids"] = tok.render_conversation(rec.messages + rec.rejected)[0]
        out["n_tokens"] = max(len(out["chosen_ids"]), len(out["rejected_ids"]))
        out["n_turns"] = len(rec.messages) + len(rec.chosen)
    else:
        ids, mask = tok.render_conversation(rec.messages)
        out["input_ids"], out["loss_mask"] = ids, mask
        out["n_tokens"] = len(ids)
        out["n_turns"] = len(rec.messages)
    return out


def needs_tokens(dcfg: DataConfig) -> bool:
    """Whether any filter of the config counts tokens."""
    return any(
        (dcfg.min_turn_tokens, dcfg.max_turn_tokens, dcfg.min_conversation_tokens, dcfg.max_conversation_tokens)
    )


FILTER_REASONS = (
    "low_quality",
    "blocklist",
    "turn_too_short",
    "turn_too_long",
    "conversation_too_short",
    "conversation_too_long",
)
"""Filter reasons, in the order they are checked (a record is counted under the first it fails)."""


def filter_reason(rec: Record, tokens: dict[str, Any] | None, dcfg: DataConfig) -> str | None:
    """The first filter of ``dcfg`` the record fails (one of :data:`FILTER_REASONS`), or None to keep it.

    Records without a quality score pass the quality filter: absent is not low. ``tokens`` (from
    :func:`tokenize_record`) is needed when a token limit is set.
    """
    if rec.quality is not None and rec.quality < dcfg.min_quality:
        return "low_quality"
    if dcfg.blocklist:
        text = "\n".join(m["content"] for m in all_messages(rec)).casefold()
        if any(normalize_text(p).casefold() in text for p in dcfg.blocklist if p.strip()):
            return "blocklist"
    if needs_tokens(dcfg):
        if tokens is None:
            raise ValueError("token filters are set but the record was not tokenized")
        turns, total = tokens["turn_tokens"], tokens["n_tokens"]
        if dcfg.min_turn_tokens and min(turns) < dcfg.min_turn_tokens:
            return "turn_too_short"
        if dcfg.max_turn_tokens and max(turns) > dcfg.max_turn_tokens:
            return "turn_too_long"
        if dcfg.min_conversation_tokens and total < dcfg.min_conversation_tokens:
            return "conversation_too_short"
        if dcfg.max_conversation_tokens and total > dcfg.max_conversation_tokens:
            return "conversation_too_long"
    return None


def dedup_key(rec: Record) -> str:
    """Hash of the normalised conversation (roles and texts; metadata ignored): equal keys = exact duplicates."""
    payload = json.dumps([rec.messages, rec.chosen, rec.rejected], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).hexdigest()


def minhash_signature(rec: Record, num_perm: int = MINHASH_PERM) -> np.ndarray:
    """MinHash of the record's character shingles (see :data:`SHINGLE_CHARS`).

    Returns:
        (num_perm,) uint64 hash values (datasketch's default ``affine32`` scheme).
    """
    from datasketch import MinHash

    text = " ".join(" ".join(m["content"] for m in all_messages(rec)).lower().split())
    n = SHINGLE_CHARS
    shingles = {text[i : i + n].encode("utf-8") for i in range(max(1, len(text) - n + 1))}
    mh = MinHash(num_perm=num_perm, seed=MINHASH_SEED)
    mh.update_batch(sorted(shingles))
    return np.asarray(mh.hashvalues, dtype=np.uint64)


class Deduplicator:
    """Streaming exact and near-duplicate removal: the first occurrence of a record wins.

    Near duplicates are found with datasketch's MinHash LSH and confirmed with the MinHash Jaccard estimate,
    because LSH alone returns candidates with some false positives.
    """

    def __init__(self, exact: bool = True, near_threshold: float = 0.0, num_perm: int = MINHASH_PERM) -> None:
        self.exact = exact
        self.near_threshold = near_threshold
        self._seen: set[str] = set()
        self._lsh: Any = None
        self._sigs: dict[int, Any] = {}
        if near_threshold > 0:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=near_threshold, num_perm=num_perm)

    def check(self, key: str, signature: Sequence[int] | np.ndarray | None = None) -> str | None:
        """``"exact"`` or ``"near"`` if the record duplicates an earlier kept one; else None (and remember it)."""
        if self.exact and key in self._seen:
            return "exact"
        mh = None
        if self._lsh is not None:
            if signature is None:
                raise ValueError("near-dedup is on but the record has no MinHash signature")
            from datasketch import LeanMinHash

            mh = LeanMinHash(seed=MINHASH_SEED, hashvalues=np.asarray(signature, dtype=np.uint64), scheme="affine32")
            for cand in self._lsh.query(mh):
                if mh.jaccard(self._sigs[cand]) >= self.near_threshold:
                    return "near"
        self._seen.add(key)
        if mh is not None:
            idx = len(self._sigs)
            self._sigs[idx] = mh
            self._lsh.insert(idx, mh, check_duplication=False)
        return None


# ---------------------------------------------------------------------------------------------------------------
# One chunk -> rows (the Ray Data map function calls this)
# ---------------------------------------------------------------------------------------------------------------


def _empty_row(path: str, line: int) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in WORK_SCHEMA.names}
    row.update(path=path, line=line, source=f"{path}:{line}" if line else path)
    return row


def process_chunk(
    chunk: dict[str, Any],
    fmt: str = "auto",
    tok: ChatTokenizer | None = None,
    dcfg: DataConfig | None = None,
    max_line_bytes: int | None = None,
    require_reply: bool = True,
) -> list[dict[str, Any]]:
    """Decode, parse, validate, tokenize and filter-check every line of a chunk from :func:`iter_chunks`.

    Never raises for bad data: a bad line becomes a row whose ``error`` holds the reason, so the caller (the
    :class:`Collector`, in input order) decides between fail and skip and the first error is always the first
    in the file, however the chunks were scheduled.

    Args:
        chunk: one chunk from :func:`iter_chunks`.
        fmt: ``"auto"`` or a format name forced for every line.
        tok: the chat tokenizer; None skips the token columns (then no token filter may be set).
        dcfg: filters to evaluate (None: no filters, no MinHash).
        max_line_bytes: the limit the chunk was read with, for the error message of an oversized line; the
            limit :func:`iter_chunks` recorded in the chunk wins, so the message always names the one that applied.
        require_reply: False accepts prompt-only records (see :func:`parse_record`).

    Returns:
        One row (:data:`WORK_SCHEMA` columns) per line, plus one for a file-level error.
    """
    path = chunk["path"]
    limit = int(chunk.get("max_line_bytes") or max_line_bytes or MAX_LINE_BYTES)
    rows: list[dict[str, Any]] = []
    for line, data, size in zip(chunk["lines"], chunk["data"], chunk["sizes"]):
        row = _empty_row(path, line)
        try:
            obj = decode_line(data, size, line, limit)
            rec = parse_record(obj, row["source"], fmt, require_reply)
        except ValueError as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        row.update(rec.to_row())
        tokens = tokenize_record(rec, tok) if tok is not None else None
        if tokens is not None:
            row.update(tokens)
        if dcfg is not None:
            row["filter"] = filter_reason(rec, tokens, dcfg)
            if dcfg.near_dedup_threshold > 0 and row["filter"] is None:
                row["minhash"] = minhash_signature(rec).tolist()
        row["dedup_key"] = dedup_key(rec)
        rows.append(row)
    if chunk.get("file_error"):
        row = _empty_row(path, int(chunk.get("error_line") or 0))
        row["error"] = chunk["file_error"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The ordered reduce: error policy, one format per file, filters, dedup
# ---------------------------------------------------------------------------------------------------------------


class Collector:
    """Consumes :func:`process_chunk` rows **in input order** and keeps the good ones.

    Args:
        on_error: ``"fail"`` raises :class:`DataError` at the first bad row; ``"skip"`` records it in ``skipped``.
        dcfg: apply its filters and dedup settings; None keeps every valid record.
    """

    def __init__(self, on_error: str = "fail", dcfg: DataConfig | None = None) -> None:
        if on_error not in ("fail", "skip"):
            raise DataError(f"on_error={on_error!r}: expected 'fail' or 'skip'")
        self.on_error = on_error
        self.dcfg = dcfg
        self.kept: list[dict[str, Any]] = []
        self.skipped: list[Skipped] = []
        self.counts_by_format: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.rows_seen = 0
        self._file_format: dict[str, tuple[str, str]] = {}
        self._dedup = Deduplicator(dcfg.dedup, dcfg.near_dedup_threshold) if dcfg is not None else None

    def _bad(self, source: str, reason: str) -> None:
        if self.on_error == "fail":
            raise DataError(
                f"{source}: {reason}\n(the first bad record stops the run; pass --on-error skip "
                "(data.on_error=skip) to skip and report bad records instead)"
            )
        self.skipped.append(Skipped(source, reason))

    def add(self, row: dict[str, Any]) -> None:
        self.rows_seen += 1
        if row.get("error"):
            self._bad(row["source"], row["error"])
            return
        fmt, path = row["format"], row["path"]
        first = self._file_format.setdefault(path, (fmt, row["source"]))
        if first[0] != fmt:
            self._bad(
                row["source"],
                f"record format: expected {first[0]} like the rest of this file (detected at {first[1]}), found "
                f"{fmt}; keep one format per file (split it) or pass --format",
            )
            return
        self.counts_by_format[fmt] += 1
        if self.dcfg is not None:
            if row.get("filter"):
                self.filtered[row["filter"]] += 1
                return
            assert self._dedup is not None
            dup = self._dedup.check(row["dedup_key"], row.get("minhash"))
            if dup is not None:
                self.duplicates[dup] += 1
                return
        self.kept.append(row)

    def add_all(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.add(row)


def collect(
    paths: Sequence[Path],
    fmt: str = "auto",
    on_error: str = "fail",
    tok: ChatTokenizer | None = None,
    dcfg: DataConfig | None = None,
    max_line_bytes: int | None = None,
    require_reply: bool = True,
) -> Collector:
    """The whole pipeline in this process (what the Ray Data job does in parallel).

    ``max_line_bytes`` defaults to ``dcfg.max_line_bytes`` (or :data:`MAX_LINE_BYTES` without a config);
    ``require_reply=False`` accepts prompt-only records (see :func:`parse_record`).
    """
    if max_line_bytes is None:
        max_line_bytes = dcfg.max_line_bytes if dcfg is not None else MAX_LINE_BYTES
    collector = Collector(on_error, dcfg)
    for chunk in iter_chunks(paths, max_line_bytes=max_line_bytes):
        collector.add_all(process_chunk(chunk, fmt, tok, dcfg, require_reply=require_reply))
    return collector


# ---------------------------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------------------------


def split_score(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from the record's dedup key and the seed."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_rows(
    rows: Sequence[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded train/val split: the ``round(n * val_fraction)`` rows with the lowest :func:`split_score` are val.

    Why hash-based rather than a shuffled permutation: the split of a record depends on its content and the seed,
    not on its position, so it is the same whether the data was read in parallel or in one process, identical
    records always land on the same side (no train/val leak when dedup is off), and appending data moves few
    records across the split. At least one record goes to val when ``val_fraction > 0`` and there are two or more.
    Input order is kept within each side.

    Returns:
        (train rows, val rows)
    """
    n = len(rows)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = sorted(range(n), key=lambda i: (split_score(rows[i]["dedup_key"], seed), i))
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [r for i, r in enumerate(rows) if i in val_idx]
    return train, val


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------


def read_records(
    paths: Sequence[str | Path],
    fmt: str = "auto",
    on_error: str = "fail",
    max_line_bytes: int = MAX_LINE_BYTES,
    require_reply: bool = True,
) -> ReadResult:
    """Read, normalise and validate records from ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` files or directories.

    No filters, no dedup, no split (see :func:`load_records` for those).

    Args:
        paths: files or directories.
        fmt: ``"auto"`` (per file, from its first record) or a name from :data:`FORMATS`.
        on_error: ``"fail"`` or ``"skip"``.
        max_line_bytes: longest accepted line (``data.max_line_bytes``); longer ones are bad records.
        require_reply: False accepts prompt-only records (see :func:`parse_record`).

    Returns:
        The records in input order, the skipped lines with reasons, and the count of records per format.

    Raises:
        DataError: ``on_error="fail"`` and a record is bad (``path:line: field: expected ..., found ...``), or
            a path does not exist.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")
    if max_line_bytes < 1:
        raise DataError(f"max_line_bytes={max_line_bytes}: expected a positive number of bytes, e.g. {MAX_LINE_BYTES}")
    collector = collect(
        expand_inputs(paths), fmt, on_error, max_line_bytes=max_line_bytes, require_reply=require_reply
    )
    records = [Record.from_row(r) for r in collector.kept]
    return ReadResult(records, collector.skipped, dict(collector.counts_by_format))


def builtin_path(name: str) -> Path:
    """The file of a built-in demo data set (``task``, ``chat`` or ``prefs``)."""
    if name not in BUILTIN:
        raise DataError(f"builtin:{name}: unknown built-in data set; expected one of {', '.join(BUILTIN)}")
    return Path(__file__).resolve().parents[1] / "demo_data" / f"{name}.jsonl"


def _split_name(split: str) -> None:
    if split not in ("train", "val", "all"):
        raise DataError(f"split={split!r}: expected 'train', 'val' or 'all'")


def _same_data(a: str, b: str) -> bool:
    """Whether two data specs name the same data (equal text, or paths that resolve to the same place)."""
    if a == b:
        return True
    if a.startswith("builtin:") or b.startswith("builtin:"):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def reply_required(spec: str, cfg: Config) -> bool:
    """Whether records loaded from ``spec`` must carry a reply, by the role ``spec`` plays in ``cfg``.

    ``data.prompts`` is reply-optional: PPO rollouts, the trainer's held-out evaluation and the demo only need the
    prompt (the policy writes the reply), so ``{"prompt": ..., "reference": ...}`` is a natural prompt set. Anything
    else -- ``data.sft``, ``data.preferences``, ``rm.feedback``, a spec the config does not name -- requires one, as
    before prompt-only records existed. A spec that is both ``data.prompts`` and SFT / preference data requires a
    reply, so SFT still fails on a prompt-only record with its ``path:line``.

    Why decide it from the config rather than at every call site: the stages that read ``data.prompts`` (the
    Sampler, the trainer's evaluation, the demo, the benchmarks) and those that read SFT / preference data all go
    through :func:`load_records` with the spec taken from the config, so the config already says what the data is
    for; callers that know better pass ``require_reply`` explicitly.
    """
    d = cfg.data
    if not _same_data(spec, d.prompts):
        return True
    return any(_same_data(spec, other) for other in (d.sft, d.preferences, *cfg.rm.feedback))


def load_records(
    spec: str, split: str = "train", cfg: Config | None = None, *, require_reply: bool | None = None
) -> list[Record]:
    """Records for a training stage, from any of the data forms the config accepts.

    Args:
        spec: ``builtin:task`` / ``builtin:chat`` / ``builtin:prefs``; a directory written by
            ``rlchat data prepare`` (``train.parquet`` / ``val.parquet``); or raw ``.jsonl`` / ``.jsonl.gz`` /
            ``.parquet`` files (a file, or a directory of them). Raw data goes through the same validation,
            filters, dedup and seeded split as ``rlchat data prepare`` (``cfg.data``, ``cfg.seed``).
        split: ``"train"``, ``"val"`` or ``"all"`` (train then val).
        cfg: the run's config (defaults: ``Config()``).
        require_reply: False accepts prompt-only records (prompts, eval and generation inputs); True refuses them
            with ``path:line`` (SFT, reward-model data); None decides from the role of ``spec`` in ``cfg``
            (:func:`reply_required`: only ``data.prompts`` is reply-optional).

    Returns:
        The records of the split, in input order.

    Raises:
        DataError: unknown spec, missing files, or bad records (per ``cfg.data.on_error``), a prompt-only record
            among them included when a reply is required.
    """
    from rlchat.core.config import Config

    _split_name(split)
    cfg = cfg or Config()
    if require_reply is None:
        require_reply = reply_required(spec, cfg)
    d = cfg.data
    fmt = d.format
    if spec.startswith("builtin:"):
        paths = [builtin_path(spec.split(":", 1)[1])]
        fmt = "auto"  # data.format describes the user's files, not the built-in ones
    else:
        p = Path(spec).expanduser()
        if p.is_dir() and (p / "train.parquet").is_file():
            return _load_prepared(p, split, require_reply, d.on_error)
        if not p.exists():
            raise DataError(
                f"data {spec!r}: no such file or directory; expected builtin:{{{','.join(BUILTIN)}}}, a directory "
                "written by `rlchat data prepare`, or a .jsonl / .jsonl.gz / .parquet file"
            )
        paths = expand_inputs([p])
    tok = None
    if needs_tokens(d):
        from rlchat.core.tokenizer import ChatTokenizer

        tok = ChatTokenizer.from_config(cfg.tokenizer)
    collector = collect(paths, fmt, d.on_error, tok, d, require_reply=require_reply)
    for s in collector.skipped:
        logger.warning("skipped %s: %s", s.source, s.reason)
    if collector.filtered or collector.duplicates:
        logger.info(
            "%s: filtered %s, duplicates removed %s", spec, dict(collector.filtered), dict(collector.duplicates)
        )
    train, val = split_rows(collector.kept, d.val_fraction, cfg.seed)
    rows = {"train": train, "val": val, "all": train + val}[split]
    return [Record.from_row(r) for r in rows]


def _load_prepared(directory: Path, split: str, require_reply: bool = True, on_error: str = "fail") -> list[Record]:
    """Records of a prepared directory; where a reply is required, its prompt-only records are bad records.

    ``rlchat data prepare`` keeps prompt-only records (it cannot know which stage the data is for), so the check
    happens here, naming the ``path:line`` the record was prepared from and the Parquet row it is in.
    """
    import pyarrow.parquet as pq

    names = ["train", "val"] if split == "all" else [split]
    out: list[Record] = []
    for name in names:
        f = directory / f"{name}.parquet"
        if not f.is_file():
            raise DataError(f"{f}: missing; expected a directory written by `rlchat data prepare`")
        table = pq.read_table(f, columns=[c for c in RECORD_SCHEMA.names])
        for i, row in enumerate(table.to_pylist()):
            rec = Record.from_row(row)
            try:
                check_reply(rec, require_reply)
            except ValueError as e:
                reason = f"{e} (the record is row {i + 1} of {f})"
                if on_error == "fail":
                    raise DataError(
                        f"{rec.source or f}: {reason}\n(the first bad record stops the run; pass --on-error skip "
                        "(data.on_error=skip) to skip and report bad records instead)"
                    ) from None
                logger.warning("skipped %s: %s", rec.source or f, reason)
                continue
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Statistics (stats.json, `rlchat data stats`)
# ---------------------------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float]:
    """min / median / p95 / max / mean of a list (empty -> zeros)."""
    if not len(values):
        return {"count": 0, "min": 0, "median": 0, "p95": 0, "max": 0, "mean": 0}
    a = np.asarray(values, dtype=np.float64)
    return {
        "count": int(a.size),
        "min": float(a.min()),
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
        "mean": round(float(a.mean()), 3),
    }


def compute_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of kept rows: formats, turns, roles, token lengths, quality and safety distributions.

    ``prompt_only`` counts records without a reply (see the module doc): usable as prompts, refused as SFT data.
    """
    roles: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    safety: Counter[str] = Counter()
    turn_tokens_by_role: dict[str, list[int]] = {r: [] for r in ROLES}
    turns, conv_tokens, qualities = [], [], []
    prompt_only = 0
    for r in rows:
        formats[r["format"]] += 1
        msgs = [*(r["messages"] or []), *(r.get("chosen") or []), *(r.get("rejected") or [])]
        roles.update(m["role"] for m in msgs)
        prompt_only += not any(m["role"] == "assistant" for m in msgs)
        turns.append(r.get("n_turns") or len(r["messages"]) + len(r.get("chosen") or []))
        if r.get("turn_tokens") is not None:
            for m, n in zip(msgs, r["turn_tokens"]):
                turn_tokens_by_role[m["role"]].append(n)
        if r.get("n_tokens") is not None:
            conv_tokens.append(r["n_tokens"])
        if r.get("quality") is not None:
            qualities.append(r["quality"])
        if r.get("safety") is not None:
            safety[r["safety"]] += 1
    quality: dict[str, Any] = {**summarize(qualities), "missing": len(rows) - len(qualities)}
    if qualities:
        lo, hi = min(qualities), max(qualities)
        counts, edges = np.histogram(qualities, bins=5, range=(lo, hi if hi > lo else lo + 1))
        quality["histogram"] = [
            {"low": round(float(a), 4), "high": round(float(b), 4), "count": int(c)}
            for a, b, c in zip(edges[:-1], edges[1:], counts)
        ]
    all_turn_tokens = [n for v in turn_tokens_by_role.values() for n in v]
    return {
        "records": len(rows),
        "records_by_format": dict(sorted(formats.items())),
        "prompt_only": prompt_only,
        "turns": summarize(turns),
        "roles": {r: roles.get(r, 0) for r in ROLES},
        "tokens": {
            "conversation": summarize(conv_tokens),
            "turn": summarize(all_turn_tokens),
            **{f"turn_{role}": summarize(v) for role, v in turn_tokens_by_role.items()},
        },
        "quality": quality,
        "safety": dict(sorted(safety.items())),
    }
