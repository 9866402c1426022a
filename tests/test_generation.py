"""The generation engine: behaviour log-probs equal the learner's recomputation, every decoding option, per-row
seeds, beam search, streaming and the lock-step interface (rlchat/generation.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlchat.config import Config
from rlchat.errors import ConfigError
from rlchat.generation import (
    GenerationEngine,
    SamplingParams,
    StepOutput,
    row_uniforms,
    seed_keys,
)
from rlchat.model import PolicyValueModel, position_ids_from_mask
from rlchat.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", 4096)


def build(tok: ChatTokenizer, arch: str = "gpt2", seed: int = 0) -> PolicyValueModel:
    cfg = Config().replace(
        **{
            "seed": seed,
            "tokenizer.vocab_size": 4096,
            "model.arch": arch,
            "model.n_embd": 32,
            "model.n_head": 2,
            "model.precision": "fp32",
        }
    )
    return PolicyValueModel.build(cfg, tok).eval()


@pytest.fixture(scope="module")
def policy(tok: ChatTokenizer) -> PolicyValueModel:
    return build(tok)


@pytest.fixture(scope="module")
def engine(policy: PolicyValueModel, tok: ChatTokenizer) -> GenerationEngine:
    return GenerationEngine(policy, tok, precision="fp32")


@pytest.fixture(scope="module")
def prompts(tok: ChatTokenizer) -> list[list[int]]:
    return [
        tok.render_prompt([{"role": "user", "content": "What is two plus two? Answer briefly."}]),
        [17, 4000, 9],
        tok.render_prompt([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]),
    ]


def full_logits(model: PolicyValueModel, seqs: list[list[int]], pad: int) -> list[torch.Tensor]:
    """Per sequence, (len, V) logits of a plain no-cache forward (right padded)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return [logits[i, : len(s)] for i, s in enumerate(seqs)]


def learner_logprobs(model: PolicyValueModel, prompts: list[list[int]], outs: list[list[int]], pad: int) -> list:
    """The learner's recomputation: right-padded prompt + response through PolicyValueModel.forward."""
    seqs = [p + o for p, o in zip(prompts, outs)]
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    action = torch.zeros_like(mask)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        action[i, len(p) : len(s)] = 1
    with torch.no_grad():
        out = model(ids, mask, action)
    return [out.logprobs[i, len(p) : len(s)] for i, (p, s) in enumerate(zip(prompts, seqs))]


# ---------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_logprobs_equal_the_learners_recomputation(tok: ChatTokenizer, prompts: list[list[int]], arch: str) -> None:
    """Temperature 1, no filtering: behaviour log-probs = learner log-probs (1e-5, fp32), with left padding, rows of
    different prompt lengths, rows finishing at different times and batch compaction."""
    model = build(tok, arch)
    eng = GenerationEngine(model, tok, precision="fp32")
    # ~10% of the vocabulary stops a row, so rows end at different steps and the batch gets compacted
    stops = tuple(range(0, 4000, 10))
    batch = prompts * 3
    res = eng.generate(batch, SamplingParams(max_new_tokens=24, stop_token_ids=stops), seeds=list(range(len(batch))))
    lengths = {len(t) for t in res.tokens}
    assert len(lengths) > 2, "rows should finish at different times"
    for got, ref in zip(res.logprobs, learner_logprobs(model, batch, res.tokens, tok.pad_id)):
        torch.testing.assert_close(torch.tensor(got), ref, atol=1e-5, rtol=0)
    for toks, reason in zip(res.tokens, res.finish_reasons):
        assert (reason == "stop") == (toks[-1] in stops or toks[-1] == tok.eot_id)
        assert reason == "stop" or len(toks) == 24
        assert not any(t in stops for t in toks[:-1])
    assert res.prompt_lengths == [len(p) for p in batch]


def test_engine_accepts_a_bare_transformers_model(tok: ChatTokenizer, policy: PolicyValueModel) -> None:
    a = GenerationEngine(policy, tok, "fp32").generate([[1, 2, 3]], SamplingParams(max_new_tokens=5), seeds=[4])
    b = GenerationEngine(policy.lm, tok, "fp32").generate([[1, 2, 3]], SamplingParams(max_new_tokens=5), seeds=[4])
    assert a.tokens == b.tokens and a.logprobs == b.logprobs


# ---------------------------------------------------------------------------------------------- decoding options


