"""The tablet API and the therapist's web page (product.md §8).

``create_app(service, users)`` builds the FastAPI app; ``penctl serve`` runs it
with uvicorn in the service's event loop. Users: :mod:`controller.api.auth`.
"""

from .app import create_app
from .auth import DEMO_USERS, LoginLimiter, TokenStore, User, UserStore, hash_password
from .roles import ROLE_MATRIX

__all__ = [
    "DEMO_USERS",
    "ROLE_MATRIX",
    "LoginLimiter",
    "TokenStore",
    "User",
    "UserStore",
    "create_app",
    "hash_password",
]
