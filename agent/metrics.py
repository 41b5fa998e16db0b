"""Prometheus metrics of the agent, read from its state at scrape time.

A custom collector on a private registry: no gauge has to be kept in sync by the main
loop, and nothing is exported that the daemon does not know at that moment. The
endpoint binds ``[metrics] address`` (127.0.0.1 by default).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

__all__ = ["AgentCollector", "start_metrics_server"]


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


class AgentCollector(Collector):
    """Turns :meth:`AgentService.snapshot` into metric families."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        snap = self.service.snapshot()
        info = InfoMetricFamily("fedgate_agent", "the agent's identity")
        info.add_metric([], {"agent": snap["agent"], "version": snap["version"]})
        yield info
        s = snap["samples"]
        yield GaugeMetricFamily("fedgate_agent_samples_stored", "samples in the local store", value=s["stored"])
        yield CounterMetricFamily("fedgate_agent_samples_written", "samples written to the store",
                                  value=s["rows_written"])
        yield CounterMetricFamily("fedgate_agent_samples_dropped", "oldest samples dropped by the store bounds",
                                  value=s["rows_dropped"])
        yield GaugeMetricFamily("fedgate_agent_windows_pending", "valid windows waiting for their label horizon",
                                value=s["pending_windows"])
        sc = s["sampler"]
        win = CounterMetricFamily("fedgate_agent_windows", "closed feature windows by outcome", labels=["result"])
        win.add_metric(["valid"], sc.get("windows", 0))
        win.add_metric(["low_coverage"], sc.get("windows_low_coverage", 0))
        win.add_metric(["bad_quality"], sc.get("windows_bad_quality", 0))
        yield win
        yield CounterMetricFamily("fedgate_agent_labels_invalid", "windows dropped for want of label data",
                                  value=sc.get("labels_invalid", 0))
        p = snap["prediction"]
        yield GaugeMetricFamily("fedgate_agent_prediction", "the latest score of the global model", value=_num(p["score"]))
        yield GaugeMetricFamily("fedgate_agent_prediction_timestamp_seconds", "end of the latest scored window",
                                value=_num(p["ts"]))
        yield GaugeMetricFamily("fedgate_agent_alarm", "1 while the prediction alarm is raised",
                                value=1.0 if p["alarm"] else 0.0)
        yield CounterMetricFamily("fedgate_agent_predictions", "windows scored", value=p["predictions"])
        yield CounterMetricFamily("fedgate_agent_prediction_write_errors", "failed PLC writes of a prediction",
                                  value=p["write_errors"])
        f = snap["federation"]
        yield GaugeMetricFamily("fedgate_agent_model_round", "round of the global model in use",
                                value=_num(f["model_round"]))
        yield GaugeMetricFamily("fedgate_agent_model_timestamp_seconds", "when the global model in use arrived",
                                value=_num(f["model_ts"]))
        yield GaugeMetricFamily("fedgate_agent_round", "round of the latest task", value=_num(f["last_round"]))
        tasks = CounterMetricFamily("fedgate_agent_tasks", "tasks run by outcome", labels=["result"])
        tasks.add_metric(["done"], f["tasks_done"])
        tasks.add_metric(["failed"], f["tasks_failed"])
        yield tasks
        up = snap.get("uplink") or {}
        yield GaugeMetricFamily("fedgate_agent_uplink_connected", "1 while the server link is up",
                                value=1.0 if up.get("connected") else 0.0)
        if "outbox" in up or "outbox_size" in up:
            yield GaugeMetricFamily("fedgate_agent_outbox_pending_updates", "results not yet committed by the server",
                                    value=_num(up.get("outbox", up.get("outbox_size"))))
        dev_up = GaugeMetricFamily("fedgate_modbus_device_up", "1 while a device answers", labels=["device"])
        reqs = CounterMetricFamily("fedgate_modbus_requests", "requests sent", labels=["device"])
        errs = CounterMetricFamily("fedgate_modbus_errors", "failed requests by kind", labels=["device", "kind"])
        for name, st in snap["devices"].items():
            dev_up.add_metric([name], 1.0 if st.get("state") == "up" else 0.0)
            reqs.add_metric([name], st.get("requests", 0))
            for kind, n in (st.get("errors") or {}).items():
                errs.add_metric([name, kind], n)
        yield dev_up
        yield reqs
        yield errs
        c = snap["counters"]
        rel = CounterMetricFamily("fedgate_agent_config_reloads", "SIGHUP reloads by outcome", labels=["result"])
        rel.add_metric(["ok"], c["reloads_ok"])
        rel.add_metric(["failed"], c["reloads_failed"])
        yield rel


def start_metrics_server(service: Any, host: str, port: int) -> tuple[Any, threading.Thread]:
    """Serve ``/metrics`` on ``host:port`` (port 0 picks one); returns (server, thread)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(service))
    server, thread = start_http_server(port, addr=host, registry=registry)
    thread.name = "fedgate-metrics"
    return server, thread
