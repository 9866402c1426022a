"""``rlchat generate``: batch inference over many prompts on Ray Data, resumable shard by shard.

    rlchat generate CKPT --input prompts.jsonl --output out/ [--n 4] [--batch-size 32] [--concurrency 2]
        [--jsonl] [--logprobs] [--rewards] [--on-error fail|skip] [--address ADDR]
        [--temperature 0.7] [--top-k 0] [--top-p 1] [--repetition-penalty 1] [--max-tokens 64]
        [--stop STR ...] [--seed S] [--beams 1]

The job, in order (each step is a function here; docs/batch_generate.md has the user's view):

1. **Read and validate** (:func:`read_prompts`, in the driver, before any model is loaded). Inputs go through
   :mod:`rlchat.core.data`'s readers, line decoding, record validation and error policy, so bad lines are handled as
   ``rlchat data`` handles them: the first one fails with ``path:line: field: expected ..., found ...``, or
   ``--on-error skip`` skips and reports each. A record needs only a prompt: inputs are parsed on data's
   reply-optional path (:func:`rlchat.core.data.parse_record` with ``require_reply=False``), so ``{"prompt": "..."}``,
   a ``messages`` / ``conversations`` list ending with the user turn, or an alpaca ``instruction`` without
   ``output`` are inputs as PPO prompt sets are. The prompt (:func:`prompt_of`) is rendered
   with the one chat template; a prompt that leaves no room for ``--max-tokens`` in the model's context is a bad
   record too. Validating everything up front costs seconds and means a bad line at row 900,000 fails before
   hours of generation, not after.
2. **Shard** (:func:`plan_shards`): the kept prompts, in input order, are cut into shards of ``shard_rows``
   prompts (:data:`SHARD_ROWS`), shard ``k`` holding rows ``[k * shard_rows, (k + 1) * shard_rows)``. Each shard
   carries a hash of its input rows.
3. **Generate** (:func:`run_shards`): the prompts of the shards not yet written become one Ray Data dataset
   (``from_items``, in blocks of one call's worth) mapped with ``map_batches`` over a fixed pool of
   ``--concurrency`` :class:`GenerateWorker` actors. Each actor loads the checkpoint **once** in ``__init__`` and
   per call generates the ``n`` samples of ``--batch-size // n`` prompts as one engine batch
   (:func:`generate_rows`: :class:`~rlchat.core.generation.GenerationEngine`, plus
   :class:`~rlchat.core.rewards.RewardFunction` with ``--rewards``). The same code scales from a laptop to a cluster:
   actors go wherever Ray has room, one CPU and one torch thread each, or one GPU each when the cluster has
   GPUs (:func:`worker_resources` says why one thread).
4. **Write shards** (:class:`~rlchat.distributed.shard_store.ShardStore`): the driver collects the returned rows per
shard (with a tqdm bar) and
   writes each finished shard atomically -- ``DIR/shards/part-00007.parquet`` through a temporary file, fsync
   and rename -- then rewrites ``DIR/manifest.json``. A shard file is self-describing: its Parquet metadata holds
   the run settings, its index and its input hash.
5. **Assemble** (:func:`assemble_outputs`): when every shard exists, ``DIR/generations.parquet`` (and
   ``DIR/generations.jsonl`` with ``--jsonl``) are written from the shards in order, also through temporary
   files, and the manifest is marked complete.

Resuming: rerunning with the same output directory reads the shard files already there and generates only the
others -- nothing is generated twice and nothing is lost, whether the earlier run finished, failed or was killed
(SIGKILL included: a shard is either complete under its final name or absent). A shard whose input rows changed
(a different hash) is regenerated. Settings that change the outputs (checkpoint, decoding options, ``n``, seed,
``--logprobs``, ``--rewards``, shard size) must match the earlier run, or the run stops and names what differs;
``--batch-size``, ``--concurrency`` and ``--address`` may change between runs.

Seeds: sample ``s`` of input row ``r`` is drawn with seed ``derive_seed(seed, r, s)`` and the engine's
counter-based per-row RNG, so a reply does not depend on batching, scheduling or which run produced it (up to
float noise of batched matmuls). Without ``--seed`` a random base seed is drawn once and stored with the shards, so a
resumed run continues with it.

Output columns (:func:`output_schema`), one row per sample, ordered by ``(row, sample)``: ``row``, ``sample``,
``source`` (``path:line``), ``messages`` (the prompt the reply answers), ``input_reply`` (the input's own
assistant reply, if it had one), ``reference``, ``meta`` (JSON of the record's other keys, e.g. an ``id``),
``reply`` (text, cut before a stop string), ``finish_reason`` (``stop`` / ``length``), ``prompt_tokens``,
``completion_tokens`` (generated ids, end-of-turn included), ``seed``; with ``--logprobs`` ``completion_ids`` and
``logprobs`` (per generated token, under the distribution sampled from, see :mod:`rlchat.core.generation`); with
``--rewards`` ``reward`` (the weighted total) and ``reward_components`` (one field per enabled component of the
checkpoint's ``reward`` config).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import math
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from rlchat import __version__
from rlchat.core.data import (
    FORMATS,
    MAX_LINE_BYTES,
    MESSAGES_TYPE,
    Collector,
    Message,
    Record,
    Skipped,
    decode_line,
    expand_inputs,
    iter_chunks,
    parse_record,
)
from rlchat.core.errors import ConfigError, DataError, RLChatError
from rlchat.core.text_stream import cut_at_first_stop
from rlchat.distributed.shard_store import (  # the output file names stay importable from here (users read them)
    JSONL_FILE,  # noqa: F401
    MANIFEST_FILE,
    PARQUET_FILE,  # noqa: F401
    SHARDS_DIR,
    ShardStore,
    _json_settings,
    _shard_stats,
    assemble_outputs,
    settings_differences,
)

if TYPE_CHECKING:
    from rlchat.core.checkpoint import Checkpoint
    from rlchat.core.generation import GenerationEngine, SamplingParams
    from rlchat.core.rewards import RewardFunction
    from rlchat.core.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

SHARD_ROWS = 256
"""Input prompts per shard: the unit of resumption (a killed run loses at most the shards in flight)."""
"""Parquet schema-metadata key of a shard file: JSON with the settings, shard index, input hash and counts."""
MAX_SKIPPED_IN_MANIFEST = 10_000
"""manifest.json lists at most this many skipped lines (the count is always exact)."""

# ---------------------------------------------------------------------------------------------------------------
# Records: the prompt of a record
# ---------------------------------------------------------------------------------------------------------------


def prompt_of(rec: Record) -> tuple[list[Message], str | None]:
    """The messages a new reply answers (:meth:`rlchat.core.data.Record.prompt_messages`), and the input's own reply
    to them (if it has one).

    A conversation ending with an assistant message is answered anew from the messages before it (the input
    reply is returned for comparison); one ending with a user message -- a prompt-only record included -- is
    answered as a whole. A preference record's prompt is its shared prompt (no single input reply).

    Returns:
        (prompt messages, the input's last assistant reply or None)
    """
    ends_with_reply = not rec.is_preference and bool(rec.messages) and rec.messages[-1]["role"] == "assistant"
    return rec.prompt_messages(), rec.messages[-1]["content"] if ends_with_reply else None


@dataclass
class PromptRow:
    """One validated input prompt, numbered in input order over the kept records."""

    row: int
    record: Record
    messages: list[Message]
    prompt_ids: list[int]
    input_reply: str | None


@dataclass
class PromptSet:
    """What :func:`read_prompts` returns."""

    rows: list[PromptRow]
    skipped: list[Skipped]
    counts_by_format: dict[str, int]
    files: list[Path]


def read_prompts(
    inputs: Sequence[str | Path],
    tokenizer: ChatTokenizer,
    fmt: str = "auto",
    on_error: str = "fail",
    max_prompt_tokens: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> PromptSet:
    """Read, validate and render the prompts of ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` files or directories.

    Args:
        inputs: files or directories.
        tokenizer: the checkpoint's chat tokenizer (renders each prompt).
        fmt: ``"auto"`` or a name from :data:`rlchat.core.data.FORMATS`.
        on_error: ``"fail"`` or ``"skip"`` (:class:`rlchat.core.data.Collector` applies it, as ``rlchat data`` does).
        max_prompt_tokens: a rendered prompt longer than this is a bad record (None = no limit).
        max_line_bytes: a longer input line is a bad record (``data.max_line_bytes``, as ``rlchat data`` reads).

    Returns:
        The kept prompts in input order, the skipped lines with reasons, counts per format and the files read.

    Raises:
        DataError: ``on_error="fail"`` and a record is bad (``path:line: ...``), or a path does not exist.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")
    files = expand_inputs(inputs)
    collector = Collector(on_error)
    for chunk in iter_chunks(files, max_line_bytes=max_line_bytes):
        path = chunk["path"]
        for line, data, size in zip(chunk["lines"], chunk["data"], chunk["sizes"]):
            source = f"{path}:{line}"
            row: dict[str, Any] = {"path": path, "line": line, "source": source, "error": None, "format": None}
            try:
                rec = parse_record(decode_line(data, size, line, max_line_bytes), source, fmt, require_reply=False)
                messages, input_reply = prompt_of(rec)
                if not messages:
                    raise ValueError(
                        "messages: expected a user message before the reply, found a conversation that starts "
                        "with the assistant; add the user message the reply answers"
                    )
                ids = tokenizer.render_prompt(messages)
                if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                    raise ValueError(
                        f"prompt: expected at most {max_prompt_tokens} tokens (the model's context minus "
                        f"--max-tokens), found {len(ids)}; shorten the conversation or lower --max-tokens"
                    )
            except ValueError as e:
                row["error"] = str(e)
            else:
                row.update(format=rec.format, prompt=(rec, messages, ids, input_reply))
            collector.add(row)
        if chunk.get("file_error"):
            line = int(chunk.get("error_line") or 0)
            source = f"{path}:{line}" if line else path
            collector.add({"path": path, "line": line, "source": source, "error": chunk["file_error"]})
    rows = [
        PromptRow(row=i, record=rec, messages=msgs, prompt_ids=ids, input_reply=reply)
        for i, (rec, msgs, ids, reply) in enumerate(r["prompt"] for r in collector.kept)
    ]
    return PromptSet(rows, collector.skipped, dict(collector.counts_by_format), files)


# ---------------------------------------------------------------------------------------------------------------
# Shards: the plan, the input tables
# ---------------------------------------------------------------------------------------------------------------


def derive_sample_seed(seed: int, row: int, sample: int) -> int:
    """The seed of sample ``sample`` of input row ``row``: the same in every run, batch and process."""
    from rlchat.distributed.rollout import derive_seed

    return derive_seed(seed, row, sample)


def _hash_rows(rows: Sequence[PromptRow]) -> str:
    """Hash of what a shard's outputs depend on: row numbers, prompt ids and record contents.

    The record's ``source`` (``path:line``) is left out, so that naming the same file differently
    (``data/p.jsonl`` vs ``./data/p.jsonl``, or after moving it) does not regenerate finished shards.
    """
    h = hashlib.blake2b(digest_size=16)
    for r in rows:
        payload = [r.row, r.prompt_ids, r.input_reply, {**r.record.to_row(), "source": None}]
        h.update(json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()


@dataclass(frozen=True)
class Shard:
    """Shard ``index``: input rows ``rows`` and the hash that says whether a written shard still matches them."""

    index: int
    rows: Sequence[PromptRow]
    input_hash: str


def plan_shards(rows: Sequence[PromptRow], shard_rows: int = SHARD_ROWS) -> list[Shard]:
    """Cut the prompts, in input order, into shards of ``shard_rows`` (the last may be shorter).

    Deterministic: the same input gives the same shards and hashes in every run, whatever batch size or
    concurrency is used, which is what makes resuming by shard safe.
    """
    if shard_rows < 1:
        raise ConfigError(f"shard_rows={shard_rows}: expected at least 1 prompt per shard")
    shards = []
    for k, start in enumerate(range(0, len(rows), shard_rows)):
        part = rows[start : start + shard_rows]
        shards.append(Shard(k, part, _hash_rows(part)))
    return shards


INPUT_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("source", pa.string()),
        ("messages", MESSAGES_TYPE),
        ("input_reply", pa.string()),
        ("reference", pa.string()),
        ("meta", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("record", pa.string()),  # Record.to_row() as JSON, for --rewards only (references, plugin metadata)
    ]
)
"""Columns of the rows the workers receive: one row per prompt (a worker draws its ``n`` samples)."""
_PASSTHROUGH = ("row", "source", "messages", "input_reply", "reference", "meta")
"""Input columns copied into every sample's output row."""


def shard_input_rows(shard: Shard, with_record: bool = False) -> list[dict[str, Any]]:
    """The prompts of a shard as :data:`INPUT_SCHEMA` rows (``record`` left empty unless ``with_record``)."""
    return [
        {
            "row": r.row,
            "source": r.record.source,
            "messages": r.messages,
            "input_reply": r.input_reply,
            "reference": r.record.reference,
            "meta": json.dumps(r.record.meta, ensure_ascii=False, sort_keys=True),
            "prompt_ids": r.prompt_ids,
            "record": json.dumps(r.record.to_row(), ensure_ascii=False) if with_record else None,
        }
        for r in shard.rows
    ]


# ---------------------------------------------------------------------------------------------------------------
# Generation of one batch (what a worker runs; the benchmark's in-process loop runs it too)
# ---------------------------------------------------------------------------------------------------------------


def output_schema(logprobs: bool = False, reward_components: Sequence[str] | None = None) -> pa.Schema:
    """Columns of the output rows (see the module docstring); optional columns per ``--logprobs`` / ``--rewards``."""
    fields = [INPUT_SCHEMA.field("row"), pa.field("sample", pa.int32())]
    fields += [INPUT_SCHEMA.field(name) for name in _PASSTHROUGH[1:]]
    fields += [
        pa.field("reply", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("seed", pa.int64()),
    ]
    if logprobs:
        fields += [pa.field("completion_ids", pa.list_(pa.int32())), pa.field("logprobs", pa.list_(pa.float32()))]
    if reward_components is not None:
        fields += [
            pa.field("reward", pa.float64()),
            pa.field("reward_components", pa.struct([(name, pa.float64()) for name in reward_components])),
        ]
    return pa.schema(fields)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text cut where the first stop string completes, as the Serve endpoint cuts a reply (stop strings are
    never part of a reply)."""
    return cut_at_first_stop(text, stop_strings)[0]


def generate_rows(
    engine: GenerationEngine,
    params: SamplingParams,
    batch: pa.Table,
    n: int,
    seed: int,
    schema: pa.Schema,
    reward_fn: RewardFunction | None = None,
) -> pa.Table:
    """Generate ``n`` replies for every prompt of ``batch`` (one engine batch of B * n rows) and build the rows.

    Args:
        engine: the generation engine (its tokenizer decodes the replies).
        params: decoding settings (``params.seed`` is unused: each sample's seed is :func:`derive_sample_seed`).
        batch: B prompts as :data:`INPUT_SCHEMA` columns (any column order; ``record`` only with ``reward_fn``).
        n: samples per prompt.
        seed: the run's base seed.
        schema: :func:`output_schema` for the run's options.
        reward_fn: score each reply with it (``--rewards``), or None.

    Returns:
        B * n rows of ``schema``, ordered by (prompt in ``batch``, sample).
    """
    # Ray Data builds blocks by inferring types (an all-null column comes as null, ids as int64): normalise.
    batch = batch.select(INPUT_SCHEMA.names).cast(INPUT_SCHEMA)
    take = pa.array(np.repeat(np.arange(batch.num_rows), n))
    rows = batch.column("row").to_pylist()
    samples = [s for _ in rows for s in range(n)]
    seeds = [derive_sample_seed(seed, r, s) for r in rows for s in range(n)]
    prompts = [p for p in batch.column("prompt_ids").to_pylist() for _ in range(n)]
    res = engine.generate(prompts, params, seeds)
    tok = engine.tokenizer
    replies = [cut_at_stop(tok.decode(t, skip_special=True), params.stop_strings) for t in res.tokens]
    cols: dict[str, Any] = {name: batch.column(name).take(take) for name in _PASSTHROUGH}
    cols.update(
        sample=samples,
        reply=replies,
        finish_reason=res.finish_reasons,
        prompt_tokens=[len(p) for p in prompts],
        completion_tokens=[len(t) for t in res.tokens],
        seed=seeds,
    )
    if "completion_ids" in schema.names:
        cols["completion_ids"] = res.tokens
        cols["logprobs"] = res.logprobs
    if reward_fn is not None:
        records = [Record.from_row(json.loads(s)) for s in batch.column("record").take(take).to_pylist()]
        messages = cols["messages"].to_pylist()
        scored = reward_fn.score_batch(messages, replies, res.tokens, records)
        cols["reward"] = [r.total for r in scored]
        names = [f.name for f in schema.field("reward_components").type]
        cols["reward_components"] = [{k: r.components.get(k) for k in names} for r in scored]
    return pa.Table.from_pydict({name: cols[name] for name in schema.names}, schema=schema)


def set_thread_budget(n: int) -> None:
    """Give this process ``n`` torch threads (docs/ARCHITECTURE.md "Threads": budgets sum to the cores owned)."""
    from rlchat.distributed.rollout import set_torch_threads

    set_torch_threads(n)


class GenerateWorker:
    """Ray Data callable class: loads the checkpoint once in ``__init__``, then generates one batch per call.

    Args:
        checkpoint: checkpoint directory (must be readable on the worker's node: shared storage on a cluster).
        params: decoding settings.
        n: samples per prompt.
        seed: the run's base seed.
        logprobs: add ``completion_ids`` / ``logprobs`` columns.
        reward_components: the enabled reward components (``--rewards``), or None.
        device: ``"cpu"`` or ``"cuda"``.
        threads: torch threads of this actor (its CPU reservation).
    """

    def __init__(
        self,
        checkpoint: str,
        params: SamplingParams,
        n: int = 1,
        seed: int = 0,
        logprobs: bool = False,
        reward_components: Sequence[str] | None = None,
        device: str = "cpu",
        threads: int = 1,
    ) -> None:
        from transformers.utils import logging as hf_logging

        from rlchat.core.checkpoint import load_policy
        from rlchat.core.generation import GenerationEngine

        hf_logging.disable_progress_bar()  # its "Loading weights" bar would interleave the driver's bar
        if device == "cpu":
            set_thread_budget(threads)
        model, tok, ckpt = load_policy(checkpoint, device=device)
        self.engine = GenerationEngine(model.eval(), tok, precision=ckpt.config.model.precision)
        self.params, self.n, self.seed = params, n, seed
        self.schema = output_schema(logprobs, reward_components)
        self.reward_fn = None
        if reward_components is not None:
            from rlchat.core.rewards import RewardFunction

            self.reward_fn = RewardFunction(ckpt.config.reward, tok)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return generate_rows(self.engine, self.params, batch, self.n, self.seed, self.schema, self.reward_fn)


# ---------------------------------------------------------------------------------------------------------------
# Ray: resources, the Ray Data job
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerResources:
    """What each :class:`GenerateWorker` actor reserves and uses."""

    num_cpus: float
    num_gpus: float
    threads: int
    device: str


def worker_resources(concurrency: int) -> WorkerResources:
    """One GPU per actor when the cluster has GPUs; else one CPU and one torch thread per actor.

    Why one thread: on this project's 2-core machine, shared with other jobs, generation with 2 torch threads
    ran 12-20x *slower* than with 1 (OpenMP barriers stall when the other core is busy; docs/ARCHITECTURE.md
    "Threads" records the same for the learner), while a second actor with its own thread adds throughput without
    such stalls. So ``--concurrency`` is the knob: set it to the cores (or GPUs) to use. More actors than CPUs share
    them (fractional reservations) with a warning.
    """
    import ray

    if concurrency < 1:
        raise ConfigError(f"--concurrency {concurrency}: expected at least 1 actor")
    total = ray.cluster_resources()
    if total.get("GPU", 0) >= 1:
        if concurrency > total["GPU"]:
            logger.warning(
                "--concurrency %d exceeds the cluster's %d GPUs: the extra actors wait for a GPU (set --concurrency "
                "to the GPU count to silence this)",
                concurrency,
                int(total["GPU"]),
            )
        return WorkerResources(num_cpus=1, num_gpus=1, threads=1, device="cuda")
    cpus = float(total.get("CPU", 1))
    if concurrency > cpus:
        logger.warning(
            "--concurrency %d exceeds the cluster's %d CPUs: the actors share cores; set --concurrency to at most "
            "the CPU count for the best throughput",
            concurrency,
            int(cpus),
        )
    return WorkerResources(num_cpus=min(1.0, cpus / concurrency), num_gpus=0, threads=1, device="cpu")


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Our tqdm bar replaces Ray Data's per-operator bars and start-up log lines (restored afterwards)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        data_logger.setLevel(saved_level)
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats = saved


def _user_error(e: BaseException) -> RLChatError | None:
    """The rlchat error inside a Ray / Ray Data exception chain (a worker's bad checkpoint, reward plugin, ...)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, RLChatError):
            return x
        stack += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    return None


def prompts_per_call(batch_size: int, n: int) -> int:
    """Prompts per ``map_batches`` call: ``--batch-size`` counts samples (the engine's batch is prompts * n)."""
    return max(1, batch_size // n)


def run_shards(
    items: list[dict[str, Any]],
    worker_kwargs: dict[str, Any],
    batch_size: int,
    concurrency: int,
    on_rows: Callable[[pa.Table], None],
) -> None:
    """Map input prompts through a pool of :class:`GenerateWorker` actors with Ray Data.

    The prompts go into blocks of one call's worth each, so that every actor of the pool gets work even when
    few shards are pending; blocks are processed roughly in input order, so shards complete one after another.
    ``from_items`` computes block metadata in this process: ``from_arrow`` starts a remote metadata task per
    table, and those task workers aborted at exit (``Mutex corrupt``) in 2 of 5 runs here (Ray 2.60).

    Args:
        items: :data:`INPUT_SCHEMA` rows of the pending prompts, in input order.
        worker_kwargs: :class:`GenerateWorker` constructor arguments (``device`` / ``threads`` are set here).
        batch_size: samples per generation batch (:func:`prompts_per_call` prompts per call).
        concurrency: actors in the pool.
        on_rows: called in this process with every block of output rows, as soon as it arrives.

    Raises:
        RLChatError: a worker raised one (bad checkpoint, reward plugin, ...); other failures propagate.
    """
    import ray.data

    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected at least 1 sample per batch")
    res = worker_resources(concurrency)
    kwargs = {**worker_kwargs, "device": res.device, "threads": res.threads}
    per_call = prompts_per_call(batch_size, int(worker_kwargs.get("n", 1)))
    logger.info("generate: %d actor(s), each %s; %d prompt(s) per call", concurrency, res, per_call)
    with _quiet_ray_data():
        source = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_call)))
        ds = source.map_batches(
            GenerateWorker,  # type: ignore[arg-type]  # a callable class: Ray Data creates one per actor
            batch_size=per_call,
            batch_format="pyarrow",
            fn_constructor_kwargs=kwargs,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
        )
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                on_rows(out)  # type: ignore[arg-type]
        except Exception as e:
            user = _user_error(e)
            if user is not None:
                raise user from None
            raise


# ---------------------------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    """What :func:`generate` did."""

    output: Path
    files: list[Path]
    prompts: int
    samples: int
    shards: int
    shards_reused: list[int]
    shards_generated: list[int]
    skipped: list[Skipped]
    totals: dict[str, Any]
    seconds: float
    generate_seconds: float
    """Wall time of the generation phase of this run (0 when every shard was already written)."""
    manifest: dict[str, Any] = field(default_factory=dict)


def _max_prompt_tokens(ckpt: Checkpoint, max_new_tokens: int) -> int | None:
    """Longest prompt that still leaves ``max_new_tokens`` positions (None when the model has no position limit)."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(ckpt.path)
        limit = getattr(hf.get_text_config(), "max_position_embeddings", None)
    except Exception:  # the workers' load reports a bad config properly; here it only bounds prompt lengths
        limit = None
    if not limit:
        return None
    if int(limit) - max_new_tokens < 1:
        raise ConfigError(
            f"--max-tokens {max_new_tokens}: leaves no room for a prompt in the model's {limit} positions; "
            f"expected at most {int(limit) - 2}"
        )
    return int(limit) - max_new_tokens


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _check_options(params: SamplingParams, n: int, batch_size: int, concurrency: int, on_error: str) -> None:
    """Reject invalid or contradictory options before anything is read (ConfigError: what, value, fix)."""
    checks = [
        (n >= 1, f"--n {n}: expected at least 1 sample per prompt"),
        (batch_size >= 1, f"--batch-size {batch_size}: expected at least 1 sample per batch"),
        (concurrency >= 1, f"--concurrency {concurrency}: expected at least 1 actor"),
        (on_error in ("fail", "skip"), f"--on-error {on_error!r}: expected 'fail' or 'skip'"),
        (
            params.num_beams == 1 or n == 1,
            f"--beams {params.num_beams} with --n {n}: beam search is deterministic, so every sample would be the "
            "same reply; use --n 1 with beams, or sampling (--beams 1, --temperature > 0) for several samples",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if params.greedy and n > 1:
        logger.warning(
            "--temperature 0 (greedy) with --n %d: every sample of a prompt is the same reply; set --temperature > 0 "
            "for different samples, or --n 1",
            n,
        )


def _reward_components(ckpt: Checkpoint, tokenizer: ChatTokenizer) -> list[str]:
    """The enabled components of the checkpoint's reward config (built once here, so a bad config fails early)."""
    from rlchat.core.rewards import RewardFunction

    names = RewardFunction(ckpt.config.reward, tokenizer).component_names
    if not names:
        raise ConfigError(
            f"--rewards: the checkpoint's reward config ({ckpt.path / 'meta.json'}) enables no component (every "
            "weight is 0); drop --rewards, or use a checkpoint whose config weights a reward component"
        )
    return names


def run_settings(
    ckpt: Checkpoint,
    params: SamplingParams,
    n: int,
    seed: int,
    shard_rows: int,
    fmt: str,
    logprobs: bool,
    rewards: bool,
) -> dict[str, Any]:
    """Everything that changes the outputs, as JSON: shards written under other settings cannot be reused."""
    return _json_settings(
        {
            "checkpoint": str(ckpt.path.resolve()),
            "checkpoint_step": ckpt.step,
            "checkpoint_created": ckpt.meta.get("created"),
            "n": n,
            "seed": seed,
            "shard_rows": shard_rows,
            "format": fmt,
            "logprobs": logprobs,
            "rewards": ckpt.config.to_dict()["reward"] if rewards else None,
            "sampling": {
                "max_new_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_k": params.top_k,
                "top_p": params.top_p,
                "repetition_penalty": params.repetition_penalty,
                "stop_strings": list(params.stop_strings),
                "num_beams": params.num_beams,
            },
        }
    )


def reusable_shards(store: ShardStore, shards: Sequence[Shard], settings: dict[str, Any]) -> list[int]:
    """Indices of the shards already written for this input and these settings (the rest must be generated).

    Raises:
        ConfigError: a shard in the directory was written with other settings (names each difference).
    """
    existing = store.existing()
    for meta in existing.values():
        diffs = settings_differences(meta.get("settings") or {}, settings)
        if diffs:
            raise ConfigError(
                f"--output {store.dir}: holds generations made with other settings ({'; '.join(diffs)}); rerun "
                f"with the earlier options to resume, or choose a new --output (or delete {store.dir}) to start over"
            )
    reused = []
    for s in shards:
        if s.index not in existing:
            continue
        if existing[s.index].get("input_hash") == s.input_hash:
            reused.append(s.index)
        else:
            logger.warning("%s: its input rows changed since it was written; regenerating it", store.path(s.index))
    for index in sorted(set(existing) - {s.index for s in shards}):
        logger.info("%s: beyond this input's %d shards; removing it", store.path(index), len(shards))
        store.path(index).unlink()
    return reused


class ShardCollector:
    """Gathers the output rows of each pending shard; writes a shard (and the manifest) once all its rows are in.

    Args:
        store: where shards go.
        pending: the shards being generated.
        n: samples per prompt.
        shard_rows: prompts per shard (maps a row index to its shard).
        settings: the run settings (stored in every shard file).
        on_shard: called with ``(index, stats)`` after a shard is written.
    """

    def __init__(
        self,
        store: ShardStore,
        pending: Sequence[Shard],
        n: int,
        shard_rows: int,
        settings: dict[str, Any],
        on_shard: Callable[[int, dict[str, Any]], None],
    ) -> None:
        self.store, self.n, self.shard_rows, self.settings, self.on_shard = store, n, shard_rows, settings, on_shard
        self.pending = {s.index: s for s in pending}
        self._parts: dict[int, list[pa.Table]] = defaultdict(list)
        self._count: Counter[int] = Counter()

    def add(self, table: pa.Table) -> None:
        """Take one block of output rows (rows of several shards possible)."""
        if table.num_rows == 0:
            return
        shard_of = table.column("row").to_numpy() // self.shard_rows
        for index in np.unique(shard_of).tolist():
            part = table.filter(pa.array(shard_of == index))
            self._parts[index].append(part)
            self._count[index] += part.num_rows
            expected = len(self.pending[index].rows) * self.n
            if self._count[index] > expected:  # would mean a duplicated batch: never write it silently
                raise RuntimeError(f"shard {index}: received {self._count[index]} rows, expected {expected}")
            if self._count[index] == expected:
                self._write(index)

    def _write(self, index: int) -> None:
        table = pa.concat_tables(self._parts.pop(index)).sort_by([("row", "ascending"), ("sample", "ascending")])
        stats = _shard_stats(table)
        meta = {
            "shard": index,
            "input_hash": self.pending[index].input_hash,
            "settings": self.settings,
            "stats": stats,
            "rlchat_version": __version__,
        }
        self.store.write(index, table, meta)
        self.on_shard(index, stats)

    @property
    def incomplete(self) -> list[int]:
        """Pending shards not written yet."""
        return sorted(set(self.pending) - set(self._written))

    @property
    def _written(self) -> set[int]:
        return {i for i in self.pending if self._count[i] == len(self.pending[i].rows) * self.n}


def generate(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    output: str | Path,
    params: SamplingParams,
    *,
    n: int = 1,
    batch_size: int = 32,
    concurrency: int = 1,
    jsonl: bool = False,
    logprobs: bool = False,
    rewards: bool = False,
    fmt: str = "auto",
    on_error: str = "fail",
    address: str | None = None,
    shard_rows: int = SHARD_ROWS,
    progress: bool = True,
) -> GenerateResult:
    """Generate ``n`` replies per input prompt with a checkpoint on Ray Data; resumable (see the module docstring).

    Args:
        checkpoint: an SFT / PPO checkpoint directory, ``<run>/checkpoints/best|latest`` or a run directory.
        inputs: ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` files or directories of them.
        output: output directory (new, or one an earlier run with the same settings wrote into: resumed).
        params: decoding settings; ``params.seed`` is the base seed (None: the earlier run's, or a random one).
        n: samples per prompt.
        batch_size: samples per generation batch (``batch_size // n`` prompts per ``map_batches`` call).
        concurrency: generation actors.
        jsonl: also write ``generations.jsonl``.
        logprobs: add per-token ``completion_ids`` and ``logprobs`` columns.
        rewards: score every reply with the checkpoint's ``reward`` config (total and components).
        fmt: ``"auto"`` or a record format of :mod:`rlchat.core.data`.
        on_error: ``"fail"`` (the first bad record stops the run) or ``"skip"`` (skip and report).
        address: Ray address (None: ``RAY_ADDRESS`` or a local Ray started here; an initialised Ray is reused).
        shard_rows: prompts per shard (the unit of resumption; must match an earlier run's).
        progress: show a tqdm progress bar on stderr.

    Returns:
        A :class:`GenerateResult` (also summarised in ``manifest.json``).

    Raises:
        ConfigError: invalid options, or settings that differ from those of the shards already in ``output``.
        DataError: a bad record in fail mode (``path:line: ...``), missing inputs, or no prompt to generate from.
        CheckpointError: the checkpoint is missing, corrupt or not a policy.
    """
    from tqdm import tqdm

    from rlchat.core.checkpoint import POLICY_STAGES, read_checkpoint, resolve_checkpoint_dir
    from rlchat.core.console import console

    t_start = time.perf_counter()
    # 1. options and the checkpoint (meta and tokenizer only: the workers load the weights)
    _check_options(params, n, batch_size, concurrency, on_error)
    ckpt = read_checkpoint(resolve_checkpoint_dir(checkpoint), expect_stage=POLICY_STAGES)
    components = _reward_components(ckpt, ckpt.tokenizer) if rewards else None

    # 2. read and validate every input record before any generation
    prompts = read_prompts(
        inputs,
        ckpt.tokenizer,
        fmt,
        on_error,
        _max_prompt_tokens(ckpt, params.max_new_tokens),
        max_line_bytes=ckpt.config.data.max_line_bytes,
    )
    if not prompts.rows:
        raise DataError(
            f"{', '.join(map(str, inputs))}: no prompt to generate from (skipped {len(prompts.skipped)} bad "
            "record(s)); check the inputs"
        )

    # 3. the output directory: the earlier run's seed, settings and shards
    store = ShardStore(output)
    store.remove_temporaries()
    old = store.read_manifest() or {}
    seed = params.seed
    if seed is None:  # the earlier run's base seed, so that a resumed run continues with it
        earlier = next(iter(store.existing().values()), {}).get("settings") or old.get("settings") or {}
        seed = int(earlier["seed"]) if "seed" in earlier else secrets.randbits(62)
    settings = run_settings(ckpt, params, n, seed, shard_rows, fmt, logprobs, rewards)
    shards = plan_shards(prompts.rows, shard_rows)
    reused = reusable_shards(store, shards, settings)
    pending = [s for s in shards if s.index not in set(reused)]
    done: dict[int, dict[str, Any]] = {i: store.existing_stats(i) for i in reused}
    run: dict[str, Any] = {"started": _now(), "finished": None, "status": "running", "reused": reused, "generated": []}
    runs = [*old.get("runs", []), run]

    def manifest(status: str) -> dict[str, Any]:
        return build_manifest(store, status, settings, prompts, n, len(shards), done, runs)

    store.write_manifest(manifest("running"))

    # 4. generate the pending shards; each is written as soon as all its rows are back
    gen_seconds = 0.0
    if pending:
        import ray

        from rlchat.distributed.cluster import init_ray

        def on_shard(index: int, stats: dict[str, Any]) -> None:
            done[index] = stats
            bisect.insort(run["generated"], index)  # in shard order: concurrent shards finish in any order
            store.write_manifest(manifest("running"))

        collector = ShardCollector(store, pending, n, shard_rows, settings, on_shard)
        items = [row for s in pending for row in shard_input_rows(s, with_record=rewards)]
        worker_kwargs = {
            "checkpoint": str(ckpt.path.resolve()),
            "params": params,
            "n": n,
            "seed": seed,
            "logprobs": logprobs,
            "reward_components": components,
        }
        started_ray = not ray.is_initialized()
        t_gen = time.perf_counter()
        bar = tqdm(
            total=prompts_count(shards) * n,
            initial=prompts_count([s for s in shards if s.index in set(reused)]) * n,
            unit="reply",
            desc="generate",
            file=console(),
            disable=not progress,
            dynamic_ncols=True,
        )

        def on_rows(table: pa.Table) -> None:
            collector.add(table)
            bar.update(table.num_rows)

        try:
            init_ray(address)
            run_shards(items, worker_kwargs, batch_size, concurrency, on_rows)
        except BaseException:
            run.update(status="failed", finished=_now())
            store.write_manifest(manifest("running"))
            raise
        finally:
            bar.close()
            if started_ray:
                ray.shutdown()
        gen_seconds = time.perf_counter() - t_gen
        if collector.incomplete:  # every row comes back by construction: a bug, never silent data loss
            raise RuntimeError(f"generate: shards {collector.incomplete} did not get all their rows; rerun to resume")

    # 5. assemble the requested outputs from the shards, in order
    files = assemble_outputs(store, len(shards), jsonl)
    run.update(status="complete", finished=_now(), generate_seconds=round(gen_seconds, 3))
    final = manifest("complete")
    final["outputs"] = [f.name for f in files]
    store.write_manifest(final)
    return GenerateResult(
        output=store.dir,
        files=[*files, store.dir / MANIFEST_FILE],
        prompts=len(prompts.rows),
        samples=len(prompts.rows) * n,
        shards=len(shards),
        shards_reused=reused,
        shards_generated=sorted(run["generated"]),
        skipped=prompts.skipped,
        totals=final["totals"],
        seconds=time.perf_counter() - t_start,
        generate_seconds=gen_seconds,
        manifest=final,
    )


def prompts_count(shards: Sequence[Shard]) -> int:
    return sum(len(s.rows) for s in shards)


def build_manifest(
    store: ShardStore,
    status: str,
    settings: dict[str, Any],
    prompts: PromptSet,
    n: int,
    num_shards: int,
    done: dict[int, dict[str, Any]],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """The content of ``manifest.json``: settings, inputs, skipped lines, finished shards, totals and run history.

    Progress and summary for people and scripts; resuming trusts the shard files themselves, not this file.
    """
    return {
        "rlchat_version": __version__,
        "status": status,
        "settings": settings,
        "inputs": [str(f) for f in prompts.files],
        "read_by_format": prompts.counts_by_format,
        "prompts": len(prompts.rows),
        "samples": len(prompts.rows) * n,
        "shards_total": num_shards,
        "shards_done": len(done),
        "skipped": len(prompts.skipped),
        "skipped_lines": [{"source": s.source, "reason": s.reason} for s in prompts.skipped[:MAX_SKIPPED_IN_MANIFEST]],
        "shards": [{"index": i, "file": f"{SHARDS_DIR}/{store.path(i).name}", **done[i]} for i in sorted(done)],
        "totals": _sum_stats(done.values()),
        "outputs": [],
        "runs": runs,
    }


def _sum_stats(stats: Any) -> dict[str, Any]:
    """Totals over shards' stats: prompts, samples, prompt / completion tokens, finish reasons."""
    out: dict[str, Any] = {"prompts": 0, "samples": 0, "prompt_tokens": 0, "completion_tokens": 0}
    reasons: Counter[str] = Counter()
    for s in stats:
        for k in ("prompts", "samples", "prompt_tokens", "completion_tokens"):
            out[k] += s[k]
        reasons.update(s["finish_reasons"])
    out["finish_reasons"] = dict(sorted(reasons.items()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI target
# ---------------------------------------------------------------------------------------------------------------


def format_summary(result: GenerateResult) -> str:
    """The lines ``rlchat generate`` prints after a run."""
    t = result.totals
    reasons = "  ".join(f"{k} {v:,}" for k, v in t["finish_reasons"].items()) or "-"
    lines = [
        f"generated {result.samples:,} replies for {result.prompts:,} prompts "
        f"(shards: {result.shards} total, {len(result.shards_reused)} already written, "
        f"{len(result.shards_generated)} generated now) in {result.seconds:.1f} s",
        f"  tokens: prompt {t['prompt_tokens']:,}  completion {t['completion_tokens']:,}   finish: {reasons}",
    ]
    if result.generate_seconds > 0 and result.shards_generated:
        done = result.manifest.get("shards", [])
        now = [s for s in done if s["index"] in set(result.shards_generated)]
        samples = sum(s["samples"] for s in now)
        toks = sum(s["completion_tokens"] for s in now)
        lines.append(
            f"  this run: {samples / result.generate_seconds:,.1f} replies/s, "
            f"{toks / result.generate_seconds:,.0f} generated tokens/s ({result.generate_seconds:.1f} s generating)"
        )
    lines.append("wrote " + ", ".join(str(f) for f in result.files))
    return "\n".join(lines)


__all__ = [
    "GenerateResult",
    "GenerateWorker",
    "PromptRow",
    "PromptSet",
    "Shard",
    "ShardStore",
    "WorkerResources",
    "assemble_outputs",
    "cut_at_stop",
    "derive_sample_seed",
    "format_summary",
    "generate",
    "generate_rows",
    "output_schema",
    "plan_shards",
    "prompt_of",
    "read_prompts",
    "run_shards",
    "settings_differences",
    "shard_input_rows",
    "ShardCollector",
    "build_manifest",
    "prompts_per_call",
    "reusable_shards",
    "run_settings",
    "worker_resources",
]
