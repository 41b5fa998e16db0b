"""The server's ZAP handler: CURVE keys of an allow-list, User-Id = the agent name.

Loaded by :class:`fedgate.server.transport.Transport` in CURVE mode only (pyzmq's
``ThreadAuthenticator`` runs an asyncio loop on its own thread; an insecure server does
not load asyncio at all).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from fedgate.server.transport import ZAP_DOMAIN

__all__ = ["KeyAuthenticator"]

log = logging.getLogger(__name__)


class KeyAuthenticator(ThreadAuthenticator):
    """ZAP handler: CURVE keys of an allow-list, User-Id = the agent name."""

    def __init__(self, context: zmq.Context, on_refused: Callable[[str, str], None] | None = None) -> None:
        super().__init__(context, log=logging.getLogger(__name__ + ".handler"))
        self._names: dict[bytes, str] = {}
        self._address = ""
        self._on_refused = on_refused

    def set_keys(self, keys: dict[str, str]) -> None:
        """Replace the allow-list: ``{agent name: z85 public key}`` (atomic swap)."""
        self._names = {key.encode("ascii"): name for name, key in keys.items()}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._names.values())

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 4:
            self._address = msg[3].decode("utf-8", "replace")
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        z85_key = z85.encode(client_key)
        if domain != ZAP_DOMAIN:
            log.warning("refused connection from %s: ZAP domain %r", self._address, domain)
            return False, b"Unknown domain"
        if z85_key in self._names:
            return True, b"OK"
        key_text = z85_key.decode("ascii", "replace")
        log.warning("refused CURVE key %s from %s: not in the allow-list", key_text, self._address)
        if self._on_refused is not None:
            self._on_refused(key_text, self._address)
        return False, b"Unknown key"

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names.get(z85.encode(client_public_key), "")
