"""bf16 matmuls on a CPU from oneDNN's packed weight layout: the generation engine's LM head and, for weights stored
in bf16 (serving), the decode step's projections (:mod:`rlchat.core.fast_decode`).

Why this exists: on a CPU with bf16 units, ``h @ w.t()`` over a bf16 weight goes through a oneDNN matmul that
reorders the weight into its blocked layout on every call. For the head of a real vocabulary (cl100k x 512, 100 MB
in bf16) that reorder is the call: one thread of an AMD EPYC with AVX512-BF16 took 11.6-13.2 ms for one row and
18.7-20.0 ms for 16 rows, against 6.9 and 11.2 ms from a weight packed once (the same values: the same kernel, no
difference in any element). The head is ~half of a serving decode step at that size, so one packed copy kept by the
engine makes a one-row step ~1.3x and a 16-row step ~1.25x faster (``bench/README.md``, "Serve load", sixteenth
session); the trunk's projections, packed as well, another ~1.2x. PyTorch's own CPU compiler (Inductor with
weight freezing) packs linear weights the same way, through the same two operators; PyTorch has no public eager API
for it, hence this small wrapper, which checks the operators exist, checks the packed product against the plain one
once, and otherwise leaves the caller on the plain matmul.

Where it applies: CPUs with bf16 matrix units (AMX-BF16 / AVX512-BF16, :func:`rlchat.model.cpu_has_bf16`), bf16
weights. Elsewhere (fp32, GPUs, CPUs that would emulate bf16) :func:`pack_bf16_weight` returns None. A packed weight
is opaque (oneDNN's layout, ``torch._mkldnn``): it serves this product only and cannot be pickled or viewed.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils.weak import WeakIdKeyDictionary

from rlchat.core.model import cpu_has_bf16
from rlchat.core.weight_stamp import WeightStamp

logger = logging.getLogger(__name__)

PACK_ROWS_HINT = 16
"""Rows the packed layout is tuned for (a full serving batch); 1-32 rows measured within noise of their own hint."""


@functools.cache
def packed_bf16_linear_available() -> bool:
    """Whether this PyTorch and CPU can run the packed bf16 product (oneDNN built in, its two operators present, bf16
    matrix units: without them oneDNN would emulate bf16, slower than the fp32 path)."""
    if not cpu_has_bf16() or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def pack_bf16_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` (out, in), a bf16 CPU tensor, packed for :func:`packed_linear`, or None where that does not apply.

    The first product of the packed weight is checked against the plain one (two rows); a mismatch or an error from
    oneDNN (an unsupported CPU or build) logs a warning and returns None, so the caller keeps the plain matmul.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not packed_bf16_linear_available():
        return None
    w = weight.detach().contiguous()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT)
        probe = torch.linspace(-1.0, 1.0, 2 * w.shape[1], dtype=torch.float32).view(2, -1).to(torch.bfloat16)
        ok = torch.allclose(packed_linear(probe, packed).float(), (probe @ w.t()).float(), rtol=1e-2, atol=1e-2)
    except RuntimeError as e:
        logger.warning("oneDNN packed bf16 matmul unavailable (%s); the plain bf16 matmul is used", e)
        return None
    if not ok:
        logger.warning("oneDNN packed bf16 matmul disagrees with the plain one; the plain bf16 matmul is used")
        return None
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.t() (+ bias)`` (B, out) in bf16 for bf16 rows ``x`` (B, in) and a weight from
    :func:`pack_bf16_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_PACKED = WeakIdKeyDictionary()
"""weight -> (its :class:`~rlchat.core.weight_stamp.WeightStamp`, packed copy): kept beside the weight, not on its
module, since a packed copy is opaque and a module holding one could no longer be deep-copied or pickled; gone with
the weight (keyed by identity: a plain ``WeakKeyDictionary`` compares tensors with ``==``)."""


def kept_packed_weight(weight: torch.Tensor, transpose: bool = False) -> torch.Tensor | None:
    """``weight`` (``weight.t()`` with ``transpose``: GPT-2's ``Conv1D`` stores (in, out)) packed by
    :func:`pack_bf16_weight`, kept while the weight lives and packed again only when it changed
    (:class:`~rlchat.core.weight_stamp.WeightStamp`, 256 samples); None where packing does not apply (not bf16, not
    on a CPU with bf16 units). For weights stored in bf16 (serving's ``GenerationEngine.for_inference``): packing a
    trunk of 8 x 512 takes ~15 ms once."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not packed_bf16_linear_available():
        return None
    kept = _PACKED.get(weight)
    if kept is not None and kept[0].matches(weight):
        return kept[1]
    w = weight.detach()
    packed = pack_bf16_weight(w.t() if transpose else w)
    _PACKED[weight] = (WeightStamp.of(weight, samples=256), packed)
    return packed
