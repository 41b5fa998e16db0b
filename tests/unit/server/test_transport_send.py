"""Transport sends on real loopback sockets: a payload shared by many sends arrives intact;
model-sized payloads are paced (a window of them with libzmq, the rest held in order)."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from fedgate.core.keys import load_public_key, load_secret_key
from fedgate.server.transport import Transport, TransportLimits, generate_keypair

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


def _stalling_payload_size() -> int:
    """A payload larger than the kernel can buffer towards a peer that stopped reading."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as fh:
            wmem_max = int(fh.read().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * 2**20
    return max(wmem_max, 2**20) + 2 * 2**20


def _connect(tr: Transport, n: int, *, stall: bool = False) -> tuple[list[zmq.Socket], list[bytes]]:
    """``n`` DEALER peers; with ``stall`` each first gets two small messages it does not
    read yet: its receive queue (one message) is full, so its libzmq stops reading the
    connection and a large message to it stays with the server's libzmq until the test
    reads the two."""
    ctx = zmq.Context.instance()
    peers, rids = [], {}
    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 1)
        s.setsockopt(zmq.RCVBUF, 65536)
        s.connect(tr.endpoint)
        s.send(b"hello %d" % i)
        peers.append(s)
    deadline = time.monotonic() + 20
    while len(rids) < n and time.monotonic() < deadline:
        for m in tr.poll(0.1):
            rids[m.frames[0].bytes] = m.routing_id
    assert len(rids) == n, "peers did not all say hello"
    order = [rids[b"hello %d" % i] for i in range(n)]
    if stall:
        for rid in order:
            assert tr.send(rid, [b"stall 1"]) and tr.send(rid, [b"stall 2"])
    return peers, order


def _unstall(tr: Transport, sock: zmq.Socket) -> None:
    assert _recv_pumping(tr, sock) == [b"stall 1"]
    assert _recv_pumping(tr, sock) == [b"stall 2"]


