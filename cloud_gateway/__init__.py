"""cloud_gateway: the cloud side of edgecloud. Serves full models over KServe v2 with dynamic batching
and keeps the rows edge devices escalate in the hard-example store.

In-process use (demo, tests)::

    from cloud_gateway import Gateway, gateway_config
    with Gateway(gateway_config(repo, listen="127.0.0.1:0", store=db)) as gw:
        ...  # gw.port
"""

from cloud_gateway.config import GatewayConfig, gateway_config
from cloud_gateway.server import Gateway

__all__ = ["Gateway", "GatewayConfig", "gateway_config"]
