"""One release applied (docs/design.md §7): where a verified release becomes the serving model, or is refused
while the active model keeps serving::

    verify (key, signature, expiry) ─ checks that need no file (version, name, size, target, URI)
    ─ downloading (progress, resumable) ─ verifying ─ load + self-test in a second slot ─ staged
    ─ swap ─ active ─ watch window ─┬─ passed: stays active, previous slot kept
                                     └─ regression: the previous model back, rolled_back (reason)

The follower (``follow.py``) calls :meth:`Applier.verify`, decides whether this device wants the
release, then calls :meth:`Applier.apply`: one release at a time, on the update thread. Every completed
step is persisted before it is reported (``state.py``, so a restart knows where it stood, see
``startup.py``) and is a fault point (``faults.py``).

- Checks that need no file run before any byte is downloaded. A cut download (``download_failed``)
  keeps its partial file, and the next try resumes from it.
- The new model must have the serving contract: the same model name and identical inputs and outputs
  (``contract_mismatch``, checked as soon as it is opened, before its calibration is applied: a
  renamed output is a changed contract even when the calibration names the old one), and give finite
  outputs of the right shapes on ``self_test_rows`` rows of zeros and of random data (``unloadable``);
  see ``staging.py``, which also builds the TensorRT engine of an ONNX release on a Jetson.
- The swap is one reference change in the ModelSlot: calls in flight finish on the model they began
  with, and the replaced model is closed only when the next update starts (or at stop), long after
  the watch window. The window judges the new model against the previous one (see ``watch.py``).
- Another desired release arriving during the window (``fleet rollback``, a newer version) cuts it
  short at once, with no verdict: the new model stays active, the previous slot is kept, and the
  follower handles the new release right away instead of after ``watch_s``.
- Downloads authenticate like escalations: the cloud's TLS settings and bearer token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.fleet.link import as_int_version
from edge_agent.serving.slot import EdgeModel, ModelSlot, load_edge_model
from edge_agent.update.faults import FaultPoints
from edge_agent.update.report import Reporter, one_line
from edge_agent.update.staging import Runtime, check_contract, self_test
from edge_agent.update.startup import load_slot
from edge_agent.update.state import Pending, Release, Slot, StateStore, UpdateState
from edge_agent.update.watch import figures, metered, regression
from edgecloud.artifacts import TransportTLS, check_name, download, parse_uri
from edgecloud.backends import release_backends
from edgecloud.channel import read_token
from edgecloud.engine.builder import BuildOptions, build_engine
from edgecloud.engine.cache import EngineCache
from edgecloud.files import file_sha256
from edgecloud.release import (
    Artifact,
    Envelope,
    Reason,
    ReleasePayload,
    ReleaseRejected,
    check_size,
    check_version,
    format_time,
    parse_time,
    utc_now,
    verify_envelope,
)
from edgecloud.rollout import ROLLOUT_HALTED, WaveCommand
from edgecloud.signing import TrustStore

log = logging.getLogger(__name__)


class Stopping(Exception):
    """The agent is stopping: abandon the update where it stands."""


class Superseded(Exception):
    """Another desired release (a rollback, a newer one) arrived during the watch window."""


def slot_suffix(artifact: Artifact) -> str:
    """The suffix of the slot file a release's artifact is downloaded to, by its format."""
    return release_backends()[artifact.format].suffixes[0]


