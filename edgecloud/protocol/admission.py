"""Admission control for inference calls: a bounded number run at once, a bounded number wait for a
turn in arrival order, and any call beyond both is refused at once with RESOURCE_EXHAUSTED
(docs/design.md §2).

A refusal is not an outage: only ModelInfer is admitted, so health checks, ServerLive/Ready and
metadata keep answering while calls are shed. A slot that frees passes straight to the oldest waiter,
so a waiter never races a newcomer for it. Waiters are futures, so the same queue serves the threaded
server (a thread blocks on its turn) and the asyncio one (a coroutine awaits it).

Admission bounds the work a call does on this machine. A call about to wait on something else (the
agent's escalation, waiting on the cloud) gives its slot back with :func:`release_slot`, so a slow but
live cloud holds none of the slots edge answers need; what waits on the cloud is bounded by the
cascade's own escalation slots.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass

from edgecloud.config import AdmissionSection
from edgecloud.errors import DeadlineExceeded, ResourceExhausted


class _Held:
    """The slot an admitted call holds, given back once: by :func:`release_slot` or at the call's end."""

    __slots__ = ("admission",)

    def __init__(self, admission: Admission) -> None:
        self.admission: Admission | None = admission

    def give_back(self) -> None:
        admission, self.admission = self.admission, None
        if admission is not None:
            admission._leave()


_held: ContextVar[_Held | None] = ContextVar("edgecloud_admission_held", default=None)


def release_slot() -> None:
    """Give the current call's admission slot to the next waiter now, before the call waits on
    something other than this machine; a no-op outside an admitted call or after the first time."""
    held = _held.get()
    if held is not None:
        held.give_back()


@dataclass(frozen=True, slots=True)
class AdmissionFigures:
    """What admission holds now and has refused so far, with its limits (for ``/metrics``)."""

    in_flight: int
    queued: int
    shed: int
    max_in_flight: int
    max_queue: int


class Admission:
    """The gate in front of one service's ModelInfer; ``service`` names it in the refusal message."""

    def __init__(self, service: str, limits: AdmissionSection) -> None:
        self.limits = limits
        calls = "call" if limits.max_in_flight == 1 else "calls"
        self.busy_message = (f"{service} busy: {limits.max_in_flight} {calls} in flight and "
                             f"{limits.max_queue} queued (limits in [admission]); retry later")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._waiting: deque[Future] = deque()
        self._shed = 0

    def figures(self) -> AdmissionFigures:
        with self._lock:
            return AdmissionFigures(self._in_flight, len(self._waiting), self._shed,
                                    self.limits.max_in_flight, self.limits.max_queue)

    @contextmanager
    def admitted(self, timeout: float | None = None) -> Iterator[None]:
        """Hold a slot for the block, waiting up to ``timeout`` seconds (the call's remaining deadline;
        None waits as long as it takes) for a turn. ResourceExhausted when both bounds are full,
        DeadlineExceeded when the turn does not come in time."""
        if timeout is not None and timeout >= threading.TIMEOUT_MAX:
            timeout = None  # a call without a deadline: gRPC gives its remaining time as ~2**63 ns
        ticket = self._arrive()
        if ticket is not None:
            try:
                ticket.result(timeout)
            except FutureTimeout:
                self._withdraw(ticket)
                raise DeadlineExceeded("deadline passed while queued for admission") from None
        held = _Held(self)
        token = _held.set(held)
        try:
            yield
        finally:
            _held.reset(token)
            held.give_back()

    @asynccontextmanager
    async def admitted_async(self) -> AsyncIterator[None]:
        """:meth:`admitted` for a coroutine: gRPC cancels it when the call's deadline passes, and a
        cancelled waiter leaves the queue."""
        ticket = self._arrive()
        if ticket is not None:
            try:
                await asyncio.wrap_future(ticket)
            except BaseException:
                self._withdraw(ticket)
                raise
        try:
            yield
        finally:
            self._leave()

    def _arrive(self) -> Future | None:
        """A slot now (None), a ticket to wait on, or ResourceExhausted."""
        with self._lock:
            if self._in_flight < self.limits.max_in_flight:
                self._in_flight += 1
                return None
            if len(self._waiting) < self.limits.max_queue:
                ticket: Future = Future()
                self._waiting.append(ticket)
                return ticket
            self._shed += 1
        raise ResourceExhausted(self.busy_message)

    def _leave(self) -> None:
        """Pass the slot to the oldest live waiter, or free it."""
        with self._lock:
            while self._waiting:
                ticket = self._waiting.popleft()
                if ticket.set_running_or_notify_cancel():
                    ticket.set_result(None)
                    return
            self._in_flight -= 1

    def _withdraw(self, ticket: Future) -> None:
        """A waiter gives up: it leaves the queue or, when its turn came meanwhile, gives the slot on."""
        with self._lock:
            if ticket.cancel():
                with suppress(ValueError):
                    self._waiting.remove(ticket)
                return
        self._leave()
