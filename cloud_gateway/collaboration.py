"""The agent → gateway request parameters of docs/design.md §3, read and checked.

A malformed ``edgecloud.edge_summary`` is refused (INVALID_ARGUMENT) rather than guessed at: the
hard-example store is training data, and a wrong row index would pair an input with another row's
edge prediction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from edgecloud.errors import InvalidInput
from edgecloud.protocol.codec import InferRequest
from edgecloud.protocol.parameters import CloudRequest, EdgeSummary


@dataclass(frozen=True, slots=True)
class Collaboration:
    """What the caller said about a request; ``summary`` is None for a plain inference call."""

    request_id: str
    device_id: str
    edge_model_version: str
    deferred: bool
    summary: EdgeSummary | None


def _read(request: InferRequest, key: CloudRequest, default: Any) -> Any:
    value = request.parameters.get(key, default)
    if not key.accepts(value):
        raise InvalidInput(f"parameter '{key}' must be a {key.choice}, got {type(value).__name__}")
    return value


def read_collaboration(request: InferRequest, rows: int) -> Collaboration:
    """The collaboration parameters of ``request`` (``rows`` = its batch size). Without
    ``edgecloud.request_id`` the request's own id is used, else, for an escalation (which is kept under
    it), a fresh one; a plain call without either has none."""
    deferred = _read(request, CloudRequest.DEFERRED, False)
    summary_text = str(_read(request, CloudRequest.EDGE_SUMMARY, ""))
    request_id = str(_read(request, CloudRequest.REQUEST_ID, "")) or request.id
    return Collaboration(
        request_id=request_id or (uuid.uuid4().hex if summary_text else ""),
        device_id=str(_read(request, CloudRequest.DEVICE_ID, "")),
        edge_model_version=str(_read(request, CloudRequest.EDGE_MODEL_VERSION, "")),
        deferred=deferred,
        summary=EdgeSummary.parse(summary_text, rows) if summary_text else None,
    )
