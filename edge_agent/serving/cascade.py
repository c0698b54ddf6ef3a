"""The cascade (docs/design.md §4): answer every row at the edge, send the unsure ones to the cloud in one
call, and never let the cloud's absence become the client's error.

An escalation waits for the cloud on its request's gRPC thread, so escalations in flight are bounded
(``cloud.max_in_flight`` slots) and the server runs that many threads beyond ``agent.workers`` and the
admission bounds; an escalating call gives its admission slot back before it waits
(:func:`~edgecloud.protocol.admission.release_slot`), so admission bounds the work done on the device
and edge answers always find a slot and a thread, however slow a live cloud is. A call that finds every
escalation slot taken is answered by the edge at once (``degraded``), its rows counted as
``in_flight_limited`` and its case spooled. Chosen by measurement (2 cores, a 250 ms cloud, 16
escalating clients): an ``escalate=never`` caller's p50 was 96-290 ms with escalations on 8 request
threads, 38-276 ms with an escalation executor the request thread waits on (it still holds the
thread), 0.86-1.5 ms with the slots and 0.8-1.1 ms with a grpc.aio prototype, which would have turned
the shared servicer asynchronous and run every edge model call on one event loop.

Encoded frames (docs/design.md §10) are decoded into the model's input first, at most
``frames.max_decoding`` requests at a time; the cloud gets the original encoded bytes of the unsure
rows, so it can apply its own preprocessing. ``escalate=background`` answers from the edge at once
and sends the unsure rows on the audits' bounded background path; a request naming its
``edgecloud.stream`` reuses the stream's last cloud answer for a frame showing the same scene.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edge_agent.cloud.link import CloudError, CloudIncompatible, CloudLink
from edge_agent.cloud.ratelimit import TokenBucket
from edge_agent.cloud.spool import Spool
from edge_agent.config import FramesSection
from edge_agent.serving.quality import Quality
from edge_agent.serving.slot import EdgeModel, ModelSlot
from edge_agent.serving.stats import CallRecord, Stats, confidence_bins
from edge_agent.serving.streams import StreamMemory
from edgecloud import __version__
from edgecloud.agreement import frames_agree, top1
from edgecloud.errors import InvalidInput, ModelNotFound
from edgecloud.guards import InputContract
from edgecloud.preprocess import Frames, Geometry, decode_frames, remap_boxes
from edgecloud.protocol.admission import release_slot
from edgecloud.protocol.codec import InferRequest, InferResponse, ModelMetadata
from edgecloud.protocol.detections import detections_output, top_label
from edgecloud.protocol.outputs import select_outputs
from edgecloud.protocol.parameters import (
    AUDIT_REASONS,
    DETECTIONS,
    AgentRequest,
    AgentResponse,
    CloudResponse,
    Collaboration,
    EdgeSummary,
    EscalationReason,
)
from edgecloud.protocol.servicer import PeerInfo
from edgecloud.tensors import TensorSpec, check_inputs

log = logging.getLogger(__name__)

ESCALATE_MODES = ("auto", "always", "never", "background")
CONFIDENCE_OUTPUT = TensorSpec(str(AgentResponse.CONFIDENCE), "FP32", (-1,))
SOURCE_OUTPUT = TensorSpec(str(AgentResponse.SOURCE), "BYTES", (-1,))
DETECTIONS_OUTPUT = TensorSpec(DETECTIONS, "BYTES", (-1,))


@dataclass(frozen=True, slots=True)
class CascadeOptions:
    """Per-request choices read from the request parameters."""

    escalate: str
    threshold: float
    stream: str = ""

    @classmethod
    def parse(cls, params: Mapping[str, object], default_threshold: float,
              default_escalate: str = "auto") -> CascadeOptions:
        mode = params.get(AgentRequest.ESCALATE, default_escalate)
        if mode not in ESCALATE_MODES:
            raise InvalidInput(f"parameter {AgentRequest.ESCALATE}: {mode!r}, expected one of "
                               f"{list(ESCALATE_MODES)}")
        threshold = params.get(AgentRequest.THRESHOLD, default_threshold)
        if not AgentRequest.THRESHOLD.accepts(threshold) or not math.isfinite(threshold):
            raise InvalidInput(f"parameter {AgentRequest.THRESHOLD}: {threshold!r}, expected a finite number")
        stream = params.get(AgentRequest.STREAM, "")
        if not isinstance(stream, str):
            raise InvalidInput(f"parameter {AgentRequest.STREAM}: {stream!r}, expected a string")
        return cls(str(mode), float(threshold), stream)


@dataclass(slots=True)
class _Call:
    """One request on its way through the cascade."""

    model: EdgeModel
    request: InferRequest
    outputs: dict[str, np.ndarray]
    confidence: np.ndarray
    #: each frame's grayscale thumbnail, for a frames request that names its stream
    thumbnails: np.ndarray | None = None
    #: each frame's (width, height), for a frames request
    frame_sizes: np.ndarray | None = None
    stream: str = ""
    _request_id: str = ""

    @property
    def stream_key(self) -> tuple[str, str, str]:
        return self.model.name, self.model.version, self.stream

    def merge(self, rows: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        """Put ``values`` (one row each per row of ``rows``) into the outputs at ``rows``."""
        for name, rows_values in values.items():
            merged = np.array(self.outputs[name], copy=True)
            merged[rows] = rows_values
            self.outputs[name] = merged

    @property
    def request_id(self) -> str:
        """The client's id, else one made the first time the cloud needs one (an edge answer never)."""
        if not self._request_id:
            self._request_id = self.request.id or uuid.uuid4().hex
        return self._request_id


