"""``edgecloud bench``: the harness that measures the agent and the gateway beside their floors (the
models in process, minimal echo servers) and their peers (FastAPI, MLServer) in one run.

:mod:`~edgecloud_tools.bench.command` is the command and the order of its stages, one module per stage;
:mod:`~edgecloud_tools.bench.peers` holds the peers' programs and their venvs. The services, client
processes and proxies it runs them on are the rig (:mod:`edgecloud_tools.rig`), which the fault suite,
the demos and the fleet simulator share.
"""
