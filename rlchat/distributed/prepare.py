"""``rlchat data prepare`` and ``rlchat data stats``: the Ray Data job over :mod:`rlchat.core.data`'s core functions.

    rlchat data prepare data/*.jsonl --out prepared/ [--format auto] [--on-error fail|skip] [--config FILE]
    rlchat data stats prepared/

How the work is divided, and why:

1. The driver reads the input files into chunks of raw lines (:func:`rlchat.core.data.iter_chunks`). Inputs are local
   paths given on the command line, which other nodes of a cluster may not see, so the driver reads the bytes and
   ships them through the object store; nothing is decoded yet.
2. Ray Data runs :func:`rlchat.core.data.process_chunk` over the chunks in parallel tasks (``map_batches``): decoding,
   validation, normalisation, tokenization, filter checks and MinHash signatures, the CPU-heavy part. Bad lines
   come back as rows carrying the reason instead of raising inside a task.
3. The driver consumes the rows **in input order** (``preserve_order``) with :class:`rlchat.core.data.Collector`: the
   first bad record in fail mode is the first in the files, whatever the scheduling; exact and MinHash-LSH dedup
   keep the first occurrence; the seeded split (:func:`rlchat.core.data.split_rows`) does not depend on the order.
4. The driver writes ``train.parquet`` / ``val.parquet`` (records + token ids, the tokenizer in the schema
   metadata), ``stats.json`` and ``stats.png``, through a temporary directory so a failed run leaves no partial
   output.

The same command runs on a cluster with ``--address`` (or ``RAY_ADDRESS`` / ``ray.address``); on one machine it
starts a local Ray by itself.

Prompt-only records (no reply: ``{"prompt": ..., "reference": ...}``, a conversation ending with the user turn; see
:mod:`rlchat.core.data`) are kept, with no flag: preparing does not know which stage the files are for, and a prepared
prompt set is as useful as a prepared SFT set. The stage that loads the directory decides: as ``data.prompts`` they
are prompts; as SFT or reward-model data :func:`rlchat.core.data.load_records` refuses each one with the ``path:line``
it came from. ``stats.json`` counts them (``prompt_only``) and the stats table shows the count.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import pyarrow as pa

from rlchat import __version__
from rlchat.core.config import Config, DataConfig, TokenizerConfig
from rlchat.core.data import (
    FORMATS,
    PREPARED_SCHEMA,
    WORK_SCHEMA,
    Collector,
    Skipped,
    compute_stats,
    expand_inputs,
    iter_chunks,
    process_chunk,
    split_rows,
)
from rlchat.core.errors import DataError
from rlchat.core.files import atomic_path, atomic_write_json
from rlchat.core.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

MAX_SKIPPED_IN_STATS = 10_000
"""stats.json lists at most this many skipped lines (the count is always exact)."""


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote and what it left out."""

    out: Path
    stats: dict[str, Any]
    skipped: list[Skipped]


# ---------------------------------------------------------------------------------------------------------------
# The Ray Data map function (runs in Ray worker processes)
# ---------------------------------------------------------------------------------------------------------------


