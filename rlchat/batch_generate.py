"""Alias of :mod:`rlchat.distributed.batch_generate` (the module moved; this import path keeps working)."""

import sys

from rlchat.distributed import batch_generate as _m

sys.modules[__name__] = _m
