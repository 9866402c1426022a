"""Alias of :mod:`rlchat.core.logprobs` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import logprobs as _m

sys.modules[__name__] = _m
