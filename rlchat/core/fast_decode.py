"""One-token decode steps for GPT-2 and Llama-family trunks, without the Hugging Face module stack.

Why this exists: a decode step feeds one token per row, so its matmuls are tiny and its cost is the Python around
them. Hugging Face's ``GPT2Model.forward`` spends ~300 torch ops and much more Python per step on a 2-layer model
(mask construction through ``create_causal_mask``, module calls, kwargs plumbing, cache bookkeeping): 0.9 ms for 16
rows of the demo model on one core, against ~0.3 ms for the same math written as ~15 ops per layer. That overhead is
what a 2-core CPU deployment pays per generated token in rollouts (``rlchat.generation``) and in serving
(``serve.decode_batch``), so the single-token step is written out here for the architectures we build and test
(``model.arch`` gpt2 / llama / qwen2), exactly as vLLM and TRL's fast paths keep their own decoder code.

Scope, on purpose:

- **The one-token step, and GPT-2's prefill.** A prompt's prefill (many positions, causal + padding masks) is
  Python-light already; it is written out for GPT-2 only (:func:`prefill_fn`) so that a bf16 CPU engine multiplies
  from its packed weights there too. Llama-family prefill stays on the Hugging Face forward, with its masking rules
  and any architecture quirks.
- **The same cache, grown in place.** Keys / values stay in the ``transformers`` ``DynamicCache`` the prefill
  filled (``layers[i].keys / .values``), so everything that reorders, crops or merges caches (beam search,
  continuous batching) is unchanged. ``DynamicCache.update`` appends by ``torch.cat``, which copies the whole cache
  into fresh memory every step (a 16-row, 120-column cache: ~70 us per layer and side, mostly page faults on the
  new allocation); :func:`_append_kv` instead keeps each layer's keys / values as a view of a buffer with spare
  columns and writes the new column in place, reallocating (with headroom) only when someone else replaced the
  tensors (a merge, a compaction, a beam reorder).
- **The same math, op for op where it matters**: the same weights, ``addmm`` for GPT-2's ``Conv1D``, layer /
  RMS norms with the module's epsilon, the attention module's own ``scaling``, rotary tables from the model's own
  ``rotary_emb`` (so RoPE scaling variants are Hugging Face's). Attention applies the padding mask (a row's query
  may see every unmasked column: a decode step's query is the newest position): PyTorch's SDPA, except for many
  rows in bf16 on a CPU (:func:`_one_query_attention`: SDPA's flash kernel costs several times the math there).
  Results match the Hugging Face forward to float noise (``tests/test_fast_decode.py``).
- **Anything else falls back**: a model in training mode, cross-attention, sliding-window layers, biases or
  activations we do not mirror, or another architecture -> :func:`decode_step_fn` returns None and the caller
  uses the Hugging Face forward. ``RLCHAT_FAST_DECODE=0`` turns the fast path off (a debugging switch).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlchat.core.packed_linear import kept_packed_weight, packed_linear

DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""``(input_ids (B, 1), mask (B, L), pos (B, 1), cache) -> (B, H)`` last hidden state (after the final norm); the
cache gains one column per layer (``mask`` already covers it)."""

