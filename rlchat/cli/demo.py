"""``rlchat demo``: the built-in end-to-end demo, the README's first command.

    rlchat demo [--config configs/demo.yaml] [key=value ...] [--run-dir DIR] [--quick] [--full]

On one local Ray instance that starts by itself (2 CPU cores are enough), with the built-in data and a tiny model:

1. ``data prepare`` the three built-in sets (task, chat, preference pairs) through Ray Data;
2. SFT on the chat conversations (Ray Train);
3. reward-model training on the preference pairs (Ray Train);
4. PPO from the SFT policy on the arithmetic task with its verifiable reward (rollout workers + learner);
5. a table: held-out task reward (and every component) of the SFT policy vs the PPO policy, KL to the
   reference, one sample conversation; plots of every stage under ``RUN_DIR/*/plots``;
6. with ``--full`` (beyond the 10-minute budget): RLHF with a gold check (:func:`run_rlhf`) -- PPO (GRPO) on the
   learned reward model alone, scored on the task's checked answer it never sees; its rows join the table.

Everything lands under one run directory (``runs/demo-<time>/`` by default): ``data/``, ``sft/``, ``rm/``,
``ppo/``, ``summary.json`` (and ``rlhf/`` with ``--full``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
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
    "ppo.eval_prompts": 200,  # every held-out prompt: the gold gain is judged on 800 sampled replies (noise ~0.04)
    "checkpoint.every": 0,
}
"""``--quick``: the reduced run the slow test uses, the demo's earlier recipe: a 10-epoch SFT (held-out sampled task
reward ~0.50, so PPO has room to show a gain; a weaker one leaves PPO too sparse a reward to learn from), a short
reward-model run, 30 PPO iterations of 128 episodes (8 epochs x 2 minibatches) and no periodic evaluation. The full
demo's 25-epoch SFT already reaches ~0.93, and its gain comes from 100 iterations of 512 episodes."""


RLHF_POLICY_SFT = {"sft.epochs": 5}
"""RLHF run: the policy's start, a fifth of the demo's SFT (held-out sampled gold ~0.15): room for gold to rise."""
RLHF_RM = {"rm.kind": "implicit", "rm.epochs": 8, "rm.learning_rate": 1e-3, "rm.name_or_path": ""}
"""RLHF run: the reward model, implicit (DPO's log-ratio) from the demo's SFT policy (a judge that knows more than
the policy it judges); a scalar head from either trunk ranks the policy's nearby wrong numbers near chance
(docs/ppo.md)."""
RLHF_PPO = {
    "ppo.advantage": "grpo",  # a reward model's score means something only against replies to the same prompt
    "rollout.samples_per_prompt": 4,
    "rollout.envs_per_worker": 256,  # 64 prompts x 4 replies per iteration: at 32 prompts gains swung +0.05-0.08
    "ppo.learning_rate": 5e-4,  # at 1e-3 the policy over-optimises within 30 iterations (KL 16, gold 0.15 -> 0.03)
    "ppo.kl_coef": 0.05,
    "ppo.update_epochs": 8,
    "ppo.num_minibatches": 2,
    "ppo.iterations": 30,
    "ppo.eval_every": 10,
    "ppo.eval_prompts": 200,  # every held-out prompt: the gold gain is judged on 800 sampled replies (noise ~0.04)
    "checkpoint.every": 0,
}
"""RLHF run: GRPO on the reward model alone (``reward.model=1``, ``reward.verifiable=0``), gold monitored."""


