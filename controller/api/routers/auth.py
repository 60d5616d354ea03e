"""Signing in and out: ``/api/login``, ``/api/logout``, ``/api/me``."""

# No `from __future__ import annotations`: FastAPI evaluates the endpoints' annotations.

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ..auth import User
from ..deps import Credentials, Limiter, Tokens, Users, require
from ..errors import ApiError
from ..models import LoginRequest, LoginResponse, Me

router = APIRouter(tags=["auth"])


@router.post("/api/login", operation_id="login")
async def login(
    body: LoginRequest, request: Request, users: Users, tokens: Tokens, limiter: Limiter
) -> LoginResponse:
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


@router.post("/api/logout", operation_id="logout", status_code=204)
async def logout(
    user: Annotated[User, Depends(require("logout"))], credentials: Credentials, tokens: Tokens
) -> None:
    if credentials:
        tokens.revoke(credentials.credentials)


@router.get("/api/me", operation_id="me")
async def me(user: Annotated[User, Depends(require("me"))]) -> Me:
    return Me(username=user.name, role=user.role, actor_id=user.actor_id)
