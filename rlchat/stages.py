"""Alias of :mod:`rlchat.distributed.stages` (the module moved; this import path keeps working)."""

import sys

from rlchat.distributed import stages as _m

sys.modules[__name__] = _m