def run_rlhf(
    cfg: Config, run_dir: Path, judge: Path, keep: Collection[str] = (), quiet: bool = False, use_ray: bool = True
) -> dict[str, Any]:
    """RLHF with a gold check: SFT a weak policy, train an implicit reward model from ``judge`` (a stronger policy
    checkpoint), run PPO whose reward is that model alone, and score both policies' held-out *gold* reward (the
    task's checked answer, which the learner never sees) beside the proxy, sampled at the rollout temperature.

    Args:
        cfg: the demo's config with ``data.sft``, ``data.preferences`` and ``data.prompts`` set.
        run_dir: where ``sft/``, ``rm/`` and ``ppo/`` go.
        judge: the reward model's starting policy checkpoint (the demo's SFT policy).
        keep: dotted keys the user set on the command line; the RLHF settings above do not override them.
        use_ray: False runs SFT and RM in-process (tests); PPO follows ``ray.learner_workers`` / ``rollout.*``.

    Returns:
        ``gold`` and ``proxy`` (``{"sft": ..., "ppo": ...}`` as :func:`sampled_reward`), ``rm_final`` (the reward
        model's metrics), ``kl`` (KL to the reference at the last iteration), ``checkpoints``, ``run_dir``.
    """
    from rlchat.core.checkpoint import find_best_checkpoint, resolve_checkpoint_dir
    from rlchat.core.data import load_records
    from rlchat.distributed.stages import run_rm, run_sft
    from rlchat.distributed.trainer import train

    def ours(settings: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in settings.items() if k not in keep}

    weak_dir, _ = run_sft(cfg.replace(**ours(RLHF_POLICY_SFT)), run_dir / "sft", quiet=quiet, use_ray=use_ray)
    weak = find_best_checkpoint(weak_dir)
    rm_cfg = cfg.replace(**{"rm.init_from": str(judge), **ours(RLHF_RM)})
    rm_dir, rm_metrics = run_rm(rm_cfg, run_dir / "rm", quiet=quiet, use_ray=use_ray)
    rm_ckpt = find_best_checkpoint(rm_dir)
    ppo_cfg = cfg.replace(
        **{
            "checkpoint.init_from": str(weak),
            "reward.verifiable": 0.0,  # the learner never sees the checked answer ...
            "reward.model": 1.0,  # ... only the reward model's score
            "reward.model_path": str(rm_ckpt),
            **ours(RLHF_PPO),
        }
    )
    ppo_dir, ppo_metrics = train(ppo_cfg, run_dir / "ppo", quiet=quiet)
    ppo_ckpt = resolve_checkpoint_dir(ppo_dir / "checkpoints" / "latest")
    held_out = load_records(cfg.data.prompts, split="val", cfg=cfg)
    n = ppo_cfg.ppo.eval_prompts
    # one sampling per policy: its reward-model total is the proxy, its checked answer (monitored) the gold
    policies = (("sft", weak), ("ppo", ppo_ckpt))
    scores = {k: sampled_scores(c, ppo_cfg, held_out, n, components=["verifiable"]) for k, c in policies}
    return {
        "run_dir": str(run_dir),
        "checkpoints": {"sft": str(weak), "rm": str(rm_ckpt), "ppo": str(ppo_ckpt)},
        "gold": {k: s["verifiable"] for k, s in scores.items()},
        "proxy": {k: s["total"] for k, s in scores.items()},
        "rm_final": rm_metrics,
        "kl": ppo_metrics.get("kl/ref_kl"),
    }


def _builtin_file(name: str) -> Path:
    from rlchat.core.data import builtin_path

    return builtin_path(name)


