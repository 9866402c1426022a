"""Whether a weight changed since a copy of it was made: one rule for every copy of a weight that is kept across
calls (the generation engine's LM-head copies, :mod:`rlchat.core.packed_linear`'s packed projections).

A weight can change four ways, and a stale copy would decode with the old policy (after a PPO weight sync, or a
Serve version's reload) without any error: replaced by another tensor (the keeper compares identity), updated in
place through autograd's view (an optimizer step, ``load_state_dict``: its version counter moves), given new
storage (``p.data = ...``, ``vector_to_parameters``: a new address), or written through ``p.data``, which no
counter sees: a sample of elements spread over the whole weight differs after any real update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def spread_indices(n: int, k: int) -> torch.Tensor:
    """``min(n, k)`` int64 indices spread evenly over ``range(n)``, first and last included (integer arithmetic: a
    float32 ``linspace`` rounds past ``n - 1`` at a real head's 51M elements)."""
    k = max(1, min(n, k))
    return torch.arange(k, dtype=torch.int64) * (n - 1) // max(1, k - 1)


@dataclass(frozen=True)
class WeightStamp:
    """A weight as it was when a copy of it was made: its version counter, the address and a sample of the part that
    was copied (``view``, e.g. the head's rows up to the vocabulary; the whole weight by default).

    It holds no reference to the weight, so a weak map keyed by the weight can keep a stamp (the keeper checks the
    weight's identity itself)."""

    version: int
    address: int
    probe: torch.Tensor  # flat indices of the sampled elements
    sample: torch.Tensor  # their values when the copy was made

    @classmethod
    def of(cls, weight: torch.Tensor, view: torch.Tensor | None = None, samples: int = 4096) -> WeightStamp:
        """The stamp of ``weight`` now (comparing 4,096 samples of cl100k x 512 takes ~75 us)."""
        part = (weight if view is None else view).detach()
        flat = part.reshape(-1)  # a copy if ``part`` is not contiguous: the address is the part's own, not the copy's
        probe = spread_indices(flat.numel(), samples)
        return cls(weight._version, part.data_ptr(), probe, flat[probe])  # noqa: SLF001 - the in-place counter

    def matches(self, weight: torch.Tensor, view: torch.Tensor | None = None) -> bool:
        """Whether ``weight`` (the same tensor the stamp was taken of) is unchanged since."""
        part = (weight if view is None else view).detach()
        return (
            weight._version == self.version  # noqa: SLF001
            and part.data_ptr() == self.address
            and torch.equal(part.reshape(-1)[self.probe], self.sample)
        )
