"""`penctl`: the one command-line entry point.

Each subcommand lives in its own module that exposes ``register(subparsers)``;
adding a command is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand name -> module with `register(subparsers) -> None`
SUBCOMMANDS: dict[str, str] = {
    "simulate": "simulated_pen.cli",
    "bench": "devtools.bench.cli",
    "audit": "controller.audit_cli",
    "serve": "controller.serve_cli",
    "users": "controller.api.users",
    "tls": "controller.tls_cli",
    "ingest": "controller.ingest.cli",
    "demo": "devtools.demo.cli",
}


def build_parser() -> argparse.ArgumentParser:
    """penctl's parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="penctl", description="Pen microneedling session controller."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        # Every command's module is part of this installation: a failed import is a
        # bug to see at once, not a command to leave out quietly.
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the chosen command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = args.handler
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