def test_greedy_equals_argmax_and_transformers_generate(
    engine: GenerationEngine, policy: PolicyValueModel, tok: ChatTokenizer, prompts: list[list[int]]
) -> None:
    res = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    for p, out, lps in zip(prompts, res.tokens, res.logprobs):
        logits = full_logits(policy, [p + out], tok.pad_id)[0]
        steps = logits[len(p) - 1 : len(p) - 1 + len(out)]
        assert out == steps.argmax(-1).tolist()
        ref_lp = torch.log_softmax(steps, -1).gather(1, torch.tensor(out)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), ref_lp, atol=1e-5, rtol=0)
        with torch.no_grad():
            hf = policy.lm.generate(
                torch.tensor([p]), do_sample=False, max_new_tokens=len(out), eos_token_id=tok.eot_id, pad_token_id=0
            )
        assert hf[0, len(p) :].tolist() == out


def test_temperature_scales_the_sampling_distribution(
    engine: GenerationEngine, policy: PolicyValueModel, tok: ChatTokenizer, prompts: list[list[int]]
) -> None:
    res = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.7), seeds=[1, 2, 3])
    for p, out, lps in zip(prompts, res.tokens, res.logprobs):
        steps = full_logits(policy, [p + out], tok.pad_id)[0][len(p) - 1 : len(p) - 1 + len(out)]
        ref = torch.log_softmax(steps / 0.7, -1).gather(1, torch.tensor(out)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-5, rtol=0)
    cold = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1e-4), seeds=[1, 2, 3])
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    assert cold.tokens == greedy.tokens


def test_top_k_samples_only_among_the_k_best(
    engine: GenerationEngine, policy: PolicyValueModel, tok: ChatTokenizer, prompts: list[list[int]]
) -> None:
    res = engine.generate(prompts, SamplingParams(max_new_tokens=8, top_k=3), seeds=[5, 6, 7])
    for p, out, lps in zip(prompts, res.tokens, res.logprobs):
        steps = full_logits(policy, [p + out], tok.pad_id)[0][len(p) - 1 : len(p) - 1 + len(out)]
        vals, idx = steps.topk(3, -1)
        for s, t in enumerate(out):
            assert t in idx[s].tolist()
            ref = steps[s, t] - torch.logsumexp(vals[s], -1)  # renormalised over the top 3
            assert abs(lps[s] - ref.item()) < 1e-5
    top1 = engine.generate(prompts, SamplingParams(max_new_tokens=8, top_k=1), seeds=[5, 6, 7])
    assert top1.tokens == engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0)).tokens


def test_top_p_samples_from_the_nucleus(
    engine: GenerationEngine, policy: PolicyValueModel, tok: ChatTokenizer, prompts: list[list[int]]
) -> None:
    top_p = 0.3
    res = engine.generate(prompts, SamplingParams(max_new_tokens=8, top_p=top_p), seeds=[8, 9, 10])
    for p, out, lps in zip(prompts, res.tokens, res.logprobs):
        steps = full_logits(policy, [p + out], tok.pad_id)[0][len(p) - 1 : len(p) - 1 + len(out)]
        probs = torch.softmax(steps.double(), -1)
        for s, t in enumerate(out):
            sp, si = probs[s].sort(descending=True)
            before = sp.cumsum(0) - sp
            nucleus = si[before < top_p]
            assert t in nucleus.tolist()
            ref = torch.log(probs[s, t] / probs[s, nucleus].sum())
            assert abs(lps[s] - ref.item()) < 1e-4
    combo = engine.generate(prompts, SamplingParams(max_new_tokens=8, top_k=50, top_p=0.5), seeds=[1, 2, 3])
    assert all(len(t) == 8 for t in combo.tokens)