def _process_batch(
    batch: pa.Table, fmt: str, tokenizer: TokenizerConfig, data: DataConfig, max_line_bytes: int
) -> pa.Table:
    """Ray Data UDF: chunks of raw lines -> one row per line (:data:`rlchat.core.data.WORK_SCHEMA`).

    Prompt-only records are accepted (``require_reply=False``; the module doc says why).
    """
    tok = ChatTokenizer.from_config(tokenizer)  # the encoding is cached per worker process
    rows: list[dict[str, Any]] = []
    for chunk in batch.to_pylist():
        rows.extend(process_chunk(chunk, fmt, tok, data, max_line_bytes, require_reply=False))
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def _ensure_ray(address: str | None, cfg: Config) -> bool:
    """Connect to ``address`` (or ``ray.address`` / ``RAY_ADDRESS``) or start a local Ray; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = address or cfg.ray.address or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS") and cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    ray.init(address=address, **kwargs)
    return True


def _run_ray(
    chunks: list[dict[str, Any]],
    collector: Collector,
    fmt: str,
    cfg: Config,
    total: int,
    progress: bool,
) -> None:
    """Process the chunks with Ray Data and feed the rows, in input order, to the collector."""
    import ray.data
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    saved = (
        ctx.execution_options.preserve_order,
        ctx.enable_progress_bars,
        ctx.print_on_execution_start,
        ctx.enable_auto_log_stats,
    )
    # Order matters (first error, first duplicate wins); our own tqdm bar replaces Ray's per-operator bars.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    data_logger = logging.getLogger("ray.data")  # its INFO/"progress bars disabled" lines would interleave our bar
    saved_level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    try:
        ds = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks))).map_batches(
            _process_batch,  # type: ignore[arg-type]  # extra parameters arrive through fn_kwargs
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={
                "fmt": fmt,
                "tokenizer": cfg.tokenizer,
                "data": cfg.data,
                "max_line_bytes": cfg.data.max_line_bytes,
            },
        )
        from rlchat.core.console import console

        bar_args = {"unit": "rec", "desc": "prepare", "disable": not progress, "dynamic_ncols": True}
        with tqdm(total=total, file=console(), **bar_args) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = cast(pa.Table, batch).to_pylist()
                collector.add_all(rows)
                bar.update(sum(1 for r in rows if r["line"]))
    finally:
        data_logger.setLevel(saved_level)
        (
            ctx.execution_options.preserve_order,
            ctx.enable_progress_bars,
            ctx.print_on_execution_start,
            ctx.enable_auto_log_stats,
        ) = saved


# ---------------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------------


def prepare(
    inputs: Sequence[str | Path],
    out: str | Path,
    cfg: Config | None = None,
    fmt: str | None = None,
    on_error: str | None = None,
    address: str | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Normalise, validate, filter, deduplicate and split data files into a prepared directory (Ray Data).

    Args:
        inputs: ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` files or directories of them.
        out: output directory (created; its train/val/stats files are replaced).
        cfg: the config (``data.*`` filters, ``tokenizer``, ``seed``, ``ray``); defaults to ``Config()``.
        fmt: ``"auto"`` or a format name; None = ``cfg.data.format``.
        on_error: ``"fail"`` or ``"skip"``; None = ``cfg.data.on_error``.
        address: Ray address; None = ``cfg.ray.address`` / ``RAY_ADDRESS`` / a local Ray started here.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The output directory, the statistics written to ``stats.json`` and the skipped lines.

    Raises:
        DataError: a bad record in fail mode (``path:line: field: expected ..., found ...``), missing inputs, or
            no record left to write.
    """
    cfg = cfg or Config()
    fmt = fmt or cfg.data.format
    on_error = on_error or cfg.data.on_error
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")
    files = expand_inputs(inputs)
    tok = ChatTokenizer.from_config(cfg.tokenizer)  # fail on a bad tokenizer config before starting Ray
    collector = Collector(on_error, cfg.data)  # fail on a bad on_error value before reading
    chunks = list(iter_chunks(files, max_line_bytes=cfg.data.max_line_bytes))  # longer lines: bad records
    total = sum(len(c["lines"]) for c in chunks)

    started = _ensure_ray(address, cfg)
    try:
        _run_ray(chunks, collector, fmt, cfg, total, progress)
    finally:
        if started:
            import ray

            ray.shutdown()

    if not collector.kept:
        raise DataError(
            f"{', '.join(map(str, inputs))}: no records left to write "
            f"(read {sum(collector.counts_by_format.values())}, "
            f"skipped {len(collector.skipped)}, filtered {dict(collector.filtered)}, duplicates "
            f"{dict(collector.duplicates)}); check the inputs and the data.* filters"
        )
    train, val = split_rows(collector.kept, cfg.data.val_fraction, cfg.seed)
    stats = build_stats(files, fmt, on_error, cfg, tok, collector, train, val, total)
    out = Path(out)
    _write_outputs(out, train, val, stats, tok)
    return PrepareResult(out, stats, collector.skipped)


