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

from controller.config import ApiSettings
from controller.influx import InfluxSettings

from .auth import TokenStore, UserStore
from .deps import ControllerApi, LiveGuard
from .edge import EdgeMiddleware
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
from .signin import SignInLimiter
from .stopkeys import StopKeyStore

#: In this order: the OpenAPI document lists the operations as they are included.
ROUTERS = (auth, devices, plans, sessions, reports, audit, tablet, stopkeys, charts, live, page)


def create_app(
    service: ControllerApi,
    users: UserStore,
    settings: ApiSettings | None = None,
    *,
    influx: InfluxSettings | None = None,
) -> FastAPI:
    """The tablet API and web page for ``service``; ``users`` may sign in.

    ``settings``: tokens, sign-in limits, trusted proxies, docs and the limits at
    the edge (``[api]`` of the controller's configuration; defaults if None).
    ``influx``: where the manager's charts come from (None: no charts, a 503 says why).
    """
    settings = settings or ApiSettings()
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
        # Swagger UI loads from a CDN: off unless asked for (docs/SECURITY.md).
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
    )
    # What the routers' dependencies (controller.api.deps) hand out, per app.
    app.state.service = service
    app.state.users = users
    app.state.settings = settings
    app.state.tokens = TokenStore(
        lifetime_s=settings.token_lifetime_s, max_age_s=settings.token_max_age_s
    )
    app.state.limiter = SignInLimiter(
        per_source=settings.login_failures_per_source_per_minute,
        per_account_source=settings.login_attempts_per_minute,
        account_ceiling=settings.login_account_ceiling,
        delay_cap_s=settings.login_delay_cap_s,
    )
    app.state.live_guard = LiveGuard(
        max_unauthenticated=settings.max_unauthenticated_ws,
        auth_timeout_s=settings.ws_auth_timeout_s,
    )
    app.state.stop_keys = StopKeyStore(max_age_s=max(settings.token_max_age_s, 12 * 3600.0))
    app.state.influx = influx
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(RequestValidationError)(validation_error)
    for module in ROUTERS:
        app.include_router(module.router)
    page.mount_static(app)
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=settings.max_body_bytes,
        request_timeout_s=settings.request_timeout_s,
        trusted_proxies=settings.trusted_proxies,
        docs=settings.docs_enabled,
        max_header_bytes=settings.max_header_bytes,
    )
    return app
