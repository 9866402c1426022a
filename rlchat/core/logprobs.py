"""Log-probs and entropies of chosen tokens from hidden states, without ever holding ``(N, V)`` logits.

Pure torch maths beside :mod:`rlchat.core.ppo`: the learner, the reference pass and evaluation call
:func:`chunked_logprobs` with the trunk's final hidden rows at action positions and the LM head's weight.

Why tiles of the vocabulary. At a real vocabulary (cl100k: 100,277 ids) and a small or medium trunk the LM head
is most of a PPO step's FLOPs, and the softmax around it is most of its memory traffic. The first version cut the
*rows* into 1,024-row chunks: each chunk's fp32 logits were 400 MB, read and written by several elementwise
passes, recomputed in backward, and every chunk's weight gradient was added into a 100 MB ``(V, H)`` buffer --
on a 2-core CPU 80% of an iteration went there (bench/README.md). Here the work is tiled over the *vocabulary*
as well:

- forward: for each block of ``block_v`` vocabulary ids, one ``(rows, block_v)`` logits tile (a few MB, it stays
  in cache) feeds an online log-sum-exp (running max / sum, as flash attention does), the target logits and the
  running ``sum p * z`` of the entropy; only ``(N,)`` vectors survive;
- backward: each tile is recomputed once and turned into its logit gradient in two fused passes
  (``gz = p * (a + b * z)`` with per-row ``a, b``, plus the one-hot term), which feeds the hidden-state gradient
  (accumulated, ``(rows, H)``) and *its own* ``(block_v, H)`` slice of the weight gradient, written once per
  row chunk instead of read-modify-written for every row chunk.

Head matmuls run in ``matmul_dtype`` (bf16 under ``model.precision=auto`` on bf16 hardware) with fp32
log-sum-exp and gradients; a soft-capped head (Gemma 2/3) takes a plain-autograd path (rare in our use).

Gradients (``z`` = tempered logits, ``p = softmax(z)``, ``y`` = target, ``H`` = entropy)::

    d logp_y / dz = onehot(y) - p
    d H / dz      = -p * (log p + H) = -p * (z - lse + H)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlchat.core.errors import ConfigError

BLOCK_V = 4096
"""Vocabulary ids per tile: a ``(1024, 4096)`` fp32 tile is 16 MB, and the matmuls stay large enough to run
near the machine's peak (measured in ``bench/logprobs_kernel.py``)."""


def _tile_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Logits ``(rows, block)`` of (already scaled) hidden rows ``(rows, H)`` under a weight tile ``(block, H)``.

    ``h`` and ``w`` are in the matmul dtype and the result stays in it (bf16: the kernel accumulates in fp32 and
    rounds once): widening a tile costs a full pass over it, while the elementwise ops that follow read bf16 and
    compute in fp32 by type promotion anyway. With a bias the tile is widened to fp32 to add it.
    """
    z = h @ w.t()
    if b is not None:
        z = z.float() + b.float()
    return z


def _row_stats(
    h: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    block_v: int,
    compute_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target logit, log-sum-exp, entropy) of one row chunk, streaming over vocabulary tiles."""
    rows = h.shape[0]
    dev = h.device
    run_max = torch.full((rows,), -math.inf, dtype=torch.float32, device=dev)
    run_sum = torch.zeros(rows, dtype=torch.float32, device=dev)
    run_pz = torch.zeros(rows, dtype=torch.float32, device=dev)  # sum exp(z - run_max) * z
    target_logit = torch.zeros(rows, dtype=torch.float32, device=dev)
    for j0 in range(0, w.shape[0], block_v):
        j1 = min(j0 + block_v, w.shape[0])
        z = _tile_logits(h, w[j0:j1], bias[j0:j1] if bias is not None else None)  # (rows, block)
        hit = (targets >= j0) & (targets < j1)
        if bool(hit.any()):
            idx = hit.nonzero(as_tuple=True)[0]
            target_logit[idx] = z[idx, targets[idx] - j0].float()
        new_max = torch.maximum(run_max, z.amax(dim=1).float())
        rescale = torch.exp(run_max - new_max)  # exp(-inf) = 0 on the first tile
        e = torch.sub(z, new_max[:, None]).exp_()  # fp32 (type promotion), one pass
        run_sum = run_sum * rescale + e.sum(dim=1)
        if compute_entropy:
            run_pz = run_pz * rescale + e.mul_(z).sum(dim=1)
        run_max = new_max
    lse = run_max + torch.log(run_sum)
    entropy = lse - run_pz / run_sum if compute_entropy else torch.zeros_like(lse)
    return target_logit, lse, entropy


