"""The generated parts of docs/INFLUX_SCHEMA.md, rendered from the code so the two cannot drift.

As firmware_protocol/spec.py does for PROTOCOL.md: the document marks each
generated section with ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->``; a test compares them with ``render_sections()``.
After changing an event kind, its shape or the measurements it feeds::

    python -m controller.ingest.schema_doc            # rewrite the document in place
    python -m controller.ingest.schema_doc --check    # exit 1 if it is stale
"""

from __future__ import annotations

import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from ..policy import load_policy
from ..telemetry.events import SHAPES
from ..telemetry.schema import EventKind
from .points import SAFETY_KINDS, SESSION_KINDS, ZONE_KINDS

SCHEMA_MD = Path(__file__).resolve().parents[2] / "docs" / "INFLUX_SCHEMA.md"

#: What the series bound assumes beyond the code: a clinic's staff and reason codes.
THERAPISTS = 10
REASON_CODES = 20


def event_kinds() -> list[str]:
    """Every event kind on the wire, in the schema's order."""
    return list(typing.get_args(EventKind))


def event_table() -> str:
    kinds = event_kinds()
    rows = [
        f"All {len(kinds)} event kinds, each written to `events` and, as marked, to the "
        "dashboard measurements. `code` is taken from the first of the listed details "
        "the event has (else the fixed code); the values are all the event carries.",
        "",
        "| kind | code | values | sessions | zones | safety |",
        "|---|---|---|---|---|---|",
    ]
    for kind in kinds:
        shape = SHAPES[kind]  # type: ignore[index]
        code = " or ".join(
            [*(f"`{c}`" for c in shape.code_from), *([f'"{shape.code}"'] if shape.code else [])]
        )
        values = ", ".join(f"`{v}`" for v in shape.values)
        if kind == "session_report":
            values += ", `client` (pseudonym), `cartridges` (count), `zones` (JSON)"
        marks = [
            "x" if kind in group else "" for group in (SESSION_KINDS, ZONE_KINDS, SAFETY_KINDS)
        ]
        rows.append(f"| `{kind}` | {code or '-'} | {values or '-'} | {' | '.join(marks)} |")
    return "\n".join(rows)


def safety_kinds() -> str:
    kinds = sorted(SAFETY_KINDS)
    return f"The {len(kinds)} safety kinds: " + ", ".join(f"`{k}`" for k in kinds) + "."


def series_bound() -> str:
    zones = len(load_policy(None).zones)
    parts = [
        ("telemetry", 1, "1"),
        ("telemetry_batches", 1, "1"),
        ("device_status", 1, "1"),
        ("events", len(event_kinds()), f"{len(event_kinds())} kinds"),
        (
            "sessions",
            len(SESSION_KINDS) * THERAPISTS,
            f"{len(SESSION_KINDS)} kinds × {THERAPISTS} therapists",
        ),
        ("zones", len(ZONE_KINDS) * zones, f"{len(ZONE_KINDS)} kinds × {zones} zones"),
        (
            "safety",
            len(SAFETY_KINDS) * REASON_CODES,
            f"{len(SAFETY_KINDS)} kinds × {REASON_CODES} reason codes",
        ),
    ]
    cartridge_kinds = [k for k, shape in SHAPES.items() if "cartridge" in shape.values]
    parts.append(
        ("cartridges", len(cartridge_kinds), f"{len(cartridge_kinds)} kinds with a `cartridge`")
    )
    total = sum(n for _, n, _ in parts)
    rows = ["| measurement | series per pen, at most | from |", "|---|---|---|"]
    rows += [f"| `{name}` | {n} | {why} |" for name, n, why in parts]
    rows.append(f"| **total** | **{total}** | |")
    rows += [
        "",
        f"With the default zone table ({zones} zones), {THERAPISTS} therapists and "
        f"{REASON_CODES} reason codes: at most **{total} series per pen**, most never "
        f"written in practice; a chain of 100 clinics with 10 pens each stays below "
        f"**{total * 1000:,}** series. `controller_status` and `audit_head` add one "
        "series each per controller.",
    ]
    return "\n".join(rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "event-kinds": event_table,
    "safety-kinds": safety_kinds,
    "series": series_bound,
}


_SECTION_RE = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n)"
    r"(?P<body>.*?)"
    r"(<!-- END GENERATED: (?P=name) -->)",
    re.DOTALL,
)


def render_sections() -> dict[str, str]:
    """Every generated section's text, by name."""
    return {name: render() for name, render in SECTIONS.items()}


def read_sections(text: str) -> dict[str, str]:
    """The generated sections found in the document's text, by name (bodies stripped)."""
    return {m["name"]: m["body"].strip("\n") for m in _SECTION_RE.finditer(text)}


def update_sections(text: str, sections: dict[str, str]) -> str:
    """``text`` with every generated section replaced by its current rendering."""
    return _SECTION_RE.sub(lambda m: f"{m[1]}{sections[m['name']]}\n{m[4]}", text)


def main(argv: list[str]) -> int:
    text = SCHEMA_MD.read_text(encoding="utf-8")
    new = update_sections(text, render_sections())
    if "--check" in argv:
        if new != text or set(read_sections(text)) != set(SECTIONS):
            print(f"{SCHEMA_MD} is stale: run python -m controller.ingest.schema_doc")
            return 1
        return 0
    if new != text:
        SCHEMA_MD.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
