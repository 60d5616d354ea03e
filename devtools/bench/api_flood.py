"""A hostile tablet client in a process of its own, for the isolation benchmarks and tests.

    python -m devtools.bench.api_flood --url http://127.0.0.1:8080 --seconds 10

For ``--seconds`` it sends ``--rate`` requests/s (issue 12: 500) over
``--connections`` connections to the tablet API, round-robin over what a
misbehaving or malicious client sends: signed-in reads (answered by the edge
alone), wrong passwords (each recorded by the core, until the sign-in limiter
answers 429 at the edge), actions on sessions that do not exist (asked of the
core), 100 MB bodies, declared and chunked (413 at the edge), and WebSocket
upgrades that never authenticate; a 401 (an edge restarted) makes it sign in
again. It prints ``flood swinging`` once answers flow, then ``flood JSON``:
requests sent and answers by status. Signs in as the demo therapist
(``api.demo_users``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from websockets.asyncio.client import connect

Request = Callable[[httpx.AsyncClient, dict[str, str]], Awaitable[httpx.Response]]
#: What issue 12 measures with: a 100 MB body, sent for real, as fast as the edge takes it.
BIG_BODY_BYTES = 100 * 1024 * 1024
_CHUNK = b"x" * (1024 * 1024)
BIG_BODY_REQUESTS = frozenset({"declared", "chunked"})


async def _big_body() -> AsyncIterator[bytes]:
    for _ in range(BIG_BODY_BYTES // len(_CHUNK)):
        yield _CHUNK


def _requests() -> list[Request]:
    def devices(http: httpx.AsyncClient, auth: dict[str, str]) -> Awaitable[httpx.Response]:
        return http.get("/api/devices", headers=auth)

    def sessions(http: httpx.AsyncClient, auth: dict[str, str]) -> Awaitable[httpx.Response]:
        return http.get("/api/sessions", headers=auth)

    def guess(http: httpx.AsyncClient, auth: dict[str, str]) -> Awaitable[httpx.Response]:
        return http.post("/api/login", json={"username": "therapist", "password": "guess"})

    def arm_nothing(http: httpx.AsyncClient, auth: dict[str, str]) -> Awaitable[httpx.Response]:
        return http.post("/api/sessions/s-000000000000/stop", headers=auth)

    def declared(http: httpx.AsyncClient, auth: dict[str, str]) -> Awaitable[httpx.Response]:
        # 100 MB announced in Content-Length: refused before a byte of it is read.
        head = {"Content-Length": str(BIG_BODY_BYTES), "Content-Type": "application/json"}
        return http.post("/api/login", headers=head, content=_big_body())

    def chunked(http: httpx.AsyncClient, auth: dict[str, str]) -> Awaitable[httpx.Response]:
        # 100 MB with no length: the edge counts what arrives and cuts it off.
        return http.post("/api/sessions", headers=auth, content=_big_body())

    return [devices, sessions, devices, guess, arm_nothing, devices, declared, chunked]


async def _sign_in(http: httpx.AsyncClient) -> dict[str, str]:
    r = await http.post("/api/login", json={"username": "therapist", "password": "demo-therapist"})
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['token']}"}


async def _silent_sockets(url: str, statuses: Counter[str], stop: asyncio.Event) -> None:
    """WebSocket upgrades that never send a token: the edge must close them itself."""
    ws_url = url.replace("http", "ws", 1) + "/api/sessions/s-000000000000/live"
    while not stop.is_set():
        try:
            async with connect(ws_url, open_timeout=2) as ws:
                with contextlib.suppress(Exception):
                    await ws.recv()
            statuses["ws_closed_by_edge"] += 1
        except Exception:  # refused or reset: the edge is defending itself
            statuses["ws_refused"] += 1


#: Answers after which the flood announces it is in full swing (``flood swinging``).
SWINGING_AFTER = 20


async def flood(url: str, seconds: float, connections: int, rate: float) -> dict[str, object]:
    """Flood ``url`` for ``seconds`` at up to ``rate`` requests/s (0: as fast as it
    answers); what was sent and how it was answered."""
    statuses: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=5.0, limits=limits) as http:
        auth = await _sign_in(http)
        signing_in = asyncio.Lock()
        kinds = itertools.cycle(_requests())
        stop = asyncio.Event()
        deadline = time.monotonic() + seconds
        next_slot = time.monotonic()
        answered = 0

        async def paced() -> None:
            nonlocal next_slot
            if rate > 0:
                slot = max(time.monotonic(), next_slot)
                next_slot = slot + 1.0 / rate
                await asyncio.sleep(slot - time.monotonic())

        async def sign_in_again(token: str) -> None:
            # A restarted edge forgot every token: sign in again, once for all workers.
            async with signing_in:
                if auth["Authorization"] == token:
                    with contextlib.suppress(httpx.HTTPError):
                        auth.update(await _sign_in(http))

        async def worker() -> None:
            nonlocal answered
            while time.monotonic() < deadline:
                await paced()
                request = next(kinds)
                token = auth["Authorization"]
                try:
                    response = await request(http, auth)
                    statuses[str(response.status_code)] += 1
                    if response.status_code == 401 and request.__name__ != "guess":
                        await sign_in_again(token)
                except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                    # The edge answered 413 and closed while we were still writing: the
                    # reset usually swallows the answer. A refusal all the same.
                    big = request.__name__ in BIG_BODY_REQUESTS
                    statuses["big_body_cut_off" if big else "connection_lost"] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    await asyncio.sleep(0.01)  # the edge is away: knock again soon
                answered += 1
                if answered == SWINGING_AFTER:
                    print("flood swinging", flush=True)

        sockets = [asyncio.create_task(_silent_sockets(url, statuses, stop)) for _ in range(4)]
        await asyncio.gather(*(worker() for _ in range(connections)))
        stop.set()
        for task in sockets:
            task.cancel()
        await asyncio.gather(*sockets, return_exceptions=True)
    sent = sum(n for k, n in statuses.items() if k.isdigit())
    return {
        "seconds": seconds,
        "requests": sent,
        "requests_per_s": round(sent / seconds, 1),
        "by_status": dict(sorted(statuses.items())),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m devtools.bench.api_flood", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rate", type=float, default=500.0, help="requests/s; 0: unpaced")
    p.add_argument("--nice", type=int, default=0, help="run at this niceness")
    args = p.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    summary = asyncio.run(flood(args.url, args.seconds, args.connections, args.rate))
    print("flood " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