@pytest.mark.parametrize("n", [2048, 4096 + 5, 100_277])
def test_two_level_inverse_cdf_draws_the_float64_inverse_cdf(n: int) -> None:
    """Over a large vocabulary the sampler searches block sums, then one block (``_search_blocks``), instead of a
    cumulative sum of the whole row. It must draw what the exact (float64) inverse CDF draws for the same uniform,
    up to fp32 rounding at a boundary; never an excluded (-inf) entry, including a uniform at the top and mass only in
    the short last block or in one entry; and give each draw its log-prob."""
    from rlchat.core.generation import CDF_BLOCK, _inverse_cdf

    assert n >= 2 * CDF_BLOCK  # the two-level path
    gen = torch.Generator().manual_seed(0)
    rows = 64
    z = torch.randn(rows, n, generator=gen) * torch.rand(rows, 1, generator=gen) * 8
    z[torch.rand(rows, n, generator=gen) < 0.3] = float("-inf")
    z[0, : n - 3] = float("-inf")  # mass only in the last three entries (the short last block for n % 1024 != 0)
    z[1] = float("-inf")
    z[1, 1500] = 0.0  # one entry
    z[2, CDF_BLOCK:] = float("-inf")  # mass only in the first block
    u = torch.rand(rows, 1, generator=gen)
    u[3:6] = torch.tensor([[0.0], [1.0 - 2**-24], [0.5]])
    j, lp = _inverse_cdf(z.clone(), u, 1.0, sorted_desc=False)
    e = (z.double() - z.double().amax(-1, keepdim=True)).exp()
    c = e.cumsum(-1)
    exact = torch.searchsorted(c, u.double() * c[:, -1:], right=True).clamp_(max=n - 1)
    assert j.shape == (rows, 1) and torch.isfinite(z.gather(1, j)).all()
    assert j[0, 0] >= n - 3 and j[1, 0] == 1500 and j[2, 0] < CDF_BLOCK
    assert (j != exact).sum() <= 1, (j != exact).nonzero()
    torch.testing.assert_close(lp, torch.log_softmax(z.double(), -1).gather(1, j).squeeze(1).float())


def test_two_level_inverse_cdf_samples_the_distribution() -> None:
    """10,000 draws over 3,000 ids with known probabilities: the frequencies of eight id ranges (straddling
    blocks) match them (a chi-square statistic of 7 degrees of freedom: p > 0.001 below 24.3)."""
    from rlchat.core.generation import _inverse_cdf

    gen = torch.Generator().manual_seed(1)
    n, draws = 3000, 10_000
    logits = torch.randn(n, generator=gen) * 2
    z = logits.expand(draws, n).clone()
    u = torch.rand(draws, 1, generator=gen)
    j, _ = _inverse_cdf(z, u, 1.0, sorted_desc=False)
    edges = torch.linspace(0, n, 9).long()
    p = torch.softmax(logits.double(), -1)
    expected = torch.stack([p[a:b].sum() for a, b in zip(edges[:-1], edges[1:])]) * draws
    observed = torch.histc(j.double().squeeze(1), bins=8, min=0, max=n)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (chi2, observed.tolist(), expected.tolist())


def test_repetition_penalty_matches_transformers(
    engine: GenerationEngine, policy: PolicyValueModel, tok: ChatTokenizer, prompts: list[list[int]]
) -> None:
    p = prompts[0]
    ours = engine.generate([p], SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.8)).tokens[0]
    with torch.no_grad():
        hf = policy.lm.generate(
            torch.tensor([p]),
            do_sample=False,
            max_new_tokens=12,
            repetition_penalty=1.8,
            eos_token_id=tok.eot_id,
            pad_token_id=0,
        )
    assert ours == hf[0, len(p) :].tolist()
    plain = engine.generate([p], SamplingParams(max_new_tokens=12, temperature=0)).tokens[0]
    huge = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1e4))
    assert len(set(plain)) < len(plain)  # the tiny random model repeats itself without a penalty
    for pr, out in zip(prompts, huge.tokens):  # a huge penalty forbids every token already seen (left padding too)
        assert len(set(out)) == len(out) and not set(out) & set(pr)


def test_min_and_max_new_tokens(engine: GenerationEngine, prompts: list[list[int]]) -> None:
    everything = tuple(range(4000))  # almost every token stops a row
    short = engine.generate(prompts, SamplingParams(max_new_tokens=10, stop_token_ids=everything), seeds=[1, 2, 3])
    assert all(len(t) <= 2 for t in short.tokens)
    res = engine.generate(
        prompts, SamplingParams(max_new_tokens=10, min_new_tokens=4, stop_token_ids=everything), seeds=[1, 2, 3]
    )
    for toks, reason in zip(res.tokens, res.finish_reasons):
        assert len(toks) >= 5 and not any(t in everything for t in toks[:4]) and reason == "stop"
    capped = engine.generate(prompts, SamplingParams(max_new_tokens=7), seeds=[1, 2, 3])
    assert [len(t) for t in capped.tokens] == [7, 7, 7] and capped.finish_reasons == ["length"] * 3


def test_end_of_turn_always_stops(tok: ChatTokenizer, prompts: list[list[int]]) -> None:
    model = build(tok, seed=3)
    eng = GenerationEngine(model, tok, "fp32")
    first = eng.generate([prompts[1]], SamplingParams(max_new_tokens=1, temperature=0)).tokens[0][0]
    with torch.no_grad():  # swap the (tied) embedding rows: the eot logit becomes the greedy favourite's
        w = model.lm.get_input_embeddings().weight
        w[[first, tok.eot_id]] = w[[tok.eot_id, first]].clone()
    res = eng.generate([prompts[1]], SamplingParams(max_new_tokens=5, temperature=0))
    assert res.tokens[0] == [tok.eot_id] and res.finish_reasons == ["stop"]


