"""Env step cost vs context length: ``rlchat/Chat-v0`` steps/s with a 64-token and a 2048-token context.

``ChatEnv.step`` appends one token to a preallocated buffer and returns that buffer, so its cost must not grow
with the context (it runs once per generated token in every rollout). This benchmark starts episodes from prompts
of about 64 and about 2048 tokens, times only the per-token ``step`` calls (no end of turn, so no reward), and
prints a Markdown table; the ratio column should stay within 20% of 1.0. Rates are per CPU second of this process
and the two context lengths are measured interleaved, so other processes on a shared machine do not skew them.

Run::

    python bench/env_step.py [--steps 256] [--episodes 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers rlchat/Chat-v0)
from envs.chat_env import ChatEnv
from rlchat.config import Config
from rlchat.data import Record
from rlchat.tokenizer import ChatTokenizer

MAX_CONTEXT = 4096


def make_env(prompt_tokens: int, steps: int, tokenizer: ChatTokenizer, wrapped: bool) -> gym.Env:
    """An env whose only record renders to ``prompt_tokens`` tokens and whose turn budget exceeds ``steps``."""
    # " a" is one token in cl100k; the template adds 4 (<|user|> ... <|end|><|assistant|> plus the first word).
    words = max(1, prompt_tokens - 3)
    record = Record(messages=[{"role": "user", "content": "a" + " a" * (words - 1)}], reference="1")
    cfg = Config().replace(**{"env.max_context": MAX_CONTEXT, "env.max_turn_tokens": steps + 1})
    kwargs = {"records": [record], "tokenizer": tokenizer, "config": cfg}
    return gym.make("rlchat/Chat-v0", **kwargs) if wrapped else ChatEnv(**kwargs)


def steps_per_second(env: gym.Env, steps: int, episodes: int, rng: np.random.Generator) -> tuple[float, int]:
    """Steps/s over ``episodes`` episodes of ``steps`` timed steps each; also the context length."""
    eot = env.unwrapped.tokenizer.eot_id
    actions = rng.integers(0, 4000, size=(episodes, steps))
    actions[actions == eot] = 0
    elapsed = 0.0
    length = 0
    for e in range(episodes):
        obs, _ = env.reset(seed=e)
        length = int(obs["length"])
        t0 = time.process_time()  # CPU time: other processes sharing the cores do not inflate it
        for a in actions[e]:
            env.step(a)
        elapsed += time.process_time() - t0
    return episodes * steps / elapsed, length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256, help="timed steps per episode")
    parser.add_argument("--episodes", type=int, default=400, help="episodes per measurement")
    parser.add_argument("--repeats", type=int, default=7, help="measurements per cell (the median is reported)")
    args = parser.parse_args()
    tok = ChatTokenizer("cl100k_base", 4096)
    rng = np.random.default_rng(0)
    print(
        f"Python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}; {args.steps} steps x "
        f"{args.episodes} episodes per measurement, median of {args.repeats}; CPU time of this process\n"
    )
    print("| env | context at reset | steps/s | context at reset | steps/s | ratio 2048/64 |")
    print("|---|---|---|---|---|---|")
    for wrapped in (False, True):
        cells = {p: make_env(p, args.steps, tok, wrapped) for p in (64, 2048)}
        for env in cells.values():
            steps_per_second(env, args.steps, 5, rng)  # warm-up
        runs: dict[int, list[tuple[float, int]]] = {p: [] for p in cells}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both cells alike
            for p, env in cells.items():
                runs[p].append(steps_per_second(env, args.steps, args.episodes, rng))
        rate = {p: statistics.median(r for r, _ in runs[p]) for p in cells}
        length = {p: runs[p][0][1] for p in cells}
        name = "gymnasium.make (checker + order wrappers)" if wrapped else "ChatEnv (raw)"
        print(
            f"| {name} | {length[64]} | {rate[64]:,.0f} | {length[2048]} | {rate[2048]:,.0f} | "
            f"{rate[2048] / rate[64]:.2f} |"
        )


if __name__ == "__main__":
    main()
