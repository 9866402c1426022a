"""``rlchat feedback``: read and manage the Serve endpoint's feedback store (:mod:`rlchat.core.feedback_store`).

    rlchat feedback export postgresql://rlchat:PW@db:5432/rlchat --out prepared/feedback   # Parquet for `rlchat rm`
    rlchat feedback stats sqlite:///feedback.db                  # per model version: requests, thumbs-up, pairs
    rlchat feedback delete sqlite:///feedback.db CONVERSATION_ID  # one conversation's transcripts and feedback

``export`` writes the layout of ``rlchat data prepare`` (``train.parquet`` / ``val.parquet`` with token columns,
``stats.json``, ``stats.png``): the pairs go through the same validation, ``data.*`` filters, dedup and seeded
split, so ``data.preferences: prepared/feedback`` or ``rm.feedback: [prepared/feedback]`` reads it like any prepared
set (``rm.feedback`` also takes the store URL itself). ``stats`` is the A/B read-out of a canary split: each
model version's requests, thumbs-up rate with its 95% Wilson interval and usable preference pairs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rlchat.core.config import load_config
from rlchat.core.errors import DataError
from rlchat.core.feedback_store import (
    FeedbackStore,
    VersionStats,
    collect_pairs,
    display_url,
    existing_store_url,
    resolve_store_url,
)


def export_feedback(
    url: str,
    out: str | Path,
    config: str | None = None,
    model_version: str | None = None,
    client_text: bool = False,
) -> dict:
    """Write the store's preference pairs to ``out`` in the prepared-data layout.

    Args:
        url: the store (see :func:`rlchat.core.feedback_store.resolve_store_url`).
        out: output directory (created; its train/val/stats files are replaced).
        config: a YAML config whose ``data.*`` filters, ``tokenizer`` and ``seed`` apply (default: built-ins).
        model_version: only this model version's pairs.
        client_text: also the pairs whose text a client sent (``rm.feedback_client_text``; set either).

    Returns:
        The statistics written to ``stats.json``.

    Raises:
        StoreUnavailable: the database cannot be reached.
        DataError: no pair to export (or a bad one with ``data.on_error: fail``).
    """
    from rlchat.core.data import split_rows
    from rlchat.core.tokenizer import ChatTokenizer

    # prepare.py's own writer, so the output is exactly the layout `rlchat data prepare` writes (no Ray involved)
    from rlchat.distributed.prepare import _write_outputs, build_stats

    cfg = load_config(config)
    if client_text:
        cfg = cfg.replace(**{"rm.feedback_client_text": True})
    url = existing_store_url(url)
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    collector, name, n = collect_pairs(url, cfg, model_version)
    if not collector.kept:
        which = f" of model version {model_version!r}" if model_version else ""
        raise DataError(
            f"{display_url(url)}: no preference pairs{which} to export (read {n}, skipped {len(collector.skipped)}, "
            f"filtered {dict(collector.filtered)}, duplicates {dict(collector.duplicates)}); pairs are written when "
            "a user sends a preference or rates two replies to one prompt in opposite ways"
            + ("" if cfg.rm.feedback_client_text else "; pairs whose text a client sent need --client-text")
        )
    train, val = split_rows(collector.kept, cfg.data.val_fraction, cfg.seed)
    stats = build_stats([Path(name)], "preference", cfg.data.on_error, cfg, tok, collector, train, val, n)
    stats["inputs"] = [name]  # a URL, not a path
    _write_outputs(Path(out), train, val, stats, tok)
    return stats


def format_version_stats(rows: list[VersionStats], title: str = "") -> str:
    """The ``rlchat feedback stats`` table."""
    head = ("model version", "requests", "ratings", "up", "down", "up rate", "95% CI", "pairs")
    table = [head]
    for r in rows:
        low, high = r.up_rate_ci
        rate = "-" if r.up_rate is None else f"{r.up_rate:.3f}"
        ci = "-" if r.up_rate is None else f"[{low:.3f}, {high:.3f}]"
        table.append((r.model_version, str(r.requests), str(r.ratings), str(r.up), str(r.down), rate, ci,
                      str(r.pairs)))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [title] if title else []
    for i, row in enumerate(table):
        cells = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(no requests or feedback yet)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# CLI targets
# --------------------------------------------------------------------------------------------------------------


def feedback_export_command(
    url: str,
    out: str,
    config: str | None = None,
    model_version: str | None = None,
    client_text: bool = False,
    **_: Any,
) -> int:
    """``rlchat feedback export URL --out DIR``."""
    from rlchat.distributed.prepare import format_stats_table

    stats = export_feedback(url, out, config, model_version, client_text)
    print(format_stats_table(stats, title=f"exported {display_url(resolve_store_url(url))} to {out}/"))
    print(
        f"wrote {', '.join(str(Path(out) / n) for n in ('train.parquet', 'val.parquet', 'stats.json', 'stats.png'))}"
    )
    return 0


def feedback_stats_command(url: str, json_output: bool = False, **_: Any) -> int:
    """``rlchat feedback stats URL [--json]``."""
    store = FeedbackStore(existing_store_url(url))
    try:
        rows = store.stats()
    finally:
        store.close()
    if json_output:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(format_version_stats(rows, title=f"feedback in {store.display_url}"))
    return 0


def feedback_delete_command(url: str, conversation_id: str, **_: Any) -> int:
    """``rlchat feedback delete URL CONVERSATION_ID``."""
    store = FeedbackStore(existing_store_url(url))
    try:
        counts = store.delete_conversation(conversation_id)
    finally:
        store.close()
    if not any(counts.values()):  # a mistyped id must not read as a deletion done (a privacy request, a script)
        print(
            f"error: no conversation or completion with id {conversation_id!r} in {store.display_url}; nothing "
            "deleted. Give the X-RLChat-Conversation-Id the client sent, or a completion id (chatcmpl-... / cmpl-..., "
            "the response's X-RLChat-Completion-Id)",
            file=sys.stderr,
        )
        return 1
    done = ", ".join(f"{n} {table}" for table, n in counts.items())
    print(f"deleted conversation {conversation_id!r} from {store.display_url}: {done}")
    return 0


__all__ = [
    "existing_store_url",
    "export_feedback",
    "feedback_delete_command",
    "feedback_export_command",
    "feedback_stats_command",
    "format_version_stats",
]
