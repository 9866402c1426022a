"""The small exception hierarchy every user-facing failure of rlchat goes through.

Anything a user can cause (bad config, bad data, bad checkpoint) raises one of these with a message that names
where (file:line or config key), what was expected, what was found, and how to fix it. Internal invariants may
still use ``assert``; user input never does, because ``python -O`` strips asserts.
"""

from __future__ import annotations


class RLChatError(Exception):
    """Base class: the CLI prints these as one clean line instead of a traceback."""


class ConfigError(RLChatError, ValueError):
    """A config key is unknown or a value is invalid.

    Args:
        message: what is wrong, what was expected, the fix.
        key: the dotted key at fault, where one is (``load_config`` uses it to point at the file's line or at the
            command-line override that set it).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DataError(RLChatError, ValueError):
    """A data record or file is malformed (message names file:line)."""


class TokenizerError(RLChatError, ValueError):
    """A tokenizer cannot be built or does not match a model / checkpoint."""


class CheckpointError(RLChatError):
    """A checkpoint is missing, corrupt or incompatible with the requested config."""


class RewardError(RLChatError):
    """A reward component failed (bad plugin, non-finite value)."""


class ActionError(RLChatError, ValueError):
    """An action given to an environment is not in its action space (a token id outside the vocabulary, a reply
    longer than the turn budget). A ``ValueError`` too, which is what Gymnasium-style callers expect for a bad
    action."""
