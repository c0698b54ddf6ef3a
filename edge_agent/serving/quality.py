"""How well the served model answers, live, per version (docs/design.md §12): the rows it answered, its
confidence histogram, and how often the cloud agreed with it on the rows the cloud answered in time,
escalated (where the edge was unsure) and audited (a random share of confident rows: the unbiased
estimate of the edge's accuracy on what it answers alone).

Counts belong to the version serving: a swap (an update or a rollback, :meth:`Quality.activate`)
starts the new version's counts from zero, and a late call of the version it replaced is no longer
counted, so a version's figures never mix with another's. Telemetry reads the active version's counts
over its interval and since activation; ``/metrics`` reads every version's since the agent started
(counters that never go down, so a version served twice adds up). Integer counters under one lock:
the cascade calls :meth:`answered` once per call and :meth:`compared` once per cloud answer.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace

from edge_agent.serving.stats import CONFIDENCE_EDGES
from edgecloud.mqtt.payloads import AgreementCounts

BINS = len(CONFIDENCE_EDGES) - 1


@dataclass(slots=True)
class Counts:
    """Rows a version answered, and the rows the cloud answered in time and how many agreed."""

    rows: int = 0
    escalated: int = 0
    audited: int = 0
    audit_agree: int = 0
    escalated_agree: int = 0

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def since(self, mark: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) - getattr(mark, f.name) for f in fields(self)))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class _Active:
    """The serving version's counts since it became active, and where the last interval ended."""

    version: str
    counts: Counts = field(default_factory=Counts)
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)
    mark: Counts = field(default_factory=Counts)
    mark_histogram: list[int] = field(default_factory=lambda: [0] * BINS)


class Quality:
    """The agreement counts of one served model, kept for the version active now."""

    def __init__(self, version: str) -> None:
        self._lock = threading.Lock()
        self._active = _Active(version)
        #: counts of versions served before, since the agent started (for ``/metrics``)
        self._earlier: dict[str, Counts] = {}

    def activate(self, version: str) -> None:
        """``version`` serves from now on: its counts start from zero (the slot's swap hook)."""
        with self._lock:
            old = self._active
            self._earlier.setdefault(old.version, Counts()).add(old.counts)
            self._active = _Active(version)

    def answered(self, version: str, rows: int, bins: Sequence[int]) -> None:
        """Count a call's ``rows`` answered by ``version`` and the histogram bins of their confidences
        (a NaN confidence has none)."""
        with self._lock:
            active = self._active
            if version != active.version:  # a call on the model a swap just replaced
                return
            active.counts.rows += rows
            for b in bins:
                active.histogram[b] += 1

    def compared(self, version: str, audit: bool, rows: int, agree: int) -> None:
        """Count ``rows`` the cloud answered in time for ``version``, ``agree`` of them as the edge did;
        ``audit``: audited confident rows, else escalated ones."""
        with self._lock:
            counts = self._active.counts
            if version != self._active.version:
                return
            if audit:
                counts.audited += rows
                counts.audit_agree += agree
            else:
                counts.escalated += rows
                counts.escalated_agree += agree

    def interval(self) -> dict:
        """The active version's counts and histogram since the previous call (or its activation), and
        its totals since activation: telemetry's ``quality`` (one reader owns the interval)."""
        with self._lock:
            active = self._active
            counts, mark = active.counts, active.mark
            figures = {"version": active.version, **counts.since(mark).to_dict(),
                       "confidence_hist": [now - then for now, then in
                                           zip(active.histogram, active.mark_histogram)],
                       "totals": counts.to_dict()}
            active.mark, active.mark_histogram = replace(counts), list(active.histogram)
            return figures

    def totals(self) -> dict[str, AgreementCounts]:
        """Every version's counts since the agent started, the active one's included."""
        with self._lock:
            versions = {version: replace(counts) for version, counts in self._earlier.items()}
            versions.setdefault(self._active.version, Counts()).add(self._active.counts)
        return {version: AgreementCounts(**counts.to_dict()) for version, counts in versions.items()}
