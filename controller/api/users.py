"""Manage the API users file: ``penctl users add NAME --role R --file F``.

The password is read from the terminal (or ``--password-stdin``), hashed with
Argon2id and written with the rest of the file; no plain password is stored.
``hash`` prints a hash to paste into a file by hand.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controller.sessions import Role

from .auth import User, UsersFileError, UserStore, hash_password


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise SystemExit("the passwords differ")
    return first


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add or replace a user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add.add_argument("--id", help="pseudonymous id for records (default: the name)")
    add.add_argument("--file", type=Path, required=True, metavar="USERS.toml")
    add.add_argument("--password-stdin", action="store_true")
    hsh = sub.add_parser("hash", help="print an Argon2id hash of a password")
    hsh.add_argument("--password-stdin", action="store_true")


def register(subparsers: Any) -> None:
    """Add ``penctl users`` to penctl's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "users", help="manage the tablet API's users file", description=__doc__
    )
    _add_arguments(p)
    p.set_defaults(handler=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.api.users", description=__doc__)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    password = _password(args)
    if not password:
        print("an empty password is not allowed", file=sys.stderr)
        return 2
    if args.command == "hash":
        print(hash_password(password))
        return 0
    try:
        store = UserStore.load(args.file) if args.file.exists() else UserStore()
    except UsersFileError as exc:
        print(exc, file=sys.stderr)
        return 2
    store.users[args.name] = User(
        args.name, Role(args.role), args.id or args.name, hash_password(password)
    )
    args.file.write_text(store.to_toml())
    print(f"{args.name} ({args.role}) written to {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
