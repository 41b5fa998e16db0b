"""Transport sends on real loopback sockets: a payload shared by many sends arrives intact."""
from __future__ import annotations

import numpy as np
import zmq

from fedgate.server.transport import Transport

# pyzmq starts its garbage-collector thread (one per process, for its lifetime) at the
# first zero-copy frame; start it here so the thread-leak check does not count it
zmq.Frame(b"\0" * 70_000, copy=False)


def _recv(sock: zmq.Socket) -> list[bytes]:
    assert sock.poll(20_000), "nothing received"
    return sock.recv_multipart()


def test_a_payload_sent_to_every_peer_arrives_intact_and_replacements_too():
    rng = np.random.default_rng(0)
    with Transport("tcp://127.0.0.1:0", insecure=True) as tr:
        ctx = zmq.Context.instance()
        peers = []
        try:
            for i in range(4):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(tr.endpoint)
                s.send(b"hello %d" % i)
                peers.append(s)
            rids = {}
            while len(rids) < 4:
                for m in tr.poll(1.0):
                    rids[m.frames[0].bytes] = m.routing_id
            for size in (5_000, 200_000):  # copied once then shared; zero-copy then shared
                for version in range(3):
                    payload = rng.bytes(size)
                    for i, s in enumerate(peers):
                        head = b"%d" % i + rng.bytes(5_000)  # a large header, different for every peer
                        assert tr.send(rids[b"hello %d" % i], [head, payload])
                        assert _recv(s) == [head, payload]
            assert tr._shared and next(iter(tr._shared.values()))[0] is payload  # the last one is shared
            assert tr.bytes_out == 4 * 3 * (5_000 + 200_000 + 2 * 5_001)
        finally:
            for s in peers:
                s.close(0)
