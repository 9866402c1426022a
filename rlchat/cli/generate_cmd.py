"""``rlchat generate``: batch generation over a prompt set (:mod:`rlchat.distributed.batch_generate`), with what it
prints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlchat.distributed.batch_generate import format_summary, generate


def generate_command(
    checkpoint: str,
    input: str,
    output: str,
    n: int = 1,
    batch_size: int = 32,
    concurrency: int = 1,
    jsonl: bool = False,
    logprobs: bool = False,
    rewards: bool = False,
    on_error: str = "fail",
    address: str | None = None,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    max_tokens: int = 64,
    stop: Sequence[str] = (),
    seed: int | None = None,
    beams: int = 1,
    **_: Any,
) -> int:
    """``rlchat generate``: run :func:`generate`, print each skipped line, the summary and the files written."""
    from rlchat.core.generation import SamplingParams

    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop_strings=tuple(stop or ()),
        num_beams=beams,
        seed=seed,
    )
    result = generate(
        checkpoint,
        [input],
        output,
        params,
        n=n,
        batch_size=batch_size,
        concurrency=concurrency,
        jsonl=jsonl,
        logprobs=logprobs,
        rewards=rewards,
        on_error=on_error,
        address=address,
    )
    for s in result.skipped:
        print(f"skipped {s.source}: {s.reason}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} bad record(s); each is listed above and in manifest.json")
    print(format_summary(result))
    return 0
