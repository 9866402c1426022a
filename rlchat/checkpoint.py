"""Alias of :mod:`rlchat.core.checkpoint` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import checkpoint as _m

sys.modules[__name__] = _m
