"""Files written and read the one way: atomic writes that survive a crash, and YAML with line-numbered errors.

Every writer of a file that another process (or a resumed run) reads goes through :func:`atomic_path`: it writes a
temporary sibling, fsyncs it, renames it over the target (atomic within one filesystem) and fsyncs the directory,
so a crash -- even SIGKILL or a power cut -- leaves either the old file or the new one, never half of one. Whole
directories (checkpoints) are published with the same fsync helpers by :mod:`rlchat.core.checkpoint`.

Every YAML file a user writes (configs, Tune search spaces) is read by :func:`load_yaml_mapping`, whose errors name
the file and the line (``configs/demo.yaml:7: invalid YAML (...)``); :func:`yaml_key_lines` maps keys to lines for
the messages of later checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rlchat.core.errors import ConfigError

TMP_GLOB = ".*.tmp-*"
"""Leftovers of an :func:`atomic_path` write that a crash interrupted (safe to delete once their writer is gone)."""


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's (or a directory's) data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the renames inside a directory durable; a no-op where the platform cannot fsync directories."""
    with contextlib.suppress(OSError):
        fsync_path(path)


def temp_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path`` (same directory, so the final rename stays on one filesystem).

    It ends in ``path``'s suffix, so writers that pick a format from the name (matplotlib) still do.
    """
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; when the block succeeds, publish it as ``path`` atomically.

    Steps: write the temporary file (the caller), fsync it, rename it over ``path``, fsync the directory. On an
    exception the temporary file is removed and ``path`` is untouched.

    Example::

        with atomic_path(run_dir / "config.yaml") as tmp:
            tmp.write_text(text, encoding="utf-8")
    """
    final = Path(path)
    tmp = temp_sibling(final)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], data: Any, **dumps: Any) -> Path:
    """Write ``data`` as JSON (``json.dumps(data, **dumps)`` plus a newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, **dumps) + "\n")


def read_key_file(path: str | os.PathLike[str]) -> str:
    """The secret a key file holds: its first non-blank line, stripped ('' when it has none).

    One reading for the server (``serve.api_key_file``) and its clients (``rlchat chat URL --api-key-file``), so a
    file one accepts the other reads the same way (a leading blank line, CRLF, spaces around the key).

    Raises:
        OSError: the file cannot be read.
    """
    lines = Path(path).expanduser().read_text(encoding="utf-8").strip().splitlines()
    return lines[0].strip() if lines else ""


JOB_SCRATCH_NOTE = (
    "is inside the copy of --working-dir that Ray unpacked for this job, which Ray deletes (at the latest when the "
    "cluster stops): use an absolute path on shared storage (docs/cluster.md)"
)
"""What :func:`in_job_working_dir` paths are warned with."""


def in_job_working_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in a Ray job's unpacked working directory
    (``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``), where ``ray job submit
    --working-dir`` runs the command: a relative path typed in such a job names a directory that is deleted."""
    parts = Path(path).expanduser().resolve().parts
    return any(a == "runtime_resources" and b == "working_dir_files" for a, b in zip(parts, parts[1:]))


CHECKOUT = Path(__file__).resolve().parents[2]
"""The directory holding ``rlchat/`` (a source checkout's root, where ``configs/`` and ``tune/spaces/`` are)."""


def load_yaml_mapping(path: str | os.PathLike[str], kind: str, what: str, example: str) -> tuple[dict[str, Any], str]:
    """Read a YAML file whose top level must be a mapping (an empty file is ``{}``).

    Args:
        path: the file.
        kind: what the file is, for the error message ("config file", "search-space file").
        what: what the top level maps, for the error message ("config sections", "dotted config keys to
            distributions").
        example: an existing file to suggest when ``path`` is missing.

    Returns:
        ``(data, text)``: the mapping and the file's text (for :func:`yaml_key_lines`).

    Raises:
        ConfigError: the file is missing or unreadable, the YAML is invalid (``file:line: invalid YAML (...)``),
            or the top level is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        checkout = CHECKOUT / p  # README commands name configs/... from the repository root
        if not p.is_absolute() and checkout.is_file():
            raise ConfigError(
                f"{p}: {kind} not found in the current directory ({Path.cwd()}); the repository's copy is "
                f"{checkout}: pass that path, or run from {CHECKOUT}"
            )
        raise ConfigError(f"{p}: {kind} not found; pass an existing YAML file, e.g. {example}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({e}); pass a UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(p, e, text)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of {what} at the top level, found {type(data).__name__}")
    return data, text


def _yaml_error(path: Path, e: yaml.YAMLError, text: str) -> str:
    """``file:line: invalid YAML (...)`` with the fix. The parser reports where it gave up; for a bracket or quote
    left open to the end of the file that is the last line, so the line where it opened is given instead."""
    problem = str(getattr(e, "problem", None) or e)
    mark, opened = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    context = getattr(e, "context", None) or ""
    if mark is not None:
        line: int | None = mark.line + 1
    elif isinstance(getattr(e, "position", None), int):  # a ReaderError (a control character): no mark
        line = text[: e.position].count("\n") + 1  # type: ignore[attr-defined]
    else:
        line = None
    fix = "check this line and the one above it (a missing ':' or an unclosed quote)"
    detail = problem
    # inside [...], {...} or a quoted string that opened on an earlier line
    inside = ("flow" in context or "quoted" in context) and opened is not None and line and opened.line + 1 < line
    if inside:
        what = context.removeprefix("while parsing ").removeprefix("while scanning ")  # "a flow sequence"
        if "end of stream" in problem or "<stream end>" in problem:
            line, detail = opened.line + 1, f"{what} opened here is not closed: {problem}"
            fix = "close it (a missing ']', '}' or quote)"
        else:
            detail = f"{problem}, inside {what} opened at line {opened.line + 1}"
            fix = "a ',' is missing before this, or that bracket is not closed"
    elif "<stream end>" in problem:
        fix = "something opened above is never closed (a ']', '}' or quote) or a value is missing at the end"
    if "\t" in problem or "'\\t'" in problem:  # PyYAML shows a tab as '\t'
        fix = "indent with spaces: YAML does not allow tabs"
    return f"{path}{f':{line}' if line else ''}: invalid YAML ({detail}); {fix}"


def yaml_key_lines(text: str) -> dict[str, int]:
    """1-based line of every top-level key and of every key one level down (``fixed.rollout.num_workers``)."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if not isinstance(root, yaml.MappingNode):
        return lines
    for k, v in root.value:
        name = str(k.value)
        lines[name] = k.start_mark.line + 1
        if isinstance(v, yaml.MappingNode):
            for k2, _ in v.value:
                lines[f"{name}.{k2.value}"] = k2.start_mark.line + 1
    return lines
