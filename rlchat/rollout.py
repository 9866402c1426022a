"""Alias of :mod:`rlchat.distributed.rollout` (the module moved; this import path keeps working)."""

import sys

from rlchat.distributed import rollout as _m

sys.modules[__name__] = _m
