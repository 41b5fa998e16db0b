"""The agent's link to the aggregation server (ZeroMQ DEALER, CURVE) on its own thread.

:class:`Uplink` says ``hello``, keeps the link alive with heartbeats, hands each task
to the agent's :class:`~fedgate.agent.uplink_types.TaskHandler` in a worker thread (so
heartbeats go on while it trains), encodes the result with the task's codec, stores it
in the durable :class:`~fedgate.agent.outbox.Outbox` and only then sends it. Results
are re-sent after every reconnect until a ``committed`` for their round arrives; the
server accepts a task's result once, so nothing is lost and nothing counted twice.

The link is one blocking poll loop on a thread of its own (:meth:`Uplink.serve`):
a federated round costs the agent a handful of system calls and no event-loop
machinery, which is what lets one server drive hundreds of gateways per second.
:meth:`Uplink.run` runs that thread for an asyncio caller (the agent daemon).

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
import os
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from fedgate.agent import malloc
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
_TICK_S = 0.25          # longest poll: bounds how late timers are noticed
# socket flags as plain ints: pyzmq's IntFlag members cost an enum construction per operation
_POLLIN, _EVENTS, _NOBLOCK, _SNDMORE = int(zmq.POLLIN), int(zmq.EVENTS), int(zmq.NOBLOCK), int(zmq.SNDMORE)
_STOP_WAIT_S = 30.0     # how long stop waits for a running task to store its result
_HEAP_BLOCK_MIN = 128 * 1024  # models of this many bytes or more make the heap keep their buffers (keep_blocks)
# _WIRE_CRC: the codec's CRC-32 of a received global model is not recomputed (as the server
# does not for updates): the transport guarantees integrity (CURVE's Poly1305 tag, TCP's
# checksum when insecure). It protects payloads at rest: outbox slot files, checkpoints.
_INLINE_MAX_S = 0.05    # a task kind whose last run took less CPU runs on the link thread (see _on_task)
_INF = float("inf")


_SENT = {t: f"sent_{t.value}" for t in MsgType}          # counter names, built once
_RECEIVED = {t: f"received_{t.value}" for t in MsgType}


def _send(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    """Queue one message now or raise ``zmq.Again`` (its parts are queued all or none)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _NOBLOCK | _SNDMORE if i < last else _NOBLOCK, copy=False)


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
        Runs tasks (blocking, in a worker thread) and takes published models (on the
        uplink's thread: ``on_model`` must return quickly).
    software : str
        Reported in ``hello``.
    inline_tasks : bool
        Let a kind of task that proved short (little CPU) run on the link thread, without
        two thread hand-offs. Off for a handler whose tasks wait rather than compute
        (a relay's task waits for a whole local round).
    on_committed : callable(round), optional
        Called on the uplink's thread with each commit notice, after the outbox dropped
        the results it covers; must return quickly.

    Raises
    ------
    SecurityError
        Key files missing, malformed or with a group/world-readable secret.
    StoreError
        The state file cannot be opened.

    Examples
    --------
    ``asyncio.create_task(uplink.run())`` beside the agent's other loops (or
    ``uplink.serve()`` on a thread of one's own), ``uplink.stop()`` from any thread to
    leave, ``uplink.status()`` for the status command.
    """

    def __init__(self, cfg: UplinkConfig, *, agent_name: str, db_path: str | Path,
                 handler: TaskHandler, software: str = SOFTWARE, inline_tasks: bool = True,
                 on_committed: Callable[[int], None] | None = None) -> None:
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
        self._decoded: tuple[memoryview, np.ndarray] | None = None  # a task payload and its decoded params
        self._last_contact_ts: float | None = None
        self._outbox_count = self._outbox.count()
        self._work_s: dict[str, float] = {}  # task kind -> CPU its last run took (decode to stored)
        self._running: dict[str, Future[OutboxEntry]] = {}
        self._done: deque[tuple[Task, Future[OutboxEntry]]] = deque()  # finished on the worker
        self._unsent: deque[OutboxEntry] = deque()  # results the socket had no room for yet
        self._sock: zmq.Socket | None = None
        self._stop_requested = False
        self._executor: ThreadPoolExecutor | None = None
        self._inline_tasks = inline_tasks  # short tasks may run on the link thread
        self._inline_max_s = _INLINE_MAX_S if inline_tasks else -1.0  # (set per session from the heartbeat)
        self._on_committed_hook = on_committed
        self._wake_r, self._wake_w = os.pipe()  # stop() and finished tasks wake the poll loop
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False
        if cfg.insecure:
            log.warning("uplink to %s is INSECURE: no encryption, no server authentication "
                        "(insecure = true in [uplink])", cfg.server)

    # ------------------------------------------------------------------ public API
    async def run(self) -> None:
        """Talk to the server until :meth:`stop`; never raises on network trouble.

        The link runs :meth:`serve` on a thread of its own; this coroutine waits for it.
        Cancelling it asks the link to stop (it still finishes storing running tasks).
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def body() -> None:
            err: BaseException | None = None
            try:
                self.serve()
            except BaseException as exc:  # handed to the awaiting coroutine
                err = exc
            try:
                loop.call_soon_threadsafe(settle, err)
            except RuntimeError:  # the loop is gone: nobody waits any more
                pass

        thread = threading.Thread(target=body, name=f"fedgate-uplink-{self.agent_name}", daemon=True)
        thread.start()
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self.stop()
            raise
        finally:
            if not thread.is_alive() or done.done():
                thread.join(_STOP_WAIT_S)

    def serve(self) -> None:
        """Talk to the server until :meth:`stop` (blocking); never raises on network trouble."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ThreadPoolExecutor-uplink")
        ctx = zmq.Context()
        attempt = 0
        try:
            while not self._stop_requested:
                sock = make_dealer(ctx, self.cfg, self._keys, self._heartbeat_s())
                self._sock = sock
                welcomed = refused = False
                try:
                    welcomed, refused = self._session(sock)
                except (FedgateError, zmq.ZMQError, OSError) as exc:
                    self.counters["session_errors"] += 1
                    log.warning("uplink session to %s failed: %s", self.cfg.server, exc)
                finally:
                    self._sock = None
                    self._registered = False
                    self._unsent.clear()  # they stay in the outbox; re-sent after the next welcome
                    sock.close(linger=LINGER_MS)  # bounded: lets a final bye leave
                if self._stop_requested:
                    break
                attempt = 0 if welcomed else attempt + 1
                delay = self.cfg.reconnect_delay_max_s if refused else self._backoff(attempt)
                self.counters["reconnects"] += 1
                log.info("uplink: reconnecting to %s in %.1fs", self.cfg.server, delay)
                self._sleep(delay)
        finally:
            self._finish_tasks()
            self._executor.shutdown(wait=True, cancel_futures=True)
            ctx.term()
            self._outbox.sync()  # results stored just before stopping: on disk, not only in the OS cache
            self._outbox_count = self._outbox.count()
            log.info("uplink stopped")

    def stop(self) -> None:
        """Ask :meth:`serve` / :meth:`run` to say ``bye`` and return (safe from any thread)."""
        self._stop_requested = True
        self._wake()

    def rejoin(self) -> None:
        """Say ``hello`` again on the current connection (safe from any thread).

        The server then re-sends this agent's pending task of its open round, with the
        same nonce (e.g. after a task failed for a reason that has passed). A message
        arriving before the new ``welcome`` is dropped, as after any reconnect.
        """
        self.counters["rejoins"] += 1
        self._registered = False
        self._wake()

    def close(self) -> None:
        """Release the state file (after :meth:`run` has returned)."""
        self._outbox.close()
        if not self._closed:
            self._closed = True
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def status(self) -> dict[str, Any]:
        """A snapshot for ``fedgate-agent status``: link state, rounds, outbox, counters."""
        try:
            self._outbox_count = self._outbox.count()
        except FedgateError:
            pass
        for _ in range(5):  # the link thread may add a counter while this copies
            try:
                counters = dict(self.counters)
                break
            except RuntimeError:
                continue
        else:
            counters = {}
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
            "counters": counters,
        }

    # ------------------------------------------------------------------ waking and waiting
    def _wake(self) -> None:
        if self._closed:
            return
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # full pipe: the loop is awake anyway
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _sleep(self, delay_s: float) -> None:
        """Wait ``delay_s`` or until :meth:`stop`."""
        deadline = time.monotonic() + delay_s
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if poller.poll(int(left * 1000) + 1):
                self._drain_wake()

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

    def _session_times(self) -> tuple[float, float]:
        """(dead-server time, heartbeat) for the loop, which change only with a welcome; also
        sets the CPU time under which a task runs on the link thread."""
        heartbeat = self._heartbeat_s()
        self._inline_max_s = min(_INLINE_MAX_S, heartbeat / 20) if self._inline_tasks else -1.0
        return self._dead_after_s(), heartbeat

    def _backoff(self, attempt: int) -> float:
        """Exponential back-off with jitter: uniform in [d/2, d], d = base * 2**(attempt-1)."""
        d = min(self.cfg.reconnect_delay_max_s, self.cfg.reconnect_delay_s * 2.0 ** max(0, min(attempt - 1, 30)))
        return random.uniform(d / 2, d)

    def _session(self, sock: zmq.Socket) -> tuple[bool, bool]:
        """One connection's life. Returns (was welcomed, was refused)."""
        now = time.monotonic()
        started = last_rx = now
        next_hello = now
        next_hb = float("inf")
        welcomed = False
        hello: dict[str, Any] | None = None  # asked of the handler once per (re)registration
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        wake_r = self._wake_r
        dead_after, heartbeat = self._session_times()
        while not self._stop_requested:
            now = time.monotonic()
            if not self._registered:
                if welcomed and now - last_rx > dead_after:
                    return self._dead(now - last_rx), False
                if not welcomed and now - started > self.cfg.hello_timeout_s:
                    self.counters["hello_timeouts"] += 1
                    log.info("uplink: no welcome from %s within %.1fs", self.cfg.server, self.cfg.hello_timeout_s)
                    return False, False
                if now >= next_hello:
                    hello = hello or self._hello_fields()
                    sent = self._send_small(sock, MsgType.HELLO, hello)
                    next_hello = now + (max(1.0, heartbeat) if sent else 0.02)
            else:
                if now - last_rx > dead_after:
                    return self._dead(now - last_rx), False
                if now >= next_hb:
                    self._send_small(sock, MsgType.HEARTBEAT, {"agent": self.agent_name})
                    next_hb = now + heartbeat
            due = next_hb if self._registered else next_hello
            timeout_s = min(_TICK_S, max(0.0, due - now))
            if self._unsent:
                poller.modify(sock, zmq.POLLIN | zmq.POLLOUT)
            events = dict(poller.poll(int(timeout_s * 1000) + 1))
            if self._unsent:
                poller.modify(sock, zmq.POLLIN)
            if wake_r in events:
                self._drain_wake()
            if self._done:
                self._collect_done()
            if self._unsent and self._registered:
                self._flush_unsent()
            if sock not in events:
                continue
            while sock.get(_EVENTS) & _POLLIN:  # drain everything queued (no EAGAIN to raise)
                frames = [sock.recv(_NOBLOCK, copy=False)]
                while frames[-1].more:  # the rest of a message is there once its first part is
                    frames.append(sock.recv(_NOBLOCK, copy=False))
                last_rx = time.monotonic()
                self._last_contact_ts = time.time()
                outcome = self._dispatch(frames)
                if outcome == "welcome":
                    welcomed = True
                    dead_after, heartbeat = self._session_times()
                    next_hb = time.monotonic() + heartbeat
                elif outcome == "refuse":
                    return welcomed, True
                elif outcome == "reregister":
                    next_hello = time.monotonic()
                    hello = None
                if self._stop_requested:
                    break
        if self._registered:
            self._collect_done()
            self._send_small(sock, MsgType.BYE, {"agent": self.agent_name})
        return welcomed, False

    def _dead(self, silent_s: float) -> bool:
        self.counters["server_silent"] += 1
        log.warning("uplink: server %s silent for %.1fs; reconnecting", self.cfg.server, silent_s)
        return True

    def _hello_fields(self) -> dict[str, Any]:
        info: HelloInfo = self.handler.hello_info()
        # task_models: this agent takes the global model from its tasks' params (see TaskModels),
        # so the server need not send it a separate ``model`` when a task carries it;
        # quiet_acks: it keeps every result until ``committed`` anyway, so an ack that only
        # says "accepted" is not needed (refusals and duplicates are still acked);
        # task_commits: a commit notice may come in the next task's ``committed`` field
        fields: dict[str, Any] = {"agent": self.agent_name, "software": self.software,
                                  "features": list(info.features), "n_samples": int(info.n_samples),
                                  "task_models": 1, "quiet_acks": 1, "task_commits": 1}
        if self._last_committed is not None:
            fields["last_round"] = self._last_committed
        return fields

    # ------------------------------------------------------------------ sending
    def _send_small(self, sock: zmq.Socket, msg_type: MsgType, fields: dict[str, Any]) -> bool:
        """Send a small message now or not at all (nothing is queued to a missing peer)."""
        frames = protocol.encode(msg_type, fields)
        try:
            _send(sock, frames)
        except zmq.ZMQError as exc:
            self.counters["send_blocked" if isinstance(exc, zmq.Again) else "send_errors"] += 1
            log.debug("uplink: %s not sent: %s", msg_type.value, exc)
            return False
        self._count_out(msg_type, frames)
        return True

    def _count_out(self, msg_type: MsgType, frames: Sequence[Any]) -> None:
        c = self.counters
        c[_SENT[msg_type]] += 1
        c["bytes_out"] += len(frames[0]) + (len(frames[1]) if len(frames) > 1 else 0)

    def _send_result(self, entry: OutboxEntry, *, resend: bool = False) -> bool:
        """Send a stored result on the current connection, if registered.

        A full send queue keeps the result for the next loop turn (the socket is then
        polled for room); it stays in the outbox whatever happens.
        """
        sock = self._sock
        if sock is None or not self._registered:
            return False
        frames = self._encoder.frames(entry)
        try:
            _send(sock, frames)
        except zmq.Again:
            if all(e.task_id != entry.task_id for e in self._unsent):
                self._unsent.append(entry)
            self.counters["result_send_queued"] += 1
            return False
        except zmq.ZMQError as exc:
            self.counters["result_send_failed"] += 1
            log.info("uplink: result of task %s not sent (%s); kept in the outbox", entry.task_id, exc)
            return False
        self._count_out(MsgType.RESULT, frames)
        if resend:
            self.counters["results_resent"] += 1
        return True

    def _flush_unsent(self) -> None:
        while self._unsent:
            entry = self._unsent.popleft()
            if self._outbox.get(entry.task_id) is None:  # committed or rejected meanwhile
                continue
            if not self._send_result(entry):
                break  # _send_result put it back

    def _resend_outbox(self) -> None:
        for entry in self._outbox.pending():
            if entry.task_id in self._running:
                continue
            if not self._send_result(entry, resend=True):
                break

    # ------------------------------------------------------------------ receiving
    def _dispatch(self, frames: list[zmq.Frame]) -> str:
        self.counters["bytes_in"] += sum(map(len, frames))
        try:
            msg = protocol.decode(frames)
        except ProtocolError as exc:
            self.counters["bad_messages"] += 1
            log.warning("uplink: malformed message from %s: %s", self.cfg.server, exc)
            return ""
        mt = msg.type
        self.counters[_RECEIVED[mt]] += 1
        f = msg.fields
        if not self._registered and mt not in (MsgType.WELCOME, MsgType.REFUSE, MsgType.ERROR):
            self.counters["ignored_unregistered"] += 1
            return ""
        if mt is MsgType.TASK:
            self._on_task(f, msg.payload)
        elif mt is MsgType.ACK:
            self._on_ack(f)
        elif mt is MsgType.COMMITTED:
            self._on_committed(int(f["round"]))
        elif mt is MsgType.MODEL:
            self._on_model(f, msg.payload)
        elif mt is MsgType.WELCOME:
            return self._on_welcome(f)
        elif mt is MsgType.REFUSE:
            self._refusal = f
            self._registered = False
            log.error("uplink: server %s refused this agent (%s): %s; missing features: %s",
                      self.cfg.server, f["code"], f["message"], ", ".join(f.get("missing") or []) or "none")
            return "refuse"
        elif mt is MsgType.ERROR:
            self.counters[f"error_{f['code']}"] += 1
            if f["code"] == protocol.ErrorCode.NOT_REGISTERED.value:
                log.info("uplink: server no longer knows this agent (restarted?); registering again")
                self._registered = False
                return "reregister"
            log.warning("uplink: server error %s: %s", f["code"], f["message"])
        elif mt is not MsgType.HEARTBEAT:
            self.counters["unexpected_messages"] += 1
            log.warning("uplink: unexpected %s message from the server", mt.value)
        return ""

    def _on_welcome(self, f: dict[str, Any]) -> str:
        self._welcome = f
        self._refusal = None
        self._registered = True
        self._last_round = int(f["round"])
        self._task_models.reset()
        log.info("uplink: welcome to federation %s at round %d (heartbeat %.1fs)",
                 f["federation"], f["round"], f["heartbeat_s"])
        self._resend_outbox()
        return "welcome"

    def _on_task(self, f: dict[str, Any], payload: memoryview | None) -> None:
        committed = f.get("committed")
        if committed is not None:  # a commit notice riding on the task (task_commits): first
            self._on_committed(committed)
        task = Task.from_fields(f)
        self._last_round = task.round if self._last_round is None else max(self._last_round, task.round)
        if task.task_id in self._running:
            self.counters["tasks_duplicate"] += 1
            return
        stored = self._outbox.get(task.task_id)
        if stored is not None:
            self.counters["tasks_duplicate"] += 1
            self._send_result(stored, resend=True)
            return
        self.counters["tasks_received"] += 1
        decoded: np.ndarray | None = None
        if payload is not None:
            got = self._task_models.from_task(task, payload, self._last_committed)
            if got is not None:  # its round is committed: hand the model over now, decoded once for both
                decoded = self._deliver_model(*got, from_task=True)
        # the memoryview keeps its zmq frame alive; no copy of the global params here
        if self._work_s.get(task.kind, _INF) < self._inline_max_s:
            # this kind of task has proven short: run it here, without two thread hand-offs
            # (a task that turns out long only delays this link's next receive, by far less
            # than the server's dead-agent time; its duration sends the next one to the worker)
            self.counters["tasks_inline"] += 1
            try:
                entry = self._work(task, payload, decoded)
            except Exception as exc:  # the handler's failure must not end the uplink
                self._task_failed(task, exc)
                return
            self._task_done(entry)
            return
        assert self._executor is not None
        fut = self._executor.submit(self._work, task, payload, decoded)
        self._running[task.task_id] = fut
        fut.add_done_callback(lambda fu, t=task: self._task_finished(t, fu))

    def _task_finished(self, task: Task, fut: Future[OutboxEntry]) -> None:
        """Worker thread (or at once): queue the outcome for the link thread and wake it."""
        self._done.append((task, fut))
        self._wake()

    def _collect_done(self) -> None:
        while self._done:
            task, fut = self._done.popleft()
            self._running.pop(task.task_id, None)
            try:
                entry = fut.result()
            except Exception as exc:  # the handler's failure must not end the uplink
                self._task_failed(task, exc)
                continue
            self._task_done(entry)

    def _task_done(self, entry: OutboxEntry) -> None:
        self.counters["tasks_done"] += 1
        self._outbox_count += 1
        self._send_result(entry)

    def _task_failed(self, task: Task, exc: Exception) -> None:
        self.counters["tasks_failed"] += 1
        log.error("uplink: %s task %s of round %d failed: %s", task.kind, task.task_id, task.round, exc)

    def _work(self, task: Task, payload: memoryview | None, decoded: np.ndarray | None = None) -> OutboxEntry:
        """Worker thread: decode the global params, run the handler, encode and store."""
        t0 = time.perf_counter()
        c0 = time.thread_time()
        global_params = decoded
        if payload is not None and decoded is None:
            global_params = self._encoder.decode(payload, check_crc=False)  # see _WIRE_CRC
            if global_params.nbytes >= _HEAP_BLOCK_MIN:  # a large model: its buffers recur every round
                malloc.keep_blocks(global_params.nbytes + 64)
            global_params.flags.writeable = False  # shared with a model handed over later
            self._decoded = (payload, global_params)
        outcome = self.handler.run_task(task, global_params)
        t1 = time.perf_counter()
        entry = self._encoder.store(task, outcome, global_params)
        t2 = time.perf_counter()
        self._work_s[task.kind] = time.thread_time() - c0  # CPU, not wall: a busy host does not count
        c = self.counters
        c["handler_s_total"] += t1 - t0
        c["store_s_total"] += t2 - t1
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
        if self._on_committed_hook is not None:
            self._on_committed_hook(round_)

    def _on_model(self, f: dict[str, Any], payload: memoryview | None) -> None:
        assert payload is not None  # the protocol requires it
        self._task_models.model_message(int(f["round"]))
        self._deliver_model(f, payload)

    def _deliver_model(self, f: dict[str, Any], payload: memoryview, *,
                       from_task: bool = False) -> np.ndarray | None:
        """Decode a global model and hand it to the handler; returns its (read-only) params."""
        if from_task:
            if not self._task_models.newer(int(f["round"])):
                return None
            self.counters["models_from_tasks"] += 1
        try:
            decoded = self._decoded
            if decoded is not None and decoded[0] is payload:  # the worker decoded it already
                params = decoded[1]
            else:
                params = self._encoder.decode(payload, check_crc=False)  # see _WIRE_CRC
                params.flags.writeable = False
            model = GlobalModel(round=int(f["round"]), spec=dict(f["spec"]), features=list(f["features"]),
                                label=str(f["label"]), scaler=f.get("scaler"), params=params)
        except ProtocolError as exc:
            self.counters["bad_messages"] += 1
            log.warning("uplink: model of round %s undecodable: %s", f.get("round"), exc)
            return None
        tm = self._task_models
        tm.delivered = model.round if tm.delivered is None else max(tm.delivered, model.round)
        try:
            self.handler.on_model(model)
        except Exception as exc:  # the handler's failure must not end the uplink
            self.counters["model_handler_errors"] += 1
            log.error("uplink: handler refused the model of round %d: %s", model.round, exc)
            return params
        self.counters["models"] += 1
        return params

    def _finish_tasks(self) -> None:
        """Let running tasks store their results (bounded), then send none of them."""
        if self._running:
            log.info("uplink: waiting for %d running task(s) to store their results", len(self._running))
            deadline = time.monotonic() + _STOP_WAIT_S
            for fut in list(self._running.values()):
                try:
                    fut.result(max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - failures were or will be counted by _collect_done
                    pass
        self._registered = False
        self._collect_done()
