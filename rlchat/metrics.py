"""Alias of :mod:`rlchat.core.metrics` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import metrics as _m

sys.modules[__name__] = _m
