"""docs/INFLUX_SCHEMA.md cannot drift from the code: its lists and counts are generated."""

from __future__ import annotations

import re
import typing

from controller.ingest import schema_doc
from controller.ingest.points import SAFETY_KINDS
from controller.sessions import EventKind
from controller.telemetry.schema import EventKind as WireEventKind


def test_generated_sections_match_the_code() -> None:
    found = schema_doc.read_sections(schema_doc.SCHEMA_MD.read_text(encoding="utf-8"))
    expected = schema_doc.render_sections()
    assert set(found) == set(expected), "a generated section is missing from INFLUX_SCHEMA.md"
    for name, text in expected.items():
        assert found[name] == text, (
            f"INFLUX_SCHEMA.md section {name!r} is stale: "
            "run python -m controller.ingest.schema_doc"
        )


def test_the_document_lists_every_event_kind_and_counts_them_right() -> None:
    # Read as a reader would, independently of the renderer.
    text = schema_doc.SCHEMA_MD.read_text(encoding="utf-8")
    listed = re.findall(r"^\| `(\w+)` \|", text.split("### Dashboard measurements")[0], re.M)
    assert listed == list(typing.get_args(WireEventKind))
    assert set(listed) == {k.value for k in EventKind}
    assert f"All {len(listed)} event kinds" in text
    assert f"The {len(SAFETY_KINDS)} safety kinds" in text
    assert "15 `EventKind`" not in text  # the count issue 13 found wrong
