"""Alias of :mod:`rlchat.core.ppo` (the module moved; this import path keeps working)."""

import sys

from rlchat.core import ppo as _m

sys.modules[__name__] = _m
