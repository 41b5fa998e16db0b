"""The uplink's ZeroMQ DEALER: CURVE keys from files and the protective socket options.

Keys are read once (:func:`load_curve_keys`) and every (re)connection makes a fresh
socket with them (:func:`make_dealer`): after a dead server is detected the old socket
is closed with a bounded linger and a new one replaces it, so no half-open state of
the old connection survives.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import zmq

from fedgate.agent.uplink_types import UplinkConfig
from fedgate.core.errors import SecurityError

__all__ = ["CurveKeys", "load_curve_keys", "make_dealer", "LINGER_MS", "MIN_LIBZMQ"]

log = logging.getLogger(__name__)

LINGER_MS = 1000
MIN_LIBZMQ = (4, 3, 2)
_HWM = 16


@dataclass(frozen=True)
class CurveKeys:
    """Z85 keys of one CURVE client: the server's public key and our key pair."""

    server_public: bytes
    public: bytes
    secret: bytes


def load_curve_keys(cfg: UplinkConfig) -> CurveKeys | None:
    """Read the server's public key and this agent's secret key, or None when insecure.

    Raises
    ------
    SecurityError
        A key file is missing, malformed, or the secret file is group/world readable,
        or libzmq lacks CURVE support.
    """
    if cfg.insecure:
        return None
    if not zmq.has("curve"):
        raise SecurityError("this libzmq has no CURVE support; install a libzmq built with libsodium")
    from fedgate.core.keys import load_keypair, load_public_key

    assert cfg.server_key is not None and cfg.secret_key is not None  # checked by UplinkConfig
    server_public = _as_bytes(load_public_key(Path(cfg.server_key)))
    public, secret = (_as_bytes(k) for k in load_keypair(Path(cfg.secret_key)))
    try:
        derived = zmq.curve_public(secret)
    except zmq.ZMQError as exc:
        raise SecurityError(f"{cfg.secret_key}: not a valid CURVE secret key: {exc}") from exc
    if derived != public:
        raise SecurityError(f"{cfg.secret_key}: public-key does not belong to secret-key")
    return CurveKeys(server_public=server_public, public=public, secret=secret)


def _as_bytes(key: str | bytes) -> bytes:
    return key.encode("ascii") if isinstance(key, str) else bytes(key)


def make_dealer(ctx: zmq.Context, cfg: UplinkConfig, keys: CurveKeys | None,
                heartbeat_s: float) -> zmq.Socket:
    """A DEALER connected to ``cfg.server`` with CURVE (unless ``keys`` is None).

    Options (ops notes 1.7): reconnect interval with exponential back-off, ZMTP
    heartbeats (interval ``heartbeat_s``, timeout/TTL ``cfg.dead_after_s``),
    ``IMMEDIATE`` (nothing queued to an unfinished connection), bounded ``LINGER``,
    ``MAXMSGSIZE`` and small high-water marks.
    """
    sock = ctx.socket(zmq.DEALER)
    try:
        if keys is not None:
            sock.curve_serverkey = keys.server_public
            sock.curve_publickey = keys.public
            sock.curve_secretkey = keys.secret
        hb_ms = max(100, int(heartbeat_s * 1000))
        dead_ms = max(hb_ms, int((cfg.dead_after_s or 3 * heartbeat_s) * 1000))
        for opt, val in (
            (zmq.RECONNECT_IVL, max(10, int(cfg.reconnect_delay_s * 1000))),
            (zmq.RECONNECT_IVL_MAX, max(10, int(cfg.reconnect_delay_max_s * 1000))),
            (zmq.HEARTBEAT_IVL, hb_ms),
            (zmq.HEARTBEAT_TIMEOUT, dead_ms),
            (zmq.HEARTBEAT_TTL, min(dead_ms, 6_553_500)),
            (zmq.HANDSHAKE_IVL, max(1000, int(cfg.hello_timeout_s * 1000))),
            (zmq.CONNECT_TIMEOUT, 10_000),
            (zmq.IMMEDIATE, 1),
            (zmq.LINGER, LINGER_MS),
            (zmq.MAXMSGSIZE, int(cfg.max_message_size)),
            (zmq.SNDHWM, _HWM),
            (zmq.RCVHWM, _HWM),
        ):
            sock.setsockopt(opt, val)
        sock.connect(cfg.server)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise SecurityError(f"cannot set up the uplink socket to {cfg.server}: {exc}") from exc
    return sock
