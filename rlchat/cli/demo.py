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

from rlchat.core.config import Config, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
QUICK_OVERRIDES = {
    "sft.epochs": 10,
    "rm.max_steps": 20,
    "rollout.envs_per_worker": 128,
    "ppo.update_epochs": 8,
    "ppo.num_minibatches": 2,
    "ppo.iterations": 30,
    "ppo.eval_every": 0,
    "ppo.eval_prompts": 64,
    "checkpoint.every": 0,
}
"""``--quick``: the reduced run the slow test uses, the demo's earlier recipe: a 10-epoch SFT (held-out sampled task
reward ~0.50, so PPO has room to show a gain; a weaker one leaves PPO too sparse a reward to learn from), a short
reward-model run, 30 PPO iterations of 128 episodes (8 epochs x 2 minibatches) and no periodic evaluation. The full
demo's 25-epoch SFT already reaches ~0.93, and its gain comes from 100 iterations of 512 episodes."""


def _builtin_file(name: str) -> Path:
    from rlchat.core.data import builtin_path

    return builtin_path(name)


def run_demo(cfg: Config, run_dir: Path, address: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the whole demo; returns the summary written to ``run_dir/summary.json``."""
    from rlchat.core.checkpoint import find_best_checkpoint, resolve_checkpoint_dir
    from rlchat.core.evaluation import evaluate_checkpoint
    from rlchat.core.metrics import plot_run
    from rlchat.distributed.cluster import init_ray
    from rlchat.distributed.prepare import prepare
    from rlchat.distributed.stages import run_rm, run_sft
    from rlchat.distributed.trainer import train

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
    # SFT learns the chat format and the task's answers from the task's *train* split; PPO's held-out prompts
    # are the task's val split, never seen in SFT.
    from rlchat.distributed.prepare import merge_prepared

    sft_data = merge_prepared([data_dirs["chat"], data_dirs["task"]], run_dir / "data" / "sft")
    cfg = cfg.replace(
        **{"data.prompts": data_dirs["task"], "data.sft": str(sft_data), "data.preferences": data_dirs["prefs"]}
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
    # the reward model starts from the SFT policy's trunk (InstructGPT), unless the config names another start
    rm_cfg = cfg if (cfg.rm.init_from or cfg.rm.name_or_path) else cfg.replace(**{"rm.init_from": str(sft_ckpt)})
    rm_dir, rm_metrics = run_rm(rm_cfg, run_dir / "rm", quiet=quiet)
    rm_ckpt = find_best_checkpoint(rm_dir)
    timings["rm_s"] = time.perf_counter() - t

    # 4. PPO from the SFT policy
    say("== 4/5 PPO from the SFT policy (rollout workers + learner)")
    t = time.perf_counter()
    ppo_cfg = cfg.replace(**{"checkpoint.init_from": str(sft_ckpt)})
    ppo_dir, ppo_metrics = train(ppo_cfg, run_dir / "ppo", quiet=quiet)
    # The *final* PPO policy, not the run's "best": best is chosen by eval/reward_mean on held-out prompts, the
    # same prompts the comparison below scores, and picking on the test set would inflate the stated margin.
    ppo_ckpt = resolve_checkpoint_dir(ppo_dir / "checkpoints" / "latest")
    timings["ppo_s"] = time.perf_counter() - t

    # 5. held-out comparison: greedy metrics (evaluation code) + the sampled env reward PPO optimises
    say("== 5/5 held-out evaluation: SFT policy vs PPO policy")
    t = time.perf_counter()
    from rlchat.core.data import load_records

    held_out = load_records(cfg.data.prompts, split="val", cfg=cfg)
    eval_cfg = cfg.replace(**{"reward.model_path": str(rm_ckpt)})
    n = cfg.ppo.eval_prompts
    sft_eval = evaluate_checkpoint(sft_ckpt, held_out, cfg=eval_cfg, max_prompts=n)
    ppo_eval = evaluate_checkpoint(ppo_ckpt, held_out, cfg=eval_cfg, baseline=sft_ckpt, max_prompts=n)
    sampled = {name: sampled_reward(ck, cfg, held_out, n) for name, ck in (("sft", sft_ckpt), ("ppo", ppo_ckpt))}
    timings["eval_s"] = time.perf_counter() - t
    plots = []
    for d in (sft_dir, rm_dir, ppo_dir):
        plots += [str(p) for p in plot_run(d)]
    timings["total_s"] = time.perf_counter() - t0

    summary = {
        "run_dir": str(run_dir.resolve()),
        "checkpoints": {"sft": str(sft_ckpt), "rm": str(rm_ckpt), "ppo": str(ppo_ckpt)},
        "sft_eval": sft_eval["metrics"],
        "ppo_eval": ppo_eval["metrics"],
        "sampled_reward": sampled,
        "win_rate": ppo_eval.get("win_rate"),
        "sample": ppo_eval["examples"][0] if ppo_eval["examples"] else None,
        "ppo_final": {k: v for k, v in ppo_metrics.items() if not k.startswith("perf/")},
        "sft_final": sft_metrics,
        "rm_final": rm_metrics,
        "timings": timings,
        "plots": plots,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    say(format_summary(summary))
    return summary


def sampled_reward(checkpoint: Path, cfg: Config, records: list[Any], n_prompts: int, samples: int = 4) -> dict:
    """Mean held-out env reward when sampling at the rollout temperature: the quantity PPO maximises.

    ``samples`` episodes per prompt on the first ``n_prompts`` held-out records, seeded, through the same envs and
    rewards as training (:class:`rlchat.distributed.rollout.Sampler`).
    """
    from rlchat.core.checkpoint import load_policy
    from rlchat.distributed.rollout import Sampler

    model, tokenizer, _ = load_policy(checkpoint)
    sampler = Sampler(cfg, tokenizer, model.lm, records)
    n = min(n_prompts, len(records))
    batch = sampler.sample(iteration=10**6, record_indices=list(range(n)) * samples)
    total = batch.reward_components["total"]
    return {"mean": float(total.mean()), "stderr": float(total.std() / max(len(total), 1) ** 0.5), "n": len(total)}


def verdict(sft: dict[str, float], ppo: dict[str, float]) -> str:
    """One plain sentence on whether PPO improved on SFT, judged against the noise of the sampled estimate.

    "Improved" needs a gain of more than two standard errors of the difference; a smaller positive gain is called
    noise, and a negative one is said as such (never "raised ... by -0.03").
    """
    gain = ppo["mean"] - sft["mean"]
    noise = 2.0 * (sft["stderr"] ** 2 + ppo["stderr"] ** 2) ** 0.5
    if gain > noise:
        return (
            f"PPO raised the held-out task reward (sampled) by {gain:+.3f} over the SFT policy (noise ±{noise:.3f})."
        )
    fix = "try more PPO iterations (ppo.iterations) or a stronger SFT start (sft.epochs)"
    if gain > 0:
        return (
            f"PPO did not clearly improve on the SFT policy: its gain of {gain:+.3f} in held-out task reward "
            f"(sampled) is within the noise (±{noise:.3f}); {fix}."
        )
    return (
        f"PPO did not improve on the SFT policy: the held-out task reward (sampled) fell by {-gain:.3f} "
        f"(noise ±{noise:.3f}); {fix}."
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing table (plain text)."""
    sft, ppo = summary["sft_eval"], summary["ppo_eval"]
    s_sft, s_ppo = summary["sampled_reward"]["sft"], summary["sampled_reward"]["ppo"]
    rows = [("held-out metric", "SFT policy", "PPO policy")]
    rows.append(
        (
            f"task reward, sampled T=1 ({s_ppo['n']} episodes)",
            f"{s_sft['mean']:.3f} ± {s_sft['stderr']:.3f}",
            f"{s_ppo['mean']:.3f} ± {s_ppo['stderr']:.3f}",
        )
    )

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows.append(("task reward, greedy", num(sft.get("eval/reward_mean")), num(ppo.get("eval/reward_mean"))))
    for key in sorted(k for k in ppo if k.startswith("eval/reward/")):
        rows.append((key.replace("eval/reward/", "  component "), num(sft.get(key)), num(ppo.get(key))))
    for key in ("eval/perplexity", "eval/accuracy", "eval/response_len"):
        if key in ppo:
            rows.append((key.split("/", 1)[1].replace("_", " "), num(sft.get(key)), num(ppo.get(key))))
    if ppo.get("eval/win_rate") is not None:
        rows.append(("reward-model win rate vs SFT", "-", num(ppo["eval/win_rate"])))
    kl = summary["ppo_final"].get("kl/ref_kl")
    if kl is not None:
        rows.append(("KL to the SFT reference (last iteration)", "0", num(kl)))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [""]
    for i, r in enumerate(rows):
        lines.append(f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}")
        if i == 0:
            lines.append("  " + "-" * (sum(w) + 4))
    lines.append("\n" + verdict(s_sft, s_ppo))
    sample = summary.get("sample")
    if sample:
        lines.append("\nSample conversation (PPO policy, greedy):")
        for m in sample.get("prompt", []):
            lines.append(f"  {m['role']:>9}: {m['content']}")
        lines.append(f"  {'assistant':>9}: {sample.get('reply', '')}   (reference: {sample.get('reference')})")
    t = summary["timings"]
    lines.append(
        f"\nTime: {t['total_s']:.0f} s (prepare {t['prepare_s']:.0f}, SFT {t['sft_s']:.0f}, RM {t['rm_s']:.0f}, "
        f"PPO {t['ppo_s']:.0f}, eval {t['eval_s']:.0f}).  Run directory: {summary['run_dir']}"
    )
    lines.append(f"Plots: {len(summary['plots'])} PNGs under {summary['run_dir']}/*/plots/")
    return "\n".join(lines)


def demo_command(
    config: str | None, overrides: list[str], run_dir: str | None, address: str | None, quick: bool = False, **_: Any
) -> int:
    """``rlchat demo``."""
    from rlchat.core.metrics import make_run_dir

    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    if quick:
        cfg = cfg.replace(
            **{k: v for k, v in QUICK_OVERRIDES.items() if not any(o.startswith(k + "=") for o in overrides)}
        )
    path = make_run_dir(run_dir, "demo")
    print(f"run directory: {path.resolve()}", flush=True)
    run_demo(cfg, path, address=address)
    return 0
