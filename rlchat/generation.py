"""Alias of :mod:`rlchat.core.generation` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import generation as _m

sys.modules[__name__] = _m
