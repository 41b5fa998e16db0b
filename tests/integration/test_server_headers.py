"""The coordinator's prebuilt headers and in-place q8 sums, round after round.

The coordinator is driven directly (real history and checkpoints, a send function that
records frames): every task and model header must equal a freshly built and validated
one with its own round and nonce, and each committed model must be the weighted mean
of the decoded updates.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedgate.core import codec
from fedgate.core.protocol import MsgType, TaskKind, decode, encode
from fedgate.server.config import load_config
from fedgate.server.coordinator import Coordinator
from fedgate.server.metrics import ServerMetrics
from fedgate.server.spec import load_model_spec
from fedgate.server.store import CheckpointStore, History

from test_server_support import FEATURES, write_config

NAMES = ["gw-a", "gw-b", "gw-c"]


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[Any]]] = []

    def __call__(self, rid: bytes, frames: list[Any]) -> bool:
        self.sent.append((rid, [bytes(f) for f in frames]))
        return True

    def take(self, msg_type: MsgType) -> list[tuple[bytes, Any]]:
        out = [(rid, decode(fr)) for rid, fr in self.sent if json.loads(fr[0])["type"] == msg_type.value]
        self.sent.clear()
        return out


@pytest.mark.parametrize("upload", ["f32", "q8"])
def test_headers_and_in_place_sums_over_rounds(tmp_path: Path, upload: str):
    cfg = load_config(write_config(tmp_path, federation={
        "statistics": True, "rounds": 4, "min_agents": 3, "codec": upload, "codec_params": {"block": 7},
        "download_codec": "f32"}))
    rec = Recorder()
    history = History(tmp_path / "history.db")
    co = Coordinator(cfg, load_model_spec(cfg.federation.model, seed=0), rec, history=history,
                     checkpoints=CheckpointStore(tmp_path / "ckpt"), metrics=ServerMetrics(),
                     population=lambda: len(NAMES))
    rng = np.random.default_rng(5)
    try:
        for name in NAMES:
            co.handle(name.encode(), None, encode(MsgType.HELLO, {
                "agent": name, "software": "test", "features": FEATURES, "n_samples": 10, "task_models": 1}))
        co.tick()
        for rid, task in rec.take(MsgType.TASK):  # the statistics round sets the scaler
            co.handle(rid, None, encode(MsgType.RESULT, {
                "agent": rid.decode(), "task_id": task.fields["task_id"], "round": 0, "kind": "statistics",
                "n_samples": 10, "metrics": {}, "stats": {"count": 10, "mean": [1.0, 2.0, 3.0],
                                                          "m2": [4.0, 5.0, 6.0]}}))
        co.writer.wait()
        co.tick()
        for rnd in range(1, 5):
            tasks = rec.take(MsgType.TASK)
            assert sorted(rid for rid, _ in tasks) == sorted(n.encode() for n in NAMES)
            fresh = decode([co._build_task_header(rnd, TaskKind.TRAIN), co._payload]).fields
            nonces = set()
            for _, task in tasks:
                nonces.add(task.fields["task_id"])
                assert {**task.fields, "task_id": "0" * 32} == fresh
                assert task.fields["round"] == rnd and task.fields["scaler"] is not None
            assert len(nonces) == len(NAMES)
            g = co.params.copy()
            want = np.zeros(g.shape, np.float64)
            for i, (rid, task) in enumerate(tasks):
                buf = codec.encode(g + rng.normal(0, 0.1, g.shape).astype(np.float32), upload, block=7)
                want += (i + 1) * codec.decode(buf).astype(np.float64)
                co.handle(rid, None, encode(MsgType.RESULT, {
                    "agent": rid.decode(), "task_id": task.fields["task_id"], "round": rnd, "kind": "train",
                    "n_samples": i + 1, "metrics": {"loss": 0.5}}, buf))
            np.testing.assert_allclose(co.params, (want / 6).astype(np.float32), rtol=1e-6, atol=1e-7)
            co.writer.wait()
            co.tick()
            models = rec.take(MsgType.MODEL) if rnd == 4 else []
            assert len(models) == (len(NAMES) if rnd == 4 else 0)
            for _, model in models:  # the last round's model goes out as a model message
                assert model.fields == decode([co._model_header(rnd, co._scaler_dict), co._payload]).fields
                assert model.fields["round"] == 4
        assert co.finished and co.committed == 4
    finally:
        co.close()
        history.close()
