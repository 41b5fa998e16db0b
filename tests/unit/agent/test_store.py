"""The sample store: bounds, layouts, the model, concurrent reads, kill -9 safety."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from fedgate.agent.sampler import Sample
from fedgate.agent.store import Store
from fedgate.core.errors import StoreError


def _samples(n: int, start: int = 0, width: int = 3) -> list[Sample]:
    return [Sample(t_end=float(start + i), features=np.arange(width, dtype=float) + start + i, label=float(i % 2))
            for i in range(n)]


def test_samples_round_trip_in_time_order_and_requested_column_order(tmp_path):
    with Store(tmp_path / "agent.db") as st:
        st.add_samples(_samples(5), ["a", "b", "c"])
        got = st.load_samples(["c", "a"])
    assert got.ts.tolist() == [0, 1, 2, 3, 4]
    assert got.x.dtype == np.float32 and got.x.shape == (5, 2)
    np.testing.assert_array_equal(got.x[:, 0], got.ts + 2)
    np.testing.assert_array_equal(got.x[:, 1], got.ts)
    assert got.y.tolist() == [0, 1, 0, 1, 0]


def test_max_rows_drops_the_oldest_and_counts_it_across_restarts(tmp_path):
    path = tmp_path / "agent.db"
    with Store(path, max_rows=10) as st:
        assert st.add_samples(_samples(8), ["a", "b", "c"]) == 0
        assert st.add_samples(_samples(5, start=8), ["a", "b", "c"]) == 3
        assert st.count() == 10
    with Store(path, max_rows=10) as st:
        assert st.count() == 10
        assert st.counters() == {"rows_written": 13, "rows_dropped": 3}
        assert st.load_samples(["a"]).ts.tolist() == list(map(float, range(3, 13)))


def test_max_age_drops_old_rows(tmp_path):
    with Store(tmp_path / "agent.db", max_age_s=100.0) as st:
        st.add_samples(_samples(5, start=1000), ["a", "b", "c"], now_s=1004.0)
        dropped = st.add_samples(_samples(1, start=1150), ["a", "b", "c"], now_s=1150.0)
        assert dropped == 5 and st.count() == 1
        assert st.counters()["rows_dropped"] == 5


def test_rows_of_another_feature_layout_stay_readable(tmp_path):
    with Store(tmp_path / "agent.db") as st:
        st.add_samples([(1.0, [1.0, 2.0], 0.0)], ["a", "b"])
        st.add_samples([(2.0, [30.0, 10.0, 20.0], 1.0)], ["c", "a", "b"])
        both = st.load_samples(["b", "a"])
        only_new = st.load_samples(["c"])
        recent = st.load_samples(["a", "b"], limit=1)
        assert st.layouts() == [["a", "b"], ["c", "a", "b"]]
    assert both.x.tolist() == [[2.0, 1.0], [20.0, 10.0]]
    assert only_new.ts.tolist() == [2.0] and only_new.x.tolist() == [[30.0]]
    assert recent.ts.tolist() == [2.0] and recent.x.tolist() == [[10.0, 20.0]]


def test_unlabelled_rows_are_kept_but_not_trained_on(tmp_path):
    with Store(tmp_path / "agent.db") as st:
        st.add_samples([(1.0, [1.0], None), (2.0, [2.0], 1.0)], ["a"])
        assert st.load_samples(["a"]).ts.tolist() == [2.0]
        assert np.isnan(st.load_samples(["a"], labelled=False).y[0])


def test_wrong_width_is_refused(tmp_path):
    with Store(tmp_path / "agent.db") as st, pytest.raises(StoreError):
        st.add_samples([(1.0, [1.0, 2.0], 0.0)], ["a"])


def test_the_global_model_survives_a_restart_and_is_replaced(tmp_path):
    path = tmp_path / "agent.db"
    with Store(path) as st:
        assert st.load_model() is None
        st.save_model(round=3, spec={"kind": "logistic", "n_features": 2}, features=["a", "b"], label="fault",
                      scaler={"mean": [0, 1], "std": [1, 2]}, params=np.array([0.5, -1, 2], np.float32))
        st.save_model(round=4, spec={"kind": "logistic", "n_features": 2}, features=["a", "b"], label="fault",
                      scaler=None, params=np.array([1, 2, 3], np.float32))
    with Store(path) as st:
        m = st.load_model()
    assert m is not None and m.round == 4 and m.scaler is None and m.features == ["a", "b"]
    assert m.params.dtype == np.float32 and m.params.tolist() == [1, 2, 3]


def test_reads_from_a_worker_thread_while_the_main_thread_writes(tmp_path):
    with Store(tmp_path / "agent.db") as st:
        st.add_samples(_samples(100), ["a", "b", "c"])
        sizes: list[int] = []
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                for _ in range(20):
                    sizes.append(len(st.load_samples(["a", "b", "c"])))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        th = threading.Thread(target=reader, name="reader")
        th.start()
        for i in range(20):
            st.add_samples(_samples(10, start=100 + 10 * i), ["a", "b", "c"])
        th.join(30)
    assert not errors and len(sizes) == 20
    assert sizes == sorted(sizes) and sizes[0] >= 100 and sizes[-1] <= 300


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "agent.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="agent.db"):
        Store(path)


def test_shares_the_file_with_the_uplink_outbox(tmp_path):
    from fedgate.agent.outbox import Outbox

    path = tmp_path / "agent.db"
    with Store(path) as st:
        box = Outbox(path)
        try:
            st.add_samples(_samples(3), ["a", "b", "c"])
            assert box.count() == 0 and st.count() == 3
        finally:
            box.close()


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from fedgate.agent.store import Store
    st = Store(sys.argv[1], max_rows=10**9)
    start = st.count()
    i = start
    while True:
        batch = [(float(i + j), np.full(8, i + j, dtype=np.float64), float((i + j) % 2)) for j in range(7)]
        st.add_samples(batch, [f"f{k}" for k in range(8)])
        i += 7
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
""")


def _run_writer_and_kill(path, min_rows: int) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    committed = 0
    try:
        deadline = time.monotonic() + 60
        while committed < min_rows and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            committed = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        # rows the writer reported after our last read are committed too; read them all
        rest = proc.stdout.read().split()
        committed = max([committed] + [int(x) for x in rest])
    finally:
        proc.wait(30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return committed


def test_kill_9_during_writes_loses_no_committed_row_and_writing_resumes(tmp_path):
    path = tmp_path / "agent.db"
    for target in (300, 700, 1100):
        committed = _run_writer_and_kill(path, target)
        conn = sqlite3.connect(str(path))
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
        with Store(path, max_rows=10**9) as st:
            n = st.count()
            data = st.load_samples([f"f{k}" for k in range(8)])
        assert n >= committed  # every reported commit is there (one more batch may have landed)
        assert n % 7 == 0  # transactions are whole: never a half batch
        np.testing.assert_array_equal(data.ts, np.arange(n, dtype=float))  # no hole, no duplicate
        np.testing.assert_array_equal(data.x[:, 3], data.ts.astype(np.float32))
