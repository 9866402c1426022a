"""Alias of :mod:`rlchat.core.model` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import model as _m

sys.modules[__name__] = _m
