"""The gateway daemon: acquisition -> sampler -> store -> predictor, uplink beside it.

Start-up does only what readiness needs (config, store, the persisted model), then
tells systemd ``READY=1`` and brings up the devices, the uplink and the metrics
endpoint. The main loop stores new samples, scores new
windows and pings the watchdog, so a wedged loop gets the process restarted. It
wakes when a window or a label is due (every ``hop``), and closes the grid points in
between in one vectorised step.

Signals: SIGTERM/SIGINT stop (the uplink finishes or keeps its results in the
outbox, every sample is already committed); SIGHUP reloads the config, keeping the
running one when the new one is invalid.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from fedgate.agent.config import AgentConfig, load_agent_config
from fedgate.agent.predictor import Predictor
from fedgate.agent.sampler import Sampler
from fedgate.agent.store import Store
from fedgate.agent.trainer import Trainer
from fedgate.core import systemd
from fedgate.core.errors import ConfigError, FedgateError, SecurityError, StoreError
from fedgate.core.logs import setup_logging

__all__ = ["AgentService", "run_agent", "check_keys"]

log = logging.getLogger(__name__)

STATE_EVERY_S = 2.0
STOP_TIMEOUT_S = 8.0
VERSION = "0.1.0"


class AgentService:
    """One running agent. ``await run()`` returns the process exit status."""

    def __init__(self, config_path: str | os.PathLike[str]) -> None:
        self.config_path = str(config_path)
        self.cfg: AgentConfig | None = None
        self.store: Store | None = None
        self.sampler: Sampler | None = None
        self.predictor: Predictor | None = None
        self.trainer: Trainer | None = None
        self.acquisition: Any = None
        self.uplink: Any = None
        self._uplink_task: asyncio.Task[None] | None = None
        self._predict_task: asyncio.Task[Any] | None = None
        self._metrics_server: Any = None
        self._metrics_thread: Any = None
        self.metrics_port: int | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the daemon's loop, set by run()
        self._reload_requested = False
        self.started_ts = time.time()
        self.counters: dict[str, int] = {"reloads_ok": 0, "reloads_failed": 0, "predictions_skipped": 0,
                                         "store_errors": 0, "loop_iterations": 0}
        self._rows_cache = {"rows_written": 0, "rows_dropped": 0}
        self._last_state = 0.0

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        try:
            self.cfg = load_agent_config(self.config_path)
            check_keys(self.cfg)
        except (ConfigError, SecurityError) as exc:
            log.error("%s", exc)
            return 2
        setup_logging(self.cfg.agent.log_level.value.upper())
        try:
            self.store = Store(self.cfg.agent.db_path, max_rows=self.cfg.store.max_rows,
                               max_age_s=self.cfg.store.max_age_s)
            self._rows_cache = self.store.counters()
        except StoreError as exc:
            log.error("%s", exc)
            return 3
        self._build_pipeline(self.cfg)
        self._install_signals()
        systemd.ready(f"{self.store.count()} samples stored; connecting devices")
        log.info("agent %s ready: %d samples stored, model %s, database %s", self.cfg.agent.name,
                 self.store.count(), self.predictor.state.model_round if self.predictor else None,
                 self.cfg.agent.db_path)
        try:
            self._start_metrics(self.cfg)
            await self._start_acquisition(self.cfg)
            self._start_uplink(self.cfg)
            await self._main_loop()
        finally:
            await self._shutdown()
        return 0

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def _global_model(self, model: Any) -> None:
        """A new global model, persisted by the trainer on the uplink's thread: the predictor
        switches to it on the event loop, between two predictions, never during one."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # stopping: the model is persisted and is loaded at the next start
        try:
            loop.call_soon_threadsafe(lambda: self.predictor is not None and self.predictor.set_model(model))
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _build_pipeline(self, cfg: AgentConfig) -> None:
        assert self.store is not None
        self.sampler = Sampler(cfg.samples)
        self.predictor = Predictor(cfg.predict, cfg.samples.feature_names, write=self._write_tag)
        self.trainer = Trainer(self.store, cfg.samples, on_global_model=self._global_model)
        try:
            stored = self.store.load_model()
        except StoreError as exc:
            log.error("the persisted model is unreadable, waiting for the next one: %s", exc)
            stored = None
        if stored is not None:
            self.predictor.set_model(stored)
            self.trainer.state.model_round = stored.round
            self.trainer.state.model_ts = stored.saved_ts

    async def _write_tag(self, tag: str, value: Any) -> None:
        if self.acquisition is None:
            raise FedgateError("acquisition is not running")
        await self.acquisition.write(tag, value)

    def _on_values(self, values: list[Any]) -> None:
        if self.sampler is not None:
            self.sampler.feed(values)

    async def _start_acquisition(self, cfg: AgentConfig) -> None:
        from fedgate.drivers import Acquisition

        self.acquisition = Acquisition(cfg.drivers, on_values=self._on_values)
        await self.acquisition.start()

    def _start_uplink(self, cfg: AgentConfig) -> None:
        if cfg.uplink is None:
            log.warning("no [uplink] section: this agent samples and predicts but does not federate")
            return
        from fedgate.agent.uplink import Uplink

        assert self.trainer is not None
        try:
            self.uplink = Uplink(cfg.uplink, agent_name=cfg.agent.name, db_path=cfg.agent.db_path,
                                 handler=self.trainer)
        except (FedgateError, ValueError) as exc:
            log.error("cannot start the uplink, running offline: %s", exc)
            return
        self._uplink_task = asyncio.create_task(self.uplink.run(), name="fedgate-uplink")

    async def _stop_uplink(self) -> None:
        if self.uplink is None:
            return
        self.uplink.stop()
        if self._uplink_task is not None:
            try:
                await asyncio.wait_for(self._uplink_task, STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("uplink did not stop in %.0fs; cancelling it", STOP_TIMEOUT_S)
                self._uplink_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._uplink_task
            except Exception as exc:  # the uplink must never take the daemon down
                log.error("uplink ended with an error: %s", exc)
        self.uplink, self._uplink_task = None, None

    def _start_metrics(self, cfg: AgentConfig) -> None:
        hp = cfg.metrics.host_port()
        if hp is None:
            return
        from fedgate.agent.metrics import start_metrics_server

        try:
            self._metrics_server, self._metrics_thread = start_metrics_server(self, hp[0], hp[1])
            self.metrics_port = int(self._metrics_server.server_port)
            log.info("metrics on http://%s:%d/metrics", hp[0], self.metrics_port)
        except OSError as exc:
            log.error("cannot serve metrics on %s: %s (continuing without)", cfg.metrics.address, exc)

    async def _shutdown(self) -> None:
        systemd.stopping()
        log.info("stopping")
        await self._stop_uplink()
        if self._predict_task is not None and not self._predict_task.done():
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(self._predict_task, 2.0)
        if self.acquisition is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.acquisition.stop(), STOP_TIMEOUT_S)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            if self._metrics_thread is not None:
                self._metrics_thread.join(5)
        self._write_state(stopped=True)
        if self.store is not None:
            self.store.close()
        log.info("stopped")

    # ------------------------------------------------------------------ main loop
    async def _main_loop(self) -> None:
        wd = systemd.watchdog_interval_s()
        while not self._stop.is_set():
            assert self.sampler is not None
            now = time.time()
            wake_at = min(self.sampler.next_due_s(), self._last_state + STATE_EVERY_S)
            delay = max(0.0, min(wake_at - now, wd if wd is not None else 1.0, 1.0))
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            if self._stop.is_set():
                break
            if self._reload_requested:
                self._reload_requested = False
                await self._reload()
            self._step()
            if wd is not None:  # only when systemd asked for it (WATCHDOG_USEC)
                systemd.watchdog_ping()
            self.counters["loop_iterations"] += 1
            if time.time() - self._last_state >= STATE_EVERY_S:
                self._write_state()

    def _step(self) -> None:
        """Close due grid points: store samples, score windows."""
        assert self.sampler is not None and self.store is not None and self.cfg is not None
        windows, samples = self.sampler.advance(time.time())
        if samples:
            try:
                self.store.add_samples(samples, self.cfg.samples.feature_names)
                self._rows_cache = self.store.counters()
            except StoreError as exc:
                self.counters["store_errors"] += 1
                log.error("storing %d samples failed: %s", len(samples), exc)
        if windows and self.predictor is not None:
            last = windows[-1]  # after a stall only the newest window matters for live prediction
            self.counters["predictions_skipped"] += len(windows) - 1
            if self._predict_task is not None and not self._predict_task.done():
                self.counters["predictions_skipped"] += 1
            else:
                self._predict_task = asyncio.create_task(self.predictor.handle(last.t_end, last.features))
                self._predict_task.add_done_callback(self._predict_done)

    def _predict_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.counters["prediction_failures"] = self.counters.get("prediction_failures", 0) + 1
            log.error("prediction failed: %s", task.exception())

    # ------------------------------------------------------------------ reload
    async def _reload(self) -> None:
        systemd.reloading()
        old = self.cfg
        assert old is not None and self.store is not None
        try:
            new = load_agent_config(self.config_path)
            check_keys(new)
        except (ConfigError, SecurityError) as exc:
            self.counters["reloads_failed"] += 1
            log.error("reload refused, the running configuration stays: %s", exc)
            systemd.ready("reload refused; running configuration kept")
            return
        for key, a, b in (("agent.data_dir", new.agent.data_dir, old.agent.data_dir),
                          ("metrics.address", new.metrics.address, old.metrics.address)):
            if a != b:
                log.warning("%s changed; it takes effect at the next restart", key)
        setup_logging(new.agent.log_level.value.upper())
        self.store.max_rows, self.store.max_age_s = new.store.max_rows, new.store.max_age_s
        if new.samples != old.samples:
            log.info("samples section changed: the sampler starts afresh")
            self.sampler = Sampler(new.samples)
            assert self.trainer is not None
            self.trainer.reconfigure(new.samples)
        assert self.predictor is not None
        self.predictor.reconfigure(new.predict, new.samples.feature_names)
        if new.drivers != old.drivers:
            log.info("devices changed: restarting acquisition")
            if self.acquisition is not None:
                await self.acquisition.stop()
            await self._start_acquisition(new)
        if new.uplink != old.uplink or new.agent.name != old.agent.name:
            log.info("uplink changed: reconnecting")
            await self._stop_uplink()
            self._start_uplink(new)
        self.cfg = new
        self.counters["reloads_ok"] += 1
        log.info("configuration reloaded from %s", self.config_path)
        systemd.ready("configuration reloaded")

    # ------------------------------------------------------------------ state file
    def snapshot(self) -> dict[str, Any]:
        """Everything ``fedgate-agent status`` and the metrics show."""
        cfg, store, pred, tr = self.cfg, self.store, self.predictor, self.trainer
        assert cfg is not None and store is not None and pred is not None and tr is not None
        sampler = self.sampler
        devices: dict[str, Any] = {}
        if self.acquisition is not None:
            devices = {name: (st.to_dict() if hasattr(st, "to_dict") else st)
                       for name, st in self.acquisition.status().items()}
        uplink: dict[str, Any] | None = None
        if self.uplink is not None:
            try:
                uplink = self.uplink.status()
            except Exception as exc:  # a status snapshot must not fail the loop
                uplink = {"error": str(exc)}
        ps = pred.state
        return {
            "agent": cfg.agent.name,
            "version": VERSION,
            "pid": os.getpid(),
            "config": self.config_path,
            "database": str(cfg.agent.db_path),
            "started_ts": self.started_ts,
            "updated_ts": time.time(),
            "metrics_port": self.metrics_port,
            "samples": {"stored": store.count(), **self._rows_cache,
                        "pending_windows": sampler.pending if sampler else 0,
                        "sampler": dict(sampler.counters) if sampler else {}},
            "federation": {"last_round": tr.state.last_round, "last_kind": tr.state.last_kind,
                           "last_task_ts": tr.state.last_task_ts, "last_metrics": tr.state.last_metrics,
                           "tasks_done": tr.state.tasks_done, "tasks_failed": tr.state.tasks_failed,
                           "model_round": tr.state.model_round, "model_ts": tr.state.model_ts},
            "prediction": {"score": ps.score, "ts": ps.ts, "alarm": ps.alarm, "model_round": ps.model_round,
                           "predictions": ps.predictions, "no_model": ps.no_model, "errors": ps.errors,
                           "write_errors": ps.write_errors},
            "devices": devices,
            "uplink": uplink,
            "counters": dict(self.counters),
        }

    def _write_state(self, *, stopped: bool = False) -> None:
        if self.cfg is None or self.store is None or self.predictor is None:
            return
        self._last_state = time.time()
        try:
            snap = self.snapshot()
            snap["running"] = not stopped
            path = self.cfg.agent.state_path
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(snap, default=str, indent=1))
            os.replace(tmp, path)
        except (OSError, TypeError, ValueError) as exc:
            log.warning("cannot write the state file: %s", exc)


def check_keys(cfg: AgentConfig) -> None:
    """Refuse unreadable key files and a group/world-readable secret before going READY."""
    up = cfg.uplink
    if up is None or up.insecure:
        return
    from fedgate.core.keys import load_public_key, load_secret_key

    for key, loader in (("server_key", load_public_key), ("secret_key", load_secret_key)):
        path = getattr(up, key)
        try:
            loader(path)
        except SecurityError as exc:
            raise SecurityError(f"{cfg.file}: uplink.{key} = {path!r}: {exc}") from exc
        except OSError as exc:
            raise SecurityError(f"{cfg.file}: uplink.{key} = {path!r}: {exc.strerror}") from exc


def run_agent(config_path: str | os.PathLike[str]) -> int:
    """Run the daemon until SIGTERM; the process exit status."""
    setup_logging("INFO")
    from fedgate.agent import malloc

    malloc.tune()
    return asyncio.run(AgentService(Path(config_path)).run())
