"""Drive a server with the real ``tritonclient`` in a subprocess, as a local app would.

tritonclient bundles its own ``inference`` protobuf descriptors, which clash with ours in one process
(docs/design.md §2), so each call runs a short script in a fresh interpreter and reads JSON from its stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PRELUDE = """
import json, sys
import numpy as np
from tritonclient.utils import InferenceServerException
ARGS = json.loads(sys.argv[1])
def emit(obj):
    print("@@RESULT@@" + json.dumps(obj))
"""
GRPC = """
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(ARGS["url"])
"""
HTTP = """
import tritonclient.http as httpclient
client = httpclient.InferenceServerClient(ARGS["url"])
"""


def run_triton(script: str, timeout: float = 60.0, http: bool = False, **args) -> dict:
    """Run ``script`` after PRELUDE with ``ARGS`` = ``args`` and ``client`` a tritonclient of gRPC, or
    of HTTP (``tritonclient.http``) with ``http``; it must call ``emit(obj)`` once."""
    code = PRELUDE + (HTTP if http else GRPC) + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                          text=True, timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise AssertionError(f"tritonclient script gave no result (exit {proc.returncode}):\n"
                         f"{proc.stdout}\n{proc.stderr}")
