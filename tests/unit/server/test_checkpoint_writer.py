"""CheckpointWriter: in order, newest wins when the disk falls behind, errors reach every tag."""
from __future__ import annotations

import threading

import numpy as np

from fedgate.core.errors import StoreError
from fedgate.server.store import Checkpoint, CheckpointStore, CheckpointWriter


class GatedStore(CheckpointStore):
    """A real checkpoint directory whose save waits for the test to open a gate."""

    def __init__(self, path, fail_round: int | None = None) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.started = threading.Event()
        self.saved: list[int] = []
        self.fail_round = fail_round

    def save(self, ckpt: Checkpoint):
        self.started.set()
        self.gate.wait(10)
        if ckpt.round == self.fail_round:
            raise StoreError(f"disk full at round {ckpt.round}")
        self.saved.append(ckpt.round)
        return super().save(ckpt)


def ckpt(r: int) -> Checkpoint:
    return Checkpoint(round=r, phase="train", arrays={"params": np.full(4, float(r), dtype=np.float32)})


def test_waiting_checkpoints_are_superseded_by_the_newest(tmp_path):
    store = GatedStore(tmp_path)
    w = CheckpointWriter(store)
    w.submit(ckpt(1), "r1")
    assert store.started.wait(10)  # round 1 is being written
    for r in (2, 3, 4):
        w.submit(ckpt(r), f"r{r}")
    assert w.pending == 4
    store.gate.set()
    w.wait()
    assert store.saved == [1, 4] and w.superseded == 2
    assert w.completed() == [("r1", None), ("r2", None), ("r3", None), ("r4", None)]
    assert w.pending == 0
    latest, _ = store.load_latest()
    assert latest is not None and latest.round == 4
    w.close()


def test_a_failed_write_is_reported_for_every_tag_it_carried(tmp_path):
    store = GatedStore(tmp_path, fail_round=3)
    w = CheckpointWriter(store)
    w.submit(ckpt(1), "r1")
    assert store.started.wait(10)
    w.submit(ckpt(2), "r2")
    w.submit(ckpt(3), "r3")
    store.gate.set()
    w.wait()
    done = w.completed()
    assert done[0] == ("r1", None)
    assert [t for t, _ in done[1:]] == ["r2", "r3"] and all(isinstance(e, StoreError) for _, e in done[1:])
    w.close()


def test_in_order_one_by_one_when_the_disk_keeps_up(tmp_path):
    store = GatedStore(tmp_path)
    store.gate.set()
    w = CheckpointWriter(store)
    for r in range(1, 6):
        w.submit(ckpt(r), r)
        w.wait()
    assert store.saved == [1, 2, 3, 4, 5] and w.superseded == 0
    assert [t for t, _ in w.completed()] == [1, 2, 3, 4, 5]
    w.close()
    w.submit(ckpt(6), 6)  # a closed writer starts its thread again
    w.close()
    assert store.saved[-1] == 6