def test_stop_strings_end_a_row_at_the_completing_token(
    engine: GenerationEngine, tok: ChatTokenizer, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_new_tokens=20, seed=11)
    free = engine.generate(prompts, params).tokens
    row = free[0]
    k = next(i for i in range(3, len(row)) if not tok.is_special(row[i]) and tok.decode([row[i]]).strip())
    needle = tok.decode([row[k]]).strip()[-2:]
    stopped = engine.generate(prompts, SamplingParams(max_new_tokens=20, seed=11, stop_strings=(needle,)))
    text = b""
    end = None
    for i, t in enumerate(row):
        text += b"" if tok.is_special(t) else tok.token_bytes(t)
        if needle.encode() in text:
            end = i
            break
    assert end is not None and end <= k
    assert stopped.tokens[0] == row[: end + 1] and stopped.finish_reasons[0] == "stop"
    for a, b in zip(stopped.tokens[1:], free[1:]):  # other rows: a prefix of their free run, same seed
        assert a == b[: len(a)]


# ---------------------------------------------------------------------------------------------- seeds


def test_same_seed_same_output_regardless_of_batch(engine: GenerationEngine, prompts: list[list[int]]) -> None:
    params = SamplingParams(max_new_tokens=12)
    full = engine.generate(prompts, params, seeds=[10, 20, 30])
    alone = engine.generate([prompts[1]], params, seeds=[20])
    shuffled = engine.generate([prompts[2], prompts[1], prompts[0]], params, seeds=[30, 20, 10])
    assert alone.tokens[0] == full.tokens[1]
    assert shuffled.tokens == full.tokens[::-1]
    np.testing.assert_allclose(alone.logprobs[0], full.logprobs[1], atol=1e-5)
    other = engine.generate(prompts, params, seeds=[11, 21, 31])
    assert other.tokens != full.tokens
    a = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=7))
    b = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=7))
    assert a.tokens == b.tokens and len({tuple(t) for t in a.tokens}) == 3


def test_counter_rng_is_uniform_and_keyed() -> None:
    keys = seed_keys(list(range(2000)))
    u = row_uniforms(keys, 0)
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.03 and abs(u.var() - 1 / 12) < 0.01
    assert not np.array_equal(u, row_uniforms(keys, 1))
    np.testing.assert_array_equal(row_uniforms(keys[5:6], 3), row_uniforms(keys, 3)[5:6])
    assert seed_keys([-1])[0] == seed_keys([2**64 - 1])[0]


# ---------------------------------------------------------------------------------------------- beam search


def test_beam_search_matches_transformers(
    engine: GenerationEngine, policy: PolicyValueModel, tok: ChatTokenizer, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_new_tokens=6, num_beams=3)
    res = engine.generate(prompts, params)
    for p, out, lps, reason in zip(prompts, res.tokens, res.logprobs, res.finish_reasons):
        with torch.no_grad():
            hf = policy.lm.generate(
                torch.tensor([p]),
                do_sample=False,
                num_beams=3,
                max_new_tokens=6,
                length_penalty=1.0,
                early_stopping=False,
                eos_token_id=tok.eot_id,
                pad_token_id=0,
            )
        assert out == hf[0, len(p) :].tolist()
        steps = full_logits(policy, [p + out], tok.pad_id)[0][len(p) - 1 : len(p) - 1 + len(out)]
        ref = torch.log_softmax(steps, -1).gather(1, torch.tensor(out)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-5, rtol=0)
        assert reason == "length"
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    for beam_lps, greedy_lps in zip(res.logprobs, greedy.logprobs):
        assert sum(beam_lps) >= sum(greedy_lps) - 1e-5  # the best beam is at least as likely as greedy here


