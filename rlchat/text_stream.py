"""Alias of :mod:`rlchat.core.text_stream` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import text_stream as _m

sys.modules[__name__] = _m
