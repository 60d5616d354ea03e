"""The report the tablet shows and prints: the controller's report, each pass, and every
stop, fault, override and refusal of the session from the audit log.

Built in the API from what ``ControllerApi`` offers (the report, the session's
record and its audit records), so the controller's report stays as it is.
"""

from __future__ import annotations

from typing import Any

from .deps import ControllerApi

#: Audit kinds the report lists, and how many it counts of each.
LISTED = {"stop": "stops", "fault": "faults", "override": "overrides", "refusal": "refusals"}


async def detailed_report(service: ControllerApi, session_id: str) -> dict[str, Any] | None:
    """The report with ``pass_list``, ``events`` and counts of stops, faults and overrides."""
    report = service.report(session_id)
    session = service.session(session_id)
    if report is None or session is None:
        return None
    labels = {z.zone_id: z.label for z in session.zones.values()}
    report = dict(report)
    report["pass_list"] = [
        {
            "zone_id": p.zone_id,
            "zone_label": labels.get(p.zone_id, p.zone_id),
            "number": p.number,
            "started_at": p.started_at,
            "ended_at": p.ended_at,
            "depth_setpoint_um": p.depth_setpoint_um,
            "peak_depth_um": p.peak_depth_um,
            "strokes": p.strokes,
            "end_reason": p.end_reason,
            "cartridge_id": p.cartridge_id,
            "recovered": p.recovered,
        }
        for p in session.passes
    ]
    records = await service.audit_records(session_id, 1000)
    events = [
        {"seq": r.seq, "at": r.at, "kind": str(r.kind), "message": r.message}
        for r in records
        if str(r.kind) in LISTED
    ]
    report["events"] = events
    for kind, name in LISTED.items():
        if kind != "refusal":
            report[name] = sum(1 for e in events if e["kind"] == kind)
    return report
