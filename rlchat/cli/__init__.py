"""The command-line face of rlchat: ``rlchat <command>`` parses its arguments here and dispatches to a
``module:function`` target; every ``*_command`` lives in this package. Nothing but ``rlchat/__main__.py`` imports it
(an import contract in ``pyproject.toml``)."""

from rlchat.cli.parser import build_parser, config_keys, config_show, main, resolve_path_args

__all__ = ["build_parser", "config_keys", "config_show", "main", "resolve_path_args"]
