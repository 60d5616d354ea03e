"""Bodies of the tablet page's own endpoints: the clinic overview, stop keys, charts, users.

Kept apart from ``models.py`` (the session API's bodies); same conventions:
strict requests (unknown fields are a 422), plain responses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from controller.sessions import Role

from .models import ID_PATTERN, Problem

#: A stop key as the API hands it out: URL-safe base64 of 32 random bytes.
STOP_KEY_PATTERN = r"^[A-Za-z0-9_-]{43}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class PenSession(BaseModel):
    """The live session on a pen, as the overview shows it."""

    session_id: str
    therapist_id: str
    mine: bool = Field(description="the session is the signed-in user's own")
    client_ref: str | None = Field(description="only in your own sessions")
    plan_id: str
    state: str
    started_at: float | None
    zone_id: str | None
    zone_label: str | None
    zone_max_depth_um: int | None
    passes_done: int | None
    max_passes: int | None
    depth_setpoint_um: int | None
    fault: str | None


class PenOverview(BaseModel):
    """One pen of the clinic, now."""

    port: str
    name: str
    serial: str | None
    link: str
    armed: str = Field(description="disarmed, arming or armed (the controller's belief)")
    motor_running: bool
    cartridge_id: int | None
    session: PenSession | None


class Overview(BaseModel):
    """Every pen of the clinic: what the page rebuilds itself from."""

    at: float = Field(description="the controller's clock (Unix seconds)")
    pens: list[PenOverview]


class StopKeyRequest(_Request):
    session_id: str = Field(pattern=ID_PATTERN)


class StopKeyIssued(BaseModel):
    key: str
    port: str
    session_id: str


class StopKeysStatusRequest(_Request):
    keys: list[str] = Field(max_length=8, description="stop keys this tablet holds")


class StopKeyPen(BaseModel):
    key: str
    port: str
    name: str
    session_id: str
    armed: str
    motor_running: bool


class StopKeysStatus(BaseModel):
    pens: list[StopKeyPen] = Field(description="the pens of the keys that are still valid")
    invalid: list[str] = Field(description="keys that no longer stop anything: forget them")


class StopByKeyRequest(_Request):
    key: str = Field(pattern=STOP_KEY_PATTERN)


class StoppedByKey(BaseModel):
    port: str
    session_id: str


class UserInfo(BaseModel):
    username: str
    role: Role
    actor_id: str


class Charts(BaseModel):
    """The manager's charts, from InfluxDB (the same measurements as the Grafana dashboards)."""

    days: int
    sessions_per_day: list[dict[str, Any]] = []
    passes_per_zone: list[dict[str, Any]] = []
    depth_per_zone: list[dict[str, Any]] = []
    safety_events: list[dict[str, Any]] = []
    unavailable: Problem | None = Field(
        default=None,
        description="why there is no data (no InfluxDB configured, or it did not answer)",
    )
