"""``penctl simulate``: run simulated pens until SIGINT or SIGTERM.

Prints one line per pen on stdout, ``SERIAL ADDRESS CONTROL``, then runs::

    SIM-0001 /dev/pts/5 control=tcp://127.0.0.1:41211
    SIM-0002 /dev/pts/6 control=tcp://127.0.0.1:39307

or with ``--tcp 9000``: ``SIM-0001 socket://127.0.0.1:9000 ...`` and so on, one port
per pen (``--tcp 0`` picks free ports). Open the address with pyserial
(``serial.serial_for_url(address)``). CONTROL is the pen's control port: a line
protocol (press, release, contact, cartridge, hand, pass, fault; see
simulated_pen/control.py and the README) to drive the pen while it runs, e.g.
``nc 127.0.0.1 41211`` then ``cartridge insert``. ``--control-port`` picks the
first TCP port, ``--control-dir`` serves Unix sockets ``DIR/SERIAL.sock`` instead,
``--no-control`` none. A summary goes to stderr on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from .control import ControlServer
from .faults import LineNoise, load_script
from .firmware import FirmwareConfig
from .runner import PenRunner, PenSlot, TransportKind


def register(subparsers: Any) -> None:
    """Add the ``simulate`` subcommand to penctl's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="run simulated pens on pseudo-terminals or TCP ports",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pens", type=int, default=1, metavar="N", help="number of pens (default 1)")
    p.add_argument("--seed", default="0", help="seed for every random choice (default 0)")
    p.add_argument(
        "--tcp",
        type=int,
        metavar="BASEPORT",
        help="serve pen i on TCP port BASEPORT+i instead of a pseudo-terminal (0: any free port)",
    )
    p.add_argument("--host", default="127.0.0.1", help="TCP address to listen on")
    p.add_argument(
        "--rate", type=int, default=100, metavar="HZ", help="telemetry rate at boot (default 100)"
    )
    p.add_argument(
        "--auto-hand", action="store_true", help="perform passes automatically while armed"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="follow PROTOCOL.md to the letter and use every tolerance it gives against the "
        "host (depth readings anywhere within the declared accuracy; see the README)",
    )
    control = p.add_mutually_exclusive_group()
    control.add_argument(
        "--control-port",
        type=int,
        default=0,
        metavar="BASEPORT",
        help="control port of pen i on 127.0.0.1:BASEPORT+i (default 0: any free port)",
    )
    control.add_argument(
        "--control-dir",
        type=Path,
        metavar="DIR",
        help="serve each pen's control port as the Unix socket DIR/SERIAL.sock instead",
    )
    control.add_argument("--no-control", action="store_true", help="no control ports")
    p.add_argument("--faults", metavar="FILE.toml", help="fault script (see simulated_pen.faults)")
    p.add_argument("--prefix", default="SIM", help="serial prefix (default SIM: SIM-0001, ...)")
    p.add_argument(
        "--first", type=int, default=1, metavar="N", help="number of the first serial (default 1)"
    )
    for name in ("drop", "corrupt", "duplicate", "delay"):
        p.add_argument(
            f"--{name}",
            type=float,
            default=0.0,
            help=f"line noise on both directions: {name}"
            + (" (seconds)" if name == "delay" else " (probability)"),
        )
    p.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> str | None:
    if args.pens < 1:
        return "--pens must be at least 1"
    top = FirmwareConfig().max_telemetry_rate_hz
    if not 0 <= args.rate <= top:
        return f"--rate must be in 0..{top}"
    if args.tcp is not None and not (args.tcp >= 0 and args.tcp + args.pens <= 65536):
        return "--tcp must be a port number leaving room for every pen"
    if args.control_port and not (args.control_port > 0 and args.control_port + args.pens <= 65536):
        return "--control-port must be a port number leaving room for every pen"
    if len(f"{args.prefix}-{args.first + args.pens - 1:04d}") > 12:
        return "serials are at most 12 characters: shorten --prefix"
    return None


def run(args: argparse.Namespace) -> int:
    """Handler of ``penctl simulate``; returns the exit status."""
    problem = _check(args)
    if problem:
        print(f"penctl simulate: {problem}", file=sys.stderr)
        return 2
    try:
        script = load_script(args.faults) if args.faults else []
        noise = LineNoise(args.drop, args.corrupt, args.duplicate, 0.0, args.delay, 0.0)
    except (OSError, ValueError) as exc:
        print(f"penctl simulate: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args, script, noise))


async def _serve(args: argparse.Namespace, script: list[Any], noise: LineNoise) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    kind: TransportKind = "pty" if args.tcp is None else "tcp"
    async with PenRunner(
        seed=args.seed,
        prefix=args.prefix,
        first_index=args.first,
        config=FirmwareConfig(telemetry_rate_hz=args.rate, strict=args.strict),
        line_noise=None if noise.is_clean else noise,
        auto_hand=args.auto_hand,
        script=script,
    ) as runner:
        try:
            slots = await runner.start(args.pens, kind, host=args.host, base_port=args.tcp or 0)
        except OSError as exc:
            print(f"penctl simulate: cannot open transport: {exc}", file=sys.stderr)
            return 1
        controls: list[ControlServer] = []
        try:
            for i, slot in enumerate(slots):
                if not args.no_control:
                    controls.append(await _control(runner, slot, i, args))
        except OSError as exc:
            print(f"penctl simulate: cannot open a control port: {exc}", file=sys.stderr)
            return 1
        for i, slot in enumerate(slots):
            control = f" control={controls[i].address}" if controls else ""
            print(f"{slot.serial} {slot.address}{control}")
        sys.stdout.flush()
        await stop.wait()
        for server in controls:
            server.close()
        with contextlib.suppress(Exception):
            _summary(runner)
    return 0


async def _control(
    runner: PenRunner, slot: PenSlot, index: int, args: argparse.Namespace
) -> ControlServer:
    if args.control_dir is not None:
        args.control_dir.mkdir(parents=True, exist_ok=True)
        path = args.control_dir / f"{slot.serial}.sock"
        path.unlink(missing_ok=True)
        return await ControlServer.start(runner, slot, path=path)
    port = args.control_port + index if args.control_port else 0
    return await ControlServer.start(runner, slot, port=port)


def _summary(runner: PenRunner) -> None:
    s = runner.stats
    print(
        f"simulate: {len(runner.slots)} pens, {s.wakeups} wake-ups, {s.ticks} ticks, "
        f"lateness mean {s.lateness_mean * 1e3:.2f} ms max {s.lateness_max * 1e3:.2f} ms, "
        f"timer busy {s.busy_s:.2f} s (longest {s.busy_max * 1e3:.1f} ms)",
        file=sys.stderr,
    )
    for slot in runner.slots:
        pen = slot.pen
        link = pen.connection.stats
        print(
            f"  {pen.serial}: boots {pen.stats.boots}, sent {pen.stats.messages_sent}, "
            f"frames out {link.frames_sent} in {link.frames_received}, "
            f"retransmits {link.retransmits}, crc errors {link.crc_errors}, "
            f"passes {pen.hand.passes}",
            file=sys.stderr,
        )
