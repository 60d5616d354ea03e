"""Sessions and what a therapist or manager does in one: ``/api/sessions...``.

The list, creation and reading of sessions, then one route per action (start,
disarm, stop, pause, resume, acknowledge a fault, end, zone, depth, stroke
rate, arm, overrides, take-over). Each action is handed to the controller as it
is; the answer is the session as it stands afterwards, or the refusal as a Problem.

A session belongs to the therapist who opened it; the controller's registry
enforces that (a 403 ``not_session_owner``). What this router adds is the view:
anyone treating may list and read sessions, but only the owner sees a session's
client code (``client_ref`` is null for everyone else).
"""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from controller.errors import ActionRefused, CoreBusyError, CoreUnavailableError
from controller.sessions import (
    AcknowledgeFault,
    Action,
    ArmPen,
    CreateSession,
    DisarmPen,
    EndSession,
    EventKind,
    OverrideZone,
    PauseSession,
    ResumeSession,
    SelectZone,
    SessionEvent,
    SetStrokeRate,
    SetZoneDepth,
    StartSession,
    StopPen,
)
from controller.sessions.actions import TakeOverSession

from ..auth import User
from ..deps import Service, act, owns, require, session_view_or_404
from ..errors import ApiError, core_unavailable, refusal_error
from ..models import (
    ID_PATTERN,
    CreateSessionRequest,
    OverrideRequest,
    SelectZoneRequest,
    SessionSummary,
    SessionView,
    SetDepthRequest,
    SetStrokeRateRequest,
    TakeOverRequest,
)

# Tags per route: the overrides route is filed under its own.
router = APIRouter()

SessionId = Annotated[str, PathParam(pattern=ID_PATTERN, description="session id")]
_ARM_ANSWERS = frozenset({EventKind.ARMED, EventKind.REFUSED, EventKind.FAULT})


@router.get("/api/sessions", operation_id="list_sessions", tags=["sessions"])
async def list_sessions(
    user: Annotated[User, Depends(require("list_sessions"))], service: Service
) -> list[SessionSummary]:
    """Every session; another's without its client code."""
    return [
        SessionSummary(
            session_id=s.session_id,
            port=s.port,
            client_ref=s.client_ref if owns(user, s) else None,
            therapist_id=s.therapist_id,
            mine=owns(user, s),
            plan_id=s.plan_id,
            state=str(s.state),
            created_at=s.created_at,
        )
        for s in service.sessions()
    ]


@router.post("/api/sessions", operation_id="create_session", tags=["sessions"], status_code=201)
async def create_session(
    body: CreateSessionRequest,
    user: Annotated[User, Depends(require("create_session"))],
    service: Service,
) -> SessionView:
    """Open a session for a pseudonymous client on a pen, with a plan. It is yours."""
    sid = service.new_session_id()
    await act(service, CreateSession(sid, body.port, body.client_ref, body.plan_id, user.actor))
    return session_view_or_404(service, sid, user)


@router.get("/api/sessions/{session_id}", operation_id="get_session", tags=["sessions"])
async def get_session(
    session_id: SessionId, user: Annotated[User, Depends(require("get_session"))], service: Service
) -> SessionView:
    """The session; its client code only if it is yours."""
    return session_view_or_404(service, session_id, user)


# --- actions ----------------------------------------------------------------------------


def _simple(operation: str, path: str, build: Callable[[str, User], Action], doc: str) -> None:
    """A route whose action needs nothing but the session and the user."""

    async def endpoint(
        session_id: SessionId, user: Annotated[User, Depends(require(operation))], service: Service
    ) -> SessionView:
        await act(service, build(session_id, user))
        return session_view_or_404(service, session_id, user)

    endpoint.__doc__ = doc
    router.post(path, operation_id=operation, tags=["sessions"], name=operation)(endpoint)


_simple(
    "start_session",
    "/api/sessions/{session_id}/start",
    lambda s, u: StartSession(s, u.actor),
    "Start the session (binds it to the pen it was opened on).",
)
_simple(
    "disarm_pen",
    "/api/sessions/{session_id}/disarm",
    lambda s, u: DisarmPen(s, u.actor),
    "Disarm the pen. Always allowed.",
)
_simple(
    "stop_pen",
    "/api/sessions/{session_id}/stop",
    lambda s, u: StopPen(s, u.actor),
    "The stop button: stop the needle and disarm at once. Always allowed.",
)
_simple(
    "pause_session",
    "/api/sessions/{session_id}/pause",
    lambda s, u: PauseSession(s, u.actor),
    "Pause the session.",
)
_simple(
    "resume_session",
    "/api/sessions/{session_id}/resume",
    lambda s, u: ResumeSession(s, u.actor),
    "Continue a paused or interrupted session (does not arm the pen).",
)
_simple(
    "acknowledge_fault",
    "/api/sessions/{session_id}/acknowledge-fault",
    lambda s, u: AcknowledgeFault(s, u.actor),
    "The therapist has checked the pen and the client after a fault.",
)
_simple(
    "end_session",
    "/api/sessions/{session_id}/end",
    lambda s, u: EndSession(s, u.actor),
    "End the session; its report is then final.",
)


