"""The tablet page's own endpoints over real HTTP on a real controller with simulated pens:
the overview, each action's controls, stop keys (a signed-out tablet stops its pen),
the users list, and the manager's charts from a real influxd."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from controller.api import UserStore
from controller.api.charts import queries
from controller.config import ApiSettings
from controller.influx import InfluxClient, InfluxSettings, format_line
from controller.sessions import EventKind
from devtools.stack.processes import ServerProcess
from simulated_pen.faults import Fault, FaultKind

from .controller_rig import Rig, edge_for, start_rig, stop_rig

USERS = UserStore.demo()  # hashing is slow on purpose: once per module


@dataclass
class Tablet:
    rig: Rig
    http: httpx.AsyncClient

    async def login(self, name: str) -> dict[str, str]:
        r = await self.http.post("/api/login", json={"username": name, "password": f"demo-{name}"})
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    async def post(self, path: str, auth: dict[str, str], body: Any = None) -> httpx.Response:
        return await self.http.post(path, json=body, headers=auth)

    async def controls(self, sid: str, auth: dict[str, str]) -> dict[str, Any]:
        r = await self.http.get(f"/api/sessions/{sid}/controls", headers=auth)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data


async def serve(tmp_path: Path, influx: InfluxSettings | None = None) -> AsyncIterator[Tablet]:
    rig, collector = await start_rig(tmp_path)
    try:
        async with edge_for(rig.service, users=USERS, api=ApiSettings(port=0), charts=influx) as e:
            assert e.server is not None
            async with httpx.AsyncClient(base_url=e.server.url, timeout=10) as http:
                yield Tablet(rig, http)
    finally:
        await stop_rig(rig, collector)


@pytest.fixture
async def tablet(tmp_path: Path) -> AsyncIterator[Tablet]:
    async for t in serve(tmp_path):
        yield t


async def new_session(tablet: Tablet, auth: dict[str, str]) -> str:
    r = await tablet.post(
        "/api/sessions", auth, {"port": "room1", "client_ref": "C-77", "plan_id": "full_face"}
    )
    assert r.status_code == 201, r.text
    sid: str = r.json()["session_id"]
    assert (await tablet.post(f"/api/sessions/{sid}/start", auth)).status_code == 200
    return sid


def refused(controls: dict[str, Any], action: str) -> str | None:
    answer = controls["actions"][action]
    return None if answer is None else str(answer["code"])


async def test_controls_say_what_the_controller_would_refuse_and_why(tablet: Tablet) -> None:
    auth = await tablet.login("therapist")
    sid = await new_session(tablet, auth)
    c = await tablet.controls(sid, auth)
    assert refused(c, "arm") == "no_zone_selected"
    assert refused(c, "set_depth") == "no_zone_selected"
    assert refused(c, "start") == "not_allowed_now"
    assert refused(c, "acknowledge_fault") == "not_allowed_now"
    assert c["actions"]["stop"] is None and c["actions"]["end"] is None
    assert c["depth_range_um"] is None
    # What the controls said is what the controller answers.
    r = await tablet.post(f"/api/sessions/{sid}/arm", auth)
    assert r.status_code == 409 and r.json()["code"] == "no_zone_selected"

    await tablet.post(f"/api/sessions/{sid}/zone", auth, {"zone_id": "cheeks"})
    c = await tablet.controls(sid, auth)
    assert c["depth_range_um"] == [0, 1500]
    assert refused(c, "arm") == "no_depth_set" and refused(c, "set_depth") is None
    # The zone's limit itself is allowed (the monitor's tolerance is the pen's accuracy).
    r = await tablet.post(f"/api/sessions/{sid}/depth", auth, {"depth_um": 1500})
    assert r.status_code == 200, r.text
    await tablet.rig.wait_event(EventKind.DEPTH_SET)
    r = await tablet.post(f"/api/sessions/{sid}/arm", auth)
    assert r.status_code == 200, r.text
    c = await tablet.controls(sid, auth)
    assert c["pen"]["armed"] == "armed"
    assert refused(c, "arm") == "pen_armed"
    assert refused(c, "set_depth") == "pen_armed"  # disarm to change the depth
    assert refused(c, "select_zone") == "disarm_first"
    r = await tablet.post(f"/api/sessions/{sid}/depth", auth, {"depth_um": 1000})
    assert r.status_code == 409 and r.json()["code"] == "pen_armed"

    # Someone else's session: everything but STOP and Disarm is theirs.
    manager = await tablet.login("manager")
    c = await tablet.controls(sid, manager)
    assert refused(c, "pause") == "not_session_owner"
    assert c["actions"]["stop"] is None

    await tablet.post(f"/api/sessions/{sid}/end", auth)
    c = await tablet.controls(sid, auth)
    assert refused(c, "arm") == "session_not_active" and refused(c, "end") == "not_allowed_now"


async def test_overview_shows_every_pen_and_the_client_only_to_the_owner(tablet: Tablet) -> None:
    auth = await tablet.login("therapist")
    sid = await new_session(tablet, auth)
    await tablet.post(f"/api/sessions/{sid}/zone", auth, {"zone_id": "nose"})
    r = await tablet.http.get("/api/overview", headers=auth)
    assert r.status_code == 200, r.text
    (pen,) = r.json()["pens"]
    assert pen["port"] == "room1" and pen["link"] == "up" and pen["armed"] == "disarmed"
    session = pen["session"]
    assert session["session_id"] == sid and session["mine"] and session["client_ref"] == "C-77"
    assert (session["zone_id"], session["zone_max_depth_um"]) == ("nose", 750)
    assert (session["passes_done"], session["max_passes"]) == (0, 2)
    manager = await tablet.login("manager")
    session = (await tablet.http.get("/api/overview", headers=manager)).json()["pens"][0]["session"]
    assert session["therapist_id"] == "t-demo" and not session["mine"]
    assert session["client_ref"] is None
    assert (await tablet.http.get("/api/overview")).status_code == 401


async def test_a_stop_key_stops_the_pen_without_a_token_and_dies_with_its_session(
    tablet: Tablet,
) -> None:
    auth = await tablet.login("therapist")
    sid = await new_session(tablet, auth)
    r = await tablet.post("/api/stop-keys", auth, {"session_id": sid})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    await tablet.post(f"/api/sessions/{sid}/zone", auth, {"zone_id": "cheeks"})
    await tablet.post(f"/api/sessions/{sid}/depth", auth, {"depth_um": 800})
    await tablet.rig.wait_event(EventKind.DEPTH_SET)
    assert (await tablet.post(f"/api/sessions/{sid}/arm", auth)).status_code == 200
    assert (await tablet.post("/api/logout", auth)).status_code == 204

    # Signed out: the key says the pen is armed, and stops it.
    status = await tablet.http.post("/api/stop-keys/status", json={"keys": [key, "x" * 43]})
    assert status.status_code == 200, status.text
    assert status.json()["invalid"] == ["x" * 43]
    (pen,) = status.json()["pens"]
    assert (pen["port"], pen["armed"], pen["session_id"]) == ("room1", "armed", sid)
    assert "client_ref" not in pen
    r = await tablet.http.post("/api/stop-keys/stop", json={"key": key})
    assert r.status_code == 200, r.text
    stop = await tablet.rig.wait_event(EventKind.STOP_SENT)
    assert stop.session_id == sid
    await tablet.rig.wait_event(EventKind.DISARMED)
    assert not tablet.rig.pen().armed

    # Someone else cannot get a key for the session; an ended session's key stops nothing.
    manager = await tablet.login("manager")
    r = await tablet.post("/api/stop-keys", manager, {"session_id": sid})
    assert r.status_code == 403 and r.json()["code"] == "not_session_owner"
    auth = await tablet.login("therapist")
    assert (await tablet.post(f"/api/sessions/{sid}/end", auth)).status_code == 200
    r = await tablet.http.post("/api/stop-keys/stop", json={"key": key})
    assert r.status_code == 404 and r.json()["code"] == "unknown_stop_key"
    status = await tablet.http.post("/api/stop-keys/status", json={"keys": [key]})
    assert status.json() == {"pens": [], "invalid": [key]}
    r = await tablet.http.post("/api/stop-keys/stop", json={"key": "not a key"})
    assert r.status_code == 422


async def test_users_list_is_for_admins_and_has_no_hashes(tablet: Tablet) -> None:
    admin = await tablet.login("admin")
    r = await tablet.http.get("/api/users", headers=admin)
    assert r.status_code == 200, r.text
    assert {u["username"]: u["role"] for u in r.json()} == {
        "therapist": "therapist",
        "manager": "manager",
        "admin": "admin",
    }
    assert "argon2" not in r.text
    manager = await tablet.login("manager")
    assert (await tablet.http.get("/api/users", headers=manager)).status_code == 403


async def test_charts_without_influxdb_say_so(tablet: Tablet) -> None:
    manager = await tablet.login("manager")
    r = await tablet.http.get("/api/charts", headers=manager)
    assert r.status_code == 200, r.text
    assert r.json()["unavailable"]["code"] == "charts_unavailable"
    assert r.json()["passes_per_zone"] == []


def event_point(measurement: str, kind: str, tags: dict[str, str], fields: Any, at: float) -> str:
    return format_line(
        measurement,
        {"clinic": "c1", "device": "SIM-0001", "kind": kind, **tags},
        {"seq": 1, **fields},
        int(at * 1e9),
    )


async def test_charts_come_from_influxdb(tmp_path: Path, influxd: ServerProcess) -> None:
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", timeout=5)
    now = time.time()
    day = 86400.0
    lines = [
        # Two sessions today, one yesterday (measurement and tags of docs/INFLUX_SCHEMA.md).
        event_point("sessions", "session_created", {"therapist": "t-1"}, {"session": "a"}, now),
        event_point("sessions", "session_created", {"therapist": "t-1"}, {"session": "b"}, now - 1),
        event_point(
            "sessions", "session_created", {"therapist": "t-2"}, {"session": "c"}, now - day
        ),
        event_point("zones", "pass_ended", {"zone": "cheeks"}, {"peak_depth_um": 1210.0}, now),
        event_point("zones", "pass_ended", {"zone": "cheeks"}, {"peak_depth_um": 990.0}, now - 2),
        event_point("zones", "pass_ended", {"zone": "nose"}, {"peak_depth_um": 500.0}, now),
        event_point("zones", "depth_set", {"zone": "cheeks"}, {"depth_um": 1200.0}, now),
        event_point("zones", "zone_selected", {"zone": "cheeks"}, {"max_depth_um": 1500.0}, now),
        event_point("safety", "refused", {"code": "depth_above_zone_limit"}, {}, now),
        event_point("safety", "fault", {"code": "depth_overshoot"}, {}, now - 3),
        event_point("safety", "override_applied", {"code": "override"}, {}, now - 4),
    ]
    async with InfluxClient(settings) as client:
        await client.create_database()
        await client.write(lines)
    async for tablet in serve(tmp_path, influx=settings):
        therapist = await tablet.login("therapist")
        assert (await tablet.http.get("/api/charts", headers=therapist)).status_code == 403
        manager = await tablet.login("manager")
        r = await tablet.http.get("/api/charts", params={"days": 3}, headers=manager)
        assert r.status_code == 200, r.text
        charts = r.json()
        assert charts["unavailable"] is None
        assert sum(d["sessions"] for d in charts["sessions_per_day"]) == 3
        assert max(d["sessions"] for d in charts["sessions_per_day"]) == 2
        assert charts["passes_per_zone"] == [
            {"zone": "cheeks", "passes": 2},
            {"zone": "nose", "passes": 1},
        ]
        cheeks = charts["depth_per_zone"][0]
        assert cheeks == {
            "zone": "cheeks",
            "deepest_pass_um": 1210,
            "deepest_setting_um": 1200,
            "limit_um": 1500,
        }
        totals = {k: sum(d[k] for d in charts["safety_events"]) for k in ("refused", "fault")}
        assert totals == {"refused": 1, "fault": 1}
        assert sum(d["override_applied"] for d in charts["safety_events"]) == 1
    assert "GROUP BY time(1d)" in queries(7)["sessions"]


async def test_the_live_stream_beats_while_nothing_else_happens(tablet: Tablet) -> None:
    auth = await tablet.login("therapist")
    sid = await new_session(tablet, auth)
    token = auth["Authorization"].removeprefix("Bearer ")
    url = str(tablet.http.base_url).replace("http://", "ws://") + f"/api/sessions/{sid}/live"
    tablet.rig.physical(0, lambda p, now: p.inject(Fault(FaultKind.SILENT, duration=1.0), now))
    async with connect(url) as ws:
        await ws.send(json.dumps({"token": token}))
        assert json.loads(await ws.recv())["type"] == "hello"
        beats: list[float] = []
        async with asyncio.timeout(3.0):
            while len(beats) < 4:
                message = json.loads(await ws.recv())
                if message["type"] == "heartbeat":
                    beats.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert max(gaps) < 0.6, gaps  # the tablet calls a silence of 0.9 s a lost connection
