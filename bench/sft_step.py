"""SFT training-step throughput and model-FLOPs utilisation (MFU) against a matmul peak measured in the same run.

The step is the real one: :class:`rlchat.stages.StageLearner` on the demo chat data (``builtin:chat``, batches of
``--batch`` conversations cut to ``--seq`` tokens), forward + backward + grad clip + AdamW, in one process with
``--threads`` torch threads. Two models, each in fp32 and under bf16 autocast (fp32 master weights):

- ``tiny``: the demo model (``configs/demo.yaml``: 2 layers, width 64, vocabulary 4096);
- ``25M``: a GPT-2 of 7 layers, width 512, 8 heads, same vocabulary (24.3M parameters).

Peak: the best of several ``N x N @ N x N`` matmuls (N = 2048) in the same dtype and thread count, measured right
before and after each case (the best of both), so MFU is the share of what this CPU's matmul units actually reach
here and now -- not a datasheet figure, and on a shared machine against the same background load.

Model FLOPs per step follow PaLM's convention (no recomputation counted): ``6 * N_matmul * tokens`` for the
transformer blocks (all real tokens), ``12 * layers * width * T`` per token for attention, and ``6 * width * vocab``
per *scored* token for the LM head, which rlchat evaluates only at loss-mask positions. Tokens/s counts real
(non-padding) tokens.

Clock: by default seconds are **CPU seconds of this process** (``time.process_time``) with one torch thread, for the
steps and the peak alike: on a shared machine, wall-clock rates mostly measure the other jobs (with 2 threads and a
busy second core, OpenMP barriers stalled a step 10x). On an idle machine with ``--threads 1`` the two clocks
agree; ``--clock wall --threads 2`` measures what a whole idle 2-core machine does.

Run::

    python bench/sft_step.py [--threads 1] [--clock cpu|wall] [--steps 6] [--batch 32] [--seq 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from rlchat.config import Config, load_config
from rlchat.model import count_parameters
from rlchat.stages import SFTTask, StageLearner, prepare_sft_data
from rlchat.tokenizer import ChatTokenizer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

MODELS = {
    "tiny": {},
    "25M": {"model.n_layer": 7, "model.n_embd": 512, "model.n_head": 8},
}


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n`` matmul in ``dtype`` (bf16 runs on AMX / AVX512-BF16 where the CPU has them)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    return 2 * n**3 / best


def step_flops(model: torch.nn.Module, cfg: Config, ids: torch.Tensor, attn: torch.Tensor, scored: int) -> float:
    """Model FLOPs of one training step (forward + backward) on a right-padded batch (see the module docstring)."""
    lm = model.lm
    d, layers = cfg.model.n_embd, cfg.model.n_layer
    vocab = int(lm.get_output_embeddings().weight.shape[0])
    embed = sum(p.numel() for n, p in lm.named_parameters() if "wte" in n or "wpe" in n)
    n_matmul = count_parameters(lm) - embed  # block weights (tied head counted separately below)
    tokens = int(attn.sum())
    t_mean = float((attn.sum(1).float() ** 2).sum() / max(tokens, 1))  # token-weighted mean context length
    return 6.0 * n_matmul * tokens + 12.0 * layers * d * t_mean * tokens + 6.0 * d * vocab * scored


def bench(cfg: Config, tok: ChatTokenizer, steps: int, warmup: int) -> dict[str, float]:
    data, _ = prepare_sft_data(cfg, tok, cfg.sft.max_seq_len)
    learner = StageLearner(SFTTask(data), cfg, tok)
    times, tokens, flops = [], [], []
    for step in range(warmup + steps):
        idx = learner.batch_rows(step)
        ids, attn, mask = data.train.batch(idx, data.pad_id, torch.device("cpu"))
        t0 = clock()
        learner.step(idx)
        dt = clock() - t0
        if step >= warmup:
            times.append(dt)
            tokens.append(int(attn.sum()))
            flops.append(step_flops(learner.model, cfg, ids, attn, int(mask[:, 1:].sum())))
    t = statistics.median(times)
    return {
        "params": float(count_parameters(learner.model.lm)),
        "step_s": t,
        "tokens_per_s": float(np.mean(tokens)) / t,
        "flops_per_s": float(np.mean(flops)) / t,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=list(CLOCKS), default="cpu", help="cpu: process CPU seconds; wall: wall clock")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="conversations per step")
    ap.add_argument("--seq", type=int, default=128, help="sft.max_seq_len")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    base = load_config(DEMO) if DEMO.is_file() else Config().replace(**{"tokenizer.vocab_size": 4096})
    tok = ChatTokenizer.from_config(base.tokenizer)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}"
    )
    print()
    unit = "CPU s" if args.clock == "cpu" else "s"
    print(f"| model | params | precision | step ({unit}) | tokens/s | model GFLOP/s | matmul peak GFLOP/s | MFU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        for precision in ("fp32", "bf16"):
            overrides = {
                **MODELS[name],
                "model.precision": precision,
                "sft.batch_size": args.batch,
                "sft.max_seq_len": args.seq,
                "sft.grad_accum_steps": 1,
            }
            cfg = base.replace(**overrides)
            peak = matmul_peak(dtypes[precision])
            r = bench(cfg, tok, args.steps, args.warmup)
            peak = max(peak, matmul_peak(dtypes[precision]))
            mfu = r["flops_per_s"] / peak
            print(
                f"| {name} | {r['params'] / 1e6:.2f}M | {precision} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                f"{r['flops_per_s'] / 1e9:.2f} | {peak / 1e9:.0f} | {100 * mfu:.1f}% |",
                flush=True,
            )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
