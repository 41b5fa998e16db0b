"""Who is connected: agent name -> routing id, liveness, what it said at hello."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AgentInfo", "Registry"]


@dataclass
class AgentInfo:
    name: str
    routing_id: bytes
    software: str
    n_samples: int
    last_seen: float
    alive: bool = True


class Registry:
    """Registered agents, by name and by ZeroMQ routing id.

    An agent that reconnects (a new routing id) replaces its old entry; one silent
    for longer than ``dead_after_s`` is marked dead by :meth:`expire` and is no longer
    sampled until it speaks again (a heartbeat revives it, a hello re-registers it).
    """

    def __init__(self) -> None:
        self._by_name: dict[str, AgentInfo] = {}
        self._by_rid: dict[bytes, str] = {}

    def register(self, name: str, routing_id: bytes, *, software: str, n_samples: int, now: float) -> AgentInfo:
        old = self._by_name.get(name)
        if old is not None:
            self._by_rid.pop(old.routing_id, None)
        stale = self._by_rid.pop(routing_id, None)  # this connection spoke for someone else before
        if stale is not None and stale != name:
            self._by_name.pop(stale, None)
        info = AgentInfo(name, routing_id, software, n_samples, now)
        self._by_name[name] = info
        self._by_rid[routing_id] = name
        return info

    def get(self, name: str) -> AgentInfo | None:
        return self._by_name.get(name)

    def by_routing_id(self, routing_id: bytes) -> AgentInfo | None:
        name = self._by_rid.get(routing_id)
        if name is None:
            return None
        info = self._by_name[name]
        return info

    def drop(self, name: str) -> None:
        info = self._by_name.pop(name, None)
        if info is not None:
            self._by_rid.pop(info.routing_id, None)

    def touch(self, info: AgentInfo, now: float) -> None:
        info.last_seen = now
        info.alive = True

    def expire(self, now: float, dead_after_s: float) -> list[str]:
        """Mark agents silent for more than ``dead_after_s`` dead; return their names."""
        dead = []
        for info in self._by_name.values():
            if info.alive and now - info.last_seen > dead_after_s:
                info.alive = False
                dead.append(info.name)
        return dead

    def alive(self) -> list[AgentInfo]:
        return [a for a in sorted(self._by_name.values(), key=lambda a: a.name) if a.alive]

    def alive_names(self) -> list[str]:
        return [a.name for a in self.alive()]

    def n_alive(self) -> int:
        return sum(1 for a in self._by_name.values() if a.alive)

    def names(self) -> list[str]:
        return sorted(self._by_name)
