"""The spool's writer thread: cases waiting for the disk are committed together, a call never waits for
the disk, and kill -9 loses no more than the cases still in memory (at most ``spool.max_pending``)."""

from __future__ import annotations

import threading

import numpy as np

from edge_agent import disk_queue
from edge_agent.cloud.spool import FAULT_ENV, Spool, encode_batch
from edgecloud.protocol.codec import InferRequest, request_to_bytes
from edgecloud.protocol.parameters import AgentResponse
from edgecloud_tools.rig.services import ServiceProcess
from tests.support.fleet import Scrape
from tests.support.net import free_port, wait_for
from tests.support.onnx_models import linear_classifier
from tests.support.services import Client

X = np.random.default_rng(3).standard_normal((1, 8)).astype(np.float32)


def _case(i: int) -> InferRequest:
    return InferRequest("m", {"x": np.full((1, 4), i, dtype=np.float32)}, id=f"req-{i}")


def _replay_ids(spool: Spool, limit: int = 100) -> list[str]:
    ids = []
    while len(ids) < limit and (item := spool.oldest()) is not None:
        ids.append(item[1].id)
        spool.remove(item[0])
    return ids


def test_cases_that_wait_for_the_disk_are_committed_as_one_batch(tmp_path, monkeypatch):
    writing, go_on, files = threading.Event(), threading.Event(), []
    write = disk_queue.atomic_write

    def slow_first_write(path, data):  # the disk is busy with the first case until the test says
        files.append(path)
        if len(files) == 1:
            writing.set()
            go_on.wait(10)
        write(path, data)

    monkeypatch.setattr(disk_queue, "atomic_write", slow_first_write)
    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.put(_case(0))
    assert writing.wait(10)
    for i in range(1, 6):  # handed over while the first write is under way: none of them waits for it
        assert spool.put(_case(i))
    assert spool.depth() == 6 and not spool.flush(timeout=0)
    go_on.set()
    assert spool.flush(timeout=10)
    spool.close()
    assert len(files) == 2  # two files, one fsync each: the first case, then the five that waited
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert _replay_ids(reopened) == [f"req-{i}" for i in range(6)] and reopened.depth() == 0
    reopened.close()
    assert not list(tmp_path.glob("*.case"))  # a batch file goes with its last case


def test_a_batch_is_replayed_case_by_case_and_a_broken_one_is_set_aside(tmp_path):
    batch = encode_batch([request_to_bytes(_case(i)) for i in range(3)])
    (tmp_path / f"{1:020d}.case").write_bytes(batch)
    (tmp_path / f"{2:020d}.case").write_bytes(batch[:40])  # cut short: its header still says 3 cases
    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.depth() == 6
    assert _replay_ids(spool, limit=1) == ["req-0"] and spool.depth() == 5
    spool.close()
    restarted = Spool(tmp_path, max_bytes=1 << 20)  # a replay cut short: the batch is replayed whole
    assert _replay_ids(restarted) == ["req-0", "req-1", "req-2"]
    assert restarted.depth() == 0 and restarted.dropped == 3
    assert len(list(tmp_path.glob("*.bad"))) == 1 and not list(tmp_path.glob("*.case"))
    restarted.close()


def test_kill_9_loses_at_most_the_cases_waiting_in_memory(tmp_path):
    """The writer commits one batch, then stalls as a hung disk would (fault point); calls go on being
    answered, ``max_pending`` cases wait in memory and the rest are dropped, counted; kill -9 then loses
    exactly the waiting ones, and the committed batch survives."""
    model = linear_classifier(tmp_path / "edge.onnx", card={"name": "clf", "version": 1})
    port, metrics_port, max_pending = free_port(), free_port(), 4
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{state}"\n'
                      f'[model]\npath = "{model}"\n'
                      f'[cloud]\ntarget = "127.0.0.1:{free_port()}"\nmax_per_s = 100000\n'  # nobody listens
                      f'[spool]\nmax_pending = {max_pending}\nreplay_interval_s = 3600\n'
                      f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    log = tmp_path / "agent.log"
    agent = ServiceProcess("edge-agent", ["--config", str(config)], port, log,
                           env={FAULT_ENV: "stall_after:1"})
    with agent, Client(port) as client:
        answers = [client.infer("clf", {"x": X}, escalate="always", timeout=10)]
        assert wait_for(lambda: "step=spool_stall" in log.read_text(), timeout=20), agent.log_tail()
        answers += [client.infer("clf", {"x": X}, escalate="always", timeout=10) for _ in range(10)]
        before = Scrape(metrics_port)
        agent.proc.kill()
        agent.proc.wait(10)
    assert all(a.parameters[AgentResponse.DEGRADED] is True for a in answers)
    depth, dropped = before.value("edgecloud_spool_depth"), before.value("edgecloud_spool_dropped_total")
    assert depth + dropped == len(answers)  # every case kept or counted
    survivor = Spool(state / "spool", max_bytes=1 << 30)
    on_disk = survivor.depth()
    survivor.close()
    assert on_disk >= 1  # the batch committed before the stall
    assert depth - on_disk == max_pending  # what kill -9 lost: the cases waiting in memory, no more
