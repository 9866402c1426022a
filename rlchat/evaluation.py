"""Alias of :mod:`rlchat.core.evaluation` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import evaluation as _m

sys.modules[__name__] = _m
