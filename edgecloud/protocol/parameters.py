"""The ``edgecloud.*`` request and response parameters that carry the collaboration, and the edge
summary's JSON: defined once, for the agent that writes them and the gateway that reads them.

A parameter is its key (a plain string on the wire, usable wherever a key is) and the InferParameter
choice its value travels as. A new parameter is one line in the class of its direction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgecloud.errors import InvalidInput

PREFIX = "edgecloud."

#: Python type of a value → the InferParameter choice it travels as
_CHOICES: dict[type, str] = {bool: "bool", int: "int64", float: "double", str: "string"}
#: what a reader takes for each type, as the codec decodes it: ints for doubles and strings too
_ACCEPTED: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str, int)}


class Parameter(str, Enum):
    """A parameter key with the type of its value; the keys of each direction are a subclass."""

    kind: type

    def __new__(cls, name: str, kind: type) -> Parameter:
        member = str.__new__(cls, PREFIX + name)
        member._value_ = PREFIX + name
        member.kind = kind
        return member

    # the key itself when formatted, on every Python version (3.11 changed Enum.__format__)
    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def choice(self) -> str:
        """The InferParameter choice of the value: ``bool``, ``int64``, ``double`` or ``string``."""
        return _CHOICES[self.kind]

    def accepts(self, value: object) -> bool:
        """True when ``value`` (as decoded from the wire) can be read as this parameter: a bool only
        for a bool, an int also for a double or a string."""
        if isinstance(value, bool):
            return self.kind is bool
        return isinstance(value, _ACCEPTED[self.kind])


class AgentRequest(Parameter):
    """Set by a client on its request to the agent."""

    ESCALATE = "escalate", str  # auto (default), always, never, background
    THRESHOLD = "threshold", float  # per-request confidence threshold override
    STREAM = "stream", str  # the camera a frame comes from: a still scene reuses its last cloud answer


class AgentResponse(Parameter):
    """Set by the agent on its response; ``CONFIDENCE`` and ``SOURCE`` also name the per-row outputs."""

    SOURCE = "source", str  # edge, cloud, or mixed for a batch
    CONFIDENCE = "confidence", float  # the edge's confidence, the lowest row's for a batch
    ESCALATED = "escalated", bool  # the cascade asked the cloud
    DEGRADED = "degraded", bool  # the cloud was wanted but not reached in time
    MODEL_VERSION = "model_version", str  # edge model version that answered
    LABEL = "label", str  # top-1 label of row 0 (a detector's: its top box's, or "none"), given labels
    ESCALATED_ROWS = "escalated_rows", int  # rows the cloud answered
    RATE_LIMITED_ROWS = "rate_limited_rows", int  # rows over the rate limit, answered by the edge
    REUSED = "reused", bool  # a recent cloud answer for a nearly identical frame of the stream was reused


#: a detector's per-row output, made only when a client asks for it by name (an output, not a
#: parameter): BYTES [N], per frame a JSON list of {"label", "score", "box"} (docs/design.md §10)
DETECTIONS = PREFIX + "detections"


class CloudRequest(Parameter):
    """Set by the agent on the request it sends the cloud for its unsure rows."""

    REQUEST_ID = "request_id", str  # the client's request id, else one the agent made
    DEVICE_ID = "device_id", str
    EDGE_MODEL_VERSION = "edge_model_version", str
    EDGE_SUMMARY = "edge_summary", str  # EdgeSummary.to_json()
    DEFERRED = "deferred", bool  # replayed from the spool, no client waits for the answer


class CloudResponse(Parameter):
    """Set by the gateway on its response."""

    #: a frames request's answer: how the frames became the model's input, the pixels its boxes are in
    #: (``Geometry`` of edgecloud.preprocess: ``"letterbox 224x224"``)
    INPUT_GEOMETRY = "input_geometry", str


EscalationReason = Literal["low_confidence", "audit", "empty_frame", "forced"]
#: reasons of rows sent in the background to watch the edge, with no client waiting for them
AUDIT_REASONS = ("audit", "empty_frame")


class EdgeSummary(BaseModel):
    """``edgecloud.edge_summary``: which rows of the client's batch these are, and what the edge said.

    ``rows[i]`` is the index, in the client's original batch, of row ``i`` of this request. Unknown
    keys are ignored so the agent can add some without breaking older gateways.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    rows: tuple[int, ...] = Field(description="row indices in the client's batch")
    prediction: tuple[int, ...] | None = Field(None, description="the edge's top-1 class per row")
    confidence: tuple[float, ...] | None = Field(None, description="the edge's confidence per row")
    reason: EscalationReason = Field(description="why the rows were sent")

    def to_json(self) -> str:
        return json.dumps(self.model_dump())

    @classmethod
    def parse(cls, text: str, rows: int) -> EdgeSummary:
        """The summary of a request carrying ``rows`` rows; InvalidInput when it is malformed, since a
        wrong row index would pair an input with another row's edge prediction in the store."""
        key = CloudRequest.EDGE_SUMMARY
        try:
            summary = cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as e:  # JSONDecodeError is a ValueError
            raise InvalidInput(f"parameter '{key}' is not a valid summary: {e}") from None
        for name, values in (("prediction", summary.prediction), ("confidence", summary.confidence)):
            if values is not None and len(values) != len(summary.rows):
                raise InvalidInput(f"parameter '{key}': {len(values)} {name} values for "
                                   f"{len(summary.rows)} rows")
        if len(summary.rows) != rows:
            raise InvalidInput(f"parameter '{key}' names {len(summary.rows)} rows, the request "
                               f"carries {rows}")
        if len(set(summary.rows)) != len(summary.rows) or min(summary.rows, default=0) < 0:
            raise InvalidInput(f"parameter '{key}': rows must be distinct non-negative indices")
        return summary


