"""Alias of :mod:`rlchat.core.console` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import console as _m

sys.modules[__name__] = _m
