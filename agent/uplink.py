"""The agent's link to the aggregation server (asyncio, ZeroMQ DEALER, CURVE).

:class:`Uplink` says ``hello``, keeps the link alive with heartbeats, hands each task
to the agent's :class:`~fedgate.agent.uplink_types.TaskHandler` in a worker thread (so
heartbeats go on while it trains), encodes the result with the task's codec, stores it
in the durable :class:`~fedgate.agent.outbox.Outbox` and only then sends it. Results
are re-sent after every reconnect until a ``committed`` for their round arrives; the
server accepts a task's result once, so nothing is lost and nothing counted twice.

A silent server (no traffic for ``dead_after``) is taken for dead: the socket is closed
and a new one connects after a back-off that doubles up to ``reconnect_delay_max``,
with jitter so a fleet does not reconnect in step. A server that restarted and no
longer knows the agent answers ``not_registered``; the uplink then says ``hello``
again and re-sends its outbox.

>>> from fedgate.core.config import build
>>> cfg = build(UplinkConfig, {"server": "tcp://127.0.0.1:7443", "insecure": True})
>>> cfg.reconnect_delay_s, cfg.reconnect_delay_max_s
(1.0, 60.0)
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from fedgate.agent.outbox import Outbox, OutboxEntry
from fedgate.agent.uplink_socket import LINGER_MS, load_curve_keys, make_dealer
from fedgate.agent.uplink_types import (
    GlobalModel,
    HelloInfo,
    Task,
    TaskHandler,
    TaskOutcome,
    UplinkConfig,
)
from fedgate.agent.uplink_work import ResultEncoder, TaskModels
from fedgate.core import protocol
from fedgate.core.errors import FedgateError, ProtocolError
from fedgate.core.protocol import MsgType

__all__ = ["Uplink", "UplinkConfig", "TaskHandler", "HelloInfo", "Task", "TaskOutcome", "GlobalModel",
           "SOFTWARE"]

log = logging.getLogger(__name__)

SOFTWARE = "fedgate-agent/0.1.0"
_TICK_S = 0.25          # longest poll: bounds how late stop() and timers are noticed
_STOP_WAIT_S = 30.0     # how long stop waits for a running task to store its result


class Uplink:
    """The agent side of the federation protocol.

    Parameters
    ----------
    cfg : UplinkConfig
    agent_name : str
        This agent's name: the stem of its key file in the server's ``agents_dir``.
    db_path : str or Path
        The agent's SQLite state file; the outbox is the table ``uplink_outbox``.
    handler : TaskHandler
        Runs tasks (blocking, in a worker thread) and takes published models.

    Raises
    ------
    SecurityError
        Key files missing, malformed or with a group/world-readable secret.
    StoreError
        The state file cannot be opened.

    Examples
    --------
    ``asyncio.create_task(uplink.run())`` beside the agent's other loops, and
    ``uplink.stop()`` (from any thread) to leave; ``uplink.status()`` for the status
    command.
    """

    def __init__(self, cfg: UplinkConfig, *, agent_name: str, db_path: str | Path,
                 handler: TaskHandler, software: str = SOFTWARE) -> None:
        if not protocol.valid_agent_name(agent_name):
            raise ValueError(f"agent name {agent_name!r} is not valid (letters, digits, '.', '_', '-')")
        self.cfg = cfg
        self.agent_name = agent_name
        self.software = software
        self.handler = handler
        self._keys = load_curve_keys(cfg)
        self._outbox = Outbox(db_path)
        self._encoder = ResultEncoder(agent_name, self._outbox)
        self.counters: Counter[str] = Counter()
        self._registered = False
        self._welcome: dict[str, Any] | None = None
        self._refusal: dict[str, Any] | None = None
        self._last_round: int | None = None
        self._last_committed: int | None = None
        self._task_models = TaskModels()  # global models carried by tasks, handed over once committed
        self._last_contact_ts: float | None = None
        self._outbox_count = self._outbox.count()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._sync: zmq.Socket | None = None  # a blocking-API shadow of _sock for NOBLOCK fast paths
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = False
        self._executor: ThreadPoolExecutor | None = None
        if cfg.insecure:
            log.warning("uplink to %s is INSECURE: no encryption, no server authentication "
                        "(insecure = true in [uplink])", cfg.server)

    # ------------------------------------------------------------------ public API
    async def run(self) -> None:
        """Talk to the server until :meth:`stop`; never raises on network trouble."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ThreadPoolExecutor-uplink")
        ctx = zmq.asyncio.Context()
        attempt = 0
        try:
            while not self._stop_event.is_set():
                sock = make_dealer(ctx, self.cfg, self._keys, self._heartbeat_s())
                self._sock = sock
                self._sync = zmq.Socket.shadow(sock.underlying)
                welcomed = refused = False
                try:
                    welcomed, refused = await self._session(sock)
                except (FedgateError, zmq.ZMQError, OSError) as exc:
                    self.counters["session_errors"] += 1
                    log.warning("uplink session to %s failed: %s", self.cfg.server, exc)
                finally:
                    self._sock = self._sync = None
                    self._registered = False
                    sock.close(linger=LINGER_MS)  # bounded: lets a final bye leave
                if self._stop_event.is_set():
                    break
                attempt = 0 if welcomed else attempt + 1
                delay = self.cfg.reconnect_delay_max_s if refused else self._backoff(attempt)
                self.counters["reconnects"] += 1
                log.info("uplink: reconnecting to %s in %.1fs", self.cfg.server, delay)
                try:
                    await asyncio.wait_for(self._stop_event.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._finish_tasks()
            self._executor.shutdown(wait=True, cancel_futures=True)
            ctx.term()
            self._outbox.sync()  # results stored just before stopping: on disk, not only in the OS cache
            self._outbox_count = self._outbox.count()
            log.info("uplink stopped")

    def stop(self) -> None:
        """Ask :meth:`run` to say ``bye`` and return (safe from any thread)."""
        self._stop_requested = True
        loop, ev = self._loop, self._stop_event
        if loop is None or ev is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            ev.set()
        else:
            loop.call_soon_threadsafe(ev.set)

    def close(self) -> None:
        """Release the state file (after :meth:`run` has returned)."""
        self._outbox.close()

    def status(self) -> dict[str, Any]:
        """A snapshot for ``fedgate-agent status``: link state, rounds, outbox, counters."""
        try:
            self._outbox_count = self._outbox.count()
        except FedgateError:
            pass
        return {
            "server": self.cfg.server,
            "agent": self.agent_name,
            "secure": not self.cfg.insecure,
            "connected": self._registered,
            "federation": None if self._welcome is None else self._welcome.get("federation"),
            "last_round": self._last_round,
            "last_committed_round": self._last_committed,
            "last_contact_ts": self._last_contact_ts,
            "outbox": self._outbox_count,
            "running_tasks": len(self._running),
            "refused": None if self._refusal is None else dict(self._refusal),
            "counters": dict(self.counters),
        }

    # ------------------------------------------------------------------ session
    def _heartbeat_s(self) -> float:
        if self._welcome is not None:
            return min(self.cfg.heartbeat_s, float(self._welcome["heartbeat_s"]))
        return self.cfg.heartbeat_s

    def _dead_after_s(self) -> float:
        base = self.cfg.dead_after_s or 3 * self.cfg.heartbeat_s
        if self._welcome is not None:
            base = max(base, 3 * float(self._welcome["heartbeat_s"]))
        return base

    def _backoff(self, attempt: int) -> float:
        """Exponential back-off with jitter: uniform in [d/2, d], d = base * 2**(attempt-1)."""
        d = min(self.cfg.reconnect_delay_max_s, self.cfg.reconnect_delay_s * 2.0 ** max(0, min(attempt - 1, 30)))
        return random.uniform(d / 2, d)

    async def _session(self, sock: zmq.asyncio.Socket) -> tuple[bool, bool]:
        """One connection's life. Returns (was welcomed, was refused)."""
        assert self._stop_event is not None
        now = time.monotonic()
        started = last_rx = now
        next_hello = now
        next_hb = float("inf")
        welcomed = False
        hello: dict[str, Any] | None = None  # asked of the handler once per (re)registration
        while not self._stop_event.is_set():
            now = time.monotonic()
            if not self._registered:
                if welcomed and now - last_rx > self._dead_after_s():
                    return self._dead(now - last_rx), False
                if not welcomed and now - started > self.cfg.hello_timeout_s:
                    self.counters["hello_timeouts"] += 1
                    log.info("uplink: no welcome from %s within %.1fs", self.cfg.server, self.cfg.hello_timeout_s)
                    return False, False
                if now >= next_hello:
                    hello = hello or self._hello_fields()
                    sent = self._send_nowait(sock, MsgType.HELLO, hello)
                    next_hello = now + (max(1.0, self._heartbeat_s()) if sent else 0.02)
            else:
                if now - last_rx > self._dead_after_s():
                    return self._dead(now - last_rx), False
                if now >= next_hb:
                    self._send_nowait(sock, MsgType.HEARTBEAT, {"agent": self.agent_name})
                    next_hb = now + self._heartbeat_s()
            due = next_hb if self._registered else next_hello
            timeout_s = min(_TICK_S, max(0.0, due - now))
            if not await sock.poll(int(timeout_s * 1000) + 1, zmq.POLLIN):
                continue
            # drain everything queued with cheap non-blocking receives (no future per message)
            sync = self._sync
            assert sync is not None
            while True:
                try:
                    frames = sync.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                last_rx = time.monotonic()
                self._last_contact_ts = time.time()
                outcome = await self._dispatch(sock, frames)
                if outcome == "welcome":
                    welcomed = True
                    next_hb = time.monotonic() + self._heartbeat_s()
                elif outcome == "refuse":
                    return welcomed, True
                elif outcome == "reregister":
                    next_hello = time.monotonic()
                    hello = None
                if self._stop_event.is_set():
                    break
        if self._registered:
            self._send_nowait(sock, MsgType.BYE, {"agent": self.agent_name})
        return welcomed, False

    def _dead(self, silent_s: float) -> bool:
        self.counters["server_silent"] += 1
        log.warning("uplink: server %s silent for %.1fs; reconnecting", self.cfg.server, silent_s)
        return True

    def _hello_fields(self) -> dict[str, Any]:
        info: HelloInfo = self.handler.hello_info()
        # task_models: this agent takes the global model from its tasks' params (see TaskModels),
        # so the server need not send it a separate ``model`` when a task carries it
        fields: dict[str, Any] = {"agent": self.agent_name, "software": self.software,
                                  "features": list(info.features), "n_samples": int(info.n_samples),
                                  "task_models": 1}
        if self._last_committed is not None:
            fields["last_round"] = self._last_committed
        return fields

    # ------------------------------------------------------------------ sending
    def _send_nowait(self, sock: zmq.asyncio.Socket, msg_type: MsgType, fields: dict[str, Any]) -> bool:
        """Send a small message now or not at all (nothing is queued to a missing peer)."""
        frames = protocol.encode(msg_type, fields)
        exc: zmq.ZMQError | None = None
        try:
            (self._sync or zmq.Socket.shadow(sock.underlying)).send_multipart(frames, flags=zmq.NOBLOCK,
                                                                              copy=False)
        except zmq.ZMQError as err:
            exc = err
        if exc is not None:
            self.counters["send_blocked" if isinstance(exc, zmq.Again) else "send_errors"] += 1
            log.debug("uplink: %s not sent: %s", msg_type.value, exc)
            return False
        self._count_out(msg_type, frames)
        return True

    def _count_out(self, msg_type: MsgType, frames: Sequence[Any]) -> None:
        self.counters[f"sent_{msg_type.value}"] += 1
        self.counters["bytes_out"] += sum(len(memoryview(f)) for f in frames)

    async def _send_result(self, entry: OutboxEntry, *, resend: bool = False) -> bool:
        """Send a stored result on the current connection, if registered."""
        sock = self._sock
        if sock is None or not self._registered:
            return False
        frames = protocol.encode(MsgType.RESULT, entry.fields, entry.payload)
        try:
            try:  # fast path: the queue has room
                (self._sync or zmq.Socket.shadow(sock.underlying)).send_multipart(
                    frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                await asyncio.wait_for(sock.send_multipart(frames, copy=False), self._dead_after_s())
        except (asyncio.TimeoutError, zmq.ZMQError) as exc:
            self.counters["result_send_failed"] += 1
            log.info("uplink: result of task %s not sent (%s); kept in the outbox", entry.task_id, exc or "timeout")
            return False
        self._count_out(MsgType.RESULT, frames)
        if resend:
            self.counters["results_resent"] += 1
        return True

    async def _resend_outbox(self) -> None:
        for entry in self._outbox.pending():
            if entry.task_id in self._running:
                continue
            if not await self._send_result(entry, resend=True):
                break

    # ------------------------------------------------------------------ receiving
    async def _dispatch(self, sock: zmq.asyncio.Socket, frames: list[zmq.Frame]) -> str:
        self.counters["bytes_in"] += sum(len(f.buffer) for f in frames)
        try:
            msg = protocol.decode(frames)
        except ProtocolError as exc:
            self.counters["bad_messages"] += 1
            log.warning("uplink: malformed message from %s: %s", self.cfg.server, exc)
            return ""
        self.counters[f"received_{msg.type.value}"] += 1
        f = msg.fields
        if msg.type is MsgType.WELCOME:
            return await self._on_welcome(f)
        if msg.type is MsgType.REFUSE:
            self._refusal = f
            self._registered = False
            log.error("uplink: server %s refused this agent (%s): %s; missing features: %s",
                      self.cfg.server, f["code"], f["message"], ", ".join(f.get("missing") or []) or "none")
            return "refuse"
        if msg.type is MsgType.ERROR:
            self.counters[f"error_{f['code']}"] += 1
            if f["code"] == protocol.ErrorCode.NOT_REGISTERED.value:
                log.info("uplink: server no longer knows this agent (restarted?); registering again")
                self._registered = False
                return "reregister"
            log.warning("uplink: server error %s: %s", f["code"], f["message"])
            return ""
        if not self._registered:
            self.counters["ignored_unregistered"] += 1
            return ""
        if msg.type is MsgType.TASK:
            self._on_task(f, msg.payload)
        elif msg.type is MsgType.ACK:
            self._on_ack(f)
        elif msg.type is MsgType.COMMITTED:
            self._on_committed(int(f["round"]))
        elif msg.type is MsgType.MODEL:
            self._on_model(f, msg.payload)
        elif msg.type is not MsgType.HEARTBEAT:
            self.counters["unexpected_messages"] += 1
            log.warning("uplink: unexpected %s message from the server", msg.type.value)
        return ""

    async def _on_welcome(self, f: dict[str, Any]) -> str:
        self._welcome = f
        self._refusal = None
        self._registered = True
        self._last_round = int(f["round"])
        self._task_models.reset()
        log.info("uplink: welcome to federation %s at round %d (heartbeat %.1fs)",
                 f["federation"], f["round"], f["heartbeat_s"])
        await self._resend_outbox()
        return "welcome"

    def _on_task(self, f: dict[str, Any], payload: memoryview | None) -> None:
        task = Task.from_fields(f)
        self._last_round = task.round if self._last_round is None else max(self._last_round, task.round)
        if task.task_id in self._running:
            self.counters["tasks_duplicate"] += 1
            return
        stored = self._outbox.get(task.task_id)
        if stored is not None:
            self.counters["tasks_duplicate"] += 1
            assert self._loop is not None
            self._loop.create_task(self._send_result(stored, resend=True))
            return
        self.counters["tasks_received"] += 1
        if payload is not None:
            got = self._task_models.from_task(task, payload, self._last_committed)
            if got is not None:
                self._deliver_model(*got, from_task=True)
        # the memoryview keeps its zmq frame alive; no copy of the global params here
        runner = asyncio.get_running_loop().create_task(self._run_task(task, payload))
        self._running[task.task_id] = runner

    async def _run_task(self, task: Task, payload: memoryview | None) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        try:
            entry = await loop.run_in_executor(self._executor, self._work, task, payload)
        except Exception as exc:  # the handler's failure must not end the uplink
            self.counters["tasks_failed"] += 1
            log.error("uplink: %s task %s of round %d failed: %s", task.kind, task.task_id, task.round, exc)
            return
        finally:
            self._running.pop(task.task_id, None)
        self.counters["tasks_done"] += 1
        self._outbox_count += 1
        await self._send_result(entry)

    def _work(self, task: Task, payload: memoryview | None) -> OutboxEntry:
        """Worker thread: decode the global params, run the handler, encode and store."""
        t0 = time.perf_counter()
        global_params = None if payload is None else self._encoder.decode(payload, check_crc=self.cfg.insecure)
        outcome = self.handler.run_task(task, global_params)
        t1 = time.perf_counter()
        entry = self._encoder.store(task, outcome, global_params)
        t2 = time.perf_counter()
        self.counters["handler_s_total"] += t1 - t0
        self.counters["store_s_total"] += t2 - t1
        return entry

    def _on_ack(self, f: dict[str, Any]) -> None:
        status = f["status"]
        self.counters[f"ack_{status}"] += 1
        if status == protocol.AckStatus.REJECTED.value:
            log.warning("uplink: server rejected the result of task %s: %s", f["task_id"], f.get("reason", "-"))
            self._outbox.remove(f["task_id"])

    def _on_committed(self, round_: int) -> None:
        dropped = self._outbox.drop_through(round_)
        self._last_committed = round_ if self._last_committed is None else max(self._last_committed, round_)
        got = self._task_models.committed(self._last_committed)
        if got is not None:
            self._deliver_model(*got, from_task=True)
        self.counters["outbox_dropped_committed"] += dropped
        log.debug("uplink: round %d committed; %d results dropped from the outbox", round_, dropped)

    def _on_model(self, f: dict[str, Any], payload: memoryview | None) -> None:
        assert payload is not None  # the protocol requires it
        self._task_models.model_message(int(f["round"]))
        self._deliver_model(f, payload)

    def _deliver_model(self, f: dict[str, Any], payload: memoryview, *, from_task: bool = False) -> None:
        if from_task:
            if not self._task_models.newer(int(f["round"])):
                return
            self.counters["models_from_tasks"] += 1
        try:
            params = self._encoder.decode(payload, check_crc=self.cfg.insecure)
            model = GlobalModel(round=int(f["round"]), spec=dict(f["spec"]), features=list(f["features"]),
                                label=str(f["label"]), scaler=f.get("scaler"), params=params)
        except ProtocolError as exc:
            self.counters["bad_messages"] += 1
            log.warning("uplink: model of round %s undecodable: %s", f.get("round"), exc)
            return
        tm = self._task_models
        tm.delivered = model.round if tm.delivered is None else max(tm.delivered, model.round)
        try:
            self.handler.on_model(model)
        except Exception as exc:  # the handler's failure must not end the uplink
            self.counters["model_handler_errors"] += 1
            log.error("uplink: handler refused the model of round %d: %s", model.round, exc)
            return
        self.counters["models"] += 1

    async def _finish_tasks(self) -> None:
        if not self._running:
            return
        log.info("uplink: waiting for %d running task(s) to store their results", len(self._running))
        done, pending = await asyncio.wait(list(self._running.values()), timeout=_STOP_WAIT_S)
        for t in pending:
            t.cancel()
