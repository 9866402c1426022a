"""Alias of :mod:`rlchat.cli.feedback_cmd` (the module moved; this import path keeps working)."""

import sys

from rlchat.cli import feedback_cmd as _m

sys.modules[__name__] = _m
