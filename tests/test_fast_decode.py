"""The one-token decode step (rlchat.core.fast_decode) against the Hugging Face forward it replaces."""

from __future__ import annotations

import copy

import pytest
import torch

from rlchat.config import ModelConfig
from rlchat.core.fast_decode import decode_step_fn, prefill_fn
from rlchat.generation import GenerationEngine, SamplingParams, _left_pad
from rlchat.model import autocast_context, build_tiny_lm
from rlchat.tokenizer import ChatTokenizer

VOCAB = 300


def _tiny(arch: str, **extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    lm = build_tiny_lm(ModelConfig(arch=arch, n_layer=2, n_embd=32, n_head=4, n_positions=64), VOCAB)
    for k, v in extra.items():
        setattr(lm.config, k, v)
    return lm.eval()


def _gqa_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).float().eval()


def _prefilled(trunk: torch.nn.Module, dtype: torch.dtype | None = None):  # noqa: ANN202 - test helper
    """A left-padded batch of 3 prompts of different lengths prefilled by the Hugging Face forward."""
    from transformers import DynamicCache

    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    ids, mask = _left_pad(prompts, 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=trunk.config)
    with torch.no_grad(), autocast_context(dtype, torch.device("cpu")):
        trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, cache=cache)
    next_pos = torch.tensor([[len(p)] for p in prompts])
    return cache, mask, next_pos


def _hf_step(trunk, ids, mask, pos, cache, dtype=None):  # noqa: ANN001, ANN202
    with torch.no_grad(), autocast_context(dtype, torch.device("cpu")):
        out = trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, cache=cache)
    return out.last_hidden_state[:, -1].float()


