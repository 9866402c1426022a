"""Evaluation of a policy: teacher-forced perplexity/accuracy, greedy replies scored by the reward library, and the
win rate against a baseline as judged by a reward model. Also ``rlchat eval``.

    rlchat eval runs/ppo-.../checkpoints/best --baseline runs/sft-.../checkpoints/best
    rlchat eval CKPT --data heldout.jsonl --max-prompts 64 --out eval.json

What each number is (keys are the ``eval/*`` constants of :mod:`rlchat.core.metrics`):

==========================  ==================================================================================
``eval/reward_mean``        mean total reward (``cfg.reward`` weights) of the greedy reply to each prompt
``eval/reward/<name>``      mean unweighted value of every enabled reward component
``eval/perplexity``         ``exp(mean NLL)`` of the reference answers' assistant tokens (teacher forcing)
``eval/accuracy``           share of those tokens that are the model's argmax prediction
``eval/response_len``       mean tokens per greedy reply (the end-of-turn token not counted)
``eval/distinct_1`` / ``_2``  unique n-grams / n-grams over all replies together (corpus-level distinct-n)
``eval/safety_hit_rate``    share of replies the safety filter (``reward.safety_patterns`` / classifier) flags;
                            null when no filter is configured
``eval/win_rate``           with a baseline: (wins + ties / 2) / prompts, a win being a higher reward-model score
==========================  ==================================================================================

The one implementation of teacher-forced metrics is :func:`teacher_forced_metrics` (the PPO learner's periodic
held-out eval) on top of :func:`teacher_forced_sums` (the SFT stage's validation, which shards rows across
data-parallel ranks and all-reduces the sums). Log-probs come from the LM-head matmul in row chunks, so a 100k
vocabulary never materialises ``(B*T, V)`` logits. No Ray import here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlchat.core.errors import CheckpointError, ConfigError, DataError
from rlchat.core.metrics import (
    EVAL_ACCURACY,
    EVAL_DISTINCT_1,
    EVAL_DISTINCT_2,
    EVAL_PERPLEXITY,
    EVAL_RESPONSE_LEN,
    EVAL_REWARD_MEAN,
    EVAL_REWARD_PREFIX,
    EVAL_SAFETY_HIT_RATE,
    EVAL_WIN_RATE,
)
from rlchat.core.model import (
    PolicyValueModel,
    autocast_context,
    logit_transform,
    position_ids_from_mask,
    resolve_trunk,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rlchat.core.config import Config
    from rlchat.core.data import Record
    from rlchat.core.tokenizer import ChatTokenizer, Message

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
_LOGIT_BLOCK_ELEMS = 1 << 22
"""Largest (rows x vocab) logits block held at once (16 MiB fp32): 1024 rows at a 4k vocabulary, ~40 at 100k."""

# --------------------------------------------------------------------------------------------------------------
# Teacher-forced perplexity and next-token accuracy
# --------------------------------------------------------------------------------------------------------------


def _lm_parts(
    model: PolicyValueModel | PreTrainedModel, tokenizer: ChatTokenizer | None
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None, tuple[float, float], torch.dtype | None, Any]:
    """(trunk, head weight (V, H), head bias (V,) or None, logit transform, autocast dtype, config) of a policy or
    a plain causal LM; the head is cut to the ids the policy may choose (its ``vocab_size``)."""
    if isinstance(model, PolicyValueModel):
        weight, bias = model.head_weight()
        return model.trunk, weight, bias, logit_transform(model.lm.config), model.autocast_dtype(), model.lm.config
    head = model.get_output_embeddings()
    v = int(head.weight.shape[0])
    if tokenizer is not None:
        v = min(v, tokenizer.n_vocab)
    b = getattr(head, "bias", None)
    bias = b[:v] if b is not None else None
    # a plain LM is evaluated in fp32: exact, and independent of the hardware's bf16 support
    return resolve_trunk(model), head.weight[:v], bias, logit_transform(model.config), None, model.config


def model_max_positions(model: torch.nn.Module) -> int | None:
    """The context length (``max_position_embeddings`` / ``n_positions``) of a policy, a reward model (its trunk)
    or a plain ``transformers`` model; None when the config has none."""
    inner = model.lm if isinstance(model, PolicyValueModel) else getattr(model, "trunk", model)
    config: Any = inner.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions"):
        v = getattr(text, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@torch.no_grad()
def teacher_forced_sums(
    model: PolicyValueModel | PreTrainedModel,
    rows: Sequence[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]],
    pad_id: int,
    batch_size: int = 32,
    tokenizer: ChatTokenizer | None = None,
) -> tuple[float, float, int]:
    """Summed NLL, correct argmax predictions and count over the loss-mask tokens of tokenized rows.

    Position ``t`` with ``loss_mask[t] == 1`` is predicted from tokens ``< t`` (so the first token of a row is never
    scored). Rows are right-padded per batch; position ids count real tokens only.

    Args:
        model: a policy (its head is cut to ``vocab_size`` rows and it runs under its own precision) or a plain
            ``transformers`` causal LM (run in fp32).
        rows: ``(ids, loss_mask)`` pairs as :meth:`ChatTokenizer.render_conversation` returns, already cut to the
            model's positions.
        pad_id: id used for padding (never scored).
        batch_size: rows per forward.
        tokenizer: for a plain LM, cuts its head to ``tokenizer.n_vocab`` rows.

    Returns:
        ``(nll_sum, correct, count)``: sums over every scored token (float64 accumulation).
    """
    trunk, weight, bias, (scale, softcap), dtype, _ = _lm_parts(model, tokenizer)
    device = weight.device
    block = max(1, min(1024, _LOGIT_BLOCK_ELEMS // int(weight.shape[0])))
    w = weight.to(dtype) if dtype is not None else weight.float()
    nll_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    count = 0
    was_training = trunk.training
    trunk.eval()
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
            loss_mask = torch.zeros((len(chunk), width), dtype=torch.bool)  # (B, T)
            for r, (ids, mask) in enumerate(chunk):
                input_ids[r, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
                attention_mask[r, : len(ids)] = 1
                loss_mask[r, : len(mask)] = torch.as_tensor(list(mask), dtype=torch.long) != 0
            input_ids, attention_mask, loss_mask = (
                input_ids.to(device),
                attention_mask.to(device),
                loss_mask.to(device),
            )
            sel_b, sel_t = loss_mask[:, 1:].nonzero(as_tuple=True)  # predict token t+1 from position t
            if len(sel_b) == 0:
                continue
            with autocast_context(dtype, device):
                h = trunk(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask),
                    use_cache=False,
                ).last_hidden_state  # (B, T, H)
            hidden = h[sel_b, sel_t]  # (N, H)
            targets = input_ids[sel_b, sel_t + 1]  # (N,)
            for j in range(0, hidden.shape[0], block):
                hj = hidden[j : j + block]
                z = (hj.to(w.dtype) @ w.t()).float()  # (n, V) fp32 logits
                if bias is not None:
                    z = z + bias.float()
                if scale != 1.0:
                    z = z * scale
                if softcap > 0:
                    z = softcap * torch.tanh(z / softcap)
                tj = targets[j : j + block]
                nll = torch.logsumexp(z, dim=-1) - z.gather(1, tj[:, None]).squeeze(1)
                nll_sum += nll.double().sum().cpu()
                correct += (z.argmax(dim=-1) == tj).double().sum().cpu()
            count += int(hidden.shape[0])
    finally:
        trunk.train(was_training)
    return float(nll_sum), float(correct), count


def render_for_scoring(
    tokenizer: ChatTokenizer, conversations: Sequence[Sequence[Message]], max_len: int | None
) -> list[tuple[list[int], list[int]]]:
    """Render conversations with the chat template, cut to ``max_len`` tokens (the first ones are kept)."""
    rows = []
    for conv in conversations:
        ids, mask = tokenizer.render_conversation(conv)
        if max_len:
            ids, mask = ids[:max_len], mask[:max_len]
        rows.append((ids, mask))
    return rows


def teacher_forced_metrics(
    model: PolicyValueModel | PreTrainedModel,
    tokenizer: ChatTokenizer,
    conversations: list[list[Message]],
    batch_size: int = 32,
) -> dict[str, float]:
    """Perplexity and next-token accuracy of a model on the assistant tokens of conversations (teacher forcing).

    The assistant tokens are those of the chat template's loss mask (assistant text and its end-of-turn token);
    conversations longer than the model's positions are cut to their first tokens.

    Args:
        model: a policy or a plain ``transformers`` causal LM.
        tokenizer: the chat tokenizer the model was trained with.
        conversations: message lists holding at least one assistant message in total.
        batch_size: conversations per forward.

    Returns:
        ``{"perplexity": exp(mean NLL), "accuracy": share of argmax hits}`` over all assistant tokens.

    Raises:
        DataError: no conversation has an assistant token to score.
    """
    rows = render_for_scoring(tokenizer, conversations, model_max_positions(model))
    nll, correct, count = teacher_forced_sums(model, rows, tokenizer.pad_id, batch_size, tokenizer)
    if count == 0:
        raise DataError(
            f"teacher_forced_metrics: none of the {len(conversations)} conversations has an assistant token to "
            "score; pass conversations that end with an assistant reply (e.g. prompts plus reference answers)"
        )
    return {"perplexity": math.exp(min(nll / count, 700.0)), "accuracy": correct / count}


# --------------------------------------------------------------------------------------------------------------
# Evaluating a checkpoint: greedy replies, rewards, diversity, safety, win rate
# --------------------------------------------------------------------------------------------------------------


def reference_conversation(record: Record) -> list[Message] | None:
    """Prompt plus reference answer of a record, for perplexity: the chosen reply of a preference pair, a
    conversation ending with its reply, or the prompt (:meth:`~rlchat.core.data.Record.prompt_messages`, e.g. a
    prompt-only record) plus ``record.reference``; else its messages up to the last assistant message; None when
    it has no answer at all.

    Why the reference before an earlier reply: for a prompt ending with a user turn, the reference answers that
    turn -- the one the policy is evaluated on -- not the earlier one."""
    if record.is_preference:
        return list(record.messages) + list(record.chosen or [])
    if record.messages and record.messages[-1]["role"] == "assistant":
        return [dict(m) for m in record.messages]
    if record.reference:
        return [dict(m) for m in record.prompt_messages()] + [{"role": "assistant", "content": record.reference}]
    last = max((i for i, m in enumerate(record.messages) if m["role"] == "assistant"), default=-1)
    if last >= 0:
        return [dict(m) for m in record.messages[: last + 1]]
    return None


def greedy_replies(
    model: PolicyValueModel | PreTrainedModel,
    tokenizer: ChatTokenizer,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int,
    batch_size: int = 64,
) -> tuple[list[str], list[list[int]]]:
    """Greedy reply to each prompt with the generation engine (prompts longer than the context keep their end).

    Returns:
        (reply texts without special tokens, reply token ids including the end-of-turn token when generated).
    """
    from rlchat.core.generation import GenerationEngine, SamplingParams

    engine = GenerationEngine(model, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    limit = model_max_positions(model)
    texts: list[str] = []
    ids: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        rendered = [tokenizer.render_prompt(p) for p in prompts[i : i + batch_size]]
        if limit:
            keep = limit - max_new_tokens
            if keep < 1:
                raise ConfigError(
                    f"env.max_turn_tokens={max_new_tokens}: leaves no room for a prompt in the model's {limit} "
                    "positions; lower env.max_turn_tokens"
                )
            rendered = [r[-keep:] for r in rendered]
        result = engine.generate(rendered, params)
        for toks in result.tokens:
            ids.append(list(toks))
            texts.append(tokenizer.decode(toks, skip_special=True))  # as the env decodes a reply
    return texts, ids


def _reply_lengths(ids: Sequence[Sequence[int]], eot_id: int) -> list[int]:
    return [len(x) - (1 if x and x[-1] == eot_id else 0) for x in ids]


def _safety_flags(cfg: Config, texts: list[str], tokenizer: ChatTokenizer) -> list[bool] | None:
    """Whether the safety filter (the reward library's safety component) flags each reply; None when no filter."""
    r = cfg.reward
    if not r.safety_patterns and not r.safety_classifier:
        return None
    from rlchat.core.config import RewardConfig
    from rlchat.core.rewards import RewardFunction

    only_safety = RewardConfig(
        verifiable=0.0, safety=1.0, safety_patterns=r.safety_patterns, safety_classifier=r.safety_classifier
    )
    scored = RewardFunction(only_safety, tokenizer).score_batch([[]] * len(texts), texts, [[] for _ in texts])
    return [res.components.get("safety", 0.0) < 0 for res in scored]


def policy_metrics(
    model: PolicyValueModel | PreTrainedModel,
    tokenizer: ChatTokenizer,
    records: Sequence[Record],
    cfg: Config,
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Every ``eval/*`` metric of one policy on ``records`` except the win rate.

    Returns:
        (metrics by ``eval/*`` key, one row per prompt: prompt, reply, reference, reward and components).
    """
    from rlchat.core.rewards import RewardFunction, batch_distinct_n

    prompts = [r.prompt_messages() for r in records]
    texts, ids = greedy_replies(model, tokenizer, prompts, cfg.env.max_turn_tokens)
    scored = RewardFunction(cfg.reward, tokenizer).score_batch(prompts, texts, ids, list(records))
    n = len(records)
    metrics: dict[str, float | None] = {EVAL_REWARD_MEAN: sum(s.total for s in scored) / n}
    for name in scored[0].components if scored else ():
        metrics[EVAL_REWARD_PREFIX + name] = sum(s.components[name] for s in scored) / n
    conversations = [c for c in (reference_conversation(r) for r in records) if c is not None]
    if conversations:
        tf = teacher_forced_metrics(model, tokenizer, conversations)
        metrics[EVAL_PERPLEXITY], metrics[EVAL_ACCURACY] = tf["perplexity"], tf["accuracy"]
    else:
        metrics[EVAL_PERPLEXITY] = metrics[EVAL_ACCURACY] = None
    reply_ids = [x[:-1] if x and x[-1] == tokenizer.eot_id else x for x in ids]
    metrics[EVAL_RESPONSE_LEN] = sum(_reply_lengths(ids, tokenizer.eot_id)) / n
    metrics[EVAL_DISTINCT_1] = batch_distinct_n(reply_ids, 1)
    metrics[EVAL_DISTINCT_2] = batch_distinct_n(reply_ids, 2)
    flags = _safety_flags(cfg, texts, tokenizer)
    metrics[EVAL_SAFETY_HIT_RATE] = None if flags is None else sum(flags) / n
    rows = []
    for i, rec in enumerate(records):
        rows.append(
            {
                "prompt": prompts[i],
                "reply": texts[i],
                "reply_ids": reply_ids[i],
                "reference": rec.reference,
                "reward": scored[i].total,
                "components": dict(scored[i].components),
                "safety_flagged": None if flags is None else flags[i],
            }
        )
    return metrics, rows


def find_reward_judge(cfg: Config, checkpoint: str | Path, tokenizer: ChatTokenizer | None = None) -> tuple[str, str]:
    """The reward-model checkpoint that judges win rates, and where it came from.

    ``cfg.reward.model_path`` when set; otherwise the best checkpoint of the newest ``rm-*`` run directory next to
    the evaluated checkpoint's run (``runs/rm-*`` beside ``runs/sft-*``) or under ``./runs``.

    Returns:
        ``(path, source)`` where source is ``"reward.model_path"`` or ``"found <run dir>"``.

    Raises:
        ConfigError: no reward model is configured and none was found (the message says how to get one).
    """
    from rlchat.core.checkpoint import find_best_checkpoint, read_checkpoint

    if cfg.reward.model_path:
        return cfg.reward.model_path, "reward.model_path"
    ckpt = Path(checkpoint).resolve()
    roots: list[Path] = []
    for parent in ckpt.parents:
        if parent.name == "checkpoints":
            roots.append(parent.parent.parent)
            break
    roots.append(Path("runs").resolve())
    seen: set[Path] = set()
    candidates: list[Path] = []
    for root in roots:
        if root in seen or not root.is_dir():
            continue
        seen.add(root)
        candidates.extend(p for p in root.glob("rm-*") if (p / "checkpoints").is_dir())
    for run in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            best = find_best_checkpoint(run)
            read_checkpoint(best, expect_tokenizer=tokenizer, expect_stage="rm")
        except CheckpointError:
            continue
        return str(best), f"found {run}"
    raise ConfigError(
        "--baseline needs a reward model to judge the win rate, and none is configured: reward.model_path is empty "
        f"and no rm-* run with a checkpoint was found under {', '.join(str(r) for r in seen) or 'runs/'}. "
        "Train one with `rlchat rm --config ...`, or set reward.model_path to an rm checkpoint in a config file "
        "passed with --config"
    )


def win_rate(
    judge: Any, prompts: Sequence[Sequence[Message]], replies: Sequence[str], baseline_replies: Sequence[str]
) -> dict[str, float]:
    """Pairwise comparison of two reply sets by a reward-model scorer ``(prompts, replies) -> scores``.

    Identical replies, and replies with exactly equal scores, are ties and count half.

    Returns:
        ``{"win_rate", "wins", "ties", "losses"}``.
    """
    a = list(judge([list(p) for p in prompts], list(replies)))
    b = list(judge([list(p) for p in prompts], list(baseline_replies)))
    wins = ties = losses = 0
    for ra, rb, sa, sb in zip(replies, baseline_replies, a, b):
        if ra == rb or sa == sb:
            ties += 1
        elif sa > sb:
            wins += 1
        else:
            losses += 1
    n = max(len(replies), 1)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": losses}


def evaluate_checkpoint(
    path: str | Path,
    records: Sequence[Record],
    cfg: Config | None = None,
    baseline: str | Path | None = None,
    max_prompts: int = 128,
) -> dict[str, Any]:
    """Evaluate a policy checkpoint (SFT or PPO) on held-out records, optionally against a baseline.

    Args:
        path: a checkpoint directory, ``<run>/checkpoints/best`` or a run directory.
        records: held-out records; their prompts are answered greedily (the first ``max_prompts``).
        cfg: reward weights, ``env.max_turn_tokens`` and the judge's ``reward.model_path`` (default: the
            checkpoint's own config).
        baseline: another policy checkpoint to compare with (the demo: SFT vs PPO).
        max_prompts: most prompts evaluated.

    Returns:
        ``{"checkpoint", "stage", "step", "num_prompts", "metrics": {eval/* -> value}, "examples": [...],
        "baseline": {"checkpoint", "metrics", "examples"} | None, "win_rate": {...} | None}``; with a baseline,
        ``metrics`` also holds ``eval/win_rate``.

    Raises:
        CheckpointError: not a policy checkpoint. DataError: no records with a prompt.
        ConfigError: a baseline without any reward model to judge.
    """
    from rlchat.core.checkpoint import POLICY_STAGES, load_policy, read_checkpoint

    t0 = time.perf_counter()
    ckpt = read_checkpoint(path, expect_stage=POLICY_STAGES)
    cfg = cfg or ckpt.config
    usable = [r for r in records if r.prompt_messages()][: max(0, max_prompts)]
    if not usable:
        raise DataError(
            f"evaluation: none of the {len(records)} records has a prompt (a user turn for the policy to answer); "
            "pass held-out prompts, chat or task data with --data"
        )
    judge_path = judge_source = None
    if baseline is not None:  # before any model is loaded: a missing judge fails at once
        judge_path, judge_source = find_reward_judge(cfg, ckpt.path, ckpt.tokenizer)
    model, tokenizer, ckpt = load_policy(ckpt.path)
    model.eval()
    metrics, rows = policy_metrics(model, tokenizer, usable, cfg)
    out: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "stage": ckpt.stage,
        "step": ckpt.step,
        "num_prompts": len(usable),
        "metrics": metrics,
        "examples": rows,
        "baseline": None,
        "win_rate": None,
    }
    if baseline is not None:
        from rlchat.core.rewards import CheckpointRMScorer

        b_model, b_tok, b_ckpt = load_policy(baseline)
        b_model.eval()
        b_metrics, b_rows = policy_metrics(b_model, b_tok, usable, cfg)
        out["baseline"] = {
            "checkpoint": str(b_ckpt.path),
            "stage": b_ckpt.stage,
            "step": b_ckpt.step,
            "metrics": b_metrics,
            "examples": b_rows,
        }
        prompts = [r["prompt"] for r in rows]
        wr = win_rate(
            CheckpointRMScorer(str(judge_path)), prompts, [r["reply"] for r in rows], [r["reply"] for r in b_rows]
        )
        out["win_rate"] = {**wr, "judge": judge_path, "judge_source": judge_source}
        metrics[EVAL_WIN_RATE] = wr["win_rate"]
    out["eval_s"] = round(time.perf_counter() - t0, 2)
    return out


# --------------------------------------------------------------------------------------------------------------
# rlchat eval
# --------------------------------------------------------------------------------------------------------------

_ROW_LABELS = (
    (EVAL_REWARD_MEAN, "reward (mean)"),
    (EVAL_PERPLEXITY, "perplexity (reference answers)"),
    (EVAL_ACCURACY, "token accuracy (reference answers)"),
    (EVAL_RESPONSE_LEN, "response length (tokens)"),
    (EVAL_DISTINCT_1, "distinct-1"),
    (EVAL_DISTINCT_2, "distinct-2"),
    (EVAL_SAFETY_HIT_RATE, "safety-filter hit rate"),
)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a fixed-width table (a baseline column when there is one)."""
    m = result["metrics"]
    b = (result.get("baseline") or {}).get("metrics")
    rows: list[tuple[str, str, str]] = []
    components = sorted(k for k in m if k.startswith(EVAL_REWARD_PREFIX))
    for key, label in _ROW_LABELS[:1]:
        rows.append((label, _fmt(m.get(key)), _fmt(b.get(key)) if b else ""))
    for key in components:
        rows.append(("  " + key[len(EVAL_REWARD_PREFIX) :], _fmt(m.get(key)), _fmt(b.get(key)) if b else ""))
    for key, label in _ROW_LABELS[1:]:
        rows.append((label, _fmt(m.get(key)), _fmt(b.get(key)) if b else ""))
    head = ("metric", f"{result['stage']} step {result['step']}", "")
    if b:
        bl = result["baseline"]
        head = ("metric", head[1], f"baseline: {bl['stage']} step {bl['step']}")
    w0 = max(len(r[0]) for r in [head, *rows])
    w1 = max(len(r[1]) for r in [head, *rows])
    lines = [
        f"{head[0]:<{w0}}  {head[1]:>{w1}}  {head[2]}".rstrip(),
        "-" * (w0 + w1 + 2 + (len(head[2]) + 2 if b else 0)),
    ]
    lines += [f"{a:<{w0}}  {c:>{w1}}  {d}".rstrip() for a, c, d in rows]
    wr = result.get("win_rate")
    if wr:
        lines.append(
            f"win rate vs baseline: {wr['win_rate']:.3f} ({wr['wins']} wins, {wr['ties']} ties, {wr['losses']} losses;"
            f" ties count half; judged by {wr['judge']})"
        )
    if m.get(EVAL_SAFETY_HIT_RATE) is None:
        lines.append("safety-filter hit rate: n/a (set reward.safety_patterns or reward.safety_classifier)")
    return "\n".join(lines)


def format_samples(result: dict[str, Any], n: int) -> str:
    """The first ``n`` prompts with the reply (and the baseline's), the reference and the reward."""
    out: list[str] = []
    base_rows = (result.get("baseline") or {}).get("examples") or []
    for i, row in enumerate(result["examples"][: max(0, n)]):
        out.append(f"--- sample {i + 1} ---")
        for msg in row["prompt"]:
            out.append(f"[{msg['role']}] {msg['content']}")
        out.append(f"[assistant] {row['reply']}    (reward {row['reward']:.3f})")
        if i < len(base_rows):
            out.append(f"[baseline]  {base_rows[i]['reply']}    (reward {base_rows[i]['reward']:.3f})")
        if row.get("reference") is not None:
            out.append(f"[reference] {row['reference']}")
    return "\n".join(out)
