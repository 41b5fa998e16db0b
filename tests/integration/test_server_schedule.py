"""A paced federation (``round_interval``) on a real server, and a reload that changes it.

The server runs its loop in a thread on real sockets; the agents are scripted DEALERs.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from fedgate.core.protocol import MsgType
from fedgate.server.cli import status_report

from test_server_support import Agent, ServerThread, global_params, wait_for, write_config


def test_a_paced_round_waits_until_a_reload_lifts_the_interval_and_raises_rounds(tmp_path, caplog):
    cfg = write_config(tmp_path, federation={"statistics": False, "rounds": 2, "round_interval": "1h", "lr": 0.01})
    srv = ServerThread(cfg)
    a, b = Agent(srv.endpoint, "gw-a"), Agent(srv.endpoint, "gw-b")
    try:
        a.hello()
        b.hello()
        ta, tb = a.expect(MsgType.TASK), b.expect(MsgType.TASK)
        assert ta.fields["round"] == 1 and ta.fields["hyper"]["lr"] == 0.01
        g = global_params(ta)
        a.train_result(ta, g + 1)
        b.train_result(tb, g + 1)
        a.committed(1)
        # round 2 is held back by the interval: no task, a gauge and a status line say when it starts
        wait_for(lambda: srv.metric("fedgate_server_next_round_start_timestamp_seconds") > 0, what="the wait")
        due = srv.metric("fedgate_server_next_round_start_timestamp_seconds")
        report = status_report(str(cfg))
        sched = report["schedule"]
        assert sched["round_interval_s"] == 3600.0
        assert sched["next_train_round_not_before"] == pytest.approx(due, abs=1.0)
        assert 3500 < due - time.time() <= 3600
        assert srv.coordinator.open is None and srv.coordinator.committed == 1

        cfg.write_text(cfg.read_text().replace('round_interval = "1h"', 'round_interval = "0s"')
                       .replace("rounds = 2", "rounds = 3").replace("lr = 0.01", "lr = 0.5"))
        with caplog.at_level(logging.INFO, logger="fedgate.server.service"):
            srv.server.request_reload()
            ta, tb = a.expect(MsgType.TASK), b.expect(MsgType.TASK)
        assert ta.fields["round"] == 2 and ta.fields["hyper"]["lr"] == 0.5
        assert "[federation] rounds, round_interval, lr applied from the next round on" in caplog.text
        for rnd in (2, 3):
            if rnd == 3:
                ta, tb = a.expect(MsgType.TASK), b.expect(MsgType.TASK)
            g = global_params(ta)
            a.train_result(ta, g + 1)
            b.train_result(tb, g + 1)
        wait_for(lambda: srv.coordinator.finished, what="the third round")
        np.testing.assert_allclose(srv.coordinator.params, g + 1, rtol=1e-6)
        assert srv.coordinator.committed == 3
    finally:
        a.close()
        b.close()
        srv.stop()
    report = status_report(str(cfg))
    assert report["train_rounds"] == 3 and report["schedule"] is None  # round_interval 0: no schedule
