"""The end-of-session report: zones, passes, depths against limits, cartridges.

Built from a :class:`Session` record alone, so anything holding the record (the
registry on END, the API for an ended session read from the journal) builds the
same report.
"""

from __future__ import annotations

from typing import Any

from .records import Session


def build_report(session: Session) -> dict[str, Any]:
    """The report as plain JSON-able data (the tablet's report and the MQTT event)."""
    zones = []
    for zone in session.zones.values():
        passes = [p for p in session.passes if p.zone_id == zone.zone_id]
        peaks = [p.peak_depth_um for p in passes if p.peak_depth_um is not None]
        setpoints = [p.depth_setpoint_um for p in passes if p.depth_setpoint_um is not None]
        zones.append(
            {
                "zone_id": zone.zone_id,
                "label": zone.label,
                "passes_done": zone.passes_done,
                "max_passes": zone.max_passes,
                "max_depth_um": zone.max_depth_um,
                "policy_max_depth_um": zone.policy_max_depth_um,
                "deepest_setpoint_um": max(setpoints, default=None),
                "peak_depth_um": max(peaks, default=None),
                "override": zone.override.model_dump(mode="json") if zone.override else None,
            }
        )
    return {
        "session_id": session.session_id,
        "client_ref": session.client_ref,
        "therapist_id": session.therapist_id,
        "plan_id": session.plan_id,
        "state": str(session.state),
        "pen_serial": session.pen_serial,
        "started_at": session.started_at,
        "ended_at": session.ended_at,
        "zones": zones,
        "passes": len(session.passes),
        "cartridges": list(session.cartridges_used),
        "refusals": session.refusals,
        "policy_fingerprint": session.policy_fingerprint,
    }
