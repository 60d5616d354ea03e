"""The tablet API over real HTTP and WebSocket, on a real controller with simulated pens."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from controller.api import UserStore
from controller.api.server import ApiServer
from controller.config import ApiSettings

from .controller_rig import Rig, edge_for, eventually, start_rig, stop_rig

USERS = UserStore.demo()  # hashing is slow on purpose: once per module


@dataclass
class Api:
    rig: Rig
    server: ApiServer
    http: httpx.AsyncClient

    async def login(self, name: str) -> dict[str, str]:
        r = await self.http.post("/api/login", json={"username": name, "password": f"demo-{name}"})
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def ws_url(self, sid: str, token: str | None = None) -> str:
        base = f"ws://{self.server.host}:{self.server.port}/api/sessions/{sid}/live"
        return base if token is None else f"{base}?token={token}"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    rig, collector = await start_rig(tmp_path)
    settings = ApiSettings(port=0, login_attempts_per_minute=3)
    try:
        async with edge_for(rig.service, users=USERS, api=settings) as edge:
            assert edge.server is not None
            async with httpx.AsyncClient(base_url=edge.server.url, timeout=10) as http:
                yield Api(rig, edge.server, http)
    finally:
        await stop_rig(rig, collector)


async def next_message(ws: ClientConnection, want: dict[str, Any], within: float = 5.0) -> Any:
    """The next message whose fields include ``want`` (others are skipped)."""
    async with asyncio.timeout(within):
        while True:
            message = json.loads(await ws.recv())
            if all(message.get(k) == v for k, v in want.items()):
                return message


async def open_session(api: Api, auth: dict[str, str], zone: str, depth_um: int) -> str:
    r = await api.http.post(
        "/api/sessions",
        json={"port": api.rig.port(), "client_ref": "C-1042", "plan_id": "full_face"},
        headers=auth,
    )
    assert r.status_code == 201, r.text
    sid: str = r.json()["session_id"]
    for path, body in (
        ("start", None),
        ("zone", {"zone_id": zone}),
        ("depth", {"depth_um": depth_um}),
    ):
        r = await api.http.post(f"/api/sessions/{sid}/{path}", json=body, headers=auth)
        assert r.status_code == 200, (path, r.text)
    return sid


async def test_the_therapists_whole_session(api: Api) -> None:
    auth = await api.login("therapist")
    devices = (await api.http.get("/api/devices", headers=auth)).json()
    assert [d["port"] for d in devices] == ["room1"]
    assert devices[0]["link"] == "up" and devices[0]["cartridge_id"] is not None
    link = await api.http.get("/api/devices/room1/link", headers=auth)
    assert link.status_code == 200 and "state" in link.json()
    plans = (await api.http.get("/api/plans", headers=auth)).json()
    full_face = next(p for p in plans if p["plan_id"] == "full_face")
    periorbital = next(z for z in full_face["zones"] if z["zone_id"] == "periorbital")
    assert (periorbital["max_depth_um"], periorbital["max_passes"]) == (500, 2)

    sid = await open_session(api, auth, "periorbital", 400)
    token = auth["Authorization"].removeprefix("Bearer ")
    async with connect(api.ws_url(sid, token)) as ws:
        hello = await next_message(ws, {"type": "hello"})
        assert hello["session"]["session_id"] == sid
        r = await api.http.post(f"/api/sessions/{sid}/arm", headers=auth)
        assert r.status_code == 200, r.text
        await next_message(ws, {"type": "event", "kind": "armed"})
        # A second tap on Arm is answered at once (found by the fuzzer: it waited 2 s, 504).
        r = await api.http.post(f"/api/sessions/{sid}/arm", headers=auth)
        assert r.status_code == 200, r.text
        for n in (1, 2):
            await api.rig.one_pass()
            ended = await next_message(ws, {"type": "event", "kind": "pass_ended"})
            assert ended["detail"]["number"] == n
        sample = await next_message(ws, {"type": "telemetry"})
        assert sample["port"] == "room1" and sample["depth_set_um"] == 400
        assert {"depth_um", "speed_hz"} <= sample.keys()
        # Tablet rate: ten samples a second, whatever the pen's own rate (100 Hz).
        stamps = [(await next_message(ws, {"type": "telemetry"}))["at"] for _ in range(11)]
        assert 0.8 <= stamps[-1] - stamps[0] <= 1.5

        # The zone's passes are used up: arming again is refused, with the reason.
        r = await api.http.post(f"/api/sessions/{sid}/arm", headers=auth)
        assert r.status_code == 409
        problem = r.json()
        assert problem["code"] == "zone_passes_used"
        assert problem["message"] and problem["remediation"]
        refused = await next_message(ws, {"type": "event", "kind": "refused"})
        assert refused["detail"]["code"] == "zone_passes_used"
        assert refused["detail"]["remediation"] == problem["remediation"]

        # Deeper than the zone allows: refused, never clamped.
        r = await api.http.post(f"/api/sessions/{sid}/depth", json={"depth_um": 600}, headers=auth)
        assert r.status_code == 409 and r.json()["code"] == "depth_above_zone_limit"
        assert "0.50 mm" in r.json()["message"]

        r = await api.http.post(f"/api/sessions/{sid}/end", headers=auth)
        assert r.status_code == 200 and r.json()["state"] == "ended"
        await next_message(ws, {"type": "event", "kind": "session_report"})

    report = (await api.http.get(f"/api/sessions/{sid}/report", headers=auth)).json()
    zone = next(z for z in report["zones"] if z["zone_id"] == "periorbital")
    assert (zone["passes_done"], zone["max_passes"], zone["deepest_setpoint_um"]) == (2, 2, 400)
    assert report["client_ref"] == "C-1042" and report["passes"] == 2
    r = await api.http.get(f"/api/sessions/{sid}/report.csv", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    row = next(x for x in rows if x["zone_id"] == "periorbital")
    assert (row["passes_done"], row["max_passes"], row["session_id"]) == ("2", "2", sid)


async def test_websocket_takes_the_token_as_first_message_and_refuses_without(api: Api) -> None:
    auth = await api.login("therapist")
    sid = await open_session(api, auth, "cheeks", 1000)
    token = auth["Authorization"].removeprefix("Bearer ")
    async with connect(api.ws_url(sid)) as ws:
        await ws.send(json.dumps({"token": token}))
        await next_message(ws, {"type": "hello"})
        await api.http.post(f"/api/sessions/{sid}/zone", json={"zone_id": "chin"}, headers=auth)
        selected = await next_message(ws, {"type": "event", "kind": "zone_selected"})
        assert selected["session_id"] == sid
    for url, close_code in (
        (api.ws_url(sid, "not-a-token"), 4401),
        (api.ws_url("s-no", token), 4404),
    ):
        async with connect(url) as ws:
            error = await next_message(ws, {"type": "error"})
            assert error["message"] and error["remediation"]
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == close_code
    admin = (await api.login("admin"))["Authorization"].removeprefix("Bearer ")
    async with connect(api.ws_url(sid, admin)) as ws:
        assert (await next_message(ws, {"type": "error"}))["code"] == "role_not_permitted"


async def test_anyone_signed_in_stops_the_needle_mid_pass(api: Api) -> None:
    therapist = await api.login("therapist")
    admin = await api.login("admin")
    sid = await open_session(api, therapist, "cheeks", 1000)
    token = therapist["Authorization"].removeprefix("Bearer ")
    rig = api.rig
    async with connect(api.ws_url(sid, token)) as ws:
        assert (await api.http.post(f"/api/sessions/{sid}/arm", headers=therapist)).is_success
        rig.physical(0, lambda p, now: p.set_contact(True, now))
        rig.physical(0, lambda p, now: p.press_button(now))
        await next_message(ws, {"type": "event", "kind": "pass_started"})
        await eventually(lambda: rig.pen().running, within=2.0)
        # The admin may not treat, but may always stop.
        r = await api.http.post(f"/api/sessions/{sid}/stop", headers=admin)
        assert r.status_code == 200, r.text
        await eventually(lambda: not rig.pen().running, within=1.0)
        await next_message(ws, {"type": "event", "kind": "pass_ended"})
        assert not rig.pen().armed
    r = await api.http.post(f"/api/sessions/{sid}/arm", headers=admin)
    assert r.status_code == 403 and r.json()["code"] == "role_not_permitted"
    rig.physical(0, lambda p, now: p.release_button(now))


async def test_manager_override_with_reason(api: Api) -> None:
    therapist = await api.login("therapist")
    manager = await api.login("manager")
    sid = await open_session(api, therapist, "periorbital", 400)
    body = {"zone_id": "periorbital", "reason": "thick skin, per protocol", "max_depth_um": 600}
    r = await api.http.post(f"/api/sessions/{sid}/overrides", json=body, headers=therapist)
    assert r.status_code == 403 and r.json()["code"] == "role_not_permitted"
    r = await api.http.post(
        f"/api/sessions/{sid}/overrides", json={**body, "reason": ""}, headers=manager
    )
    assert r.status_code == 422 and "reason" in r.json()["message"]
    r = await api.http.post(f"/api/sessions/{sid}/overrides", json=body, headers=manager)
    assert r.status_code == 200, r.text
    assert r.json()["zones"]["periorbital"]["override"]["reason"] == body["reason"]
    r = await api.http.post(f"/api/sessions/{sid}/depth", json={"depth_um": 600}, headers=therapist)
    assert r.status_code == 200, r.text
    r = await api.http.post(
        f"/api/sessions/{sid}/overrides", json={**body, "max_depth_um": 2600}, headers=manager
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.max_depth_um"
    audit = (await api.http.get("/api/audit", params={"session_id": sid}, headers=manager)).json()
    assert [a["kind"] for a in audit].count("override") == 1
    assert (await api.http.get("/api/audit", headers=therapist)).status_code == 403


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("depth", {"depth_um": -1}, "body.depth_um"),
        ("depth", {"depth_um": 2501}, "body.depth_um"),
        ("depth", {"depth_um": "deep"}, "body.depth_um"),
        ("depth", {"depth_um": 1.5}, "body.depth_um"),
        ("depth", {}, "body.depth_um"),
        ("depth", {"depth_um": 300, "extra": 1}, "body.extra"),
        ("depth", None, "body"),
        ("zone", {"zone_id": "a b"}, "body.zone_id"),
        ("stroke-rate", {"rate_hz": 0}, "body.rate_hz"),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_field(
    api: Api, path: str, body: Any, field: str
) -> None:
    auth = await api.login("therapist")
    sid = await open_session(api, auth, "cheeks", 1000)
    r = await api.http.post(f"/api/sessions/{sid}/{path}", json=body, headers=auth)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "bad_request" and problem["remediation"]
    assert problem["errors"][0]["field"] == field
    assert problem["message"].startswith(field)


async def test_unknown_things_and_bad_credentials(api: Api) -> None:
    auth = await api.login("therapist")
    for method, path, body, status, code in [
        ("GET", "/api/sessions/s-nope", None, 404, "unknown_session"),
        ("POST", "/api/sessions/s-nope/arm", None, 404, "unknown_session"),
        ("GET", "/api/sessions/bad%20id", None, 422, "bad_request"),
        ("GET", "/api/devices/room9", None, 404, "unknown_device"),
        ("GET", "/api/nowhere", None, 404, "not_found"),
        ("POST", "/api/sessions", {"port": "room1", "client_ref": "Jane Doe", "plan_id": "x"},
         422, "bad_request"),
        ("POST", "/api/sessions", {"port": "room1", "client_ref": "C-1", "plan_id": "nope"},
         422, "unknown_plan"),
    ]:  # fmt: skip
        r = await api.http.request(method, path, json=body, headers=auth)
        assert (r.status_code, r.json()["code"]) == (status, code), (path, r.text)
        assert r.json()["message"] and r.json()["remediation"]
    assert (await api.http.get("/api/devices")).status_code == 401
    bad = {"Authorization": "Bearer forged"}
    assert (await api.http.get("/api/devices", headers=bad)).json()["code"] == "not_signed_in"


async def test_login_is_rate_limited_per_user_and_address(api: Api) -> None:
    wrong = {"username": "therapist", "password": "guess"}
    for _ in range(3):
        r = await api.http.post("/api/login", json=wrong)
        assert r.status_code == 401 and r.json()["code"] == "bad_credentials"
    r = await api.http.post("/api/login", json={**wrong, "password": "demo-therapist"})
    assert r.status_code == 429 and r.json()["code"] == "too_many_attempts"
    assert int(r.headers["Retry-After"]) > 0
    # Another user at the same address is not locked out by someone else's failures
    # (the per-address limit is higher: tests/test_api_signin.py).
    r = await api.http.post("/api/login", json={"username": "manager", "password": "demo-manager"})
    assert r.status_code == 200


async def test_logout_ends_the_token(api: Api) -> None:
    auth = await api.login("manager")
    assert (await api.http.get("/api/me", headers=auth)).json()["role"] == "manager"
    assert (await api.http.post("/api/logout", headers=auth)).status_code == 204
    assert (await api.http.get("/api/me", headers=auth)).status_code == 401


async def test_a_session_on_a_pen_that_does_not_exist_is_404_naming_the_pens(api: Api) -> None:
    auth = await api.login("therapist")
    r = await api.http.post(
        "/api/sessions",
        json={"port": "room9", "client_ref": "C-1042", "plan_id": "full_face"},
        headers=auth,
    )
    assert r.status_code == 404, r.text
    body = r.json()
    assert body["code"] == "unknown_pen"
    assert "room9" in body["message"] and api.rig.port() in body["remediation"]
