"""Simulated pens in their own process, for the reaction and capacity benchmarks.

    python -m devtools.bench.pen_farm --pens 32 --breachers 8 --duration 30

Boots N pens on pseudo-terminals (each streaming telemetry at 100 Hz), prints
``pen SERIAL PATH`` for each, then ``ready``. The first ``--breachers`` pens, once
the controller has armed them and their automatic hand runs a pass, send one
crafted telemetry frame whose measured depth is far past the setpoint, noting the
time just before it is written. When the controller's Stop arrives, the pen notes
that time too and prints ``reaction SERIAL SECONDS``. Both times are read from
the same clock, in this process: the figure is the whole loop breaching frame
written, read by the controller, Stop decided, Stop written, Stop read by the pen.

At the end (``--duration``, or on SIGTERM) it prints ``summary JSON`` with what
every pen sent and how its link fared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import time
from typing import Any

from firmware_protocol.messages import Message, Stop, Telemetry
from simulated_pen.device import SimulatedPen
from simulated_pen.hand import HandConfig
from simulated_pen.runner import PenRunner

BREACH_EXTRA_UM = 400
#: A pass runs this long before its breach, so the controller has finished with
#: its start (journal, events): the figure is the reaction under streaming load.
SETTLE_S = 0.1
#: A pen left disarmed this long is between clients: it gets a new cartridge. A slow
#: disk makes the controller's re-arming slower than this (``--idle-swap``).
IDLE_SWAP_S = 0.3
GAP_S = 0.05
#: Fast passes so that a breaching pen measures often.
FAST_HAND = HandConfig(
    pause=(0.05, 0.15), approach=(0.02, 0.04), hold=(0.3, 0.6), reaction=(0.05, 0.1)
)


class Breacher:
    """Sends a breaching frame during each pass and times the Stop that answers it."""

    def __init__(self, runner: PenRunner, pen: SimulatedPen, idle_swap_s: float) -> None:
        self.runner = runner
        self.idle_swap_s = idle_swap_s
        self.pen = pen
        self.sent_at: float | None = None
        self.running_since: float | None = None
        self.idle_since: float | None = None
        self.served = False  # armed at least once: idle after that means between clients
        self.samples: list[float] = []
        original = pen.firmware.handle

        def handle(message: Message, now: float) -> list[Message]:
            if isinstance(message, Stop) and self.sent_at is not None:
                elapsed = time.perf_counter() - self.sent_at
                self.samples.append(elapsed)
                # perf_counter is CLOCK_MONOTONIC, shared by all processes on the host.
                print(f"reaction {pen.serial} {elapsed:.6f} {self.sent_at:.6f}", flush=True)
                self.sent_at = None
            return original(message, now)

        pen.firmware.handle = handle  # type: ignore[method-assign]

    def poke(self, quiet: bool) -> bool:
        """Breach now if this pen's pass has settled and ``quiet`` (no other breach
        outstanding or just answered). True if it breached."""
        pen = self.pen
        now = time.perf_counter()
        if pen.armed or pen.running:
            self.idle_since = None
            self.served = True
        elif not self.served:
            pass  # its first client is still being set up
        elif self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since > self.idle_swap_s:
            # Left disarmed: the session has ended. Put in a fresh cartridge for the
            # next client, as the therapist would.
            self.idle_since = None
            self.runner.apply(pen, lambda p, t: p.remove_cartridge(t))
            self.runner.apply(pen, lambda p, t: p.insert_cartridge(t))
            return False
        if self.sent_at is not None or not pen.running:
            self.running_since = None
            return False
        if self.running_since is None:
            self.running_since = now
        if now - self.running_since < SETTLE_S or not quiet:
            return False
        fw = pen.firmware

        def breach(p: SimulatedPen, now: float) -> None:
            depth = (fw.depth_set_um or 0) + BREACH_EXTRA_UM
            sample = Telemetry(
                fw.device_ms(now),
                fw.depth_set_um or 0,
                depth,
                fw.speed_hz,
                400,
                3500,
                3900,
                fw.strokes,
                fw.flags,
                fw.runs,
            )
            self.sent_at = time.perf_counter()
            p.emit(sample, now)

        self.runner.apply(pen, breach)
        return True


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with PenRunner(seed=args.seed, auto_hand=True, hand_config=FAST_HAND) as runner:
        slots = await runner.start(args.pens, "pty")
        for slot in slots:
            print(f"pen {slot.serial} {slot.address}", flush=True)
        print("ready", flush=True)
        breachers = [Breacher(runner, s.pen, args.idle_swap) for s in slots[: args.breachers]]
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.duration):
                jitter = random.Random(args.seed)
                last_breach = 0.0
                while not stop.is_set():
                    # One breach at a time, apart from the last one's aftermath: the
                    # figure is the reaction while pens stream, not a pile-up.
                    for b in breachers:
                        outstanding = any(x.sent_at is not None for x in breachers)
                        quiet = not outstanding and time.perf_counter() - last_breach > GAP_S
                        if b.poke(quiet):
                            last_breach = time.perf_counter()
                    # Irregular polling, so breaches do not lock to the 100 Hz grid.
                    await asyncio.sleep(jitter.uniform(0.01, 0.03))
        summary: dict[str, Any] = {
            "seconds": time.monotonic() - started,
            "pens": args.pens,
            "telemetry_sent": sum(s.pen.connection.stats.frames_sent for s in slots),
            "reactions": sum(len(b.samples) for b in breachers),
            "lease_expiries": sum(s.pen.firmware.lease_expiries for s in slots),
            "runner": {
                "lateness_max_s": runner.stats.lateness_max,
                "busy_s": runner.stats.busy_s,
            },
        }
        print("summary " + json.dumps(summary), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m devtools.bench.pen_farm")
    p.add_argument("--pens", type=int, default=32)
    p.add_argument("--breachers", type=int, default=4)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--idle-swap", type=float, default=IDLE_SWAP_S, help="seconds disarmed")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
