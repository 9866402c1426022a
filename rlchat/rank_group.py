"""Alias of :mod:`rlchat.distributed.rank_group` (the module moved; this import path keeps working)."""

import sys

from rlchat.distributed import rank_group as _m

sys.modules[__name__] = _m
