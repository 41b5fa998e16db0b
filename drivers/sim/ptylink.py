"""Pseudo-terminal links: a socat-like null-modem cable and a line writer.

:class:`PtyLink` opens two pty pairs and relays bytes between their masters in a
thread, so whatever one program writes to ``a_path`` another reads from
``b_path`` and back: a serial cable between two processes (a Modbus RTU server on
one end, the driver under test on the other). :func:`open_pty_writer` opens one
pty pair whose master the caller writes lines into, the way a serial sensor
streams readings; the reader opens ``path``.

Both keep their own slave descriptors open, so either end may close and reopen
its side at any time: the pty stays alive, bytes written while nobody listens are
dropped (counted) rather than blocking the writer, like a real line. Both set the
line to raw mode (no echo, no CR/LF translation).

>>> import os
>>> with PtyLink() as link:
...     a = os.open(link.a_path, os.O_RDWR | os.O_NOCTTY)
...     b = os.open(link.b_path, os.O_RDWR | os.O_NOCTTY)
...     _ = os.write(a, b"ping")
...     got = b""
...     while len(got) < 4:
...         got += os.read(b, 16)
...     os.close(a); os.close(b)
>>> got
b'ping'
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import threading
import tty
from types import TracebackType

__all__ = ["PtyLink", "PtyWriter", "open_pty_writer"]

log = logging.getLogger(__name__)

_CHUNK = 4096


class _Pty:
    """One pty pair in raw mode: master fd, our own slave fd, slave path, optional symlink."""

    def __init__(self, link: str | None) -> None:
        self.master, self.slave = os.openpty()
        try:
            tty.setraw(self.slave)
            os.set_blocking(self.master, False)
            self.path = os.ttyname(self.slave)
            self.link = None
            if link is not None:
                _make_symlink(self.path, link)
                self.link = link
        except BaseException:
            os.close(self.master)
            os.close(self.slave)
            raise

    @property
    def name(self) -> str:
        return self.link or self.path

    def close(self) -> None:
        if self.link is not None:
            try:
                if os.path.islink(self.link) and os.readlink(self.link) == self.path:
                    os.unlink(self.link)
            except OSError:
                pass
            self.link = None
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        self.master = self.slave = -1


def _make_symlink(target: str, link: str) -> None:
    """Create (or replace a stale) symlink ``link`` -> ``target``."""
    if os.path.islink(link):
        os.unlink(link)
    elif os.path.exists(link):
        raise FileExistsError(errno.EEXIST, "refusing to replace a file that is not a symlink", link)
    os.symlink(target, link)


class PtyLink:
    """Two pty pairs with a relay thread between their masters (a null-modem cable).

    Parameters
    ----------
    a_link, b_link:
        Optional symlink paths created for ``a_path`` / ``b_path`` (removed on close).

    Attributes
    ----------
    a_path, b_path : str
        The paths the two programs open (the symlinks when given, else ``/dev/pts/N``).
    a_tty, b_tty : str
        The ``/dev/pts/N`` device paths.
    bytes_a_to_b, bytes_b_to_a, dropped_bytes : int
        Relay counters (bytes dropped because the far side's buffer was full).
    """

    def __init__(self, a_link: str | None = None, b_link: str | None = None) -> None:
        self._a_link = a_link
        self._b_link = b_link
        self._a: _Pty | None = None
        self._b: _Pty | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._stop = threading.Event()
        self.bytes_a_to_b = 0
        self.bytes_b_to_a = 0
        self.dropped_bytes = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PtyLink:
        """Open both pty pairs and start relaying; returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("PtyLink already started")
        try:
            self._a = _Pty(self._a_link)
            self._b = _Pty(self._b_link)
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            self._close_fds()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._relay, name=f"fedgate-ptylink-{self._a.path}", daemon=True)
        self._thread.start()
        log.debug("pty link %s <-> %s", self.a_path, self.b_path)
        return self

    def close(self) -> None:
        """Stop the relay thread, close every descriptor and remove the symlinks."""
        if self._thread is not None:
            self._stop.set()
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._thread.join(timeout=10.0)
            self._thread = None
        self._close_fds()

    def __enter__(self) -> PtyLink:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _close_fds(self) -> None:
        for pty_ in (self._a, self._b):
            if pty_ is not None:
                pty_.close()
        self._a = self._b = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------------ paths
    @property
    def a_path(self) -> str:
        """Path of side A (its symlink when one was asked for)."""
        if self._a is None:
            raise RuntimeError("PtyLink not started")
        return self._a.name

    @property
    def b_path(self) -> str:
        """Path of side B (its symlink when one was asked for)."""
        if self._b is None:
            raise RuntimeError("PtyLink not started")
        return self._b.name

    @property
    def a_tty(self) -> str:
        if self._a is None:
            raise RuntimeError("PtyLink not started")
        return self._a.path

    @property
    def b_tty(self) -> str:
        if self._b is None:
            raise RuntimeError("PtyLink not started")
        return self._b.path

    # ------------------------------------------------------------------ relay
    def _relay(self) -> None:
        assert self._a is not None and self._b is not None
        a, b = self._a.master, self._b.master
        sel = selectors.DefaultSelector()
        try:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.data is None:
                        return
                    self._pump(key.fd, key.data, a_to_b=key.fd == a)
        except Exception:  # pragma: no cover - a relay bug must not die silently
            log.exception("pty link relay stopped")
        finally:
            sel.close()

    def _pump(self, src: int, dst: int, *, a_to_b: bool) -> None:
        try:
            data = os.read(src, _CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO cannot happen while we hold the slave, but be safe
            if exc.errno != errno.EIO:
                raise
            return
        sent = _write_all_nonblocking(dst, data)
        self.dropped_bytes += len(data) - sent
        if a_to_b:
            self.bytes_a_to_b += sent
        else:
            self.bytes_b_to_a += sent


def _write_all_nonblocking(fd: int, data: bytes) -> int:
    """Write what fits now; return the number of bytes written (rest is dropped)."""
    view = memoryview(data)
    sent = 0
    while sent < len(view):
        try:
            n = os.write(fd, view[sent:])
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno == errno.EIO:
                break
            raise
        if n <= 0:
            break
        sent += n
    return sent


class PtyWriter:
    """One pty pair; :meth:`write_line` feeds the reader that opened :attr:`path`.

    Lines written while the buffer is full (nobody reading) are dropped and
    counted in :attr:`dropped_lines`, never blocking the writer.
    """

    def __init__(self, link: str | None = None) -> None:
        self._pty: _Pty | None = _Pty(link)
        self._lock = threading.Lock()
        self.lines_written = 0
        self.dropped_lines = 0

    @property
    def path(self) -> str:
        """Path the reader opens (the symlink when one was asked for)."""
        if self._pty is None:
            raise RuntimeError("PtyWriter closed")
        return self._pty.name

    @property
    def tty(self) -> str:
        if self._pty is None:
            raise RuntimeError("PtyWriter closed")
        return self._pty.path

    def write(self, data: bytes) -> int:
        """Write raw bytes; returns how many fitted in the buffer."""
        with self._lock:
            if self._pty is None:
                raise RuntimeError("PtyWriter closed")
            return _write_all_nonblocking(self._pty.master, data)

    def write_line(self, line: str | bytes, terminator: bytes = b"\r\n") -> bool:
        """Write one line plus ``terminator``; False when it was dropped (buffer full)."""
        data = (line.encode("ascii", "replace") if isinstance(line, str) else line) + terminator
        sent = self.write(data)
        if sent == len(data):
            self.lines_written += 1
            return True
        self.dropped_lines += 1
        return False

    def drain_echo(self) -> bytes:
        """Read (and discard) whatever the reader wrote towards the sensor, e.g. poll commands."""
        with self._lock:
            if self._pty is None:
                return b""
            out = b""
            while True:
                try:
                    chunk = os.read(self._pty.master, _CHUNK)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                out += chunk
            return out

    def close(self) -> None:
        with self._lock:
            if self._pty is not None:
                self._pty.close()
                self._pty = None

    def __enter__(self) -> PtyWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_pty_writer(link: str | None = None) -> PtyWriter:
    """Open a pty for a streaming serial sensor; the reader opens ``writer.path``.

    >>> import os
    >>> with open_pty_writer() as w:
    ...     fd = os.open(w.path, os.O_RDONLY | os.O_NOCTTY)
    ...     w.write_line("T=21.5")
    ...     data = b""
    ...     while not data.endswith(b"\\n"):
    ...         data += os.read(fd, 64)
    ...     os.close(fd)
    True
    >>> data
    b'T=21.5\\r\\n'
    """
    return PtyWriter(link)