def test_beam_search_stops_on_stop_tokens(
    engine: GenerationEngine, policy: PolicyValueModel, tok: ChatTokenizer, prompts: list[list[int]]
) -> None:
    stops = tuple(range(0, 4000, 3))
    res = engine.generate(prompts, SamplingParams(max_new_tokens=8, num_beams=2, stop_token_ids=stops))
    for p, toks, reason in zip(prompts, res.tokens, res.finish_reasons):
        assert not any(t in stops for t in toks[:-1])
        assert (reason == "stop" and toks[-1] in stops) or (reason == "length" and len(toks) == 8)
        with torch.no_grad():
            hf = policy.lm.generate(
                torch.tensor([p]),
                do_sample=False,
                num_beams=2,
                max_new_tokens=8,
                length_penalty=1.0,
                early_stopping=False,
                eos_token_id=[tok.eot_id, *stops],
                pad_token_id=tok.pad_id,
            )[0, len(p) :].tolist()
        assert toks == [t for t in hf if t != tok.pad_id]
    nearly_all = tuple(range(4000))
    res = engine.generate(prompts, SamplingParams(max_new_tokens=8, num_beams=2, stop_token_ids=nearly_all))
    assert res.finish_reasons == ["stop"] * 3
    assert all(t[-1] in nearly_all and not set(t[:-1]) & set(nearly_all) for t in res.tokens)
    with pytest.raises(ConfigError, match="num_beams"):
        engine.steps(prompts, SamplingParams(num_beams=2))


# ---------------------------------------------------------------------------------------------- streaming / steps


def test_stream_yields_the_same_tokens_as_generate(engine: GenerationEngine, prompts: list[list[int]]) -> None:
    params = SamplingParams(max_new_tokens=9, seed=3)
    streamed = list(engine.stream(prompts[0], params))
    res = engine.generate([prompts[0]], params)
    assert [t for t, _ in streamed] == res.tokens[0]
    np.testing.assert_allclose([lp for _, lp in streamed], res.logprobs[0], atol=1e-6)
    beams = list(engine.stream(prompts[0], SamplingParams(max_new_tokens=4, num_beams=2)))
    assert [t for t, _ in beams] == engine.generate(
        [prompts[0]], SamplingParams(max_new_tokens=4, num_beams=2)
    ).tokens[0]


def test_lock_step_interface_and_finish(
    engine: GenerationEngine, tok: ChatTokenizer, prompts: list[list[int]]
) -> None:
    params = SamplingParams(max_new_tokens=10)
    ref = engine.generate(prompts, params, seeds=[1, 2, 3])
    stream = engine.steps(prompts, params, seeds=[1, 2, 3])
    seen: list[StepOutput] = []
    for i, out in enumerate(stream):
        assert out.tokens.shape == (3,) and out.tokens.dtype == np.int64
        assert out.logprobs.dtype == np.float32 and out.active.dtype == bool
        seen.append(out)
        if i == 2:
            stream.finish([0])  # e.g. the env ended row 0's episode
        if i == 5:
            stream.finish([2], reason="length")
    res = stream.result()
    assert len(seen) == 10
    assert [s.active.tolist() for s in seen[:3]] == [[True, True, True]] * 3
    assert all(s.active.tolist() == [False, True, True] for s in seen[3:6])
    assert all(s.active.tolist() == [False, True, False] for s in seen[6:])
    assert all(s.tokens[0] == tok.pad_id and s.logprobs[0] == 0 for s in seen[3:])
    assert res.tokens[0] == ref.tokens[0][:3] and res.tokens[2] == ref.tokens[2][:6]
    assert res.tokens[1] == ref.tokens[1]  # ending other rows (and compacting) does not change a row
    np.testing.assert_allclose(res.logprobs[1], ref.logprobs[1], atol=1e-5)
    assert [s.tokens[1] for s in seen] == ref.tokens[1]
    assert res.finish_reasons == ["stop", "length", "length"]
    assert not stream.active.any()


def test_generation_restores_training_mode(tok: ChatTokenizer) -> None:
    model = build(tok)
    model.train()
    eng = GenerationEngine(model, tok, "fp32")
    eng.generate([[1, 2]], SamplingParams(max_new_tokens=3))
    eng.generate([[1, 2]], SamplingParams(max_new_tokens=3, num_beams=2))
    assert model.lm.training


# ---------------------------------------------------------------------------------------------- errors, precision


def test_invalid_requests_raise_config_errors(engine: GenerationEngine, tok: ChatTokenizer) -> None:
    with pytest.raises(ConfigError, match="empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ConfigError, match="token id 5000"):
        engine.generate([[1, 5000]], SamplingParams())
    with pytest.raises(ConfigError, match="positions"):  # no room for a single new token
        engine.generate([[1] * 512], SamplingParams(max_new_tokens=20))
    capped = engine.generate([[1] * 500], SamplingParams(max_new_tokens=20, min_new_tokens=20))
    assert len(capped.tokens[0]) == 12 and capped.finish_reasons == ["length"]  # ends at the model's limit
    with pytest.raises(ConfigError, match="positions"):  # beam search still needs room for max_new_tokens
        engine.generate([[1] * 500], SamplingParams(max_new_tokens=20, num_beams=2))
    with pytest.raises(ConfigError, match="one per prompt"):
        engine.generate([[1], [2]], SamplingParams(), seeds=[1])
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"max_new_tokens": 0}, {"stop_strings": ("",)}):
        with pytest.raises(ConfigError, match="SamplingParams"):
            SamplingParams(**bad)
    assert engine.generate([], SamplingParams()).tokens == []


