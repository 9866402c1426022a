"""Batch generation throughput: ``rlchat generate``'s Ray Data job vs a plain in-process loop over the same engine.

Both sides decode the same prompts (the built-in ``builtin:task`` data set: 2,000 arithmetic conversations, each
answered anew from its prompt) with the same checkpoint (``configs/demo.yaml``'s model and 4096-token tokenizer,
randomly initialised and saved once), the same decoding options and per-sample seeds, and the same per-batch work
(:func:`rlchat.batch_generate.generate_rows`: engine call, decoding, Arrow rows):

- **in-process loop**: load the policy once, then ``generate_rows`` over batches of ``--batch-size``, with 1 and
  with 2 torch threads;
- **Ray Data job**: :func:`rlchat.batch_generate.generate` (read + validate, actor pool start, generation, shard
  writes, final Parquet) on a local Ray with 2 CPUs, with ``--concurrency`` 1 and 2 (one torch thread per actor).

Reported per side: prompts/s and generated tokens/s over the **whole call** (the Ray job's time includes starting
its actors, which import torch and load the checkpoint, and writing its files; the loop's includes loading the
policy), and in **steady state**: from the first finished batch to the last (the loop times its batches; the
Ray job times the output blocks as they reach the driver, which tracks Ray Data's own per-operator timing to a
few percent). Run order alternates between repeats so background load hits all sides alike; the median over
repeats is printed as a Markdown table for bench/README.md.

Run::

    python bench/batch_generate.py [--prompts 2000] [--max-tokens 32] [--batch-size 32] [--repeats 3]
        [--loop-threads 1 2] [--concurrency 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pyarrow as pa
import torch

import rlchat.batch_generate as bg
from rlchat.checkpoint import load_policy, save_checkpoint
from rlchat.config import load_config
from rlchat.data import builtin_path
from rlchat.generation import GenerationEngine, SamplingParams
from rlchat.model import PolicyValueModel
from rlchat.tokenizer import ChatTokenizer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def build_checkpoint(directory: Path) -> Path:
    """The demo config's policy (random weights: throughput does not depend on what it learned)."""
    cfg = load_config(DEMO)
    torch.manual_seed(0)
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    model = PolicyValueModel.build(cfg, tok)
    return save_checkpoint(directory / "ckpt", model=model, tokenizer=tok, config=cfg, stage="sft", step=0)


def write_prompts(directory: Path, count: int, name: str = "prompts") -> Path:
    """``count`` lines cycled from the built-in task set (the last assistant message is the input reply)."""
    lines = builtin_path("task").read_text(encoding="utf-8").splitlines()
    path = directory / f"{name}.jsonl"
    path.write_text("".join(lines[i % len(lines)] + "\n" for i in range(count)), encoding="utf-8")
    return path


def _rates(n_prompts: int, tokens: int, seconds: float, steady: list[tuple[float, int, int]]) -> dict[str, float]:
    """Whole-call and steady-state rates; ``steady`` holds (time, prompts, tokens) per finished batch or block."""
    span = steady[-1][0] - steady[0][0]
    later = steady[1:]
    return {
        "seconds": seconds,
        "prompts_s": n_prompts / seconds,
        "tokens_s": tokens / seconds,
        "steady_prompts_s": sum(x[1] for x in later) / span,
        "steady_tokens_s": sum(x[2] for x in later) / span,
    }


def run_loop(
    ckpt: Path, prompts_path: Path, out: Path, *, params: SamplingParams, batch_size: int, threads: int
) -> dict[str, float]:
    """The plain in-process loop: load once, then one ``generate_rows`` call per batch (``out`` is unused)."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok, info = load_policy(ckpt)
    engine = GenerationEngine(model.eval(), tok, precision=info.config.model.precision)
    rows = bg.read_prompts([prompts_path], tok).rows
    items = [r for s in bg.plan_shards(rows) for r in bg.shard_input_rows(s)]
    schema = bg.output_schema()
    done: list[tuple[float, int, int]] = []
    for i in range(0, len(items), batch_size):
        out_rows = bg.generate_rows(engine, params, pa.Table.from_pylist(items[i : i + batch_size]), 1, 0, schema)
        done.append((time.perf_counter(), out_rows.num_rows, sum(out_rows.column("completion_tokens").to_pylist())))
    return _rates(len(items), sum(x[2] for x in done), time.perf_counter() - t0, done)


def run_ray(
    ckpt: Path, prompts_path: Path, out: Path, *, params: SamplingParams, batch_size: int, concurrency: int
) -> dict[str, float]:
    """The whole ``generate`` job into a fresh directory, timing the output blocks as they reach the driver."""
    arrivals: list[tuple[float, int, int]] = []
    original = bg.ShardCollector.add

    def add(self: bg.ShardCollector, table: pa.Table) -> None:
        arrivals.append((time.perf_counter(), table.num_rows, sum(table.column("completion_tokens").to_pylist())))
        original(self, table)

    bg.ShardCollector.add = add  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        res = bg.generate(
            ckpt, [prompts_path], out, params, batch_size=batch_size, concurrency=concurrency, progress=False
        )
        seconds = time.perf_counter() - t0
    finally:
        bg.ShardCollector.add = original  # type: ignore[method-assign]
    return _rates(res.prompts, res.totals["completion_tokens"], seconds, arrivals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-threads", type=int, nargs="+", default=[1, 2], help="torch threads of the loop runs")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="actor counts of the Ray runs")
    args = ap.parse_args()

    import ray
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=1.0, seed=0)
    bs = args.batch_size
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-batch-generate-") as tmp:
        d = Path(tmp)
        ckpt = build_checkpoint(d)
        prompts_path = write_prompts(d, args.prompts)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        sides: dict[str, Callable[[Path, Path], dict[str, float]]] = {}
        for t in args.loop_threads:
            sides[f"in-process loop, {t} torch thread(s)"] = partial(
                run_loop, ckpt, params=params, batch_size=bs, threads=t
            )
        for c in args.concurrency:
            sides[f"Ray Data job, --concurrency {c}"] = partial(
                run_ray, ckpt, params=params, batch_size=bs, concurrency=c
            )
        for t in args.loop_threads:  # untimed: first-call costs of this process (kernels, caches) stay out
            run_loop(ckpt, prompts_path, d, params=params, batch_size=bs, threads=t)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        for r in range(args.repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for i, name in enumerate(order):
                x = sides[name](prompts_path, d / f"out-{r}-{i}")
                results[name].append(x)
                print(
                    f"# repeat {r}: {name}: {x['seconds']:.1f} s, steady {x['steady_prompts_s']:.0f} prompts/s "
                    f"(load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        ray.shutdown()
    load1 = os.getloadavg()

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    print(
        f"\ntorch {torch.__version__}, ray {ray.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{args.prompts} prompts, max {args.max_tokens} new tokens, batch "
        f"{args.batch_size}, temperature 1, median of {args.repeats}; load average {load0[0]:.1f} before, "
        f"{load1[0]:.1f} after\n"
    )
    print("| path | whole call s | prompts/s | tokens/s | steady prompts/s | steady tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in sides:
        print(
            f"| {name} | {med(name, 'seconds'):.1f} | {med(name, 'prompts_s'):,.0f} | {med(name, 'tokens_s'):,.0f} | "
            f"{med(name, 'steady_prompts_s'):,.0f} | {med(name, 'steady_tokens_s'):,.0f} |"
        )


if __name__ == "__main__":
    main()
