"""Where a PPO learner update spends its time: a torch.profiler table of one update, in one process, no Ray.

    python bench/profile_learner.py [--model 25m] [--precision auto] [--threads 1] [--rows 20]

Builds the same learner as ``bench/ppo_throughput.py`` (``rlchat.learner.Learner`` on the ``--model`` size, 64
episodes of T=64 new tokens from an untrained policy, 1 epoch x 2 minibatches), runs one warm-up update, then
profiles one update and prints (1) the time split into matmuls (``aten::mm/addmm/bmm/linear`` and SDPA), the rest
of the ops, and what the op table does not cover (Python, autograd bookkeeping), and (2) the top ops by self CPU
time. It is the profile behind the learner-MFU notes in bench/README.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rlchat.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ["model.n_layer=2", "model.n_embd=64", "model.n_head=4"],
    "25m": ["model.n_layer=8", "model.n_embd=512", "model.n_head=8"],
}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product", "aten::baddbmm", "aten::matmul")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="25m", choices=sorted(MODELS))
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()

    from rlchat.data import load_records
    from rlchat.learner import LocalLearner
    from rlchat.rollout import Sampler

    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        [
            *MODELS[args.model],
            f"model.precision={args.precision}",
            "rollout.envs_per_worker=64",
            f"ray.learner_threads={args.threads}",
            "env.max_turn_tokens=64",
            "env.max_context=160",
            "model.n_positions=256",
            "ppo.update_epochs=1",
            "ppo.num_minibatches=2",
        ],
    )
    with tempfile.TemporaryDirectory() as d:
        learner = LocalLearner(cfg, d)
    torch.set_num_threads(args.threads)
    records = load_records(cfg.data.prompts, split="train", cfg=cfg)
    sampler = Sampler(cfg, learner.tokenizer, learner.learner.policy.lm, records)
    batch = sampler.sample(iteration=1)
    learner.update(batch, 1)  # warm-up
    batch = sampler.sample(iteration=2)
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        learner.update(batch, 2)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    mm = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_OPS)) / 1e6
    print(
        f"model {args.model}, precision {args.precision}, {args.threads} thread(s); one update: {wall:.2f} s wall "
        f"(profiler overhead included)"
    )
    print(f"  matmul ops (mm/addmm/bmm/SDPA)   {mm:7.2f} s  {mm / wall:6.1%}")
    print(f"  other ops                        {total_self - mm:7.2f} s  {(total_self - mm) / wall:6.1%}")
    print(f"  outside ops (Python, autograd)   {wall - total_self:7.2f} s  {(wall - total_self) / wall:6.1%}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
