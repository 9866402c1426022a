"""``rlchat tokenize``: show how text (or a chat) becomes token ids, with the chat loss mask.

Run::

    rlchat tokenize "Hello, wörld 👋"                      # ids, pieces, count, bytes per token
    rlchat tokenize notes.txt --encoding o200k_base         # an existing file path is read instead
    rlchat tokenize --vocab-size 4096 "Hello"               # the small truncated vocabulary of a tiny model
    rlchat tokenize --chat '[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]'
    rlchat tokenize --chat data/chats.jsonl                 # the first record of a JSONL file
    echo "some text" | rlchat tokenize -                    # "-" reads stdin

The encoding defaults to the config's (``rlchat.core.config.Config().tokenizer``); ``--encoding`` and
``--vocab-size`` override it. Everything goes through :class:`rlchat.core.tokenizer.ChatTokenizer`, so what is shown
is exactly what training and serving see.

With ``--chat`` the input is a JSON list of messages, a JSON object with ``"messages"`` (or a ``"prompt"`` with an
optional ``"response"``), the first record of a JSONL file, or plain text (one user message). It is rendered by
``ChatTokenizer.render_conversation``; the tokens the model is trained on (loss mask 1: assistant text and its
``<|end|>``) are shown ``[[between double brackets]]`` and in the table's mask column.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlchat.core.errors import DataError
from rlchat.core.tokenizer import ROLES, ChatTokenizer, Message

MASK_OPEN, MASK_CLOSE = "[[", "]]"


@dataclass(frozen=True)
class TokenRow:
    """One token as shown in the table.

    Attributes:
        index: position in the sequence.
        token_id: the id.
        piece: the token's text, printable: ``'text'`` (Python repr, so spaces and newlines are visible), raw
            ``b'\\xf0\\x9f'`` bytes when the token is not valid UTF-8 on its own (part of a character), or the
            bare name for a special token (``<|end|>``).
        n_bytes: bytes of the token's text (0 for special tokens).
        special: whether it is a control token.
        mask: the loss mask value (chat mode), else None.
    """

    index: int
    token_id: int
    piece: str
    n_bytes: int
    special: bool
    mask: int | None = None


def read_input(text_or_file: str) -> tuple[str, str | None]:
    """The text to tokenize and where it came from: the file's content if the argument names an existing file,
    stdin for ``-``, else the argument itself.

    Returns:
        (text, source): source is the file path or ``<stdin>``; None for literal text.
    """
    if text_or_file == "-":
        return sys.stdin.read(), "<stdin>"
    path = Path(text_or_file).expanduser()
    try:
        is_file = len(text_or_file) < 4096 and path.is_file()
    except (OSError, ValueError):  # e.g. a name too long for the filesystem, or a NUL byte
        is_file = False
    if not is_file:
        return text_or_file, None
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); tokenize text files only") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def piece_text(tok: ChatTokenizer, token_id: int) -> tuple[str, int, bool]:
    """How one token is shown: (printable piece, byte count, is special). See :class:`TokenRow`."""
    raw = tok.token_bytes(token_id)
    if tok.is_special(token_id):
        return raw.decode("utf-8"), 0, True
    try:
        return repr(raw.decode("utf-8")), len(raw), False
    except UnicodeDecodeError:  # a byte-level token that is only part of a UTF-8 character
        return repr(raw), len(raw), False


def token_rows(tok: ChatTokenizer, ids: Sequence[int], mask: Sequence[int] | None = None) -> list[TokenRow]:
    """The table rows for ``ids`` (and the loss ``mask``, same length, in chat mode)."""
    rows = []
    for i, token_id in enumerate(ids):
        piece, n_bytes, special = piece_text(tok, token_id)
        rows.append(TokenRow(i, int(token_id), piece, n_bytes, special, None if mask is None else int(mask[i])))
    return rows


def format_table(rows: Sequence[TokenRow]) -> list[str]:
    """``#  id  [mask]  bytes  piece`` lines, columns sized to the data."""
    chat = any(r.mask is not None for r in rows)
    w_index = max(len("#"), len(str(len(rows) - 1)) if rows else 1)
    w_id = max(len("id"), *(len(str(r.token_id)) for r in rows)) if rows else 2
    head = f"{'#':>{w_index}}  {'id':>{w_id}}  " + ("mask  " if chat else "") + "bytes  piece"
    lines = [head]
    for r in rows:
        mask = f"{r.mask:>4}  " if chat else ""
        lines.append(f"{r.index:>{w_index}}  {r.token_id:>{w_id}}  {mask}{r.n_bytes:>5}  {r.piece}")
    return lines


def render_marked(tok: ChatTokenizer, ids: Sequence[int], mask: Sequence[int]) -> str:
    """The rendered chat as text, with each run of loss-mask-1 tokens wrapped in ``[[ ]]``.

    Runs are decoded as a whole (not token by token) so characters split over several tokens display intact.
    """
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        text = tok.decode(ids[i:j])
        out.append(f"{MASK_OPEN}{text}{MASK_CLOSE}" if mask[i] else text)
        i = j
    return "".join(out)


