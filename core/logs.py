"""The one place daemons configure logging.

Under systemd (``JOURNAL_STREAM`` set) lines carry ``<N>`` syslog level prefixes
and no timestamps, as journald adds its own; elsewhere ISO timestamps.
Library modules never call this; they only ``logging.getLogger(__name__)``.
"""
from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging", "JournalFormatter"]

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """``<4>fedgate.server.transport: refused key ...``: sd-daemon(3) prefixes."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 4)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def setup_logging(level: str | int = "INFO", *, stream=None, journal: bool | None = None) -> None:
    """Configure the root logger once for a daemon or command."""
    if isinstance(level, str):
        level_no = logging.getLevelName(level.upper())
        if not isinstance(level_no, int):
            level_no = logging.INFO
    else:
        level_no = level
    if journal is None:
        journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(stream or sys.stderr)
    if journal:
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level_no)
