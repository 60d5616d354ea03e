"""The API's edge (issue 15.4 HTTPS, 15.5 headers, 15.6 WebSockets; issue 12.3 limits).

Real uvicorn, real sockets: a 100 MB login is refused before its body is read,
slow and oversized requests are cut off, every response carries the security
headers, and the API serves HTTPS from a clinic certificate that a client
holding another CA refuses.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from controller.api.routers.page import STATIC
from controller.config import ConfigError, load_settings
from controller.tls import IssuedFiles, make_clinic_ca, make_server_certificate
from penctl.cli import main as penctl

from .api_rig import SecureApi, next_message, secure_api


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[SecureApi]:
    async with secure_api(tmp_path, request_timeout_s=1.0) as api:
        yield api


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _huge_post(host: str, port: int, size: int) -> tuple[bytes, float, int]:
    """POST /api/login declaring ``size`` bytes, sending them until the server answers.

    Returns the answer, seconds from the end of the headers to the answer, and how
    many body bytes the kernel took before the answer came.
    """
    sock = socket.create_connection((host, port))
    try:
        sock.sendall(
            b"POST /api/login HTTP/1.1\r\nHost: tablet\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {size}\r\n\r\n".encode()
        )
        started = time.perf_counter()
        chunk = b"x" * (1 << 20)
        sent = 0
        sock.setblocking(False)
        while sent < size:
            readable, writable, _ = select.select([sock], [sock], [], 5.0)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(chunk[: size - sent])
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    break
        answered = time.perf_counter() - started
        sock.setblocking(True)
        sock.settimeout(5.0)
        answer = b""
        try:
            while (data := sock.recv(65536)) and b"}" not in answer:
                answer += data
        except ConnectionResetError:
            pass  # the server closed with our unread body in its buffer
        return answer, answered, sent
    finally:
        sock.close()


async def test_a_100_mb_login_is_refused_before_it_is_read(api: SecureApi) -> None:
    auth = await api.login("therapist")
    sid = await api.open_session(auth)
    token = auth["Authorization"].removeprefix("Bearer ")
    async with connect(api.ws_url(sid, token)) as ws:
        await next_message(ws, {"type": "telemetry"})
        stamps: list[float] = []

        async def watch() -> None:
            while True:
                await next_message(ws, {"type": "telemetry"})
                stamps.append(time.monotonic())

        watcher = asyncio.create_task(watch())
        before = _rss_kib()
        answer, seconds, sent = await asyncio.to_thread(
            _huge_post, api.server.host, api.server.port, 100 * 1024 * 1024
        )
        grown = _rss_kib() - before
        await asyncio.sleep(0.5)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    gap = max(b - a for a, b in itertools.pairwise(stamps))
    # The live stream (10 Hz) went on: the body was never read (issue 12 measured 0.32 s).
    assert gap < 0.5, gap
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer
    assert seconds < 0.5 and grown < 20 * 1024, (seconds, grown)
    print(
        f"\n100 MB login: 413 after {seconds * 1000:.1f} ms; {sent / 1e6:.1f} MB accepted by "
        f"the kernel meanwhile; server RSS grew {grown} KiB; longest live-stream gap "
        f"{gap * 1000:.0f} ms"
    )
    # The API still answers.
    assert (await api.http.get("/api/me")).status_code == 401


def _raw(host: str, port: int, request: bytes, *, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``request`` and read until the server closes; the answer and how long it took."""
    sock = socket.create_connection((host, port))
    sock.settimeout(wait)
    started = time.perf_counter()
    chunks = []
    try:
        sock.sendall(request)
        while data := sock.recv(65536):
            chunks.append(data)
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        sock.close()
    return b"".join(chunks), time.perf_counter() - started


async def test_a_chunked_body_is_cut_off_at_the_limit(api: SecureApi) -> None:
    chunk = b"x" * 100_000
    request = (
        b"POST /api/login HTTP/1.1\r\nHost: tablet\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n0\r\n\r\n"
    )
    answer, _ = await asyncio.to_thread(_raw, api.server.host, api.server.port, request)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


async def test_slow_clients_are_cut_off(api: SecureApi) -> None:
    host, port = api.server.host, api.server.port
    # Headers that never end (a slow-loris): the connection is closed.
    head = b"POST /api/login HTTP/1.1\r\nHost: tablet\r\nX-Slow: 1\r\n"
    answer, seconds = await asyncio.to_thread(_raw, host, port, head)
    assert answer == b"" and 0.9 < seconds < 2.0, (answer, seconds)
    # A body that never arrives: 408.
    body = b'{"username": "'
    request = (
        b"POST /api/login HTTP/1.1\r\nHost: tablet\r\nContent-Type: application/json\r\n"
        + b"Content-Length: 60\r\n\r\n"
        + body
    )
    answer, seconds = await asyncio.to_thread(_raw, host, port, request)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer and seconds < 2.0
    # Headers beyond the limit (8 KiB): refused, the connection closed.
    big = b"GET /api/me HTTP/1.1\r\nHost: tablet\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    answer, _ = await asyncio.to_thread(_raw, host, port, big)
    assert re.match(rb"HTTP/1.1 (400|431)", answer), answer[:200]
    # ...and one that arrives whole as well.
    assert (await api.http.get("/api/me", headers={"X-Big": "a" * 9000})).status_code == 431


