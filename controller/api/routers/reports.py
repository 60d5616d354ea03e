"""A session's report, as JSON and as CSV: ``/api/sessions/{id}/report[.csv]``."""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

import csv
import io
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ..auth import User
from ..deps import ControllerApi, Service, require, session_or_404
from ..report_detail import detailed_report
from .sessions import SessionId

router = APIRouter(tags=["reports"])


def _report_of(service: ControllerApi, session_id: str) -> dict[str, Any]:
    report = service.report(session_id)
    if report is None:
        session_or_404(service, session_id)  # raises
        raise AssertionError("unreachable")
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
    ``overrides``)."""
    report = await detailed_report(service, session_id)
    return report if report is not None else _report_of(service, session_id)


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
        report_csv(_report_of(service, session_id)),
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
            [
                report["session_id"],
                report["client_ref"],
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


def _blank(value: object) -> object:
    return "" if value is None else value
