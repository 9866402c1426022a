"""Fault injection for the fault-tolerance tests: SIGKILL a process during the Nth call of one method.

The seam sits *around* objects, never inside the sampling or update code: :func:`wrap` puts a proxy around a learner
(the rank loop of :mod:`rlchat.distributed.rank_group`, the PPO driver's learner handle) and :func:`actor_class`
subclasses an actor class (:class:`~rlchat.distributed.rollout.RolloutWorker`) so that the armed method is wrapped.
When nothing is armed both return what they were given, so production code pays one dictionary look-up at set-up
and nothing per call.

A fault is armed by environment variables, per role (``RANK`` = a learner rank, ``WORKER`` = a rollout worker,
``DRIVER`` = the PPO driver process), read in the process that dies:

- ``RLCHAT_TEST_<ROLE>_DIE_METHOD``: the method whose call dies (e.g. ``update``, ``save``, ``sample``);
- ``RLCHAT_TEST_<ROLE>_DIE_CALL``: which call of it, counted per process from 1 (default 1);
- ``RLCHAT_TEST_<ROLE>_DIE_<ROLE>``: which rank / worker dies (default 0);
- ``RLCHAT_TEST_<ROLE>_DIE_AFTER_S``: seconds into the call (default 0: as it starts);
- ``RLCHAT_TEST_<ROLE>_DIE_WHEN_EXISTS``: a glob; die once a path matches (e.g. a partial checkpoint's first file);
- ``RLCHAT_TEST_<ROLE>_DIE_AT_REPLY``: ``1`` = let the call finish its work, then die before it returns;
- ``RLCHAT_TEST_<ROLE>_DIE_MARKER`` (required): a file created atomically just before the kill; once it exists the
  fault never fires again, so the process Ray restarts lives and a test sees exactly one death.

A call that returns before its timer or glob fires dies before it replies, so the armed call is always lost.
Drivers forward every ``RLCHAT_TEST_*`` variable to the processes they start (:func:`forwarded_env`).
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from rlchat.core.errors import RLChatError

logger = logging.getLogger(__name__)

T = TypeVar("T")

TEST_ENV_PREFIX = "RLCHAT_TEST_"
"""Every test hook variable starts with it; drivers forward such variables to their workers."""
RANK, WORKER, DRIVER = "RANK", "WORKER", "DRIVER"
"""The roles a fault can be armed for."""


def env_name(role: str, field: str) -> str:
    """The variable of ``field`` (``METHOD``, ``CALL``, ``AFTER_S``, ...; the role itself for the index) for a role."""
    return f"{TEST_ENV_PREFIX}{role}_DIE_{field}"


# The learner-rank names, used by tests/test_learner_faults.py.
DIE_METHOD_ENV = env_name(RANK, "METHOD")
DIE_CALL_ENV = env_name(RANK, "CALL")
DIE_RANK_ENV = env_name(RANK, RANK)
DIE_AFTER_S_ENV = env_name(RANK, "AFTER_S")
DIE_WHEN_EXISTS_ENV = env_name(RANK, "WHEN_EXISTS")
DIE_MARKER_ENV = env_name(RANK, "MARKER")


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's ``RLCHAT_TEST_*`` variables, to pass on to the workers it starts (``runtime_env.env_vars``)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(TEST_ENV_PREFIX)}


class MethodFault:
    """SIGKILL this process during the ``call``-th call of ``method`` (see the module docstring for the timing)."""

    def __init__(
        self,
        method: str,
        call: int,
        after_s: float,
        marker: str,
        when_exists: str = "",
        at_reply: bool = False,
        role: str = RANK,
    ) -> None:
        self.method, self.call, self.after_s, self.marker = method, call, after_s, marker
        self.when_exists, self.at_reply, self.role = when_exists, at_reply, role
        self.calls = 0
        self.armed = False

    def before(self, method: str) -> None:
        """Count a call of ``method``; arm (or fire) when it is the configured one."""
        if method != self.method:
            return
        self.calls += 1
        if self.calls != self.call or os.path.exists(self.marker):
            return
        self.armed = True
        if self.at_reply:
            return
        if self.after_s <= 0 and not self.when_exists:
            self._die(force=True)
        threading.Thread(target=self._watch, name="rlchat-test-fault", daemon=True).start()

    def _watch(self) -> None:
        time.sleep(max(self.after_s, 0.0))
        while self.when_exists and not glob.glob(self.when_exists):
            time.sleep(0.005)
        self._die()

    def after(self, method: str) -> None:
        """The armed call returned (before its timer): die now, before the reply, so the call is always lost."""
        if self.armed and method == self.method:
            self._die(force=True)

    def _die(self, force: bool = False) -> None:
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            if not force:
                return
        logger.warning("test hook %s: SIGKILL in %s() call %d", env_name(self.role, "METHOD"), self.method, self.calls)
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap_call(self, method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with :meth:`before` / :meth:`after` around it."""

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            self.before(method)
            result = fn(*args, **kwargs)
            self.after(method)
            return result

        return call


def fault_from_env(index: int = 0, environ: Mapping[str, str] | None = None, role: str = RANK) -> MethodFault | None:
    """The fault armed for process ``index`` of ``role``, or None (the usual case: nothing is armed).

    Raises:
        RLChatError: a fault is armed without its ``..._DIE_MARKER`` (the restarted process would die again).
    """
    env = os.environ if environ is None else environ
    method = env.get(env_name(role, "METHOD"))
    if not method or int(env.get(env_name(role, role), "0")) != index:
        return None
    marker = env.get(env_name(role, "MARKER"))
    if not marker:
        raise RLChatError(
            f"{env_name(role, 'METHOD')}={method} needs {env_name(role, 'MARKER')}=<file path> so that the restarted "
            "process does not die again; set it (a path in the test's tmp_path)"
        )
    return MethodFault(
        method,
        int(env.get(env_name(role, "CALL"), "1")),
        float(env.get(env_name(role, "AFTER_S"), "0")),
        marker,
        env.get(env_name(role, "WHEN_EXISTS"), ""),
        env.get(env_name(role, "AT_REPLY"), "") == "1",
        role,
    )


class _Faulty:
    """A proxy whose armed method runs inside its fault; every other attribute is the wrapped object's."""

    def __init__(self, target: Any, fault: MethodFault) -> None:
        self._target, self._fault = target, fault

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        return self._fault.wrap_call(name, value) if name == self._fault.method and callable(value) else value


def wrap(target: T, role: str, index: int = 0, environ: Mapping[str, str] | None = None) -> T:
    """``target`` itself, or a proxy around it when a fault is armed for ``role`` / ``index`` in this process."""
    fault = fault_from_env(index, environ, role)
    return target if fault is None else _Faulty(target, fault)  # type: ignore[return-value]


def actor_class(cls: type[T], role: str, index_of: Callable[[Any], int]) -> type[T]:
    """``cls``, or (when the driver's environment arms ``role``) a subclass whose armed method runs in its fault.

    Ray calls actor methods through the class, so the wrapping is a subclass, built on the driver; each actor
    reads its own environment (forwarded by the driver) and its index (``index_of(actor)``) after ``__init__``.
    """
    method = os.environ.get(env_name(role, "METHOD"))
    if not method:
        return cls
    original = getattr(cls, method)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)  # type: ignore[misc]
        self._rlchat_fault = fault_from_env(index_of(self), role=role)

    @functools.wraps(original)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        fault = self._rlchat_fault
        if fault is None:
            return original(self, *args, **kwargs)
        return fault.wrap_call(method, original)(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": init, method: call, "__module__": cls.__module__})
