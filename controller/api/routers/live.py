"""The live stream of a session: ``/api/sessions/{id}/live`` (WebSocket).

Tablet-rate telemetry of the session's pen and every event of the session, for
the session's owner and for managers (who watch every pen). A browser cannot
set headers on a WebSocket, so the token comes as ``?token=`` or as the first
message, which must arrive within ``api.ws_auth_timeout_s`` (1 s); at most
``api.max_unauthenticated_ws`` connections may wait to sign in at once, and
one beyond is closed at once with 1013 (try again later). The stream ends the
moment its token is revoked (sign-out) or expires (4401), or the session stops
being the viewer's to see (4403): it is never a way around a sign-out.
"""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

import asyncio
import contextlib
import json
import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from controller.live import LiveItem, LiveTelemetry
from controller.sessions import Role, SessionEvent
from controller.sessions.records import Session

from ..auth import User
from ..deps import ControllerApi, Guard, Service, Tokens, owns, view_of
from ..roles import ROLE_MATRIX

router = APIRouter()

#: Close codes, in the 4000 range an application may use (4400 + the HTTP status).
NOT_SIGNED_IN, NOT_PERMITTED, NO_SESSION = 4401, 4403, 4404
#: Standard code 1013, "try again later": too many connections are waiting to sign in.
TRY_AGAIN_LATER = 1013
#: How often a stream re-checks that its session is still the viewer's to see.
_OWNER_CHECK_S = 1.0
#: How often the stream says it is alive when nothing else is sent (the tablet calls
#: the connection lost after WS_SILENCE_MS, static/js/health.js, without one).
HEARTBEAT_S = 0.25


@router.websocket("/api/sessions/{session_id}/live")
async def live(
    websocket: WebSocket,
    session_id: str,
    service: Service,
    tokens: Tokens,
    guard: Guard,
    token: str | None = None,
) -> None:
    """Tablet-rate telemetry of the session's pen and every event of the session."""
    await websocket.accept()
    with contextlib.suppress(WebSocketDisconnect):
        if token is None:
            if not guard.enter():
                await websocket.close(
                    code=TRY_AGAIN_LATER, reason="too many connections waiting to sign in"
                )
                return
            try:
                token = await _first_message_token(websocket, guard.auth_timeout_s)
            finally:
                guard.leave()
        user = tokens.user(token) if token else None
        if user is None or user.role not in ROLE_MATRIX["live"]:
            await _refuse(
                websocket,
                NOT_SIGNED_IN if user is None else NOT_PERMITTED,
                "not_signed_in" if user is None else "role_not_permitted",
                "This live view needs a signed-in therapist or manager.",
                "Sign in again.",
            )
            return
        session = service.session(session_id)
        if session is None:
            await _refuse(
                websocket,
                NO_SESSION,
                "unknown_session",
                f"There is no session {session_id}.",
                "Check the session id.",
            )
            return
        if not _may_watch(user, session):
            await _refuse_not_yours(websocket, session)
            return
        assert token is not None
        await _stream(websocket, service, session, user, tokens, token)


def _may_watch(user: User, session: Session) -> bool:
    """The owner watches their session; a manager watches every pen."""
    return owns(user, session) or user.role is Role.MANAGER


async def _refuse(websocket: WebSocket, close: int, code: str, message: str, todo: str) -> None:
    await websocket.send_json(
        {"type": "error", "code": code, "message": message, "remediation": todo}
    )
    await websocket.close(code=close)


async def _refuse_not_yours(websocket: WebSocket, session: Session) -> None:
    await _refuse(
        websocket,
        NOT_PERMITTED,
        "not_session_owner",
        f"This session belongs to {session.therapist_id}.",
        "Only its therapist or a manager may watch it.",
    )


async def _first_message_token(websocket: WebSocket, within: float) -> str | None:
    """A browser cannot set headers on a WebSocket: it sends ``{"token": ...}`` first."""
    try:
        async with asyncio.timeout(within):
            text = await websocket.receive_text()
    except TimeoutError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip() or None
    token = data.get("token") if isinstance(data, dict) else None
    return token if isinstance(token, str) else None


async def _stream(
    websocket: WebSocket,
    service: ControllerApi,
    session: Session,
    user: User,
    tokens: Tokens,
    token: str,
) -> None:
    sid, port = session.session_id, session.port
    sub = service.subscribe(maxsize=512)
    # Any message or the close from the tablet ends the stream; so does the token's end.
    reader = asyncio.create_task(_drain(websocket))
    signed_out = asyncio.create_task(tokens.wait_invalid(token))
    lost = asyncio.create_task(_until_not_watchable(service, sid, user))
    enders = {reader, signed_out, lost}
    getter: asyncio.Future[LiveItem] | None = None
    try:
        hello = view_of(session, user).model_dump(mode="json")
        await websocket.send_json({"type": "hello", "session": hello})
        beat_at = time.monotonic() + HEARTBEAT_S
        while not any(t.done() for t in enders):
            if getter is None:
                getter = asyncio.ensure_future(sub.queue.get())
            wait = max(0.0, beat_at - time.monotonic())
            waiting: set[asyncio.Future[Any]] = {getter, *enders}
            done, _ = await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if time.monotonic() >= beat_at:
                # The tablet's proof that the stream is alive when nothing else happens.
                await websocket.send_json({"type": "heartbeat", "at": time.time()})
                beat_at = time.monotonic() + HEARTBEAT_S
            if any(t in done for t in enders):
                break
            if getter not in done:
                continue
            item = getter.result()
            getter = None
            if isinstance(item, LiveTelemetry):
                if item.port == port:
                    await websocket.send_json({"type": "telemetry", **asdict(item)})
            elif item.session_id == sid or (item.session_id is None and item.port == port):
                mine = owns(user, session)
                await websocket.send_text(json.dumps(event_json(item, mine), default=str))
        if signed_out.done():
            await _refuse(
                websocket,
                NOT_SIGNED_IN,
                "not_signed_in",
                "Your sign-in ended (signed out or expired).",
                "Sign in again.",
            )
        elif lost.done():
            gone = service.session(sid)
            if gone is not None:
                await _refuse_not_yours(websocket, gone)
    finally:
        if getter is not None:
            getter.cancel()
        service.unsubscribe(sub)
        for task in enders:
            task.cancel()
        await asyncio.gather(*enders, return_exceptions=True)


async def _until_not_watchable(service: ControllerApi, sid: str, user: User) -> None:
    """Return once the session is no longer ``user``'s to watch (taken over, say)."""
    while True:
        await asyncio.sleep(_OWNER_CHECK_S)
        session = service.session(sid)
        if session is not None and not _may_watch(user, session):
            return


async def _drain(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return


def event_json(event: SessionEvent, mine: bool = True) -> dict[str, Any]:
    """A session event as the tablet receives it (no client code unless ``mine``)."""
    detail = dict(event.detail)
    if not mine and "client_ref" in detail:
        detail["client_ref"] = None
    return {
        "type": "event",
        "kind": event.kind.value,
        "at": event.at,
        "port": event.port,
        "session_id": event.session_id,
        "detail": detail,
    }
