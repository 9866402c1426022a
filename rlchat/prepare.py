"""Alias of :mod:`rlchat.distributed.prepare` (the module moved; this import path keeps working)."""

import sys

from rlchat.distributed import prepare as _m

sys.modules[__name__] = _m
