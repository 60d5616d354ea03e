"""The control port: drive a running simulated pen by hand, or from any language.

One listening socket per pen (TCP on 127.0.0.1, or a Unix socket), speaking a
line protocol: one command per line (ASCII, ``\\n`` or ``\\r\\n``), one answer
line per command, starting ``ok`` or ``error``. Several clients may be connected
at once; each command is applied to the pen at once, through the runner, so the
pen's answer to the host leaves in the same turn of the event loop.

======================================  =================================================
command                                 effect
======================================  =================================================
``help``                                the commands, on one line
``status``                              ``ok serial=... armed=0|1 running=0|1 button=0|1
                                        contact=0|1 cartridge=ID|none hand=auto|manual``
``press`` / ``release``                 press or release the run button
``contact on`` / ``contact off``        put the needle on the skin, or lift it
``cartridge insert [ID]``               a fresh cartridge (a new unique id unless ID is
                                        given) replaces the one in the pen, which is
                                        pulled first; answers ``ok cartridge=ID``
``cartridge pull``                      pull the cartridge out
``hand auto`` / ``hand manual``         the automatic hand makes passes while the pen is
                                        armed; ``manual`` also lets go of the pen
``pass [SECONDS]``                      one pass by hand: contact, press, hold (default
                                        1 s), release, lift; answers when it is over
``fault KIND [key=value ...]``          inject any scripted fault now, with the keys of
                                        the fault-script format (``simulated_pen.faults``):
                                        ``fault silent duration=2``, ``fault
                                        depth_overshoot amount_um=150``, ``fault
                                        line_noise drop=0.01 duration=3``, ``fault clear``
``quit``                                close this connection
======================================  =================================================

An unknown command or a bad argument answers ``error <what is wrong>`` and leaves
the pen as it was. The protocol is meant for a keyboard (``nc 127.0.0.1 PORT``)
as much as for a test in another language.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .device import SimulatedPen
from .faults import parse_entry
from .runner import PenRunner, PenSlot

#: Longest line a client may send; a longer one closes the connection.
MAX_LINE = 1024
#: Longest pass the ``pass`` command will hold the button for.
MAX_PASS_S = 30.0

HELP = (
    "ok commands: help | status | press | release | contact on|off | "
    "cartridge insert [ID] | cartridge pull | hand auto|manual | pass [SECONDS] | "
    "fault KIND [key=value ...] | quit"
)


class CommandError(ValueError):
    """A command that cannot be carried out; the message is the answer's text."""


