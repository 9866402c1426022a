"""End-to-end PPO throughput: generated tokens/s per iteration with the sample / update / sync split, and the
learner's model-FLOPs utilisation against the matmul peak measured in the same run.

    python bench/ppo_throughput.py [--iterations 4] [--models tiny,25m] [--workers 1,2]

Runs the real driver (`rlchat.trainer.train`: rollout worker actors + the Ray Train learner) on a local Ray with
2 CPUs, T=64 new tokens per episode, from randomly initialised models (which rarely emit the end-of-turn token, so
every episode generates the full 64 tokens). The first iteration (warm-up: weights first loaded, caches built) is
left out of the averages. Prints a table; figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlchat.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    # the demo model: 2 layers, d=64, 4096-id vocabulary
    "tiny": ["model.n_layer=2", "model.n_embd=64", "model.n_head=4"],
    # ~25M parameters: 8 layers, d=512 (+ 2.1M embedding at the 4096 vocabulary)
    "25m": ["model.n_layer=8", "model.n_embd=512", "model.n_head=8"],
}


def matmul_peak(dtype: torch.dtype, n: int = 2048, threads: int = 2) -> float:
    """Best-of-5 FLOP/s of an n x n matmul with ``threads`` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(old)
    return 2 * n**3 / best


def learner_flops(cfg, metrics: dict[str, float], n_params: int, n_embed: int) -> float:
    """Model FLOPs of one PPO update: 2 no-grad forwards (policy, reference) + epochs x (forward + backward).

    A forward costs 2 * (non-embedding params) per context token plus 2 * d * V per action token (log-probs are
    computed only there); a backward twice the forward.
    """
    b = cfg.rollout_batch_size
    ctx = metrics["rollout/context_len"] * b
    act = metrics["rollout/response_len"] * b
    d = cfg.model.n_embd
    v = n_embed // d
    fwd = 2 * (n_params - n_embed) * ctx + 2 * d * v * act
    return fwd * (2 + 3 * cfg.ppo.update_epochs)


def run(model: str, workers: int, iterations: int, precision: str) -> dict[str, float]:
    from rlchat.model import PolicyValueModel
    from rlchat.tokenizer import ChatTokenizer
    from rlchat.trainer import train

    over = [
        *MODELS[model],
        f"model.precision={precision}",
        f"rollout.num_workers={workers}",
        "rollout.envs_per_worker=32" if workers == 2 else "rollout.envs_per_worker=64",
        f"rollout.num_cpus_per_worker={1 / workers}",
        "ray.learner_cpus=1",
        "ray.learner_threads=1",
        "env.max_turn_tokens=64",
        "env.max_context=160",
        f"ppo.iterations={iterations}",
        "ppo.update_epochs=1",
        "ppo.num_minibatches=2",
        "ppo.eval_every=0",
        "checkpoint.every=0",
        "model.n_positions=256",
    ]
    cfg = load_config(ROOT / "configs" / "demo.yaml", over)
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    m = PolicyValueModel.build(cfg, tok)
    n_params = sum(p.numel() for p in m.lm.parameters())
    n_embed = m.lm.get_input_embeddings().weight.numel()
    with tempfile.TemporaryDirectory() as d:
        train(cfg, Path(d) / "run", quiet=True)
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    avg = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}
    flops = learner_flops(cfg, avg, n_params, n_embed)
    avg["learner_tflops"] = flops / avg["perf/learner_update_s"] / 1e12
    avg["params_m"] = n_params / 1e6
    return avg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--models", default="tiny,25m")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    peak_bf16 = matmul_peak(torch.bfloat16, threads=1)
    peak_fp32 = matmul_peak(torch.float32, threads=1)
    print(
        f"matmul peak (2048^2, 1 thread = the learner's budget): bf16 {peak_bf16 / 1e12:.2f} TFLOP/s, "
        f"fp32 {peak_fp32 / 1e12:.2f} TFLOP/s"
    )
    from rlchat.model import resolve_precision

    header = (
        f"{'model':<6} {'params':>7} {'workers':>7} {'gen tok/s':>10} {'iter s':>7} {'sample s':>9} "
        f"{'update s':>9} {'sync s':>7} {'precision':>9} {'learner TFLOP/s':>16} {'MFU':>6}"
    )
    results = []
    for model in args.models.split(","):
        for workers in map(int, args.workers.split(",")):
            results.append((model, workers, run(model, workers, args.iterations + 1, args.precision)))
            print(f"done: {model} x {workers} workers", flush=True)
            # the peak again after each case: a single reading taken while the previous run's processes were still
            # exiting came out 4x low; the best reading of the whole run is the machine's peak
            peak_bf16 = max(peak_bf16, matmul_peak(torch.bfloat16, threads=1))
            peak_fp32 = max(peak_fp32, matmul_peak(torch.float32, threads=1))
    print(
        f"best matmul peak of the run (the MFU denominators): bf16 {peak_bf16 / 1e12:.2f} TFLOP/s, "
        f"fp32 {peak_fp32 / 1e12:.2f} TFLOP/s"
    )
    print(header)
    for model, workers, r in results:
        # MFU against the peak of the dtype the learner actually ran in (``auto`` keeps narrow models fp32)
        width = int(next(o for o in MODELS[model] if o.startswith("model.n_embd=")).split("=")[1])
        dtype = resolve_precision(args.precision, torch.device("cpu"), width)
        peak, name = (peak_bf16, "bf16") if dtype == torch.bfloat16 else (peak_fp32, "fp32")
        mfu = r["learner_tflops"] * 1e12 / peak
        print(
            f"{model:<6} {r['params_m']:>6.1f}M {workers:>7} {r['perf/tokens_per_s']:>10,.0f} "
            f"{r['perf/iter_s']:>7.2f} {r['perf/sample_s']:>9.2f} {r['perf/update_s']:>9.2f} "
            f"{r['perf/sync_s']:>7.3f} {name:>9} {r['learner_tflops']:>16.3f} {mfu:>6.1%}"
        )


if __name__ == "__main__":
    main()
