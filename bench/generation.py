"""Generation throughput: rlchat's :class:`~rlchat.generation.GenerationEngine` vs ``transformers``' ``generate``.

Both decode the same tiny model (``configs/demo.yaml``'s model and 4096-token tokenizer when that file exists,
else a 2-layer, 64-wide GPT-2 with ``ChatTokenizer("cl100k_base", 4096)``) from the same random 64-token prompts,
64 new tokens, plain sampling at temperature 1 with no top-k / top-p, in the same process and precision,
alternating engine / transformers runs so that background load hits both alike. Tokens/s counts the tokens each
actually generated (a row may stop early at the end-of-turn token). The last column compares tokens per CPU second
of this process, which is less sensitive to other jobs on a shared machine than wall clock. Prints a Markdown table
for bench/README.md.

Run::

    python bench/generation.py [--threads 2] [--repeats 3] [--batch-sizes 1 8 32 64] [--precision fp32]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rlchat.config import Config, load_config
from rlchat.generation import GenerationEngine, SamplingParams
from rlchat.model import PolicyValueModel, autocast_context
from rlchat.tokenizer import ChatTokenizer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def demo_config() -> tuple[Config, str]:
    """The demo config when present, else the defaults with the 4096-token tokenizer."""
    if DEMO.is_file():
        return load_config(DEMO), str(DEMO.relative_to(DEMO.parents[1]))
    return Config().replace(**{"tokenizer.vocab_size": 4096}), "defaults (n_layer=2, n_embd=64, vocab 4096)"


def run_engine(engine: GenerationEngine, prompts: list[list[int]], new: int, seed: int) -> tuple[float, float, int]:
    """(wall s, process CPU s, generated tokens) of one engine call."""
    params = SamplingParams(max_new_tokens=new, temperature=1.0)
    t0, c0 = time.perf_counter(), time.process_time()
    res = engine.generate(prompts, params, seeds=[seed * 1000 + i for i in range(len(prompts))])
    return time.perf_counter() - t0, time.process_time() - c0, sum(len(t) for t in res.tokens)


def run_hf(
    lm: torch.nn.Module, tok: ChatTokenizer, prompts: list[list[int]], new: int, dtype: torch.dtype | None
) -> tuple[float, float, int]:
    """(wall s, process CPU s, generated tokens) of one ``generate`` call."""
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad(), autocast_context(dtype, torch.device("cpu")):
        out = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            eos_token_id=tok.eot_id,
            pad_token_id=tok.pad_id,
        )
    dt, ct = time.perf_counter() - t0, time.process_time() - c0
    gen = out[:, ids.shape[1] :]
    n = 0
    for row in gen.tolist():  # tokens up to and including the first end-of-turn (the rest is padding)
        n += row.index(tok.eot_id) + 1 if tok.eot_id in row else len(row)
    return dt, ct, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch size and side (median reported)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"], help="both sides alike")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg, source = demo_config()
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    policy = PolicyValueModel.build(cfg, tok).eval()
    engine = GenerationEngine(policy, tok, precision=args.precision)
    dtype = engine.autocast_dtype()
    lm = policy.lm
    lm.generation_config.top_k = None  # transformers defaults to top_k=50; compare plain sampling
    n_ranks = len(tok.enc._mergeable_ranks)
    gen = torch.Generator().manual_seed(0)

    load_before = os.getloadavg()
    rows = []
    for b in args.batch_sizes:
        prompts = torch.randint(0, n_ranks, (b, args.prompt_len), generator=gen).tolist()
        run_engine(engine, prompts, 8, 0)  # warm-up both paths
        run_hf(lm, tok, prompts, 8, dtype)
        ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
        for r in range(args.repeats):
            dt, ct, n = run_engine(engine, prompts, args.new_tokens, r)
            ours.append(n / dt)
            ours_cpu.append(n / ct)
            dt, ct, n = run_hf(lm, tok, prompts, args.new_tokens, dtype)
            theirs.append(n / dt)
            theirs_cpu.append(n / ct)
        med = statistics.median
        rows.append((b, med(ours), med(theirs), med(ours_cpu), med(theirs_cpu)))
    load_after = os.getloadavg()

    m = cfg.model
    print(
        f"model: {source}: {m.arch} n_layer={m.n_layer} n_embd={m.n_embd} vocab={tok.n_vocab}; "
        f"prompt {args.prompt_len} / new {args.new_tokens} tokens; sampling T=1; precision {dtype or 'fp32'}; "
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs ({platform.processor() or '?'}); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; median of {args.repeats}"
    )
    print()
    print("| batch | rlchat engine tok/s | transformers generate tok/s | speed-up | speed-up per CPU second |")
    print("|---:|---:|---:|---:|---:|")
    for b, ours_tps, hf_tps, ours_cpu, hf_cpu in rows:
        print(f"| {b} | {ours_tps:,.0f} | {hf_tps:,.0f} | {ours_tps / hf_tps:.2f}x | {ours_cpu / hf_cpu:.2f}x |")


if __name__ == "__main__":
    main()
