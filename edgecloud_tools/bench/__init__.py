"""``edgecloud bench``: the harness that measures the agent and the gateway beside their floors (the
models in process, minimal echo servers) and their peers (FastAPI, MLServer) in one run.

:mod:`~edgecloud_tools.bench.command` is the command and the order of its stages, one module per stage;
:mod:`~edgecloud_tools.bench.loadgen` is the client process and :mod:`~edgecloud_tools.bench.clients`
drives it; :mod:`~edgecloud_tools.bench.peers` holds the peers' programs and their venvs. This package
imports nothing at import time: the client processes import ``loadgen`` beside tritonclient, which must
never meet edgecloud's own generated stubs.
"""
