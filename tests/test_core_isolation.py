"""The safety core shares nothing: a flooded, then killed, edge process moves nothing at
the pens (issue 12).

The core runs here with its pens; its edge (tablet API) runs as under ``penctl serve``,
a process the core supervises; a hostile client floods that API from a third process.
Meanwhile a pass is under way on an armed pen. The pen must see every lease renewed,
stay armed and keep running, the core must receive its samples without a gap over
150 ms; the killed edge comes back and sees the same session.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from controller.edge.supervisor import EdgeSupervisor
from controller.sessions import EventKind
from devtools.stack.processes import free_port, wait_for_port

from .controller_rig import eventually, start_rig, stop_rig

FLOOD_S = 4.0
#: Issue 12: no telemetry gap over 150 ms while the API is flooded.
MAX_GAP_S = 0.150
CONCERNING = {EventKind.DISARMED, EventKind.STOP_SENT, EventKind.FAULT, EventKind.PASS_ENDED}


async def test_a_flooded_then_killed_edge_moves_nothing_at_the_pens(tmp_path: Path) -> None:
    port = free_port()
    # The flood guesses the therapist's password from this address: the source-wide
    # limit would lock the manager out too, and the manager checks the session after.
    api = {"port": port, "demo_users": True, "login_failures_per_source_per_minute": 10_000}
    rig, collector = await start_rig(tmp_path, api=api)
    service = rig.service
    edge = EdgeSupervisor(service.settings, service.socket_path)
    try:
        sid = await rig.start_treating("cheeks", 1000)
        await edge.start()
        await wait_for_port("127.0.0.1", port, within=30)
        rig.physical(0, lambda p, now: p.set_contact(True, now))
        rig.physical(0, lambda p, now: p.press_button(now))
        await rig.wait_event(EventKind.PASS_STARTED)
        mark = len(rig.events)
        expiries = rig.pen().firmware.lease_expiries
        # Every sample the core receives, timed where it arrives (the core's own clock).
        arrivals: list[float] = []
        fanout_telemetry = service.fanout.telemetry

        def record(tags: Any, message: Any, now: float) -> None:
            arrivals.append(now)
            fanout_telemetry(tags, message, now)

        service.fanout.telemetry = record  # type: ignore[method-assign]
        flood = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "devtools.bench.api_flood",
            "--url",
            f"http://127.0.0.1:{port}",
            "--seconds",
            str(FLOOD_S),
            stdout=asyncio.subprocess.PIPE,
        )
        assert flood.stdout is not None
        line = await asyncio.wait_for(flood.stdout.readline(), 30)
        assert line == b"flood swinging\n", line  # answers are flowing
        assert edge.process is not None
        edge.process.kill()  # and the edge dies under it
        await eventually(lambda: edge.counters.starts == 2, within=10, what="edge restarted")
        out, _ = await asyncio.wait_for(flood.communicate(), 30)
        summary = json.loads(out.decode().split("flood ", 1)[1])

        # The pen noticed nothing: every lease renewed in time, still armed and running,
        # and the controller decided nothing about it meanwhile.
        since = [(e.kind, e.detail) for e in rig.events[mark:]]
        assert [k for k, _ in since if k in CONCERNING] == [], since
        assert rig.pen().firmware.lease_expiries == expiries
        assert rig.pen().armed and rig.pen().running
        # And the monitor never went blind: no gap between samples over 150 ms.
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert len(arrivals) > 100 and max(gaps) < MAX_GAP_S, f"longest gap {max(gaps):.3f} s"
        # Not a vacuous flood: the API answered, refused and throttled throughout.
        by_status = summary["by_status"]
        refused_big = by_status.get("413", 0) + by_status.get("big_body_cut_off", 0)
        assert by_status.get("200", 0) > 0 and refused_big > 0, summary

        # The new edge serves the same session (the therapist's password is throttled now).
        await wait_for_port("127.0.0.1", port, within=30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            r = await http.post(
                "/api/login", json={"username": "manager", "password": "demo-manager"}
            )
            assert r.status_code == 200, r.text
            auth = {"Authorization": f"Bearer {r.json()['token']}"}
            r = await http.get(f"/api/sessions/{sid}", headers=auth)
            assert r.status_code == 200 and r.json()["state"] == "active", r.text
        assert service.core_channel is not None and service.core_channel.counters.connects == 2
    finally:
        rig.physical(0, lambda p, now: p.release_button(now))
        await edge.stop()
        await stop_rig(rig, collector)
