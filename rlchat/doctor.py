"""Alias of :mod:`rlchat.cli.doctor` (the module moved; this import path keeps working)."""

import sys

from rlchat.cli import doctor as _m

sys.modules[__name__] = _m
