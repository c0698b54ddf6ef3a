"""Regenerates the committed protobuf/gRPC modules under ``edgecloud/_generated`` from ``protos/``.

The generated modules are committed so that devices never need grpcio-tools; a test regenerates them
into a temporary folder with the pinned grpcio-tools and fails on any difference.
Run: ``python -m edgecloud.protocol.codegen``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "edgecloud" / "_generated"
# The .proto files compiled; the JSON schemas under protos/schemas are data, not code.
PROTO_FILES = ("inference/grpc_service.proto", "edgecloud/v1/artifacts.proto")
_HEADER = "# Generated from protos/ by edgecloud.protocol.codegen: do not edit.\n"
# protoc writes absolute imports ("from inference import x_pb2"); ours live inside a package.
_IMPORT = re.compile(r"^from (inference|edgecloud\.v1) import (\w+_pb2)", re.MULTILINE)


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Compile every proto into ``out_dir`` and return the files written."""
    from grpc_tools import protoc  # dev-only dependency

    protos = [p for p in PROTO_FILES if (PROTO_DIR / p).exists()]
    with tempfile.TemporaryDirectory() as tmp:
        include = str(Path(protoc.__file__).parent / "_proto")
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {protos}")
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            rel = src.relative_to(tmp)
            text = _IMPORT.sub(lambda m: f"from edgecloud._generated.{m.group(1)} import {m.group(2)}",
                               src.read_text())
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_HEADER + text)
            written.append(dst)
        packages = {out_dir}
        for path in written:
            packages.update(p for p in path.parents if p.is_relative_to(out_dir))
        for pkg in packages:
            init = pkg / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated protobuf modules (see edgecloud.protocol.codegen)."""\n')
        return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path)
