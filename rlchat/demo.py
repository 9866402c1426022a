"""Alias of :mod:`rlchat.cli.demo` (the module moved; this import path keeps working)."""

import sys

from rlchat.cli import demo as _m

sys.modules[__name__] = _m
