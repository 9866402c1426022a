"""Alias of :mod:`rlchat.distributed.trainer` (the module moved; this import path keeps working)."""

import sys

from rlchat.distributed import trainer as _m

sys.modules[__name__] = _m
