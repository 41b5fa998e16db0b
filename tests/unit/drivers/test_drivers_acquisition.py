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
