"""Alias of :mod:`rlchat.core.config` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import config as _m

sys.modules[__name__] = _m
