"""Process supervision for ``fedgate-demo``: start daemons, wait for them, stop them all.

Every child runs in its own session (its own process group), with its output in a log
file, and is asked by the kernel to receive SIGTERM if the demo itself dies
(``PR_SET_PDEATHSIG`` on Linux), so nothing outlives the demo even after a ``kill -9``.
:meth:`Supervisor.stop_all` sends SIGTERM to each group in the order given, waits, and
kills what is left with SIGKILL.

>>> sup = Supervisor()
>>> proc = sup.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], None)
>>> sup.alive("sleeper")
True
>>> sup.stop_all()["sleeper"] == -signal.SIGTERM
True
>>> sup.alive("sleeper")
False
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["Child", "Supervisor", "command", "free_port", "wait_until"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _child_setup() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def command(name: str) -> list[str]:
    """The argv prefix of one of fedgate's commands (``fedgate-sim``, ...).

    The console script next to the running interpreter when it exists (what a deployment
    runs), else ``python -m`` of its module.
    """
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    if found:
        return [found]
    modules = {"fedgate-sim": "fedgate.drivers.sim.cli", "fedgate-server": "fedgate.server.cli",
               "fedgate-agent": "fedgate.agent.cli"}
    return [sys.executable, "-m", modules[name]]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], Any], timeout_s: float, what: str, *, poll_s: float = 0.1,
               check: Callable[[], None] | None = None) -> Any:
    """Poll ``cond`` until it returns something truthy; raise ``TimeoutError`` naming ``what``.

    ``check`` runs on every poll and may raise (e.g. when a child died).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(poll_s)


@dataclass
class Child:
    """One started process."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path | None
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n_lines: int = 15) -> str:
        """The last lines of its log (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n_lines:])


class ChildDied(RuntimeError):
    """A supervised process exited while the demo still needed it."""


class Supervisor:
    """Starts processes and guarantees they are gone when :meth:`stop_all` returns."""

    def __init__(self) -> None:
        self.children: dict[str, Child] = {}
        self._logs: list[IO[bytes]] = []

    def spawn(self, name: str, argv: Sequence[str], log_path: Path | None, *,
              env: dict[str, str] | None = None, stdout_path: Path | None = None) -> Child:
        """Start ``argv`` in its own process group, output to ``log_path`` (or discarded).

        With ``stdout_path`` the standard output goes there and only stderr to the log.
        """
        if name in self.children:
            raise ValueError(f"a process named {name!r} was already started")
        out: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            fh = open(log_path, "ab")  # noqa: SIM115 - closed in stop_all
            self._logs.append(fh)
            out = fh
        err: IO[bytes] | int = subprocess.STDOUT if out is not subprocess.DEVNULL else subprocess.DEVNULL
        if stdout_path is not None:
            err = out
            out = open(stdout_path, "wb")  # noqa: SIM115 - closed in stop_all
            self._logs.append(out)
        full_env = dict(os.environ)
        full_env.update(env or {})
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, preexec_fn=_child_setup, env=full_env,
                                close_fds=True)
        child = Child(name, list(argv), proc, log_path, time.monotonic())
        self.children[name] = child
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return child

    def run(self, name: str, argv: Sequence[str], log_path: Path | None, timeout_s: float = 60.0) -> None:
        """Run ``argv`` to completion; a non-zero exit raises with the end of its output."""
        child = self.spawn(name, argv, log_path)
        try:
            code = child.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._stop([child], 5.0)
            raise TimeoutError(f"{name}: {' '.join(argv)} did not finish within {timeout_s:g} s") from None
        if code != 0:
            raise ChildDied(f"{name} failed (exit {code}): {' '.join(argv)}\n{child.tail()}")

    def alive(self, name: str) -> bool:
        child = self.children.get(name)
        return child is not None and child.proc.poll() is None

    def check_alive(self, names: Sequence[str]) -> None:
        """Raise :class:`ChildDied` (with its last log lines) if one of ``names`` has exited."""
        for name in names:
            child = self.children[name]
            code = child.proc.poll()
            if code is not None:
                raise ChildDied(f"{name} exited with status {code}; last lines of {child.log_path}:\n"
                                f"{child.tail()}")

    def stop(self, names: Sequence[str], timeout_s: float = 10.0) -> dict[str, int | None]:
        """SIGTERM the named processes' groups, wait up to ``timeout_s``, then SIGKILL."""
        return self._stop([self.children[n] for n in names if n in self.children], timeout_s)

    def _stop(self, children: Sequence[Child], timeout_s: float) -> dict[str, int | None]:
        for child in children:
            if child.proc.poll() is None:
                _signal_group(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for child in children:
            try:
                codes[child.name] = child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %g s: killing it", child.name, child.pid, timeout_s)
                _signal_group(child.proc.pid, signal.SIGKILL)
                codes[child.name] = child.proc.wait()
            # whatever the leader left behind in its group goes too
            _signal_group(child.proc.pid, signal.SIGKILL)
        return codes

    def stop_all(self, order: Sequence[Sequence[str]] = (), timeout_s: float = 10.0) -> dict[str, int | None]:
        """Stop everything: first the groups in ``order`` (one batch after the other), then the rest."""
        codes: dict[str, int | None] = {}
        done: set[str] = set()
        for batch in order:
            names = [n for n in batch if n in self.children and n not in done]
            codes.update(self.stop(names, timeout_s))
            done.update(names)
        rest = [n for n in self.children if n not in done]
        codes.update(self.stop(rest, timeout_s))
        for fh in self._logs:
            with contextlib.suppress(OSError):
                fh.close()
        self._logs.clear()
        return codes

    def pids(self) -> dict[str, int]:
        return {name: child.pid for name, child in self.children.items()}


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
