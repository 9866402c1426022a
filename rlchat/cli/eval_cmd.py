"""``rlchat eval CKPT [--baseline CKPT] [--data FILE]``: the evaluation of :mod:`rlchat.core.evaluation`, printed and
written to eval.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlchat.core.evaluation import EVAL_FILE, evaluate_checkpoint, format_samples, format_table


def _eval_out_path(out: str | None, ckpt_path: Path) -> Path:
    """Where ``eval.json`` goes: ``--out``, else ``<run>/eval/<step dir>/eval.json`` for a checkpoint of a run.

    A checkpoint directory is written once, atomically, and its file list is recorded in ``meta.json``; results
    computed later belong to the run, not inside the checkpoint (a loose checkpoint still gets it alongside).
    """
    if out is None:
        if ckpt_path.parent.name == "checkpoints":
            return ckpt_path.parent.parent / "eval" / ckpt_path.name / EVAL_FILE
        return ckpt_path / EVAL_FILE
    p = Path(out)
    return p if p.suffix == ".json" else p / EVAL_FILE


def eval_command(
    checkpoint: str,
    baseline: str | None = None,
    data: str | None = None,
    config: str | None = None,
    out: str | None = None,
    samples: int = 3,
    max_prompts: int = 128,
    **_: Any,
) -> int:
    """``rlchat eval CKPT [--baseline CKPT] [--data FILE]``: print the table and samples, write eval.json.

    Held-out prompts default to the checkpoint config's ``data.prompts`` validation split; ``--data`` records are
    all used (the file is taken to be held out). Either may be prompt-only (no reply, optionally a ``reference``):
    the policy writes the replies. ``--config`` replaces the checkpoint's config for rewards, the
    reply budget (``env.max_turn_tokens``) and the judge (``reward.model_path``).
    """
    from transformers.utils import logging as hf_logging

    from rlchat.core.checkpoint import POLICY_STAGES, read_checkpoint
    from rlchat.core.config import load_config
    from rlchat.core.data import load_records

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the table
    ckpt = read_checkpoint(checkpoint, expect_stage=POLICY_STAGES)
    cfg = load_config(config) if config else ckpt.config
    if data:
        records = load_records(data, "all", cfg, require_reply=False)
        source = data
    else:
        records = load_records(cfg.data.prompts, "val", cfg)
        source = f"{cfg.data.prompts} (val split)"
    print(f"evaluating {ckpt.path} on {min(len(records), max_prompts)} prompts from {source}")
    result = evaluate_checkpoint(ckpt.path, records, cfg, baseline, max_prompts)
    result["data"] = source
    print(format_table(result))
    if samples > 0:
        print(format_samples(result, samples))
    path = _eval_out_path(out, ckpt.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0