def merge_prepared(sources: Sequence[str | Path], out: str | Path) -> Path:
    """Concatenate the train and val splits of several prepared directories into one (e.g. chat + task for SFT).

    Each source keeps its own seeded split, so a record held out in one source stays held out in the merge.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        tables = [pq.read_table(Path(s) / f"{split}.parquet") for s in sources]
        pq.write_table(pa.concat_tables(tables, promote_options="default"), out / f"{split}.parquet")
    return out


def build_stats(
    files: Sequence[Path],
    fmt: str,
    on_error: str,
    cfg: Config,
    tok: ChatTokenizer,
    collector: Collector,
    train: list[dict[str, Any]],
    val: list[dict[str, Any]],
    lines: int,
) -> dict[str, Any]:
    """The content of ``stats.json``: what was read, skipped, filtered, deduplicated and kept."""
    d = cfg.data
    filters = {
        k: v
        for k, v in asdict(d).items()
        if k not in ("sft", "preferences", "prompts", "format", "on_error", "val_fraction")
    }
    if filters["min_quality"] == float("-inf"):
        filters["min_quality"] = None  # JSON has no -inf
    filters["blocklist"] = list(filters["blocklist"])
    skipped = [{"source": s.source, "reason": s.reason} for s in collector.skipped[:MAX_SKIPPED_IN_STATS]]
    return {
        "rlchat_version": __version__,
        "inputs": [str(f) for f in files],
        "format": fmt,
        "on_error": on_error,
        "seed": cfg.seed,
        "val_fraction": d.val_fraction,
        "tokenizer": {k: v for k, v in tok.to_dict().items() if k != "special_tokens"},
        "filters": filters,
        "lines": lines,
        "read": sum(collector.counts_by_format.values()),
        "read_by_format": dict(sorted(collector.counts_by_format.items())),
        "skipped": len(collector.skipped),
        "skipped_lines": skipped,
        "filtered": dict(sorted(collector.filtered.items())),
        "duplicates_removed": {
            "exact": collector.duplicates.get("exact", 0),
            "near": collector.duplicates.get("near", 0),
        },
        "kept": len(train) + len(val),
        "train": len(train),
        "val": len(val),
        **compute_stats([*train, *val]),
    }


def _write_outputs(
    out: Path, train: list[dict[str, Any]], val: list[dict[str, Any]], stats: dict[str, Any], tok: ChatTokenizer
) -> None:
    """Write each output file atomically (:func:`rlchat.core.files.atomic_path`): no partial outputs."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    meta = {b"rlchat": json.dumps({"version": __version__, "tokenizer": tok.to_dict()}).encode()}
    schema = PREPARED_SCHEMA.with_metadata(meta)
    for name, rows in (("train", train), ("val", val)):
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
        with atomic_path(out / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp)
    atomic_write_json(out / "stats.json", stats, indent=2, ensure_ascii=False)
    with atomic_path(out / "stats.png") as tmp:
        plot_stats(train, val, tmp)


def plot_stats(train: list[dict[str, Any]], val: list[dict[str, Any]], path: Path) -> None:
    """``stats.png``: histograms of conversation lengths (train vs val) and of turn lengths by role."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    conv = [[r["n_tokens"] for r in rows if r.get("n_tokens") is not None] for rows in (train, val)]
    ax1.hist(conv, bins=40, label=[f"train ({len(train)})", f"val ({len(val)})"], stacked=True)
    ax1.set(title="tokens per conversation", xlabel="tokens", ylabel="records")
    ax1.legend()
    by_role: dict[str, list[int]] = {"system": [], "user": [], "assistant": []}
    for r in [*train, *val]:
        msgs = [*(r["messages"] or []), *(r.get("chosen") or []), *(r.get("rejected") or [])]
        for m, n in zip(msgs, r.get("turn_tokens") or []):
            by_role[m["role"]].append(n)
    roles = [role for role, v in by_role.items() if v]
    if roles:
        ax2.hist([by_role[role] for role in roles], bins=40, label=roles, stacked=True)
        ax2.legend()
    ax2.set(title="tokens per turn", xlabel="tokens", ylabel="turns")
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------------------------
# stats table
# ---------------------------------------------------------------------------------------------------------------


def load_stats(path: str | Path) -> dict[str, Any]:
    """``stats.json`` of a prepared directory; for a directory without one, statistics computed from its Parquet."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".json"):
        return json.loads(p.read_text(encoding="utf-8"))
    if p.is_dir() and (p / "stats.json").is_file():
        return json.loads((p / "stats.json").read_text(encoding="utf-8"))
    if p.is_dir() and (p / "train.parquet").is_file():
        import pyarrow.parquet as pq

        rows: dict[str, list[dict[str, Any]]] = {}
        for name in ("train", "val"):
            f = p / f"{name}.parquet"
            rows[name] = pq.read_table(f).to_pylist() if f.is_file() else []
        stats = compute_stats(rows["train"] + rows["val"])
        stats.update(train=len(rows["train"]), val=len(rows["val"]), kept=stats["records"])
        return stats
    raise DataError(
        f"{p}: not a prepared dataset; expected a directory written by `rlchat data prepare` (with stats.json or "
        "train.parquet) or a stats.json file"
    )