def run_demo(
    cfg: Config,
    run_dir: Path,
    address: str | None = None,
    quiet: bool = False,
    full: bool = False,
    keep: Collection[str] = (),
) -> dict[str, Any]:
    """Run the whole demo (with ``full``, the RLHF run too; ``keep``: keys the user set, see :func:`run_rlhf`);
    returns the summary written to ``run_dir/summary.json``."""
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
    stages = 6 if full else 5

    # 1. data
    say(f"== 1/{stages} prepare the built-in data (Ray Data)")
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
    say(f"== 2/{stages} supervised fine-tuning (Ray Train)")
    t = time.perf_counter()
    sft_dir, sft_metrics = run_sft(cfg, run_dir / "sft", quiet=quiet)
    sft_ckpt = find_best_checkpoint(sft_dir)
    timings["sft_s"] = time.perf_counter() - t

    # 3. reward model
    say(f"== 3/{stages} reward model on preference pairs (Ray Train)")
    t = time.perf_counter()
    # the reward model starts from the SFT policy's trunk (InstructGPT), unless the config names another start
    rm_cfg = cfg if (cfg.rm.init_from or cfg.rm.name_or_path) else cfg.replace(**{"rm.init_from": str(sft_ckpt)})
    rm_dir, rm_metrics = run_rm(rm_cfg, run_dir / "rm", quiet=quiet)
    rm_ckpt = find_best_checkpoint(rm_dir)
    timings["rm_s"] = time.perf_counter() - t

    # 4. PPO from the SFT policy
    say(f"== 4/{stages} PPO from the SFT policy (rollout workers + learner)")
    t = time.perf_counter()
    ppo_cfg = cfg.replace(**{"checkpoint.init_from": str(sft_ckpt)})
    ppo_dir, ppo_metrics = train(ppo_cfg, run_dir / "ppo", quiet=quiet)
    # The *final* PPO policy, not the run's "best": best is chosen by eval/reward_mean on held-out prompts, the
    # same prompts the comparison below scores, and picking on the test set would inflate the stated margin.
    ppo_ckpt = resolve_checkpoint_dir(ppo_dir / "checkpoints" / "latest")
    timings["ppo_s"] = time.perf_counter() - t

    # 5. held-out comparison: greedy metrics (evaluation code) + the sampled env reward PPO optimises
    say(f"== 5/{stages} held-out evaluation: SFT policy vs PPO policy")
    t = time.perf_counter()
    from rlchat.core.data import load_records

    held_out = load_records(cfg.data.prompts, split="val", cfg=cfg)
    eval_cfg = cfg.replace(**{"reward.model_path": str(rm_ckpt)})
    n = cfg.ppo.eval_prompts
    sft_eval = evaluate_checkpoint(sft_ckpt, held_out, cfg=eval_cfg, max_prompts=n)
    ppo_eval = evaluate_checkpoint(ppo_ckpt, held_out, cfg=eval_cfg, baseline=sft_ckpt, max_prompts=n)
    sampled = {name: sampled_reward(ck, cfg, held_out, n) for name, ck in (("sft", sft_ckpt), ("ppo", ppo_ckpt))}
    timings["eval_s"] = time.perf_counter() - t
    rlhf = None
    if full:
        say(f"== 6/{stages} RLHF with a gold check: PPO on the reward model alone from a weaker SFT policy")
        t = time.perf_counter()
        rlhf = run_rlhf(cfg, run_dir / "rlhf", judge=sft_ckpt, keep=keep, quiet=quiet)
        timings["rlhf_s"] = time.perf_counter() - t
    plots = []
    stage_dirs = [sft_dir, rm_dir, ppo_dir]
    if rlhf is not None:
        stage_dirs += [run_dir / "rlhf" / d for d in ("sft", "rm", "ppo")]
    for d in stage_dirs:
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
    if rlhf is not None:
        summary["rlhf"] = rlhf
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    say(format_summary(summary))
    return summary


def sampled_reward(checkpoint: Path, cfg: Config, records: list[Any], n_prompts: int, samples: int = 4) -> dict:
    """Mean held-out env reward when sampling at the rollout temperature: the quantity PPO maximises.

    ``samples`` episodes per prompt on the first ``n_prompts`` held-out records, seeded, through the same envs and
    rewards as training (:class:`rlchat.distributed.rollout.Sampler`).
    """
    return sampled_scores(checkpoint, cfg, records, n_prompts, samples)["total"]


