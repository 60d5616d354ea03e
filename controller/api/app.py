"""The tablet API: HTTP + WebSocket over a running :class:`ControllerService`.

``create_app(service, users)`` builds the FastAPI application. It makes no
clinical decision: each request becomes one action for the service, and every
refusal comes back as JSON with ``code``, ``message`` and ``remediation`` (the
same sentences the audit log records). It must run in the service's event loop
(the service is not thread-safe); ``penctl serve`` runs uvicorn there.
"""

# No `from __future__ import annotations`: FastAPI must evaluate the endpoints'
# annotations, which name dependencies local to create_app.

import asyncio
import contextlib
import csv
import io
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.live import LiveTelemetry
from controller.policy import ZoneLimits
from controller.safety.gate import RefusalReason, Refused
from controller.service import ActionRefused, ControllerService
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
from controller.sessions.records import Session

from .auth import LoginLimiter, TokenStore, User, UserStore
from .models import (
    ID_PATTERN,
    CreateSessionRequest,
    DeviceInfo,
    LoginRequest,
    LoginResponse,
    Me,
    OverrideRequest,
    PlanInfo,
    Problem,
    SelectZoneRequest,
    SessionSummary,
    SetDepthRequest,
    SetStrokeRateRequest,
    ZoneInfo,
)
from .roles import ROLE_MATRIX

#: Registry refusals that are not "the state does not allow it" (409).
_STATUS_FOR: dict[RefusalReason, int] = {
    RefusalReason.UNKNOWN_SESSION: 404,
    RefusalReason.ROLE_NOT_PERMITTED: 403,
    RefusalReason.BAD_REQUEST: 422,
    RefusalReason.UNKNOWN_PLAN: 422,
    RefusalReason.UNKNOWN_ZONE: 422,
    RefusalReason.ZONE_NOT_IN_PLAN: 422,
    RefusalReason.OVERRIDE_NEEDS_REASON: 422,
}
_ARM_ANSWERS = frozenset({EventKind.ARMED, EventKind.REFUSED, EventKind.FAULT})
_STATIC = resources.files("controller.api") / "static"
_PROBLEM = {"model": Problem}
_COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _PROBLEM,
    403: _PROBLEM,
    404: _PROBLEM,
    409: _PROBLEM,
    422: _PROBLEM,
}

SessionId = Annotated[str, PathParam(pattern=ID_PATTERN, description="session id")]
Port = Annotated[str, PathParam(min_length=1, max_length=200, description="pen port name")]


class ApiError(StarletteHTTPException):
    """An HTTP error whose body is a :class:`Problem`."""

    def __init__(
        self, status: int, code: str, message: str, remediation: str, **headers: str
    ) -> None:
        super().__init__(status, message, headers or None)
        self.problem = Problem(code=code, message=message, remediation=remediation)


def refusal_error(refusal: Refused) -> ApiError:
    return ApiError(
        _STATUS_FOR.get(refusal.code, 409), str(refusal.code), refusal.message, refusal.remediation
    )