class Cascade:
    """The agent's InferenceHost: edge model first, cloud for the rows that want it."""

    server_name = "edgecloud-edge-agent"
    server_version = __version__

    def __init__(self, slot: ModelSlot, device_id: str, link: CloudLink | None = None,
                 spool: Spool | None = None, bucket: TokenBucket | None = None,
                 deadline_s: float = 0.3, stats: Stats | None = None,
                 max_in_flight: int = 16, frames: FramesSection | None = None,
                 decoding: threading.Semaphore | None = None) -> None:
        """``decoding``: the bound on requests decoding frames at once, shared by the agent's models
        (``frames.max_decoding`` is the agent's); one of its own when not given."""
        self.slot = slot
        self.device_id = device_id
        self.link = link
        self.spool = spool
        self.bucket = bucket
        self.deadline_s = deadline_s
        self.stats = stats or Stats()
        # agreement with the cloud, per served version: a swap starts the new version's counts
        self.quality = Quality(slot.model.version)
        slot.on_swap(lambda model: self.quality.activate(model.version))
        self.accepting = True
        self._slots = threading.BoundedSemaphore(max_in_flight)  # escalations waiting on the cloud
        # audits and background escalations never pile up behind a slow cloud
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="background")
        self._background_slots = threading.BoundedSemaphore(8)
        self._random = random.Random()
        self.frames = frames or FramesSection()
        self.decoding = decoding or threading.BoundedSemaphore(self.frames.max_decoding)
        self.streams = StreamMemory(self.frames.reuse_window_s, self.frames.reuse_max_mad)

    # --- InferenceHost ------------------------------------------------------------------------

    def is_live(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return self.accepting

    def _model_for(self, name: str, version: str) -> EdgeModel:
        model = self.slot.model
        if name != model.name:
            raise ModelNotFound(f"unknown model {name!r}; this agent serves {model.name!r}")
        if version and version != model.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; serving {model.version!r}")
        return model

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self._model_for(name, version)
        except ModelNotFound:
            return False
        return self.accepting

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        model = self._model_for(name, version)
        extras = (CONFIDENCE_OUTPUT, SOURCE_OUTPUT) + ((DETECTIONS_OUTPUT,) if model.detection else ())
        return ModelMetadata(name=model.name, versions=(model.version,), platform=model.backend.platform,
                             inputs=model.served_inputs, outputs=(*model.outputs, *extras))

    def input_contract(self, name: str, version: str) -> InputContract:
        return self._model_for(name, version).contract

    def model_index(self) -> tuple[tuple[str, str], ...]:
        model = self.slot.model
        return ((model.name, model.version),)

    def infer(self, request: InferRequest, peer: PeerInfo | None = None) -> InferResponse:
        """Answer one request; failures of the model itself (not of the request) are counted."""
        try:
            return self._infer(request)
        except (InvalidInput, ModelNotFound):
            raise
        except Exception:
            self.stats.error()
            raise

    def _infer(self, request: InferRequest) -> InferResponse:
        started = time.perf_counter()
        model = self._model_for(request.model_name, request.model_version)
        options = CascadeOptions.parse(request.parameters, model.settings.threshold, self.slot.flags.escalate)
        inputs, frames = self._model_inputs(model, request, bool(options.stream))
        rows = check_inputs(model.inputs, inputs, model.name)
        outputs = model.backend.infer(inputs)
        confidence = np.asarray(model.settings.policy(outputs), dtype=np.float32).reshape(-1)
        if confidence.shape[0] != rows:
            raise InvalidInput(f"confidence policy {model.settings.policy_name!r} gave "
                               f"{confidence.shape[0]} values for {rows} rows")
        confidence = model.contract.guard_confidence(inputs, confidence, request.in_range)
        call = _Call(model, request, dict(outputs), confidence, frames and frames.thumbnails,
                     frames and frames.sizes, options.stream)

        wants = self._wants_cloud(confidence, options)
        reused = self._reuse(call, wants, options.escalate)
        sent, rate_limited = self._admit(wants & ~reused, options.escalate)
        from_cloud = reused.copy()
        degraded, in_flight_limited = False, 0
        if sent.size and options.escalate == "background":
            self._in_background(call, sent, "low_confidence")
        elif sent.size:
            reason = "forced" if options.escalate == "always" else "low_confidence"
            if self._slots.acquire(blocking=False):
                release_slot()  # the wait on the cloud is bounded by these slots, not by admission
                try:
                    degraded = not self._escalate(call, sent, reason)
                finally:
                    self._slots.release()
            else:
                degraded, in_flight_limited = True, int(sent.size)
                self._degraded(call, self._upstream(call, sent, reason)[0], sent.size, "in_flight_limit",
                               time.perf_counter())
            from_cloud[sent] = not degraded
        if options.escalate != "never":
            self._maybe_audit(call, wants)

        confidences = confidence.tolist()
        bins = confidence_bins(confidences)
        self.stats.record(CallRecord(
            rows=rows, escalated_rows=int(sent.size), cloud_rows=int(from_cloud.sum() - reused.sum()),
            degraded_rows=int(sent.size) if degraded else 0, rate_limited_rows=rate_limited,
            in_flight_limited_rows=in_flight_limited, reused_rows=int(reused.sum()),
            latency_s=time.perf_counter() - started, confidences=confidences), bins)
        self.quality.answered(model.version, rows, bins)
        params = self._parameters(call, from_cloud, degraded, rate_limited)
        params[AgentResponse.ESCALATED] = bool(sent.size)
        params[AgentResponse.REUSED] = bool(reused.any())
        return InferResponse(model_name=model.name, model_version=model.version, id=request.id,
                             outputs=self._select_outputs(call, from_cloud), parameters=params)

    # --- steps ----------------------------------------------------------------------------------

    def _model_inputs(self, model: EdgeModel, request: InferRequest,
                      thumbnails: bool) -> tuple[Mapping[str, np.ndarray], Frames | None]:
        """The model's inputs: the request's, with its frames (when it sent some) decoded into the
        input they feed; and the decoded frames (with thumbnails when ``thumbnails`` asks for them)."""
        spec = model.preprocess
        if spec is None or spec.frames not in request.inputs:
            return request.inputs, None
        fed = next(s for s in model.inputs if s.name == spec.input)
        with self.decoding:
            frames = decode_frames(request.inputs[spec.frames], spec, fed.datatype, self.frames.max_pixels,
                                   thumbnails)
        inputs = {k: v for k, v in request.inputs.items() if k != spec.frames}
        inputs[spec.input] = frames.tensor
        return inputs, frames

    def _reuse(self, call: _Call, wants: np.ndarray, mode: str) -> np.ndarray:
        """Rows wanting the cloud that take their stream's last cloud answer instead (the same scene,
        within the window), with those answers merged into the outputs; a mask of them."""
        reused = np.zeros(wants.shape[0], dtype=bool)
        if call.thumbnails is None or not call.stream or mode == "always" or not self.streams.enabled:
            return reused
        for row in np.flatnonzero(wants):
            answer = self.streams.reuse(call.stream_key, call.thumbnails[row])
            if answer is not None:
                call.merge(np.array([row]), {name: value[None] for name, value in answer.items()})
                reused[row] = True
        return reused

    def _remember(self, call: _Call, rows: np.ndarray, cloud_rows: Mapping[str, np.ndarray]) -> None:
        """Keep the cloud's answer for the last of ``rows`` as its stream's latest."""
        if call.thumbnails is not None and call.stream and self.streams.enabled and rows.size:
            self.streams.remember(call.stream_key, call.thumbnails[rows[-1]],
                                  {name: values[-1] for name, values in cloud_rows.items()})

    def _wants_cloud(self, confidence: np.ndarray, options: CascadeOptions) -> np.ndarray:
        if options.escalate == "never" or self.link is None:
            return np.zeros(confidence.shape[0], dtype=bool)
        if options.escalate == "always":
            return np.ones(confidence.shape[0], dtype=bool)
        return confidence < options.threshold

    def _admit(self, wants: np.ndarray, mode: str) -> tuple[np.ndarray, int]:
        """Rows that go to the cloud, and how many the rate limit kept at the edge."""
        rows = np.flatnonzero(wants)
        if mode == "always" or self.bucket is None or rows.size == 0:
            return rows, 0
        granted = self.bucket.take(int(rows.size))
        return rows[:granted], int(rows.size - granted)

    def _upstream(self, call: _Call, rows: np.ndarray,
                  reason: EscalationReason) -> tuple[InferRequest, list[int] | None]:
        """The request that asks the cloud for ``rows``, and the edge's top class of each (None for a
        detector: its answer is its boxes, not one class, and the store keeps the cloud's boxes)."""
        model, confidence = call.model, call.confidence
        scores = call.outputs[model.settings.score_output]
        prediction = None if model.detection else top1(scores[rows]).tolist()
        summary = EdgeSummary(rows=rows.tolist(), prediction=prediction,
                              confidence=[round(float(c), 6) for c in confidence[rows]], reason=reason)
        params = Collaboration(call.request_id, self.device_id, model.version, summary).parameters()
        request = InferRequest(model_name=self.link.model_name(model),
                               model_version=self.link.cfg.model_version, id=call.request_id,
                               inputs={k: v[rows] for k, v in call.request.inputs.items()}, parameters=params)
        return request, prediction

    def _escalate(self, call: _Call, rows: np.ndarray, reason: EscalationReason) -> bool:
        """Ask the cloud for ``rows`` and merge its answer into the call's outputs; False when degraded."""
        upstream, prediction = self._upstream(call, rows, reason)
        size = upstream_bytes(upstream)
        self.stats.upstream(size)
        started = time.perf_counter()
        try:
            cloud_rows = self._cloud_rows(call, self.link.ask(call.model, upstream, self.deadline_s), rows)
        except CloudError as e:
            self._degraded(call, upstream, rows.size, str(e), started,
                           keep=not isinstance(e, CloudIncompatible))
            return False
        self._compare(call, call.outputs, rows, prediction, cloud_rows, reason)  # the edge's, before merging
        call.merge(rows, cloud_rows)
        self._remember(call, rows, cloud_rows)
        log.info("event=escalation request_id=%s rows=%d outcome=cloud bytes=%d latency_ms=%.1f",
                 call.request_id, rows.size, size, (time.perf_counter() - started) * 1000)
        return True

    def _degraded(self, call: _Call, upstream: InferRequest, rows: int, error: str, started: float,
                  keep: bool = True) -> None:
        """Log an escalation the cloud did not answer and spool its case, replayed once the cloud is back
        (``keep`` False: an incompatible cloud can never use it). The spool's writer thread does the
        disk work: the call does not wait for it."""
        spooled = keep and self.spool is not None and self.spool.put(upstream)
        log.info("event=escalation request_id=%s rows=%d outcome=degraded error=%r spooled=%s "
                 "latency_ms=%.1f", call.request_id, rows, error, spooled,
                 (time.perf_counter() - started) * 1000)

    def _cloud_rows(self, call: _Call, reply: InferResponse, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The cloud's answer for ``rows``, output by output; a detector's boxes in the edge model's
        input pixels, when the cloud says its own input took the frames another way (another size, or
        letterboxed)."""
        cloud_rows = {spec.name: self._cloud_output(reply.outputs, spec, rows.size)
                      for spec in call.model.outputs}
        detection, spec = call.model.detection, call.model.preprocess
        geometry = reply.parameters.get(CloudResponse.INPUT_GEOMETRY)
        if detection is None or spec is None or call.frame_sizes is None or not geometry:
            return cloud_rows
        try:
            cloud = Geometry.parse(str(geometry))
        except ValueError as e:
            raise CloudError(f"bad cloud answer: {CloudResponse.INPUT_GEOMETRY}: {e}") from None
        if cloud != spec.geometry:
            boxes, scores = cloud_rows[detection.boxes], cloud_rows[detection.scores]
            cloud_rows[detection.boxes] = remap_boxes(boxes, scores, call.frame_sizes[rows], cloud,
                                                      spec.geometry)
        return cloud_rows

    @staticmethod
    def _cloud_output(outputs: Mapping[str, np.ndarray], spec: TensorSpec, rows: int) -> np.ndarray:
        if spec.name not in outputs:
            raise CloudError(f"bad cloud answer: output {spec.name!r} missing")
        values = outputs[spec.name]
        if values.shape[0] != rows:
            raise CloudError(f"bad cloud answer: output {spec.name!r} has {values.shape[0]} rows, "
                             f"{rows} were sent")
        return values

    def _maybe_audit(self, call: _Call, wants: np.ndarray) -> None:
        """Send a random share of confident rows to the cloud in the background (drift watching); for a
        detector, first a share (``empty_audit_rate``) of its frames with no box at all, since a score
        rule never escalates a missed defect."""
        if self.link is None:
            return
        confident = ~wants
        detection = call.model.detection
        if detection is not None:
            empty = np.flatnonzero(confident & detection.empty(call.outputs))
            chosen = self._sample(empty, self.slot.flags.empty_audit_rate)
            confident[empty] = False  # an empty frame is audited at its own share
            if chosen.size:
                self._in_background(call, chosen, "empty_frame")
        chosen = self._sample(np.flatnonzero(confident), self.slot.flags.audit_rate)  # a reload applies too
        if chosen.size:
            self._in_background(call, chosen, "audit")

    def _sample(self, rows: np.ndarray, share: float) -> np.ndarray:
        """Each of ``rows`` with probability ``share``, as far as the escalation rate limit has tokens:
        audits count inside the escalation budget, so the limit caps them too (docs/design.md §12); a
        row chosen that finds no token is not audited."""
        if not share or not rows.size:
            return rows[:0]
        chosen = rows[np.array([self._random.random() < share for _ in rows], dtype=bool)]
        if self.bucket is None or not chosen.size:
            return chosen
        return chosen[:self.bucket.take(int(chosen.size))]

    def _in_background(self, call: _Call, rows: np.ndarray, reason: EscalationReason) -> None:
        """Send ``rows`` to the cloud without the client waiting (audits, ``escalate=background``), at
        most as many at once as there are background slots. An unsure row that finds none, or whose
        cloud fails, is spooled, so the store still gets it; an audit that finds none is skipped."""
        upstream, prediction = self._upstream(call, rows, reason)
        edge = dict(call.outputs)  # the edge's own answer for ``rows``, whatever is merged in later
        if not self._background_slots.acquire(blocking=False):
            if reason not in AUDIT_REASONS and self.spool is not None:
                self.spool.put(upstream)
            return
        if reason not in AUDIT_REASONS:
            self.stats.upstream(upstream_bytes(upstream))

        def send() -> None:
            try:
                cloud_rows = self._cloud_rows(call, self.link.ask(call.model, upstream,
                                                                  max(self.deadline_s, 5.0)), rows)
            except CloudError:
                if self.spool is not None:
                    self.spool.put(upstream)
                return
            finally:
                self._background_slots.release()
            self._compare(call, edge, rows, prediction, cloud_rows, reason)
            if reason in AUDIT_REASONS:
                self.stats.audit()  # last: an audit counted is one fully handled
            else:
                self._remember(call, rows, cloud_rows)

        self._background.submit(send)

    def _compare(self, call: _Call, edge: Mapping[str, np.ndarray], rows: np.ndarray,
                 prediction: list[int] | None, cloud_rows: Mapping[str, np.ndarray],
                 reason: EscalationReason) -> None:
        """Count how many of ``rows``, answered by the cloud in time, it answered as the edge did
        (docs/design.md §12): ``edge`` holds the edge's own outputs for them, ``prediction`` the edge's
        top class of each (a classifier's)."""
        model = call.model
        if model.detection is None:
            agree = top1(cloud_rows[model.settings.score_output]) == np.asarray(prediction)
        else:
            edge_rows = {name: edge[name][rows] for name in model.detection.names()}
            agree = frames_agree(model.detection, edge_rows, cloud_rows)
        self.quality.compared(model.version, reason in AUDIT_REASONS, int(rows.size), int(agree.sum()))

    @staticmethod
    def _select_outputs(call: _Call, from_cloud: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs a client asked for by name (all the model's when it named none), with the
        per-row confidence and source, and a detector's boxes as JSON, as extra outputs; made from
        the outputs the cloud's answers were merged into."""
        extras = {CONFIDENCE_OUTPUT.name: lambda: call.confidence,
                  SOURCE_OUTPUT.name: lambda: np.where(from_cloud, b"cloud", b"edge").astype(np.object_)}
        if call.model.detection is not None:
            extras[DETECTIONS_OUTPUT.name] = lambda: detections_output(call.outputs, call.model.detection,
                                                                       call.model.labels)
        return select_outputs(call.model.name, call.request.outputs, call.outputs, call.model.labels, extras)

    @staticmethod
    def _parameters(call: _Call, from_cloud: np.ndarray, degraded: bool, rate_limited: int) -> dict:
        """Response parameters of docs/design.md §3 (``escalated`` is added by the caller)."""
        model, confidence = call.model, call.confidence
        answered = int(from_cloud.sum())
        source = "cloud" if answered == from_cloud.size else "mixed" if answered else "edge"
        params = {AgentResponse.SOURCE: source,
                  AgentResponse.CONFIDENCE: float(confidence.min()) if confidence.size else 1.0,
                  AgentResponse.DEGRADED: degraded, AgentResponse.MODEL_VERSION: model.version,
                  AgentResponse.ESCALATED_ROWS: answered, AgentResponse.RATE_LIMITED_ROWS: rate_limited}
        scores = call.outputs[model.settings.score_output]
        if model.detection is not None:
            if scores.shape[0]:
                params[AgentResponse.LABEL] = top_label(call.outputs, model.detection, model.labels)
        elif model.labels and scores.shape[0]:
            top = int(scores.reshape(scores.shape[0], -1)[0].argmax())
            if top < len(model.labels):
                params[AgentResponse.LABEL] = model.labels[top]
        return params

    def close(self) -> None:
        self.accepting = False
        self._background.shutdown(wait=True, cancel_futures=True)


def upstream_bytes(request: InferRequest) -> int:
    """The bytes of tensor data a request to the cloud carries (an encoded frame's own length)."""
    return sum(sum(len(item) for item in array.reshape(-1)) if array.dtype == object else array.nbytes
               for array in request.inputs.values())
