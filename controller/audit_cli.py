"""`penctl audit`: verify and show the hash-chained audit log.

* ``penctl audit verify PATH [--expect-head SEQ:HASH | --published [--config FILE]]``:
  exit 0 and a summary when the chain is intact (and still holds the expected
  head); exit 1 naming the first bad record and why; exit 2 when the file is
  missing or is not an audit log, or no published head can be had.
  ``--published`` fetches the head this controller last published (retained on
  the MQTT broker of ``--config``'s ``[mqtt]``; ``controller/audit_anchor.py``).
* ``penctl audit show PATH [--session ID] [--kind KIND] [--last N] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt

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
    check.add_argument(
        "--published",
        action="store_true",
        help="check against the head last published over MQTT (see --config)",
    )
    check.add_argument(
        "--config", type=Path, metavar="FILE.toml", help="the controller's configuration"
    )
    check.add_argument(
        "--controller", default="controller-1", help="the controller's id (default controller-1)"
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


def _published_head(args: argparse.Namespace) -> ChainHead | None:
    """The head this controller last published, or None (and a message) if there is none."""
    from .audit_anchor import fetch_published
    from .config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    try:
        published = asyncio.run(fetch_published(settings.mqtt, settings.clinic_id, args.controller))
    except (OSError, ValueError, aiomqtt.MqttError) as exc:
        print(f"error: cannot fetch the published head: {exc}", file=sys.stderr)
        return None
    if published is None:
        print(
            f"error: no audit head published for {settings.clinic_id}/{args.controller} "
            f"on {settings.mqtt.host}:{settings.mqtt.port}",
            file=sys.stderr,
        )
        return None
    when = datetime.fromtimestamp(published.at, UTC).isoformat(timespec="seconds")
    agree = "" if published.agrees else " (the publisher already reported a disagreement)"
    print(f"published head {published.head} at {when}{agree}")
    return published.head


def _verify(args: argparse.Namespace) -> int:
    if args.published and args.expect_head is not None:
        print("error: give --expect-head or --published, not both", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.published:
        args.expect_head = _published_head(args)
        if args.expect_head is None:
            return EXIT_UNREADABLE
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
