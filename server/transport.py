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

Frames are received with ``copy=False``: the payload reaches the decoder as a view
on libzmq's buffer. zmq exceptions never leave this module (they become
:class:`~fedgate.core.errors.SecurityError` or a ``False`` return).
"""
from __future__ import annotations

import logging
import os
import struct
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
    max_message_size: int = 64 * 2**20
    queue_depth: int = 64
    handshake_timeout_s: float = 5.0
    heartbeat_s: float = 5.0
    dead_after_s: float = 15.0
    linger_s: float = 1.0


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
        self._shared: dict[int, tuple[bytes, zmq.Frame]] = {}  # id(payload) -> (payload, its one zmq frame)
        self._last_large: bytes | None = None
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
        """
        assert self.sock is not None
        try:
            ready = dict(self.poller.poll(max(0, int(timeout_s * 1000))))
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EINTR:
                return
            raise
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

    def send(self, routing_id: bytes, frames: list[Any]) -> bool:
        """Send one message to a peer without blocking; False if it is gone or its queue is full.

        Small frames are copied (cheaper than a zero-copy frame). A large ``bytes``
        payload (frame 1, never a header) sent a second time (the global model, going to
        every agent) becomes one shared ``zmq.Frame``: every later send hands libzmq a
        reference to the same buffer (no copy, no allocation). Other large frames are sent
        without a copy.
        """
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
        self.ctx.term()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
