"""Alias of :mod:`rlchat.distributed.cluster` (the module moved; this import path keeps working)."""

import sys

from rlchat.distributed import cluster as _m

sys.modules[__name__] = _m
