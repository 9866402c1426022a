"""Alias of :mod:`rlchat.core.data` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import data as _m

sys.modules[__name__] = _m
