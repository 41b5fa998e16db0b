"""The server's ZeroMQ side: one ROUTER socket, CURVE + ZAP allow-list, a monitor.

* CURVE server with the secret key from ``server.secret_key`` (mode 0600 enforced);
  ZAP domain ``fedgate`` with ``ZAP_ENFORCE_DOMAIN`` so authentication is never
  silently skipped.
* :class:`~fedgate.server.zap.KeyAuthenticator` (a ``ThreadAuthenticator``, loaded in
  CURVE mode only) admits exactly the public keys
  of ``agents_dir/*.key`` and gives each connection the key file's stem as ZAP
  User-Id; a refused key is logged at WARNING with the peer address. On
  :meth:`Transport.reload_keys` (SIGHUP) the directory is read again; a removed
  agent's next message is refused by the per-message User-Id re-check.
* Limits: ``MAXMSGSIZE`` (a larger frame disconnects the peer before anything is
  allocated), bounded HWMs, ``HANDSHAKE_IVL``, ZMTP heartbeats, bounded ``LINGER``,
  ``ROUTER_MANDATORY`` so a send to a vanished peer fails instead of vanishing.
* A socket monitor counts handshake failures (auth / protocol) and disconnects.
* Model-sized payloads are paced: at most ``send_window_bytes`` of them are handed to
  libzmq at once (with CURVE also at most ``curve_send_bytes_per_s``), the rest wait
  here (see :meth:`Transport.send`).

Frames are received with ``copy=False``: the payload reaches the decoder as a view
on libzmq's buffer. zmq exceptions never leave this module (they become
:class:`~fedgate.core.errors.SecurityError` or a ``False`` return).
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import struct
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from fedgate.core.errors import ConfigError, SecurityError
from fedgate.core.keys import load_keypair, public_keys_in

if TYPE_CHECKING:
    from fedgate.server.zap import KeyAuthenticator

__all__ = ["ZAP_DOMAIN", "Incoming", "Transport", "TransportLimits", "generate_keypair"]

log = logging.getLogger(__name__)

ZAP_DOMAIN = "fedgate"
_MORE = zmq.SNDMORE | zmq.NOBLOCK
_ZERO_COPY_MIN = 65536
_SHARE_MIN = 4096   # a bytes payload this large sent twice is shared by every later send
_SHARED_MAX = 1     # payloads kept shared at once (the current model; libzmq keeps older ones until sent)
_PACE_MIN = 1 << 20  # payloads from this size are paced (model-sized: see Transport.send)
_MIN_LIBZMQ = (4, 3, 2)


@dataclass
class Incoming:
    """One message from a peer.

    ``user_id`` is the ZAP User-Id (the agent name) on a CURVE connection, ``None``
    in insecure mode; ``frames`` are the application frames (``zmq.Frame``).
    """

    routing_id: bytes
    user_id: str | None
    frames: list[Any]
    nbytes: int


@dataclass(frozen=True)
class TransportLimits:
    """Socket limits; ``send_window_bytes``, ``curve_send_bytes_per_s`` and ``send_hold_s``
    pace model-sized sends (:meth:`Transport.send`)."""

    max_message_size: int = 64 * 2**20
    queue_depth: int = 64
    handshake_timeout_s: float = 5.0
    heartbeat_s: float = 5.0
    dead_after_s: float = 15.0
    linger_s: float = 1.0
    send_window_bytes: int = 4 * 2**20
    curve_send_bytes_per_s: float = 1e9
    send_hold_s: float = 0.1


class Transport:
    """The ROUTER socket and everything that guards it.

    Parameters
    ----------
    bind : str
        ``tcp://HOST:PORT`` (port 0 picks a free one; see :attr:`endpoint`).
    secret_key_path, agents_dir : str
        The server's ``.key_secret`` and the allow-list directory (CURVE mode).
    insecure : bool
        No CURVE and no allow-list; the claimed agent name is trusted.
    limits : TransportLimits
    on_event : callable(kind, detail), optional
        Told about ``auth_failed`` / ``handshake_failed`` / ``disconnected`` /
        ``connected`` / ``revoked`` events (metrics hook).
    """

    def __init__(self, bind: str, *, secret_key_path: str = "", agents_dir: str = "", insecure: bool = False,
                 limits: TransportLimits | None = None,
                 on_event: Callable[[str, str], None] | None = None) -> None:
        if zmq.zmq_version_info() < _MIN_LIBZMQ:
            raise SecurityError(f"libzmq {zmq.zmq_version()} is too old (CVE-2019-13132); need >= 4.3.2")
        self.limits = limits or TransportLimits()
        self.insecure = insecure
        self.agents_dir = agents_dir
        self._on_event = on_event or (lambda kind, detail: None)
        self.ctx = zmq.Context()
        self.auth: KeyAuthenticator | None = None  # CURVE mode only (its module loads asyncio)
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.sends_dropped = {"queue_full": 0, "unreachable": 0}  # messages not sent (never blocks)
        self.sends_paced = 0  # messages that waited for the send window
        self._shared: dict[int, tuple[bytes, zmq.Frame]] = {}  # id(payload) -> (payload, its one zmq frame)
        self._last_large: bytes | None = None
        # paced sends: (routing id, frames, paced payload size, held since) in send order
        self._held: collections.deque[tuple[bytes, list[Any], int, float]] = collections.deque()
        self._held_for: dict[bytes, int] = {}  # routing id -> its messages held (later ones queue behind)
        self._in_flight: list[list[int]] = []  # [size] of each paced payload libzmq holds, emptied on release
        self._in_flight_bytes = 0
        self._next_paced = 0.0  # CURVE: no paced payload goes before this (monotonic)
        # a release (on pyzmq's garbage-collector thread) writes a byte here: poll wakes at once
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        try:
            self._open(bind, secret_key_path)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ setup
    def _open(self, bind: str, secret_key_path: str) -> None:
        lim = self.limits
        sock = self.ctx.socket(zmq.ROUTER)
        self.sock = sock
        sock.setsockopt(zmq.LINGER, int(lim.linger_s * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, lim.max_message_size)
        sock.setsockopt(zmq.RCVHWM, lim.queue_depth)
        sock.setsockopt(zmq.SNDHWM, lim.queue_depth)
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(lim.handshake_timeout_s * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(lim.heartbeat_s * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(lim.dead_after_s * 1000)))
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if not self.insecure:
            if not zmq.has("curve"):
                raise SecurityError("this libzmq has no CURVE support")
            from fedgate.server.zap import KeyAuthenticator

            public, secret = load_keypair(secret_key_path)
            self.auth = KeyAuthenticator(self.ctx, on_refused=lambda key, addr: None)
            self.auth.start()
            self._load_keys()
            sock.curve_secretkey = secret.encode("ascii")
            sock.curve_publickey = public.encode("ascii")
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode("ascii")
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        events = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.monitor = sock.get_monitor_socket(events)
        try:
            sock.bind(bind)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind: {exc}", key="server.bind", value=bind) from exc
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)
        log.info("listening on %s (%s, max message %d bytes)", self.endpoint,
                 "INSECURE: no CURVE, no allow-list" if self.insecure else "CURVE with allow-list",
                 lim.max_message_size)

    def _load_keys(self) -> int:
        assert self.auth is not None
        keys = public_keys_in(self.agents_dir)
        self.auth.set_keys(keys)
        return len(keys)

    def reload_keys(self) -> int | None:
        """Re-read the allow-list (SIGHUP); keeps the old one if the directory is broken.

        Returns the number of keys now allowed, or None when nothing was reloaded.
        """
        if self.auth is None:
            return None
        try:
            n = self._load_keys()
        except SecurityError as exc:
            log.error("key reload failed, keeping the previous allow-list: %s", exc)
            return None
        log.info("allow-list reloaded: %d agent keys from %s", n, self.agents_dir)
        return n

    def allowed_names(self) -> frozenset[str] | None:
        """Agent names of the current allow-list (None in insecure mode)."""
        return None if self.auth is None else self.auth.names

    # ------------------------------------------------------------ I/O
    def poll(self, timeout_s: float, max_messages: int = 256) -> Iterator[Incoming]:
        """Wait up to ``timeout_s``, then yield the messages that arrived, one at a time.

        Each message is received only when the previous one was handled, so its
        buffers are released before the next is taken (never raises zmq errors).
        Held sends (:meth:`send`) go out as soon as libzmq releases a paced payload
        (the release wakes the wait) or when they are overdue.
        """
        assert self.sock is not None
        if self._held:
            self._pump()
            if self._held:  # wake up when the oldest is overdue (or, with CURVE, the next may go)
                now = time.monotonic()
                due = self._held[0][3] + self.limits.send_hold_s
                if self._next_paced > now:
                    due = min(due, self._next_paced)
                timeout_s = min(timeout_s, max(0.001, due - now))
        try:
            ready = dict(self.poller.poll(max(0, int(timeout_s * 1000))))
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EINTR:
                return
            raise
        if self._wake_r.fileno() in ready:
            try:
                self._wake_r.recv(4096)
            except OSError:
                pass
            self._reap()
            if self._held:
                self._pump()
        if self.monitor in ready:
            self._drain_monitor()
        if self.sock not in ready:
            return
        names = self.allowed_names()
        recv = self.sock.recv
        for _ in range(max_messages):
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
                frames = [frame]
                nbytes = len(frame)
                while frame.more:  # the rest of a message is already queued (atomic delivery)
                    frame = recv(zmq.NOBLOCK, copy=False)
                    frames.append(frame)
                    nbytes += len(frame)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    return
                raise
            self.bytes_in += nbytes
            rid = frames[0].bytes
            user_id: str | None = None
            if not self.insecure:
                user_id = frames[-1].get("User-Id") or ""
                if names is not None and user_id not in names:
                    log.warning("message from revoked or unknown identity %r refused", user_id)
                    self._on_event("revoked", user_id)
                    user_id = ""
            msg = Incoming(rid, user_id, frames[1:], nbytes)
            del frames
            yield msg
            del msg
            if self._held:
                self._pump()

    def send(self, routing_id: bytes, frames: list[Any]) -> bool:
        """Send one message to a peer without blocking; False if it is gone or its queue is full.

        Small frames are copied (cheaper than a zero-copy frame). A large ``bytes``
        payload (frame 1, never a header) sent a second time (the global model, going to
        every agent) becomes one shared ``zmq.Frame``: every later send hands libzmq a
        reference to the same buffer (no copy, no allocation). Other large frames are sent
        without a copy.

        Model-sized payloads (``bytes`` of at least 1 MiB) are paced: libzmq holds at most
        ``limits.send_window_bytes`` of them at once (always at least one), each sent
        without a copy and tracked until libzmq releases it; the others wait here, in
        order, and go out as the window opens (:meth:`poll` looks), or once they have
        waited ``limits.send_hold_s`` whatever the window. The agents then get their tasks
        one after another rather than all at once, so their results come back spread out
        instead of landing together: the updates waiting in the server's memory are a
        few, not one per agent. On a slow link the hold bounds the delay. With CURVE,
        libzmq releases a payload once it has encrypted it, while the ciphertext (a
        model-sized copy per agent) waits until the agent reads it; so there paced
        payloads also go at most at ``limits.curve_send_bytes_per_s``. A message to a
        peer with a message waiting waits behind it (each peer's messages keep their
        order). A message that waits counts as sent (True); if it cannot be sent when
        its turn comes, it is dropped and counted in ``sends_dropped`` like any other.
        """
        size = _paced_size(frames)
        if self._held:
            self._pump()
        if self._held_for.get(routing_id) or (size and (self._held or not self._window_open(size))):
            self._held.append((routing_id, frames, size, time.monotonic()))
            self._held_for[routing_id] = self._held_for.get(routing_id, 0) + 1
            self.sends_paced += 1
            return True
        return self._send(routing_id, frames, size)

    def _window_open(self, size: int) -> bool:
        """Whether a paced payload of ``size`` bytes may go to libzmq now."""
        self._reap()
        if self._next_paced and time.monotonic() < self._next_paced:
            return False
        return not self._in_flight or self._in_flight_bytes + size <= self.limits.send_window_bytes

    def _reap(self) -> None:
        """Forget the paced payloads libzmq has released."""
        if self._in_flight:
            still = [e for e in self._in_flight if e]
            if len(still) != len(self._in_flight):
                self._in_flight = still
                self._in_flight_bytes = sum(e[0] for e in still)

    def _pump(self) -> None:
        """Send the held messages whose turn has come (in order)."""
        held = self._held
        overdue = time.monotonic() - self.limits.send_hold_s
        while held:
            rid, frames, size, since = held[0]
            if size and since > overdue and not self._window_open(size):
                return
            held.popleft()
            left = self._held_for[rid] - 1
            if left:
                self._held_for[rid] = left
            else:
                del self._held_for[rid]
            self._send(rid, frames, size)

    def _send(self, routing_id: bytes, frames: list[Any], paced: int) -> bool:
        """Hand one message to libzmq (``paced``: the size of its tracked payload, or 0)."""
        sock = self.sock
        assert sock is not None
        last = len(frames) - 1
        nbytes = 0
        try:
            sock.send(routing_id, _MORE)
            for i, frame in enumerate(frames):
                n = len(frame)
                nbytes += n
                flags = zmq.NOBLOCK if i == last else _MORE
                if n < _SHARE_MIN:
                    sock.send(frame, flags)
                elif paced and i == 1:  # tracked: the window opens again when libzmq lets it go
                    sock.send(self._tracked_frame(frame, n), flags, copy=False)
                else:  # a payload (frame 1) may be shared; a header never repeats (its nonce)
                    shared = self._shared_frame(frame) if i and type(frame) is bytes else None
                    if shared is None:
                        sock.send(frame, flags, copy=n < _ZERO_COPY_MIN)
                    else:
                        sock.send(shared, flags, copy=False)
        except zmq.Again:
            self.sends_dropped["queue_full"] += 1
            log.debug("send queue of peer %s full, message dropped", routing_id.hex())
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.sends_dropped["unreachable"] += 1
                log.debug("peer %s is gone, message dropped", routing_id.hex())
                return False
            raise
        self.bytes_out += nbytes
        return True

    def _tracked_frame(self, payload: bytes, size: int) -> zmq.Frame:
        """A zero-copy frame of ``payload`` counted in flight until libzmq releases it.

        pyzmq holds the buffer's object until libzmq is done with it, then drops it on
        its garbage-collector thread; the object here is a memoryview made for this one
        send, so its finalizer marks exactly this send released and wakes :meth:`poll`.
        """
        view = memoryview(payload)
        entry = [size]
        weakref.finalize(view, _released, entry, self._wake_w).atexit = False
        self._in_flight.append(entry)
        self._in_flight_bytes += size
        if not self.insecure:
            self._next_paced = time.monotonic() + size / self.limits.curve_send_bytes_per_s
        return zmq.Frame(view, copy=False)

    def _shared_frame(self, payload: bytes) -> zmq.Frame | None:
        """The shared frame of a payload sent before, or None the first time."""
        entry = self._shared.get(id(payload))
        if entry is not None and entry[0] is payload:
            return entry[1]
        if self._last_large is not payload:
            self._last_large = payload
            return None
        while len(self._shared) >= _SHARED_MAX:  # libzmq keeps an evicted buffer alive until sent
            self._shared.pop(next(iter(self._shared)))
        frame = zmq.Frame(payload, copy=len(payload) < _ZERO_COPY_MIN)  # small: one copy libzmq owns
        self._shared[id(payload)] = (payload, frame)
        return frame

    def _drain_monitor(self) -> None:
        assert self.monitor is not None
        while True:
            try:
                if not self.monitor.poll(0):
                    return
                event = _monitor_event(self.monitor.recv_multipart(zmq.NOBLOCK))
            except (zmq.ZMQError, ValueError):
                return
            kind = event.get("event")
            peer = event.get("endpoint", b"")
            peer = peer.decode("utf-8", "replace") if isinstance(peer, bytes) else str(peer)
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                log.info("handshake from %s refused by ZAP (status %s)", peer, event.get("value"))
                self._on_event("auth_failed", peer)
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                log.warning("handshake from %s failed (protocol error %s)", peer, event.get("value"))
                self._on_event("handshake_failed", peer)
            elif kind == zmq.EVENT_DISCONNECTED:
                log.debug("peer %s disconnected", peer)
                self._on_event("disconnected", peer)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._on_event("connected", peer)

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        """Close the sockets, stop the ZAP thread, terminate the context (bounded by LINGER)."""
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
        if self.monitor is not None:
            self.monitor.close(0)
            self.monitor = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self._shared.clear()
        self._last_large = None
        self._held.clear()
        self._held_for.clear()
        self._in_flight.clear()
        self._in_flight_bytes = 0
        self.ctx.term()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _released(entry: list[int], wake: socket.socket) -> None:
    """libzmq let a paced payload go (any thread): it no longer counts; wake the loop."""
    entry.clear()
    try:
        wake.send(b"\0")
    except OSError:  # the transport is closed, or the wake-up pipe is full (a wake-up is pending)
        pass


def _paced_size(frames: list[Any]) -> int:
    """The size of a message's paced payload (frame 1, ``bytes``, from ``_PACE_MIN``), else 0."""
    if len(frames) > 1 and type(frames[1]) is bytes:
        n = len(frames[1])
        return n if n >= _PACE_MIN else 0
    return 0


def _monitor_event(frames: list[bytes]) -> dict[str, Any]:
    """A socket-monitor message: a 16-bit event id and a 32-bit value, then the peer endpoint."""
    if len(frames) != 2 or len(frames[0]) != 6:
        raise ValueError("not a socket-monitor message")
    kind, value = struct.unpack("=Hi", frames[0])
    return {"event": kind, "value": value, "endpoint": frames[1]}


def generate_keypair(directory: str | os.PathLike[str], name: str) -> tuple[str, str]:
    """Make a CURVE key pair with libzmq and write ``NAME.key`` + 0600 ``NAME.key_secret``."""
    from fedgate.core.keys import write_keypair

    public, secret = zmq.curve_keypair()
    pub_path, sec_path = write_keypair(directory, name, public.decode("ascii"), secret.decode("ascii"))
    return str(pub_path), str(sec_path)