def _num(x: Any) -> str:
    if isinstance(x, float) and not x.is_integer():
        return f"{x:,.2f}"
    return f"{int(x):,}"


def format_stats_table(stats: dict[str, Any], title: str = "") -> str:
    """The table ``rlchat data stats`` prints."""
    lines: list[str] = []
    w = 22
    if title:
        lines.append(title)
    kept, train, val = stats.get("kept", stats.get("records", 0)), stats.get("train", 0), stats.get("val", 0)
    dups = stats.get("duplicates_removed", {})
    filtered = stats.get("filtered", {})
    if "read" in stats:
        lines.append(
            f"{'records':<{w}}read {_num(stats['read'])}  skipped {_num(stats['skipped'])}  "
            f"filtered {_num(sum(filtered.values()))}  duplicates {_num(sum(dups.values()))}  "
            f"kept {_num(kept)} (train {_num(train)}, val {_num(val)})"
        )
    else:
        lines.append(f"{'records':<{w}}{_num(kept)} (train {_num(train)}, val {_num(val)})")
    lines.append("")
    read_by = stats.get("read_by_format", {})
    kept_by = stats.get("records_by_format", {})
    lines.append(f"{'format':<{w}}{'read':>8}{'kept':>8}")
    for fmt in sorted(set(read_by) | set(kept_by)):
        lines.append(
            f"{'  ' + fmt:<{w}}{_num(read_by.get(fmt, 0)) if read_by else '-':>8}{_num(kept_by.get(fmt, 0)):>8}"
        )
    lines.append("")
    cols = ("min", "median", "p95", "max", "mean")
    lines.append(f"{'':<{w}}" + "".join(f"{c:>9}" for c in cols))
    lines.append(f"{'turns per record':<{w}}" + "".join(f"{_num(stats['turns'][c]):>9}" for c in cols))
    tokens = stats.get("tokens", {})
    for key, label in (
        ("conversation", "tokens / conversation"),
        ("turn", "tokens / turn"),
        ("turn_system", "  system turns"),
        ("turn_user", "  user turns"),
        ("turn_assistant", "  assistant turns"),
    ):
        if key in tokens and tokens[key]["count"]:
            lines.append(f"{label:<{w}}" + "".join(f"{_num(tokens[key][c]):>9}" for c in cols))
    lines.append("")
    roles = stats.get("roles", {})
    lines.append(f"{'roles (messages)':<{w}}" + "  ".join(f"{r} {_num(n)}" for r, n in roles.items()))
    if stats.get("prompt_only"):
        lines.append(
            f"{'prompt-only records':<{w}}{_num(stats['prompt_only'])} (no reply: usable as data.prompts, eval or "
            "`rlchat generate` input; refused as SFT / reward-model data)"
        )
    q = stats.get("quality", {})
    if q.get("count"):
        lines.append(
            f"{'quality':<{w}}n {_num(q['count'])}  missing {_num(q['missing'])}  min {q['min']:.2f}  "
            f"median {q['median']:.2f}  max {q['max']:.2f}"
        )
        peak = max(b["count"] for b in q.get("histogram", [])) or 1
        for b in q.get("histogram", []):
            bar = "#" * round(30 * b["count"] / peak)
            lines.append(f"{'':<{w}}{b['low']:.2f}-{b['high']:.2f} {bar} {_num(b['count'])}")
    else:
        lines.append(f"{'quality':<{w}}no scores ({_num(q.get('missing', kept))} records without one)")
    if stats.get("safety"):
        lines.append(f"{'safety':<{w}}" + "  ".join(f"{k} {_num(v)}" for k, v in stats["safety"].items()))
    lines.append("")
    if "read" in stats:
        lines.append(
            f"{'duplicates removed':<{w}}exact {_num(dups.get('exact', 0))}  near {_num(dups.get('near', 0))}"
        )
        by_reason = "  ".join(f"{k} {_num(v)}" for k, v in filtered.items()) or "none"
        lines.append(f"{'filtered by reason':<{w}}{by_reason}")
        lines.append(f"{'skipped (bad lines)':<{w}}{_num(stats['skipped'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI targets
# ---------------------------------------------------------------------------------------------------------------


__all__ = [
    "PrepareResult",
    "build_stats",
    "format_stats_table",
    "load_stats",
    "plot_stats",
    "prepare",
]