DecodePrefill = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""``(input_ids (B, T), mask (B, T), pos (B, T), empty cache) -> (B, H)`` hidden state of the last position (after
the final norm) of left-padded prompts; the cache gets their T columns per layer."""

_TANH_GELU = frozenset({"gelu_new", "gelu_pytorch_tanh", "gelu_fast"})


def fast_decode_enabled() -> bool:
    """False when ``RLCHAT_FAST_DECODE=0`` (compare against the Hugging Face forward while debugging)."""
    return os.environ.get("RLCHAT_FAST_DECODE", "1") != "0"


def decode_step_fn(trunk: nn.Module) -> DecodeStep | None:
    """A one-token step for ``trunk`` (``resolve_trunk(lm)``), or None when it must run through Hugging Face.

    The weights are read when the step is built (a snapshot, like the engine's head weight), so build one per
    generation call.
    """
    if not fast_decode_enabled() or trunk.training:
        return None
    name = type(trunk).__name__
    if name == "GPT2Model":
        fns = _gpt2_fns(trunk)
        return None if fns is None else fns[0]
    if name in ("LlamaModel", "Qwen2Model"):
        return _llama_step(trunk)
    return None


def prefill_fn(trunk: nn.Module) -> DecodePrefill | None:
    """A prefill of prompts into an empty cache for ``trunk``, or None when it must run through Hugging Face (GPT-2
    only for now; Llama-family prompts are prefilled by Hugging Face's forward).

    Why: on a CPU with bf16 units the serving engine's weights are multiplied from oneDNN-packed copies
    (:func:`_affine`), but Hugging Face's forward multiplies the plain bf16 weights, which oneDNN re-packs on every
    call: a 10-token prompt's prefill of 8 x 512 over cl100k took 13.4 ms through it against 7.4 ms written out over
    the packed copies (one thread), on the serving replica's prefill thread for every arrival (and on its generation
    thread for a burst). The math is the step's: the same projections, norms and scaling; SDPA with a causal +
    padding mask. In fp32 it matches Hugging Face's forward to ~5e-7 (``tests/test_fast_decode.py``).
    """
    if not fast_decode_enabled() or trunk.training or type(trunk).__name__ != "GPT2Model":
        return None
    fns = _gpt2_fns(trunk)
    return None if fns is None else fns[1]


# ----------------------------------------------------------------------------------------------------------- cache
_SPARE_COLUMNS = 64
"""Columns a reallocated buffer gets beyond what it holds (at least; half its length for long caches)."""


def kv_buffer_start(t: torch.Tensor, buf: torch.Tensor) -> int | None:
    """The first column of ``t`` in ``buf`` when ``t`` is the view ``buf[:B, :, s:s + n]`` (any B up to ``buf``'s
    rows), else None (another tensor, or another kind of view)."""
    if (
        t.dtype != buf.dtype
        or t.stride() != buf.stride()
        or t.shape[0] > buf.shape[0]
        or t.shape[1::2] != buf.shape[1::2]
    ):
        return None
    col = buf.stride(2) * buf.element_size()
    off = t.data_ptr() - buf.data_ptr()
    if off < 0 or off % col or off // col + t.shape[2] > buf.shape[2]:
        return None
    return off // col


def kv_buffers(layer: Any) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(key buffer, value buffer, first column)`` when a cache layer's keys / values are views
    ``buf[:B, :, s:s + n]`` of the buffers :func:`_append_kv` keeps on it, else None."""
    buf = getattr(layer, "_rlchat_kv", None)
    if buf is None or getattr(layer, "keys", None) is None:
        return None
    s = kv_buffer_start(layer.keys, buf[0])
    if s is None or kv_buffer_start(layer.values, buf[1]) != s:
        return None
    return buf[0], buf[1], s


def _append_kv(layer: Any, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one column (``k``, ``v``: (B, heads, 1, d)) to a ``DynamicCache`` layer; returns its keys, values.

    The layer's tensors are views ``buf[:B, :, s:s + n]`` of a (rows, heads, capacity, d) buffer kept on the layer;
    the new column is written at ``s + n``. Any such view continues in place: a crop, a trim of leading columns, or
    fewer rows (continuous batching moves rows inside the buffer rather than copying it, see
    ``serve.decode_batch``). When the layer's tensors are not such a view (replaced by a merge, compaction, reorder
    from elsewhere) or the buffer is full, a new buffer with spare columns is made.
    """
    keys, values = layer.keys, layer.values
    b, heads, n, d = keys.shape
    found = kv_buffers(layer) if keys.dtype == k.dtype else None
    if found is None or found[2] + n >= found[0].shape[2]:
        cap = n + max(_SPARE_COLUMNS, n // 2)
        # a full buffer keeps spare rows for joins (continuous batching), sized by the rows it holds now, not by a
        # past burst's (one long row after a burst of 40 would otherwise grow 40 rows' worth of columns)
        rows = b if found is None else min(found[0].shape[0], b + max(4, b // 2))
        kb = keys.new_empty((rows, heads, cap, d), dtype=k.dtype)
        vb = values.new_empty((rows, v.shape[1], cap, v.shape[3]), dtype=v.dtype)
        kb[:b, :, :n] = keys
        vb[:b, :, :n] = values
        layer._rlchat_kv = (kb, vb)
        s = 0
    else:
        kb, vb, s = found
    kb[:b, :, s + n] = k[:, :, 0]
    vb[:b, :, s + n] = v[:, :, 0]
    layer.keys, layer.values = kb[:b, :, s : s + n + 1], vb[:b, :, s : s + n + 1]
    return layer.keys, layer.values


# ------------------------------------------------------------------------------------------------------- attention
def _one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, scale: float, gqa: bool = False
) -> torch.Tensor:
    """Attention of one new query per row: ``q`` (B, heads, 1, d) over the cache ``k`` / ``v`` (B, kv heads, L, d),
    ``attn_mask`` (B, 1, 1, L) True where a column is real; (B, heads, 1, d).

    Why not always SDPA: on a CPU in bf16, PyTorch's SDPA for a one-token query runs a flash kernel whose cost for
    many rows is far above the math (one thread, 8 heads of 64, 16 rows, contiguous keys: 851 us at 60 cached
    columns, 2,963 us at 200, against 188 and 410 us for two batched matmuls and an fp32 softmax). A whole 16-row
    step of an 8 x 512 model over cl100k: 33.4 -> 30.3 ms at ~40 columns, 52.3 -> 37.5 at 200, 85.5 -> 48.1 at 450.
    One row keeps SDPA (43 vs 78 us), as do fp32 (close either way: the rollout path of the demo stays exactly as it
    was) and GPUs (fused kernels). Scores are softmaxed in fp32, as SDPA's math does. Grouped-query attention: query
    head ``j`` reads key/value head ``j // (heads / kv heads)``, Hugging Face's ``repeat_kv`` order, without
    repeating the cache.
    """
    b, heads, _, d = q.shape
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or b == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    kv_heads = k.shape[1]
    qg = q.view(b, kv_heads, heads // kv_heads, d)  # (B, kv heads, group, d)
    # k @ q^T, not q @ k^T: the cache is a view of a buffer with spare columns, and a bf16 matmul with its transpose
    # copied the whole cache first (16 rows, 450 columns: 3.3 ms vs 0.95 ms per layer)
    scores = torch.matmul(k, qg.transpose(-1, -2)).transpose(-1, -2).float().mul_(scale)  # (B, kv heads, group, L)
    scores.masked_fill_(~attn_mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(v.dtype), v).view(b, heads, 1, d)


# ---------------------------------------------------------------------------------------------------- projections
def _affine(module: nn.Module, conv1d: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x W^T + b`` of an ``nn.Linear`` (``conv1d``: GPT-2's ``Conv1D``, ``addmm(b, x, W)`` with W stored
    (in, out)). bf16 weights on a CPU with bf16 units (serving stores them so) are multiplied from a oneDNN-packed
    copy kept beside the weight (:func:`rlchat.core.packed_linear.kept_packed_weight`): the plain bf16 matmul re-packs
    every weight on every call, which made the trunk ~half of a serving engine's time under load (py-spy, 16
    clients, 8 x 512); packed, one thread, 16 rows: 222 -> 166 us (512 -> 1536), 351 -> 184 (512 -> 2048), 253 ->
    185 (2048 -> 512); one row 2-3x faster; the cost is a second bf16 copy of each weight. Elsewhere (fp32 weights,
    autocast, GPUs) the plain op, as before."""
    w, b = module.weight, module.bias
    packed = kept_packed_weight(w, transpose=conv1d)
    if packed is not None:
        return functools.partial(packed_linear, packed=packed, bias=b)
    if conv1d:
        return lambda x: torch.addmm(b, x, w)
    return lambda x: F.linear(x, w, b)


# ----------------------------------------------------------------------------------------------------------- GPT-2
def _gpt2_fns(trunk: nn.Module) -> tuple[DecodeStep, DecodePrefill] | None:
    """GPT-2's one-token step and prompt prefill over the same snapshot of the weights (None: not mirrored)."""
    cfg = trunk.config
    if getattr(cfg, "add_cross_attention", False) or cfg.activation_function not in (_TANH_GELU | {"gelu", "relu"}):
        return None
    if getattr(cfg, "reorder_and_upcast_attn", False) and cfg._attn_implementation == "eager":  # noqa: SLF001
        return None  # fp32-upcast attention: keep Hugging Face's
    act = cfg.activation_function
    gelu_approx = "tanh" if act in _TANH_GELU else "none"
    wte, wpe = trunk.wte.weight, trunk.wpe.weight
    ln_f = (trunk.ln_f.weight, trunk.ln_f.bias, trunk.ln_f.eps)
    width = wte.shape[1]
    layers = []
    for blk in trunk.h:
        at, mlp = blk.attn, blk.mlp
        layers.append(
            (
                (blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps),
                _affine(at.c_attn, conv1d=True),
                _affine(at.c_proj, conv1d=True),
                (blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps),
                _affine(mlp.c_fc, conv1d=True),
                _affine(mlp.c_proj, conv1d=True),
                at.num_heads,
                at.head_dim,
                float(at.scaling),
            )
        )
    shape = (width,)

    def mlp_block(h: torch.Tensor, ln2: tuple, fc: Callable, fc_proj: Callable) -> torch.Tensor:
        x = fc(F.layer_norm(h, shape, ln2[0], ln2[1], ln2[2]))
        x = F.relu(x) if act == "relu" else F.gelu(x, approximate=gelu_approx)
        return h + fc_proj(x)

    def step(input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        b = input_ids.shape[0]
        h = F.embedding(input_ids[:, 0], wte) + F.embedding(pos[:, 0], wpe)  # (B, E)
        attn_mask = mask[:, None, None, :].bool()  # (B, 1, 1, L): the newest position sees every real column
        for i, (ln1, qkv, proj, ln2, fc, fc_proj, nh, hd, scale) in enumerate(layers):
            x = F.layer_norm(h, shape, ln1[0], ln1[1], ln1[2])
            q, k, v = qkv(x).view(b, 3, nh, 1, hd).unbind(1)  # each (B, nh, 1, hd)
            k, v = _append_kv(cache.layers[i], k, v)
            o = _one_query_attention(q, k, v, attn_mask, scale)  # (B, nh, 1, hd)
            h = mlp_block(proj(o.reshape(b, width)) + h, ln2, fc, fc_proj)
        return F.layer_norm(h, shape, ln_f[0], ln_f[1], ln_f[2])

    def prefill(input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        b, t = input_ids.shape
        h = (F.embedding(input_ids, wte) + F.embedding(pos, wpe)).view(b * t, width)  # rows: (prompt, position)
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril_()
        eye = torch.eye(t, dtype=torch.bool, device=h.device)
        # a real query sees the real columns up to its own; a padding query sees itself only (a row with no column
        # is nan in SDPA, and the padding columns' keys / values stay in the cache, masked, and must be finite)
        attn_mask = ((causal & mask[:, None, :].bool()) | eye)[:, None]  # (B, 1, T, T)
        last = len(layers) - 1
        for i, (ln1, qkv, proj, ln2, fc, fc_proj, nh, hd, scale) in enumerate(layers):
            x = F.layer_norm(h, shape, ln1[0], ln1[1], ln1[2])
            q, k, v = qkv(x).view(b, t, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
            k, v = cache.update(k.contiguous(), v.contiguous(), i)
            if i == last:  # the last layer: only the last position's output is needed (its keys / values are in)
                q, attn_mask, h = q[:, :, -1:], attn_mask[:, :, -1:], h.view(b, t, width)[:, -1]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)  # (B, nh, T', hd)
            o = o.transpose(1, 2).reshape(h.shape[0], width)
            h = mlp_block(proj(o) + h, ln2, fc, fc_proj)
        return F.layer_norm(h, shape, ln_f[0], ln_f[1], ln_f[2])

    return step, prefill


# ----------------------------------------------------------------------------------------------------------- Llama
def _llama_step(trunk: nn.Module) -> DecodeStep | None:
    cfg = trunk.config
    types = getattr(cfg, "layer_types", None) or []
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in types):
        return None
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return None
    emb = trunk.embed_tokens.weight
    rotary = trunk.rotary_emb
    norm = trunk.norm
    layers = []
    for lyr in trunk.layers:
        at, mlp = lyr.self_attn, lyr.mlp
        if type(lyr.input_layernorm).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm"):
            return None
        layers.append(
            (
                (lyr.input_layernorm.weight, lyr.input_layernorm.variance_epsilon),
                _affine(at.q_proj),
                _affine(at.k_proj),
                _affine(at.v_proj),
                _affine(at.o_proj),
                (lyr.post_attention_layernorm.weight, lyr.post_attention_layernorm.variance_epsilon),
                _affine(mlp.gate_proj),
                _affine(mlp.up_proj),
                _affine(mlp.down_proj),
                at.head_dim,
                float(at.scaling),
            )
        )
    norm_w, norm_eps = norm.weight, norm.variance_epsilon
    gqa = cfg.num_attention_heads != getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)

    def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        # LlamaRMSNorm: normalise in fp32, cast back, then scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * xf.to(x.dtype)

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * cos + rotated * sin

    def step(input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        b = input_ids.shape[0]
        h = F.embedding(input_ids, emb)  # (B, 1, E): the rotary module wants a sequence axis
        cos, sin = rotary(h, pos)  # (B, 1, hd) each
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, hd): broadcast over heads
        h = h[:, 0]
        attn_mask = mask[:, None, None, :].bool()
        for i, (ln1, q_proj, k_proj, v_proj, o_proj, ln2, gate, up, down, hd, scale) in enumerate(layers):
            x = rms(h, ln1[0], ln1[1])
            q = q_proj(x).view(b, -1, 1, hd)
            k = k_proj(x).view(b, -1, 1, hd)
            v = v_proj(x).view(b, -1, 1, hd)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            k, v = _append_kv(cache.layers[i], k, v)
            o = _one_query_attention(q, k, v, attn_mask, scale, gqa)
            h = h + o_proj(o.reshape(b, -1))
            x = rms(h, ln2[0], ln2[1])
            h = h + down(F.silu(gate(x)) * up(x))
        return rms(h, norm_w, norm_eps)

    return step
