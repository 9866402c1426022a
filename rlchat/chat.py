"""Alias of :mod:`rlchat.cli.chat` (the module moved; this import path keeps working)."""

import sys

from rlchat.cli import chat as _m

sys.modules[__name__] = _m
