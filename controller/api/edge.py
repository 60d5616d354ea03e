"""The API's edge: who the client is, how much it may send, how long it may take, what it gets back.

One pure ASGI middleware (:class:`EdgeMiddleware`), outermost, so nothing else
runs for a request it refuses:

* **Client address.** ``X-Forwarded-For`` is believed only from a configured
  proxy (``api.trusted_proxies``; default none): the client is the right-most
  address that is not a trusted proxy. The result replaces ``scope["client"]``,
  so the sign-in limiter and the audit log see the same address.
* **Body size.** A declared ``Content-Length`` above ``api.max_body_bytes`` is
  answered 413 before a byte of the body is read; a chunked body is counted
  as it arrives and refused the moment it passes the limit.
* **Header size.** At most ``api.max_header_bytes`` of header names and values
  (431); uvicorn bounds a head that arrives in pieces.
* **Slow clients.** The body must arrive within ``api.request_timeout_s`` of
  the request's start (408). Headers are bounded by uvicorn
  (``h11_max_incomplete_event_size``) and idle connections by its keep-alive
  timeout (``controller/api/server.py``).
* **Headers.** Every response carries a Content-Security-Policy without
  inline script, ``frame-ancestors 'none'`` and ``X-Frame-Options: DENY``,
  ``nosniff``, ``Referrer-Policy: no-referrer``; every ``/api/`` response is
  ``Cache-Control: no-store`` (sessions and reports carry client codes); over
  HTTPS, ``Strict-Transport-Security``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The page loads its own script and style files only; the API answers JSON.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_COMMON_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
#: /docs only, and only when api.docs_enabled: FastAPI's Swagger UI page is an inline
#: script that loads its files from a CDN.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_DOCS_HEADERS = [(b"content-security-policy", DOCS_CSP.encode()), *_COMMON_HEADERS[1:]]
_NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
_HSTS = [(b"strict-transport-security", b"max-age=31536000")]


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[IPNetwork]) -> str:
    """The client's address: ``peer``, unless ``peer`` is a trusted proxy that forwarded it.

    Walks ``X-Forwarded-For`` from the right (the entries nearest to us, written by
    proxies we trust) and answers the first address no trusted proxy owns. An
    address a client wrote itself (the left end) is never believed past that point.
    """
    if not trusted or forwarded_for is None or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop if _is_ip(hop) else peer
    return hops[0] if hops and _is_ip(hops[0]) else peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


class _TooLargeError(Exception):
    pass


class _TooSlowError(Exception):
    pass


class _GoneError(Exception):
    """The client disconnected before its request was complete."""


def _problem(status: int, code: str, message: str, remediation: str) -> bytes:
    return json.dumps({"code": code, "message": message, "remediation": remediation}).encode()


class EdgeMiddleware:
    """See the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int = 64 * 1024,
        request_timeout_s: float = 10.0,
        trusted_proxies: Sequence[IPNetwork] = (),
        docs: bool = False,
        max_header_bytes: int = 8 * 1024,
    ) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.docs = docs
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.trusted_proxies = list(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        scope = self._with_client(scope)
        raw_headers = scope.get("headers") or []
        # h11 bounds only a head that arrives in pieces; one that arrives whole is
        # counted here (names and values, as a proxy would).
        if sum(len(k) + len(v) for k, v in raw_headers) > self.max_header_bytes:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1009})
                return
            await self._respond(
                send,
                431,
                _problem(
                    431,
                    "headers_too_large",
                    f"The request headers are larger than this API accepts "
                    f"({self.max_header_bytes} bytes).",
                    "Sign in again (a fresh token is small) and send fewer headers.",
                ),
            )
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        headers = dict(raw_headers)
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body_bytes
            except ValueError:
                too_big = False  # h11 refuses a malformed length before we get here
            if too_big:
                await self._refuse_too_large(send)
                return
        path = scope["path"]
        if self.docs and path == "/docs":
            extra = list(_DOCS_HEADERS)
        else:
            extra = _COMMON_HEADERS + (_NO_STORE if path.startswith("/api/") else [])
        if scope.get("scheme") == "https":
            extra = extra + _HSTS
        # Read the whole body here, bounded in size and time, before the app runs: a
        # refusal is then always a clean 413/408, and the app never waits on a client.
        try:
            body = await self._read_body(receive)
        except _TooLargeError:
            await self._refuse_too_large(send)
            return
        except _GoneError:
            return
        except _TooSlowError:
            await self._respond(
                send,
                408,
                _problem(
                    408,
                    "request_timeout",
                    "The request took too long to arrive.",
                    "Check the network connection and send it again.",
                ),
            )
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only http.disconnect from here on

        async def secured_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, replay, secured_send)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.request_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        raise _GoneError
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise _TooLargeError
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError as exc:
            raise _TooSlowError from exc
        return b"".join(chunks)

    def _with_client(self, scope: Scope) -> Scope:
        client = scope.get("client")
        if not self.trusted_proxies or not client:
            return scope
        forwarded = None
        for name, value in scope.get("headers") or []:
            if name == b"x-forwarded-for":
                forwarded = value.decode("latin-1")
        address = client_address(client[0], forwarded, self.trusted_proxies)
        if address == client[0]:
            return scope
        return {**scope, "client": (address, 0)}

    async def _refuse_too_large(self, send: Send) -> None:
        await self._respond(
            send,
            413,
            _problem(
                413,
                "request_too_large",
                f"The request body is larger than this API accepts ({self.max_body_bytes} bytes).",
                "Send a smaller request; no API call needs more.",
            ),
        )

    @staticmethod
    async def _respond(send: Send, status: int, body: bytes) -> None:
        headers: list[Any] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # The rest of the body is not read: the connection cannot be reused.
            (b"connection", b"close"),
            *_COMMON_HEADERS,
            *_NO_STORE,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
