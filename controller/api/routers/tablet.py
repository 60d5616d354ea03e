"""What the tablet page needs besides the session API: ``/api/overview``,
``/api/sessions/{id}/controls`` and ``/api/users``.

The overview is the page's snapshot of the clinic: it rebuilds every view from
it after a reload, a new sign-in or a network drop, never from what it showed
before. The controls say, per action, whether the controller would refuse it
now and why, so the page disables a button with the reason beside it.
"""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from ..auth import User
from ..deps import ControllerApi, Service, Users, owns, require, session_or_404
from ..errors import ApiError
from ..views import Overview, PenOverview, PenSession, UserInfo
from .sessions import SessionId

router = APIRouter(tags=["tablet"])
_LIVE = frozenset({"created", "active", "paused", "interrupted", "faulted"})


def _pen_session(service: ControllerApi, sid: str | None, user: User) -> PenSession | None:
    session = service.session(sid) if sid else None
    if session is None or str(session.state) not in _LIVE:
        return None
    zone = session.zones.get(session.current_zone or "")
    mine = owns(user, session)
    return PenSession(
        session_id=session.session_id,
        therapist_id=session.therapist_id,
        mine=mine,
        client_ref=session.client_ref if mine else None,
        plan_id=session.plan_id,
        state=str(session.state),
        started_at=session.started_at,
        zone_id=zone.zone_id if zone else None,
        zone_label=zone.label if zone else None,
        zone_max_depth_um=zone.max_depth_um if zone else None,
        passes_done=zone.passes_done if zone else None,
        max_passes=zone.max_passes if zone else None,
        depth_setpoint_um=session.depth_setpoint_um,
        fault=session.fault.detail if session.fault else None,
    )


@router.get("/api/overview", operation_id="overview")
async def overview(
    user: Annotated[User, Depends(require("overview"))], service: Service
) -> Overview:
    """Every pen now: link, arming, motor, cartridge and its live session (zone, depth,
    passes, therapist; the client code only in your own). What the page rebuilds from."""
    pens = [
        PenOverview(
            port=d["port"],
            name=str(d.get("name") or d["port"]),
            serial=d["serial"],
            link=str(d["link"]),
            armed=str(d["armed"]),
            motor_running=bool(d["motor_running"]),
            cartridge_id=d["cartridge_id"],
            session=_pen_session(service, d["session_id"], user),
        )
        for d in service.devices()
    ]
    return Overview(at=time.time(), pens=pens)


@router.get("/api/sessions/{session_id}/controls", operation_id="session_controls")
async def session_controls(
    session_id: SessionId,
    user: Annotated[User, Depends(require("session_controls"))],
    service: Service,
) -> dict[str, Any]:
    """Each action of the session: null if the controller would allow it now, else the
    refusal it would answer (code, message, remediation); the selected zone's depth
    range; the pen's arming. The controller still decides when the action is asked."""
    session = session_or_404(service, session_id)
    controls = await service.controls(session_id)
    if controls is None:  # pragma: no cover - the session exists
        raise ApiError(404, "unknown_session", "No such session.", "Check the session id.")
    if not owns(user, session):
        theirs = {
            "code": "not_session_owner",
            "message": f"This session belongs to {session.therapist_id}.",
            "remediation": "Only its therapist acts in it; anyone may STOP its pen.",
        }
        for name in controls["actions"]:
            if name not in ("stop", "disarm"):
                controls["actions"][name] = theirs
    return controls


@router.get("/api/users", operation_id="list_users")
async def list_users(
    user: Annotated[User, Depends(require("list_users"))], users: Users
) -> list[UserInfo]:
    """Who may sign in: name, role and pseudonymous id (never a password hash)."""
    return [
        UserInfo(username=u.name, role=u.role, actor_id=u.actor_id) for u in users.users.values()
    ]
