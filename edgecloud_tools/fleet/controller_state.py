"""What the rollout controller keeps on disk: each rollout's wave, when that wave started, the last
command it signed (and whether the broker has it yet), the control cohort's figures a last wave is
compared with, every decision with its figures, the counts summed so far in the wave in progress (per
device and version, written every judgement), and the lease that lets one controller drive a fleet.

:class:`ControllerState` is the interface the controller uses; :class:`SqliteState` keeps it in one
SQLite file (WAL, one transaction per change), so a controller killed at any point restarts on the last
committed decision. A decision and the command it publishes are committed together, the command marked
unpublished (an outbox): a restart publishes whatever the broker never acknowledged. A PostgreSQL store,
shared by controllers on several hosts, implements the same methods.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from edgecloud.errors import EdgecloudError
from edgecloud_tools.fleet.gates import Counts

#: per (device, version seen): a wave's counts
WaveCounts = Mapping[tuple[str, int], Counts]

STATE_FILE = "controller.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    model TEXT NOT NULL, version INTEGER NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
    wave_started REAL NOT NULL, issued_at TEXT, reason TEXT NOT NULL DEFAULT '',
    baseline TEXT NOT NULL DEFAULT '{}', outbox TEXT, PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version INTEGER NOT NULL,
    wave INTEGER NOT NULL, state TEXT NOT NULL, at REAL NOT NULL, reason TEXT NOT NULL,
    figures TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS wave_counts (
    model TEXT NOT NULL, version INTEGER NOT NULL, device TEXT NOT NULL, seen INTEGER NOT NULL,
    rows INTEGER NOT NULL, escalated INTEGER NOT NULL, audited INTEGER NOT NULL,
    audit_agree INTEGER NOT NULL, PRIMARY KEY (model, version, device, seen));
CREATE TABLE IF NOT EXISTS lease (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL);
"""


class LeaseHeld(EdgecloudError):
    """Another controller drives this fleet."""


@dataclass(frozen=True)
class Rollout:
    """One release's rollout as the controller drives it. ``state`` is that of the last command
    (``advancing`` also before any, in wave 0); ``wave_started`` is a Unix time; ``outbox`` the signed
    command not yet acknowledged by the broker."""

    model: str
    version: int
    wave: int = 0
    state: str = "advancing"
    wave_started: float = 0.0
    issued_at: str | None = None
    reason: str = ""
    baseline: dict[str, Any] = field(default_factory=dict)
    outbox: str | None = None

    def moved(self, **changes: Any) -> Rollout:
        return replace(self, **changes)


@dataclass(frozen=True)
class Decision:
    """A line of the rollout's history: what was decided, why, and the figures that decided it."""

    model: str
    version: int
    wave: int
    state: str
    at: float
    reason: str
    figures: dict[str, Any]


class ControllerState(Protocol):
    """The controller's store."""

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> None:
        """Take or renew the lease ``name`` for ``holder`` until ttl_s from now; LeaseHeld when another
        holder's lease has not expired."""

    def release_lease(self, name: str, holder: str) -> None: ...

    def rollouts(self) -> dict[tuple[str, int], Rollout]: ...

    def save(self, rollout: Rollout, decision: Decision | None = None, new_wave: bool = False) -> None:
        """Write ``rollout`` and ``decision`` together, or neither; ``new_wave`` drops the rollout's
        counts in the same transaction."""

    def save_counts(self, model: str, version: int, counts: WaveCounts) -> None:
        """Write (replace) these entries of the wave's counts."""

    def wave_counts(self, model: str, version: int) -> dict[tuple[str, int], Counts]: ...

    def decisions(self, model: str, version: int) -> list[Decision]: ...

    def close(self) -> None: ...


class SqliteState:
    """:class:`ControllerState` in ``<state_dir>/controller.sqlite3``."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        uri = f"{self.path.resolve().as_uri()}?mode=ro" if read_only else str(self.path)
        self._db = sqlite3.connect(uri, uri=read_only, isolation_level=None, timeout=10.0,
                                   check_same_thread=False)
        if not read_only:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> None:
        now = time.time()
        with self._transaction():
            row = self._db.execute("SELECT holder, expires FROM lease WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > now:
                raise LeaseHeld(f"lease {name} is held by {row[0]} for {row[1] - now:.0f} s more")
            self._db.execute("INSERT INTO lease VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                             "holder = excluded.holder, expires = excluded.expires",
                             (name, holder, now + ttl_s))

    def release_lease(self, name: str, holder: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM lease WHERE name = ? AND holder = ?", (name, holder))

    def rollouts(self) -> dict[tuple[str, int], Rollout]:
        rows = self._db.execute("SELECT model, version, wave, state, wave_started, issued_at, reason, "
                                "baseline, outbox FROM rollouts").fetchall()
        return {(r[0], r[1]): Rollout(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8])
                for r in rows}

    def save(self, rollout: Rollout, decision: Decision | None = None, new_wave: bool = False) -> None:
        r = rollout
        with self._transaction():
            if new_wave:
                self._db.execute("DELETE FROM wave_counts WHERE model = ? AND version = ?",
                                 (r.model, r.version))
            self._db.execute("INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (r.model, r.version, r.wave, r.state, r.wave_started, r.issued_at, r.reason,
                              json.dumps(r.baseline), r.outbox))
            if decision is not None:
                d = decision
                self._db.execute("INSERT INTO decisions (model, version, wave, state, at, reason, figures) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (d.model, d.version, d.wave, d.state, d.at, d.reason, json.dumps(d.figures)))

    def save_counts(self, model: str, version: int, counts: WaveCounts) -> None:
        with self._transaction():
            rows = [(model, version, device, seen, c.rows, c.escalated, c.audited, c.audit_agree)
                    for (device, seen), c in counts.items()]
            self._db.executemany("INSERT OR REPLACE INTO wave_counts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def wave_counts(self, model: str, version: int) -> dict[tuple[str, int], Counts]:
        rows = self._db.execute("SELECT device, seen, rows, escalated, audited, audit_agree FROM wave_counts "
                                "WHERE model = ? AND version = ?", (model, version)).fetchall()
        return {(r[0], r[1]): Counts(*r[2:]) for r in rows}

    def decisions(self, model: str, version: int) -> list[Decision]:
        rows = self._db.execute("SELECT model, version, wave, state, at, reason, figures FROM decisions "
                                "WHERE model = ? AND version = ? ORDER BY id", (model, version)).fetchall()
        return [Decision(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on an exception: all of a change or none of it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")
