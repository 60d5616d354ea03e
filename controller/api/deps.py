"""What every router depends on: the controller, the signed-in user and the role rules.

Routers take these through FastAPI's ``Depends``; the objects themselves live on
``app.state`` (set once by :func:`controller.api.app.create_app`), so a router
module holds no state and any app it is included in brings its own.
"""

# No `from __future__ import annotations`: FastAPI evaluates these annotations.

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from controller.audit import AuditRecord
from controller.errors import ActionRefused, CoreBusyError, CoreUnavailableError
from controller.live import Subscription
from controller.policy import Plan, ZoneLimits
from controller.sessions import Action, SessionEvent
from controller.sessions.records import Session

from .auth import TokenStore, User, UserStore
from .errors import ApiError, core_unavailable, refusal_error, unknown_session
from .models import SessionView
from .roles import ROLE_MATRIX
from .signin import SignInLimiter


class ControllerApi(Protocol):
    """What the tablet API needs of the controller, and nothing more.

    ``ControllerService`` provides it today, in the same process and event loop.
    The API runs in the edge process and talks to the safety core over a channel
    (``controller.edge.client.CoreClient`` implements this); reads come from its
    mirror, actions are the only requests that reach the core. Every value
    crossing it is plain data.
    """

    async def act(self, action: Action) -> Mapping[str, Any]:
        """Apply a therapist's or manager's action in the safety core; raises
        ``ActionRefused`` with the reason (``CoreBusyError``, ``CoreUnavailableError``
        when the core cannot take it now)."""
        ...

    async def act_and_wait(
        self, action: Action, until: Callable[[SessionEvent], bool], within: float = ...
    ) -> SessionEvent:
        """Act, then the first session event satisfying ``until`` (TimeoutError if none)."""
        ...

    def new_session_id(self) -> str:
        """A fresh session id."""
        ...

    def session(self, session_id: str) -> Session | None:
        """The session's record, or None."""
        ...

    def sessions(self) -> list[Session]:
        """Every session, live and ended."""
        ...

    def report(self, session_id: str) -> dict[str, Any] | None:
        """The session's report, or None for an unknown session."""
        ...

    async def controls(self, session_id: str) -> dict[str, Any] | None:
        """What the tablet may do in the session now (each action None or its refusal),
        the depth range of the selected zone and the pen's arming; None if unknown."""
        ...

    def devices(self) -> list[dict[str, Any]]:
        """Every configured pen: identity, link, arming, cartridge, session, link statistics."""
        ...

    def plans(self) -> list[Plan]:
        """The treatment plans in force."""
        ...

    def zones(self) -> Mapping[str, ZoneLimits]:
        """Every zone in force, by id."""
        ...

    async def audit_records(self, session_id: str | None, limit: int) -> list[AuditRecord]:
        """The newest ``limit`` audit records (of one session), oldest first."""
        ...

    def subscribe(self, maxsize: int = ...) -> Subscription:
        """Live events and tablet-rate telemetry of every pen."""
        ...

    def unsubscribe(self, sub: Subscription) -> None:
        """End a subscription."""
        ...


def get_service(connection: HTTPConnection) -> ControllerApi:
    """The controller this app serves (HTTP requests and WebSockets alike)."""
    service: ControllerApi = connection.app.state.service
    return service


def get_tokens(connection: HTTPConnection) -> TokenStore:
    """The app's bearer tokens."""
    tokens: TokenStore = connection.app.state.tokens
    return tokens


def get_users(connection: HTTPConnection) -> UserStore:
    """The people who may sign in."""
    users: UserStore = connection.app.state.users
    return users


def get_limiter(connection: HTTPConnection) -> SignInLimiter:
    """The app's sign-in limiter."""
    limiter: SignInLimiter = connection.app.state.limiter
    return limiter


@dataclass
class LiveGuard:
    """Unauthenticated WebSockets: each must sign in within ``auth_timeout_s``, and at most
    ``max_unauthenticated`` may wait at once (they cost a socket and a task each)."""

    max_unauthenticated: int = 16
    auth_timeout_s: float = 1.0
    waiting: int = 0

    def enter(self) -> bool:
        """Take a place among the unauthenticated; False if there is none."""
        if self.waiting >= self.max_unauthenticated:
            return False
        self.waiting += 1
        return True

    def leave(self) -> None:
        self.waiting -= 1


def get_live_guard(connection: HTTPConnection) -> LiveGuard:
    """The app's limits on WebSockets that have not signed in yet."""
    guard: LiveGuard = connection.app.state.live_guard
    return guard


def client_source(connection: HTTPConnection) -> str:
    """The client's address (forwarded ones believed only from trusted proxies: edge.py)."""
    return connection.client.host if connection.client else "unknown"


Service = Annotated[ControllerApi, Depends(get_service)]
Tokens = Annotated[TokenStore, Depends(get_tokens)]
Users = Annotated[UserStore, Depends(get_users)]
Limiter = Annotated[SignInLimiter, Depends(get_limiter)]
Guard = Annotated[LiveGuard, Depends(get_live_guard)]
#: Module level, so every operation names the one security scheme ``HTTPBearer``.
bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def require(operation: str) -> Callable[..., Awaitable[User]]:
    """A dependency: the signed-in user, if ``ROLE_MATRIX[operation]`` lets their role in.

    401 without a valid token, 403 for a role the table does not allow.
    """
    allowed = ROLE_MATRIX[operation]

    async def dependency(credentials: Credentials, tokens: Tokens) -> User:
        user = tokens.user(credentials.credentials) if credentials else None
        if user is None:
            raise ApiError(
                401,
                "not_signed_in",
                "You are not signed in, or your sign-in has expired.",
                "Sign in again.",
                **{"WWW-Authenticate": "Bearer"},
            )
        if user.role not in allowed:
            raise ApiError(
                403,
                "role_not_permitted",
                f"The {user.role} role may not do this.",
                "Ask someone with the right role to sign in.",
            )
        return user

    return dependency


async def act(service: ControllerApi, action: Action) -> None:
    """Hand ``action`` to the safety core; a refusal becomes the matching API error, a
    core that cannot take it now a 503 saying to try again."""
    try:
        await service.act(action)
    except ActionRefused as exc:
        raise refusal_error(exc.refusal) from exc
    except (CoreBusyError, CoreUnavailableError) as exc:
        raise core_unavailable(exc) from exc


def session_or_404(service: ControllerApi, session_id: str) -> Session:
    """The session's record, or a 404 naming the id."""
    session = service.session(session_id)
    if session is None:
        raise unknown_session(session_id)
    return session


def owns(user: User, session: Session) -> bool:
    """The session is ``user``'s: they opened it, or took it over."""
    return session.therapist_id == user.actor_id


def view_of(session: Session, user: User) -> SessionView:
    """The session as ``user`` may see it: another's client code is withheld (None)."""
    mine = owns(user, session)
    data = session.model_dump()
    if not mine:
        data["client_ref"] = None
    return SessionView(**data, mine=mine)


def session_view_or_404(service: ControllerApi, session_id: str, user: User) -> SessionView:
    """The session as ``user`` may see it, or a 404 naming the id."""
    return view_of(session_or_404(service, session_id), user)
