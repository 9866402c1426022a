"""Alias of :mod:`rlchat.core.errors` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import errors as _m

sys.modules[__name__] = _m
