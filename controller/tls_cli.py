"""``penctl tls``: a clinic CA and certificates for a local install.

* ``penctl tls ca --dir DIR --clinic NAME``: ``DIR/ca.crt`` and ``DIR/ca.key``
  (install ``ca.crt`` on each tablet once; keep ``ca.key`` offline).
* ``penctl tls server --dir DIR --name HOST [--name 192.168.1.20 ...]``: a
  server certificate signed by ``DIR/ca.*`` for the controller's names and
  addresses (``DIR/server.crt``, ``DIR/server.key``): set ``api.tls_certfile``
  and ``api.tls_keyfile`` to them. ``--client`` makes a client certificate
  instead (for an MQTT broker that asks for one), ``--stem`` names the files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .tls import IssuedFiles, TlsError, make_clinic_ca, make_server_certificate


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``tls ca`` and ``tls server`` to penctl."""
    tls = subparsers.add_parser("tls", help="make a clinic CA and certificates")
    commands = tls.add_subparsers(dest="tls_command", required=True, metavar="ACTION")
    ca = commands.add_parser("ca", help="create a clinic CA (ca.crt, ca.key)")
    ca.add_argument("--dir", type=Path, required=True, help="where to write it")
    ca.add_argument("--clinic", required=True, help="the clinic's name, in the certificate")
    ca.add_argument("--days", type=int, default=3650, help="validity (default 10 years)")
    ca.set_defaults(handler=_ca)
    server = commands.add_parser("server", help="a certificate signed by the clinic CA")
    server.add_argument("--dir", type=Path, required=True, help="where ca.crt and ca.key are")
    server.add_argument(
        "--name", action="append", required=True, help="host name or IP address (repeat)"
    )
    server.add_argument("--stem", default="server", help="file names: STEM.crt, STEM.key")
    server.add_argument("--days", type=int, default=825, help="validity (default 825 days)")
    server.add_argument("--client", action="store_true", help="a client certificate instead")
    server.set_defaults(handler=_server)


def _ca(args: argparse.Namespace) -> int:
    try:
        files = make_clinic_ca(args.dir, args.clinic, days=args.days)
    except TlsError as exc:
        print(f"penctl tls: {exc}", file=sys.stderr)
        return 2
    print(f"clinic CA: {files.cert} (install on the tablets), key {files.key} (keep it safe)")
    return 0


def _server(args: argparse.Namespace) -> int:
    ca = IssuedFiles(args.dir / "ca.crt", args.dir / "ca.key")
    try:
        files = make_server_certificate(
            ca, args.name, args.dir, stem=args.stem, days=args.days, client=args.client
        )
    except TlsError as exc:
        print(f"penctl tls: {exc}", file=sys.stderr)
        return 2
    print(f"certificate {files.cert}, key {files.key}, for {', '.join(args.name)}")
    return 0
