"""Every rule of the role matrix (controller/api/roles.py), one test each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from controller.api import ROLE_MATRIX, UserStore, create_app
from controller.api.roles import PUBLIC
from controller.edge.client import CoreClient
from controller.sessions import Role

USERS = UserStore.demo()
SID = "s-000000000001"

#: How to call each operation (path parameters filled in, a valid body where one is needed).
CALLS: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "me": ("GET", "/api/me", None),
    "logout": ("POST", "/api/logout", None),
    "renew_token": ("POST", "/api/token/renew", None),
    "list_devices": ("GET", "/api/devices", None),
    "get_device": ("GET", "/api/devices/room1", None),
    "get_device_link": ("GET", "/api/devices/room1/link", None),
    "list_plans": ("GET", "/api/plans", None),
    "list_zones": ("GET", "/api/zones", None),
    "list_sessions": ("GET", "/api/sessions", None),
    "get_session": ("GET", f"/api/sessions/{SID}", None),
    "create_session": (
        "POST",
        "/api/sessions",
        {"port": "room1", "client_ref": "C-1", "plan_id": "full_face"},
    ),
    "start_session": ("POST", f"/api/sessions/{SID}/start", None),
    "select_zone": ("POST", f"/api/sessions/{SID}/zone", {"zone_id": "cheeks"}),
    "set_depth": ("POST", f"/api/sessions/{SID}/depth", {"depth_um": 500}),
    "set_stroke_rate": ("POST", f"/api/sessions/{SID}/stroke-rate", {"rate_hz": 100}),
    "arm_pen": ("POST", f"/api/sessions/{SID}/arm", None),
    "disarm_pen": ("POST", f"/api/sessions/{SID}/disarm", None),
    "stop_pen": ("POST", f"/api/sessions/{SID}/stop", None),
    "pause_session": ("POST", f"/api/sessions/{SID}/pause", None),
    "resume_session": ("POST", f"/api/sessions/{SID}/resume", None),
    "acknowledge_fault": ("POST", f"/api/sessions/{SID}/acknowledge-fault", None),
    "end_session": ("POST", f"/api/sessions/{SID}/end", None),
    "session_report": ("GET", f"/api/sessions/{SID}/report", None),
    "session_report_csv": ("GET", f"/api/sessions/{SID}/report.csv", None),
    "override_zone": (
        "POST",
        f"/api/sessions/{SID}/overrides",
        {"zone_id": "cheeks", "reason": "per protocol", "max_depth_um": 1600},
    ),
    "audit_log": ("GET", "/api/audit", None),
    "take_over_session": ("POST", f"/api/sessions/{SID}/take-over", {"reason": "covering"}),
    "overview": ("GET", "/api/overview", None),
    "session_controls": ("GET", f"/api/sessions/{SID}/controls", None),
    "issue_stop_key": ("POST", "/api/stop-keys", {"session_id": SID}),
    "charts": ("GET", "/api/charts", None),
    "list_users": ("GET", "/api/users", None),
}
RULES = [
    pytest.param(op, role, role in allowed, id=f"{op}-{role}")
    for op, allowed in ROLE_MATRIX.items()
    if op != "live"  # the WebSocket's rule: test_api.py
    for role in Role
]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    # An edge with no core behind it: the role check comes before the core is asked.
    state = tmp_path_factory.mktemp("roles")
    return create_app(CoreClient(state / "no-core.sock", state_dir=state), USERS)


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tablet") as client:
        yield client


def test_every_route_has_a_rule_and_a_call(app: FastAPI) -> None:
    # From the OpenAPI document: routes of included routers are not in app.routes
    # since FastAPI 0.137, and every operation a client can call is in the document.
    operations = {
        operation["operationId"]
        for path in app.openapi()["paths"].values()
        for operation in path.values()
    }
    assert operations - PUBLIC == set(ROLE_MATRIX) - {"live"} == set(CALLS)
    assert operations >= PUBLIC


@pytest.mark.parametrize(("operation", "role", "allowed"), RULES)
async def test_role_rule(
    app: FastAPI, http: httpx.AsyncClient, operation: str, role: Role, allowed: bool
) -> None:
    user = next(u for u in USERS.users.values() if u.role is role)
    token, _ = app.state.tokens.issue(user)
    method, path, body = CALLS[operation]
    r = await http.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
    if allowed:
        # Allowed through the role check: whatever the service then says, not 401/403.
        assert r.status_code not in (401, 403), r.text
        # No core behind this edge: an action reaching for it is answered 503, by name.
        assert r.status_code < 500 or r.json()["code"] == "controller_unavailable", r.text
    else:
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "role_not_permitted"


@pytest.mark.parametrize("operation", sorted(CALLS))
async def test_every_operation_needs_a_token(http: httpx.AsyncClient, operation: str) -> None:
    method, path, body = CALLS[operation]
    r = await http.request(method, path, json=body)
    assert r.status_code == 401 and r.json()["code"] == "not_signed_in"
