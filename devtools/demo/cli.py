"""``penctl demo``: the whole stack as local processes, with a scripted clinic.

What ``make run`` runs. Under one state directory (default ``var/demo``) it
starts, in this order:

* **mosquitto** and **influxd** as real processes (devtools.stack), on 1883 and
  8086 when those are free, else on free ports (printed). The broker uses the
  compose stack's password file and ACL (deploy/mosquitto), so the demo proves
  those too.
* **one ingest worker** as a ``penctl ingest`` subprocess, so that batch
  decoding and InfluxDB writes never stall the controller's safety loop.
* **simulated pens** in this process (PenRunner, pseudo-terminals, automatic
  hand): they are what a developer pokes at, and the scripted faults need the
  pen object.
* **the controller** (ControllerService, MQTT as user ``controller``) and the
  tablet API with the demo users.

A scripted therapist per pen then treats clients one after another (plan
``full_face``, zones in turn at allowed depths; passes by the automatic hand),
except on the last pen (``--free-pens``), which is left for the person at the
keyboard: the banner names it, the tablet's URL and the user to sign in as.
Every pen has a control port (``cartridge insert`` gives a fresh cartridge).
The first pen's first client also sees a refusal (a depth above the zone's
limit) and a depth overshoot that the monitor stops (a fault, acknowledged);
on the second pen a manager allows one extra pass (an override).

mosquitto, influxd and the ingest worker are supervised: one that dies is
started again in the same place (port, data directory, worker id) after a
backoff of 0.25 s doubling to 10 s, for as long as the demo runs, each restart
logged with its exit status and backoff; the controller and the clinic go on.

Every child is killed on exit, whatever the reason (Ctrl-C, SIGTERM, SIGHUP,
``--duration``, an error). The ingest subprocess also dies with this process if
it is SIGKILLed (PR_SET_PDEATHSIG); the servers' pids are kept in
``children.pids`` so the next start on the same state directory reaps any a
SIGKILLed demo left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from controller.logs import configure_logging

from .demo import Demo


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to penctl's parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run the whole stack locally with simulated pens and a scripted clinic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--state-dir", type=Path, default=Path("var/demo"), help="default var/demo")
    p.add_argument("--pens", type=int, default=4, metavar="N", help="simulated pens (default 4)")
    p.add_argument(
        "--free-pens",
        type=int,
        default=1,
        metavar="N",
        help="pens (the last ones) left to you, with no scripted therapist (default 1; "
        "at most --pens minus 1)",
    )
    p.add_argument("--duration", type=float, metavar="S", help="run S seconds, then stop")
    p.add_argument("--seed", default="0", help="seed for the pens and the script (default 0)")
    p.add_argument(
        "--plan", default="full_face", help="treatment plan of every session (default full_face)"
    )
    p.add_argument(
        "--mqtt-port", type=int, default=1883, help="broker port, 0 = any free (default 1883)"
    )
    p.add_argument(
        "--influx-port", type=int, default=8086, help="InfluxDB port, 0 = any free (default 8086)"
    )
    p.add_argument(
        "--api-port",
        type=int,
        default=8080,
        help="tablet API port; a taken port falls back to a free one (default 8080)",
    )
    p.add_argument(
        "--log-format",
        choices=("console", "json"),
        default="console" if sys.stderr.isatty() else "json",
    )
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Handler of ``penctl demo``: 0 after a clean stop, 1 if a part failed, 2 on bad usage."""
    configure_logging(args.log_format)
    if args.pens < 1:
        print("penctl demo: --pens must be at least 1", file=sys.stderr)
        return 2
    if args.free_pens < 0:
        print("penctl demo: --free-pens must not be negative", file=sys.stderr)
        return 2
    if args.duration is not None and args.duration <= 0:
        print("penctl demo: --duration must be positive", file=sys.stderr)
        return 2
    demo = Demo(
        state_dir=args.state_dir.resolve(),
        pens=args.pens,
        free_pens=args.free_pens,
        seed=args.seed,
        plan=args.plan,
        mqtt_port=args.mqtt_port,
        influx_port=args.influx_port,
        api_port=args.api_port,
        duration=args.duration,
    )
    return asyncio.run(demo.run())
