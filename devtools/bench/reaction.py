"""Safety reaction: breaching telemetry frame to Stop at the pen, while many pens stream.

Measured through real pseudo-terminals with the pens in their own process (see
devtools.bench.fleet): the clock starts just before a pen writes a telemetry
frame whose measured depth is past the setpoint, and stops when that pen reads
the controller's Stop. The figure therefore includes both pty crossings.
"""

from __future__ import annotations

import asyncio

from .fleet import run_fleet
from .framework import BenchContext, Row

DESCRIPTION = "safety reaction: breaching frame written by the pen to Stop read by the pen"
PENS = 32
BREACHERS = 4
TARGET_P99_MS = 2.0


def run(ctx: BenchContext) -> list[Row]:
    seconds = 8.0 if ctx.quick else 30.0
    with ctx.progress.task(f"reaction, {PENS} pens streaming", 1) as advance:
        result = asyncio.run(run_fleet(PENS, BREACHERS, seconds))
        advance(1)
    common = {
        "pens": PENS,
        "samples": len(result.reactions),
        "seconds": round(result.seconds, 1),
        "telemetry_frames": result.telemetry_received,
        "loop_lag_max_ms": round(result.loop_lag_max * 1000, 2),
    }
    ms = 1000.0
    return [
        Row("reaction p50", round(result.percentile(0.50) * ms, 3), "ms", dict(common)),
        Row(
            "reaction p99",
            round(result.percentile(0.99) * ms, 3),
            "ms",
            {**common, "target": TARGET_P99_MS, "higher_is_better": False},
        ),
        Row(
            "reaction max",
            round(max(result.reactions, default=float("nan")) * ms, 3),
            "ms",
            dict(common),
        ),
        Row(
            "telemetry frames lost",
            result.telemetry_lost,
            "frames",
            {**common, "target": 0, "higher_is_better": False},
        ),
    ]
