"""Alias of :mod:`rlchat.core.feedback_store` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import feedback_store as _m

sys.modules[__name__] = _m
