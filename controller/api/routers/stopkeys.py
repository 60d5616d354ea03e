"""Stop keys: ``/api/stop-keys`` (issue, with a token), ``/status`` and ``/stop`` (with a key).

Why a signed-out tablet stops its pens this way, and what a key risks:
``controller/api/stopkeys.py``.
"""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.requests import HTTPConnection

from controller.sessions import StopPen

from ..auth import User
from ..deps import ControllerApi, Service, act, require, session_or_404
from ..errors import ApiError
from ..stopkeys import StopKey, StopKeyStore
from ..views import (
    StopByKeyRequest,
    StopKeyIssued,
    StopKeyPen,
    StopKeyRequest,
    StopKeysStatus,
    StopKeysStatusRequest,
    StoppedByKey,
)

router = APIRouter(tags=["stop keys"])
_LIVE = frozenset({"created", "active", "paused", "interrupted", "faulted"})


def get_stop_keys(connection: HTTPConnection) -> StopKeyStore:
    """The app's stop keys."""
    keys: StopKeyStore = connection.app.state.stop_keys
    return keys


StopKeys = Annotated[StopKeyStore, Depends(get_stop_keys)]


def _still_live(service: ControllerApi, grant: StopKey) -> bool:
    session = service.session(grant.session_id)
    return session is not None and str(session.state) in _LIVE


@router.post("/api/stop-keys", operation_id="issue_stop_key", status_code=201)
async def issue_stop_key(
    body: StopKeyRequest,
    user: Annotated[User, Depends(require("issue_stop_key"))],
    service: Service,
    keys: StopKeys,
) -> StopKeyIssued:
    """A key that stops this session's pen even when this tablet is no longer signed in.

    Only for a live session of your own. Keep it on the tablet; it dies with the session.
    """
    session = session_or_404(service, body.session_id)
    if session.therapist_id != user.actor_id:
        raise ApiError(
            403,
            "not_session_owner",
            f"This session belongs to {session.therapist_id}.",
            "Only its therapist gets a stop key; anyone signed in may still stop its pen.",
        )
    if str(session.state) not in _LIVE:
        raise ApiError(
            409,
            "session_ended",
            "This session has ended: there is nothing left to stop.",
            "Start a new session to treat again.",
        )
    key = keys.issue(user.actor, session.session_id, session.port)
    return StopKeyIssued(key=key, port=session.port, session_id=session.session_id)


@router.post("/api/stop-keys/status", operation_id="stop_keys_status")
async def stop_keys_status(
    body: StopKeysStatusRequest, service: Service, keys: StopKeys
) -> StopKeysStatus:
    """Without signing in: which of these keys' pens are armed or running (no client data)."""
    devices = {d["port"]: d for d in service.devices()}
    pens, invalid = [], []
    for key in body.keys:
        grant = keys.get(key)
        if grant is None or not _still_live(service, grant) or grant.port not in devices:
            if grant is not None:
                keys.forget(key)
            invalid.append(key)
            continue
        device = devices[grant.port]
        pens.append(
            StopKeyPen(
                key=key,
                port=grant.port,
                name=str(device.get("name") or grant.port),
                session_id=grant.session_id,
                armed=str(device["armed"]),
                motor_running=bool(device["motor_running"]),
            )
        )
    return StopKeysStatus(pens=pens, invalid=invalid)


@router.post("/api/stop-keys/stop", operation_id="stop_by_key")
async def stop_by_key(body: StopByKeyRequest, service: Service, keys: StopKeys) -> StoppedByKey:
    """Without signing in: STOP the key's pen (stop the needle and disarm), as its owner."""
    grant = keys.get(body.key)
    if grant is None or not _still_live(service, grant):
        raise ApiError(
            404,
            "unknown_stop_key",
            "This stop key stops nothing any more (its session ended, or the controller "
            "restarted).",
            "Sign in to stop a pen; the pen also stops when its button is released.",
        )
    await act(service, StopPen(grant.session_id, grant.owner))  # never refused; 503 if away
    return StoppedByKey(port=grant.port, session_id=grant.session_id)
