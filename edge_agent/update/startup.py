"""What the agent serves after a restart, and what it then tells the fleet (docs/design.md §7: a power cut at
any step restarts on the last good model).

The last good model is the state's active slot; after a restart inside a watch window (a crash loop)
the previous slot instead, and that release is marked rolled back (until it is published again, see
``state.py``). A slot file that does
not load gives way to the next, and with none left the configured model serves. A release that was
in progress is dropped from the state: its retained desired message starts it again, and a download
resumes from its partial file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from edge_agent.config import AgentConfig
from edge_agent.serving.slot import EdgeModel, load_edge_model
from edge_agent.update.report import Reporter
from edge_agent.update.state import Release, Slot, StateStore, UpdateState
from edge_agent.update.watch import metered
from edgecloud.errors import ModelLoadError
from edgecloud.release import RollbackReason

log = logging.getLogger(__name__)

#: how long the update thread waits for the broker to report what happened at start
CONNECT_WAIT_S = 10.0


def load_slot(config: AgentConfig, store: StateStore, slot: Slot) -> EdgeModel:
    """Load a slot's file with its release's calibration and labels."""
    path = store.absolute(slot)
    if not path.is_file():
        raise ModelLoadError(f"slot file {path} is missing")
    return load_edge_model(config, path, str(slot.version), slot.release)


@dataclass(frozen=True)
class Startup:
    """The model the agent starts with (metered for a watch window in a fleet), the state it came from, and
    what to tell the fleet once connected."""

    model: EdgeModel
    store: StateStore
    state: UpdateState
    rolled_back: Release | None = None  # restarted inside this release's watch window
    corrupt: str | None = None


def load_startup(config: AgentConfig) -> Startup:
    """The last good model: the state's active slot (its previous one after a restart inside a watch
    window, or when the active file does not load), else the configured model."""
    store = StateStore(config.agent.state_dir)
    loaded, corrupt = store.load()
    state, crashed = loaded, None
    if state.pending and state.pending.step == "watching":
        crashed = state.pending.release
        issued_at = state.active.issued_at if state.active else None  # the slot being watched
        state = replace(state.with_rolled_back(crashed, issued_at), active=state.previous, previous=None,
                        pending=None)
        log.error("event=update_crash_loop model=%s version=%d action=roll_back", crashed.model,
                  crashed.version)
    elif state.pending:  # the retained desired release starts it again (a download resumes)
        log.info("event=update_interrupted model=%s version=%d step=%s", state.pending.release.model,
                 state.pending.release.version, state.pending.step)
        state = replace(state, pending=None)
    model, served = None, None
    for slot in (state.active, state.previous):
        if slot is None:
            continue
        try:
            model, served = load_slot(config, store, slot), slot
            break
        except Exception as e:  # ModelLoadError, or a runtime's own error during warm-up: try the next
            log.error("event=slot_unloadable version=%d path=%s error=%r", slot.version, slot.path, str(e))
    if served is not state.active:
        state = replace(state, active=served, previous=None)
    if state != loaded:
        store.save(state)
    if model is None:
        model = load_edge_model(config)
    log.info("event=update_state_restored active=%s previous=%s serving_version=%s",
             state.active.version if state.active else "config",
             state.previous.version if state.previous else "config", model.version)
    if config.fleet.name:  # only a fleet member gets releases to watch
        model = metered(model)
    return Startup(model, store, state, crashed, corrupt)


def announce_startup(startup: Startup, reporter: Reporter) -> None:
    """Tell the fleet about a crash loop rolled back or a corrupt state set aside; waits (a while) for
    the broker, and a report it could not send waits for the next connect."""
    if startup.rolled_back is None and startup.corrupt is None:
        return
    if not reporter.wait_connected(CONNECT_WAIT_S):  # events are best effort
        log.warning("event=update_startup_not_announced device=%s reason=not_connected", reporter.device)
    if startup.corrupt:
        reporter.event("update.state_corrupt", "error", detail=startup.corrupt)
    if startup.rolled_back:
        release = startup.rolled_back
        reporter.enter(release.model, release.version, "rolled_back",
                       reason=f"{RollbackReason.CRASH_LOOP.value}: restarted during the watch window")
