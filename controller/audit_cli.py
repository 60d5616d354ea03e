"""`penctl audit`: verify and show the hash-chained audit log.

* ``penctl audit verify PATH [--expect-head SEQ:HASH]``: exit 0 and a summary
  when the chain is intact; exit 1 naming the first bad record and why; exit 2
  when the file is missing or is not an audit log.
* ``penctl audit show PATH [--session ID] [--kind KIND] [--last N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from controller.audit import AuditFileError, AuditKind, ChainHead, read_records, verify

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_UNREADABLE = 2


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``audit verify`` and ``audit show`` to penctl."""
    audit = subparsers.add_parser("audit", help="verify or show the audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    check = commands.add_parser("verify", help="check the hash chain; exit 1 if tampered")
    check.add_argument("path", help="the audit log database")
    check.add_argument(
        "--expect-head",
        type=_head,
        metavar="SEQ:HASH",
        help="a chain head published earlier; the log must still contain it unchanged",
    )
    check.set_defaults(handler=_verify)

    show = commands.add_parser("show", help="print records")
    show.add_argument("path", help="the audit log database")
    show.add_argument("--session", help="only this session id")
    show.add_argument("--kind", choices=[k.value for k in AuditKind], help="only this kind")
    show.add_argument("--last", type=int, metavar="N", help="only the last N records")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.set_defaults(handler=_show)


def _head(text: str) -> ChainHead:
    try:
        return ChainHead.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _verify(args: argparse.Namespace) -> int:
    try:
        report = verify(args.path, expected_head=args.expect_head)
    except AuditFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    if report.first_bad is not None:
        bad = report.first_bad
        print(
            f"TAMPERED: {args.path}: record {bad.seq}: {bad.reason}. "
            f"Records 1 to {report.records} verify.",
        )
        return EXIT_TAMPERED
    head = f"; head {report.head}" if report.head else ""
    print(f"OK: {args.path}: {report.records} records, hash chain intact{head}")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    try:
        records = read_records(args.path)
    except AuditFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.session:
        records = [r for r in records if r.session_id == args.session]
    if args.kind:
        records = [r for r in records if r.kind == args.kind]
    if args.last is not None:
        records = records[-args.last :] if args.last > 0 else []
    for r in records:
        if args.json:
            print(json.dumps(r.as_dict(), ensure_ascii=False, sort_keys=True))
            continue
        ids = " ".join(
            f"{name}={value}"
            for name, value in (("session", r.session_id), ("device", r.device_id))
            if value
        )
        print(f"#{r.seq} {r.at} {r.kind.upper()} {ids}".rstrip())
        print(f"    {r.message}")
        if r.remediation:
            print(f"    what to do: {r.remediation}")
        if r.details:
            print(f"    details: {json.dumps(dict(r.details), ensure_ascii=False, sort_keys=True)}")
    return EXIT_OK