@pytest.mark.parametrize("make", [lambda: _tiny("gpt2"), lambda: _tiny("llama"), lambda: _tiny("qwen2"), _gqa_llama])
def test_step_matches_hugging_face_over_several_steps(make) -> None:  # noqa: ANN001
    trunk = make().base_model
    step = decode_step_fn(trunk)
    assert step is not None
    cache, mask, pos = _prefilled(trunk)
    ref_cache = copy.deepcopy(cache)
    ref_mask, ref_pos = mask.clone(), pos.clone()
    ids = torch.tensor([[20], [21], [22]])
    for _ in range(4):  # several steps: the cache each side wrote is what the next step reads
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        ref_mask = torch.cat([ref_mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        with torch.no_grad():
            h = step(ids, mask, pos, cache)
        h_ref = _hf_step(trunk, ids, ref_mask, ref_pos, ref_cache)
        assert h.shape == (3, trunk.config.hidden_size)
        torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=1e-4)
        for a, b in zip(cache.layers, ref_cache.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(a.values, b.values, atol=2e-5, rtol=1e-4)
        pos, ref_pos = pos + 1, ref_pos + 1
        ids = (h_ref.sum(-1, keepdim=True).abs() * 1000).long() % VOCAB  # some next token, equal on both sides


def test_step_under_bf16_autocast_stays_close() -> None:
    trunk = _tiny("gpt2").base_model
    step = decode_step_fn(trunk)
    cache, mask, pos = _prefilled(trunk, torch.bfloat16)
    ref_cache = copy.deepcopy(cache)
    mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    ids = torch.tensor([[20], [21], [22]])
    with torch.no_grad(), autocast_context(torch.bfloat16, torch.device("cpu")):
        h = step(ids, mask, pos, cache).float()
    h_ref = _hf_step(trunk, ids, mask, pos, ref_cache, torch.bfloat16)
    assert cache.layers[0].keys.dtype == ref_cache.layers[0].keys.dtype
    torch.testing.assert_close(h, h_ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpt2_prefill_matches_hugging_face_and_the_steps_after_it(dtype) -> None:  # noqa: ANN001
    """The written-out GPT-2 prefill of a left-padded batch: the last position's hidden state and every real
    column's keys / values are Hugging Face's, padding columns are finite (they stay in the cache, masked), and the
    steps that follow read either cache alike. In bf16 the projections come from the packed weights where this CPU
    has bf16 units (the serving engine's case)."""
    from transformers import DynamicCache

    lm = _tiny("gpt2")
    if dtype is not None:
        lm = lm.to(dtype)  # the serving engine stores bf16 weights
    trunk = lm.base_model
    prefill, step = prefill_fn(trunk), decode_step_fn(trunk)
    assert prefill is not None and step is not None
    ref_cache, mask, pos = _prefilled(trunk, dtype)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    ids, _ = _left_pad(prompts, 0, 0)
    cache = DynamicCache(config=trunk.config)
    with torch.no_grad(), autocast_context(dtype, torch.device("cpu")):
        h = prefill(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache).float()
        ref_h = (
            trunk(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
            .last_hidden_state[:, -1]
            .float()
        )
    tol = {"atol": 2e-5, "rtol": 1e-4} if dtype is None else {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(h, ref_h, **tol)
    real = mask.bool()
    for a, b in zip(cache.layers, ref_cache.layers):
        assert a.keys.shape == b.keys.shape and a.keys.dtype == b.keys.dtype
        assert torch.isfinite(a.keys).all() and torch.isfinite(a.values).all()
        for mine, ref in ((a.keys, b.keys), (a.values, b.values)):
            torch.testing.assert_close(mine.transpose(1, 2)[real].float(), ref.transpose(1, 2)[real].float(), **tol)
    mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    with torch.no_grad(), autocast_context(dtype, torch.device("cpu")):
        nxt = torch.tensor([[20], [21], [22]])
        torch.testing.assert_close(step(nxt, mask, pos, cache).float(), step(nxt, mask, pos, ref_cache).float(), **tol)


def test_falls_back_where_it_does_not_mirror_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = _tiny("gpt2")
    assert decode_step_fn(lm.base_model) is not None
    lm.train()
    assert decode_step_fn(lm.base_model) is None  # dropout on: Hugging Face's forward
    assert prefill_fn(lm.base_model) is None
    lm.eval()
    assert decode_step_fn(_tiny("gpt2", activation_function="swish").base_model) is None
    assert decode_step_fn(_tiny("qwen2", use_sliding_window=True).base_model) is None
    assert decode_step_fn(torch.nn.Linear(2, 2)) is None  # an architecture we do not mirror
    assert prefill_fn(_tiny("llama").base_model) is None  # Llama-family prompts: Hugging Face's prefill
    monkeypatch.setenv("RLCHAT_FAST_DECODE", "0")
    assert decode_step_fn(lm.base_model) is None
    assert prefill_fn(lm.base_model) is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_engine_replies_equal_with_and_without_the_fast_step(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = ChatTokenizer("cl100k_base", 4096)
    torch.manual_seed(0)
    lm = build_tiny_lm(ModelConfig(arch=arch, n_layer=2, n_embd=64, n_head=4, n_positions=128), tok.n_vocab)
    engine = GenerationEngine(lm.eval(), tok, precision="fp32")
    prompts = [
        tok.render_prompt([{"role": "user", "content": text}]) for text in ("What is 2 + 3?", "Hi", "Tell me more")
    ]
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    fast = engine.generate(prompts, params, seeds=[1, 2, 3])
    assert engine._decoder().step is not None  # noqa: SLF001 - the fast step is what ran
    monkeypatch.setenv("RLCHAT_FAST_DECODE", "0")
    assert engine._decoder().step is None  # noqa: SLF001
    slow = engine.generate(prompts, params, seeds=[1, 2, 3])
    assert fast.tokens == slow.tokens
    for a, b in zip(fast.logprobs, slow.logprobs):
        assert a == pytest.approx(b, abs=1e-4)


def test_cache_grows_in_place_and_survives_replacement() -> None:
    from rlchat.core.fast_decode import _append_kv

    class Layer:  # the two attributes of a transformers DynamicLayer that the step uses
        def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
            self.keys, self.values = k, v

    k0 = torch.randn(2, 3, 5, 4)
    layer = Layer(k0.clone(), k0.clone() + 1)
    cols = [torch.randn(2, 3, 1, 4) for _ in range(3)]
    _append_kv(layer, cols[0], cols[0] + 1)
    ptr = layer.keys.data_ptr()
    _append_kv(layer, cols[1], cols[1] + 1)
    assert layer.keys.data_ptr() == ptr  # written into the spare column, not copied
    torch.testing.assert_close(layer.keys, torch.cat([k0, cols[0], cols[1]], 2))
    torch.testing.assert_close(layer.values, torch.cat([k0, cols[0], cols[1]], 2) + 1)
    # someone else replaces the tensors (a merge / compaction / reorder): the next append starts a new buffer
    layer.keys, layer.values = layer.keys[[1, 0]], layer.values[[1, 0]]
    _append_kv(layer, cols[2], cols[2] + 1)
    want = torch.cat([torch.cat([k0, cols[0], cols[1]], 2)[[1, 0]], cols[2]], 2)
    torch.testing.assert_close(layer.keys, want)
    torch.testing.assert_close(layer.values, want + 1)
    # a crop (a shorter view of the same buffer) continues from the cropped length
    layer.keys, layer.values = layer.keys[:, :, :-2], layer.values[:, :, :-2]
    _append_kv(layer, cols[0], cols[0] + 1)
    torch.testing.assert_close(layer.keys, torch.cat([want[:, :, :-2], cols[0]], 2))
    # fewer rows and leading columns trimmed (continuous batching's departures): still in place
    ptr = layer._rlchat_kv[0].data_ptr()  # noqa: SLF001
    layer.keys, layer.values = layer.keys[:1, :, 2:], layer.values[:1, :, 2:]
    before = layer.keys.clone()
    _append_kv(layer, cols[1][:1], cols[1][:1] + 1)
    assert layer._rlchat_kv[0].data_ptr() == ptr  # noqa: SLF001
    torch.testing.assert_close(layer.keys, torch.cat([before, cols[1][:1]], 2))
    torch.testing.assert_close(layer.values[:, :, -1:], cols[1][:1] + 1)


def test_a_full_buffer_keeps_spare_rows_for_its_live_rows_not_a_past_burst() -> None:
    """A buffer that fills up is replaced with spare rows for the rows it holds now: it kept every row it ever had,
    so a batch that shrank after a burst to one long row grew (burst rows x that row's width) -- 71x the live cache
    in a review's script (a one-row buffer before continuous batching moved rows inside the buffers)."""
    from rlchat.core.fast_decode import _append_kv

    class Layer:
        def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
            self.keys, self.values = k, v

    burst = torch.randn(40, 2, 3, 4)
    layer = Layer(burst.clone(), burst.clone())
    _append_kv(layer, torch.randn(40, 2, 1, 4), torch.randn(40, 2, 1, 4))
    assert layer._rlchat_kv[0].shape[0] == 40  # noqa: SLF001
    layer.keys, layer.values = layer.keys[:1], layer.values[:1]  # the burst left: one row goes on
    kept = layer.keys.clone()
    cols = [torch.randn(1, 2, 1, 4) for _ in range(200)]
    for c in cols:
        _append_kv(layer, c, c)
    assert layer._rlchat_kv[0].shape[0] <= 1 + 4  # noqa: SLF001
    torch.testing.assert_close(layer.keys, torch.cat([kept, *cols], 2))


def test_a_stream_started_in_train_mode_uses_the_fast_step_and_restores_the_mode() -> None:
    tok = ChatTokenizer("cl100k_base", 4096)
    torch.manual_seed(0)
    lm = build_tiny_lm(ModelConfig(arch="gpt2", n_layer=2, n_embd=64, n_head=4, n_positions=128), tok.n_vocab)
    engine = GenerationEngine(lm.train(), tok, precision="fp32")  # e.g. a learner that generates between updates
    stream = engine.steps([tok.render_prompt([{"role": "user", "content": "Hi"}])], SamplingParams(max_new_tokens=4))
    assert stream._dec.step is not None  # noqa: SLF001 - the snapshot was taken in eval mode
    assert not lm.training  # dropout off while generating
    for _ in stream:
        pass
    assert lm.training  # and the caller's mode is back


def test_a_one_token_prompt_is_prefilled_by_hugging_face(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-token prefill has an empty cache: the one-token step is for decoding only (found by schemathesis:
    /v1/completions with a one-token prompt was a 500)."""
    from serve.decode_batch import DecodeBatch

    tok = ChatTokenizer("cl100k_base", 4096)
    torch.manual_seed(0)
    lm = build_tiny_lm(ModelConfig(arch="gpt2", n_layer=2, n_embd=64, n_head=4, n_positions=128), tok.n_vocab)
    engine = GenerationEngine(lm.eval(), tok, precision="fp32")
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    fast = engine.generate([[5], [7, 8]], params, seeds=[1, 2])
    batch = DecodeBatch(engine)
    batch.add([[5]], params, [1])
    served = [batch.step()[0].token for _ in range(6)]
    monkeypatch.setenv("RLCHAT_FAST_DECODE", "0")
    slow = engine.generate([[5], [7, 8]], params, seeds=[1, 2])
    assert fast.tokens == slow.tokens and len(fast.tokens[0]) == 6
    assert served == slow.tokens[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "heads", "kv_heads"), [(1, 8, 8), (16, 8, 8), (5, 8, 2), (3, 4, 1)])
def test_one_query_attention_equals_sdpa(dtype: torch.dtype, rows: int, heads: int, kv_heads: int) -> None:
    """The decode step's attention (plain math for many bf16 rows on a CPU, where SDPA's flash kernel costs several
    times more; SDPA for one row and fp32) equals attention written out in float64 for left-padded rows, grouped-query
    attention included. (The reference was SDPA, which made the SDPA-dispatched cases compare it with itself.)"""
    from rlchat.core.fast_decode import _one_query_attention

    torch.manual_seed(0)
    length = 70
    q = torch.randn(rows, heads, 1, 64, dtype=dtype)
    k = torch.randn(rows, kv_heads, length, 64, dtype=dtype)
    v = torch.randn(rows, kv_heads, length, 64, dtype=dtype)
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    for r in range(rows):
        mask[r, ..., : 7 * r % 40] = False  # left padding of different widths
    gqa = heads != kv_heads
    got = _one_query_attention(q, k, v, mask, 0.125, gqa)
    # query head j reads key/value head j // (heads / kv heads): Hugging Face's repeat_kv order
    kx = k.double().repeat_interleave(heads // kv_heads, dim=1)
    vx = v.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = (q.double() @ kx.transpose(-1, -2) * 0.125).masked_fill(~mask, float("-inf"))
    ref = scores.softmax(-1) @ vx
    assert got.shape == (rows, heads, 1, 64) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


@pytest.mark.skipif(
    not __import__("rlchat.core.packed_linear", fromlist=["x"]).packed_bf16_linear_available(),
    reason="no bf16 matrix units or no oneDNN packed matmul on this CPU",
)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_stored_weights_step_from_packed_copies_that_follow_updates(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving stores bf16 weights; on a CPU with bf16 units the step multiplies by oneDNN-packed copies kept on the
    modules (the plain bf16 matmul re-packs each weight on every call). The step must equal the plain one, reuse
    the copies across builds, and see a weight written in place (through ``.data`` too)."""
    import rlchat.core.packed_linear as packed_linear
    from rlchat.core.packed_linear import _PACKED

    def kept() -> list[torch.Tensor]:
        return [_PACKED[p][1] for p in trunk.parameters() if p in _PACKED]

    trunk = _tiny(arch).to(torch.bfloat16).base_model
    step = decode_step_fn(trunk)
    first = kept()
    assert first and all(p is not None and p.is_mkldnn for p in first)  # every projection of every layer
    assert len(first) == (4 if arch == "gpt2" else 7) * 2
    copy.deepcopy(trunk)  # the packed copies (opaque tensors) are not on the modules: copying still works

    def run(step) -> torch.Tensor:  # noqa: ANN001
        cache, mask, pos = _prefilled(trunk)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        with torch.no_grad():
            return step(torch.tensor([[20], [21], [22]]), mask, pos, cache).float()

    with monkeypatch.context() as m:
        m.setattr(packed_linear, "packed_bf16_linear_available", lambda: False)
        plain = run(decode_step_fn(trunk))  # addmm / F.linear over the bf16 weights
    torch.testing.assert_close(run(step), plain, atol=2e-2, rtol=2e-2)
    decode_step_fn(trunk)
    again = kept()
    assert len(again) == len(first) and all(a is b for a, b in zip(first, again)), "packed again though unchanged"

    before = run(decode_step_fn(trunk))
    first_weight = next(p for p in trunk.parameters() if p in _PACKED)
    with torch.no_grad():
        first_weight.data.mul_(-3.0)  # through .data: no version bump
    after = run(decode_step_fn(trunk))
    assert not torch.allclose(before, after, atol=1e-2)
    with monkeypatch.context() as m:
        m.setattr(packed_linear, "packed_bf16_linear_available", lambda: False)
        torch.testing.assert_close(after, run(decode_step_fn(trunk)), atol=2e-2, rtol=2e-2)
