"""Faults injected into a real Modbus TCP peer: restart, busy replies, silence."""
from __future__ import annotations

from drivers_peers import ModbusPeer, run, tcp_doc, wait_until

from fedgate.drivers import Acquisition, Quality, load_config

TAGS = [{"name": "speed", "register": "holding", "address": 0, "type": "uint16"},
        {"name": "temp", "register": "input", "address": 0, "type": "int16"}]


def test_server_stopped_and_restarted_device_goes_down_and_comes_back():
    async def main():
        peer = await ModbusPeer().start()
        await peer.set("holding", 0, [11])
        acq = Acquisition(load_config(tcp_doc(peer.port, TAGS), file="agent.toml"), seed=1)
        await acq.start()
        try:
            await wait_until(lambda: acq.status()["m1"]["state"] == "up", what="device up")
            await peer.stop()
            await wait_until(lambda: acq.status()["m1"]["state"] == "down", what="device down")
            await wait_until(lambda: acq.latest()["m1.speed"].quality is Quality.ERROR, what="error values")
            down = acq.status()["m1"]
            # the same port again, new value
            await peer.start()
            errors_at_restart = acq.status()["m1"]["errors"]["connection"]
            await peer.set("holding", 0, [22])
            await wait_until(lambda: acq.latest()["m1.speed"].value == 22, what="value after restart")
            # polled again within one backoff step: at most the attempt already under way fails
            assert acq.status()["m1"]["errors"]["connection"] - errors_at_restart <= 1
            return down, acq.status()["m1"], acq.latest()
        finally:
            await acq.stop()
            await peer.stop()

    down, up, latest = run(main())
    assert down["state"] == "down" and down["errors"]["connection"] >= 1
    assert up["state"] == "up" and up["reconnects"] >= 1
    assert latest["m1.speed"].quality is Quality.GOOD and latest["m1.temp"].quality is Quality.GOOD


def test_busy_replies_are_retried_up_to_busy_retries():
    async def main():
        async with ModbusPeer() as peer:
            await peer.set("holding", 0, [5])
            cfg = load_config(tcp_doc(peer.port, TAGS, busy_retries=3, busy_retries_wait="10ms"), file="agent.toml")
            acq = Acquisition(cfg)
            peer.busy_left = 2
            values_ok, _ = await acq.poll_device(cfg.devices[0])
            busy_after_ok = peer.busy_replies
            peer.busy_left = 10
            values_busy, failed = await acq.poll_device(cfg.devices[0])
            status = acq.status()["m1"]
            await acq.stop()
            return values_ok, busy_after_ok, values_busy, failed, status

    values_ok, busy_after_ok, values_busy, failed, status = run(main())
    assert busy_after_ok == 2
    assert [v.quality for v in values_ok] == [Quality.GOOD, Quality.GOOD] and values_ok[0].value == 5
    # 4 tries per request (1 + 3 retries): holding gets 4 busy replies, input the next 4, then 2 left
    assert [v.quality for v in values_busy] == [Quality.ERROR, Quality.ERROR]
    assert status["errors"]["busy"] == 2 and not failed  # busy is an answer: the link is fine


def test_silent_unit_times_out_without_closing_the_link_for_other_units():
    doc = tcp_doc(0, TAGS)
    doc["devices"].append({"name": "m2", "transport": "plc", "unit_id": 2, "poll": "50ms", "tags": TAGS})

    async def main():
        async with ModbusPeer(units=(1, 2)) as peer:
            doc["transports"][0]["port"] = peer.port
            await peer.set("holding", 0, [2], unit=2)
            peer.mute_units.add(1)
            acq = Acquisition(load_config(doc, file="agent.toml"), seed=2)
            await acq.start()
            try:
                await wait_until(lambda: acq.status()["m1"]["errors"]["timeout"] >= 4, what="timeouts")
                await wait_until(lambda: acq.status()["m2"]["cycles"] >= 5, what="m2 cycles")
                during = acq.status(), acq.latest()
                peer.mute_units.clear()
                await peer.set("holding", 0, [1], unit=1)
                await wait_until(lambda: acq.latest()["m1.speed"].value == 1, what="m1 back")
                return during, acq.status(), acq._links["plc"].connects
            finally:
                await acq.stop()

    (status, latest), after, connects = run(main())
    assert status["m1"]["state"] == "down"
    assert latest["m1.speed"].quality is Quality.ERROR
    assert status["m2"]["state"] == "up" and latest["m2.speed"].value == 2
    assert status["m2"]["errors"]["timeout"] == 0
    assert after["m1"]["state"] == "up"
    assert connects == 1  # the silent unit never closed the shared connection


def test_nothing_listening_counts_connection_errors_and_backs_off():
    async def main():
        peer = await ModbusPeer().start()
        port = peer.port
        await peer.stop()  # the port is free now: connects are refused
        acq = Acquisition(load_config(tcp_doc(port, TAGS), file="agent.toml"), seed=3)
        await acq.start()
        try:
            await wait_until(lambda: acq.status()["m1"]["errors"]["connection"] >= 6, what="connection errors")
            return acq.status()["m1"], acq.latest()
        finally:
            await acq.stop()

    status, latest = run(main())
    assert status["state"] == "down" and status["requests"] == 0
    assert "cannot connect" in status["last_error"]
    assert all(v.quality is Quality.ERROR for v in latest.values())


def test_tcp_link_where_nothing_answers_is_reopened():
    async def main():
        async with ModbusPeer() as peer:
            peer.mute_units.add(1)  # connection accepted, no unit answers: looks half-open
            acq = Acquisition(load_config(tcp_doc(peer.port, TAGS), file="agent.toml"), seed=9)
            await acq.start()
            try:
                await wait_until(lambda: "plc" in acq._links and acq._links["plc"].connects >= 2, what="reopen")
                peer.mute_units.clear()
                await wait_until(lambda: acq.status()["m1"]["state"] == "up", what="device up")
                return acq.status()["m1"]
            finally:
                await acq.stop()

    status = run(main())
    assert status["errors"]["timeout"] >= 4 and status["reconnects"] >= 1