def _as_messages(obj: Any, where: str) -> list[Message]:
    """Messages from a parsed JSON value (list of messages, {"messages": [...]}, {"prompt", "response"})."""
    if isinstance(obj, dict) and "messages" in obj:
        obj = obj["messages"]
    elif isinstance(obj, dict) and "prompt" in obj:
        msgs = [{"role": "user", "content": obj["prompt"]}]
        for key in ("response", "completion", "chosen"):
            if key in obj:
                msgs.append({"role": "assistant", "content": obj[key]})
                break
        obj = msgs
    elif isinstance(obj, dict) and "role" in obj:
        obj = [obj]
    if not isinstance(obj, list):
        raise DataError(
            f"{where}: expected a JSON list of messages or an object with 'messages'; found {type(obj).__name__}"
        )
    messages: list[Message] = []
    for k, m in enumerate(obj, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(
                f'{where}: message {k} is {json.dumps(m)[:80]}; expected {{"role": ..., "content": "<text>"}}'
            )
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {k} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def parse_chat(text: str, source: str | None = None) -> tuple[list[Message], str | None]:
    """The messages of a chat given as JSON, JSONL (first record) or plain text (one user message).

    Returns:
        (messages, note): note explains a fallback (e.g. text that looked like JSON but did not parse), else None.

    Raises:
        DataError: JSON that parses but is not a chat, or a bad message (the message names where).
    """
    where = source or "input"
    stripped = text.strip()
    if not stripped.startswith(("[", "{")):
        return [{"role": "user", "content": text}], None
    try:
        return _as_messages(json.loads(stripped), where), None
    except json.JSONDecodeError as e:
        first = stripped.splitlines()[0]
        if e.msg == "Extra data" or (source and source.endswith(".jsonl")):
            try:
                record = json.loads(first)
            except json.JSONDecodeError as e2:
                raise DataError(f"{where}:1: not valid JSON ({e2.msg} at column {e2.colno})") from None
            return _as_messages(record, f"{where}:1"), f"{where}: JSONL, showing the first record"
        if source is not None and source.endswith((".json", ".jsonl")):
            raise DataError(f"{where}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        return [{"role": "user", "content": text}], f"{where} is not valid JSON ({e.msg}); shown as one user message"


def _bytes_per_token(n_bytes: int, n_tokens: int) -> str:
    return f"{n_bytes / n_tokens:.2f}" if n_tokens else "n/a"


def tokenize_text(tok: ChatTokenizer, text: str) -> list[str]:
    """The output lines for plain text: ids, the table, and the totals."""
    ids = tok.encode(text)
    n_bytes = len(text.encode("utf-8"))
    lines = [f"ids: {ids}", *format_table(token_rows(tok, ids))]
    lines.append(
        f"tokens: {len(ids)}  bytes: {n_bytes}  chars: {len(text)}  bytes/token: {_bytes_per_token(n_bytes, len(ids))}"
    )
    return lines


def tokenize_chat(tok: ChatTokenizer, messages: Sequence[Message]) -> list[str]:
    """The output lines for a chat: the marked rendering, ids, mask, the table (with a mask column), totals."""
    ids, mask = tok.render_conversation(messages)
    rows = token_rows(tok, ids, mask)
    text_rows = [r for r in rows if not r.special]
    n_bytes = sum(r.n_bytes for r in text_rows)
    lines = [
        f"chat ({len(messages)} message{'s' if len(messages) != 1 else ''}; text in {MASK_OPEN} {MASK_CLOSE} is "
        "trained on: loss mask 1):",
        render_marked(tok, ids, mask),
        f"ids: {ids}",
        f"mask: {mask}",
        *format_table(rows),
        f"tokens: {len(ids)}  trained (mask 1): {sum(mask)}  special: {len(rows) - len(text_rows)}  "
        f"text bytes: {n_bytes}  bytes/text token: {_bytes_per_token(n_bytes, len(text_rows))}",
    ]
    return lines


def tokenize_command(text: str, encoding: str | None, vocab_size: int | None, chat: bool) -> int:
    """``rlchat tokenize``: print how TEXT_OR_FILE tokenizes (with ``chat``: the chat template and loss mask).

    Args:
        text: literal text, an existing file path, or ``-`` for stdin.
        encoding: tiktoken encoding name or .tiktoken path (default: the config's tokenizer.encoding).
        vocab_size: truncated vocabulary size (default: the config's tokenizer.vocab_size; 0 = full).
        chat: render the input as a conversation and mark the loss mask.

    Returns:
        0. Bad input or an unknown / unavailable encoding raise :class:`rlchat.core.errors.RLChatError` subclasses,
        which the CLI prints as one line with exit code 2.
    """
    from rlchat.core.config import Config

    default = Config().tokenizer
    tok = ChatTokenizer(
        default.encoding if encoding is None else encoding,
        default.vocab_size if vocab_size is None else vocab_size,
        default.pattern,
    )
    content, source = read_input(text)
    # Build everything before printing, so a bad input is one error line with nothing half-printed before it.
    note = None
    if chat:
        messages, note = parse_chat(content, source)
        lines = tokenize_chat(tok, messages)
    else:
        lines = tokenize_text(tok, content)
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"encoding: {tok.spec.encoding}" + (f"@{tok.spec.vocab_size}" if tok.spec.vocab_size else ""), end="")
    print(f" (n_vocab {tok.n_vocab:,})" + (f"; input: {source}" if source else ""))
    print("\n".join(lines))
    return 0
