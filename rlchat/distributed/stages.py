"""The supervised fine-tuning and reward-model stages on Ray Train: data -> ``TorchTrainer`` -> checkpoints + metrics.

    rlchat sft --config configs/demo.yaml                 # conversations -> a policy that can talk
    rlchat rm  --config configs/demo.yaml                 # preference pairs -> a reward model
    rlchat sft --resume runs/sft-20250101-120000          # continue step-exactly from the last checkpoint
    run_dir, metrics = run_sft(cfg)                       # the same from Python (the demo, the PPO driver)

Roles (see docs/stages.md):

- **Driver** (:func:`run_sft` / :func:`run_rm`): loads and tokenizes the data (so workers need no access to the
  data files), builds the model once (bad configs fail before Ray starts; it is also the skeleton checkpoints are
  saved from) and runs :func:`train_loop`: step, validate, checkpoint, by calling the learners. Metrics go to
  ``metrics.jsonl`` / TensorBoard / the tqdm bar, checkpoints to :class:`~rlchat.core.checkpoint.CheckpointManager`.
  Only the driver writes the run directory; data, weights and optimizer state travel through the object store,
  so workers on other nodes need no shared filesystem.
- **Learners** (:class:`StageLearner`, plain torch, no Ray inside): one per Ray Train rank, built and called
  through the typed rank group of :mod:`rlchat.distributed.rank_group` (one ``TorchTrainer.fit()`` per stage, the same
  as PPO's learner); rank ``r`` of ``W`` trains on rows ``r::W`` of each global batch, DDP (gloo on CPU, NCCL on GPU)
  averages gradients. ``ray.learner_workers=0`` or ``run_sft(..., use_ray=False)`` calls one StageLearner in this
  process instead (debugging, small runs, tests). When a worker dies, Ray Train restarts the group
  (``ray.learner_max_failures``) and the driver restores the run's last checkpoint into the new learners, as
  ``--resume`` would.

The training step (one optimizer step per ``batch_size`` conversations / pairs, global across workers):

1. epoch ``e`` visits the training rows in the order of a permutation seeded by ``(seed, e)``; the last partial
   batch of an epoch is dropped (every step sees a full batch, on every worker);
2. the loss is normalised by the **global** batch (SFT: assistant tokens of the whole batch, RM: its pairs) and
   multiplied by ``W``, so DDP's gradient *average* equals the one-worker gradient of the same batch (tested to
   1e-5); ``grad_accum_steps`` splits each worker's rows into micro-batches (gradient sync on the last only);
3. global grad-norm clip, AdamW step, ``LambdaLR`` step (warm-up then constant / linear / cosine,
   :func:`rlchat.core.ppo.lr_lambda`);
4. at the end of each epoch (and at ``max_steps``): validation, then a checkpoint when ``checkpoint.every`` epochs
   have passed, when the validation metric improved on the best so far, and always at the end.

Determinism and resume: the torch RNG is re-seeded from ``(seed, step, rank)`` before every step and the data order
depends only on ``(seed, epoch)``, so a resumed run (model, AdamW and scheduler state restored from the last
checkpoint, at its global step) takes exactly the steps an uninterrupted run would -- even on a different number
of workers.

SFT: the loss is the mean negative log-likelihood of the tokens the chat template's loss mask marks (assistant
text and its end-of-turn token); validation reports loss, perplexity and next-token accuracy on the same tokens
(:func:`rlchat.core.evaluation.teacher_forced_sums`); the value head is frozen (PPO trains it). RM: Bradley-Terry loss
``-log sigmoid(r(prompt + chosen) - r(prompt + rejected))`` on conversations rendered with the chat template (as
:class:`rlchat.core.rewards.CheckpointRMScorer` scores them; long pairs keep their last tokens); validation reports the
loss and pairwise accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rlchat.core import ppo
from rlchat.core.config import Config, from_dict
from rlchat.core.errors import CheckpointError, ConfigError, DataError
from rlchat.core.metrics import (
    PERF_STEP_S,
    PERF_TOKENS_PER_S,
    RM_ACCURACY,
    RM_EPOCH,
    RM_GRAD_NORM,
    RM_LOSS,
    RM_LR,
    RM_MARGIN,
    RM_VAL_ACCURACY,
    RM_VAL_ACCURACY_PREFERENCES,
    RM_VAL_ECE,
    RM_VAL_LOSS,
    RM_VAL_MARGIN,
    SFT_EPOCH,
    SFT_GRAD_NORM,
    SFT_LOSS,
    SFT_LR,
    SFT_VAL_ACCURACY,
    SFT_VAL_LOSS,
    SFT_VAL_PERPLEXITY,
    STAGE_BEST_METRIC,
)
from rlchat.core.model import (
    ImplicitRewardModel,
    PolicyValueModel,
    RewardModel,
    autocast_context,
    build_reward_model,
    resolve_precision,
)
from rlchat.distributed.rank_group import RankContext, rank0_only

if TYPE_CHECKING:
    from rlchat.core.data import Record
    from rlchat.core.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)

STAGE_NAMES = ("sft", "rm")

# --------------------------------------------------------------------------------------------------------------
# Tokenized data: flat arrays (cheap to ship through the object store, zero-copy on the workers)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TokenRows:
    """Variable-length token rows stored flat: row ``i`` is ``ids[offsets[i]:offsets[i+1]]``.

    Attributes:
        ids: (N,) int32 token ids of all rows concatenated.
        mask: (N,) int8 loss mask (SFT: the chat template's; RM: all ones).
        offsets: (n + 1,) int64 row starts, ``offsets[-1] == N``.
    """

    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lists(cls, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> TokenRows:
        lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.fromiter((t for r, _ in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        mask = np.fromiter((m for _, ms in rows for m in ms), dtype=np.int8, count=int(offsets[-1]))
        return cls(ids, mask, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, idx: Sequence[int] | np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.row(int(i)) for i in idx]

    def batch(
        self, idx: Sequence[int] | np.ndarray, pad_id: int, device: torch.device, width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded tensors of rows ``idx``.

        Returns:
            input_ids (B, T) int64, attention_mask (B, T) int64, loss_mask (B, T) int64; ``T`` is the longest row
            (or ``width``).
        """
        rows = self.rows(idx)
        t = width or max(len(r[0]) for r in rows)
        input_ids = np.full((len(rows), t), pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), t), dtype=np.int64)
        loss_mask = np.zeros((len(rows), t), dtype=np.int64)
        for r, (ids, mask) in enumerate(rows):
            input_ids[r, : len(ids)] = ids
            attention_mask[r, : len(ids)] = 1
            loss_mask[r, : len(ids)] = mask
        return (
            torch.from_numpy(input_ids).to(device),
            torch.from_numpy(attention_mask).to(device),
            torch.from_numpy(loss_mask).to(device),
        )


