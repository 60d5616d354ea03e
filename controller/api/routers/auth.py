"""Signing in and out: ``/api/login``, ``/api/logout``, ``/api/token/renew``, ``/api/me``.

Every sign-in, failed sign-in and sign-out becomes an audit record (through the
controller, so it joins the one hash-chained log); the password never leaves
this function. The limiter (``controller/api/signin.py``) takes its place
before the password is hashed, so concurrent guesses cannot slip past it.

With the safety core away, signing in fails closed (503, no token: nothing would
record it), while signing out still ends the token at once; only its record is
lost then, and the log says so.
"""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

import asyncio
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Request

from controller.errors import CoreBusyError, CoreUnavailableError
from controller.sessions.actions import RecordSignIn, SignInResult

from ..auth import User
from ..deps import Credentials, Limiter, Service, Tokens, Users, act, client_source, require
from ..errors import ApiError
from ..models import LoginRequest, LoginResponse, Me, Problem, RenewResponse
from ..signin import Throttled

router = APIRouter(tags=["auth"])
log = structlog.get_logger(__name__)


@router.post("/api/login", operation_id="login", responses={429: {"model": Problem}})
async def login(
    body: LoginRequest,
    request: Request,
    users: Users,
    tokens: Tokens,
    limiter: Limiter,
    service: Service,
) -> LoginResponse:
    """Exchange a user name and password for a bearer token."""
    source = client_source(request)
    known = users.users.get(body.username)
    actor_id, role = (known.actor_id, known.role) if known else (None, None)
    attempt = limiter.begin(body.username, source)
    if isinstance(attempt, Throttled):
        pending = limiter.note_throttled(body.username, source)
        if pending:
            await act(
                service,
                RecordSignIn(SignInResult.THROTTLED, source, actor_id, role, attempts=pending),
            )
        wait = int(attempt.retry_after_s) + 1
        raise ApiError(
            429,
            "too_many_attempts",
            "Too many failed sign-in attempts.",
            f"Wait {wait} seconds, then try again.",
            **{"Retry-After": str(wait)},
        )
    # Hashing costs tens of milliseconds: keep the pens' event loop free.
    user = await asyncio.to_thread(users.verify, body.username, body.password)
    if user is None:
        attempt.failed()
        await act(service, RecordSignIn(SignInResult.BAD_CREDENTIALS, source, actor_id, role))
        raise ApiError(
            401,
            "bad_credentials",
            "The user name or password is wrong.",
            "Check both and try again.",
        )
    attempt.succeeded()
    # Recorded first: a sign-in the audit log cannot hold gets no token.
    await act(service, RecordSignIn(SignInResult.SIGNED_IN, source, user.actor_id, user.role))
    token, lifetime = tokens.issue(user)
    return LoginResponse(
        token=token,
        expires_in=lifetime,
        username=user.name,
        role=user.role,
        actor_id=user.actor_id,
    )


@router.post("/api/logout", operation_id="logout", status_code=204)
async def logout(
    request: Request,
    user: Annotated[User, Depends(require("logout"))],
    credentials: Credentials,
    tokens: Tokens,
    service: Service,
) -> None:
    """End this token at once, and every live stream that uses it."""
    if credentials:
        tokens.revoke(credentials.credentials)
    record = RecordSignIn(SignInResult.SIGNED_OUT, client_source(request), user.actor_id, user.role)
    try:
        await service.act(record)
    except (CoreBusyError, CoreUnavailableError) as exc:
        log.warning("sign-out not recorded: the safety core is away", user=user.name, why=str(exc))


@router.post("/api/token/renew", operation_id="renew_token")
async def renew_token(
    user: Annotated[User, Depends(require("renew_token"))],
    credentials: Credentials,
    tokens: Tokens,
) -> RenewResponse:
    """Give this token its full lifetime again (never past its maximum age since sign-in).

    Renew well before ``expires_in`` runs out; when the answer stops growing, the
    token has reached its maximum age and the user must sign in again before it ends.
    """
    remaining = tokens.renew(credentials.credentials) if credentials else None
    if remaining is None:  # pragma: no cover - require() has just checked it
        raise ApiError(401, "not_signed_in", "Your sign-in has expired.", "Sign in again.")
    return RenewResponse(expires_in=remaining)


@router.get("/api/me", operation_id="me")
async def me(user: Annotated[User, Depends(require("me"))]) -> Me:
    return Me(username=user.name, role=user.role, actor_id=user.actor_id)