class Applier:
    """Takes one release from verification to a verdict on the served model; owns the update state."""

    def __init__(self, config: AgentConfig, slot: ModelSlot, store: StateStore, state: UpdateState,
                 reporter: Reporter, faults: FaultPoints, stopping: threading.Event,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.config = config
        self.slot = slot
        self.device = config.agent.device_id
        self.store = store
        self.state = state
        self.reporter = reporter
        self.faults = faults
        self.clock = clock
        self.trust = TrustStore.from_files(config.fleet.trusted_keys, config.fleet.revoked_keys)
        self.runtime = Runtime.detect(config, slot.model.path)
        self.engines = EngineCache(store.root / "engines")
        self._stopping = stopping
        #: set by the follower when another desired release arrives, and at stop: ends the watch window
        self.watch_cut = threading.Event()
        self._retired: list[EdgeModel] = []  # replaced models, closed at the next update or at stop

    def verify(self, envelope: Envelope) -> ReleasePayload:
        """Key, signature and expiry; remembers the newest ``issued_at`` trusted (the unset-clock rule)."""
        newest = self.state.newest_issued_at
        payload = verify_envelope(envelope, self.trust, self.clock(), self.config.fleet.clock_skew_s,
                                  parse_time(newest) if newest else None)
        if newest is None or parse_time(newest) < payload.issued_at:
            self._save(newest_issued_at=format_time(payload.issued_at))
        return payload

    def apply(self, envelope: Envelope, payload: ReleasePayload) -> None:
        """Download, stage, swap in and watch a verified release; ReleaseRejected when it is refused,
        Stopping when the agent stops first."""
        self._check(payload)
        release = Release(payload.model, payload.version, payload.artifact.sha256)
        downloaded = self._download(release, payload.artifact)
        self._step(release, "verifying")
        servable = self.runtime.servable(downloaded, payload.artifact, self.engines, self._build_engine)
        self.close_retired()  # free their memory before a second model loads
        candidate = self._stage(release, servable, envelope.payload)
        slot = Slot(payload.version, self.store.relative(servable), envelope.payload)
        self._swap_and_watch(release, metered(candidate), slot)

    def refused(self, ident: tuple[str, int] | None, code: str, detail: str) -> None:
        """A release that failed: nothing is pending any more, the fleet hears why, and its files go
        (except a cut download's partial file, which the next try resumes from)."""
        if self.state.pending is not None:
            self._save(pending=None)
        self.reporter.failed(ident, f"{code}: {one_line(detail)}")
        if code != Reason.DOWNLOAD_FAILED.value:
            self.store.prune(self.state)

    def halt(self, command: WaveCommand) -> bool:
        """Roll back the version a rollout halted (docs/design.md §12) to the model served before it,
        when that version serves here, and report ``rolled_back`` with reason ``rollout_halted`` (the
        controller's own reason goes in a ``rollout.halted`` event); True when it did. Not remembered
        as rolled back: the halt is the command's state, and a later ``advancing`` command that includes
        this device brings it back."""
        active = self.state.active
        if active is None or active.version != command.version or active.model != command.model \
                or as_int_version(self.slot.model.version) != command.version:
            return False
        before = self.state.previous
        try:
            previous = self._previous_model(before)
        except Exception as e:  # its file went missing or no longer loads: keep serving what serves
            log.error("event=rollout_halt_failed device=%s model=%s version=%d error=%r", self.device,
                      command.model, command.version, str(e))
            self.reporter.event("rollout.halt_failed", "error", model=command.model, version=command.version,
                                detail=one_line(str(e)))
            return False
        self._retired.append(self.slot.swap(previous))
        self._save(active=before, previous=None, pending=None)
        self.reporter.event("rollout.halted", "warning", model=command.model, version=command.version,
                            wave=command.wave, reason=one_line(command.reason))
        self.reporter.enter(command.model, command.version, "rolled_back", reason=ROLLOUT_HALTED)
        self.store.prune(self.state)
        return True

    def _previous_model(self, slot: Slot | None) -> EdgeModel:
        """The model served before the active one: still loaded when it was replaced since the last
        update, else loaded again from its slot (the configured model for None)."""
        version = str(slot.version) if slot is not None else None
        for model in self._retired:
            if (version is not None and model.version == version) or (version is None and model.path == (
                    self.config.model.path)):
                self._retired.remove(model)
                return model
        model = load_slot(self.config, self.store, slot) if slot is not None else load_edge_model(self.config)
        return metered(model)

    def close_retired(self) -> None:
        while self._retired:
            self._retired.pop().backend.close()

    # -- the steps ---------------------------------------------------------------------------------------
    def _check(self, payload: ReleasePayload) -> None:
        """Refuse, before any byte is downloaded, a release this device cannot take."""
        serving = self.slot.model
        check_version(payload.version, as_int_version(serving.version), payload.allow_downgrade)
        try:
            check_name(payload.model)
        except ValueError as e:
            raise ReleaseRejected(Reason.BAD_NAME, str(e)) from None
        if payload.model != serving.name:
            raise ReleaseRejected(Reason.CONTRACT_MISMATCH, f"release is for model {payload.model!r}, "
                                  f"this device serves {serving.name!r}")
        check_size(payload.artifact.size, self.config.model.budget_bytes)
        self.runtime.check(payload.artifact)
        parse_uri(payload.artifact.uri)

    def _download(self, release: Release, artifact: Artifact) -> Path:
        dest = self.store.slot_file(release.model, release.version, slot_suffix(artifact))
        self._save(pending=Pending(release, "downloading"))
        if dest.is_file():
            if file_sha256(dest) == artifact.sha256:
                log.info("event=update_download_skipped model=%s version=%d reason=verified_file_present",
                         release.model, release.version)
                return dest
            dest.unlink()
        part = dest.with_name(dest.name + ".part")
        done = part.stat().st_size if part.is_file() else 0
        size = artifact.size
        self.reporter.enter(release.model, release.version, "downloading",
                            progress=round(min(done / size, 1.0), 4) if size else 1.0)
        reported = [int(done * 10 / size) if size else 10]

        def progress(done: int, total: int) -> None:
            if self._stopping.is_set():
                raise Stopping
            self.faults.after("downloading")
            tenth = int(done * 10 / total) if total else 10
            if tenth > reported[0]:  # every 10 %
                reported[0] = tenth
                self.reporter.report(release.model, release.version, "downloading",
                                     progress=round(done / total, 4))

        tls, token = self._transport()
        return download(artifact.uri, dest, sha256=artifact.sha256, size=size,
                        budget=self.config.model.budget_bytes,
                        allowed_roots=self.config.fleet.allowed_file_roots, tls=tls, token=token,
                        progress=progress)

    def _transport(self) -> tuple[TransportTLS | None, str | None]:
        cloud = self.config.cloud
        tls = None
        if cloud.tls is not None:
            tls = TransportTLS(cloud.tls.ca, cloud.tls.cert, cloud.tls.key, cloud.tls.server_name)
        token = read_token(cloud.token_file) if cloud.token_file else None
        return tls, token

    def _build_engine(self, onnx: Path, out: Path) -> object:
        options = BuildOptions(budget_bytes=self.config.model.budget_bytes)
        return build_engine(onnx, out, options, device=self.runtime.device)

    def _stage(self, release: Release, servable: Path, payload: Mapping[str, Any]) -> EdgeModel:
        """The candidate in the second slot: loaded under the ``[cascade]`` flags in force (a reload
        since start included) and self-tested against the serving model."""
        try:
            candidate = load_edge_model(self.config, servable, str(release.version), payload,
                                        flags=self.slot.flags,
                                        check=lambda backend: check_contract(self.slot.model, backend))
        except ReleaseRejected:  # contract_mismatch
            raise
        except Exception as e:  # ModelLoadError, or a runtime's own error during warm-up
            raise ReleaseRejected(Reason.UNLOADABLE, f"{servable.name}: {e}") from None
        try:
            self_test(candidate, self.slot.model, self.config.update.self_test_rows)
            self._step(release, "staged")
        except BaseException:
            candidate.backend.close()
            raise
        return candidate

    def _swap_and_watch(self, release: Release, candidate: EdgeModel, slot: Slot) -> None:
        before = self.state
        self._save(active=slot, previous=before.active, pending=Pending(release, "watching"))
        replaced = self.slot.swap(candidate)
        self.faults.after("swapped")
        self.reporter.enter(release.model, release.version, "active")
        try:
            reason = self._watch(replaced, candidate)
        except Stopping:  # a clean stop is no verdict: start on the previous model, and the retained
            # desired release applies again (its verified file is kept); only a crash counts against it
            self._save(active=before.active, previous=before.previous, pending=None)
            self._retired.append(replaced)
            raise
        except Superseded:
            self._save(pending=None)
            self._retired.append(replaced)
            log.info("event=update_watch_cut_short device=%s model=%s version=%d reason=new_desired_release",
                     self.device, release.model, release.version)
            self.reporter.event("update.watch_cut_short", model=release.model, version=release.version)
            return
        if reason is None:
            self._save(pending=None)
            self._retired.append(replaced)
            log.info("event=update_watch_passed device=%s model=%s version=%d", self.device, release.model,
                     release.version)
            self.reporter.event("update.watch_passed", model=release.model, version=release.version)
        else:
            self.slot.swap(replaced)
            self._save(active=before.active, previous=before.previous, pending=None,
                       rolled_back=self.state.with_rolled_back(release, slot.issued_at).rolled_back)
            self._retired.append(candidate)
            self.reporter.enter(release.model, release.version, "rolled_back", reason=reason)
        self.store.prune(self.state)

    def _watch(self, previous: EdgeModel, new: EdgeModel) -> str | None:
        """Wait out the window, then judge the new model's calls against the previous model's;
        Superseded when :attr:`watch_cut` ends it early."""
        update = self.config.update
        if self._stopping.is_set():  # set before the follower cleared watch_cut for this release
            raise Stopping
        cut = self.watch_cut.wait(update.watch_s)
        if self._stopping.is_set():
            raise Stopping
        if cut:
            raise Superseded
        before, after = figures(previous), figures(new)
        log.info("event=update_watch_done device=%s version=%s calls=%d errors=%d latency=%s "
                 "previous_calls=%d previous_errors=%d previous_latency=%s", self.device, new.version,
                 after.calls, after.errors, after.summary(), before.calls, before.errors, before.summary())
        return regression(before, after, update.max_error_rate, update.max_latency_factor)

    # -- state ---------------------------------------------------------------------------------------------
    def _save(self, **changes: Any) -> None:
        self.state = replace(self.state, **changes)
        self.store.save(self.state)

    def _step(self, release: Release, step: str) -> None:
        """A completed step: persisted, reported, and a fault point."""
        if self._stopping.is_set():
            raise Stopping
        self._save(pending=Pending(release, step))
        self.reporter.enter(release.model, release.version, step)
        self.faults.after(step)
