"""Alias of :mod:`rlchat.cli.tokenize_cmd` (the module moved; this import path keeps working)."""

import sys

from rlchat.cli import tokenize_cmd as _m

sys.modules[__name__] = _m
