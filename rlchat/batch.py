"""Alias of :mod:`rlchat.core.batch` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import batch as _m

sys.modules[__name__] = _m
