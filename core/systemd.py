"""sd_notify(3) with the standard library: readiness, watchdog, status, stopping.

Without ``NOTIFY_SOCKET`` (not under systemd) every call is a cheap no-op.
"""
from __future__ import annotations

import os
import socket

__all__ = ["notify", "ready", "watchdog_ping", "watchdog_interval_s", "stopping", "reloading", "status"]


def notify(message: str) -> bool:
    """Send one sd_notify message; return True when a socket was there to take it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the daemon's loop: a reader that stopped draining the socket
            # costs one lost notification (EAGAIN), not a wedged process.
            sock.sendto(message.encode("utf-8"), socket.MSG_DONTWAIT, addr)
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    import time

    return notify(f"RELOADING=1\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for (the recommended ping interval)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None
