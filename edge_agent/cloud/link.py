"""The link to the cloud: one gRPC channel to any KServe v2 server, its circuit breaker, and the
one-time check that the cloud model speaks the edge model's contract.

An edge model that takes encoded frames escalates a frames request's original bytes (docs/design.md
§10) to a cloud model that lists the same frames input; that cloud's tensor input may differ (it often
looks at more pixels), and then only a tensor request is refused, per call (CloudIncompatible, never
spooled). A cloud model without the frames input gets the frames decoded into the edge model's tensor
instead, so a plain KServe v2 cloud keeps working. Either way the outputs must match.

Recovery: while the cloud is away the channel retries its connection at most about a second apart
(``edgecloud.channel.RECONNECT_OPTIONS``), and the moment it is connected again an open circuit is
probed (the next escalation is its trial), so the first cloud answer follows the cloud's return
within about a second, not after gRPC's grown backoff or the rest of ``reset_s``.

The contract check is a ModelMetadata round trip: it is made in the background when the link starts
and whenever the channel connects again after a loss, so an escalation does not spend a round trip of
its deadline on it (with a 250 ms cloud and a 300 ms deadline, it would not fit twice). An escalation
that finds its model unchecked (a new release, a check still under way) checks inline, within the same
deadline as its ModelInfer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc

from edge_agent.cloud.circuit import CircuitBreaker
from edge_agent.config import CloudSection
from edge_agent.serving.slot import EdgeModel
from edgecloud.channel import bearer_metadata, open_channel
from edgecloud.client import KServeClient
from edgecloud.errors import EdgecloudError
from edgecloud.preprocess import decode_frames
from edgecloud.protocol.codec import (
    InferRequest,
    InferResponse,
)
from edgecloud.tensors import contract_differences

log = logging.getLogger(__name__)
#: the background contract check's own timeout: no caller waits on it
CHECK_TIMEOUT_S = 10.0


class CloudError(EdgecloudError):
    """The cloud did not answer usably: down, slow, rejecting, or circuit open."""


class CloudIncompatible(CloudError):
    """The cloud model's inputs/outputs differ from the edge model's: escalation is disabled."""


@dataclass(frozen=True, slots=True)
class CloudState:
    """What the agent knows about its cloud, for telemetry and logs."""

    circuit: str
    compatible: bool | None
    error: str


class CloudLink:
    """Sends escalations; fails fast while the circuit is open or the contract check failed."""

    def __init__(self, cfg: CloudSection, on_circuit_change: Callable[[str, str], None] | None = None):
        self.cfg = cfg
        target = cfg.target or ""
        self._channel = open_channel(target, cfg.tls, what="cloud.target")
        self._client = KServeClient(target, self._channel, bearer_metadata(cfg.token_file))
        self.circuit = CircuitBreaker(cfg.failure_threshold, cfg.reset_s, on_change=on_circuit_change)
        self._channel.subscribe(self._connectivity, try_to_connect=True)
        self._checked_for: tuple[str, str] | None = None  # (edge name, edge version) checked
        self._incompatible = ""
        self._frames_ok = False  # the cloud model takes the edge model's frames input
        self._tensors_differ = ""  # how the cloud's tensor inputs differ, when it takes the edge's frames
        self._last_error = ""
        self._lock = threading.Lock()
        self._edge: EdgeModel | None = None  # the model the next background check is for
        self._checks: list[threading.Thread] = []  # background checks, joined by close()
        self._closed = False

    def model_name(self, edge: EdgeModel) -> str:
        return self.cfg.model or edge.name

    @property
    def state(self) -> CloudState:
        compatible = None if self._checked_for is None else not self._incompatible
        return CloudState(self.circuit.state, compatible, self._incompatible or self._last_error)

    def prepare(self, edge: EdgeModel) -> None:
        """Check ``edge``'s contract in the background, before an escalation needs it; a cloud that
        cannot be reached now is checked when the channel connects, or inline by the first escalation."""
        self._edge = edge
        with self._lock:
            if self._closed:
                return
            self._checks = [t for t in self._checks if t.is_alive()]
            check = threading.Thread(target=self._check_quietly, args=(edge,), name="cloud-contract",
                                     daemon=True)
            self._checks.append(check)
        check.start()

    def _check_quietly(self, edge: EdgeModel) -> None:
        try:
            self._check_contract(edge, CHECK_TIMEOUT_S)
        except ValueError:
            if not self._closed:  # gRPC's word for a call on a closed channel
                raise
        except grpc.RpcError as e:
            if self._closed:
                return
            log.info("event=cloud_check_deferred cloud_model=%s error=%s", self.model_name(edge),
                     e.code().name)
        except CloudIncompatible:
            pass  # logged by the check; escalations fail fast on it
        except EdgecloudError as e:
            log.info("event=cloud_check_deferred cloud_model=%s error=%r", self.model_name(edge), str(e))

    def _check_contract(self, edge: EdgeModel, timeout: float) -> None:
        """ModelMetadata once per edge model: the cloud must take its inputs and give its outputs."""
        key = (edge.name, edge.version)
        if self._checked_for == key:
            if self._incompatible:
                raise CloudIncompatible(self._incompatible)
            return
        meta = self._client.metadata(self.model_name(edge), self.cfg.model_version, timeout=timeout)
        tensors = contract_differences(edge.inputs, meta.inputs, "cloud input")
        problems = contract_differences(edge.outputs, meta.outputs, "cloud output")
        frames_ok = False
        if edge.preprocess is not None:
            fed = edge.preprocess.input
            frames_inputs = (*(s for s in edge.inputs if s.name != fed), edge.preprocess.frames_spec)
            frames_ok = not contract_differences(frames_inputs, meta.inputs, "cloud input")
        if not frames_ok:
            problems = tensors + problems
        with self._lock:
            self._checked_for = key
            self._incompatible = "; ".join(problems)
            self._frames_ok = frames_ok
            self._tensors_differ = "; ".join(tensors)
        if problems:
            log.error("event=cloud_incompatible cloud_model=%s edge_model=%s edge_version=%s problems=%r "
                      "action=escalation_disabled", meta.name, edge.name, edge.version, self._incompatible)
            raise CloudIncompatible(self._incompatible)
        log.info("event=cloud_compatible cloud_model=%s versions=%s", meta.name, ",".join(meta.versions))

    def ask(self, edge: EdgeModel, request: InferRequest, timeout: float) -> InferResponse:
        """One upstream ModelInfer within ``timeout`` seconds, or CloudError saying why not."""
        if self._incompatible and self._checked_for == (edge.name, edge.version):
            raise CloudIncompatible(self._incompatible)
        if not self.circuit.allow():
            raise CloudError("circuit open")
        self._edge = edge
        deadline = time.monotonic() + timeout
        try:
            self._check_contract(edge, timeout)
            response = self._client.send(self._fitted(edge, request), max(deadline - time.monotonic(), 0.001))
        except CloudIncompatible:
            self.circuit.success()  # the link works; the model does not fit
            raise
        except grpc.RpcError as e:
            self.circuit.failure()
            self._last_error = f"{e.code().name}: {e.details()}"
            if self.circuit.state != "closed":
                self._checked_for = None  # re-check the contract when the cloud comes back
            raise CloudError(self._last_error) from e
        except EdgecloudError as e:  # an undecodable answer
            self.circuit.failure()
            self._last_error = str(e)
            raise CloudError(f"bad cloud answer: {e}") from e
        self.circuit.success()
        self._last_error = ""
        return response

    def _fitted(self, edge: EdgeModel, request: InferRequest) -> InferRequest:
        """``request`` as the cloud model takes it: frames for a cloud without the frames input go as the
        edge model's tensor (decoded again, as the cascade did); a tensor request to a cloud that takes
        frames and another tensor is CloudIncompatible."""
        spec = edge.preprocess
        if spec is None:
            return request
        if spec.frames not in request.inputs:
            if self._tensors_differ and self._frames_ok:
                raise CloudIncompatible(f"the cloud model takes frames; a tensor request cannot escalate: "
                                        f"{self._tensors_differ}")
            return request
        if self._frames_ok:
            return request
        fed = next(s for s in edge.inputs if s.name == spec.input)
        tensor = decode_frames(request.inputs[spec.frames], spec, fed.datatype, max_pixels=2**62).tensor
        inputs = {name: value for name, value in request.inputs.items() if name != spec.frames}
        return replace(request, inputs={**inputs, spec.input: tensor})

    def _connectivity(self, state: grpc.ChannelConnectivity) -> None:  # gRPC's thread: no blocking
        if state is grpc.ChannelConnectivity.READY:
            self.circuit.probe()
            edge = self._edge
            if edge is not None and self._checked_for != (edge.name, edge.version):
                self.prepare(edge)

    def close(self) -> None:
        """Close the channel, which ends a background check under way, and wait for those checks: none
        logs after the agent stopped."""
        with self._lock:
            self._closed = True
            checks = list(self._checks)
        self._channel.unsubscribe(self._connectivity)
        self._client.close()
        for check in checks:
            check.join(timeout=CHECK_TIMEOUT_S)