@router.post("/api/sessions/{session_id}/zone", operation_id="select_zone", tags=["sessions"])
async def select_zone(
    session_id: SessionId,
    body: SelectZoneRequest,
    user: Annotated[User, Depends(require("select_zone"))],
    service: Service,
) -> SessionView:
    await act(service, SelectZone(session_id, body.zone_id, user.actor))
    return session_view_or_404(service, session_id, user)


@router.post("/api/sessions/{session_id}/depth", operation_id="set_depth", tags=["sessions"])
async def set_depth(
    session_id: SessionId,
    body: SetDepthRequest,
    user: Annotated[User, Depends(require("set_depth"))],
    service: Service,
) -> SessionView:
    """Set the needle depth for the selected zone; above the zone's limit is refused."""
    await act(service, SetZoneDepth(session_id, body.depth_um, user.actor))
    return session_view_or_404(service, session_id, user)


@router.post(
    "/api/sessions/{session_id}/stroke-rate", operation_id="set_stroke_rate", tags=["sessions"]
)
async def set_stroke_rate(
    session_id: SessionId,
    body: SetStrokeRateRequest,
    user: Annotated[User, Depends(require("set_stroke_rate"))],
    service: Service,
) -> SessionView:
    await act(service, SetStrokeRate(session_id, body.rate_hz, user.actor))
    return session_view_or_404(service, session_id, user)


@router.post("/api/sessions/{session_id}/arm", operation_id="arm_pen", tags=["sessions"])
async def arm_pen(
    session_id: SessionId, user: Annotated[User, Depends(require("arm_pen"))], service: Service
) -> SessionView:
    """Arm the pen; answers once the pen has confirmed (or refused)."""

    def answered(e: SessionEvent) -> bool:
        # "already": armed or being armed by an earlier request; arming is idempotent.
        already = e.kind is EventKind.ARMING and bool(e.detail.get("already"))
        # The session left ACTIVE meanwhile (ended, paused by another tablet): no arming.
        left = e.kind is EventKind.STATE_CHANGED and e.detail.get("state") != "active"
        return e.session_id == session_id and (e.kind in _ARM_ANSWERS or already or left)

    try:
        event = await service.act_and_wait(ArmPen(session_id, user.actor), answered)
    except ActionRefused as exc:
        raise refusal_error(exc.refusal) from exc
    except (CoreBusyError, CoreUnavailableError) as exc:
        raise core_unavailable(exc) from exc
    except TimeoutError as exc:
        raise ApiError(
            504,
            "pen_no_answer",
            "The pen did not confirm arming in time.",
            "Check that the pen is on and connected, then tap Arm again.",
        ) from exc
    if event.kind is EventKind.STATE_CHANGED:
        raise ApiError(
            409,
            "session_not_active",
            f"The session became {event.detail.get('state')} before the pen armed; "
            "the pen stays disarmed.",
            "Resume or reopen the session, then tap Arm again.",
        )
    if event.kind not in (EventKind.ARMED, EventKind.ARMING):
        raise ApiError(
            409,
            str(event.detail.get("code") or event.kind.value),
            str(event.detail.get("message") or "The pen did not arm."),
            str(event.detail.get("remediation") or "Check the pen, then tap Arm again."),
        )
    return session_view_or_404(service, session_id, user)


@router.post(
    "/api/sessions/{session_id}/overrides", operation_id="override_zone", tags=["overrides"]
)
async def override_zone(
    session_id: SessionId,
    body: OverrideRequest,
    user: Annotated[User, Depends(require("override_zone"))],
    service: Service,
) -> SessionView:
    """A manager raises (or lowers) a zone's limits for this session only, with a reason."""
    await act(
        service,
        OverrideZone(
            session_id,
            body.zone_id,
            user.actor,
            body.reason,
            max_depth_um=body.max_depth_um,
            max_passes=body.max_passes,
        ),
    )
    return session_view_or_404(service, session_id, user)


@router.post(
    "/api/sessions/{session_id}/take-over", operation_id="take_over_session", tags=["sessions"]
)
async def take_over_session(
    session_id: SessionId,
    body: TakeOverRequest,
    user: Annotated[User, Depends(require("take_over_session"))],
    service: Service,
) -> SessionView:
    """A manager takes the session over from its therapist, with a reason (audited).

    The manager becomes its owner: from then on only they treat in it and see its client.
    """
    await act(service, TakeOverSession(session_id, user.actor, body.reason))
    return session_view_or_404(service, session_id, user)