@dataclass(frozen=True, slots=True)
class Collaboration:
    """What an escalation says about itself (the ``CloudRequest`` parameters), declared once: the agent
    writes it (:meth:`parameters`), the gateway reads it back (:meth:`read`) and keeps it beside each
    row in its store. ``summary`` is None for a plain inference call.

    A malformed ``edgecloud.edge_summary`` is refused (INVALID_ARGUMENT) rather than guessed at: the
    hard-example store is training data, and a wrong row index would pair an input with another row's
    edge prediction."""

    request_id: str
    device_id: str
    edge_model_version: str
    summary: EdgeSummary | None
    deferred: bool = False

    def parameters(self) -> dict[str, Any]:
        """The request parameters that carry it (``deferred`` only when set: a replay's)."""
        params: dict[str, Any] = {CloudRequest.REQUEST_ID: self.request_id,
                                  CloudRequest.DEVICE_ID: self.device_id,
                                  CloudRequest.EDGE_MODEL_VERSION: self.edge_model_version}
        if self.summary is not None:
            params[CloudRequest.EDGE_SUMMARY] = self.summary.to_json()
        if self.deferred:
            params[CloudRequest.DEFERRED] = True
        return params

    @classmethod
    def read(cls, parameters: Mapping[str, object], request_id: str, rows: int) -> Collaboration:
        """The collaboration a request's ``parameters`` carry (``request_id``: its own id; ``rows``: its
        batch size). Without ``edgecloud.request_id`` the request's own id is used, else, for an
        escalation (which is kept under it), a fresh one; a plain call without either has none."""
        def value(key: CloudRequest, default: object) -> Any:
            found = parameters.get(key, default)
            if not key.accepts(found):
                raise InvalidInput(f"parameter '{key}' must be a {key.choice}, got {type(found).__name__}")
            return found

        deferred = value(CloudRequest.DEFERRED, False)
        summary_text = str(value(CloudRequest.EDGE_SUMMARY, ""))
        request_id = str(value(CloudRequest.REQUEST_ID, "")) or request_id
        return cls(request_id=request_id or (uuid.uuid4().hex if summary_text else ""),
                   device_id=str(value(CloudRequest.DEVICE_ID, "")),
                   edge_model_version=str(value(CloudRequest.EDGE_MODEL_VERSION, "")),
                   summary=EdgeSummary.parse(summary_text, rows) if summary_text else None,
                   deferred=deferred)
