"""The rig that the operator tools run real services on, shared by the bench, the fault suite, the demos and
the fleet simulator: a local broker, service processes, the gateway and agent started as their
console scripts, client processes driving them, a delay proxy, latency statistics, the machine's facts.

This package imports nothing at import time: the client processes import :mod:`~edgecloud_tools.rig.loadgen`
beside tritonclient, which must never meet edgecloud's own generated stubs.
"""