class ChunkedLogprobs(torch.autograd.Function):
    """Log-probs of target ids and entropies from hidden rows, tiled over rows and vocabulary (module docstring).

    Forward keeps only ``(N,)`` results (log-probs, log-sum-exp, entropy); backward recomputes each logits tile
    once. Peak extra memory is one ``(chunk_size, block_v)`` tile plus the matmul-dtype copy of the weight, which
    the backward reuses. The logit scale (model scale / temperature) multiplies the hidden rows, not the tiles:
    ``(s h) W^T = s (h W^T)`` costs a pass over ``(rows, H)`` instead of one over every ``(rows, block)`` tile.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        compute_entropy: bool,
        matmul_dtype: torch.dtype | None,
        scale: float,
        block_v: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        dt = matmul_dtype or torch.float32
        w = weight.detach().to(dt)
        b = bias.detach() * scale if bias is not None else None
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for i in range(0, n, chunk_size):
            sl = slice(i, i + chunk_size)
            h = (hidden[sl].detach().float() * scale).to(dt)
            tl, lse, ent = _row_stats(h, w, b, targets[sl], block_v, compute_entropy)
            logprobs[sl], lse_all[sl], entropy[sl] = tl - lse, lse, ent
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all, entropy)
        ctx.cfg = (chunk_size, compute_entropy, matmul_dtype, scale, block_v)
        ctx.w_matmul = w  # reused by backward (freed with the graph; no graph, no copy kept)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, bias, targets, lse_all, entropy = ctx.saved_tensors
        chunk, compute_entropy, matmul_dtype, scale, block_v = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dt = matmul_dtype or torch.float32
        dev = hidden.device
        w = ctx.w_matmul if ctx.w_matmul is not None else weight.detach().to(dt)
        ctx.w_matmul = None
        bs = bias.detach() * scale if bias is not None else None
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None
        g_lp_all = grad_logprobs.float() if grad_logprobs is not None else torch.zeros_like(lse_all)
        use_entropy = compute_entropy and grad_entropy is not None
        for i in range(0, hidden.shape[0], chunk):
            sl = slice(i, i + chunk)
            h = (hidden[sl].detach().float() * scale).to(dt)
            tg, lse, g_lp = targets[sl], lse_all[sl], g_lp_all[sl]
            # d loss / dz = onehot * g_lp - p * g_lp - g_H * p * (z - lse + H) = p * (a + b * z) + onehot * g_lp,
            # with per-row a = -(g_lp + g_H * (H - lse)) and b = -g_H (z: the scaled logits)
            if use_entropy:
                g_h = grad_entropy[sl].float()
                a, b = -(g_lp + g_h * (entropy[sl] - lse)), -g_h
            else:
                a, b = -g_lp, None
            for j0 in range(0, w.shape[0], block_v):
                j1 = min(j0 + block_v, w.shape[0])
                z = _tile_logits(h, w[j0:j1], bs[j0:j1] if bs is not None else None)  # (rows, block)
                p = torch.sub(z, lse[:, None]).exp_()  # fp32
                gz = torch.addcmul(a[:, None], b[:, None], z) if b is not None else a[:, None].expand_as(p)
                gz = p.mul_(gz)  # fp32, in p's storage
                hit = (tg >= j0) & (tg < j1)
                if bool(hit.any()):
                    idx = hit.nonzero(as_tuple=True)[0]
                    gz[idx, tg[idx] - j0] += g_lp[idx]
                if grad_b is not None:
                    grad_b[j0:j1] += gz.sum(0) * scale
                gz_m = gz.to(dt)
                if grad_h is not None:
                    grad_h[sl] += (gz_m @ w[j0:j1]).float()
                if grad_w is not None:
                    grad_w[j0:j1] += (gz_m.t() @ h).float()
            if grad_h is not None and scale != 1.0:
                grad_h[sl] *= scale
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            *([None] * 6),
        )


def chunk_logits(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: float, dtype: torch.dtype | None
) -> torch.Tensor:
    """fp32 logits (c, V) of hidden rows (c, H) under weight (V, H), matmul in ``dtype`` (bf16) when given.

    Differentiable; used where a small block of full logits is wanted (the soft-capped path, evaluation).
    """
    dt = dtype or torch.float32
    z = (h.to(dt) @ w.to(dt).t()).float()
    if b is not None:
        z = z + b.float()
    return z * scale if scale != 1.0 else z


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    compute_entropy: bool = True,
    matmul_dtype: torch.dtype | None = None,
    transform: tuple[float, float] = (1.0, 0.0),
    temperature: float = 1.0,
    block_v: int = BLOCK_V,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` and entropies of the LM head's distributions at ``hidden`` rows.

    The logits are transformed in the generation engine's order: head (+ bias), ``scale``, soft-cap, then
    ``/ temperature``, so log-probs of sampled tokens equal the engine's behaviour log-probs.

    Args:
        hidden: (N, H) final hidden states (after the trunk's last norm).
        weight: (V, H) LM-head weight (possibly tied to the input embedding).
        bias: (V,) LM-head bias or None.
        targets: (N,) int64 token ids.
        chunk_size: rows per chunk; peak extra memory is one ``(chunk_size, block_v)`` fp32 tile.
        compute_entropy: False skips the entropy (returned as zeros).
        matmul_dtype: bf16 to run the head matmul in bf16 (fp32 accumulation and softmax), None for fp32.
        transform: ``(scale, softcap)`` from :func:`rlchat.core.model.logit_transform`.
        temperature: softmax temperature (> 0) applied last; entropy is that of the tempered distribution.
        block_v: vocabulary ids per tile.

    Returns:
        logprobs (N,) and entropy (N,), float32, differentiable w.r.t. ``hidden`` and the head's parameters.

    Raises:
        ConfigError: a temperature that is not positive and finite.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(
            f"temperature={temperature!r}: expected a positive finite softmax temperature (rollout.temperature); "
            "use 1.0 for the model's own distribution"
        )
    scale, softcap = transform
    if softcap <= 0.0:
        # without a soft-cap the temperature folds into the head's scale: still no (N, V) logits kept
        scale = scale / temperature
        return ChunkedLogprobs.apply(
            hidden, weight, bias, targets, chunk_size, compute_entropy, matmul_dtype, scale, block_v
        )
    # Soft-capped logits (Gemma 2/3): plain autograd per row chunk (stores chunk logits; rare in our use); the
    # temperature comes after the cap, as in generation, so it cannot fold into the scale.
    lps, ents = [], []
    for i in range(0, hidden.shape[0], chunk_size):
        z = chunk_logits(hidden[i : i + chunk_size], weight, bias, scale, matmul_dtype)
        z = softcap * torch.tanh(z / softcap)
        if temperature != 1.0:
            z = z / temperature
        logp = torch.log_softmax(z, dim=-1)
        lps.append(logp.gather(1, targets[i : i + chunk_size, None]).squeeze(1))
        ents.append(-(logp.exp() * logp).sum(-1) if compute_entropy else torch.zeros_like(lps[-1]))
    if not lps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(lps), torch.cat(ents)
