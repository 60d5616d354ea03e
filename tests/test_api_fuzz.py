"""Schemathesis against the tablet API's own OpenAPI document: no request gets a 5xx.

Bounded (``EXAMPLES`` per operation, positive and negative data), signed in as a
manager (who may call almost everything) and, separately, unauthenticated. The
counts are printed (``pytest -s``) and asserted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.api import UserStore, create_app
from controller.config import load_settings
from controller.service import ControllerService
from controller.sessions import Actor, CreateSession, Role

EXAMPLES = 25
USERS = UserStore.demo()


def test_no_request_gets_a_server_error(tmp_path: Path) -> None:
    config = load_settings(
        None,
        state_dir=tmp_path / "state",
        pens=[{"url": str(tmp_path / "no-such-pen"), "name": "room1"}],
        mqtt={"enabled": False},
    )
    service = ControllerService(config)
    # A session, so the fuzzer can reach past "unknown session" when it guesses it.
    therapist = Actor("t-fuzz", Role.THERAPIST)
    service.act(CreateSession("s-1", "room1", "C-1", "full_face", therapist))
    app = create_app(service, USERS, login_attempts=1000)
    manager = next(u for u in USERS.users.values() if u.role is Role.MANAGER)
    token, _ = app.state.tokens.issue(manager)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    counts = {"requests": 0, "5xx": 0}
    failures: list[str] = []

    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = st.one_of(
            operation.as_strategy(),
            operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
        )

        @given(case=strategy, authed=st.booleans())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any, authed: bool) -> None:
            headers = {"Authorization": f"Bearer {token}"} if authed else {}
            response = case.call(headers=headers)
            counts["requests"] += 1
            if response.status_code >= 500:
                counts["5xx"] += 1
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}")

        fuzz()

    print(f"\nschemathesis: {counts['requests']} requests, {counts['5xx']} answered 5xx")
    assert counts["requests"] >= 20 * EXAMPLES
    assert failures == [], failures
    service.journal.close()
    service.audit.close()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-s"])
