"""Prometheus in one place, for the agent's and the gateway's ``/metrics`` and the fleet collector:
:mod:`~edgecloud.metrics.names` (the prefix and the cascade's counter names),
:mod:`~edgecloud.metrics.buckets` (the latency histogram's buckets) and
:mod:`~edgecloud.metrics.exposition` (the HTTP endpoint and the families both services expose). Each
service's own collector reads its live figures at scrape time and builds its series from these.
"""
