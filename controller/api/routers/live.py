"""The live stream of a session: ``/api/sessions/{id}/live`` (WebSocket).

Tablet-rate telemetry of the session's pen and every event of the session. A
browser cannot set headers on a WebSocket, so the token comes as ``?token=``
or as the first message; a wrong one gets an error message and a close code.
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
from controller.sessions import SessionEvent
from controller.sessions.records import Session

from ..deps import ControllerApi, Service, Tokens
from ..roles import ROLE_MATRIX

router = APIRouter()

#: How often the stream says it is alive when nothing else is sent (the tablet calls
#: the connection lost after WS_SILENCE_MS, static/js/health.js, without one).
HEARTBEAT_S = 0.25


@router.websocket("/api/sessions/{session_id}/live")
async def live(
    websocket: WebSocket,
    session_id: str,
    service: Service,
    tokens: Tokens,
    token: str | None = None,
) -> None:
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


async def _stream(websocket: WebSocket, service: ControllerApi, session: Session) -> None:
    sid, port = session.session_id, session.port
    sub = service.subscribe(maxsize=512)
    # Any message or the close from the tablet ends the stream.
    reader = asyncio.create_task(_drain(websocket))
    try:
        await websocket.send_json({"type": "hello", "session": session.model_dump(mode="json")})
        beat_at = time.monotonic() + HEARTBEAT_S
        getter: asyncio.Future[LiveItem] | None = None
        while not reader.done():
            if getter is None:
                getter = asyncio.ensure_future(sub.queue.get())
            wait = max(0.0, beat_at - time.monotonic())
            waiting: set[asyncio.Future[Any]] = {getter, reader}
            done, _ = await asyncio.wait(waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if time.monotonic() >= beat_at:
                # The tablet's proof that the stream is alive when nothing else happens.
                await websocket.send_json({"type": "heartbeat", "at": time.time()})
                beat_at = time.monotonic() + HEARTBEAT_S
            if reader in done:
                break
            if getter not in done:
                continue
            item = getter.result()
            getter = None
            if isinstance(item, LiveTelemetry):
                if item.port == port:
                    await websocket.send_json({"type": "telemetry", **asdict(item)})
            elif item.session_id == sid or (item.session_id is None and item.port == port):
                await websocket.send_text(json.dumps(event_json(item), default=str))
    finally:
        if getter is not None:
            getter.cancel()
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
