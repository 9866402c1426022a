"""Event-loop cost of a reply's text on the Serve endpoint: stop-string matching and streamed log-prob chunks.

    python bench/serve_text.py          # a few seconds

Both run on a replica's event loop, where every other stream waits while they run, so their cost per reply is
what matters (not throughput). What it measures, median of 5 runs each, in one process:

- ``TextStreamer`` (``rlchat.text_stream``) pushing a 512-token reply (random ids of the cl100k vocabulary) token
  by token, as a plain reply's text is built, with no stop strings, two short ones, and four of 1,000 characters
  (the longest accepted, ``serve.schemas.MAX_STOP_CHARS``). The KMP tables of the stop strings are built before
  the clock starts, as for a request's later choices.
- ``ChatFormat.delta_chunk`` with ``logprobs`` on (``serve.formats``) writing the SSE chunks of a request with
  ``n=16`` choices of 250 tokens and ``top_logprobs: 20`` (5 tokens per chunk), with the per-token JSON cache cold
  (first request) and warm (the same tokens again).
- The plain (non-streamed) body of the same request with 500-token choices (~12 MB): ``ChatFormat.plain_body``
  (written once; the replica runs it on a worker thread) against the path before it, emulated here: each choice's
  log-prob JSON parsed back into the body, then encoded again as ``JSONResponse`` does.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable

from rlchat.text_stream import TextStreamer
from rlchat.tokenizer import ChatTokenizer
from serve.formats import ChatFormat
from serve.schemas import AssistantMessage, ChatCompletion, Choice, Usage

try:
    from serve.formats import _token_json
except ImportError:  # the code before the per-token cache (to measure "before" with the same script)
    _token_json = None


def median_ms(fn: Callable[[], object], repeats: int = 5, before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    tok = ChatTokenizer("cl100k_base", 100262)
    rng = random.Random(0)
    reply = [rng.randrange(0, 100_000) for _ in range(512)]
    rows: list[tuple[str, float]] = []
    stop_sets = {
        "no stop strings": [],
        "2 short stop strings": ["\n\nUser:", "END"],
        "4 stop strings of 1,000 characters": [
            "".join(chr(97 + (i * 7 + j) % 26) for j in range(1000)) for i in range(4)
        ],
    }
    for label, stops in stop_sets.items():

        def push(stops: list[str] = stops) -> None:
            st = TextStreamer(tok, stop_strings=stops)
            for t in reply:
                st.push(t)
            st.finish()

        push()  # the stop strings' tables, cached as for a request's later choices
        rows.append((f"TextStreamer, 512 tokens one by one, {label}", median_ms(push)))

    tokens = [rng.randrange(0, 100_000) for _ in range(250)]
    alts = [
        (-rng.random(), [rng.randrange(0, 100_000) for _ in range(20)], [-rng.random() for _ in range(20)])
        for _ in tokens
    ]

    def chunks() -> None:
        fmt = ChatFormat("chatcmpl-bench", 0, "rlchat", tok, logprobs=True)
        for choice in range(16):
            for a in range(0, len(tokens), 5):
                fmt.delta_chunk(choice, "x", tokens[a : a + 5], alts[a : a + 5])

    cold = median_ms(chunks, before=_token_json.cache_clear if _token_json is not None else None)
    rows.append(("16 x 250-token streamed choices, top_logprobs 20, cold", cold))
    rows.append(("16 x 250-token streamed choices, top_logprobs 20, warm", median_ms(chunks)))

    long_tokens = tokens * 2
    long_alts = alts * 2
    choices = [(i, "x" * 2000, "length", long_tokens, long_alts) for i in range(16)]
    usage = Usage(prompt_tokens=10, completion_tokens=16 * 500, total_tokens=10 + 16 * 500)
    fmt = ChatFormat("chatcmpl-bench", 0, "rlchat", tok, logprobs=True)
    fmt.plain_body(choices, usage)  # the per-token cache warm, as in a serving replica

    def parsed_back() -> None:  # the code before: write, parse back, encode again
        body = ChatCompletion(id=fmt.cid, created=0, model=fmt.model, choices=[], usage=usage).model_dump()
        listed = []
        for i, text, reason, toks, a in choices:
            c = Choice(index=i, message=AssistantMessage(content=text), finish_reason=reason).model_dump()  # type: ignore[arg-type]
            c["logprobs"] = json.loads(fmt._logprobs_json(toks, a))  # noqa: SLF001
            listed.append(c)
        json.dumps({**body, "choices": listed}, ensure_ascii=False, separators=(",", ":")).encode()

    rows.append(("16 x 500-token plain choices, top_logprobs 20, parsed back (before)", median_ms(parsed_back)))
    rows.append(
        (
            "16 x 500-token plain choices, top_logprobs 20, plain_body",
            median_ms(lambda: fmt.plain_body(choices, usage)),
        )
    )

    width = max(len(name) for name, _ in rows)
    print(f"{'what':<{width}}  ms (median of 5)")
    print(f"{'-' * width}  ----------------")
    for name, ms in rows:
        print(f"{name:<{width}}  {ms:>10.1f}")


if __name__ == "__main__":
    main()
