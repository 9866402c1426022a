"""What the user sees in the terminal: rlchat's own lines on the console, everyone else's logs in the run's files.

Ray, Ray Train, Ray Data and transformers write to the process's standard error: start-up banners,
``core_worker.cc`` lines from C++, deprecation warnings, tracebacks of conditions they handle themselves. A user
running ``make demo`` should see rlchat's progress and tables, and nothing else unless something really fails.

How (:func:`quiet_console`): file descriptor 2 -- which C++ code, Python's ``sys.stderr``, ``warnings`` and every
logging handler write to -- is pointed at a log file, and rlchat's own terminal output (progress bars, the one
error line) goes to :func:`console`, a stream on a duplicate of the original standard error. Redirecting the
descriptor, not ``sys.stderr``, is what catches the C++ lines and the lines Ray forwards from its workers.
Standard output is left alone: rlchat prints its progress and tables there.

The log starts in the temp directory and moves to ``RUN_DIR/logs/console.log`` as soon as the command creates
its run directory (:func:`attach_run_dir`, called by :func:`rlchat.core.metrics.make_run_dir`). ``--verbose`` or
``RLCHAT_VERBOSE=1`` turns all of this off.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

LOG_NAME = "console.log"
"""File name of the redirected log inside ``RUN_DIR/logs/``."""


class _State:
    console: TextIO | None = None  # the terminal's error stream, while quiet
    owns_console: bool = False  # console is our own stream on a duplicate of fd 2 (closed on restore)
    saved_fd: int | None = None  # the original fd 2, put back by restore_console()
    log_path: Path | None = None  # where fd 2 goes now
    attached: bool = False  # the log has moved into a run directory


def verbose_requested(flag: bool = False) -> bool:
    """True when ``--verbose`` was given or ``RLCHAT_VERBOSE`` is set to a true value."""
    return flag or os.environ.get("RLCHAT_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def quiet_console(command: str) -> Path:
    """Send standard error (fd 2) to a log file; rlchat's own output keeps the terminal through :func:`console`.

    Args:
        command: the subcommand, used in the temporary log's name.

    Returns:
        The log file's path (it moves when :func:`attach_run_dir` is called).
    """
    if _State.console is not None:
        return _State.log_path  # type: ignore[return-value]
    sys.stderr.flush()
    _State.saved_fd = os.dup(2)
    if _stream_fd(sys.stderr) == 2:  # the process's own stderr: keep a stream on the terminal for rlchat
        _State.console = os.fdopen(os.dup(_State.saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
        _State.owns_console = True
    else:  # sys.stderr was replaced (an embedding program, pytest's capture): rlchat keeps writing there
        _State.console, _State.owns_console = sys.stderr, False
    fd, name = tempfile.mkstemp(prefix=f"rlchat-{command}-", suffix=".log")
    os.dup2(fd, 2)
    os.close(fd)
    _State.log_path = Path(name)
    return _State.log_path


def _stream_fd(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def attach_run_dir(run_dir: Path) -> None:
    """Move the redirected log to ``run_dir/logs/console.log`` (the first run directory of a command wins)."""
    if _State.console is None or _State.attached or _State.log_path is None:
        return
    target = run_dir / "logs" / LOG_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    with open(target, "ab") as dst, open(_State.log_path, "rb") as src:
        shutil.copyfileobj(src, dst)
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    _State.log_path.unlink(missing_ok=True)
    _State.log_path, _State.attached = target, True


def console() -> TextIO:
    """The terminal's error stream: the original standard error while quiet, else ``sys.stderr``."""
    return _State.console if _State.console is not None else sys.stderr


def log_path() -> Path | None:
    """Where the redirected logs are, or None when nothing is redirected."""
    return _State.log_path if _State.console is not None else None


def restore_console() -> None:
    """Point fd 2 back where it was (the CLI calls this on the way out; in-process callers rely on it)."""
    if _State.console is None:
        return
    sys.stderr.flush()
    _State.console.flush()
    if _State.saved_fd is not None:
        os.dup2(_State.saved_fd, 2)
        os.close(_State.saved_fd)
    if _State.owns_console:
        _State.console.close()
    _State.console, _State.owns_console, _State.saved_fd = None, False, None
    _State.log_path, _State.attached = None, False