def _recv_pumping(tr: Transport, sock: zmq.Socket) -> list[bytes]:
    """Receive one message on a peer while the transport's loop runs (it sends held messages)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        list(tr.poll(0.005))
        if sock.poll(5):
            return sock.recv_multipart()
    raise AssertionError("nothing received")


@pytest.fixture()
def paced() -> Iterator[Transport]:
    # window of one payload (the minimum); a held payload is never overdue during the test
    with Transport("tcp://127.0.0.1:0", insecure=True,
                   limits=TransportLimits(send_window_bytes=1, send_hold_s=3600.0)) as tr:
        yield tr


def test_model_sized_payloads_go_to_libzmq_one_window_at_a_time_in_order(paced):
    tr = paced
    peers, rids = _connect(tr, 3, stall=True)
    try:
        payload = np.random.default_rng(1).bytes(_stalling_payload_size())
        for i, rid in enumerate(rids):
            assert tr.send(rid, [b"task %d" % i, payload])  # a held send counts as sent
        assert tr.send(rids[1], [b"after"])  # small, but behind peer 1's held payload
        assert tr.send(rids[2], [b"small"])  # peer 2 has a payload held too
        assert tr.sends_paced == 4 and len(tr._held) == 4
        for _ in range(5):  # nobody reads: the payload in flight is not released, nothing more goes
            list(tr.poll(0.01))
        assert len(tr._held) == 4 and tr._in_flight_bytes == len(payload)
        _unstall(tr, peers[1])  # peer 1 reads, but its payload waits for peer 0's release
        for _ in range(5):
            list(tr.poll(0.01))
        assert len(tr._held) == 4
        _unstall(tr, peers[0])
        assert _recv_pumping(tr, peers[0]) == [b"task 0", payload]
        assert _recv_pumping(tr, peers[1]) == [b"task 1", payload]  # went once peer 0's was released
        assert _recv_pumping(tr, peers[1]) == [b"after"]
        _unstall(tr, peers[2])
        assert _recv_pumping(tr, peers[2]) == [b"task 2", payload]
        assert _recv_pumping(tr, peers[2]) == [b"small"]
        assert not tr._held and tr.sends_dropped == {"queue_full": 0, "unreachable": 0}
        assert tr.bytes_out == 3 * (6 + len(payload)) + 5 + 5 + 3 * 2 * 7
        deadline = time.monotonic() + 20
        while tr._in_flight_bytes and time.monotonic() < deadline:
            list(tr.poll(0.01))  # the last release is seen too
        assert tr._in_flight_bytes == 0
    finally:
        for s in peers:
            s.close(0)


def test_an_overdue_payload_goes_whatever_the_window():
    with Transport("tcp://127.0.0.1:0", insecure=True,
                   limits=TransportLimits(send_window_bytes=1, send_hold_s=0.0)) as tr:
        peers, rids = _connect(tr, 3, stall=True)
        try:
            payload = np.random.default_rng(2).bytes(_stalling_payload_size())
            for i, rid in enumerate(rids):
                assert tr.send(rid, [b"task %d" % i, payload])
            list(tr.poll(0.0))
            assert not tr._held and tr.sends_paced == 2
            for i in (2, 1, 0):  # all three are with libzmq: any read order works
                _unstall(tr, peers[i])
                assert _recv_pumping(tr, peers[i]) == [b"task %d" % i, payload]
        finally:
            for s in peers:
                s.close(0)


def test_small_payloads_are_not_paced(paced):
    tr = paced
    peers, rids = _connect(tr, 2)
    try:
        payload = np.random.default_rng(3).bytes(2**20 - 1)
        for i, rid in enumerate(rids):
            assert tr.send(rid, [b"task %d" % i, payload])
        assert tr.sends_paced == 0 and not tr._held and tr._in_flight_bytes == 0
        for i in (1, 0):
            assert _recv_pumping(tr, peers[i]) == [b"task %d" % i, payload]
    finally:
        for s in peers:
            s.close(0)


def test_with_curve_paced_payloads_also_keep_to_a_rate(tmp_path):
    """libzmq lets a CURVE payload go once encrypted, before the agent has it: the rate
    holds the next one back even though the window is open again."""
    (tmp_path / "agents").mkdir()
    _, server_secret = generate_keypair(tmp_path, "server")
    server_public = load_public_key(tmp_path / "server.key")
    limits = TransportLimits(send_window_bytes=1, curve_send_bytes_per_s=1.0, send_hold_s=3600.0)
    keys = []
    for i in range(2):
        pub, sec = generate_keypair(tmp_path / "agents", f"gw{i}")
        keys.append((load_public_key(pub), load_secret_key(sec)))
    with Transport("tcp://127.0.0.1:0", secret_key_path=server_secret, agents_dir=str(tmp_path / "agents"),
                   limits=limits) as tr:
        ctx = zmq.Context.instance()
        peers, rids = [], []
        try:
            for i, (pub, sec) in enumerate(keys):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.curve_publickey, s.curve_secretkey = pub.encode(), sec.encode()
                s.curve_serverkey = server_public.encode()
                s.connect(tr.endpoint)
                s.send(b"hello")
                peers.append(s)
                deadline = time.monotonic() + 20
                while len(rids) == i and time.monotonic() < deadline:
                    rids += [m.routing_id for m in tr.poll(0.1)]
            assert len(rids) == 2, "peers did not connect"
            payload = np.random.default_rng(4).bytes(2 * 2**20)
            for i, rid in enumerate(rids):
                assert tr.send(rid, [b"task %d" % i, payload])
            assert _recv_pumping(tr, peers[0]) == [b"task 0", payload]
            deadline = time.monotonic() + 20
            while tr._in_flight and time.monotonic() < deadline:
                list(tr.poll(0.01))
            assert not tr._in_flight and len(tr._held) == 1  # released, yet the rate holds the next
            tr.limits = dataclasses.replace(limits, send_hold_s=0.0)  # now overdue: it goes
            assert _recv_pumping(tr, peers[1]) == [b"task 1", payload]
        finally:
            for s in peers:
                s.close(0)
