"""End-to-end PPO throughput: generated tokens/s per iteration with the sample / update / sync split, and the
learner's model-FLOPs utilisation against the matmul peak measured in the same run.

    python bench/ppo_throughput.py [--iterations 4] [--models tiny,25m] [--workers 1,2]
    python bench/ppo_throughput.py --suite realistic [--trunks 4x256,8x512] [--layouts default,inproc] \
        [--critics separate,shared] [--precisions auto,fp32]

``--suite realistic`` is the real-vocabulary table (see :func:`realistic_main`): full cl100k, 32 prompts x 32
new tokens, 4 epochs, whole-iteration MFU and per-process peak RSS.

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
    ap.add_argument("--suite", default="demo", choices=["demo", "realistic"])
    ap.add_argument("--trunks", default="4x256,8x512")
    ap.add_argument("--layouts", default="default,inproc")
    ap.add_argument("--critics", default="separate,shared")
    ap.add_argument("--precisions", default="auto,fp32")
    args = ap.parse_args()
    if args.suite == "realistic":
        realistic_main(args)
        return
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


# ---------------------------------------------------------------------------------------------------------------
# Realistic vocabulary: full cl100k, GPT-2 trunks, whole-iteration MFU
# ---------------------------------------------------------------------------------------------------------------

TRUNKS = {"4x256": (4, 256, 4), "8x512": (8, 512, 8)}
"""name -> (layers, width, heads) of the GPT-2 trunks of the realistic-vocabulary cases."""


class PeakRSS:
    """Peak resident memory of the driver, rollout worker(s) and learner rank(s), read from ``/proc`` (VmHWM).

    A background thread polls every process whose command line names a role; VmHWM is the kernel's own
    high-water mark, so polling only has to see each process once before it exits.
    """

    ROLES = {"rollout": "RolloutWorker", "learner": "RayTrainWorker"}

    def __init__(self) -> None:
        import os
        import threading

        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._me = os.getpid()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _hwm_mb(pid: str) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _poll(self) -> None:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if int(d.name) == self._me:
                    role = "driver"
                else:
                    cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                    role = next((r for r, key in self.ROLES.items() if key in cmd), "")
                if role:
                    self.peak[role] = max(self.peak.get(role, 0.0), self._hwm_mb(d.name))
            except (OSError, ValueError):
                continue

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._poll()
        self._stop.set()
        self._thread.join()


def iteration_flops(cfg, m: dict[str, float], trunk_params: int, width: int, vocab: int) -> dict[str, float]:
    """Model FLOPs of one whole PPO iteration, by phase (the accounting written down in bench/README.md).

    ``P`` = non-embedding trunk parameters, ``C`` = P for a separate critic (0 when shared), ``d * V`` the LM head.
    A forward over ``n`` context tokens of which ``a`` are actions costs ``2 P n + 2 d V a`` (log-probs only at
    action positions) plus ``2 C n`` for the critic; a backward costs twice its forward. Attention's own
    ``T^2`` FLOPs are left out (< 3% at these lengths).

    - sampling: every prompt token once (prefill) and every generated token through trunk and head;
    - reference log-probs: one policy forward (the reference holds no critic);
    - old log-probs + values: one policy + critic forward;
    - update: ``update_epochs`` x (forward + backward) of policy and critic.
    """
    b = cfg.rollout_batch_size
    ctx = m["rollout/context_len"] * b
    act = m["rollout/response_len"] * b
    head = 2 * width * vocab
    critic = trunk_params if cfg.model.critic == "separate" else 0
    policy_fwd = 2 * trunk_params * ctx + head * act
    critic_fwd = 2 * critic * ctx
    return {
        "sample": 2 * trunk_params * ctx + head * act,
        "reference": policy_fwd,
        "old": policy_fwd + critic_fwd,
        "update": 3 * cfg.ppo.update_epochs * (policy_fwd + critic_fwd),
    }


def run_realistic(
    trunk: str, layout: str, critic: str, precision: str, iterations: int
) -> tuple[dict[str, float], dict[str, float]]:
    from rlchat.model import PolicyValueModel
    from rlchat.tokenizer import ChatTokenizer
    from rlchat.trainer import train

    layers, width, heads = TRUNKS[trunk]
    over = [
        "tokenizer.vocab_size=0",  # the full cl100k vocabulary: 100,277 ids
        f"model.n_layer={layers}",
        f"model.n_embd={width}",
        f"model.n_head={heads}",
        "model.n_positions=256",
        f"model.precision={precision}",
        f"model.critic={critic}",
        "rollout.envs_per_worker=32",
        "env.max_turn_tokens=32",
        "env.max_context=160",
        "ppo.update_epochs=4",
        "ppo.num_minibatches=1",
        "ppo.eval_every=0",
        "checkpoint.every=0",
        f"ppo.iterations={iterations}",
        "rollout.torch_threads=0",  # auto: each phase gets the machine's cores (rlchat.cluster.torch_thread_budget)
        "ray.learner_threads=0",
    ]
    if layout == "inproc":
        over += ["rollout.num_workers=0", "ray.learner_workers=0"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", over)
    tok = ChatTokenizer.from_config(cfg.tokenizer)
    m = PolicyValueModel.build(cfg, tok)
    vocab = m.vocab_size
    trunk_params = sum(p.numel() for p in m.trunk.parameters()) - m.lm.get_input_embeddings().weight.numel()
    trunk_params -= sum(p.numel() for n, p in m.trunk.named_parameters() if n.endswith("wpe.weight"))
    del m
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d, PeakRSS() as rss:
        train(cfg, Path(d) / "run", quiet=True)
        rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    # medians: a shared 2-core VM stalls a thread now and then, and one stalled iteration would skew a mean
    avg = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}
    flops = iteration_flops(cfg, avg, trunk_params, width, vocab)
    avg["iter_tflop"] = sum(flops.values()) / 1e12
    return avg, rss.peak


def realistic_main(args: argparse.Namespace) -> None:
    """The realistic-vocabulary table: one row per (trunk, layout, critic, precision)."""
    from rlchat.model import resolve_precision

    peaks = {
        torch.bfloat16: matmul_peak(torch.bfloat16, threads=2),
        torch.float32: matmul_peak(torch.float32, threads=2),
    }
    rows = []
    for trunk in args.trunks.split(","):
        for layout in args.layouts.split(","):
            for critic in args.critics.split(","):
                for precision in args.precisions.split(","):
                    r, rss = run_realistic(trunk, layout, critic, precision, args.iterations + 1)
                    rows.append((trunk, layout, critic, precision, r, rss))
                    print(f"done: {trunk} {layout} {critic} {precision}", flush=True)
                    for dt in peaks:  # the best reading of the run is the machine's peak (see main())
                        peaks[dt] = max(peaks[dt], matmul_peak(dt, threads=2))
    print(
        f"matmul peak (2 threads, best of the run): bf16 {peaks[torch.bfloat16] / 1e12:.2f} TFLOP/s, "
        f"fp32 {peaks[torch.float32] / 1e12:.2f} TFLOP/s"
    )
    print(
        f"{'trunk':<6} {'layout':<8} {'critic':<9} {'prec':<5} {'dtype':<5} {'iter s':>7} {'sample':>7} {'update':>7} "
        f"{'sync':>6} {'gen tok/s':>9} {'TFLOP/it':>9} {'MFU':>6} {'RSS MB driver/rollout/learner':>30}"
    )
    for trunk, layout, critic, precision, r, rss in rows:
        dtype = resolve_precision(precision, torch.device("cpu"), TRUNKS[trunk][1]) or torch.float32
        mfu = r["iter_tflop"] * 1e12 / r["perf/iter_s"] / peaks[dtype]
        mem = "/".join(f"{rss[k]:.0f}" if k in rss else "-" for k in ("driver", "rollout", "learner"))
        print(
            f"{trunk:<6} {layout:<8} {critic:<9} {precision:<5} {'bf16' if dtype == torch.bfloat16 else 'fp32':<5} "
            f"{r['perf/iter_s']:>7.2f} {r['perf/sample_s']:>7.2f} {r['perf/update_s']:>7.2f} {r['perf/sync_s']:>6.2f} "
            f"{r['perf/tokens_per_s']:>9,.0f} {r['iter_tflop']:>9.3f} {mfu:>6.1%} {mem:>30}"
        )


if __name__ == "__main__":
    main()