@dataclass
class StageData:
    """What workers train on: tokenized rows (SFT) or pairs (RM: ``train``/``val`` chosen, ``*_rejected``)."""

    pad_id: int
    train: TokenRows
    val: TokenRows
    train_rejected: TokenRows | None = None
    val_rejected: TokenRows | None = None
    val_source: np.ndarray | None = None
    """RM: (N_val,) index of each validation pair's source (0 = data.preferences, then rm.feedback in order)."""

    @property
    def num_train(self) -> int:
        return len(self.train)


def _max_len(section_max: int, model: nn.Module) -> int:
    """``sft.max_seq_len`` / ``rm.max_seq_len`` capped by the model's positions (with a warning when it is)."""
    from rlchat.core.evaluation import model_max_positions

    positions = model_max_positions(model)
    if positions and section_max > positions:
        logger.warning(
            "max_seq_len=%d exceeds the model's %d positions; sequences are cut to %d tokens (lower max_seq_len "
            "to silence this)",
            section_max,
            positions,
            positions,
        )
        return positions
    return section_max


def prepare_sft_data(cfg: Config, tokenizer: ChatTokenizer, max_len: int) -> tuple[StageData, dict[str, int]]:
    """Load ``data.sft`` (train and val splits) and render every usable conversation with the chat template.

    A conversation is usable when it is not a preference pair and at least one of its first ``max_len`` tokens
    is an assistant token (the loss mask).

    Returns:
        The data and counts (``train``, ``val``, and per skip reason).

    Raises:
        DataError: no usable training conversation (the message counts why records were unusable).
    """
    from rlchat.core.data import load_records

    counts: dict[str, int] = {"preference": 0, "no_assistant": 0, "cut_by_max_seq_len": 0}
    out: dict[str, TokenRows] = {}
    total = 0
    for split in ("train", "val"):
        records = load_records(cfg.data.sft, split, cfg)
        total += len(records)
        rows = []
        for rec in records:
            if rec.is_preference:
                counts["preference"] += 1
                continue
            if not any(m["role"] == "assistant" for m in rec.messages):
                counts["no_assistant"] += 1
                continue
            ids, mask = tokenizer.render_conversation(rec.messages)
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask[1:]):
                counts["cut_by_max_seq_len"] += 1
                continue
            rows.append((ids, mask))
        out[split] = TokenRows.from_lists(rows)
    counts["train"], counts["val"] = len(out["train"]), len(out["val"])
    if counts["train"] == 0:
        raise DataError(
            f"data.sft={cfg.data.sft!r}: no usable SFT conversations among {total} records "
            f"({counts['preference']} preference pairs, {counts['no_assistant']} without an assistant message, "
            f"{counts['cut_by_max_seq_len']} with no assistant token within sft.max_seq_len={max_len}); SFT needs "
            "conversations with assistant replies: point data.sft at chat data (e.g. builtin:chat), train preference "
            "pairs with `rlchat rm`, or raise sft.max_seq_len"
        )
    return StageData(tokenizer.pad_id, out["train"], out["val"]), counts


def _pair_rows(rec: Record, tokenizer: ChatTokenizer, max_len: int) -> tuple[list[int], list[int]] | None:
    prompt = rec.prompt_messages()
    chosen, _ = tokenizer.render_conversation(prompt + list(rec.chosen or []))
    rejected, _ = tokenizer.render_conversation(prompt + list(rec.rejected or []))
    if not chosen or not rejected:
        return None
    # keep the last tokens: the reply decides the score (CheckpointRMScorer cuts the same way)
    return chosen[-max_len:], rejected[-max_len:]


def prepare_rm_data(cfg: Config, tokenizer: ChatTokenizer, max_len: int) -> tuple[StageData, dict[str, int]]:
    """Load preference pairs from ``data.preferences`` and every ``rm.feedback`` source -- a file, or a feedback
    store URL (``postgresql://...``, ``sqlite:///feedback.db``: :func:`rlchat.core.feedback_store.load_records`) --
    each split the same seeded way, and render ``prompt + chosen`` / ``prompt + rejected`` with the chat template.

    Returns:
        The data (``train``/``val`` = chosen rows, ``*_rejected`` = rejected rows) and counts.

    Raises:
        DataError: no preference pair in the training split (e.g. chat data given as data.preferences).
    """
    from rlchat.core import feedback_store
    from rlchat.core.data import load_records

    sources = [cfg.data.preferences, *cfg.rm.feedback]
    counts: dict[str, int] = {"not_preference": 0, "identical": 0}
    rows: dict[str, tuple[list[list[int]], list[list[int]]]] = {"train": ([], []), "val": ([], [])}
    val_source: list[int] = []
    total = 0
    for k, source in enumerate(sources):
        for split in ("train", "val"):
            if feedback_store.is_store_url(source):
                records = feedback_store.load_records(source, split, cfg)
            else:
                records = load_records(source, split, cfg)
            total += len(records)
            for rec in records:
                if not rec.is_preference:
                    counts["not_preference"] += 1
                    continue
                pair = _pair_rows(rec, tokenizer, max_len)
                if pair is None or pair[0] == pair[1]:
                    counts["identical"] += 1
                    continue
                rows[split][0].append(pair[0])
                rows[split][1].append(pair[1])
                if split == "val":
                    val_source.append(k)
    counts["train"], counts["val"] = len(rows["train"][0]), len(rows["val"][0])
    if counts["train"] == 0:
        raise DataError(
            f"data.preferences={cfg.data.preferences!r}"
            + (f" + rm.feedback={list(cfg.rm.feedback)}" if cfg.rm.feedback else "")
            + f": no usable preference pairs among {total} records ({counts['not_preference']} are not preference "
            f"records, {counts['identical']} have identical chosen and rejected replies); reward-model training needs "
            'records like {"prompt": ..., "chosen": ..., "rejected": ...}: point data.preferences at preference '
            "data (e.g. builtin:prefs)"
        )

    def flat(lists: list[list[int]]) -> TokenRows:
        return TokenRows.from_lists([(r, [1] * len(r)) for r in lists])

    data = StageData(
        tokenizer.pad_id,
        flat(rows["train"][0]),
        flat(rows["val"][0]),
        flat(rows["train"][1]),
        flat(rows["val"][1]),
        np.array(val_source, dtype=np.int64),
    )
    return data, counts