def test_bf16_engine_produces_valid_tokens(policy: PolicyValueModel, tok: ChatTokenizer) -> None:
    eng = GenerationEngine(policy, tok, precision="bf16")
    assert eng.autocast_dtype() is torch.bfloat16
    res = eng.generate([[1, 2, 3], [4]], SamplingParams(max_new_tokens=6), seeds=[0, 1])
    assert all(0 <= t < tok.n_vocab for row in res.tokens for t in row)
    assert all(np.isfinite(lp) and lp <= 0 for row in res.logprobs for lp in row)
    assert GenerationEngine(policy, tok, precision="auto").autocast_dtype() is None  # narrow model on CPU: fp32
    wide_cfg = Config().replace(**{"tokenizer.vocab_size": 4096, "model.n_embd": 128, "model.n_layer": 1})
    wide = PolicyValueModel.build(wide_cfg, tok)  # precision auto: engine and learner resolve it the same way
    assert GenerationEngine(wide, tok, precision="auto").autocast_dtype() is wide.autocast_dtype()


def test_rows_end_with_length_at_the_models_position_limit(tok: ChatTokenizer) -> None:
    # A 32-position model: a 30-token prompt has room for 2 new tokens, the short prompts for all 8. Instead of
    # refusing the whole batch mid-run (a rollout with one long prompt used to kill the PPO run), the long row ends
    # with "length" at the model's limit and the other rows go on; 4 of 5 rows stay live, so the finished row is not
    # compacted away and keeps being fed -- its position must not run past the position table.
    cfg = Config().replace(
        **{"tokenizer.vocab_size": 4096, "model.n_embd": 32, "model.n_head": 2, "model.n_positions": 32}
    )
    cfg = cfg.replace(**{"model.precision": "fp32", "env.max_context": 32, "env.max_turn_tokens": 8})
    policy = PolicyValueModel.build(cfg, tok).eval()
    engine = GenerationEngine(policy, tok, "fp32")
    assert engine.max_positions == 32
    long = list(range(100, 130))
    prompts = [long] + [[17, 4000 + i, 9] for i in range(4)]
    no_stop = SamplingParams(max_new_tokens=8, min_new_tokens=8)  # stop tokens masked: lengths are exact
    res = engine.generate(prompts, no_stop, seeds=[0, 1, 2, 3, 4])
    assert [len(t) for t in res.tokens] == [2, 8, 8, 8, 8]
    assert res.finish_reasons == ["length"] * 5
    # the long row is what it would be alone (its own seed, its own positions)
    alone = engine.generate([long], no_stop, seeds=[0])
    assert alone.tokens[0] == res.tokens[0]
    np.testing.assert_allclose(alone.logprobs[0], res.logprobs[0], atol=1e-5)
    # a prompt that fills every position leaves nothing to generate: that is still an error, with the fix
    with pytest.raises(ConfigError, match=r"prompt of 32 tokens fills the model's 32 positions"):
        engine.generate([list(range(100, 132))], no_stop)


