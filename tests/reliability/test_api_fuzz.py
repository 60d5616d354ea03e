"""Scenario: fuzzed tablet API requests. Schemathesis against the API's own OpenAPI
document: no request gets a 5xx, and no rejected request changes any state.

The cases come from schemathesis (positive and negative data, ``EXAMPLES`` per
operation); they are sent to the app of a real controller whose simulated pen is
connected over a pty, half of them aimed at a live session (so they get past
"unknown session" to the registry and the safety gate) and most signed in. Around
every request the registry (sessions, pens, cartridges) and the journal are
compared: a 4xx must leave both exactly as they were. The counts are recorded in
reliability.json and asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.api import UserStore, create_app
from controller.config import ApiSettings
from controller.edge.client import CoreClient
from controller.errors import ActionRefused
from controller.safety.context import SessionState
from controller.service import ControllerService
from controller.sessions import (
    Actor,
    ArmState,
    CreateSession,
    EndSession,
    ResumeSession,
    Role,
    SelectZone,
    SetZoneDepth,
    StartSession,
)
from simulated_pen.device import SimulatedPen

from ..controller_rig import eventually, start_rig, stop_rig
from .conftest import Record
from .figures import Figures

EXAMPLES = 25
USERS = UserStore.demo()
# The demo therapist: the fuzzed requests signed in as them own the sessions it opens.
FUZZER = Actor("t-demo", Role.THERAPIST)


def generate_cases(schema: Any) -> list[Any]:
    """EXAMPLES positive-or-negative cases for every operation (generation only)."""
    cases: list[Any] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = st.one_of(
            operation.as_strategy(),
            operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
        )

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def collect(case: Any) -> None:
            cases.append(case)

        collect()
    return cases


async def live_session(service: ControllerService, sid: str | None) -> str:
    """A session ready to treat on room1 (a new one if the fuzzer ended or broke the last)."""
    session = service.session(sid) if sid else None
    # A fuzzed take-over may have given the session to a manager: act as its owner.
    owner = Actor(session.therapist_id, Role.THERAPIST) if session else FUZZER
    if session is not None and session.state is SessionState.PAUSED:
        with contextlib.suppress(ActionRefused):
            service.act(ResumeSession(session.session_id, owner))
        session = service.session(session.session_id)
    if session is not None and session.state is SessionState.ACTIVE:
        return session.session_id
    if session is not None:
        with contextlib.suppress(ActionRefused):
            service.act(EndSession(session.session_id, owner))
    # Ending disarms the pen; the next session may choose a zone once the pen confirms.
    await eventually(lambda: service.registry.pen("room1").arm is ArmState.DISARMED, within=2.0)
    sid = service.new_session_id()
    service.act(CreateSession(sid, "room1", "C-fuzz", "full_face", FUZZER))
    service.act(StartSession(sid, FUZZER))
    service.act(SelectZone(sid, "cheeks", FUZZER))
    service.act(SetZoneDepth(sid, 1000, FUZZER))
    return sid


async def test_no_request_gets_a_server_error(tmp_path: Path, record: Record) -> None:
    # Generate first, from the same document served by an idle controller: generation
    # is CPU-bound and would starve the pens' links if it ran beside them.
    idle = CoreClient(tmp_path / "no-core.sock", state_dir=tmp_path / "idle")
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(idle, USERS))
    cases = generate_cases(schema)
    random.Random(7).shuffle(cases)  # interleave operations, as a tablet would
    rig, collector = await start_rig(tmp_path)
    # The API as penctl serve runs it: its reads from the edge's mirror, its actions
    # asked of the core over the channel.
    client = CoreClient(Path(rig.service.socket_path), state_dir=rig.service.settings.state_dir)
    await client.start()
    try:
        await asyncio.wait_for(client.ready.wait(), 10)
        service = rig.service
        app = create_app(
            client,
            USERS,
            ApiSettings(
                login_attempts_per_minute=1000,
                login_failures_per_source_per_minute=10_000,
                login_account_ceiling=100_000,
            ),
        )
        by_role = {u.role: u for u in USERS.users.values()}
        sid: str | None = None
        statuses: dict[int, int] = {}
        failures: list[str] = []
        changed_by_rejected: list[str] = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tablet") as http:
            for index, case in enumerate(cases):
                sid = await live_session(service, sid)
                if "session_id" in (case.path_parameters or {}) and index % 2 == 0:
                    case.path_parameters["session_id"] = sid
                kwargs = case.as_transport_kwargs(base_url="http://tablet")
                kwargs.pop("cookies", None)
                if index % 4 != 3:  # a quarter keep whatever credentials schemathesis made up
                    role = list(Role)[index % 3]
                    headers = {
                        k: v for k, v in kwargs["headers"].items() if k.lower() != "authorization"
                    }
                    # A fresh token each time: a fuzzed logout revokes the one it was sent.
                    token, _ = app.state.tokens.issue(by_role[role])
                    kwargs["headers"] = {**headers, "Authorization": f"Bearer {token}"}
                if "data" in kwargs:
                    kwargs["content"] = kwargs.pop("data")
                # Let the pen confirm what earlier requests asked (a Stop, an Arm, a
                # refused SetDepth), so that only this request can change what is
                # compared.
                await eventually(lambda: _settled(service, rig.pen()), within=2.0)
                before = _state(service)
                response = await http.request(**kwargs)
                if 400 <= response.status_code < 500 and _state(service) != before:
                    changed_by_rejected.append(f"{kwargs['method']} {kwargs['url']}")
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code >= 500:
                    failures.append(f"{kwargs['method']} {kwargs['url']} -> {response.text}")
        total = sum(statuses.values())
        five_xx = sum(n for code, n in statuses.items() if code >= 500)
        rejected = sum(n for code, n in statuses.items() if 400 <= code < 500)
        figures = record(
            Figures(
                scenario="fuzzed API requests",
                injected="schemathesis cases (positive and negative) for every operation, "
                "a quarter with made-up credentials",
                faults=total,
                unit="requests",
                sent=total,
                received=total - five_xx,
                detail={
                    "by_status": dict(sorted(statuses.items())),
                    "answered_5xx": five_xx,
                    "rejected_4xx": rejected,
                    "rejected_that_changed_state": len(changed_by_rejected),
                    "examples_per_operation": EXAMPLES,
                },
            )
        )
        assert total >= 20 * EXAMPLES
        assert failures == [], failures
        assert figures.detail["answered_5xx"] == 0
        assert changed_by_rejected == [], changed_by_rejected
        # The fuzz reached past authentication and validation to the controller itself.
        assert statuses.get(200, 0) > 50 and statuses.get(409, 0) > 10
    finally:
        await client.stop()
        await stop_rig(rig, collector)


def _state(service: ControllerService) -> tuple[Any, Any]:
    """Registry and journal, less each session's refusal count: a refused action is
    recorded (product.md §4.8), which is the one change a rejected request may make."""

    def strip(doc: dict[str, Any] | None) -> Any:
        if doc is None:
            return None
        sessions = {k: {**v, "refusals": None} for k, v in doc["sessions"].items()}
        return {**doc, "sessions": sessions}

    return strip(service.registry.to_dict()), strip(service.journaled_registry())


def _settled(service: ControllerService, device: SimulatedPen) -> bool:
    pen = service.registry.pen("room1")
    # Every command acknowledged and every answer of the pen (an Armed, a Disarmed, a
    # CommandRefused) acknowledged, so taken in by the registry: nothing still on its way.
    if service.pens["room1"].link.conn.unacknowledged or device.connection.unacknowledged:
        return False
    # A Stop to an armed pen is pending until it says Disarmed (a disarmed pen says nothing).
    return pen.arm is ArmState.DISARMED or (pen.arm is ArmState.ARMED and not pen.stopping)
