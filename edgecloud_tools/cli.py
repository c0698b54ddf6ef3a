"""edgecloud: demo, benchmarks, model toolchain, TensorRT engines, hard examples, TLS certificates,
signing keys and fleet releases."""

from __future__ import annotations

import argparse
import importlib
import sys

from edgecloud import __version__
from edgecloud.errors import EdgecloudError, exit_status

#: modules that add sub-commands, in the order they appear in --help
COMMAND_MODULES: tuple[str, ...] = (
    "edgecloud_tools.bench.command",
    "edgecloud_tools.certs",
    "edgecloud_tools.demo",
    "edgecloud_tools.doctor",
    "edgecloud_tools.examples_cli",
    "edgecloud_tools.faults.command",
    "edgecloud_tools.engine_cli",
    "edgecloud_tools.fleet.keys_cli",
    "edgecloud_tools.fleet.publish",
    "edgecloud_tools.fleet.simulate",  # adds to publish's ``fleet`` command
    "edgecloud_tools.toolchain.cli",
)


def positive_int(text: str) -> int:
    """An argparse type for counts, so 0 or less is a usage error rather than a crash later on."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecloud", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgecloud {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit 0 done, 2 bad usage or configuration, 1 failure (docs/design.md §9)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgecloudError as e:
        return exit_status("edgecloud", e)


if __name__ == "__main__":
    sys.exit(main())
