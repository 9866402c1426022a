"""Alias of :mod:`rlchat.distributed.learner` (the module moved; this import path keeps working)."""

import sys

from rlchat.distributed import learner as _m

sys.modules[__name__] = _m
