"""Request and response bodies of the tablet API (pydantic v2, strict bounds).

Bounds here turn malformed or absurd input into a 422 naming the field before
anything reaches the session registry; the registry and the safety gate still
decide everything clinical (a depth within these bounds may still be refused).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from controller.sessions import Role
from controller.sessions.records import Session

#: Session ids, client references, zone and plan ids: what the registry accepts.
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
DEVICE_CEILING_UM = 2500  # product.md §3: the pen's mechanical range


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class LoginRequest(_Request):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


class LoginResponse(BaseModel):
    token: str
    token_type: str = "bearer"
    expires_in: float
    username: str
    role: Role
    actor_id: str


class Me(BaseModel):
    username: str
    role: Role
    actor_id: str


#: Pen names as configured (``pens[].name``, else ``penN``): no markup, no paths.
PORT_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class CreateSessionRequest(_Request):
    port: str = Field(max_length=64, description="the pen's name (see /api/devices)")
    client_ref: str = Field(
        pattern=ID_PATTERN, description="a pseudonymous client reference, never a name"
    )
    plan_id: str = Field(pattern=ID_PATTERN)

    @field_validator("port")
    @classmethod
    def _a_pen_name(cls, port: str) -> str:
        # Checked here so markup or a path never reaches the controller or its log;
        # a well-formed name that is not configured is the controller's 404.
        if not re.fullmatch(PORT_PATTERN, port):
            raise ValueError(
                "not a pen name; use one of the clinic's pens as GET /api/devices lists them"
            )
        return port


class SelectZoneRequest(_Request):
    zone_id: str = Field(pattern=ID_PATTERN)


class SetDepthRequest(_Request):
    depth_um: int = Field(ge=0, le=DEVICE_CEILING_UM, description="needle depth in µm")


class SetStrokeRateRequest(_Request):
    rate_hz: int = Field(ge=1, le=1000, description="strokes per second (policy sets the range)")


class OverrideRequest(_Request):
    zone_id: str = Field(pattern=ID_PATTERN)
    reason: str = Field(min_length=3, max_length=500, description="why, in plain words")
    max_depth_um: int | None = Field(default=None, ge=1, le=DEVICE_CEILING_UM)
    max_passes: int | None = Field(default=None, ge=1, le=100)


class Problem(BaseModel):
    """Every error: a stable code, what is wrong, and what to do next."""

    code: str
    message: str
    remediation: str
    errors: list[dict[str, Any]] | None = None


class ZoneInfo(BaseModel):
    zone_id: str
    label: str
    max_depth_um: int
    max_passes: int
    puncture_budget: int | None


class PlanInfo(BaseModel):
    plan_id: str
    label: str
    zones: list[ZoneInfo]


class DeviceInfo(BaseModel):
    port: str
    url: str
    name: str
    serial: str | None
    firmware: str | None
    link: str
    armed: str
    motor_running: bool
    cartridge_id: int | None
    session_id: str | None
    link_stats: dict[str, Any]


class TakeOverRequest(_Request):
    reason: str = Field(min_length=3, max_length=500, description="why, in plain words")


class RenewResponse(BaseModel):
    expires_in: float


class SessionView(Session):
    """A session as the signed-in user may see it."""

    # Only the owner sees the client's code; everyone else gets null. The base type is
    # str (the registry always has one), hence the ignore.
    client_ref: str | None = Field(  # type: ignore[assignment]
        description="the pseudonymous client code; null unless the session is yours"
    )
    mine: bool = Field(description="the session is yours (you opened it or took it over)")


class SessionSummary(BaseModel):
    session_id: str
    port: str
    client_ref: str | None = Field(description="null unless the session is yours")
    therapist_id: str
    mine: bool
    plan_id: str
    state: str
    created_at: float