def _problem_response(
    status: int, problem: Problem, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(problem.model_dump(exclude_none=True), status, headers=headers)


def create_app(
    service: ControllerService,
    users: UserStore,
    *,
    token_lifetime_s: float = 8 * 3600.0,
    login_attempts: int = 5,
    login_window_s: float = 60.0,
) -> FastAPI:
    """The tablet API and web page for ``service``; ``users`` may sign in."""
    app = FastAPI(
        title="Pen session controller: tablet API",
        version="1.0.0",
        description=(
            "Sessions, zones, depth, arming and live telemetry for the therapist's tablet. "
            "Sign in at POST /api/login and send `Authorization: Bearer <token>`; the "
            "WebSocket takes `?token=` or the token as its first message. Every error "
            "is JSON with code, message and remediation."
        ),
        responses=_COMMON_ERRORS,
    )
    tokens = TokenStore(lifetime_s=token_lifetime_s)
    limiter = LoginLimiter(attempts=login_attempts, window_s=login_window_s)
    bearer = HTTPBearer(auto_error=False)
    app.state.service = service
    app.state.tokens = tokens
    app.state.users = users

    # --- errors ---------------------------------------------------------------------

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc, ApiError):
            return _problem_response(exc.status_code, exc.problem, exc.headers)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        problem = Problem(code=code, message=str(exc.detail), remediation="Check the request.")
        return _problem_response(exc.status_code, problem, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            errors.append({"field": ".".join(loc), "message": str(err.get("msg", "invalid"))})
        first = errors[0] if errors else {"field": "request", "message": "invalid"}
        problem = Problem(
            code="bad_request",
            message=f"{first['field']}: {first['message']}",
            remediation="Correct the named field and send the request again.",
            errors=errors,
        )
        return _problem_response(422, problem)

    # --- authentication -------------------------------------------------------------

    def require(operation: str) -> Callable[..., Awaitable[User]]:
        allowed = ROLE_MATRIX[operation]

        async def dependency(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        ) -> User:
            user = tokens.user(credentials.credentials) if credentials else None
            if user is None:
                raise ApiError(
                    401,
                    "not_signed_in",
                    "You are not signed in, or your sign-in has expired.",
                    "Sign in again.",
                    **{"WWW-Authenticate": "Bearer"},
                )
            if user.role not in allowed:
                raise ApiError(
                    403,
                    "role_not_permitted",
                    f"The {user.role} role may not do this.",
                    "Ask someone with the right role to sign in.",
                )
            return user

        return dependency

    def act(action: Action) -> None:
        try:
            service.act(action)
        except ActionRefused as exc:
            raise refusal_error(exc.refusal) from exc

    def session_or_404(session_id: str) -> Session:
        session = service.session(session_id)
        if session is None:
            raise ApiError(
                404,
                str(RefusalReason.UNKNOWN_SESSION),
                f"There is no session {session_id}.",
                "Check the session id, or start a new session.",
            )
        return session

    @app.post("/api/login", operation_id="login", tags=["auth"])
    async def login(body: LoginRequest, request: Request) -> LoginResponse:
        """Exchange a user name and password for a bearer token."""
        client = request.client.host if request.client else "unknown"
        keys = (f"user:{body.username}", f"ip:{client}")
        wait = limiter.retry_after(*keys)
        if wait > 0:
            raise ApiError(
                429,
                "too_many_attempts",
                "Too many failed sign-in attempts.",
                f"Wait {int(wait) + 1} seconds, then try again.",
                **{"Retry-After": str(int(wait) + 1)},
            )
        # Hashing costs tens of milliseconds: keep the pens' event loop free.
        user = await asyncio.to_thread(users.verify, body.username, body.password)
        if user is None:
            limiter.failed(*keys)
            raise ApiError(
                401,
                "bad_credentials",
                "The user name or password is wrong.",
                "Check both and try again.",
            )
        limiter.succeeded(keys[0])
        token, lifetime = tokens.issue(user)
        return LoginResponse(
            token=token,
            expires_in=lifetime,
            username=user.name,
            role=user.role,
            actor_id=user.actor_id,
        )

    @app.post("/api/logout", operation_id="logout", tags=["auth"], status_code=204)
    async def logout(
        user: Annotated[User, Depends(require("logout"))],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if credentials:
            tokens.revoke(credentials.credentials)

    @app.get("/api/me", operation_id="me", tags=["auth"])
    async def me(user: Annotated[User, Depends(require("me"))]) -> Me:
        return Me(username=user.name, role=user.role, actor_id=user.actor_id)

    # --- devices, plans, zones ------------------------------------------------------

    @app.get("/api/devices", operation_id="list_devices", tags=["devices"])
    async def list_devices(
        user: Annotated[User, Depends(require("list_devices"))],
    ) -> list[DeviceInfo]:
        """Every configured pen: identity, link, arming, cartridge, session, link statistics."""
        return [DeviceInfo(**d) for d in service.devices()]

    def device(port: str) -> DeviceInfo:
        for d in service.devices():
            if d["port"] == port:
                return DeviceInfo(**d)
        raise ApiError(404, "unknown_device", f"There is no pen {port}.", "Pick a listed pen.")

    @app.get("/api/devices/{port}", operation_id="get_device", tags=["devices"])
    async def get_device(
        port: Port, user: Annotated[User, Depends(require("get_device"))]
    ) -> DeviceInfo:
        return device(port)

    @app.get("/api/devices/{port}/link", operation_id="get_device_link", tags=["devices"])
    async def get_device_link(
        port: Port, user: Annotated[User, Depends(require("get_device_link"))]
    ) -> dict[str, Any]:
        """Link statistics: frames, CRC errors, retransmits, round-trip time."""
        return device(port).link_stats

    def zone_info(z: ZoneLimits) -> ZoneInfo:
        return ZoneInfo(
            zone_id=z.zone_id,
            label=z.label,
            max_depth_um=z.max_depth_um,
            max_passes=z.max_passes,
            puncture_budget=z.puncture_budget,
        )

    @app.get("/api/plans", operation_id="list_plans", tags=["plans"])
    async def list_plans(user: Annotated[User, Depends(require("list_plans"))]) -> list[PlanInfo]:
        """Treatment plans and their zones with the policy's limits."""
        zones = service.zones()
        return [
            PlanInfo(
                plan_id=p.plan_id, label=p.label, zones=[zone_info(zones[z]) for z in p.zone_ids]
            )
            for p in service.plans()
        ]

    @app.get("/api/zones", operation_id="list_zones", tags=["plans"])
    async def list_zones(user: Annotated[User, Depends(require("list_zones"))]) -> list[ZoneInfo]:
        return [zone_info(z) for z in service.zones().values()]

    # --- sessions -------------------------------------------------------------------

    @app.get("/api/sessions", operation_id="list_sessions", tags=["sessions"])
    async def list_sessions(
        user: Annotated[User, Depends(require("list_sessions"))],
    ) -> list[SessionSummary]:
        return [
            SessionSummary(
                session_id=s.session_id,
                port=s.port,
                client_ref=s.client_ref,
                plan_id=s.plan_id,
                state=str(s.state),
                created_at=s.created_at,
            )
            for s in service.sessions()
        ]

    @app.post("/api/sessions", operation_id="create_session", tags=["sessions"], status_code=201)
    async def create_session(
        body: CreateSessionRequest, user: Annotated[User, Depends(require("create_session"))]
    ) -> Session:
        """Open a session for a pseudonymous client on a pen, with a plan."""
        sid = service.new_session_id()
        act(CreateSession(sid, body.port, body.client_ref, body.plan_id, user.actor))
        return session_or_404(sid)

    @app.get("/api/sessions/{session_id}", operation_id="get_session", tags=["sessions"])
    async def get_session(
        session_id: SessionId, user: Annotated[User, Depends(require("get_session"))]
    ) -> Session:
        return session_or_404(session_id)

    def simple(operation: str, path: str, build: Callable[[str, User], Action], doc: str) -> None:
        async def endpoint(
            session_id: SessionId, user: Annotated[User, Depends(require(operation))]
        ) -> Session:
            act(build(session_id, user))
            return session_or_404(session_id)

        endpoint.__doc__ = doc
        app.post(path, operation_id=operation, tags=["sessions"], name=operation)(endpoint)

    simple(
        "start_session",
        "/api/sessions/{session_id}/start",
        lambda s, u: StartSession(s, u.actor),
        "Start the session (binds it to the pen it was opened on).",
    )
    simple(
        "disarm_pen",
        "/api/sessions/{session_id}/disarm",
        lambda s, u: DisarmPen(s, u.actor),
        "Disarm the pen. Always allowed.",
    )
    simple(
        "stop_pen",
        "/api/sessions/{session_id}/stop",
        lambda s, u: StopPen(s, u.actor),
        "The stop button: stop the needle and disarm at once. Always allowed.",
    )
    simple(
        "pause_session",
        "/api/sessions/{session_id}/pause",
        lambda s, u: PauseSession(s, u.actor),
        "Pause the session.",
    )
    simple(
        "resume_session",
        "/api/sessions/{session_id}/resume",
        lambda s, u: ResumeSession(s, u.actor),
        "Continue a paused or interrupted session (does not arm the pen).",
    )
    simple(
        "acknowledge_fault",
        "/api/sessions/{session_id}/acknowledge-fault",
        lambda s, u: AcknowledgeFault(s, u.actor),
        "The therapist has checked the pen and the client after a fault.",
    )
    simple(
        "end_session",
        "/api/sessions/{session_id}/end",
        lambda s, u: EndSession(s, u.actor),
        "End the session; its report is then final.",
    )

    @app.post("/api/sessions/{session_id}/zone", operation_id="select_zone", tags=["sessions"])
    async def select_zone(
        session_id: SessionId,
        body: SelectZoneRequest,
        user: Annotated[User, Depends(require("select_zone"))],
    ) -> Session:
        act(SelectZone(session_id, body.zone_id, user.actor))
        return session_or_404(session_id)

    @app.post("/api/sessions/{session_id}/depth", operation_id="set_depth", tags=["sessions"])
    async def set_depth(
        session_id: SessionId,
        body: SetDepthRequest,
        user: Annotated[User, Depends(require("set_depth"))],
    ) -> Session:
        """Set the needle depth for the selected zone; above the zone's limit is refused."""
        act(SetZoneDepth(session_id, body.depth_um, user.actor))
        return session_or_404(session_id)

    @app.post(
        "/api/sessions/{session_id}/stroke-rate", operation_id="set_stroke_rate", tags=["sessions"]
    )
    async def set_stroke_rate(
        session_id: SessionId,
        body: SetStrokeRateRequest,
        user: Annotated[User, Depends(require("set_stroke_rate"))],
    ) -> Session:
        act(SetStrokeRate(session_id, body.rate_hz, user.actor))
        return session_or_404(session_id)

    @app.post("/api/sessions/{session_id}/arm", operation_id="arm_pen", tags=["sessions"])
    async def arm_pen(
        session_id: SessionId, user: Annotated[User, Depends(require("arm_pen"))]
    ) -> Session:
        """Arm the pen; answers once the pen has confirmed (or refused)."""

        def answered(e: SessionEvent) -> bool:
            # "already": armed or being armed by an earlier request; arming is idempotent.
            already = e.kind is EventKind.ARMING and bool(e.detail.get("already"))
            return e.session_id == session_id and (e.kind in _ARM_ANSWERS or already)

        try:
            event = await service.act_and_wait(ArmPen(session_id, user.actor), answered)
        except ActionRefused as exc:
            raise refusal_error(exc.refusal) from exc
        except TimeoutError as exc:
            raise ApiError(
                504,
                "pen_no_answer",
                "The pen did not confirm arming in time.",
                "Check that the pen is on and connected, then tap Arm again.",
            ) from exc
        if event.kind not in (EventKind.ARMED, EventKind.ARMING):
            raise ApiError(
                409,
                str(event.detail.get("code") or event.kind.value),
                str(event.detail.get("message") or "The pen did not arm."),
                str(event.detail.get("remediation") or "Check the pen, then tap Arm again."),
            )
        return session_or_404(session_id)

    @app.post(
        "/api/sessions/{session_id}/overrides", operation_id="override_zone", tags=["overrides"]
    )
    async def override_zone(
        session_id: SessionId,
        body: OverrideRequest,
        user: Annotated[User, Depends(require("override_zone"))],
    ) -> Session:
        """A manager raises (or lowers) a zone's limits for this session only, with a reason."""
        act(
            OverrideZone(
                session_id,
                body.zone_id,
                user.actor,
                body.reason,
                max_depth_um=body.max_depth_um,
                max_passes=body.max_passes,
            )
        )
        return session_or_404(session_id)

    # --- reports and audit ----------------------------------------------------------

    def report_of(session_id: str) -> dict[str, Any]:
        report = service.report(session_id)
        if report is None:
            session_or_404(session_id)  # raises
            raise AssertionError("unreachable")
        return report

    @app.get("/api/sessions/{session_id}/report", operation_id="session_report", tags=["reports"])
    async def session_report(
        session_id: SessionId, user: Annotated[User, Depends(require("session_report"))]
    ) -> dict[str, Any]:
        """Zones, passes, depths against limits, overrides, cartridges, refusals."""
        return report_of(session_id)

    @app.get(
        "/api/sessions/{session_id}/report.csv",
        operation_id="session_report_csv",
        tags=["reports"],
        response_class=Response,
        responses={200: {"content": {"text/csv": {}}}},
    )
    async def session_report_csv(
        session_id: SessionId, user: Annotated[User, Depends(require("session_report_csv"))]
    ) -> Response:
        """The report as CSV, one row per zone."""
        return Response(
            report_csv(report_of(session_id)),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{session_id}.csv"'},
        )

    @app.get("/api/audit", operation_id="audit_log", tags=["audit"])
    async def audit_log(
        user: Annotated[User, Depends(require("audit_log"))],
        session_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
    ) -> list[dict[str, Any]]:
        """The newest audit records (hash-chained; verify with `penctl audit verify`)."""
        records = await service.audit_records(session_id, limit)
        return [r.as_dict() for r in records]

    # --- live stream ----------------------------------------------------------------

    @app.websocket("/api/sessions/{session_id}/live")
    async def live(websocket: WebSocket, session_id: str, token: str | None = None) -> None:
        """Tablet-rate telemetry of the session's pen and every event of the session."""
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            if token is None:
                token = await _first_message_token(websocket)
            user = tokens.user(token) if token else None
            if user is None or user.role not in ROLE_MATRIX["live"]:
                await websocket.send_json(
                    {
                        "type": "error",
                        "code": "not_signed_in" if user is None else "role_not_permitted",
                        "message": "This live view needs a signed-in therapist or manager.",
                        "remediation": "Sign in again.",
                    }
                )
                await websocket.close(code=4401 if user is None else 4403)
                return
            session = service.session(session_id)
            if session is None:
                await websocket.send_json(
                    {
                        "type": "error",
                        "code": "unknown_session",
                        "message": f"There is no session {session_id}.",
                        "remediation": "Check the session id.",
                    }
                )
                await websocket.close(code=4404)
                return
            await _stream(websocket, service, session)

    # --- the tablet page ------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(_STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")
    return app


async def _first_message_token(websocket: WebSocket) -> str | None:
    """A browser cannot set headers on a WebSocket: it may send ``{"token": ...}`` first."""
    try:
        async with asyncio.timeout(5.0):
            text = await websocket.receive_text()
    except TimeoutError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip() or None
    token = data.get("token") if isinstance(data, dict) else None
    return token if isinstance(token, str) else None


async def _stream(websocket: WebSocket, service: ControllerService, session: Session) -> None:
    sid, port = session.session_id, session.port
    sub = service.subscribe(maxsize=512)
    # Any message or the close from the tablet ends the stream.
    reader = asyncio.create_task(_drain(websocket))
    try:
        await websocket.send_json({"type": "hello", "session": session.model_dump(mode="json")})
        while not reader.done():
            getter = asyncio.ensure_future(sub.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            item = getter.result()
            if isinstance(item, LiveTelemetry):
                if item.port == port:
                    await websocket.send_json({"type": "telemetry", **asdict(item)})
            elif item.session_id == sid or (item.session_id is None and item.port == port):
                await websocket.send_text(json.dumps(event_json(item), default=str))
    finally:
        service.unsubscribe(sub)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _drain(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return


def event_json(event: SessionEvent) -> dict[str, Any]:
    """A session event as the tablet receives it."""
    return {
        "type": "event",
        "kind": event.kind.value,
        "at": event.at,
        "port": event.port,
        "session_id": event.session_id,
        "detail": dict(event.detail),
    }


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
