"""Preference pairs from the policy's own samples, labelled by a checker: the comparisons an RLHF reward model needs.

InstructGPT's labellers ranked *the policy's own* completions, so the reward model learns to tell apart the kinds of
replies PPO will produce. A reward model trained only on fixed, hand-made pairs (the built-in ``builtin:prefs``:
"10" vs "9") ranks the policy's nearby wrong answers barely above chance, and PPO on it lowers the checked answer
rate (measured: 0.46 -> 0.13). Here the labeller is simulated: each train prompt gets ``samples`` completions from a
policy checkpoint, the reward config (the task's verifiable check, the "gold" rater) scores them, and the best and
the worst reply of a prompt become one pair when their scores differ by at least ``min_margin``. The gold rater sees
only *train* prompts; the held-out prompts the gold check measures are never labelled (AlpacaFarm's simulated
annotators follow the same idea).

The pairs are ordinary preference :class:`~rlchat.core.data.Record` objects (``source`` ``policy:<checkpoint>``,
``meta.margin``), written in the prepared-data layout (``train.parquet`` / ``val.parquet``) that ``rm.feedback`` /
``data.preferences`` read beside any other preference set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlchat.core.config import Config, RewardConfig
from rlchat.core.data import Record, normalize_text
from rlchat.core.errors import ConfigError


@dataclass
class PairStats:
    """What :func:`policy_pairs` saw: prompts sampled, pairs made, and why the rest made none."""

    prompts: int = 0
    pairs: int = 0
    tied: int = 0
    """Prompts whose best and worst sample scored within ``min_margin`` (all right or all wrong: no comparison)."""
    empty: int = 0
    """Prompts with fewer than two non-empty replies."""
    mean_score: float = 0.0
    """Mean gold score of every sample (the policy's sampled success rate on these prompts)."""


def policy_pairs(
    checkpoint: str | Path,
    records: Sequence[Record],
    cfg: Config,
    *,
    samples: int = 4,
    min_margin: float = 0.5,
    rater: RewardConfig | None = None,
    seed: int = 0,
    batch_prompts: int = 64,
    max_pairs_per_prompt: int = 1,
) -> tuple[list[Record], PairStats]:
    """Sample ``samples`` replies per prompt from ``checkpoint`` and pair each prompt's best and worst reply.

    Args:
        checkpoint: a policy checkpoint (SFT or PPO).
        records: prompt records with their references (e.g. the task's *train* split).
        cfg: sampling settings come from ``rollout`` (temperature, top-k/p) and ``env.max_turn_tokens``.
        samples: completions per prompt (>= 2).
        min_margin: smallest gold-score gap that makes a pair (ties say nothing about preference).
        rater: the reward config that labels (default: ``cfg.reward`` with only its verifiable term).
        seed: sampling seed (per prompt and sample, so a rerun makes the same pairs).
        batch_prompts: prompts per generation batch.
        max_pairs_per_prompt: 1 = the best against the worst reply; more = also each other distinct rejected reply
            against a reply that beats it by ``min_margin`` (more of the policy's own mistakes per prompt).

    Returns:
        The pairs, and :class:`PairStats`.
    """
    from rlchat.core.checkpoint import load_policy
    from rlchat.core.generation import GenerationEngine, SamplingParams
    from rlchat.core.rewards import RewardFunction

    if samples < 2:
        raise ConfigError(f"policy pairs: samples={samples}; expected at least 2 completions per prompt to compare")
    if min_margin <= 0:
        raise ConfigError(f"policy pairs: min_margin={min_margin}; expected > 0 (e.g. 0.5 for a 0/1 checker)")
    model, tok, info = load_policy(checkpoint)
    rater = rater or RewardConfig(verifiable=1.0)
    score = RewardFunction(rater, tok)
    engine = GenerationEngine(model, tok, precision=cfg.model.precision)
    r = cfg.rollout
    params = SamplingParams(
        max_new_tokens=cfg.env.max_turn_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p
    )
    stats = PairStats()
    pairs: list[Record] = []
    all_scores: list[float] = []
    origin = f"policy:{Path(str(info.path)).name}"
    for start in range(0, len(records), batch_prompts):
        chunk = [rec for rec in records[start : start + batch_prompts] if rec.reference is not None]
        prompts = [rec.prompt_messages() for rec in chunk]
        ids = [tok.render_prompt(p) for p in prompts]
        rows = [i for i in range(len(chunk)) for _ in range(samples)]
        seeds = [seed * 1_000_003 + (start + i) * samples + k for i in range(len(chunk)) for k in range(samples)]
        res = engine.generate([ids[i] for i in rows], params, seeds)
        raw = [tok.decode([t for t in toks if t != tok.eot_id], skip_special=True) for toks in res.tokens]
        texts = [normalize_text(t) for t in raw]  # as every data loader stores text: written pairs load unchanged
        results = score.score_batch(
            [prompts[i] for i in rows], raw, [list(t) for t in res.tokens], [chunk[i] for i in rows]
        )
        scores = np.array([x.total for x in results], dtype=np.float64).reshape(len(chunk), samples)
        all_scores.extend(scores.ravel().tolist())
        for i, rec in enumerate(chunk):
            stats.prompts += 1
            # an empty reply (the end-of-turn token first) is no text to prefer or reject: preference data refuses it
            usable = [k for k in range(samples) if texts[i * samples + k].strip()]
            if len(usable) < 2:
                stats.empty += 1
                continue
            ranked = sorted(usable, key=lambda k: -scores[i, k])
            if float(scores[i, ranked[0]] - scores[i, ranked[-1]]) < min_margin:
                stats.tied += 1
                continue
            # the best against the worst first; with max_pairs_per_prompt > 1 also the other distinct texts that
            # score min_margin apart (each rejected reply once: the reward model sees each mistake of this prompt)
            made: set[tuple[str, str]] = set()
            for lo in reversed(ranked):
                for hi in ranked:
                    c, r = texts[i * samples + hi], texts[i * samples + lo]
                    margin = float(scores[i, hi] - scores[i, lo])
                    if margin < min_margin or c == r or (c, r) in made or any(x[1] == r for x in made):
                        continue
                    made.add((c, r))
                    pairs.append(
                        Record(
                            messages=prompts[i],
                            chosen=[{"role": "assistant", "content": c}],
                            rejected=[{"role": "assistant", "content": r}],
                            source=f"{origin}:{rec.source}",
                            format="preference",
                            meta={"margin": margin, "labeller": "gold"},
                        )
                    )
                    break
                if len(made) >= max_pairs_per_prompt:
                    break
    stats.pairs = len(pairs)
    stats.mean_score = float(np.mean(all_scores)) if all_scores else 0.0
    return pairs, stats


def write_pairs(pairs: Sequence[Record], path: str | Path) -> Path:
    """Write pairs as JSON Lines (``prompt`` / ``chosen`` / ``rejected``, plus ``margin`` and ``origin``) that
    ``data.preferences`` / ``rlchat data prepare`` read like any preference file; atomically."""
    import json

    from rlchat.core.files import atomic_write_text

    lines = [
        json.dumps(
            {
                "prompt": p.messages,
                "chosen": p.chosen,
                "rejected": p.rejected,
                "margin": p.meta.get("margin"),
                "labeller": p.meta.get("labeller"),
                "origin": p.source,
            },
            ensure_ascii=False,
        )
        for p in pairs
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, "".join(line + "\n" for line in lines))
