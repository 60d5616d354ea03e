"""The tablet API and the therapist's web page (product.md §8).

``create_app(service, users)`` (``app.py``) builds the FastAPI app from one router
per area (``routers/``: auth, devices, plans, sessions, reports, audit, live,
page); ``deps.py`` holds what they depend on, above all ``ControllerApi``, the
narrow interface they need of the controller; ``errors.py`` the error bodies.
``penctl serve`` runs it with uvicorn in the service's event loop. Users:
:mod:`controller.api.auth`.
"""

from .app import create_app
from .auth import DEMO_USERS, TokenStore, User, UserStore, hash_password
from .roles import ROLE_MATRIX
from .signin import SignInLimiter

__all__ = [
    "DEMO_USERS",
    "ROLE_MATRIX",
    "SignInLimiter",
    "TokenStore",
    "User",
    "UserStore",
    "create_app",
    "hash_password",
]
