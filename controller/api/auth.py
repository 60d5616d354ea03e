"""Users, password hashes, bearer tokens and the login rate limit for the tablet API.

Users live in a small TOML (or JSON) file; passwords are stored only as Argon2id
hashes (argon2-cffi, the reference implementation's maintained binding)::

    [users.therapist]
    role = "therapist"
    id = "t-0001"            # the pseudonymous id recorded in sessions and the audit log
    password_hash = "$argon2id$v=19$..."

Add one with ``python -m controller.api.users add NAME --role therapist --file users.toml``.
Tokens are random, server-side and expire (a restart signs everyone out, which is
what a treatment-room tablet should expect).
"""

from __future__ import annotations

import json
import secrets
import time
import tomllib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from controller.sessions import Actor, Role

_HASHER = PasswordHasher()

#: Demo users (only when demo mode is on): name -> (role, pseudonymous id, password).
DEMO_USERS: Mapping[str, tuple[Role, str, str]] = {
    "therapist": (Role.THERAPIST, "t-demo", "demo-therapist"),
    "manager": (Role.MANAGER, "m-demo", "demo-manager"),
    "admin": (Role.ADMIN, "a-demo", "demo-admin"),
}


class UsersFileError(ValueError):
    """The users file cannot be used; the message names the user and the key."""


def hash_password(password: str) -> str:
    """An Argon2id hash for the users file."""
    return _HASHER.hash(password)


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role
    actor_id: str
    password_hash: str

    @property
    def actor(self) -> Actor:
        return Actor(self.actor_id, self.role)


# A hash to verify against for unknown names, so a wrong name costs the same time
# as a wrong password (no user enumeration by timing).
_DUMMY_HASH = _HASHER.hash(secrets.token_hex(8))


@dataclass
class UserStore:
    """The people who may sign in. Build with :meth:`load` or :meth:`demo`."""

    users: dict[str, User] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> UserStore:
        """Read a TOML or JSON users file (``{"users": {name: {role, id, password_hash}}}``)."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsersFileError(f"cannot read users file {path}: {exc.strerror}") from exc
        try:
            data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise UsersFileError(f"{path} is not valid: {exc}") from exc
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: Any, source: str = "users") -> UserStore:
        entries = data.get("users", {}) if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise UsersFileError(f"{source}: 'users' must be a table of users")
        store = cls()
        for name, entry in entries.items():
            if not isinstance(entry, dict):
                raise UsersFileError(f"{source}: users.{name} must be a table")
            try:
                role = Role(str(entry.get("role")))
            except ValueError as exc:
                roles = ", ".join(r.value for r in Role)
                raise UsersFileError(f"{source}: users.{name}.role must be one of {roles}") from exc
            hashed = entry.get("password_hash")
            if not isinstance(hashed, str) or not hashed.startswith("$argon2"):
                raise UsersFileError(f"{source}: users.{name}.password_hash must be an Argon2 hash")
            actor_id = entry.get("id", name)
            if not isinstance(actor_id, str) or not actor_id:
                raise UsersFileError(f"{source}: users.{name}.id must be a non-empty string")
            store.users[name] = User(name, role, actor_id, hashed)
        return store

    @classmethod
    def demo(cls) -> UserStore:
        """The documented demo users (``therapist``/``demo-therapist`` and so on)."""
        store = cls()
        store.add_demo_users()
        return store

    def add_demo_users(self) -> None:
        for name, (role, actor_id, password) in DEMO_USERS.items():
            self.users.setdefault(name, User(name, role, actor_id, hash_password(password)))

    def verify(self, name: str, password: str) -> User | None:
        """The user if the password is right, else None (same cost either way)."""
        user = self.users.get(name)
        try:
            _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        return user

    def to_toml(self) -> str:
        lines = []
        for user in self.users.values():
            lines += [
                f"[users.{json.dumps(user.name)}]",
                f'role = "{user.role.value}"',
                f"id = {json.dumps(user.actor_id)}",
                f"password_hash = {json.dumps(user.password_hash)}",
                "",
            ]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class TokenInfo:
    user: User
    expires_at: float


@dataclass
class TokenStore:
    """Random bearer tokens held server-side, each valid for ``lifetime_s``."""

    lifetime_s: float = 8 * 3600.0
    clock: Callable[[], float] = time.monotonic
    _tokens: dict[str, TokenInfo] = field(default_factory=dict)

    def issue(self, user: User) -> tuple[str, float]:
        """A new token for ``user`` and its lifetime in seconds."""
        self._purge()
        token = secrets.token_urlsafe(32)
        self._tokens[token] = TokenInfo(user, self.clock() + self.lifetime_s)
        return token, self.lifetime_s

    def user(self, token: str) -> User | None:
        info = self._tokens.get(token)
        if info is None:
            return None
        if info.expires_at <= self.clock():
            del self._tokens[token]
            return None
        return info.user

    def revoke(self, token: str) -> None:
        self._tokens.pop(token, None)

    def _purge(self) -> None:
        now = self.clock()
        for token in [t for t, i in self._tokens.items() if i.expires_at <= now]:
            del self._tokens[token]


@dataclass
class LoginLimiter:
    """At most ``attempts`` failed logins per user name and per client address per window.

    Only failures count, so a therapist who types the password right is never
    locked out by their own earlier successes.
    """

    attempts: int = 5
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login for these keys may be tried again (0: now)."""
        now = self.clock()
        wait = 0.0
        for key in keys:
            times = self._failures.get(key)
            if not times:
                continue
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if len(times) >= self.attempts:
                wait = max(wait, times[0] + self.window_s - now)
        return wait

    def failed(self, *keys: str) -> None:
        now = self.clock()
        for key in keys:
            self._failures.setdefault(key, deque()).append(now)
        if len(self._failures) > 10_000:  # bound memory under a spray of names
            self._failures = {k: v for k, v in self._failures.items() if v}

    def succeeded(self, name_key: str) -> None:
        self._failures.pop(name_key, None)
