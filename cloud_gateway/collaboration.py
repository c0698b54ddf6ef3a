"""The agent → gateway request parameters of docs/design.md §3, read and checked.

A malformed ``edgecloud.edge_summary`` is refused (INVALID_ARGUMENT) rather than guessed at: the
hard-example store is training data, and a wrong row index would pair an input with another row's
edge prediction.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgecloud.errors import InvalidInput
from edgecloud.protocol.codec import InferRequest

PREFIX = "edgecloud."
REQUEST_ID = PREFIX + "request_id"
DEVICE_ID = PREFIX + "device_id"
EDGE_MODEL_VERSION = PREFIX + "edge_model_version"
EDGE_SUMMARY = PREFIX + "edge_summary"
DEFERRED = PREFIX + "deferred"


class EdgeSummary(BaseModel):
    """``edgecloud.edge_summary``: which rows of the client's batch these are, and what the edge said.

    ``rows[i]`` is the index, in the client's original batch, of row ``i`` of this request. Unknown
    keys are ignored so the agent can add some without breaking older gateways.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    rows: tuple[int, ...] = Field(description="row indices in the client's batch")
    reason: str = Field(min_length=1, description="low_confidence | audit | forced")
    prediction: tuple[int, ...] | None = None
    confidence: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class Collaboration:
    """What the caller said about a request; ``summary`` is None for a plain inference call."""

    request_id: str
    device_id: str
    edge_model_version: str
    deferred: bool
    summary: EdgeSummary | None


def _text(request: InferRequest, key: str) -> str:
    value = request.parameters.get(key, "")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidInput(f"parameter {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def _summary(text: str, rows: int) -> EdgeSummary:
    try:
        summary = EdgeSummary.model_validate(json.loads(text))
    except (ValueError, ValidationError) as e:  # JSONDecodeError is a ValueError
        raise InvalidInput(f"parameter {EDGE_SUMMARY!r} is not a valid summary: {e}") from None
    lengths = {"prediction": summary.prediction, "confidence": summary.confidence}
    for key, values in lengths.items():
        if values is not None and len(values) != len(summary.rows):
            raise InvalidInput(f"parameter {EDGE_SUMMARY!r}: {len(values)} {key} values for "
                               f"{len(summary.rows)} rows")
    if len(summary.rows) != rows:
        raise InvalidInput(f"parameter {EDGE_SUMMARY!r} names {len(summary.rows)} rows, the request "
                           f"carries {rows}")
    if len(set(summary.rows)) != len(summary.rows) or min(summary.rows, default=0) < 0:
        raise InvalidInput(f"parameter {EDGE_SUMMARY!r}: rows must be distinct non-negative indices")
    return summary


def read_collaboration(request: InferRequest, rows: int) -> Collaboration:
    """The collaboration parameters of ``request`` (``rows`` = its batch size). Without
    ``edgecloud.request_id`` the request's own id is used, else a fresh one."""
    deferred = request.parameters.get(DEFERRED, False)
    if not isinstance(deferred, bool):
        raise InvalidInput(f"parameter {DEFERRED!r} must be a bool, got {type(deferred).__name__}")
    summary_text = _text(request, EDGE_SUMMARY)
    return Collaboration(
        request_id=_text(request, REQUEST_ID) or request.id or uuid.uuid4().hex,
        device_id=_text(request, DEVICE_ID),
        edge_model_version=_text(request, EDGE_MODEL_VERSION),
        deferred=deferred,
        summary=_summary(summary_text, rows) if summary_text else None,
    )
