"""``rlchat demo``: the built-in end-to-end demo, the README's first command.

    rlchat demo [--config configs/demo.yaml] [key=value ...] [--run-dir DIR] [--quick]

On one local Ray instance that starts by itself (2 CPU cores are enough), with the built-in data and a tiny model:

1. ``data prepare`` the three built-in sets (task, chat, preference pairs) through Ray Data;
2. SFT on the chat conversations (Ray Train);
3. reward-model training on the preference pairs (Ray Train);
4. PPO from the SFT policy on the arithmetic task with its verifiable reward (rollout workers + learner);
5. a table: held-out task reward (and every component) of the SFT policy vs the PPO policy, KL to the
   reference, one sample conversation; plots of every stage under ``RUN_DIR/*/plots``.

Everything lands under one run directory (``runs/demo-<time>/`` by default): ``data/``, ``sft/``, ``rm/``,
``ppo/``, ``summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rlchat.config import Config, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
QUICK_OVERRIDES = {
    "sft.max_steps": 40,
    "rm.max_steps": 20,
    "ppo.iterations": 12,
    "ppo.eval_every": 6,
    "ppo.eval_prompts": 64,
}


def _builtin_file(name: str) -> Path:
    from rlchat.data import builtin_path

    return builtin_path(name)


def run_demo(cfg: Config, run_dir: Path, address: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the whole demo; returns the summary written to ``run_dir/summary.json``."""
    from rlchat.checkpoint import find_best_checkpoint
    from rlchat.cluster import init_ray
    from rlchat.evaluation import evaluate_checkpoint
    from rlchat.metrics import plot_run
    from rlchat.prepare import prepare
    from rlchat.stages import run_rm, run_sft
    from rlchat.trainer import train

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(address or cfg.ray.address or None, cfg.ray.num_cpus)
    timings: dict[str, float] = {}

    # 1. data
    say("== 1/5 prepare the built-in data (Ray Data)")
    t = time.perf_counter()
    data_dirs = {}
    for name in ("task", "chat", "prefs"):
        out = run_dir / "data" / name
        prepare([_builtin_file(name)], out, cfg=cfg, progress=not quiet)
        data_dirs[name] = str(out)
    cfg = cfg.replace(
        **{"data.prompts": data_dirs["task"], "data.sft": data_dirs["chat"], "data.preferences": data_dirs["prefs"]}
    )
    timings["prepare_s"] = time.perf_counter() - t

    # 2. SFT
    say("== 2/5 supervised fine-tuning (Ray Train)")
    t = time.perf_counter()
    sft_dir, sft_metrics = run_sft(cfg, run_dir / "sft", quiet=quiet)
    sft_ckpt = find_best_checkpoint(sft_dir)
    timings["sft_s"] = time.perf_counter() - t

    # 3. reward model
    say("== 3/5 reward model on preference pairs (Ray Train)")
    t = time.perf_counter()
    rm_dir, rm_metrics = run_rm(cfg, run_dir / "rm", quiet=quiet)
    rm_ckpt = find_best_checkpoint(rm_dir)
    timings["rm_s"] = time.perf_counter() - t

    # 4. PPO from the SFT policy
    say("== 4/5 PPO from the SFT policy (rollout workers + learner)")
    t = time.perf_counter()
    ppo_cfg = cfg.replace(**{"checkpoint.init_from": str(sft_ckpt)})
    ppo_dir, ppo_metrics = train(ppo_cfg, run_dir / "ppo", quiet=quiet)
    ppo_ckpt = find_best_checkpoint(ppo_dir)
    timings["ppo_s"] = time.perf_counter() - t

    # 5. held-out comparison
    say("== 5/5 held-out evaluation: SFT policy vs PPO policy")
    t = time.perf_counter()
    from rlchat.data import load_records

    held_out = load_records(cfg.data.prompts, split="val", cfg=cfg)
    eval_cfg = cfg.replace(**{"reward.model_path": str(rm_ckpt)})
    n = cfg.ppo.eval_prompts
    sft_eval = evaluate_checkpoint(sft_ckpt, held_out, cfg=eval_cfg, max_prompts=n)
    ppo_eval = evaluate_checkpoint(ppo_ckpt, held_out, cfg=eval_cfg, baseline=sft_ckpt, max_prompts=n)
    timings["eval_s"] = time.perf_counter() - t
    plots = []
    for d in (sft_dir, rm_dir, ppo_dir):
        plots += [str(p) for p in plot_run(d)]
    timings["total_s"] = time.perf_counter() - t0

    summary = {
        "run_dir": str(run_dir.resolve()),
        "checkpoints": {"sft": str(sft_ckpt), "rm": str(rm_ckpt), "ppo": str(ppo_ckpt)},
        "sft_eval": sft_eval,
        "ppo_eval": ppo_eval,
        "ppo_final": {k: v for k, v in ppo_metrics.items() if not k.startswith("perf/")},
        "sft_final": sft_metrics,
        "rm_final": rm_metrics,
        "timings": timings,
        "plots": plots,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    say(format_summary(summary))
    return summary


def _reward_keys(ev: dict[str, Any]) -> list[str]:
    return sorted(k for k in ev if k.startswith("reward/") or k == "reward_mean")


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing table (plain text)."""
    sft, ppo = summary["sft_eval"], summary["ppo_eval"]
    rows = [("metric", "SFT policy", "PPO policy")]
    for key in _reward_keys(ppo):
        rows.append((key, f"{sft.get(key, float('nan')):.3f}", f"{ppo.get(key, float('nan')):.3f}"))
    for key in ("response_length", "perplexity", "accuracy", "distinct_1", "distinct_2"):
        if key in ppo:
            rows.append((key, f"{sft.get(key, float('nan')):.3f}", f"{ppo[key]:.3f}"))
    if "win_rate" in ppo:
        rows.append(("RM win rate vs SFT", "-", f"{ppo['win_rate']:.3f}"))
    kl = summary["ppo_final"].get("kl/ref_kl")
    if kl is not None:
        rows.append(("KL to reference (last iter)", "0", f"{kl:.3f}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["", "Held-out task (greedy decoding):"]
    for i, r in enumerate(rows):
        lines.append(f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}")
        if i == 0:
            lines.append("  " + "-" * (sum(w) + 4))
    gain = ppo.get("reward_mean", 0.0) - sft.get("reward_mean", 0.0)
    lines.append(f"\nPPO raised the held-out task reward by {gain:+.3f} over the SFT policy.")
    samples = ppo.get("samples") or []
    if samples:
        s = samples[0]
        lines.append("\nSample conversation (PPO policy):")
        for m in s.get("messages", []):
            lines.append(f"  {m['role']:>9}: {m['content']}")
        lines.append(f"  {'assistant':>9}: {s.get('response', '')}")
    t = summary["timings"]
    lines.append(
        f"\nTime: {t['total_s']:.0f} s (prepare {t['prepare_s']:.0f}, SFT {t['sft_s']:.0f}, RM {t['rm_s']:.0f}, "
        f"PPO {t['ppo_s']:.0f}, eval {t['eval_s']:.0f}).  Run directory: {summary['run_dir']}"
    )
    return "\n".join(lines)


def demo_command(
    config: str | None, overrides: list[str], run_dir: str | None, address: str | None, quick: bool = False, **_: Any
) -> int:
    """``rlchat demo``."""
    from rlchat.metrics import make_run_dir

    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    if quick:
        cfg = cfg.replace(
            **{k: v for k, v in QUICK_OVERRIDES.items() if not any(o.startswith(k + "=") for o in overrides)}
        )
    path = make_run_dir(run_dir, "demo")
    print(f"run directory: {path.resolve()}", flush=True)
    run_demo(cfg, path, address=address)
    return 0
