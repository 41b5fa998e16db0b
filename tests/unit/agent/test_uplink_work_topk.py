"""Top-k train results as deltas: the agent's encoder, its error feedback, the server's check."""
from __future__ import annotations

import uuid

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.agent.outbox import Outbox
from fedgate.agent.uplink_types import Task, TaskOutcome
from fedgate.agent.uplink_work import ResultEncoder, TopkFeedback
from fedgate.core import codec
from fedgate.core.errors import StoreError, TrainingError
from fedgate.server.validate import Rejected, UpdateValidator, check_update, materialize_update

D = 400


def make_task(round_: int, codec_name: str = "topk", **codec_params: object) -> Task:
    return Task(task_id=uuid.uuid4().hex, round=round_, kind="train", deadline_s=30.0, spec={},
                features=["a"], label="y", scaler=None, hyper={}, codec=codec_name,
                codec_params=dict(codec_params) if codec_params else {"k": 0.1})


@pytest.fixture
def encoder(tmp_path):
    box = Outbox(tmp_path / "state.db")
    yield ResultEncoder("gw-1", box)
    box.close()


def server_side(payload: bytes, glob: np.ndarray, max_norm: float = 1e9) -> np.ndarray:
    validator = UpdateValidator(glob.size, max_norm, block=64)
    params, norm = check_update(validator, payload, glob, lambda: np.empty(glob.size, dtype=np.float32))
    assert norm == pytest.approx(float(np.linalg.norm(params.astype(np.float64) - glob)), rel=1e-5)
    return params


def test_topk_result_is_a_flagged_delta_the_server_turns_back_into_params(encoder):
    rng = np.random.default_rng(1)
    glob = rng.normal(size=D).astype(np.float32)
    new = glob + rng.normal(scale=0.1, size=D).astype(np.float32)
    buf = encoder.encode_params(new, make_task(1, k=1.0), glob)
    head = codec.read_header(buf)
    assert head.codec is codec.Codec.TOPK and head.delta and head.param == D
    np.testing.assert_allclose(codec.decode(buf), new - glob, atol=1e-6)
    np.testing.assert_allclose(server_side(buf, glob), new, atol=1e-6)


