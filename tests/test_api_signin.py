"""Signing in (issue 15.2) and tokens (15.3), over a real uvicorn and real WebSockets.

The limiter's scheme is in controller/api/signin.py and docs/SECURITY.md; these
tests hold it to each promise: concurrent guesses cannot slip past it, a
colleague cannot be locked out, every attempt is audited without its password,
and a signed-out or expired token ends its live stream at once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from controller.api.signin import Attempt, SignInLimiter, Throttled

from .api_rig import next_message, secure_api

WRONG = {"username": "manager", "password": "not-the-password"}
RIGHT = {"username": "manager", "password": "demo-manager"}


# --- the limiter on its own, with a clock we move ---------------------------------------


def test_a_place_is_taken_before_the_password_is_checked() -> None:
    limiter = SignInLimiter(per_account_source=5, clock=lambda: 0.0)
    in_flight = [limiter.begin("manager", "10.0.0.9") for _ in range(5)]
    assert all(isinstance(a, Attempt) for a in in_flight)
    # Five are being heard and none has finished: the sixth, right or wrong, waits.
    sixth = limiter.begin("manager", "10.0.0.9")
    assert isinstance(sixth, Throttled) and sixth.limit == "account_source"
    # A right password gives its place back.
    first = in_flight[0]
    assert isinstance(first, Attempt)
    first.succeeded()
    assert isinstance(limiter.begin("manager", "10.0.0.9"), Attempt)


def test_no_limit_is_a_lockout() -> None:
    now = [0.0]
    limiter = SignInLimiter(
        per_source=10, per_account_source=5, account_ceiling=8, delay_cap_s=30, clock=lambda: now[0]
    )
    # The real manager signs in from their tablet: that address is known for the name.
    ok = limiter.begin("manager", "tablet")
    assert isinstance(ok, Attempt)
    ok.succeeded()
    # An attacker guesses from many addresses, 4 each (under the per-pair limit).
    for n in range(40):
        now[0] += 0.01
        attempt = limiter.begin("manager", f"10.0.0.{n // 4}")
        if isinstance(attempt, Attempt):
            attempt.failed()
    # The distributed guessing is slowed to one guess per delay...
    slowed = limiter.begin("manager", "10.0.9.9")
    assert isinstance(slowed, Throttled) and slowed.limit == "account"
    assert slowed.retry_after_s <= 30
    # ...but the manager's own tablet is heard at once...
    assert isinstance(limiter.begin("manager", "tablet"), Attempt)
    # ...and the delay ends by itself, at most delay_cap_s after the last failure.
    now[0] += 30.01
    assert isinstance(limiter.begin("manager", "10.0.9.9"), Attempt)


def test_one_address_spraying_names_is_stopped() -> None:
    limiter = SignInLimiter(per_source=10, clock=lambda: 0.0)
    for n in range(10):
        attempt = limiter.begin(f"user{n}", "10.0.0.66")
        assert isinstance(attempt, Attempt)
        attempt.failed()
    refused = limiter.begin("therapist", "10.0.0.66")
    assert isinstance(refused, Throttled) and refused.limit == "source"
    assert isinstance(limiter.begin("therapist", "10.0.0.67"), Attempt)


# --- over HTTP ---------------------------------------------------------------------------


async def test_31_concurrent_attempts_get_exactly_the_limit_heard(tmp_path: Path) -> None:
    async with secure_api(tmp_path, login_attempts_per_minute=5) as api:
        async with httpx.AsyncClient(
            base_url=api.server.url, limits=httpx.Limits(max_connections=64)
        ) as http:
            wrong = [asyncio.create_task(http.post("/api/login", json=WRONG)) for _ in range(30)]
            await asyncio.sleep(0.02)  # the 30 are in flight, their hashes not yet done
            started = time.monotonic()
            right = await http.post("/api/login", json=RIGHT)
            answered_in = time.monotonic() - started
            statuses = sorted(r.status_code for r in await asyncio.gather(*wrong))
        assert right.status_code == 429, right.text
        assert statuses.count(401) == 5 and statuses.count(429) == 25, statuses
        # (Limited only after hearing, all 30 wrong ones would be heard: 401 x30.)
        failed = [r for r in await api.audit("access") if r["details"]["result"] != "throttled"]
        assert len(failed) == 5 and {r["details"]["actor"] for r in failed} == {"m-demo"}
        throttled = [r for r in await api.audit("access") if r["details"]["result"] == "throttled"]
        assert throttled and "refused unheard" in throttled[0]["message"]
        print(
            f"\n31 concurrent: 401 x{statuses.count(401)}, 429 x{statuses.count(429) + 1}; "
            f"the right one refused in {answered_in * 1000:.0f} ms"
        )


async def test_a_colleague_cannot_lock_a_manager_out(tmp_path: Path) -> None:
    # Two tablets behind the clinic's reverse proxy (trusted): addresses are forwarded.
    async with secure_api(tmp_path, trusted_proxies=["127.0.0.1/32"]) as api:
        for _ in range(5):
            r = await api.http.post(
                "/api/login", json=WRONG, headers={"X-Forwarded-For": "10.1.1.5"}
            )
            assert r.status_code == 401
        r = await api.http.post("/api/login", json=RIGHT, headers={"X-Forwarded-For": "10.1.1.5"})
        assert r.status_code == 429  # that address is slowed for that name...
        await api.login("manager", **{"X-Forwarded-For": "10.1.1.6"})  # ...not the manager
        sources = {r["details"]["source"] for r in await api.audit("access")}
        assert sources == {"10.1.1.5", "10.1.1.6"}


async def test_forwarded_addresses_are_ignored_unless_from_a_trusted_proxy(
    tmp_path: Path,
) -> None:
    async with secure_api(tmp_path, login_attempts_per_minute=5) as api:
        codes = []
        for n in range(8):  # rotating the header does not buy more guesses
            r = await api.http.post(
                "/api/login", json=WRONG, headers={"X-Forwarded-For": f"192.0.2.{n}"}
            )
            codes.append(r.status_code)
        assert codes == [401] * 5 + [429] * 3
        assert {r["details"]["source"] for r in await api.audit("access")} == {"127.0.0.1"}


async def test_sign_ins_are_audited_without_the_password(tmp_path: Path) -> None:
    async with secure_api(tmp_path) as api:
        secret = "Tr0ub4dor&3-not-stored"
        await api.http.post("/api/login", json={"username": "nobody", "password": secret})
        await api.http.post("/api/login", json={"username": "therapist", "password": secret})
        auth = await api.login("therapist")
        assert (await api.http.post("/api/logout", headers=auth)).status_code == 204
        records = await api.audit("access")
        assert [r["details"]["result"] for r in records] == [
            "bad_credentials",
            "bad_credentials",
            "signed_in",
            "signed_out",
        ]
        assert "actor" not in records[0]["details"]  # an unknown name is not recorded
        assert records[1]["details"]["actor"] == "t-demo"
        assert all(r["details"]["source"] == "127.0.0.1" for r in records)
        api.rig.service.sync_records()
        raw = sqlite3.connect(api.rig.service.settings.state_dir / "audit.db")
        dump = "\n".join(raw.iterdump())
        raw.close()
        assert secret not in dump and "nobody" not in dump


# --- tokens and live streams -------------------------------------------------------------


async def _closed_code(ws: ClientConnection, within: float) -> int:
    """The close code the server sent, skipping any messages before it."""
    async with asyncio.timeout(within):
        while True:
            try:
                await ws.recv()
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd is not None else -1


async def test_sign_out_ends_the_live_stream_at_once(tmp_path: Path) -> None:
    async with secure_api(tmp_path) as api:
        auth = await api.login("therapist")
        sid = await api.open_session(auth)
        token = auth["Authorization"].removeprefix("Bearer ")
        async with connect(api.ws_url(sid, token)) as ws:
            await next_message(ws, {"type": "telemetry"})
            started = time.monotonic()
            assert (await api.http.post("/api/logout", headers=auth)).status_code == 204
            error = await next_message(ws, {"type": "error"}, within=1.0)
            assert error["code"] == "not_signed_in"
            assert await _closed_code(ws, 1.0) == 4401
            print(f"\nlive stream closed {1000 * (time.monotonic() - started):.0f} ms after logout")


async def test_expiry_ends_the_live_stream_and_renewal_keeps_it(tmp_path: Path) -> None:
    async with secure_api(tmp_path, token_lifetime_s=1.5, token_max_age_s=4.0) as api:
        before = time.monotonic()
        auth = await api.login("therapist")
        signed_in = (before + time.monotonic()) / 2
        sid = await api.open_session(auth)
        token = auth["Authorization"].removeprefix("Bearer ")
        async with connect(api.ws_url(sid, token)) as ws:
            for _ in range(3):  # renewing every second keeps the stream past 1.5 s
                await asyncio.sleep(1.0)
                r = await api.http.post("/api/token/renew", headers=auth)
                assert r.status_code == 200 and 0 < r.json()["expires_in"] <= 1.5
            await next_message(ws, {"type": "telemetry"})
            # Past its maximum age (4 s after sign-in) it cannot be renewed: the stream ends.
            error = await next_message(ws, {"type": "error"}, within=3.0)
            assert error["code"] == "not_signed_in"
            assert 3.8 < time.monotonic() - signed_in < 4.8
        assert (await api.http.get("/api/me", headers=auth)).status_code == 401


async def test_an_unauthenticated_websocket_has_one_second(tmp_path: Path) -> None:
    async with secure_api(tmp_path, max_unauthenticated_ws=3) as api:
        auth = await api.login("therapist")
        sid = await api.open_session(auth)
        silent = [await connect(api.ws_url(sid)) for _ in range(3)]
        try:
            started = time.monotonic()
            async with connect(api.ws_url(sid)) as extra:  # a fourth may not wait
                assert await _closed_code(extra, 1.0) == 1013
            for ws in silent:
                error = json.loads(await asyncio.wait_for(ws.recv(), 2.0))
                assert error["code"] == "not_signed_in"
                assert await _closed_code(ws, 1.0) == 4401
            assert time.monotonic() - started < 1.6
        finally:
            for ws in silent:
                await ws.close()
        # A signed-in stream is not counted: it authenticated at once.
        token = auth["Authorization"].removeprefix("Bearer ")
        async with connect(api.ws_url(sid, token)) as ws:
            await next_message(ws, {"type": "hello"})
