"""Admission without gRPC: calls beyond the in-flight bound wait in arrival order, calls beyond the
queue are refused at once with the documented message, and a waiter that gives up (deadline, or a
cancelled coroutine) leaves the queue, so its place is not lost."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgecloud.config import AdmissionSection
from edgecloud.errors import DeadlineExceeded, ResourceExhausted
from edgecloud.protocol.admission import Admission
from tests.support.net import wait_for


def gate(in_flight: int, queue: int) -> Admission:
    return Admission("agent", AdmissionSection(max_in_flight=in_flight, max_queue=queue))


def test_beyond_in_flight_and_queue_calls_are_refused_with_the_limits_named():
    admission = gate(2, 1)
    order: list[int] = []
    release = threading.Event()

    def call(n: int) -> None:
        with admission.admitted():
            order.append(n)
            release.wait(10)

    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(call, n) for n in (0, 1)]
        assert wait_for(lambda: admission.figures().in_flight == 2)
        queued = pool.submit(call, 2)
        assert wait_for(lambda: admission.figures().queued == 1)
        with pytest.raises(ResourceExhausted) as refused, admission.admitted():
            pass
        assert str(refused.value) == ("agent busy: 2 calls in flight and 1 queued (limits in [admission]); "
                                      "retry later")
        release.set()
        for f in (*running, queued):
            f.result(10)
    assert sorted(order[:2]) == [0, 1] and order[2] == 2
    figures = admission.figures()
    assert (figures.in_flight, figures.queued, figures.shed) == (0, 0, 1)
    assert (figures.max_in_flight, figures.max_queue) == (2, 1)


def test_a_zero_queue_refuses_the_second_call_at_once():
    admission = gate(1, 0)
    message = r"agent busy: 1 call in flight and 0 queued \(limits in \[admission\]\)"
    with admission.admitted(), pytest.raises(ResourceExhausted, match=message), admission.admitted():
        pass
    with admission.admitted():  # the slot is free again
        pass
    assert admission.figures().shed == 1


def test_a_waiter_whose_deadline_passes_leaves_the_queue():
    admission = gate(1, 1)
    entered = threading.Event()

    def next_caller() -> None:
        with admission.admitted():
            entered.set()

    with ThreadPoolExecutor(1) as pool:
        with admission.admitted():
            with pytest.raises(DeadlineExceeded), admission.admitted(timeout=0.05):
                pass
            assert admission.figures().queued == 0
            waiter = pool.submit(next_caller)  # its place is free for the next caller
            assert wait_for(lambda: admission.figures().queued == 1)
            assert not entered.is_set()
        waiter.result(10)  # the slot passed to it when the block above left
    assert entered.is_set() and admission.figures().in_flight == 0


def test_a_cancelled_coroutine_leaves_the_queue_and_the_next_waiter_gets_the_slot():
    admission = gate(1, 2)

    async def scenario() -> list[str]:
        done: list[str] = []
        hold = asyncio.Event()

        async def call(name: str) -> None:
            async with admission.admitted_async():
                done.append(name)
                await hold.wait()

        first = asyncio.create_task(call("first"))
        await asyncio.sleep(0)
        gone, last = asyncio.create_task(call("gone")), asyncio.create_task(call("last"))
        while admission.figures().queued < 2:
            await asyncio.sleep(0.001)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert admission.figures().queued == 1
        hold.set()
        await asyncio.wait_for(asyncio.gather(first, last), 10)
        return done

    assert asyncio.run(scenario()) == ["first", "last"]
    figures = admission.figures()
    assert (figures.in_flight, figures.queued, figures.shed) == (0, 0, 0)


def test_a_call_without_a_deadline_waits_its_turn():
    """gRPC gives a call without a deadline ~2**63 ns of remaining time, beyond what a wait may take."""
    admission = gate(1, 1)
    release = threading.Event()

    def hold() -> None:
        with admission.admitted():
            release.wait(10)

    def no_deadline() -> str:
        with admission.admitted(timeout=9223372036.854776):
            return "answered"

    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(hold)
        assert wait_for(lambda: admission.figures().in_flight == 1)
        waiting = pool.submit(no_deadline)
        assert wait_for(lambda: admission.figures().queued == 1)
        release.set()
        assert waiting.result(10) == "answered"
        held.result(10)
