"""The updater's memory across restarts: ``<state_dir>/update/state.json``.

It names the model to serve after a restart (the active slot), the one to fall back to (the previous
slot), the release in progress with its step, releases rolled back (with the ``issued_at`` of the
signed copy that was: only a copy signed later retries it, see :meth:`UpdateState.rolled_back_before`),
and the newest
``issued_at`` trusted so far (the reference for expiry while the device clock is unset, docs/design.md §6).
Every write is atomic (temp file, fsync, rename), so a power cut leaves the old state or the new one.
Slot files live under ``<state_dir>/models/<name>/<version>/`` and are recorded relative to the state
dir. A state file that cannot be read is set aside (``state.json.corrupt-<ns>``) and the agent starts
from its configured model: a broken state must never keep a device from serving.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from edgecloud.clock import parse_time
from edgecloud.files import atomic_write

log = logging.getLogger(__name__)

SCHEMA = 1
#: steps of a release in progress, in order; ``watching`` = swapped in, not yet trusted
STEPS = ("downloading", "verifying", "staged", "watching")
#: how many rolled-back releases are remembered
ROLLED_BACK_KEPT = 16


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Slot:
    """A model file the agent can serve: its release version, file (relative to the state dir) and the
    verified release payload it came with (calibration, labels, sha256)."""

    version: int
    path: str
    release: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = PurePosixPath(self.path).parts
        if not parts or PurePosixPath(self.path).is_absolute() or ".." in parts:
            raise ValueError(f"slot path {self.path!r} must be relative to the state dir, without '..'")

    @property
    def model(self) -> str:
        return str(self.release.get("model", ""))

    @property
    def sha256(self) -> str:
        return str((self.release.get("artifact") or {}).get("sha256", ""))

    @property
    def issued_at(self) -> str | None:
        """When the release this slot came from was signed (None for the configured model)."""
        value = self.release.get("issued_at")
        return value if isinstance(value, str) else None

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "path": self.path, "release": dict(self.release)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Slot | None:
        if data is None:
            return None
        return cls(_field(data, "version", int), _field(data, "path", str), _field(data, "release", dict))


@dataclass(frozen=True)
class Release:
    """Which release: model name, version and artifact sha256 (a re-signed copy is the same release)."""

    model: str
    version: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Release:
        return cls(_field(data, "model", str), _field(data, "version", int), _field(data, "sha256", str))


@dataclass(frozen=True)
class RolledBack:
    """A release rolled back, and the ``issued_at`` of the signed copy that was (None: not recorded,
    as in a state written before it was)."""

    release: Release
    issued_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.release.to_dict(), "issued_at": self.issued_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolledBack:
        issued_at = _field(data, "issued_at", str, optional=True)
        if issued_at is not None:
            parse_time(issued_at)  # ValueError for a time that does not parse
        return cls(Release.from_dict(data), issued_at)


@dataclass(frozen=True)
class Pending:
    """The release being handled and the last step it completed."""

    release: Release
    step: str

    def __post_init__(self) -> None:
        if self.step not in STEPS:
            raise ValueError(f"pending step {self.step!r} is not one of {STEPS}")

    def to_dict(self) -> dict[str, Any]:
        return {**self.release.to_dict(), "step": self.step}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Pending | None:
        if data is None:
            return None
        return cls(Release.from_dict(data), _field(data, "step", str))


@dataclass(frozen=True)
class UpdateState:
    """Everything the updater persists. No active slot: serve the configured model."""

    active: Slot | None = None
    previous: Slot | None = None
    pending: Pending | None = None
    newest_issued_at: str | None = None
    rolled_back: tuple[RolledBack, ...] = ()

    def with_rolled_back(self, release: Release, issued_at: str | None) -> UpdateState:
        """Remember ``release`` (signed at ``issued_at``) as rolled back; the oldest records go first."""
        kept = tuple(r for r in self.rolled_back if r.release != release)[-(ROLLED_BACK_KEPT - 1):]
        return replace(self, rolled_back=(*kept, RolledBack(release, issued_at)))

    def rolled_back_before(self, release: Release, issued_at: datetime) -> bool:
        """Was this release rolled back, in a copy signed at or after ``issued_at``? Publishing the
        same release again (same model, version and file) signed later is how an operator retries it;
        the retained copy that was rolled back, delivered again, is not retried."""
        return any(r.release == release and (r.issued_at is None or parse_time(r.issued_at) >= issued_at)
                   for r in self.rolled_back)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA,
                "active": self.active.to_dict() if self.active else None,
                "previous": self.previous.to_dict() if self.previous else None,
                "pending": self.pending.to_dict() if self.pending else None,
                "newest_issued_at": self.newest_issued_at,
                "rolled_back": [r.to_dict() for r in self.rolled_back]}

    @classmethod
    def from_dict(cls, data: Any) -> UpdateState:
        """Strict parse; ValueError (or KeyError/TypeError) on anything unexpected."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"not an update state of schema {SCHEMA}")
        return cls(Slot.from_dict(data.get("active")), Slot.from_dict(data.get("previous")),
                   Pending.from_dict(data.get("pending")), _field(data, "newest_issued_at", str, True),
                   tuple(RolledBack.from_dict(r) for r in _field(data, "rolled_back", list)))


class StateStore:
    """Reads and atomically writes the state; knows where slot files go under the state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.path = self.root / "update" / "state.json"
        self.models = self.root / "models"

    def load(self) -> tuple[UpdateState, str | None]:
        """The persisted state (empty when there is none) and, when the file was unreadable, why
        (the file is then set aside and an empty state returned)."""
        try:
            return UpdateState.from_dict(json.loads(self.path.read_bytes())), None
        except FileNotFoundError:
            return UpdateState(), None
        except (OSError, ValueError, KeyError, TypeError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
            try:
                self.path.rename(aside)
            except OSError as rename_error:
                log.error("event=update_state_not_set_aside path=%s error=%r", self.path, rename_error)
            detail = f"{self.path} unreadable ({e}); set aside as {aside.name}"
            log.error("event=update_state_corrupt path=%s error=%r set_aside=%s", self.path, str(e), aside)
            return UpdateState(), detail

    def save(self, state: UpdateState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(state.to_dict(), indent=1, sort_keys=True).encode())

    def slot_file(self, name: str, version: int, suffix: str) -> Path:
        """``<state_dir>/models/<name>/<version>/model<suffix>`` (``name`` is checked by the caller)."""
        return self.models / name / str(version) / f"model{suffix}"

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def absolute(self, slot: Slot) -> Path:
        return self.root / slot.path

    def prune(self, state: UpdateState) -> list[Path]:
        """Delete version directories under ``models/`` that no slot or pending release uses (partial
        downloads of abandoned releases included); returns what was deleted."""
        keep = {self.absolute(s).parent for s in (state.active, state.previous) if s}
        if state.pending:
            keep.add(self.models / state.pending.release.model / str(state.pending.release.version))
        removed = []
        for version_dir in sorted(self.models.glob("*/*")):
            if version_dir.is_dir() and version_dir not in keep:
                shutil.rmtree(version_dir, ignore_errors=True)
                removed.append(version_dir)
                log.info("event=slot_pruned dir=%s", version_dir)
        return removed
