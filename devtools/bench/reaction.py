"""Safety reaction: breaching telemetry frame to Stop at the pen, while many pens stream.

Measured through real pseudo-terminals with the pens in their own process (see
devtools.bench.fleet): the clock starts just before a pen writes a telemetry
frame whose measured depth is past the setpoint, and stops when that pen reads
the controller's Stop. The figure therefore includes both pty crossings.

Three conditions, one row set each (issue 12's contract): quiet; a slow disk
(every journal commit ``SLOW_DISK_S`` late); and a hostile client flooding the
tablet API of the edge process the core supervises, as under ``penctl serve``.
Nothing but pens runs on the core's loop, so the last two should read like the
first; what they share is the machine's two cores.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from .fleet import FLOOD_NICENESS, FleetResult, run_fleet
from .framework import BenchContext, Row

DESCRIPTION = "safety reaction: breaching frame written by the pen to Stop read by the pen"
PENS = 32
BREACHERS = 4
#: Issue 12: quiet p99 at most 1 ms; with a slow disk or a flooded API at most 2 ms.
TARGET_P99_MS = 1.0
TARGET_ADVERSE_P99_MS = 2.0
SLOW_DISK_S = 0.2
#: The core on a CPU of its own (its ``core_cpus`` setting, as README's deployment
#: section recommends); the pen farm, the edge and the flood on the other.
CORE_CPUS = [0] if len(os.sched_getaffinity(0)) >= 2 else []


def run(ctx: BenchContext) -> list[Row]:
    seconds = 8.0 if ctx.quick else 30.0
    ms = 1000.0
    rows: list[Row] = []
    with ctx.progress.task(f"reaction, {PENS} pens streaming", 3) as advance:
        quiet = asyncio.run(run_fleet(PENS, BREACHERS, seconds, core_cpus=CORE_CPUS))
        advance(1)
        common = _common(quiet)
        rows += [
            Row("reaction p50", round(quiet.percentile(0.50) * ms, 3), "ms", dict(common)),
            _p99("reaction p99", quiet, common),
            Row(
                "reaction max",
                round(max(quiet.reactions, default=float("nan")) * ms, 3),
                "ms",
                dict(common),
            ),
            Row(
                "telemetry frames lost",
                quiet.telemetry_lost,
                "frames",
                {**common, "target": 0, "higher_is_better": False},
            ),
        ]
        slow = asyncio.run(
            run_fleet(PENS, BREACHERS, seconds, slow_disk_s=SLOW_DISK_S, core_cpus=CORE_CPUS)
        )
        advance(1)
        rows.append(
            _p99(
                "reaction p99 (slow disk)",
                slow,
                {**_common(slow), "commit_delay_s": SLOW_DISK_S},
                TARGET_ADVERSE_P99_MS,
            )
        )
        flooded = asyncio.run(run_fleet(PENS, BREACHERS, seconds, flood=True, core_cpus=CORE_CPUS))
        advance(1)
        flood = {
            **_common(flooded),
            "flood_requests": flooded.flood.get("requests"),
            # Small requests answered per second (offered: up to 500/s); the edge is
            # CPU-bound beside the pens on the other CPU well before that.
            "flood_requests_per_s": flooded.flood.get("requests_per_s"),
            "flood_big_bodies": flooded.flood.get("big_bodies"),
            "flood_niceness": FLOOD_NICENESS,
            "flood_by_status": flooded.flood.get("by_status"),
        }
        rows += [
            _p99("reaction p99 (API flood)", flooded, flood, TARGET_ADVERSE_P99_MS),
            Row(
                "lease expiries (API flood)",
                flooded.lease_expiries,
                "leases",
                {**flood, "target": 0, "higher_is_better": False},
            ),
        ]
    return rows


def _common(result: FleetResult) -> dict[str, Any]:
    return {
        "pens": PENS,
        "core_cpus": CORE_CPUS,
        "pens_priority": result.farm_priority,
        "samples": len(result.reactions),
        "seconds": round(result.seconds, 1),
        "telemetry_frames": result.telemetry_received,
        "telemetry_lost": result.telemetry_lost,
        "lease_expiries": result.lease_expiries,
        "loop_lag_max_ms": round(result.loop_lag_max * 1000, 2),
    }


def _p99(
    name: str, result: FleetResult, extra: dict[str, Any], target: float = TARGET_P99_MS
) -> Row:
    value = round(result.percentile(0.99) * 1000.0, 3)
    return Row(name, value, "ms", {**extra, "target": target, "higher_is_better": False})
