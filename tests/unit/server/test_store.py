"""Checkpoints (atomic, checksummed, fallback on corruption, fuzzed loader) and the SQLite history."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.core.errors import StoreError
from fedgate.server.store import Checkpoint, CheckpointStore, History, TaskRow, parse_checkpoint, read_checkpoint


def _ckpt(rnd: int, dim: int = 10) -> Checkpoint:
    rng = np.random.default_rng(rnd)
    return Checkpoint(round=rnd, phase="train",
                      arrays={"params": rng.normal(size=dim).astype(np.float32),
                              "strategy.m": rng.normal(size=dim).astype(np.float32),
                              "scaler_mean": np.arange(3, dtype=np.float32)},
                      meta={"features": ["a", "b", "c"], "privacy_rates": [0.5]})


def test_round_trip_keeps_arrays_bit_exact(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    ck = _ckpt(4)
    path = store.save(ck)
    back = read_checkpoint(path)
    assert back.round == 4 and back.phase == "train" and back.meta == ck.meta
    for name, vec in ck.arrays.items():
        assert back.arrays[name].dtype == vec.dtype
        np.testing.assert_array_equal(back.arrays[name], vec)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left behind"


def test_only_last_n_are_kept(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for r in range(5):
        store.save(_ckpt(r))
    files = store.files()
    assert len(files) == 2
    assert [read_checkpoint(p).round for p in files] == [3, 4]


def test_dropped_checkpoint_is_the_next_ones_file(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.save(_ckpt(0, dim=50))
    store.save(_ckpt(1, dim=50))
    oldest = store.files()[0]
    inode = oldest.stat().st_ino
    store.save(_ckpt(2, dim=50))  # round 0 is dropped: its file is kept aside, not unlinked
    spare = tmp_path / ".spare.fgc"
    assert spare.stat().st_ino == inode
    newest = store.save(_ckpt(3, dim=7))  # written into it (a smaller one: the file is cut to size)
    assert newest.stat().st_ino == inode
    assert [read_checkpoint(p).round for p in store.files()] == [2, 3]
    np.testing.assert_array_equal(read_checkpoint(newest).arrays["params"], _ckpt(3, dim=7).arrays["params"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".spare.fgc", *(p.name for p in store.files())], names


def test_spare_survives_a_restart_and_a_missing_spare_is_not_an_error(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    for r in range(3):
        store.save(_ckpt(r))
    again = CheckpointStore(tmp_path, keep=1)  # a restarted server finds the spare
    inode = (tmp_path / ".spare.fgc").stat().st_ino
    assert again.save(_ckpt(3)).stat().st_ino == inode
    assert read_checkpoint(again.files()[-1]).round == 3
    (tmp_path / ".spare.fgc").unlink()  # an operator removed it: a new file is written
    again._spare = True
    path = again.save(_ckpt(4))
    assert read_checkpoint(path).round == 4 and again.load_latest()[0].round == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_half_written_spare_is_never_taken_for_a_checkpoint(tmp_path):
    # a crash while the spare is being written leaves it under its temp name; the
    # checkpoints kept are all whole, and the next save writes a new temp file over it
    store = CheckpointStore(tmp_path, keep=2)
    for r in range(3):
        store.save(_ckpt(r))
    path = tmp_path / "ckpt-0000000004.fgc"
    (tmp_path / ".spare.fgc").replace(tmp_path / f".{path.name}.tmp")
    (tmp_path / f".{path.name}.tmp").write_bytes(b"FGCKPT01 half")
    fresh = CheckpointStore(tmp_path, keep=2)
    ck, _ = fresh.load_latest()
    assert ck.round == 2 and fresh.fallbacks == 0
    assert read_checkpoint(fresh.save(_ckpt(3))).round == 3
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage, caplog):
    store = CheckpointStore(tmp_path, keep=5)
    store.save(_ckpt(1))
    newest = store.save(_ckpt(2))
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 3] ^= 0x40
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a checkpoint at all" * 10)
    newest.write_bytes(bytes(data))
    fresh = CheckpointStore(tmp_path, keep=5)
    ck, path = fresh.load_latest()
    assert ck is not None and ck.round == 1
    assert fresh.fallbacks == 1
    assert str(newest) in caplog.text and "unusable" in caplog.text


def test_no_valid_checkpoint_gives_none(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.load_latest() == (None, None)
    (tmp_path / "ckpt-0000000001.fgc").write_bytes(b"FGCKPT01")
    assert store.load_latest() == (None, None)
    assert store.fallbacks == 1


def test_refuses_wrong_arrays(tmp_path):
    with pytest.raises(StoreError, match="1-D"):
        CheckpointStore(tmp_path).save(Checkpoint(round=0, phase="init", arrays={"x": np.zeros((2, 2))}))
    with pytest.raises(StoreError, match="1-D"):
        CheckpointStore(tmp_path).save(Checkpoint(round=0, phase="init", arrays={"x": np.zeros(2, dtype=np.int64)}))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10_000), st.binary(min_size=1, max_size=8), st.booleans())
def test_fuzz_loader_raises_only_store_error(tmp_path_factory, pos, junk, rehash):
    import hashlib

    path = tmp_path_factory.mktemp("ck") / "c.fgc"
    from fedgate.server.store import write_checkpoint

    write_checkpoint(path, _ckpt(1, dim=5))
    data = bytearray(path.read_bytes())
    pos %= len(data)
    data[pos:pos + len(junk)] = junk
    if rehash:  # a forged file with a valid digest must still be validated field by field
        data = data[:-32] + hashlib.sha256(bytes(data[:-32])).digest() if len(data) > 32 else data
    try:
        ck = parse_checkpoint(bytes(data))
    except StoreError:
        return
    assert isinstance(ck.arrays, dict)


def test_history_tasks_rounds_and_summary(tmp_path):
    h = History(tmp_path / "h.db")
    h.add_tasks([TaskRow("a" * 32, 1, "train", "gw-a", 1.0, "issued"), TaskRow("b" * 32, 1, "train", "gw-b", 1.0,
                                                                              "issued")])
    h.set_task_status([("a" * 32, "accepted")])
    assert [t.status for t in h.tasks_of(1, "train")] == ["accepted", "issued"]
    assert h.task("b" * 32).agent == "gw-b" and h.task("c" * 32) is None
    h.add_round(1, "train", started=1.0, finished=2.0, n_sampled=2, n_accepted=1, n_rejected=1,
                metrics={"loss": 0.5}, epsilon=1.5)
    h.add_round(1, "train", started=1.0, finished=3.0, n_sampled=2, n_accepted=2, n_rejected=0,
                metrics={"loss": 0.25}, epsilon=float("inf"))
    h.add_rejection(1, "gw-b", "b" * 32, "norm", "too big")
    h.upsert_agent("gw-a", software="x", n_samples=5, state="ready")
    h.upsert_agent("gw-a", software="y", n_samples=6, state="ready")
    s = h.summary()
    assert s["train_rounds"] == 1 and s["rounds"][0]["metrics"] == {"loss": 0.25} and s["rounds"][0]["epsilon"] is None
    assert s["rejections"] == {"norm": 1}
    assert s["agents"][0]["software"] == "y" and s["agents"][0]["n_samples"] == 6
    h.close()
    ro = History(tmp_path / "h.db", readonly=True)
    assert ro.summary()["train_rounds"] == 1
    ro.close()


def test_history_unopenable_is_store_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open history"):
        History(tmp_path / "file" / "h.db")


def test_history_transaction_commits_together_or_not_at_all(tmp_path):
    h = History(tmp_path / "h.db")
    ro = History(tmp_path / "h.db", readonly=True)
    try:
        with h.transaction():
            h.add_tasks([TaskRow("a" * 32, 1, "train", "gw1", 1.0, "issued")])
            h.set_task_status([("a" * 32, "accepted")])
            assert ro.task("a" * 32) is None  # nothing visible before the commit
        assert ro.task("a" * 32).status == "accepted"
        with pytest.raises(RuntimeError):
            with h.transaction():
                h.set_task_status([("a" * 32, "expired")])
                h.add_tasks([TaskRow("b" * 32, 1, "train", "gw2", 1.0, "issued")])
                raise RuntimeError("boom")
        assert ro.task("a" * 32).status == "accepted" and ro.task("b" * 32) is None
        h.add_tasks([TaskRow("c" * 32, 2, "train", "gw1", 2.0, "issued")])  # outside: commits at once
        assert ro.task("c" * 32) is not None
    finally:
        ro.close()
        h.close()
