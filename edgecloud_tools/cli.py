"""edgecloud: demo, benchmarks, model toolchain, TensorRT engines, hard examples, TLS certificates,
signing keys and fleet releases."""

from __future__ import annotations

import argparse
import importlib
import sys

from edgecloud import __version__
from edgecloud.errors import EdgecloudError, exit_status

#: each command → the module that registers it, in the order --help lists them
COMMANDS: dict[str, str] = {
    "bench": "edgecloud_tools.bench.command",
    "certs": "edgecloud_tools.certs",
    "demo": "edgecloud_tools.demo",
    "doctor": "edgecloud_tools.doctor",
    "examples": "edgecloud_tools.examples_cli",
    "faults": "edgecloud_tools.faults.command",
    "engine": "edgecloud_tools.engine_cli",
    "keygen": "edgecloud_tools.fleet.keys_cli",
    "fleet": "edgecloud_tools.fleet.publish",
    "calibrate": "edgecloud_tools.toolchain.cli",
    "models": "edgecloud_tools.toolchain.cli",
}


def positive_int(text: str) -> int:
    """An argparse type for counts, so 0 or less is a usage error rather than a crash later on."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``argv``'s command alone when it names one (only that command's module is
    imported: ``fleet status`` on a line's laptop does not wait for the bench's imports), else of
    every command (``--help``, a typo)."""
    parser = argparse.ArgumentParser(prog="edgecloud", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgecloud {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = next((arg for arg in argv or () if not arg.startswith("-")), None)
    modules = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for name in dict.fromkeys(modules):
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit 0 done, 2 bad usage or configuration, 1 failure (docs/design.md §9)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgecloudError as e:
        return exit_status("edgecloud", e)


if __name__ == "__main__":
    sys.exit(main())
