"""Capacity: how many pens at 100 Hz one controller process carries.

Steps up the number of pens; at each step every pen streams telemetry at 100 Hz
and a few breach (see devtools.bench.fleet). A step passes with zero telemetry
frames lost and a reaction p99 under 5 ms. The figure is the largest passing step.
"""

from __future__ import annotations

import asyncio

from .fleet import run_fleet
from .framework import BenchContext, Row

DESCRIPTION = "capacity: pens at 100 Hz with zero frame loss and reaction p99 < 5 ms"
STEPS = (16, 32, 64, 96, 128, 192, 256)
QUICK_STEPS = (32, 64)
BREACHERS = 4
P99_LIMIT_MS = 5.0
TARGET_PENS = 64


def run(ctx: BenchContext) -> list[Row]:
    steps = QUICK_STEPS if ctx.quick else STEPS
    seconds = 6.0 if ctx.quick else 15.0
    rows: list[Row] = []
    best = 0
    with ctx.progress.task("capacity steps", len(steps)) as advance:
        for pens in steps:
            result = asyncio.run(run_fleet(pens, BREACHERS, seconds))
            advance(1)
            p99 = result.percentile(0.99) * 1000
            ok = result.telemetry_lost == 0 and p99 < P99_LIMIT_MS and len(result.reactions) > 0
            rows.append(
                Row(
                    f"{pens} pens: reaction p99",
                    round(p99, 3),
                    "ms",
                    {
                        "pens": pens,
                        "lost": result.telemetry_lost,
                        "frames": result.telemetry_received,
                        "reactions": len(result.reactions),
                        "loop_lag_max_ms": round(result.loop_lag_max * 1000, 2),
                        "passes": ok,
                    },
                )
            )
            if not ok:
                break
            best = pens
    rows.append(
        Row("pens sustained", best, "pens", {"target": TARGET_PENS, "higher_is_better": True})
    )
    return rows