async def test_websocket_messages_are_small(api: SecureApi) -> None:
    auth = await api.login("therapist")
    sid = await api.open_session(auth)
    async with connect(api.ws_url(sid), max_size=None) as ws:
        await ws.send("x" * 100_000)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 2.0)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_every_response_carries_the_security_headers(api: SecureApi) -> None:
    auth = await api.login("therapist")
    for path, headers in (("/", {}), ("/api/sessions", auth), ("/api/nowhere", {})):
        r = await api.http.get(path, headers=headers)
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        if path.startswith("/api/"):
            assert r.headers["cache-control"] == "no-store", path
    # The page has no inline script for that policy to break.
    page = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page)
    assert not re.search(r"\son[a-z]+\s*=", page)
    # No documentation page from a CDN unless it is asked for.
    assert (await api.http.get("/docs")).status_code == 404
    assert (await api.http.get("/openapi.json")).status_code == 200


# --- HTTPS --------------------------------------------------------------------------------


def _clinic(tmp_path: Path, name: str) -> IssuedFiles:
    directory = tmp_path / name
    assert penctl(["tls", "ca", "--dir", str(directory), "--clinic", name]) == 0
    assert penctl(["tls", "server", "--dir", str(directory), "--name", "127.0.0.1"]) == 0
    return IssuedFiles(directory / "server.crt", directory / "server.key")


async def test_the_api_serves_https_from_the_clinic_certificate(tmp_path: Path) -> None:
    ours = _clinic(tmp_path, "ours")
    theirs = _clinic(tmp_path, "theirs")
    async with secure_api(tmp_path, tls_certfile=ours.cert, tls_keyfile=ours.key) as api:
        assert api.server.url.startswith("https://")
        auth = await api.login("therapist")  # verified against ours/ca.crt
        r = await api.http.get("/api/me", headers=auth)
        assert r.status_code == 200 and "max-age" in r.headers["strict-transport-security"]
        sid = await api.open_session(auth)
        token = auth["Authorization"].removeprefix("Bearer ")
        context = ssl.create_default_context(cafile=str(tmp_path / "ours" / "ca.crt"))
        async with connect(api.ws_url(sid, token), ssl=context) as ws:
            await next_message(ws, {"type": "hello"})
        # A client that trusts another clinic's CA refuses this server.
        wrong = ssl.create_default_context(cafile=str(tmp_path / "theirs" / "ca.crt"))
        async with httpx.AsyncClient(verify=wrong) as other:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await other.get(f"{api.server.url}/api/me")
        # Plain HTTP to the HTTPS port gets nothing useful.
        plain = f"http://{api.server.host}:{api.server.port}/api/me"
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(plain)
    assert theirs.cert.exists()


def test_tls_settings_are_checked_at_start(tmp_path: Path) -> None:
    ours = _clinic(tmp_path, "ours")
    theirs = _clinic(tmp_path, "theirs")
    with pytest.raises(ConfigError, match="tls_keyfile is missing"):
        load_settings(None, api={"tls_certfile": str(ours.cert)})
    with pytest.raises(ConfigError, match=r"api: .*cannot use TLS certificate .*server.crt"):
        load_settings(None, api={"tls_certfile": str(ours.cert), "tls_keyfile": str(theirs.key)})
    with pytest.raises(ConfigError, match=r"the TLS certificate file .*nope.crt does not exist"):
        load_settings(
            None, api={"tls_certfile": str(tmp_path / "nope.crt"), "tls_keyfile": str(ours.key)}
        )
    assert load_settings(None, api={"tls_certfile": str(ours.cert), "tls_keyfile": str(ours.key)})
    assert oct(ours.key.stat().st_mode & 0o777) == "0o600"
    assert penctl(["tls", "ca", "--dir", str(tmp_path / "ours"), "--clinic", "x"]) == 2


def test_a_server_certificate_names_what_it_is_for(tmp_path: Path) -> None:
    ca = make_clinic_ca(tmp_path, "clinic-0001")
    files = make_server_certificate(ca, ["controller.local", "192.168.1.20"], tmp_path)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == ["controller.local"]
    assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == ["192.168.1.20"]
