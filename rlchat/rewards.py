"""Alias of :mod:`rlchat.core.rewards` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import rewards as _m

sys.modules[__name__] = _m