def test_sparse_delta_leaves_unsent_coordinates_at_the_global_value(encoder):
    glob = np.full(D, 5.0, dtype=np.float32)
    new = glob.copy()
    new[[3, 50, 399]] += [1.0, -2.0, 0.5]
    new[100:200] += 0.001
    params = server_side(encoder.encode_params(new, make_task(1, k=3 / D), glob), glob)
    want = glob.copy()
    want[[3, 50, 399]] = new[[3, 50, 399]]
    np.testing.assert_array_equal(params, want)  # not zero: the old params-encoding bug
    np.testing.assert_allclose(encoder.topk.ef.residual[100:200], 0.001, rtol=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_sent_deltas_plus_residual_add_up_to_the_true_deltas(encoder, seed):
    rng = np.random.default_rng(seed)
    glob = rng.normal(size=D).astype(np.float32)
    true_sum = np.zeros(D)
    applied = np.zeros(D)
    for round_ in range(1, 16):
        delta = rng.normal(scale=0.05, size=D).astype(np.float32) * (rng.random(D) < 0.5)
        new = glob + delta
        true_sum += new.astype(np.float64) - glob
        buf = encoder.encode_params(new, make_task(round_, k=0.05), glob)
        params = server_side(buf, glob)
        applied += params.astype(np.float64) - glob
        assert np.count_nonzero(codec.decode(buf)) <= 20
        glob = params  # a one-agent FedAvg round
    np.testing.assert_allclose(applied + encoder.topk.ef.residual, true_sum, atol=2e-5)


def test_a_round_run_again_starts_from_the_residual_before_it(encoder, tmp_path):
    """A restarted server re-issues round 2: the first attempt's leftovers are not counted twice."""
    rng = np.random.default_rng(7)
    glob = rng.normal(size=D).astype(np.float32)
    d1, d2, d2b, d3 = (rng.normal(scale=0.1, size=D).astype(np.float32) for _ in range(4))
    encoder.encode_params(glob + d1, make_task(1), glob)
    encoder.encode_params(glob + d2, make_task(2), glob)      # lost with the server
    retry = encoder.encode_params(glob + d2b, make_task(2), glob)
    box = Outbox(tmp_path / "ref.db")
    try:
        ref = ResultEncoder("gw-ref", box)  # never saw the lost attempt
        ref.encode_params(glob + d1, make_task(1), glob)
        assert retry == ref.encode_params(glob + d2b, make_task(2), glob)
        np.testing.assert_array_equal(encoder.topk.ef.residual, ref.topk.ef.residual)
        # and the next round goes on from the retry, not from the lost attempt
        assert encoder.encode_params(glob + d3, make_task(3), glob) == ref.encode_params(glob + d3, make_task(3), glob)
    finally:
        box.close()


def test_round_going_back_or_size_change_resets_the_residual(encoder):
    rng = np.random.default_rng(2)
    glob = rng.normal(size=D).astype(np.float32)
    for r in (3, 4, 5):
        encoder.encode_params(glob + rng.normal(size=D).astype(np.float32), make_task(r), glob)
    assert np.abs(encoder.topk.ef.residual).max() > 0
    delta = rng.normal(size=D).astype(np.float32)
    back = encoder.encode_params(glob + delta, make_task(4), glob)  # an older checkpoint: round 4 < 5
    want = codec.encode((glob + delta) - glob, "topk", k=0.1, state=codec.ErrorFeedback(D), delta=True)
    assert back == want
    small = np.zeros(10, dtype=np.float32)
    buf = encoder.encode_params(small + 1, make_task(5), small)
    assert codec.decode(buf).tolist() == [1.0] + [0.0] * 9 and encoder.topk.ef.dim == 10
    assert encoder.topk.ef.residual.tolist() == [0.0] + [1.0] * 9


@settings(max_examples=60, deadline=None)
@given(rounds=st.lists(st.integers(1, 6), min_size=1, max_size=14).map(sorted),
       seed=st.integers(0, 2**16), k=st.sampled_from([0.01, 0.1, 0.5]))
def test_retried_rounds_count_once_in_sent_plus_residual(rounds, seed, k):
    """Whatever rounds are retried, the last attempt of each round is what adds up."""
    rng = np.random.default_rng(seed)
    fb = TopkFeedback()
    last: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # round -> (true delta, sent)
    for r in rounds:
        delta = (rng.normal(size=50) * (rng.random(50) < 0.7)).astype(np.float32)
        sent = codec.decode(codec.encode(delta, "topk", k=k, state=fb.state(r, 50), delta=True))
        last[r] = (delta, sent)
    true = sum(d.astype(np.float64) for d, _ in last.values())
    got = sum(s.astype(np.float64) for _, s in last.values()) + fb.ef.residual
    np.testing.assert_allclose(got, true, atol=1e-5)


def test_skipped_rounds_keep_the_residual():
    fb = TopkFeedback()
    fb.state(1, 3).residual[:] = [1, 2, 3]
    assert fb.state(7, 3).residual.tolist() == [1, 2, 3]


def test_topk_needs_matching_global_params_and_a_valid_k(encoder):
    glob = np.zeros(D, dtype=np.float32)
    with pytest.raises(TrainingError, match="needs the task's global params"):
        encoder.encode_params(glob + 1, make_task(1), None)
    with pytest.raises(TrainingError, match="the global model has 10"):
        encoder.encode_params(glob + 1, make_task(1), np.zeros(10, dtype=np.float32))
    encoder.encode_params(glob + np.arange(D, dtype=np.float32), make_task(1), glob)
    before = encoder.topk.ef.residual.copy()
    for k in (0.0, 2.0, "x"):
        with pytest.raises(TrainingError, match="topk k ="):
            encoder.encode_params(glob + 1, make_task(2, k=k), glob)
        np.testing.assert_array_equal(encoder.topk.ef.residual, before)  # a failed round leaves no trace
    with pytest.raises(TrainingError, match="non-finite"):
        encoder.store(make_task(2), TaskOutcome(n_samples=3, metrics={}, params=glob + np.inf), glob)
    np.testing.assert_array_equal(encoder.topk.ef.residual, before)


def test_store_keeps_the_delta_payload_in_the_outbox(encoder):
    glob = np.ones(D, dtype=np.float32)
    task = make_task(1, k=0.5)
    entry = encoder.store(task, TaskOutcome(n_samples=9, metrics={}, params=glob * 3), glob)
    stored = encoder.outbox.get(task.task_id)
    assert stored is not None and bytes(stored.payload) == bytes(entry.payload)
    assert codec.read_header(stored.payload).delta
    np.testing.assert_array_equal(server_side(stored.payload, glob)[: D // 2], 3.0)


@pytest.mark.parametrize("name", ["f32", "f16", "q8"])
def test_other_codecs_still_send_params(encoder, name):
    glob = np.linspace(-1, 1, D, dtype=np.float32)
    buf = encoder.encode_params(glob + 0.25, make_task(1, name), glob)
    assert not codec.read_header(buf).delta
    np.testing.assert_allclose(server_side(buf, glob), glob + 0.25, atol=0.01)


# ------------------------------------------------------------------- the server's side

def test_server_refuses_bad_deltas_by_reason():
    glob = np.ones(D, dtype=np.float32)
    validator = UpdateValidator(D, max_update_norm=1.0)

    def check(buf: bytes | None) -> str:
        with pytest.raises(Rejected) as info:
            check_update(validator, buf, glob, lambda: np.empty(D, dtype=np.float32))
        return info.value.reason

    big = np.zeros(D, dtype=np.float32)
    big[0] = 2.0
    assert check(codec.encode(big, "topk", k=0.5, delta=True)) == "norm"
    assert check(codec.encode(big, "f32", delta=True)) == "norm"
    assert check(codec.encode(np.zeros(D + 1, dtype=np.float32), "topk", delta=True)) == "size"
    for name in ("f32", "f16", "q8"):  # parameters of the wrong size take the same path
        assert check(codec.encode(np.ones(D + 1, dtype=np.float32), name)) == "size"
        assert check(codec.encode(np.ones(D - 1, dtype=np.float32), name)) == "size"
    huge = np.full(D, 3e38, dtype=np.float32)
    glob_huge = np.full(D, 3e38, dtype=np.float32)
    with pytest.raises(Rejected, match="overflows") as info:
        check_update(validator, codec.encode(huge, "topk", k=1.0, delta=True), glob_huge,
                     lambda: np.empty(D, dtype=np.float32))
    assert info.value.reason == "nonfinite"
    assert check(codec.encode(glob, "topk", k=1.0)) == "decode"  # params, not a delta
    bad = bytearray(codec.encode(big, "topk", k=0.5, delta=True))
    bad[-1] ^= 1
    assert check(bytes(bad)) == "decode"
    assert check(None) == "decode" and check(b"junk") == "decode"


def test_small_delta_passes_and_non_deltas_take_the_plain_path():
    glob = np.arange(D, dtype=np.float32)
    validator = UpdateValidator(D, max_update_norm=1.0)
    delta = np.zeros(D, dtype=np.float32)
    delta[7] = 0.5
    params, norm = check_update(validator, codec.encode(delta, "q8", delta=True), glob,
                                lambda: np.empty(D, dtype=np.float32))
    assert norm == pytest.approx(0.5, rel=1e-2) and params[7] == pytest.approx(7.5, abs=0.01)
    plain = codec.encode(glob + delta, "f32")
    got = check_update(validator, plain, glob, lambda: np.empty(D, dtype=np.float32))
    want = validator.check(plain, glob, lambda: np.empty(D, dtype=np.float32))
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]


def test_materialize_update_adds_the_global_model_only_to_deltas():
    glob = np.array([1, 2, 3], dtype=np.float32)
    dec = np.array([0.5, 0, -1], dtype=np.float32)
    same = materialize_update(codec.read_header(codec.encode(dec, "f32")), dec, glob)
    assert same is dec and dec.tolist() == [0.5, 0, -1]
    out = materialize_update(codec.read_header(codec.encode(dec, "topk", k=1.0, delta=True)), dec, glob)
    assert out is dec and out.tolist() == [1.5, 2, 2]


def _valid_delta(d: int = 64) -> bytes:
    return codec.encode(np.linspace(-0.1, 0.1, d, dtype=np.float32), "topk", k=0.25, delta=True)


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, 200), value=st.integers(0, 255), cut=st.integers(-40, 40), reseal=st.booleans())
def test_hostile_delta_payloads_are_only_ever_rejected(pos, value, cut, reseal):
    glob = np.ones(64, dtype=np.float32)
    buf = bytearray(_valid_delta())
    if pos < len(buf):
        buf[pos] = value
    buf = buf[:len(buf) + cut] if cut < 0 else buf + bytes(cut)
    if reseal and len(buf) >= 24:
        struct.pack_into("<I", buf, 20, zlib.crc32(bytes(buf[24:]), zlib.crc32(bytes(buf[:20]))) & 0xFFFFFFFF)
    validator = UpdateValidator(64, max_update_norm=10.0)
    try:
        params, norm = check_update(validator, bytes(buf), glob, lambda: np.empty(64, dtype=np.float32))
    except Rejected as exc:
        assert exc.reason in ("decode", "size", "nonfinite", "norm")
        return
    assert params.shape == (64,) and np.isfinite(params).all() and norm <= 10.0
    np.testing.assert_array_equal(glob, 1.0)  # the global model is never written


def test_a_result_that_cannot_be_stored_leaves_the_residual_as_before(encoder):
    glob = np.zeros(D, dtype=np.float32)
    encoder.encode_params(glob + np.arange(D, dtype=np.float32), make_task(1), glob)
    before = encoder.topk.ef.residual.copy()
    bad = TaskOutcome(n_samples=3, metrics={}, params=glob + 1.0)
    encoder.outbox.close()  # the state file is gone: storing fails after the payload was encoded
    with pytest.raises(StoreError, match="closed"):
        encoder.store(make_task(2), bad, glob)
    np.testing.assert_array_equal(encoder.topk.ef.residual, before)
