"""RolloutBatch: what a rollout worker sends to the learner, and nothing more.

Samplers only act (RLlib new-stack rule): the batch carries what was *observed* while acting -- token ids, masks,
behaviour log-probs of the chosen tokens, turn-end scores with every reward component, truncation flags and the
weights version used. Values, advantages, reference log-probs and KL are computed on the learner. Never logits:
at a 100k vocabulary those are ~400 KB per token.

Layout: numpy arrays, right-padded with the tokenizer's pad id, all (B, T) arrays aligned with ``input_ids``
(position t describes token t; see rlchat/ppo.py for the alignment convention). Column names are constants so the
learner, tests and metrics never spell them twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
ACTION_MASK = "action_mask"
BEHAVIOUR_LOGPROBS = "behaviour_logprobs"
SCORES = "scores"
TRUNCATED = "truncated"

TOKEN_COLUMNS = (INPUT_IDS, ATTENTION_MASK, ACTION_MASK, BEHAVIOUR_LOGPROBS, SCORES)


@dataclass
class RolloutBatch:
    """B finished episodes, right-padded to a common length T.

    Attributes:
        input_ids: (B, T) int64 prompt + responses (+ user turns in multi-turn episodes), pad-filled.
        attention_mask: (B, T) bool, True on real tokens.
        action_mask: (B, T) bool, True on tokens the policy chose (assistant text and its end-of-turn token).
        behaviour_logprobs: (B, T) float32, log-prob of each chosen token under the sampling policy, 0 elsewhere.
        scores: (B, T) float32, each assistant turn's reward placed on that turn's last action token.
        truncated: (B,) bool, episode cut where it would have gone on, a multi-turn context limit (the learner
            bootstraps from V there); a turn cut at the turn budget is scored and terminal (envs/chat_env.py).
        reward_components: name -> (B,) float32 episode sums of each reward component (``total`` included).
        record_index: (B,) int64, index of the prompt record each episode started from.
        weights_version: version of the policy weights that sampled the batch.
        worker_id: which rollout worker produced it (-1 when merged from several).
        metrics: worker-side timings and counts (the driver logs them).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    action_mask: np.ndarray
    behaviour_logprobs: np.ndarray
    scores: np.ndarray
    truncated: np.ndarray
    reward_components: dict[str, np.ndarray] = field(default_factory=dict)
    record_index: np.ndarray | None = None
    weights_version: int = 0
    worker_id: int = -1
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b, t = self.input_ids.shape
        for name in TOKEN_COLUMNS:
            if getattr(self, name).shape != (b, t):
                raise ValueError(f"RolloutBatch.{name} has shape {getattr(self, name).shape}; expected {(b, t)}")
        if self.truncated.shape != (b,):
            raise ValueError(f"RolloutBatch.truncated has shape {self.truncated.shape}; expected {(b,)}")
        if self.record_index is None:
            self.record_index = np.full(b, -1, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_action_tokens(self) -> int:
        return int(self.action_mask.sum())

    @property
    def response_lengths(self) -> np.ndarray:
        """(B,) number of tokens the policy generated per episode."""
        return self.action_mask.sum(axis=1)

    @property
    def episode_rewards(self) -> np.ndarray:
        """(B,) total reward per episode."""
        return self.scores.sum(axis=1)

    def slice(self, rows: Sequence[int] | np.ndarray) -> RolloutBatch:
        rows = np.asarray(rows, dtype=np.int64)
        t = int(self.attention_mask[rows].sum(axis=1).max()) if len(rows) else 0
        return RolloutBatch(
            **{name: getattr(self, name)[rows, :t] for name in TOKEN_COLUMNS},
            truncated=self.truncated[rows],
            reward_components={k: v[rows] for k, v in self.reward_components.items()},
            record_index=self.record_index[rows] if self.record_index is not None else None,
            weights_version=self.weights_version,
            worker_id=self.worker_id,
            metrics=dict(self.metrics),
        )

    def to_torch(self, device: Any = "cpu") -> dict[str, Any]:
        """Tensors for the learner (bool masks stay bool; ids int64; floats float32)."""
        import torch

        # torch.tensor copies: arrays read from Ray's object store are read-only views
        out = {name: torch.tensor(getattr(self, name), device=device) for name in TOKEN_COLUMNS}
        out[TRUNCATED] = torch.tensor(self.truncated, device=device)
        return out

    @staticmethod
    def concat(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Merge batches from several workers (right-pad to the longest); versions must agree."""
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        t = max(b.input_ids.shape[1] for b in batches)

        def pad(a: np.ndarray, value: Any) -> np.ndarray:
            if a.shape[1] == t:
                return a
            extra = np.full((a.shape[0], t - a.shape[1]), value, dtype=a.dtype)
            return np.concatenate([a, extra], axis=1)

        fill = {INPUT_IDS: pad_id, ATTENTION_MASK: False, ACTION_MASK: False, BEHAVIOUR_LOGPROBS: 0.0, SCORES: 0.0}
        cols = {name: np.concatenate([pad(getattr(b, name), fill[name]) for b in batches]) for name in TOKEN_COLUMNS}
        keys = set().union(*(b.reward_components for b in batches))
        components = {
            k: np.concatenate([b.reward_components.get(k, np.zeros(len(b), np.float32)) for b in batches])
            for k in sorted(keys)
        }
        metrics: dict[str, float] = {}
        for b in batches:
            for k, v in b.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
        return RolloutBatch(
            **cols,
            truncated=np.concatenate([b.truncated for b in batches]),
            reward_components=components,
            record_index=np.concatenate([b.record_index for b in batches]),  # type: ignore[misc]
            weights_version=min(b.weights_version for b in batches),
            worker_id=-1 if len(batches) > 1 else batches[0].worker_id,
            metrics=metrics,
        )