def test_the_fp32_head_copy_follows_weight_updates(tok: ChatTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32 CPU engine reads the head from a contiguous (H, V) copy it keeps across calls (a strided view of the
    tied (V, H) embedding halves MKL's speed at a real vocabulary); any update of the weights -- an optimizer step,
    ``load_state_dict``, a write through ``.data`` that torch's version counter misses -- must reach the next call's
    logits, and the copy must not be rebuilt when nothing changed."""
    model = build(tok, seed=3)
    eng = GenerationEngine(model, tok, precision="fp32")
    h = torch.randn(4, 32)
    w = model.lm.get_output_embeddings().weight

    def expected() -> torch.Tensor:
        return h @ w.detach()[: eng.vocab_size].t()

    first = eng._decoder()
    assert first.w_t.is_contiguous() and first.w_t.shape == (32, eng.vocab_size)
    torch.testing.assert_close(first.logits(h), expected())
    assert eng._decoder().w_t.data_ptr() == first.w_t.data_ptr()  # kept: no copy per call

    with torch.no_grad():
        w.mul_(-2.0)  # in place, as an optimizer step
    torch.testing.assert_close(eng._decoder().logits(h), expected())

    other = build(tok, seed=4)
    model.load_state_dict(other.state_dict())  # a weight sync
    torch.testing.assert_close(eng._decoder().logits(h), h @ other.lm.get_output_embeddings().weight.detach().t())
    # updates torch's version counter does not see: through ``.data`` (older training loops, DeepSpeed-style
    # loaders) and ``vector_to_parameters`` (which assigns ``.data``)
    w.data.copy_(w.data * 0.5)
    torch.testing.assert_close(eng._decoder().logits(h), expected())
    w.data = w.data.clone() * 3.0
    torch.testing.assert_close(eng._decoder().logits(h), expected())
    vec = torch.nn.utils.parameters_to_vector([w])
    torch.nn.utils.vector_to_parameters(-vec, [w])
    torch.testing.assert_close(eng._decoder().logits(h), expected())
    model.load_state_dict(other.state_dict())
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    ref = GenerationEngine(other, tok, precision="fp32").generate([[1, 2, 3]], greedy)
    assert eng.generate([[1, 2, 3]], greedy).tokens == ref.tokens

    import rlchat.core.generation as generation

    monkeypatch.setattr(generation, "HEAD_COPY_MAX_BYTES", 0)  # a head above the cap: read through the view
    big = GenerationEngine(other, tok, precision="fp32")._decoder()
    assert not big.w_t.is_contiguous()
    torch.testing.assert_close(big.logits(h), h @ other.lm.get_output_embeddings().weight.detach().t())


needs_packed_bf16 = pytest.mark.skipif(
    not __import__("rlchat.core.packed_linear", fromlist=["x"]).packed_bf16_linear_available(),
    reason="no bf16 matrix units or no oneDNN packed matmul on this CPU",
)


@needs_packed_bf16
@pytest.mark.parametrize("stored", ["fp32 under autocast", "bf16 (serving)"])
def test_the_packed_bf16_head_gives_the_plain_products_and_follows_weight_updates(
    tok: ChatTokenizer, stored: str
) -> None:
    """On a CPU with bf16 units a bf16 engine multiplies by a oneDNN-packed copy of the head (a real vocabulary's head
    is ~half a decode step, and the plain bf16 matmul re-packs it on every call): its logits must be the plain bf16
    product's for every row count, it must be kept across calls, and any weight update must reach the next call --
    rollouts run bf16 autocast over the learner's fp32 weights, which change every iteration."""
    model = build(tok, seed=3)
    eng = GenerationEngine(model, tok, precision="bf16")
    if stored.startswith("bf16"):
        eng = GenerationEngine.for_inference(model, tok, precision="bf16")
    w = model.lm.get_output_embeddings().weight

    def expected(h: torch.Tensor) -> torch.Tensor:
        return (h.bfloat16() @ w.detach()[: eng.vocab_size].bfloat16().t()).float()

    first = eng._decoder()
    assert first.packed is not None and first.packed.is_mkldnn
    for rows in (1, 2, 5, 16, 33):
        h = torch.randn(rows, 32)
        torch.testing.assert_close(first.logits(h), expected(h), rtol=0, atol=0)
        buf = torch.empty(rows, eng.vocab_size)
        torch.testing.assert_close(first.logits(h, out=buf), expected(h), rtol=0, atol=0)
    assert eng._decoder().packed is first.packed  # kept: no re-pack per call

    h = torch.randn(4, 32)
    with torch.no_grad():
        w.mul_(-2.0)  # in place, as an optimizer step
    torch.testing.assert_close(eng._decoder().logits(h), expected(h), rtol=0, atol=0)
    w.data.copy_(w.data * 0.5)  # unseen by the version counter
    torch.testing.assert_close(eng._decoder().logits(h), expected(h), rtol=0, atol=0)
    other = build(tok, seed=4)
    model.load_state_dict(other.state_dict())  # a weight sync
    torch.testing.assert_close(eng._decoder().logits(h), expected(h), rtol=0, atol=0)


def test_a_bf16_engine_without_the_packed_head_uses_the_plain_product(
    tok: ChatTokenizer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the packed product does not apply (no bf16 units, no oneDNN) or oneDNN refuses it, the engine keeps
    the plain bf16 matmul, with the same greedy tokens, and says why when oneDNN failed."""
    import rlchat.core.packed_linear as packed_linear

    model = build(tok, seed=5)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    packed_ok = packed_linear.packed_bf16_linear_available()
    reference = GenerationEngine(model, tok, precision="bf16").generate([[1, 2, 3]], greedy).tokens

    monkeypatch.setattr(packed_linear, "packed_bf16_linear_available", lambda: False)
    eng = GenerationEngine(model, tok, precision="bf16")
    assert eng._decoder().packed is None
    assert eng.generate([[1, 2, 3]], greedy).tokens == reference

    def broken(*args: object) -> None:
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(packed_linear, "packed_bf16_linear_available", lambda: True)
    monkeypatch.setattr(packed_linear, "packed_linear", broken)
    with caplog.at_level("WARNING", logger="rlchat.core.packed_linear"):
        assert GenerationEngine(model, tok, precision="bf16")._decoder().packed is None
    assert "could not create a primitive" in caplog.text or not packed_ok
    assert GenerationEngine(model, tok, precision="bf16").generate([[1, 2, 3]], greedy).tokens == reference


@pytest.mark.parametrize("n", [1, 2, 4095, 4096, 4097, 100_277 * 512, 152_064 * 4096])
def test_head_probe_indices_stay_inside_the_head_at_real_sizes(n: int) -> None:
    """The head copy's change probe samples elements spread over the whole head: at cl100k x 512 (51M elements) a
    float32 ``linspace`` rounded its last index past the end."""
    from rlchat.core.weight_stamp import spread_indices

    idx = spread_indices(n, 4096)
    assert idx.dtype == torch.int64 and len(idx) == min(n, 4096)
    assert int(idx[0]) == 0 and int(idx[-1]) == n - 1
    assert len(idx) == 1 or bool((idx[1:] > idx[:-1]).all())


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_stops_at_its_deadline_with_length(tok: ChatTokenizer, beams: int) -> None:
    """A served request's deadline reaches the engine: sampling and beam search (which runs whole, off the decode
    batch) end their rows with ``length`` once it passes, keeping what they generated, instead of running to their
    budget past it."""
    import time

    engine = GenerationEngine(build(tok, seed=3), tok, precision="fp32")
    params = SamplingParams(max_new_tokens=200, min_new_tokens=200, temperature=1.0, num_beams=beams)
    prompts = [[1, 2, 3], [4, 5]]
    full = engine.generate(prompts, params, seeds=[0, 1])
    assert [len(t) for t in full.tokens] == [200, 200] or beams > 1
    past = engine.generate(prompts, params, seeds=[0, 1], deadline=time.monotonic() - 1.0)
    assert past.finish_reasons == ["length", "length"] and all(len(t) <= 1 for t in past.tokens)
    t0 = time.monotonic()
    calls = {"n": 0}
    real = GenerationEngine._decoder

    def slow_decoder(self):  # each forward takes >= 5 ms, so 200 tokens cannot fit in 0.1 s
        dec = real(self)
        forward = dec.forward

        def slow(*a, **kw):
            calls["n"] += 1
            time.sleep(0.005)
            return forward(*a, **kw)

        dec.forward = slow
        return dec

    GenerationEngine._decoder = slow_decoder
    try:
        cut = engine.generate(prompts, params, seeds=[0, 1], deadline=t0 + 0.1)
    finally:
        GenerationEngine._decoder = real
    assert time.monotonic() - t0 < 1.0 and cut.finish_reasons == ["length", "length"]
    assert 0 < max(len(t) for t in cut.tokens) < 200
    if beams == 1:  # the tokens it kept are the full run's first ones (same seeds)
        assert all(full.tokens[i][: len(cut.tokens[i])] == cut.tokens[i] for i in range(2))


def test_a_weight_stamp_sees_every_kind_of_change_and_only_changes() -> None:
    """The one rule kept copies of a weight are rebuilt by (``rlchat/core/weight_stamp.py``): an unchanged weight,
    contiguous or a transposed view, matches its stamp (a non-contiguous one must not look new at every call, which
    would rebuild a 100 MB copy per step); an in-place update, a ``.data`` write and new storage do not."""
    from rlchat.core.weight_stamp import WeightStamp

    w = torch.nn.Parameter(torch.randn(300, 40))
    for view in (None, w.detach().t(), w.detach()[:100]):
        stamp = WeightStamp.of(w, view)
        assert stamp.matches(w, view) and stamp.matches(w, view)
    stamp = WeightStamp.of(w)
    with torch.no_grad():
        w.mul_(1.0)  # in place through autograd: the version counter moves, the values do not
    assert not stamp.matches(w)
    stamp = WeightStamp.of(w)
    w.data[-1, -1] += 1.0  # no counter sees it; the last element is sampled
    assert not stamp.matches(w)
    stamp = WeightStamp.of(w)
    w.data = w.data.clone()  # new storage, same values
    assert not stamp.matches(w)