# --------------------------------------------------------------------------------------------------------------
# The two tasks: model, loss of a micro-batch, validation
# --------------------------------------------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
    return x


class SFTTask:
    """Supervised fine-tuning: masked next-token NLL of a :class:`~rlchat.core.model.PolicyValueModel`."""

    stage = "sft"
    loss_key, lr_key, grad_norm_key, epoch_key = SFT_LOSS, SFT_LR, SFT_GRAD_NORM, SFT_EPOCH
    stat_names = ("nll", "tokens")

    def __init__(self, data: StageData) -> None:
        self.data = data

    @staticmethod
    def section(cfg: Config) -> Any:
        return cfg.sft

    @staticmethod
    def build_model(cfg: Config, tokenizer: ChatTokenizer) -> PolicyValueModel:
        """The policy with its value head (and separate critic) frozen: SFT trains the language model only."""
        model = PolicyValueModel.build(cfg, tokenizer)
        for module in (model.value_head, model.critic):
            if module is not None:
                module.requires_grad_(False)
        return model

    def normaliser(self, idx: np.ndarray) -> float:
        """Assistant tokens that can be predicted in the global batch (position 0 never is)."""
        return float(sum(int(m[1:].sum()) for _, m in self.data.train.rows(idx)))

    def micro_loss(
        self, module: nn.Module, model: Any, idx: np.ndarray, denom: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed masked NLL of rows ``idx`` divided by ``denom`` (the loss to backprop) and summed statistics.

        ``module`` is what the gradient flows through (DDP-wrapped when data-parallel), ``model`` the bare model.
        """
        device = model.device
        input_ids, attention_mask, loss_mask = self.data.train.batch(idx, self.data.pad_id, device)
        out = module(input_ids, attention_mask, loss_mask, compute_entropy=False)
        nll = -(out.logprobs * loss_mask).sum()  # logprobs are 0 outside the mask and at t = 0
        stats = {"nll": nll.detach().double(), "tokens": attention_mask.sum().double()}
        return nll / denom, stats

    @staticmethod
    def step_metrics(sums: dict[str, float], normaliser: float) -> dict[str, float]:
        return {SFT_LOSS: sums["nll"] / max(normaliser, 1.0)}

    def validate(self, model: Any, rank: int, world: int) -> dict[str, float]:
        from rlchat.core.evaluation import teacher_forced_sums

        val = self.data.val
        if len(val) == 0:
            return {}
        rows = val.rows(range(rank, len(val), world))
        nll, correct, count = teacher_forced_sums(model, rows, self.data.pad_id) if rows else (0.0, 0.0, 0)
        s = _all_reduce(torch.tensor([nll, correct, float(count)], dtype=torch.float64), world)
        n = max(float(s[2]), 1.0)
        loss = float(s[0]) / n
        return {SFT_VAL_LOSS: loss, SFT_VAL_PERPLEXITY: math.exp(min(loss, 700.0)), SFT_VAL_ACCURACY: float(s[1]) / n}


RM_ECE_BINS = 10
"""Confidence bins of the reward model's expected calibration error (rm/val_ece)."""


class RMTask:
    """Reward modelling: Bradley-Terry loss of a :class:`~rlchat.core.model.RewardModel` on (chosen, rejected)
    pairs."""

    stage = "rm"
    loss_key, lr_key, grad_norm_key, epoch_key = RM_LOSS, RM_LR, RM_GRAD_NORM, RM_EPOCH
    stat_names = ("loss", "correct", "margin", "tokens")

    def __init__(self, data: StageData, precision: str = "auto") -> None:
        self.data = data
        self.precision = precision

    @staticmethod
    def section(cfg: Config) -> Any:
        return cfg.rm

    @staticmethod
    def build_model(cfg: Config, tokenizer: ChatTokenizer) -> RewardModel | ImplicitRewardModel:
        """The reward model ``rm.kind`` names; a scalar one with its score bias frozen: a constant cancels in
        ``r(chosen) - r(rejected)``, so the Bradley-Terry loss gives it no gradient (it would only drift under
        weight decay). For the implicit kind this loss is exactly DPO's."""
        model = build_reward_model(cfg, tokenizer)
        if isinstance(model, ImplicitRewardModel):
            return model
        model.score_head.bias.requires_grad_(False)
        if model.hf_tokenizer is not None:
            raise ConfigError(
                f"rm.name_or_path={cfg.rm.name_or_path!r}: this model has its own tokenizer, but rlchat scores "
                "conversations rendered with the chat tokenizer (rewards.CheckpointRMScorer); use a model whose "
                "vocabulary is the chat tokenizer's (e.g. a causal LM with tokenizer.encoding set to its encoding), "
                "or leave rm.name_or_path empty for a tiny reward model"
            )
        return model

    def normaliser(self, idx: np.ndarray) -> float:
        return float(len(idx))

    def _scores(
        self, module: nn.Module, model: Any, chosen: TokenRows, rejected: TokenRows, idx: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b,) differences r(chosen) - r(rejected) and the (2b, T) attention mask, in one forward of 2b rows."""
        device = model.device
        width = int(max(max(chosen.lengths()[idx]), max(rejected.lengths()[idx])))
        ids_c, attn_c, _ = chosen.batch(idx, self.data.pad_id, device, width)
        ids_r, attn_r, _ = rejected.batch(idx, self.data.pad_id, device, width)
        attention_mask = torch.cat([attn_c, attn_r])
        hidden = int(model.trunk.config.get_text_config().hidden_size)
        with autocast_context(resolve_precision(self.precision, device, hidden), device):
            scores = module(torch.cat([ids_c, ids_r]), attention_mask).float()  # (2b,)
        b = len(idx)
        return scores[:b] - scores[b:], attention_mask

    def micro_loss(
        self, module: nn.Module, model: Any, idx: np.ndarray, denom: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed Bradley-Terry loss of pairs ``idx`` divided by ``denom`` and summed statistics."""
        assert self.data.train_rejected is not None
        diff, attention_mask = self._scores(module, model, self.data.train, self.data.train_rejected, idx)
        loss = -F.logsigmoid(diff).sum()
        stats = {
            "loss": loss.detach().double(),
            "correct": (diff.detach() > 0).double().sum(),
            "margin": diff.detach().double().sum(),
            "tokens": attention_mask.sum().double(),
        }
        return loss / denom, stats

    @staticmethod
    def step_metrics(sums: dict[str, float], normaliser: float) -> dict[str, float]:
        n = max(normaliser, 1.0)
        return {RM_LOSS: sums["loss"] / n, RM_ACCURACY: sums["correct"] / n, RM_MARGIN: sums["margin"] / n}

    @torch.no_grad()
    def validate(self, model: Any, rank: int, world: int, batch_size: int = 32) -> dict[str, float]:
        val, val_rej = self.data.val, self.data.val_rejected
        if len(val) == 0 or val_rej is None:
            return {}
        mine = np.arange(rank, len(val), world)
        sums = torch.zeros(6, dtype=torch.float64)  # loss, correct, pairs, margin, and correct, pairs of source 0
        source = self.data.val_source
        # calibration: the Bradley-Terry probability sigmoid(|diff|) that the model's pick is right, against how
        # often it is right, in RM_ECE_BINS confidence bins (count, correct, confidence per bin)
        bins = torch.zeros(3, RM_ECE_BINS, dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            for i in range(0, len(mine), batch_size):
                idx = mine[i : i + batch_size]
                diff, _ = self._scores(model, model, val, val_rej, idx)
                d = diff.double()
                main = torch.as_tensor(source[idx] == 0) if source is not None else torch.ones(len(idx), dtype=bool)
                sums += torch.tensor(
                    [
                        float(-F.logsigmoid(d).sum()),
                        float((d > 0).sum()),
                        float(len(idx)),
                        float(d.sum()),
                        float(((d > 0) & main).sum()),
                        float(main.sum()),
                    ],
                    dtype=torch.float64,
                )
                conf = torch.sigmoid(d.abs())  # in [0.5, 1)
                b = ((conf - 0.5) * 2 * RM_ECE_BINS).long().clamp(0, RM_ECE_BINS - 1)
                bins[0].index_add_(0, b, torch.ones_like(conf))
                bins[1].index_add_(0, b, (d > 0).double())
                bins[2].index_add_(0, b, conf)
        finally:
            model.train(was_training)
        s = _all_reduce(sums, world)
        bins = _all_reduce(bins, world)
        n = max(float(s[2]), 1.0)
        ece = float((bins[1] - bins[2]).abs().sum()) / n  # sum_b n_b/N * |acc_b - conf_b|
        out = {
            RM_VAL_LOSS: float(s[0]) / n,
            RM_VAL_ACCURACY: float(s[1]) / n,
            RM_VAL_MARGIN: float(s[3]) / n,
            RM_VAL_ECE: ece,
        }
        if float(s[5]) < n and float(s[5]) > 0:  # other sources too: data.preferences' own accuracy
            out[RM_VAL_ACCURACY_PREFERENCES] = float(s[4]) / float(s[5])
        return out


Task = SFTTask | RMTask


def make_task(stage: str, data: StageData, cfg: Config) -> Task:
    if stage == "sft":
        return SFTTask(data)
    if stage == "rm":
        return RMTask(data, cfg.model.precision)
    raise ConfigError(f"stage={stage!r}: expected one of {', '.join(STAGE_NAMES)}")


# --------------------------------------------------------------------------------------------------------------
# The training loop (runs on every worker; plain torch)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """How many rows per step, steps per epoch and steps in total a stage runs."""

    batch_size: int
    steps_per_epoch: int
    total_steps: int


def plan_steps(num_train: int, section: Any, world: int) -> StepPlan:
    """Global batch, steps per epoch (the last partial batch is dropped) and total steps (``max_steps`` caps it).

    Raises:
        ConfigError: fewer rows per step than workers (a worker would get no data).
    """
    batch = min(int(section.batch_size), num_train)
    if batch < world:
        raise ConfigError(
            f"batch_size={section.batch_size} with {num_train} training rows gives {batch} rows per step for "
            f"ray.learner_workers={world}; every worker needs at least one row: raise the batch size or use fewer "
            "workers"
        )
    per_epoch = num_train // batch
    total = per_epoch * int(section.epochs)
    if section.max_steps:
        total = min(total, int(section.max_steps)) if total else int(section.max_steps)
    if total < 1:
        raise ConfigError(
            f"epochs={section.epochs}, max_steps={section.max_steps}: expected at least one optimizer step; set "
            "epochs >= 1"
        )
    return StepPlan(batch, per_epoch, total)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of the ``n`` training rows visited in ``epoch`` (depends only on seed and epoch)."""
    from rlchat.distributed.rollout import derive_seed

    gen = torch.Generator().manual_seed(derive_seed(seed, 0x5F7, epoch))
    return torch.randperm(n, generator=gen).numpy()


def best_metric(cfg: Config, stage: str) -> tuple[str, str]:
    """(metric, mode) that ranks this stage's checkpoints (as CheckpointManager.from_config decides)."""
    if cfg.checkpoint.best_metric:
        return cfg.checkpoint.best_metric, cfg.checkpoint.best_mode
    return STAGE_BEST_METRIC[stage]


class Sink:
    """Where :func:`train_loop` sends what the driver writes (metrics lines and checkpoints)."""

    def metrics(self, step: int, metrics: dict[str, float], total: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def checkpoint(self, step: int, metrics: dict[str, float], state: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError


class StageLearner:
    """One rank's model, optimizer, schedule and optimizer step for a stage (plain torch; no Ray).

    ``torch.distributed`` must be initialised when ``world > 1`` (Ray Train does it); the model is then wrapped
    in DDP. The bench (bench/sft_step.py) and the tests drive :meth:`step` directly.

    Args:
        task: :class:`SFTTask` or :class:`RMTask` holding the tokenized data (every rank holds all of it).
        cfg: the run config (the stage's section, ``seed``, ``model``).
        tokenizer: the chat tokenizer (builds the model).
        rank, world: data-parallel coordinates.
        device: where to train (CPU by default).
        resume: ``{"model": state_dict, "train_state": {...}}`` of the checkpoint to continue from.
    """

    def __init__(
        self,
        task: Task,
        cfg: Config,
        tokenizer: ChatTokenizer,
        rank: int = 0,
        world: int = 1,
        device: torch.device | None = None,
        resume: dict[str, Any] | None = None,
    ) -> None:
        from rlchat.distributed.learner import make_optimizer

        self.task, self.cfg, self.rank, self.world = task, cfg, rank, world
        self.device = device or torch.device("cpu")
        self.sec = task.section(cfg)
        self.plan = plan_steps(task.data.num_train, self.sec, world)
        self.model = task.build_model(cfg, tokenizer).to(self.device)
        self.module: nn.Module = self.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DistributedDataParallel(self.model, device_ids=ids)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, self.sec.learning_rate, self.sec.weight_decay)
        self._schedule = ppo.lr_lambda(self.sec.lr_schedule, self.sec.warmup_steps, self.plan.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule)
        self.global_step = 0
        self.best: float | None = None
        if resume is not None:
            self.restore(resume)

    def restore(self, state: dict[str, Any]) -> int:
        """Continue from a checkpoint's ``{"model": state_dict, "train_state": {...}}`` (``--resume``, or the driver
        after Ray Train restarted the worker group); returns its global step."""
        self.model.load_state_dict(state["model"])
        ts = state["train_state"]
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.scheduler.lr_lambdas = [self._schedule]  # this config's schedule (e.g. more epochs), not the stored one
        self.global_step = int(ts["step"])
        self.best = ts.get("best_value")
        if int(ts.get("steps_per_epoch", self.plan.steps_per_epoch)) != self.plan.steps_per_epoch:
            logger.warning(
                "resuming with %d steps per epoch where the checkpoint had %d (batch size or data changed): "
                "the data order differs from an uninterrupted run's",
                self.plan.steps_per_epoch,
                ts["steps_per_epoch"],
            )
        return self.global_step

    def batch_rows(self, step: int) -> np.ndarray:
        """The global batch of optimizer step ``step`` (0-based): a slice of its epoch's permutation."""
        epoch, k = divmod(step, self.plan.steps_per_epoch)
        order = epoch_order(self.cfg.seed, epoch, self.task.data.num_train)
        return order[k * self.plan.batch_size : (k + 1) * self.plan.batch_size]

    def step(self, idx: np.ndarray) -> dict[str, float]:
        """One optimizer step on the global batch ``idx`` (this rank trains on ``idx[rank::world]``).

        Returns:
            The stage's loss metrics over the global batch, its learning rate and grad norm, and
            ``perf/tokens_per_s`` / ``perf/step_s`` (identical on every rank).
        """
        from rlchat.distributed.rollout import derive_seed

        task, world = self.task, self.world
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(self.cfg.seed, self.global_step, self.rank))
        # 1. normalise by the global batch; DDP averages gradients over ranks, so scale back up by world
        normaliser = task.normaliser(idx)
        denom = max(normaliser, 1.0) / world
        mine = idx[self.rank :: world]
        micro = [m for m in np.array_split(mine, min(max(1, int(self.sec.grad_accum_steps)), len(mine))) if len(m)]
        # 2. forward/backward per micro-batch; gradients sync on the last one only
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(task.stat_names), dtype=torch.float64)
        for j, rows in enumerate(micro):
            last = j == len(micro) - 1
            ctx = self.module.no_sync() if (world > 1 and not last) else contextlib.nullcontext()  # type: ignore[operator]
            with ctx:
                loss, stats = task.micro_loss(self.module, self.model, rows, denom)
                loss.backward()
            sums += torch.stack([stats[s].detach().cpu().double() for s in task.stat_names])
        # 3. clip, step, schedule
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.sec.max_grad_norm))
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        sums = _all_reduce(sums, world)
        self.global_step += 1
        dt = time.perf_counter() - t0
        named = dict(zip(task.stat_names, (float(v) for v in sums)))
        metrics = task.step_metrics(named, normaliser)
        metrics.update(
            {
                task.lr_key: lr,
                task.grad_norm_key: grad_norm,
                task.epoch_key: self.global_step / self.plan.steps_per_epoch,
                PERF_TOKENS_PER_S: named["tokens"] / dt if dt > 0 else 0.0,
                PERF_STEP_S: dt,
            }
        )
        return metrics

    def train_steps(self, n: int = 1) -> list[dict[str, float]]:
        """``n`` :meth:`step` calls, each on the next global batch (:meth:`batch_rows` of :attr:`global_step`);
        their metrics in order."""
        return [self.step(self.batch_rows(self.global_step)) for _ in range(n)]

    def validate(self) -> dict[str, float]:
        """The stage's validation metrics (identical on every rank)."""
        return self.task.validate(self.model, self.rank, self.world)

    @rank0_only(large_result=True)
    def checkpoint_state(self) -> dict[str, Any]:
        """What the driver saves besides the config: rank 0's weights (on the CPU) and :meth:`train_state`."""
        model_state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {"model": model_state, "train_state": self.train_state()}

    def train_state(self) -> dict[str, Any]:
        """What a resume needs besides the weights (``torch.load(weights_only=True)``-safe)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.global_step,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "best_value": self.best,
            "world": self.world,
        }

    def improved(self, val: dict[str, float]) -> bool:
        """Whether ``val`` holds a better best-checkpoint metric than any validation so far (and record it)."""
        metric, mode = best_metric(self.cfg, self.task.stage)
        value = val.get(metric)
        if value is None or not math.isfinite(value):
            return False
        if self.best is None or (value < self.best if mode == "min" else value > self.best):
            self.best = value
            return True
        return False


STEPS_CALL_S = 0.25
"""About how long one ``train_steps`` call of :func:`train_loop` lasts: a call to Ray Train ranks costs ~9 ms round
trip (2-core development machine), 14% of a 63 ms demo SFT step if every step were its own call; steps taking longer
than this go one per call."""
MAX_STEPS_PER_CALL = 64


def train_loop(
    learner: Any,
    plan: StepPlan,
    cfg: Config,
    sink: Sink,
    start: int = 0,
    recover: Callable[[], int] | None = None,
) -> dict[str, float]:
    """The stage's loop, run by the driver: steps from ``start`` to the plan's end, validation, checkpoints.

    Args:
        learner: a :class:`StageLearner` in this process, or a :class:`~rlchat.distributed.rank_group.RankGroup` of
        them, which
            runs the same methods on every Ray Train rank (rank 0's results come back).
        plan: the step plan (:func:`plan_steps`; the learner's own).
        cfg: the run config (``checkpoint.every``).
        sink: where metrics and checkpoints go (the driver).
        start: the learner's global step (0, or that of the checkpoint it resumed from).
        recover: after Ray Train restarted the worker group, brings the new learners to the run's last checkpoint
            and returns its step (None: the restart propagates).

    Returns:
        The last step's metrics (with the last validation's).
    """
    from rlchat.distributed.rank_group import RankGroupRestarted

    step = start
    last: dict[str, float] = {}
    validated = start > 0
    chunk = 1  # steps per call, grown so that a call lasts about STEPS_CALL_S
    while not validated or step < plan.total_steps:
        try:
            if not validated:
                # 0. validation before the first step: the baseline the run improves on
                last = learner.validate()
                validated = True
                if last:
                    sink.metrics(0, dict(last), plan.total_steps)
                continue
            # 1.-3. optimizer steps up to the next validation point at most (train_steps), logged one by one
            n = min(chunk, plan.steps_per_epoch - step % plan.steps_per_epoch, plan.total_steps - step)
            t0 = time.perf_counter()
            *between, metrics = learner.train_steps(n)
            chunk = max(1, min(MAX_STEPS_PER_CALL, int(STEPS_CALL_S * n / max(time.perf_counter() - t0, 1e-6))))
            for m in between:
                step += 1
                sink.metrics(step, dict(m), plan.total_steps)
                last = m
            step += 1
            # 4. validation at each epoch's end (and the last step), then maybe a checkpoint
            final = step == plan.total_steps
            save = False
            if step % plan.steps_per_epoch == 0 or final:
                val = learner.validate()
                metrics.update(val)
                improved = learner.improved(val)
                every = cfg.checkpoint.every
                epochs_done = math.ceil(step / plan.steps_per_epoch)
                save = final or (every > 0 and (epochs_done % every == 0 or improved))
            sink.metrics(step, dict(metrics), plan.total_steps)  # before the checkpoint: a resume keeps this line
            if save:
                sink.checkpoint(step, dict(metrics), learner.checkpoint_state())
            last = metrics
        except RankGroupRestarted:
            if recover is None:
                raise
            step = recover()  # a step-0 validation line already written is kept: no need to validate again
            validated = validated or step > 0
    return last


# --------------------------------------------------------------------------------------------------------------
# The driver: data, Ray Train, metrics, checkpoints
# --------------------------------------------------------------------------------------------------------------


class _Driver(Sink):
    """The driver's sink: writes metrics.jsonl / TensorBoard, saves checkpoints, moves the progress bar."""

    def __init__(
        self,
        stage: str,
        cfg: Config,
        run_dir: Path,
        tokenizer: ChatTokenizer,
        skeleton: nn.Module,
        make_bar: Callable[[], Any] | None,
    ) -> None:
        from rlchat.core.checkpoint import CheckpointManager
        from rlchat.core.metrics import MetricsWriter

        self.stage, self.cfg, self.run_dir = stage, cfg, run_dir
        self.tokenizer, self.skeleton = tokenizer, skeleton
        self.make_bar, self.bar = make_bar, None
        self.writer = MetricsWriter(run_dir, cfg)
        self.manager = CheckpointManager.from_config(run_dir, cfg, stage)
        self.final: dict[str, float] = {}
        self.val: dict[str, float] = {}
        self.saved: list[Path] = []

    def metrics(self, step: int, metrics: dict[str, float], total: int) -> None:
        self.writer.log(step, metrics)
        self.final = dict(metrics)
        self.val.update({k: v for k, v in metrics.items() if "/val_" in k})
        if self.bar is None and self.make_bar is not None:
            self.bar = self.make_bar()  # at the first message, so Ray's start-up does not skew the rate / ETA
        if self.bar is not None:
            if step > self.bar.n:
                self.bar.update(step - self.bar.n)
            shown = {k.split("/", 1)[1]: v for k, v in {**self.val, **metrics}.items() if "loss" in k or "val_" in k}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in sorted(shown.items())}, refresh=False)

    def checkpoint(self, step: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        from transformers.utils import logging as hf_logging

        self.skeleton.load_state_dict(state["model"])
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar would break the tqdm line
        try:
            path = self.manager.save(
                step,
                model=self.skeleton,
                tokenizer=self.tokenizer,
                config=self.cfg,
                stage=self.stage,
                metrics=metrics,
                train_state=state["train_state"],
            )
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.saved.append(path)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def build_stage_learner(ctx: RankContext, stage: str, cfg: dict[str, Any], data: StageData) -> StageLearner:
    """The rank-group factory of the SFT / RM stages: this rank's :class:`StageLearner` (``data`` arrives through
    the object store, so workers never read the data files)."""
    from rlchat.core.tokenizer import ChatTokenizer

    config = from_dict(cfg)
    tokenizer = ChatTokenizer.from_config(config.tokenizer)
    return StageLearner(make_task(stage, data, config), config, tokenizer, ctx.rank, ctx.world, ctx.device)


def _resume_state(
    stage: str, manager: Any, tokenizer: ChatTokenizer, run_dir: Path
) -> tuple[dict[str, Any], int, Path]:
    """Model weights and train state of the run's latest checkpoint (what the workers continue from)."""
    from rlchat.core.checkpoint import load_policy, load_reward_model

    latest = manager.latest()
    if latest is None:
        raise CheckpointError(
            f"--resume {run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}; the run saved none yet "
            "(checkpoint.every) -- start it again without --resume"
        )
    loader = load_policy if stage == "sft" else load_reward_model
    model, _, ckpt = loader(latest, expect_tokenizer=tokenizer)
    if ckpt.stage != stage:
        raise CheckpointError(f"--resume {run_dir}: its checkpoints are from stage {ckpt.stage!r}, not {stage!r}")
    state = ckpt.load_train_state()
    if state is None:
        raise CheckpointError(f"{latest}: no train_state.pt, so the run cannot continue step-exactly from it")
    return {"model": model.state_dict(), "train_state": state}, ckpt.step, latest


def _latest_metrics(manager: Any) -> dict[str, Any]:
    from rlchat.core.checkpoint import read_checkpoint

    latest = manager.latest()
    return read_checkpoint(latest).metrics if latest is not None else {}


POLICY_PAIRS_FILE = "data/policy_pairs.jsonl"
"""Where the RM stage keeps the pairs of :func:`_with_policy_pairs` (inside its run directory)."""


def _with_policy_pairs(cfg: Config, run_dir: Path, say: Any) -> Config:
    """``cfg`` with the policy's own labelled pairs added to ``rm.feedback`` (``rm.policy_samples``).

    The ``rm.init_from`` policy answers every ``data.prompts`` *train* prompt ``rm.policy_samples`` times, the
    verifiable reward labels the replies, and each prompt's best and worst become a pair
    (:func:`rlchat.core.policy_pairs.policy_pairs`): the reward model learns to tell apart the replies PPO will
    actually produce. Generated once per run directory (a resumed run reuses the file); on the driver, which holds
    the data (a few seconds to minutes for a small policy: one batched generation per 64 prompts).
    """
    from rlchat.core.data import load_records
    from rlchat.core.policy_pairs import policy_pairs, write_pairs

    out = run_dir / POLICY_PAIRS_FILE
    if not out.is_file():
        if not cfg.rm.init_from:
            raise ConfigError(
                f"rm.policy_samples={cfg.rm.policy_samples}: rm.init_from is empty; set it to the policy whose "
                "replies are sampled (the SFT run's best checkpoint, as `rlchat demo` does), or rm.policy_samples=0"
            )
        if not cfg.data.prompts:
            raise ConfigError(
                "rm.policy_samples: data.prompts is empty; the policy's replies are sampled on its train split "
                "(set data.prompts, e.g. builtin:task, or rm.policy_samples=0)"
            )
        t0 = time.perf_counter()
        records = load_records(cfg.data.prompts, "train", cfg)
        pairs, stats = policy_pairs(
            cfg.rm.init_from,
            records,
            cfg,
            samples=cfg.rm.policy_samples,
            seed=cfg.seed,
            max_pairs_per_prompt=cfg.rm.policy_pairs_per_prompt,
        )
        write_pairs(pairs, out)
        say(
            f"rm: {stats.pairs} pairs from the policy's own replies ({cfg.rm.policy_samples} per prompt on "
            f"{stats.prompts} train prompts, {stats.mean_score:.2f} right; {stats.tied} prompts all right or all "
            f"wrong) in {time.perf_counter() - t0:.0f} s -> {out}"
        )
    if out.stat().st_size == 0:  # no prompt had a right and a wrong reply: nothing to add
        return cfg
    return cfg.replace(**{"rm.feedback": (*cfg.rm.feedback, str(out))})


def run_stage(
    stage: str,
    cfg: Config,
    run_dir: str | Path | None = None,
    address: str | None = None,
    resume: bool = False,
    quiet: bool = False,
    use_ray: bool = True,
) -> tuple[Path, dict[str, float]]:
    """Run the ``sft`` or ``rm`` stage end to end (see the module docstring); :func:`run_sft` / :func:`run_rm`."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    from rlchat.core.metrics import attach_log_file, detach_log_file, make_run_dir, write_run_config
    from rlchat.core.tokenizer import ChatTokenizer
    from rlchat.distributed.cluster import init_ray

    if stage not in STAGE_NAMES:
        raise ConfigError(f"stage={stage!r}: expected one of {', '.join(STAGE_NAMES)}")
    if stage == "rm":  # a mistyped store: said now, not after a run directory and minutes of policy samples
        from rlchat.core.feedback_store import existing_store_url, is_store_url

        for source in cfg.rm.feedback:
            if is_store_url(source):
                existing_store_url(source)
    t_start = time.perf_counter()
    say = (lambda *a: None) if quiet else print
    path = make_run_dir(run_dir, stage)
    say(f"{stage}: run directory {path}")
    log_handler = attach_log_file(path, stage)
    try:
        write_run_config(path, cfg)
        tokenizer = ChatTokenizer.from_config(cfg.tokenizer)
        # 1. the model skeleton (fails fast on a bad model config) and the data, tokenized here
        skeleton = (SFTTask if stage == "sft" else RMTask).build_model(cfg, tokenizer)
        sec = cfg.sft if stage == "sft" else cfg.rm
        max_len = _max_len(sec.max_seq_len, skeleton)
        if stage == "rm" and cfg.rm.policy_samples:
            cfg = _with_policy_pairs(cfg, path, say)
        prepare = prepare_sft_data if stage == "sft" else prepare_rm_data
        data, counts = prepare(cfg, tokenizer, max_len)
        use_ray = use_ray and cfg.ray.learner_workers > 0  # 0: in the driver process, as PPO's learner
        world = cfg.ray.learner_workers if use_ray else 1
        plan = plan_steps(data.num_train, sec, world)
        unit = "conversations" if stage == "sft" else "pairs"
        say(
            f"{stage}: {counts['train']} training / {counts['val']} validation {unit}; {plan.total_steps} steps of "
            f"{plan.batch_size} on {world} worker(s)"
        )
        logger.info("%s data: %s", stage, counts)
        # 2. resume state from the run's latest checkpoint
        from rlchat.core.checkpoint import CheckpointManager

        resume_state = None
        start = 0
        if resume:
            resume_state, start, latest = _resume_state(
                stage, CheckpointManager.from_config(path, cfg, stage), tokenizer, path
            )
            say(f"{stage}: resuming from {latest} (step {start})")

        def make_bar() -> Any:
            from rlchat.core.console import console

            return tqdm(
                total=plan.total_steps, initial=start, desc=stage, dynamic_ncols=True, unit="step", file=console()
            )

        driver = _Driver(stage, cfg, path, tokenizer, skeleton, None if quiet else make_bar)
        if resume:
            driver.writer.rewind(start)
        try:
            if start >= plan.total_steps:
                say(f"{stage}: the run is already complete ({start}/{plan.total_steps} steps)")
                driver.final = {k: v for k, v in _latest_metrics(driver.manager).items() if isinstance(v, float)}
            elif use_ray:
                init_ray(address or cfg.ray.address or None, cfg.ray.num_cpus)
                _train_on_ray(stage, cfg, path, data, plan, start, resume_state, tokenizer, driver)
            else:
                from rlchat.distributed.cluster import learner_thread_budget
                from rlchat.distributed.rollout import set_torch_threads

                # the budget a Ray Train rank would get (one rank on this node), not whatever this process had
                set_torch_threads(learner_thread_budget(cfg))
                learner = StageLearner(make_task(stage, data, cfg), cfg, tokenizer, resume=resume_state)
                train_loop(learner, plan, cfg, driver, start)
        finally:
            driver.close()
        final = dict(driver.final)
        final.update(driver.val)
        say(f"{stage}: finished in {time.perf_counter() - t_start:.1f} s; " + _summary(stage, final))
        best = driver.manager.best()
        say(f"{stage}: best checkpoint {best}" if best else f"{stage}: no checkpoint saved")
        say(f"{stage}: run directory {path}")
        return path, final
    finally:
        detach_log_file(log_handler)


def _summary(stage: str, m: dict[str, float]) -> str:
    keys = (
        (SFT_LOSS, SFT_VAL_PERPLEXITY, SFT_VAL_ACCURACY) if stage == "sft" else (RM_LOSS, RM_VAL_ACCURACY, RM_VAL_LOSS)
    )
    return ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m)


def _train_on_ray(
    stage: str,
    cfg: Config,
    run_dir: Path,
    data: StageData,
    plan: StepPlan,
    start: int,
    resume: dict[str, Any] | None,
    tokenizer: ChatTokenizer,
    driver: _Driver,
) -> None:
    """:func:`train_loop` over a rank group of :class:`StageLearner` on ``ray.learner_workers`` Ray Train ranks.

    Checkpoint state (resume, and after a restart of the worker group) is read here and shipped through the object
    store, so the workers need no shared filesystem.
    """
    import ray

    from rlchat.distributed.rank_group import RankGroup, RankGroupRestarted

    group = RankGroup(
        StageLearner, build_stage_learner, (stage, cfg.to_dict(), ray.put(data)), cfg=cfg, run_dir=run_dir, name=stage
    )

    def recover() -> int:
        """Bring restarted learners to the run's latest checkpoint (none yet: they start over); returns its step."""
        while True:
            latest = driver.manager.latest()
            try:
                step = 0
                if latest is not None:
                    state, step, _ = _resume_state(stage, driver.manager, tokenizer, run_dir)
                    group.restore(ray.put(state))
            except RankGroupRestarted:
                continue
            driver.writer.rewind(step)
            logger.warning(  # on the console and in the run's log
                "%s: a Ray Train worker died and the workers were restarted (incarnation %d); continuing from %s "
                "(step %d)",
                stage,
                group.generation,
                latest or "the start",
                step,
            )
            return step

    try:
        if resume is not None:
            try:
                group.restore(ray.put(resume))
            except RankGroupRestarted:
                start = recover()
        train_loop(group, plan, cfg, driver, start, recover)
    finally:
        group.shutdown()


def run_sft(
    cfg: Config,
    run_dir: str | Path | None = None,
    address: str | None = None,
    resume: bool = False,
    quiet: bool = False,
    use_ray: bool = True,
) -> tuple[Path, dict[str, float]]:
    """Supervised fine-tuning on ``data.sft`` (see the module docstring).

    Args:
        cfg: the resolved config (``sft``, ``model``, ``tokenizer``, ``data``, ``ray``, ``checkpoint``, ``seed``).
        run_dir: the run directory (default: a new ``runs/sft-<timestamp>``).
        address: Ray cluster address (default: ``ray.address``, ``RAY_ADDRESS``, else a local Ray instance).
        resume: continue from ``run_dir``'s latest checkpoint.
        quiet: no progress bar or prints (library use, e.g. the demo).
        use_ray: False runs the same loop in this process with one worker (debugging, tests).

    Returns:
        ``(run_dir, final metrics)``: the last step's ``sft/*`` metrics with the last validation's. The best
        checkpoint is ``rlchat.core.checkpoint.find_best_checkpoint(run_dir)``.

    Raises:
        DataError: no usable conversation. ConfigError: bad config. CheckpointError: nothing to resume.
        RLChatError: the workers failed.
    """
    return run_stage("sft", cfg, run_dir, address, resume, quiet, use_ray)


def run_rm(
    cfg: Config,
    run_dir: str | Path | None = None,
    address: str | None = None,
    resume: bool = False,
    quiet: bool = False,
    use_ray: bool = True,
) -> tuple[Path, dict[str, float]]:
    """Reward-model training on ``data.preferences`` plus ``rm.feedback`` files (arguments as :func:`run_sft`).

    Returns:
        ``(run_dir, final metrics)`` with ``rm/*`` metrics; the best checkpoint (by ``rm/val_accuracy``) is what
        ``reward.model_path`` should point at.
    """
    return run_stage("rm", cfg, run_dir, address, resume, quiet, use_ray)
