"""`penctl`: the one command-line entry point.

Each subcommand lives in its own module that exposes ``register(subparsers)``;
the module is imported only when listed here, so adding a command is one line.
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
    "ingest": "controller.ingest.cli",
    "demo": "devtools.demo.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="penctl", description="Pen microneedling session controller."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if module_name != missing and not module_name.startswith(missing + "."):
                raise  # the module exists but something it imports is missing: a bug
            continue  # a subcommand whose module is not written yet
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = args.handler
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
