"""The hard-example store on its own: one row per (device, request_id, row, input), a reused request id
counted, an old store migrated, bounds, threads, the export as a training set through
``edgecloud examples export``, and the agreement through ``edgecloud examples agreement``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sqlite3
import threading
import time

import numpy as np
import pytest

from cloud_gateway.hard_examples import DAY_S, HardExample, HardExampleStore, tensors_to_bytes
from edgecloud.errors import ConfigError, EdgecloudError
from edgecloud_tools import examples_cli


def example(request_id: str, row: int, *, reason: str = "low_confidence", created_at: float | None = None,
            model: str = "clf", features: int = 8, device: str = "line-1") -> HardExample:
    """An example whose tensors are derived from its key, so every stored row can be recognised."""
    seed = sum(map(ord, request_id)) * 1000 + row
    x = np.random.default_rng(seed).standard_normal(features).astype(np.float32)
    logits = np.random.default_rng(seed + 1).standard_normal(4).astype(np.float32)
    return HardExample(request_id=request_id, row=row, device=device, edge_model_version="3",
                       cloud_model=model, cloud_model_version="2", reason=reason, deferred=False,
                       edge_prediction=row % 4, edge_confidence=0.25 + row / 100,
                       inputs={"x": x, "tag": np.array([b"cam", b"7"], dtype=object)},
                       cloud_outputs={"logits": logits, "embedding": x[:2] * 2},
                       created_at=time.time() if created_at is None else created_at)


def keys(store: HardExampleStore) -> set[tuple[str, int]]:
    return {(e.request_id, e.row) for e in store.examples()}


def test_a_replayed_row_is_stored_once(tmp_path):
    with HardExampleStore(tmp_path / "hard.db") as store:
        assert store.add([example("r1", 0), example("r1", 2)]) == 2
        replay = [example("r1", 0), example("r1", 2), example("r1", 5)]  # one row more this time
        assert store.add(replay) == 1
        assert store.count() == 3
    with HardExampleStore(tmp_path / "hard.db") as store:  # durable across reopen
        assert keys(store) == {("r1", 0), ("r1", 2), ("r1", 5)}
        [stored] = [e for e in store.examples() if e.row == 2]
    want = example("r1", 2)
    np.testing.assert_array_equal(stored.inputs["x"], want.inputs["x"])
    assert stored.inputs["tag"].tolist() == [b"cam", b"7"]
    np.testing.assert_array_equal(stored.cloud_outputs["logits"], want.cloud_outputs["logits"])
    assert (stored.edge_prediction, stored.deferred) == (2, False)
    assert stored.edge_confidence == pytest.approx(0.27)


def test_max_rows_keeps_the_newest(tmp_path):
    now = time.time()
    with HardExampleStore(tmp_path / "hard.db", max_rows=5) as store:
        for i in range(8):
            store.add([example(f"r{i}", 0, created_at=now - 100 + i)])
        assert store.count() == 5
        assert keys(store) == {(f"r{i}", 0) for i in range(3, 8)}


def test_retention_prunes_rows_older_than_the_limit(tmp_path):
    now = time.time()
    with HardExampleStore(tmp_path / "hard.db", retention_days=30) as store:
        store.add([example("old", 0, created_at=now - 31 * DAY_S),
                   example("recent", 0, created_at=now - 29 * DAY_S)])
        assert keys(store) == {("recent", 0)}


def test_concurrent_writers_lose_nothing(tmp_path):
    with HardExampleStore(tmp_path / "hard.db") as store:
        def write(t: int) -> None:
            for i in range(20):
                store.add([example(f"t{t}-{i}", 0), example(f"t{t}-{i}", 1), example("shared", i)])

        threads = [threading.Thread(target=write, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.count() == 6 * 20 * 2 + 20


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecloud")
    examples_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def run_cli(*argv: str) -> int:
    args = export_parser().parse_args(list(argv))
    return args.func(args)


def test_export_through_the_command_holds_exactly_the_stored_rows(tmp_path):
    db, out = tmp_path / "hard.db", tmp_path / "train.npz"
    stored = [example("a", 0), example("a", 3, reason="audit"), example("b", 1, device="line-2")]
    with HardExampleStore(db) as store:
        store.add(stored)
    assert run_cli("examples", "export", "--store", str(db), "--out", str(out)) == 0
    data = np.load(out)
    assert list(zip(data["request_id"], data["row"])) == [("a", 0), ("a", 3), ("b", 1)]
    np.testing.assert_array_equal(data["x"], np.stack([e.inputs["x"] for e in stored]))
    np.testing.assert_array_equal(data["cloud.logits"], np.stack([e.cloud_outputs["logits"] for e in stored]))
    np.testing.assert_array_equal(data["cloud_prediction"],
                                  [e.cloud_outputs["logits"].argmax() for e in stored])
    assert data["tag"].shape == (3, 2)
    assert data["edge_prediction"].tolist() == [0, 3, 1]
    np.testing.assert_allclose(data["edge_confidence"], [0.25, 0.28, 0.26])
    assert data["device"].tolist() == ["line-1", "line-1", "line-2"]
    assert data["reason"].tolist() == ["low_confidence", "audit", "low_confidence"]

    assert run_cli("examples", "export", "--store", str(db), "--out", str(out), "--reason", "audit") == 0
    assert np.load(out)["request_id"].tolist() == ["a"]


def test_export_since_and_model_filters(tmp_path):
    db, out = tmp_path / "hard.db", tmp_path / "train.npz"
    now = time.time()
    with HardExampleStore(db) as store:
        store.add([example("old", 0, created_at=now - 3 * DAY_S), example("new", 0, created_at=now - 60),
                   example("wide", 0, model="big", features=16)])
        with pytest.raises(EdgecloudError, match="--model"):  # two models' inputs do not stack
            store.export(out)
        assert store.export(out, model="big") == 1
        assert np.load(out)["x"].shape == (1, 16)
    assert run_cli("examples", "export", "--store", str(db), "--out", str(out), "--model", "clf",
                   "--since", "1d") == 0
    assert np.load(out)["request_id"].tolist() == ["new"]
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 2 * DAY_S))
    assert run_cli("examples", "export", "--store", str(db), "--out", str(out), "--model", "clf",
                   "--since", since) == 0
    assert np.load(out)["request_id"].tolist() == ["new"]


def test_export_of_an_empty_selection_and_bad_arguments(tmp_path):
    db, out = tmp_path / "hard.db", tmp_path / "train.npz"
    HardExampleStore(db).close()
    assert run_cli("examples", "export", "--store", str(db), "--out", str(out)) == 0
    assert np.load(out)["request_id"].shape == (0,)
    with pytest.raises(ConfigError, match="--since"):
        run_cli("examples", "export", "--store", str(db), "--out", str(out), "--since", "last tuesday")
    with pytest.raises(ConfigError, match="no such store"):
        run_cli("examples", "export", "--store", str(tmp_path / "missing.db"), "--out", str(out))


def test_export_merges_the_stores_of_several_gateway_replicas(tmp_path):
    one, two, out = tmp_path / "replica-0.db", tmp_path / "replica-1.db", tmp_path / "train.npz"
    now = time.time()
    with HardExampleStore(one) as store:
        store.add([example("a", 0, created_at=now - 30), example("c", 0, created_at=now - 10)])
    with HardExampleStore(two) as store:  # "a" again: a replay that reached another replica
        store.add([example("b", 1, created_at=now - 20), example("a", 0, created_at=now - 5)])
    assert run_cli("examples", "export", "--store", str(one), "--store", str(two), "--out", str(out)) == 0
    assert list(zip(np.load(out)["request_id"], np.load(out)["row"])) == [("a", 0), ("b", 1), ("c", 0)]


def test_two_devices_numbering_their_requests_alike_keep_every_row(tmp_path):
    with HardExampleStore(tmp_path / "hard.db") as store:
        for device in ("press-1", "press-2"):
            assert store.add([example(f"frame-{i}", 0, device=device) for i in range(5)]) == 5
        assert store.count() == 10 and store.reused_request_ids == 0
        assert store.add([example("frame-3", 0, device="press-2")]) == 0  # a replay: still idempotent


def reused(request_id: str, row: int, seed: int, device: str = "line-1") -> HardExample:
    """``example(request_id, row)`` carrying another input: an app that reuses its request ids."""
    e = example(request_id, row, device=device)
    x = np.random.default_rng(10_000 + seed).standard_normal(8).astype(np.float32)
    return dataclasses.replace(e, inputs={**e.inputs, "x": x})


def test_a_reused_request_id_keeps_each_input_and_is_counted(tmp_path, caplog):
    with HardExampleStore(tmp_path / "hard.db") as store:
        assert store.add([reused("frame", 0, seed) for seed in range(3)]) == 3
        assert store.add([reused("frame", 0, 1)]) == 0  # the same input again is a replay
        assert store.count() == 3 and store.reused_request_ids == 2
        assert {e.inputs["x"].tobytes() for e in store.examples()} == {
            reused("frame", 0, seed).inputs["x"].tobytes() for seed in range(3)}
    assert "event=request_id_reused device=line-1 request_id=frame rows=2" in caplog.text


OLD_SCHEMA = """
CREATE TABLE examples (
    request_id TEXT NOT NULL, row INTEGER NOT NULL, device TEXT NOT NULL,
    edge_model_version TEXT NOT NULL, cloud_model TEXT NOT NULL, cloud_model_version TEXT NOT NULL,
    reason TEXT NOT NULL, deferred INTEGER NOT NULL, edge_prediction INTEGER, edge_confidence REAL,
    inputs BLOB NOT NULL, cloud_outputs BLOB NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (request_id, row)
);
CREATE INDEX examples_created_at ON examples (created_at);
"""


def test_a_store_keyed_by_request_id_and_row_is_migrated_on_open(tmp_path, caplog):
    db = tmp_path / "hard.db"
    old = [example("a", 0), example("a", 1), example("b", 0, device="line-2")]
    with sqlite3.connect(db) as conn:  # a store as the gateway wrote it before the key held the device
        conn.executescript(OLD_SCHEMA)
        conn.executemany(f"INSERT INTO examples VALUES ({', '.join('?' * 13)})", [
            (e.request_id, e.row, e.device, e.edge_model_version, e.cloud_model, e.cloud_model_version,
             e.reason, int(e.deferred), e.edge_prediction, e.edge_confidence, tensors_to_bytes(e.inputs),
             tensors_to_bytes(e.cloud_outputs), e.created_at) for e in old])
    conn.close()
    caplog.set_level(logging.INFO, logger="cloud_gateway")
    with HardExampleStore(db) as store:
        assert "event=hard_examples_migrated" in caplog.text and "rows=3" in caplog.text
        assert [e.key for e in store.examples()] == [e.key for e in old]
        assert store.add(old) == 0  # their replays are recognised by the migrated digests
        assert store.add([example("a", 0, device="line-9")]) == 1  # another device, same numbering
        assert store.count() == 4
    caplog.clear()
    with HardExampleStore(db) as store:  # migrated once
        assert store.count() == 4 and "hard_examples_migrated" not in caplog.text
    assert run_cli("examples", "export", "--store", str(db), "--out", str(tmp_path / "train.npz")) == 0
    assert np.load(tmp_path / "train.npz")["device"].tolist() == ["line-1", "line-1", "line-2", "line-9"]


def test_export_merges_replicas_by_device_request_id_row_and_input(tmp_path):
    one, two, out = tmp_path / "replica-0.db", tmp_path / "replica-1.db", tmp_path / "train.npz"
    with HardExampleStore(one) as store:
        store.add([example("frame-0", 0, device="press-1"), reused("frame-1", 0, 1)])
    with HardExampleStore(two) as store:  # a replay of press-1's case, press-2's own, another input
        store.add([example("frame-0", 0, device="press-1"), example("frame-0", 0, device="press-2"),
                   reused("frame-1", 0, 2)])
    assert run_cli("examples", "export", "--store", str(one), "--store", str(two), "--out", str(out)) == 0
    data = np.load(out)
    assert sorted(zip(data["device"], data["request_id"])) == [
        ("line-1", "frame-1"), ("line-1", "frame-1"), ("press-1", "frame-0"), ("press-2", "frame-0")]


def test_agreement_per_device_version_and_reason_from_one_or_several_stores(tmp_path, capsys):
    """Rows answered in time only (a replay is not), each row once across replicas, a detector's rows
    (no edge prediction) left out and counted; the cloud's answer is the argmax of ``--output``."""
    one, two = tmp_path / "replica-0.db", tmp_path / "replica-1.db"

    def answered(request_id: str, row: int, cloud_top: int, **fields) -> HardExample:
        logits = np.full(4, -1.0, dtype=np.float32)
        logits[cloud_top] = 1.0
        return dataclasses.replace(example(request_id, row, **fields), cloud_outputs={"logits": logits})

    with HardExampleStore(one) as store:  # edge_prediction is row % 4
        store.add([answered("a", 0, 0, reason="audit"), answered("a", 1, 1, reason="audit"),
                   answered("a", 2, 3, reason="audit"), answered("b", 0, 2, reason="low_confidence"),
                   answered("c", 1, 1, reason="audit", device="line-2"),
                   dataclasses.replace(answered("d", 0, 0, reason="audit"), deferred=True),
                   dataclasses.replace(answered("e", 0, 0, reason="empty_frame"), edge_prediction=None),
                   dataclasses.replace(answered("f", 1, 1, reason="audit"), edge_model_version="10")])
    with HardExampleStore(two) as store:
        store.add([answered("a", 0, 0, reason="audit"), answered("g", 3, 0, reason="audit")])
    assert run_cli("examples", "agreement", "--store", str(one), "--store", str(two), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["without_edge_prediction"] == 1
    assert [tuple(r.values()) for r in printed["rows"]] == [
        ("line-1", "3", "audit", 4, 2, 0.5), ("line-1", "3", "low_confidence", 1, 0, 0.0),
        ("line-1", "10", "audit", 1, 1, 1.0), ("line-2", "3", "audit", 1, 1, 1.0)]
    assert list(printed["rows"][0]) == ["device", "edge_model_version", "reason", "rows", "agree", "share"]
    assert run_cli("examples", "agreement", "--store", str(one), "--since", "1h") == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["DEVICE", "VERSION", "REASON", "ROWS", "AGREE", "SHARE"]
    assert out.splitlines()[1].split() == ["line-1", "3", "audit", "3", "2", "66.7%"]
    assert "1 rows without an edge prediction" in err
    with pytest.raises(EdgecloudError, match="--output 'scores': not a stored cloud output"):
        run_cli("examples", "agreement", "--store", str(one), "--output", "scores")
