"""Users, password hashes, bearer tokens and the login rate limit for the tablet API.

Users live in a small TOML (or JSON) file; passwords are stored only as Argon2id
hashes (argon2-cffi, the reference implementation's maintained binding)::

    [users.therapist]
    role = "therapist"
    id = "t-0001"            # the pseudonymous id recorded in sessions and the audit log
    password_hash = "$argon2id$v=19$..."

Add one with ``python -m controller.api.users add NAME --role therapist --file users.toml``.
Tokens are random, server-side, expire and can be renewed (a restart signs
everyone out, which is what a treatment-room tablet should expect). The
sign-in limiter is :mod:`controller.api.signin`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import tomllib
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
            # Sessions belong to an id: two users sharing one would share their sessions.
            twin = next((u.name for u in store.users.values() if u.actor_id == actor_id), None)
            if twin is not None:
                raise UsersFileError(
                    f"{source}: users.{name}.id {actor_id!r} is also {twin}'s id; "
                    "give each user their own"
                )
            store.users[name] = User(name, role, actor_id, hashed)
        return store

    @classmethod
    def demo(cls) -> UserStore:
        """The documented demo users (``therapist``/``demo-therapist`` and so on)."""
        store = cls()
        store.add_demo_users()
        return store

    @classmethod
    def for_api(cls, users_file: Path | None, *, demo_users: bool) -> UserStore:
        """The API's users: the users file (if any), plus the demo users in demo mode."""
        store = cls.load(users_file) if users_file else cls()
        if demo_users:
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


@dataclass(slots=True)
class TokenInfo:
    user: User
    issued_at: float
    expires_at: float
    #: Set (and replaced) whenever the token is renewed or revoked: live streams wait on it.
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class TokenStore:
    """Random bearer tokens held server-side.

    A token lives ``lifetime_s`` and can be renewed before it expires
    (:meth:`renew`), each renewal giving it ``lifetime_s`` again but never
    beyond ``max_age_s`` after sign-in: then the user signs in again. A
    revoked or expired token ends every live stream that used it at once
    (:meth:`wait_invalid`). At most ``per_user`` tokens per user; a new one
    beyond that revokes the oldest.
    """

    lifetime_s: float = 3600.0
    max_age_s: float = 12 * 3600.0
    per_user: int = 8
    clock: Callable[[], float] = time.monotonic
    _tokens: dict[str, TokenInfo] = field(default_factory=dict)

    def issue(self, user: User) -> tuple[str, float]:
        """A new token for ``user`` and its lifetime in seconds."""
        self._purge()
        mine = [t for t, i in self._tokens.items() if i.user.name == user.name]
        for old in mine[: max(0, len(mine) - self.per_user + 1)]:  # oldest first (dict order)
            self.revoke(old)
        token = secrets.token_urlsafe(32)
        now = self.clock()
        self._tokens[token] = TokenInfo(user, now, now + min(self.lifetime_s, self.max_age_s))
        return token, min(self.lifetime_s, self.max_age_s)

    def user(self, token: str) -> User | None:
        info = self._live(token)
        return info.user if info else None

    def expires_in(self, token: str) -> float | None:
        """Seconds the token has left, or None if it is not valid."""
        info = self._live(token)
        return info.expires_at - self.clock() if info else None

    def renew(self, token: str) -> float | None:
        """Give a valid token ``lifetime_s`` again (within ``max_age_s``); its new lifetime,
        or None if it is not valid. 0 means it reached its maximum age and cannot grow."""
        info = self._live(token)
        if info is None:
            return None
        now = self.clock()
        info.expires_at = min(now + self.lifetime_s, info.issued_at + self.max_age_s)
        self._changed(info)
        return info.expires_at - now

    def revoke(self, token: str) -> None:
        info = self._tokens.pop(token, None)
        if info is not None:
            self._changed(info)

    async def wait_invalid(self, token: str) -> None:
        """Return once ``token`` is revoked or expired (at once if it already is)."""
        while True:
            info = self._live(token)
            if info is None:
                return
            event = info.changed
            try:
                async with asyncio.timeout(max(0.0, info.expires_at - self.clock())):
                    await event.wait()
            except TimeoutError:
                pass  # expired, or about to: the next turn of the loop says which

    def _live(self, token: str) -> TokenInfo | None:
        info = self._tokens.get(token)
        if info is None:
            return None
        if info.expires_at <= self.clock():
            self.revoke(token)
            return None
        return info

    @staticmethod
    def _changed(info: TokenInfo) -> None:
        info.changed.set()
        info.changed = asyncio.Event()

    def _purge(self) -> None:
        now = self.clock()
        for token in [t for t, i in self._tokens.items() if i.expires_at <= now]:
            self.revoke(token)