class ControlServer:
    """The control port of one pen of a :class:`PenRunner`.

    ``await ControlServer.start(runner, slot)`` listens on a free TCP port of
    127.0.0.1 (``port`` to choose one), or on the Unix socket ``path``;
    :attr:`address` says where (``tcp://127.0.0.1:PORT`` or ``unix:PATH``).
    """

    def __init__(self, runner: PenRunner, slot: PenSlot) -> None:
        self.runner = runner
        self.slot = slot
        self.address = ""
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(
        cls,
        runner: PenRunner,
        slot: PenSlot,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: Path | None = None,
    ) -> ControlServer:
        """Listen for control clients of ``slot``'s pen."""
        control = cls(runner, slot)
        if path is not None:
            control._server = await asyncio.start_unix_server(
                control._serve, path=str(path), limit=MAX_LINE
            )
            control.address = f"unix:{path}"
        else:
            control._server = await asyncio.start_server(control._serve, host, port, limit=MAX_LINE)
            bound = control._server.sockets[0].getsockname()
            control.address = f"tcp://{bound[0]}:{bound[1]}"
        return control

    def close(self) -> None:
        """Stop listening and drop every client."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in self._clients:
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                try:
                    raw = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b"error line too long\n")
                    break
                if not raw:
                    break
                line = raw.decode("ascii", "replace").strip()
                if not line:
                    continue
                if line.lower() == "quit":
                    writer.write(b"ok bye\n")
                    break
                try:
                    answer = await self.execute(line)
                except CommandError as exc:
                    answer = f"error {exc}"
                writer.write(answer.encode("ascii", "replace") + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    # -- commands ---------------------------------------------------------------------

    async def execute(self, line: str) -> str:
        """Carry out one command line; its answer (``ok ...``). CommandError if refused."""
        words = line.split()
        verb, args = words[0].lower(), words[1:]
        if verb == "help":
            return HELP
        if verb == "status":
            return self.status()
        if verb in ("press", "release"):
            _no_args(verb, args)
            self._apply(
                (lambda p, now: p.press_button(now))
                if verb == "press"
                else (lambda p, now: p.release_button(now))
            )
            return "ok"
        if verb == "contact":
            on = _choice(args, {"on": True, "off": False}, "contact on|off")
            self._apply(lambda p, now: p.set_contact(on, now))
            return "ok"
        if verb == "cartridge":
            return self._cartridge(args)
        if verb == "hand":
            auto = _choice(args, {"auto": True, "manual": False}, "hand auto|manual")
            self._apply(lambda p, now: _set_hand(p, auto, now))
            return "ok"
        if verb == "pass":
            return await self._pass(args)
        if verb == "fault":
            return self._fault(args)
        raise CommandError(f"unknown command {verb!r}; try help")

    def status(self) -> str:
        pen = self.slot.pen
        firmware = pen.firmware
        cartridge = firmware.cartridge_id
        return (
            f"ok serial={pen.serial} armed={int(pen.armed)} running={int(pen.running)} "
            f"button={int(firmware.button)} contact={int(firmware.contact)} "
            f"cartridge={'none' if cartridge is None else cartridge} "
            f"hand={'auto' if pen.hand.auto else 'manual'}"
        )

    def _apply(self, action: Callable[[SimulatedPen, float], Any]) -> Any:
        return self.runner.apply(self.slot.pen, action)

    def _cartridge(self, args: list[str]) -> str:
        if args[:1] == ["insert"] and len(args) <= 2:
            wanted = _cartridge_id(args[1]) if len(args) == 2 else None
            cid = self._apply(lambda p, now: _fresh_cartridge(p, now, wanted))
            return f"ok cartridge={cid}"
        if args in (["pull"], ["remove"]):
            self._apply(lambda p, now: p.remove_cartridge(now))
            return "ok"
        raise CommandError("usage: cartridge insert [ID] | cartridge pull")

    async def _pass(self, args: list[str]) -> str:
        if len(args) > 1:
            raise CommandError("usage: pass [SECONDS]")
        hold = _number(args[0], "SECONDS") if args else 1.0
        if not 0 < hold <= MAX_PASS_S:
            raise CommandError(f"SECONDS must be more than 0 and at most {MAX_PASS_S:g}")
        self._apply(lambda p, now: p.set_contact(True, now))
        self._apply(lambda p, now: p.press_button(now))
        try:
            await asyncio.sleep(hold)  # the hand holds the button: that is the pass
        finally:
            self._apply(lambda p, now: p.release_button(now))
            self._apply(lambda p, now: p.set_contact(False, now))
        return "ok"

    def _fault(self, args: list[str]) -> str:
        if not args:
            raise CommandError("usage: fault KIND [key=value ...]")
        entry: dict[str, Any] = {"at": 0.0, "action": args[0].lower()}
        for pair in args[1:]:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise CommandError(f"{pair!r} is not key=value")
            entry[key] = _number(value, key)
        try:
            fault = parse_entry(entry, "fault").fault
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self._apply(lambda p, now: p.inject(fault, now))
        return f"ok fault={fault.kind.value}"


def _fresh_cartridge(pen: SimulatedPen, now: float, wanted: int | None) -> int:
    """A cartridge in the pen's one slot: the one there is pulled out first."""
    if pen.has_cartridge:
        pen.remove_cartridge(now)
    return pen.insert_cartridge(now, wanted)


def _set_hand(pen: SimulatedPen, auto: bool, now: float) -> None:
    if not auto:
        # A hand taken off the pen lets go of it.
        pen.release_button(now)
        pen.set_contact(False, now)
    pen.hand.set_auto(auto)


def _no_args(verb: str, args: list[str]) -> None:
    if args:
        raise CommandError(f"{verb} takes no arguments")


def _choice(args: list[str], choices: dict[str, bool], usage: str) -> bool:
    if len(args) != 1 or args[0].lower() not in choices:
        raise CommandError(f"usage: {usage}")
    return choices[args[0].lower()]


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CommandError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise CommandError(f"{what} must be a finite number")
    return value


def _cartridge_id(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 2**64:
        raise CommandError("ID must be a whole number from 1 to 2^64-1")
    return int(text)
