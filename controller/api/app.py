"""The tablet API's application factory: HTTP + WebSocket over the controller.

``create_app(service, users)`` builds the FastAPI application from the routers
in ``controller.api.routers``. It makes no clinical decision: each request
becomes one action for the controller, and every refusal comes back as JSON
with ``code``, ``message`` and ``remediation`` (the same sentences the audit
log records). It must run in the service's event loop (the service is not
thread-safe); ``penctl serve`` runs uvicorn there.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.influx import InfluxSettings

from .auth import LoginLimiter, TokenStore, UserStore
from .deps import ControllerApi
from .errors import COMMON_ERRORS, http_error, validation_error
from .routers import (
    audit,
    auth,
    charts,
    devices,
    live,
    page,
    plans,
    reports,
    sessions,
    stopkeys,
    tablet,
)
from .stopkeys import StopKeyStore

#: In this order: the OpenAPI document lists the operations as they are included.
ROUTERS = (auth, devices, plans, sessions, reports, audit, tablet, stopkeys, charts, live, page)


def create_app(
    service: ControllerApi,
    users: UserStore,
    *,
    token_lifetime_s: float = 8 * 3600.0,
    login_attempts: int = 5,
    login_window_s: float = 60.0,
    influx: InfluxSettings | None = None,
) -> FastAPI:
    """The tablet API and web page for ``service``; ``users`` may sign in.

    ``influx``: where the manager's charts come from (None: no charts, a 503 says why).
    """
    app = FastAPI(
        title="Pen session controller: tablet API",
        version="1.0.0",
        description=(
            "Sessions, zones, depth, arming and live telemetry for the therapist's tablet. "
            "Sign in at POST /api/login and send `Authorization: Bearer <token>`; the "
            "WebSocket takes `?token=` or the token as its first message. Every error "
            "is JSON with code, message and remediation."
        ),
        responses=COMMON_ERRORS,
    )
    # What the routers' dependencies (controller.api.deps) hand out, per app.
    app.state.service = service
    app.state.users = users
    app.state.tokens = TokenStore(lifetime_s=token_lifetime_s)
    app.state.limiter = LoginLimiter(attempts=login_attempts, window_s=login_window_s)
    app.state.stop_keys = StopKeyStore(max_age_s=max(token_lifetime_s, 12 * 3600.0))
    app.state.influx = influx
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(RequestValidationError)(validation_error)
    for module in ROUTERS:
        app.include_router(module.router)
    page.mount_static(app)
    return app
