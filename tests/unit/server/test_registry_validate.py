"""Registry bookkeeping and the update checks, without sockets."""
from __future__ import annotations

import numpy as np
import pytest

from fedgate.core import codec
from fedgate.server.registry import Registry
from fedgate.server.validate import Rejected, UpdateValidator


def test_registry_reconnect_replaces_routing_id_and_expires_silent_agents():
    r = Registry()
    r.register("a", b"r1", software="s", n_samples=1, now=0.0)
    r.register("b", b"r2", software="s", n_samples=1, now=0.0)
    r.register("a", b"r3", software="s", n_samples=2, now=1.0)
    assert r.by_routing_id(b"r1") is None and r.by_routing_id(b"r3").name == "a"
    assert r.expire(10.0, dead_after_s=5.0) == ["a", "b"]
    assert r.alive_names() == [] and r.expire(20.0, 5.0) == []
    r.touch(r.get("b"), 21.0)
    assert r.alive_names() == ["b"]
    r.register("c", b"r3", software="s", n_samples=1, now=22.0)  # the connection now speaks for c
    assert r.get("a") is None and r.by_routing_id(b"r3").name == "c"
    r.drop("c")
    assert r.names() == ["b"]


@pytest.mark.parametrize("block", [1, 7, 1 << 16])
def test_blockwise_distance_matches_numpy(block):
    rng = np.random.default_rng(0)
    g, p = rng.normal(size=1000).astype(np.float32), rng.normal(size=1000).astype(np.float32)
    v = UpdateValidator(1000, 1e9, block=block)
    assert v.distance(p, g) == pytest.approx(float(np.linalg.norm(p - g)), rel=1e-5)


@pytest.mark.parametrize("name", ["f32", "f16", "q8"])
def test_check_accepts_each_codec_and_reads_f32_in_place(name):
    g = np.zeros(300, dtype=np.float32)
    p = np.linspace(-1, 1, 300, dtype=np.float32)
    buf = codec.encode(p, name)
    out = np.empty(300, dtype=np.float32)
    vec, norm = UpdateValidator(300, 100.0).check(buf, g, lambda: out)
    np.testing.assert_allclose(vec, p, atol=0.02)
    assert norm == pytest.approx(float(np.linalg.norm(p)), rel=0.02)
    assert (vec.ctypes.data == out.ctypes.data) == (name != "f32")


def test_check_refusals():
    g = np.zeros(10, dtype=np.float32)
    v = UpdateValidator(10, 1.0)
    out = lambda: np.empty(10, dtype=np.float32)  # noqa: E731
    for payload, reason in ((None, "decode"), (b"junk", "decode"), (codec.encode(np.zeros(11, np.float32)), "size"),
                            (codec.encode(np.ones(10, np.float32)), "norm")):
        with pytest.raises(Rejected) as info:
            v.check(payload, g, out)
        assert info.value.reason == reason
