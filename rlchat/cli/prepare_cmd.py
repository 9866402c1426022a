"""``rlchat data prepare`` and ``rlchat data stats``: the Ray Data job of :mod:`rlchat.distributed.prepare`, and its
printed statistics."""

from __future__ import annotations

from typing import Any

from rlchat.core.config import load_config
from rlchat.distributed.prepare import format_stats_table, load_stats, prepare


def prepare_command(
    inputs: list[str],
    out: str,
    format: str = "auto",
    on_error: str | None = None,
    config: str | None = None,
    address: str | None = None,
    **_: Any,
) -> int:
    """``rlchat data prepare``: run :func:`prepare`, print every skipped line, the count and the stats table."""
    cfg = load_config(config)
    fmt = format if format and format != "auto" else cfg.data.format
    result = prepare(inputs, out, cfg, fmt, on_error, address)
    for s in result.skipped:
        print(f"skipped {s.source}: {s.reason}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad record(s); each is listed above and in stats.json")
    print(format_stats_table(result.stats, title=f"prepared {result.out}/"))
    print(
        f"wrote {', '.join(str(result.out / n) for n in ('train.parquet', 'val.parquet', 'stats.json', 'stats.png'))}"
    )
    return 0


def stats_command(path: str, **_: Any) -> int:
    """``rlchat data stats PATH``: print the statistics table of a prepared directory (or its stats.json)."""
    stats = load_stats(path)
    print(format_stats_table(stats, title=f"{path}"))
    return 0
