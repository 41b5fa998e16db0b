"""Acquisition lifecycle without a peer: stop() ends loops that swallow a cancellation."""
from __future__ import annotations

import asyncio

from fedgate.drivers import Acquisition, load_config

DOC = {"transports": [{"name": "plc", "kind": "modbus-tcp", "host": "127.0.0.1", "port": 1}],
       "devices": [{"name": "m1", "transport": "plc", "poll": "10ms",
                    "tags": [{"name": "t", "register": "input", "address": 0, "type": "int16"}]}]}


def test_stop_ends_a_poll_loop_whose_cancellation_was_lost():
    swallowed = []

    async def main():
        acq = Acquisition(load_config(DOC, file="agent.toml"))

        async def poll_device(dev):
            try:
                await asyncio.sleep(5)  # the cancellation lands here
            except asyncio.CancelledError:  # what asyncio.wait_for may do on Python 3.11
                swallowed.append(dev.name)
            return [], False

        acq.poll_device = poll_device  # type: ignore[method-assign]
        await acq.start()
        await asyncio.sleep(0.05)
        await asyncio.wait_for(acq.stop(), 20)
        return acq.status()["m1"]

    status = asyncio.run(main())
    assert swallowed == ["m1"]
    assert status["state"] == "up"


def test_stop_without_start_and_twice_is_harmless():
    async def main():
        acq = Acquisition(load_config(DOC, file="agent.toml"))
        await acq.stop()
        await acq.stop()
        return acq.latest(), acq.plan()

    latest, plan = asyncio.run(main())
    assert latest == {} and "m1: 1 request(s) per cycle" in plan


def test_a_failing_consumer_does_not_stop_acquisition():
    from fedgate.drivers import Quality, TagValue
    calls = []

    def consumer(values):
        calls.append(len(values))
        raise RuntimeError("consumer bug")

    async def main():
        acq = Acquisition(load_config(DOC, file="agent.toml"), on_values=consumer)

        async def poll_device(dev):
            return [TagValue("m1.t", len(calls), 0.0, Quality.GOOD, (1,), "")], False

        acq.poll_device = poll_device  # type: ignore[method-assign]
        await acq.start()

        async def three_batches():
            while len(calls) < 3:
                await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(three_batches(), 20)
        finally:
            await acq.stop()
        return acq.latest()

    latest = asyncio.run(main())
    assert len(calls) >= 3
    assert latest["m1.t"].value >= 2