def sampled_scores(
    checkpoint: Path,
    cfg: Config,
    records: list[Any],
    n_prompts: int,
    samples: int = 4,
    components: Collection[str] = (),
) -> dict[str, dict]:
    """:func:`sampled_reward` (``"total"``) and, from the same episodes, the mean of each reward component named in
    ``components`` (monitored when ``cfg`` gives it no weight): one sampling scores the proxy and the gold alike.

    Raises:
        ConfigError: a component ``reward.monitor`` cannot report.
    """
    from rlchat.core.checkpoint import load_policy
    from rlchat.distributed.rollout import Sampler

    monitor = tuple(dict.fromkeys([*cfg.reward.monitor, *components]))
    cfg = cfg.replace(**{"reward.monitor": monitor})
    model, tokenizer, _ = load_policy(checkpoint)
    sampler = Sampler(cfg, tokenizer, model.lm, records)
    n = min(n_prompts, len(records))
    batch = sampler.sample(iteration=10**6, record_indices=list(range(n)) * samples)
    out = {}
    for key in ("total", *components):
        v = batch.reward_components[key]
        out[key] = {"mean": float(v.mean()), "stderr": float(v.std() / max(len(v), 1) ** 0.5), "n": len(v)}
    return out


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


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    """Three aligned plain-text columns, a rule under the header row."""
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    out = []
    for i, r in enumerate(rows):
        out.append(f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}")
        if i == 0:
            out.append("  " + "-" * (sum(w) + 4))
    return out


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
    lines = ["", *_table(rows)]
    lines.append("\n" + verdict(s_sft, s_ppo))
    if summary.get("rlhf"):
        lines.append(format_rlhf(summary["rlhf"]))
    sample = summary.get("sample")
    if sample:
        lines.append("\nSample conversation (PPO policy, greedy):")
        for m in sample.get("prompt", []):
            lines.append(f"  {m['role']:>9}: {m['content']}")
        lines.append(f"  {'assistant':>9}: {sample.get('reply', '')}   (reference: {sample.get('reference')})")
    t = summary["timings"]
    rlhf_time = f", RLHF {t['rlhf_s']:.0f}" if "rlhf_s" in t else ""
    lines.append(
        f"\nTime: {t['total_s']:.0f} s (prepare {t['prepare_s']:.0f}, SFT {t['sft_s']:.0f}, RM {t['rm_s']:.0f}, "
        f"PPO {t['ppo_s']:.0f}, eval {t['eval_s']:.0f}{rlhf_time}).  Run directory: {summary['run_dir']}"
    )
    lines.append(f"Plots: {len(summary['plots'])} PNGs under {summary['run_dir']}/*/plots/")
    return "\n".join(lines)


def format_rlhf(rlhf: dict[str, Any]) -> str:
    """The ``--full`` rows: held-out gold and proxy of the weak SFT policy and of PPO on the reward model alone."""
    g, p = rlhf["gold"], rlhf["proxy"]

    def cell(d: dict[str, float]) -> str:
        return f"{d['mean']:.3f} ± {d['stderr']:.3f}"

    rows = [
        ("RLHF: PPO (GRPO) on the reward model alone", "weak SFT", "RLHF policy"),
        (f"gold: task reward, sampled T=1 ({g['ppo']['n']} episodes)", cell(g["sft"]), cell(g["ppo"])),
        ("proxy: reward-model score, sampled", cell(p["sft"]), cell(p["ppo"])),
    ]
    if rlhf.get("kl") is not None:
        rows.append(("KL to the weak SFT reference (last iteration)", "0", f"{rlhf['kl']:.3f}"))
    acc = (rlhf.get("rm_final") or {}).get("rm/val_accuracy")
    if acc is not None:
        rows.append(("reward model (implicit): held-out pairwise accuracy", "-", f"{acc:.3f}"))
    lines = ["", *_table(rows)]
    gain = g["ppo"]["mean"] - g["sft"]["mean"]
    noise = 2.0 * (g["sft"]["stderr"] ** 2 + g["ppo"]["stderr"] ** 2) ** 0.5
    said = "raised" if gain > noise else ("did not clearly raise" if gain > 0 else "lowered")
    lines.append(
        f"\nTrained on the reward model alone, PPO {said} the held-out gold reward it never sees: {gain:+.3f} "
        f"(noise ±{noise:.3f})."
    )
    return "\n".join(lines)


def demo_command(
    config: str | None,
    overrides: list[str],
    run_dir: str | None,
    address: str | None,
    quick: bool = False,
    full: bool = False,
    **_: Any,
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
    keep = {o.split("=", 1)[0] for o in overrides if "=" in o}
    run_demo(cfg, path, address=address, full=full, keep=keep)
    return 0
