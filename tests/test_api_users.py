"""Users file and command, token expiry, login limiter; `penctl serve` with the API."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from controller.api import TokenStore, UserStore
from controller.api.auth import UsersFileError
from controller.api.users import main as users_main
from controller.sessions import Role

REPO = Path(__file__).resolve().parent.parent


def add_user(
    monkeypatch: pytest.MonkeyPatch, path: Path, name: str, role: str, password: str
) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    return users_main(["add", name, "--role", role, "--file", str(path), "--password-stdin"])


def test_users_command_writes_hashes_that_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users.toml"
    assert add_user(monkeypatch, path, "alice", "therapist", "s3cret-pass") == 0
    assert add_user(monkeypatch, path, "bob", "manager", "other-pass") == 0
    assert "s3cret-pass" not in path.read_text()
    store = UserStore.load(path)
    alice = store.verify("alice", "s3cret-pass")
    assert alice is not None and alice.role is Role.THERAPIST
    assert store.verify("alice", "other-pass") is None
    assert store.verify("nobody", "s3cret-pass") is None
    assert store.users["bob"].role is Role.MANAGER


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[users.a]\nrole = 'boss'\npassword_hash = '$argon2id$x'\n", "users.a.role"),
        ("[users.a]\nrole = 'therapist'\npassword_hash = 'plain'\n", "users.a.password_hash"),
        ("users = 3\n", "'users' must be a table"),
        ("[users\n", "not valid"),
    ],
)
def test_a_bad_users_file_is_refused_naming_the_key(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(UsersFileError, match=problem.replace("$", r"\$")):
        UserStore.load(path)


def test_tokens_expire() -> None:
    now = [100.0]
    tokens = TokenStore(lifetime_s=60, clock=lambda: now[0])
    user = UserStore.demo().users["therapist"]
    token, _ = tokens.issue(user)
    assert tokens.user(token) == user
    now[0] += 59.9
    assert tokens.user(token) == user
    now[0] += 0.2
    assert tokens.user(token) is None


def test_tokens_renew_within_their_maximum_age() -> None:
    now = [0.0]
    tokens = TokenStore(lifetime_s=60, max_age_s=150, clock=lambda: now[0])
    user = UserStore.demo().users["therapist"]
    token, lifetime = tokens.issue(user)
    assert lifetime == 60
    now[0] = 50.0
    assert tokens.renew(token) == pytest.approx(60)  # now valid until 110
    now[0] = 100.0
    assert tokens.user(token) == user
    assert tokens.renew(token) == pytest.approx(50)  # capped at 150 after sign-in
    now[0] = 150.0
    assert tokens.user(token) is None and tokens.renew(token) is None
    fresh, _ = tokens.issue(user)
    tokens.revoke(fresh)
    assert tokens.user(fresh) is None and tokens.renew(fresh) is None


def test_a_user_holds_a_bounded_number_of_tokens() -> None:
    tokens = TokenStore(per_user=2)
    user = UserStore.demo().users["therapist"]
    first, second, third = (tokens.issue(user)[0] for _ in range(3))
    assert tokens.user(first) is None
    assert tokens.user(second) == user and tokens.user(third) == user


def test_two_users_may_not_share_an_id(tmp_path: Path) -> None:
    hashed = UserStore.demo().users["therapist"].password_hash
    path = tmp_path / "users.toml"
    path.write_text(
        f'[users.alice]\nrole = "therapist"\nid = "t-1"\npassword_hash = "{hashed}"\n'
        f'[users.bob]\nrole = "therapist"\nid = "t-1"\npassword_hash = "{hashed}"\n'
    )
    with pytest.raises(UsersFileError, match=r"users.bob.id 't-1' is also alice's id"):
        UserStore.load(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_penctl_serve_serves_the_api_with_the_users_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "users.toml"
    assert add_user(monkeypatch, users, "carol", "therapist", "carol-pass") == 0
    port = _free_port()
    config = tmp_path / "controller.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[mqtt]\nenabled = false\n'
        f'[api]\nport = {port}\nusers_file = "{users}"\n'
    )
    serve = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penctl",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
    )
    assert serve.stdout is not None
    try:
        log = b""
        async with asyncio.timeout(20):
            while b"tablet API listening" not in log:
                line = await serve.stdout.readline()
                assert line, log.decode()
                log += line
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            r = await http.post("/api/login", json={"username": "carol", "password": "carol-pass"})
            assert r.status_code == 200 and r.json()["role"] == "therapist"
            # Not in demo mode: the demo users do not exist.
            r = await http.post(
                "/api/login", json={"username": "therapist", "password": "demo-therapist"}
            )
            assert r.status_code == 401
            page = await http.get("/")
            assert page.status_code == 200 and "Pen session" in page.text
        serve.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serve.wait(), 20) == 0
    finally:
        if serve.returncode is None:
            serve.kill()
            await serve.wait()


async def test_penctl_serve_refuses_a_taken_api_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "controller.toml"
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\n[mqtt]\nenabled = false\n[api]\nport = {port}\n'
        )
        serve = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "penctl",
            "serve",
            "--config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            out, _ = await asyncio.wait_for(serve.communicate(), 20)
        finally:
            if serve.returncode is None:
                serve.kill()
                await serve.wait()
        assert serve.returncode == 2
        assert b"cannot serve the API" in out
