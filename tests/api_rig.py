"""A real controller (simulated pens on ptys) behind a real uvicorn, for the API security tests."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection

from controller.api import UserStore, hash_password
from controller.api.auth import User
from controller.api.server import ApiServer
from controller.config import ApiSettings
from controller.edge.runtime import Edge
from controller.sessions import Role

from .controller_rig import Rig, edge_for, start_rig, stop_rig


def users_with_two_therapists() -> UserStore:
    """The demo users plus a second therapist, ``therapist2``/``demo-therapist2``."""
    store = UserStore.demo()
    store.users["therapist2"] = User(
        "therapist2", Role.THERAPIST, "t-demo-2", hash_password("demo-therapist2")
    )
    return store


USERS = users_with_two_therapists()  # hashing is slow on purpose: once per session


@dataclass
class SecureApi:
    rig: Rig
    server: ApiServer
    http: httpx.AsyncClient
    settings: ApiSettings
    edge: Edge

    async def login(self, name: str, **headers: str) -> dict[str, str]:
        r = await self.http.post(
            "/api/login", json={"username": name, "password": f"demo-{name}"}, headers=headers
        )
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}

    def ws_url(self, sid: str, token: str | None = None) -> str:
        scheme = "wss" if self.server.tls else "ws"
        base = f"{scheme}://{self.server.host}:{self.server.port}/api/sessions/{sid}/live"
        return base if token is None else f"{base}?token={token}"

    async def open_session(self, auth: dict[str, str], client_ref: str = "C-1042") -> str:
        r = await self.http.post(
            "/api/sessions",
            json={"port": self.rig.port(), "client_ref": client_ref, "plan_id": "full_face"},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        sid: str = r.json()["session_id"]
        r = await self.http.post(f"/api/sessions/{sid}/start", headers=auth)
        assert r.status_code == 200, r.text
        return sid

    async def audit(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every audit record so far (waits for the writer), optionally of one kind."""
        service = self.rig.service
        service.sync_records()  # blocks the loop a moment: fine in a test
        records = [r.as_dict() for r in await service.audit_records(None, 10_000)]
        return [r for r in records if kind is None or r["kind"] == kind]


@asynccontextmanager
async def secure_api(tmp_path: Path, **settings: Any) -> AsyncIterator[SecureApi]:
    """The controller and its API, configured with ``settings`` (``ApiSettings`` keys)."""
    api_settings = ApiSettings(**{"port": 0, **settings})
    rig, collector = await start_rig(tmp_path)
    try:
        async with edge_for(rig.service, users=USERS, api=api_settings) as edge:
            server = edge.server
            assert server is not None
            verify: Any = True
            if server.tls:
                ca = Path(str(api_settings.tls_certfile)).parent / "ca.crt"
                verify = ssl.create_default_context(cafile=str(ca))
            async with httpx.AsyncClient(base_url=server.url, timeout=10, verify=verify) as http:
                yield SecureApi(rig, server, http, api_settings, edge)
    finally:
        await stop_rig(rig, collector)


async def next_message(ws: ClientConnection, want: dict[str, Any], within: float = 5.0) -> Any:
    """The next message whose fields include ``want`` (others are skipped)."""
    async with asyncio.timeout(within):
        while True:
            message = json.loads(await ws.recv())
            if all(message.get(k) == v for k, v in want.items()):
                return message
