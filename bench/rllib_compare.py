"""rlchat's sequence-level PPO vs RLlib's stock per-timestep PPO on the same env and the same model.

    python bench/rllib_compare.py [--tokens 16,112] [--iterations 3] [--steps 1024] [--threads 1]

Both sides train on ``rlchat/Chat-v0`` (the built-in arithmetic prompts, a 512-id vocabulary) with the same tiny
GPT-2 policy + value head (``rlchat.model.PolicyValueModel`` built from one config: 2 layers, width 64), in one
process each (no Ray actors: RLlib with ``num_env_runners=0`` / ``num_learners=0``, rlchat with
``rollout.num_workers=0`` / ``ray.learner_workers=0``), for ``--steps`` env steps (generated tokens) per iteration,
2 epochs x 4 minibatches, fp32, ``--threads`` torch threads. T is ``env.max_turn_tokens``: randomly initialised
policies almost never sample the end-of-turn token, so every episode runs T steps.

- **RLlib** (Ray's new API stack, ``PPOConfig`` as is): a ``TorchRLModule`` wraps the policy; each env step is
  one timestep, so both sampling and the learner forward the **whole context once per generated token**
  (observation = the conversation so far), and the action distribution is the full-vocabulary logits at the last
  position. 16 envs per env runner are stepped as one vector env (batched forward per step).
- **rlchat** (``rlchat.trainer.train``): the rollout sampler generates all episodes of an iteration with one
  batched KV-cache forward per token, and the learner runs one causal forward per *sequence* for log-probs,
  values and the reference.

The first iteration of each (warm-up) is left out; the table gives mean wall-clock seconds per iteration, the same
per 1,000 env steps (the two sides' batches differ slightly: rlchat samples whole episodes, some end early), and
for rlchat the sample / update split of its driver (``perf/sample_s``, ``perf/update_s``; RLlib's own timers are
smoothed over iterations, the warm-up included, so none is given for it). Figures go in bench/README.md and
docs/ppo.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch

ENVS_PER_RUNNER = 16
EPOCHS = 2
MINIBATCHES = 4


def overrides(t: int) -> dict[str, Any]:
    """The config both sides use (dotted keys, as RLlib's env_config carries them)."""
    return {
        "tokenizer.vocab_size": 512,  # 506 cl100k ranks + chat tokens: Discrete(512) actions on both sides
        "model.arch": "gpt2",
        "model.n_layer": 2,
        "model.n_embd": 64,
        "model.n_head": 4,
        "model.n_positions": 256,
        "model.precision": "fp32",
        "env.max_turn_tokens": t,
        "env.max_context": t + 48,  # the longest built-in prompt is ~30 tokens
        "reward.verifiable": 1.0,
    }


# ------------------------------------------------------------------------------------------------------ RLlib side


def rllib_module_class() -> type:
    """A TorchRLModule around rlchat's PolicyValueModel (defined lazily: RLlib imports are slow)."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.apis import ValueFunctionAPI
    from ray.rllib.core.rl_module.torch import TorchRLModule

    class ChatPolicyModule(TorchRLModule, ValueFunctionAPI):
        """Per timestep: the observation (tokens, length) through the trunk, logits and value at the last token."""

        def setup(self) -> None:
            from rlchat.config import Config
            from rlchat.model import PolicyValueModel
            from rlchat.tokenizer import ChatTokenizer

            cfg = Config().replace(**self.model_config["overrides"])
            self.policy = PolicyValueModel.build(cfg, ChatTokenizer.from_config(cfg.tokenizer))

        def _last_hidden(self, batch: dict[str, Any]) -> torch.Tensor:
            from rlchat.model import _trunk_forward

            obs = batch[Columns.OBS]
            length = obs["length"].long().reshape(-1)  # (B,)
            width = int(length.max())
            ids = obs["tokens"][:, :width].long()  # (B, L) right-padded
            attn = (torch.arange(width, device=ids.device)[None, :] < length[:, None]).long()
            h = _trunk_forward(self.policy.trunk, ids, attn)  # (B, L, H): the whole context, every timestep
            return h[torch.arange(h.shape[0], device=h.device), length - 1]  # (B, H)

        def _logits(self, last: torch.Tensor) -> torch.Tensor:
            weight, bias = self.policy.head_weight()
            logits = last @ weight.T
            return logits + bias if bias is not None else logits  # (B, V)

        def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            return {Columns.ACTION_DIST_INPUTS: self._logits(self._last_hidden(batch))}

        def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            last = self._last_hidden(batch)
            return {Columns.ACTION_DIST_INPUTS: self._logits(last), Columns.EMBEDDINGS: last}

        def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
            if embeddings is None:
                embeddings = self._last_hidden(batch)
            return self.policy.value_head(embeddings).squeeze(-1)  # (B,)

    return ChatPolicyModule


def run_rllib(t: int, iterations: int, steps: int, seed: int) -> dict[str, float]:
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    over = overrides(t)
    config = (
        PPOConfig()
        .environment("envs:rlchat/Chat-v0", env_config={"config_overrides": over})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=ENVS_PER_RUNNER)
        .learners(num_learners=0)
        .training(
            train_batch_size_per_learner=steps,
            minibatch_size=steps // MINIBATCHES,
            num_epochs=EPOCHS,
            lr=3e-4,
            gamma=1.0,
            lambda_=0.95,
        )
        .rl_module(rl_module_spec=RLModuleSpec(module_class=rllib_module_class(), model_config={"overrides": over}))
        .debugging(seed=seed)
    )
    algo = config.build_algo()
    rows = []
    try:
        for i in range(iterations):
            t0 = time.perf_counter()
            r = algo.train()
            wall = time.perf_counter() - t0
            sampled = r["env_runners"].get("num_env_steps_sampled", steps)
            if i:
                # RLlib's own timers (r["timers"]) are smoothed across iterations, the warm-up included, so no
                # per-iteration sample / update split is reported for it
                rows.append({"iter_s": wall, "sample_s": float("nan"), "update_s": float("nan"), "steps": sampled})
    finally:
        algo.stop()
    return {k: statistics.mean(row[k] for row in rows) for k in rows[0]}


# ----------------------------------------------------------------------------------------------------- rlchat side


def run_rlchat(t: int, iterations: int, steps: int, seed: int) -> dict[str, float]:
    from rlchat.config import Config
    from rlchat.trainer import train

    # whole episodes, a multiple of the minibatch count (T=112: 8 episodes = 896 steps; compared per 1k steps)
    episodes = max(MINIBATCHES, steps // t // MINIBATCHES * MINIBATCHES)
    cfg = Config().replace(
        **overrides(t),
        **{
            "seed": seed,
            "rollout.num_workers": 0,
            "ray.learner_workers": 0,
            "rollout.envs_per_worker": episodes,
            "ppo.iterations": iterations,
            "ppo.update_epochs": EPOCHS,
            "ppo.num_minibatches": MINIBATCHES,
            "ppo.learning_rate": 3e-4,
            "ppo.eval_every": 0,
            "checkpoint.every": 0,
        },
    )
    rows: list[dict[str, float]] = []

    def record(it: int, metrics: dict[str, float], _ckpt: Any) -> None:
        if it > 1:
            rows.append(
                {
                    "iter_s": metrics["perf/iter_s"],
                    "sample_s": metrics["perf/sample_s"],
                    "update_s": metrics["perf/update_s"],
                    "steps": metrics["rollout/response_len"] * metrics["rollout/episodes"],
                }
            )

    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, f"{tmp}/run", quiet=True, on_iteration=record)
    return {k: statistics.mean(row[k] for row in rows) for k in rows[0]}


# ------------------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="16,112", help="comma-separated env.max_turn_tokens (T) to measure")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations per case (plus one warm-up)")
    ap.add_argument("--steps", type=int, default=1024, help="env steps (generated tokens) per iteration")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    import ray

    # RLlib's Algorithm starts Ray (its env runner and learner live in this process with num_*=0); one instance
    # serves both sides.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for t in map(int, args.tokens.split(",")):
            ours = run_rlchat(t, args.iterations + 1, args.steps, args.seed)
            torch.set_num_threads(args.threads)  # the trainer sets its own budget; give RLlib the same
            print(f"done: rlchat T={t}", flush=True)
            theirs = run_rllib(t, args.iterations + 1, args.steps, args.seed)
            print(f"done: rllib T={t}", flush=True)
            results.append((t, ours, theirs))
    finally:
        ray.shutdown()
    print(
        f"\n{args.steps} env steps per iteration, {EPOCHS} epochs x {MINIBATCHES} minibatches, {args.threads} torch "
        f"thread(s), mean of {args.iterations} iterations after a warm-up\n"
    )
    print(
        f"{'T':>4}  {'design':<28} {'steps/iter':>10} {'s/iter':>7} {'sample s':>9} {'update s':>9} "
        f"{'s per 1k steps':>14} {'RLlib / rlchat':>14}"
    )
    for t, ours, theirs in results:
        per_k = {name: 1000 * r["iter_s"] / r["steps"] for name, r in (("ours", ours), ("rllib", theirs))}
        for name, r in (("RLlib PPO, stock, per token", theirs), ("rlchat sequence-level PPO", ours)):
            key = "rllib" if name.startswith("RLlib") else "ours"
            ratio = f"{per_k['rllib'] / per_k['ours']:.1f}x" if key == "rllib" else ""
            split = [f"{r[k]:>9.2f}" if math.isfinite(r[k]) else f"{'-':>9}" for k in ("sample_s", "update_s")]
            print(
                f"{t:>4}  {name:<28} {r['steps']:>10.0f} {r['iter_s']:>7.2f} {split[0]} {split[1]} "
                f"{per_k[key]:>14.2f} {ratio:>14}"
            )


if __name__ == "__main__":
    main()
