"""Alias of :mod:`rlchat.core.tokenizer` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import tokenizer as _m

sys.modules[__name__] = _m
