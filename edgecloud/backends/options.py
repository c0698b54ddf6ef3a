"""``[backend.<key>]`` config sections: each backend's own config class, one field per backend.

Shared by the agent's and the gateway's configuration so that a backend's options read the same
everywhere. Importing it does not import any runtime (those load in ``Backend.load``).
"""

from __future__ import annotations

from pydantic import Field

from edgecloud.backends.ort_session import OrtConfig
from edgecloud.backends.remote import RemoteConfig
from edgecloud.backends.trt_engine import TrtConfig
from edgecloud.config import Section


class BackendOptions(Section):
    """``[backend.onnxruntime]`` (providers, threads), ``[backend.tensorrt]`` (device, sidecar check),
    ``[backend.remote]`` (target and model of a remote KServe v2 server)."""

    onnxruntime: OrtConfig = Field(default_factory=OrtConfig, description="providers, threads")
    tensorrt: TrtConfig = Field(default_factory=TrtConfig, description="for .plan/.engine files")
    remote: RemoteConfig | None = Field(None, description="another KServe v2 server (gateway only)")
