"""InfluxDB through its v1 HTTP API: the one module that talks to the database.

``/write`` takes line protocol and ``/query`` takes InfluxQL. InfluxDB 1.x serves
them natively, 2.x through a DBRP mapping and 3.x through its v1 compatibility
layer, so this client works against all three. Authentication: user and password
for 1.x, a token (``Authorization: Token ...``) for 2.x and 3.x.

Errors are split by what the caller should do about them:
``InfluxUnavailable`` (connection refused, timeout, 5xx): back off and retry, the
data is fine; ``InfluxRejected`` (4xx on a write): the data itself is bad, retrying
cannot help; ``InfluxQueryError``: ``/query`` answers 200 with the error inside
the JSON body, so a status check alone would miss it.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx


class InfluxError(RuntimeError):
    pass


class InfluxUnavailable(InfluxError):  # noqa: N818 - a condition, not a bug
    """The server cannot be reached or failed; retry later."""


class InfluxRejected(InfluxError):  # noqa: N818
    """The server refused the data (4xx); retrying the same data will fail again.

    ``status`` is the HTTP status and ``detail`` InfluxDB's error text, so callers
    decide on them (401/403: credentials; 404 "database not found") without
    parsing the message.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"InfluxDB refused the write ({status}): {detail}")
        self.status = status
        self.detail = detail


class InfluxQueryError(InfluxError):
    """The query ran and failed (syntax, unknown database...)."""


@dataclass(frozen=True)
class InfluxSettings:
    url: str = "http://127.0.0.1:8086"
    database: str = "pen"
    username: str | None = None
    password: str | None = None
    token: str | None = None
    retention_policy: str | None = None
    timeout: float = 10.0
    #: How to verify an https:// server: an SSLContext (controller.tls.settings_context)
    #: or True for the system's CAs.
    verify: ssl.SSLContext | bool = True


class InfluxClient:
    """A small async client for the v1 API. Use as an async context manager."""

    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings
        headers = {"Authorization": f"Token {settings.token}"} if settings.token else {}
        auth = (
            (settings.username, settings.password or "")
            if settings.username and not settings.token
            else None
        )
        self._http = httpx.AsyncClient(
            base_url=settings.url.rstrip("/"),
            headers=headers,
            auth=auth,
            timeout=settings.timeout,
            verify=settings.verify,
        )

    async def __aenter__(self) -> InfluxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ping(self) -> bool:
        try:
            resp = await self._http.get("/ping")
        except httpx.HTTPError:
            return False
        return resp.status_code == 204

    async def create_database(self) -> None:
        """Create the database if it does not exist (idempotent in InfluxQL)."""
        await self.query(f'CREATE DATABASE "{_ident(self.settings.database)}"', method="POST")

    async def write(self, lines: Iterable[str] | str, precision: str = "ns") -> int:
        """Write line-protocol lines; returns how many. Same timestamps overwrite."""
        body = lines if isinstance(lines, str) else "\n".join(lines)
        if not body:
            return 0
        params = {"db": self.settings.database, "precision": precision}
        if self.settings.retention_policy:
            params["rp"] = self.settings.retention_policy
        try:
            resp = await self._http.post("/write", params=params, content=body.encode())
        except httpx.HTTPError as exc:
            raise InfluxUnavailable(f"write to {self.settings.url} failed: {exc!r}") from exc
        if resp.status_code == 204:
            return body.count("\n") + 1
        detail = _error_text(resp)
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            raise InfluxUnavailable(f"InfluxDB answered {resp.status_code}: {detail}")
        raise InfluxRejected(resp.status_code, detail)

    async def query(
        self, q: str, *, epoch: str | None = "ns", method: str = "GET"
    ) -> list[dict[str, Any]]:
        """Run InfluxQL; returns the series of the first statement (may be empty)."""
        params: dict[str, str] = {"q": q, "db": self.settings.database}
        if epoch:
            params["epoch"] = epoch
        try:
            if method == "POST":
                resp = await self._http.post("/query", data=params)
            else:
                resp = await self._http.get("/query", params=params)
        except httpx.HTTPError as exc:
            raise InfluxUnavailable(f"query to {self.settings.url} failed: {exc!r}") from exc
        if resp.status_code >= 500:
            raise InfluxUnavailable(f"InfluxDB answered {resp.status_code}: {_error_text(resp)}")
        try:
            payload = resp.json()
        except ValueError as exc:
            raise InfluxQueryError(f"not JSON ({resp.status_code}): {resp.text[:200]}") from exc
        if "error" in payload:
            raise InfluxQueryError(str(payload["error"]))
        results = payload.get("results") or [{}]
        first = results[0]
        if "error" in first:
            raise InfluxQueryError(str(first["error"]))
        series: list[dict[str, Any]] = first.get("series", [])
        return series

    async def count(self, measurement: str, field: str, where: str = "") -> int:
        """COUNT(field) over all time: how many points a measurement holds."""
        clause = f" WHERE {where}" if where else ""
        series = await self.query(f'SELECT COUNT("{field}") FROM "{measurement}"{clause}')
        return int(series[0]["values"][0][1]) if series else 0


def _error_text(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))
    except ValueError:
        return resp.text[:200]


def _ident(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', '\\"')


# --- line protocol ---------------------------------------------------------------

_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ "})

FieldValue = int | float | bool | str


def format_line(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, FieldValue],
    timestamp_ns: int,
) -> str:
    """One line of line protocol. Integers get the ``i`` suffix; tags are sorted.

    Raises ValueError on an empty field set or a non-finite float, which InfluxDB
    would reject anyway, so that a bad point is caught where it is made.
    """
    if not fields:
        raise ValueError(f"{measurement}: a point needs at least one field")
    tag_part = "".join(
        f",{k.translate(_TAG_ESCAPES)}={v.translate(_TAG_ESCAPES)}"
        for k, v in sorted(tags.items())
        if v != ""
    )
    field_parts = []
    for key, value in fields.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = f"{value}i"
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{measurement}.{key}: {value} is not a finite number")
            text = repr(value)
        else:
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        field_parts.append(f"{key.translate(_TAG_ESCAPES)}={text}")
    return (
        f"{measurement.translate(_MEASUREMENT_ESCAPES)}{tag_part} "
        f"{','.join(field_parts)} {timestamp_ns}"
    )
