"""A session's report, as JSON and as CSV: ``/api/sessions/{id}/report[.csv]``.

Only the session's owner sees its client code in either. The CSV is opened in
spreadsheets, so a cell that a spreadsheet would take for a formula (it begins
with ``= + - @``, a tab or a carriage return) is written with a leading ``'``
(OWASP, "CSV Injection"): an override reason ``=HYPERLINK(...)`` stays text.
"""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

import csv
import io
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ..auth import User
from ..deps import ControllerApi, Service, owns, require, session_or_404
from ..errors import unknown_session
from ..report_detail import detailed_report
from .sessions import SessionId

router = APIRouter(tags=["reports"])


def _report_of(service: ControllerApi, session_id: str, user: User) -> dict[str, Any]:
    session = session_or_404(service, session_id)
    report = service.report(session_id)
    if report is None:  # pragma: no cover - it existed a line ago
        raise unknown_session(session_id)
    if not owns(user, session):
        report = {**report, "client_ref": None}
    return report


@router.get("/api/sessions/{session_id}/report", operation_id="session_report")
async def session_report(
    session_id: SessionId,
    user: Annotated[User, Depends(require("session_report"))],
    service: Service,
) -> dict[str, Any]:
    """Zones, passes, depths against limits, overrides, cartridges, refusals; each pass
    (``pass_list``: times, setting, peak measured depth) and every stop, fault, override
    and refusal from the audit log (``events``, with counts ``stops``, ``faults``,
    ``overrides``). The client's code only for the session's owner."""
    session = session_or_404(service, session_id)
    report = await detailed_report(service, session_id)
    if report is None:
        return _report_of(service, session_id, user)
    return report if owns(user, session) else {**report, "client_ref": None}


@router.get(
    "/api/sessions/{session_id}/report.csv",
    operation_id="session_report_csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
async def session_report_csv(
    session_id: SessionId,
    user: Annotated[User, Depends(require("session_report_csv"))],
    service: Service,
) -> Response:
    """The report as CSV, one row per zone."""
    return Response(
        report_csv(_report_of(service, session_id, user)),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{session_id}.csv"'},
    )


REPORT_COLUMNS = (
    "session_id",
    "client_ref",
    "plan_id",
    "state",
    "zone_id",
    "label",
    "passes_done",
    "max_passes",
    "max_depth_um",
    "policy_max_depth_um",
    "deepest_setpoint_um",
    "peak_depth_um",
    "override_reason",
)


def report_csv(report: dict[str, Any]) -> str:
    """One row per zone, the session's fields repeated (easy to load anywhere)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    for zone in report["zones"]:
        override = zone.get("override") or {}
        writer.writerow(
            neutralise(cell)
            for cell in [
                report["session_id"],
                report["client_ref"] or "",
                report["plan_id"],
                report["state"],
                zone["zone_id"],
                zone["label"],
                zone["passes_done"],
                zone["max_passes"],
                zone["max_depth_um"],
                zone["policy_max_depth_um"],
                _blank(zone["deepest_setpoint_um"]),
                _blank(zone["peak_depth_um"]),
                override.get("reason", ""),
            ]
        )
    return out.getvalue()


#: What a spreadsheet may read as the start of a formula (or hide one behind).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: object) -> object:
    """A text cell a spreadsheet would evaluate, made plain text with a leading ``'``.

    Numbers stay numbers (a negative number is data, not a formula).
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _blank(value: object) -> object:
    return "" if value is None else value
