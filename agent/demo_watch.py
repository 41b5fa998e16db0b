"""What ``fedgate-demo`` reads from the running daemons: files and the server's metrics.

The demo never imports the server. It follows the federation through what the daemons
leave on disk and expose: the server's ``history.db`` (rounds and the agents' evaluation
metrics, opened read-only), its Prometheus endpoint (bytes in and out), each agent's
SQLite database (samples stored, the global model's round) and each agent's state file.
Every reader returns an empty answer while a file does not exist yet or is being
written, so callers simply poll.
"""
from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["pick", "read_rounds", "eval_summary", "scrape_bytes", "sample_counts", "model_round", "read_state"]

Metrics = dict[str, Any]


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def pick(metrics: Metrics, *names: str) -> float | None:
    """The first of ``names`` present in ``metrics`` as a finite number."""
    for n in names:
        v = metrics.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def read_rounds(history_db: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """``{(round, kind): {started, finished, n, metrics[, agents]}}`` from the server's history.

    Evaluation rounds also carry ``agents``: ``[(n_samples, metrics), ...]`` as each agent
    reported them.
    """
    if not history_db.exists():
        return {}
    try:
        with contextlib.closing(_ro(history_db)) as conn:
            rows = conn.execute("SELECT round, kind, started, finished, n_accepted, metrics FROM rounds").fetchall()
            evals = conn.execute("SELECT round, n_samples, metrics FROM agent_metrics WHERE kind = 'evaluate'").fetchall()
    except sqlite3.Error:
        return {}
    out = {(r, k): {"started": s, "finished": f, "n": n, "metrics": json.loads(m or "{}")}
           for r, k, s, f, n, m in rows}
    per_round: dict[int, list[tuple[int, Metrics]]] = {}
    for r, n, m in evals:
        per_round.setdefault(int(r), []).append((int(n or 0), json.loads(m or "{}")))
    for r, agents in per_round.items():
        if (r, "evaluate") in out:
            out[(r, "evaluate")]["agents"] = agents
    return out


def eval_summary(agents: list[tuple[int, Metrics]]) -> dict[str, float | None]:
    """F1 and AUC of the global model over the sites whose data hold both classes.

    A site that has never seen a fault has no F1 or AUC worth averaging (its F1 is 0 by
    definition, its AUC undefined), so those come from the other sites, weighted by their
    sample counts; the loss comes from every site.

    >>> eval_summary([(100, {"f1": 0.8, "roc_auc": 0.9, "loss": 0.3}), (100, {"f1": 0.0, "loss": 0.1})])
    {'f1': 0.8, 'auc': 0.9, 'loss': 0.2}
    """
    both = [(n, m) for n, m in agents if pick(m, "roc_auc") is not None]

    def mean(rows: list[tuple[int, Metrics]], key: str) -> float | None:
        vals = [(max(n, 1), pick(m, key)) for n, m in rows]
        vals = [(w, v) for w, v in vals if v is not None]
        if not vals:
            return None
        return sum(w * v for w, v in vals) / sum(w for w, _ in vals)

    return {"f1": mean(both, "f1"), "auc": mean(both, "roc_auc"), "loss": mean(agents, "loss")}


def scrape_bytes(port: int) -> float | None:
    """Bytes the server received plus sent so far, from its Prometheus endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode("utf-8", "replace")
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("fedgate_server_received_bytes_total ", "fedgate_server_sent_bytes_total ")):
            total += float(line.split()[1])
    return total


def sample_counts(db: Path) -> tuple[int, int]:
    """Labelled samples an agent stored, and how many of them have a positive label."""
    if not db.exists():
        return 0, 0
    try:
        with contextlib.closing(_ro(db)) as conn:
            n, pos = conn.execute("SELECT COUNT(*), COALESCE(SUM(y > 0.5), 0) FROM agent_samples "
                                  "WHERE y IS NOT NULL").fetchone()
    except sqlite3.Error:
        return 0, 0
    return int(n), int(pos)


def model_round(db: Path) -> int | None:
    """The round of the global model an agent holds (None before the first arrived)."""
    if not db.exists():
        return None
    try:
        with contextlib.closing(_ro(db)) as conn:
            row = conn.execute("SELECT round FROM agent_model WHERE id = 1").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else int(row[0])


def read_state(path: Path) -> dict[str, Any]:
    """An agent's state file (``data_dir/agent.state.json``), or ``{}``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
