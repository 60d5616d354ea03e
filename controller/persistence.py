"""The registry's journal layout: what one input's records are, and how they are read back.

The journal (``journal.py``) stores JSON documents by kind and id; this module
decides which: a meta document (format, the next arming token, pens that left
their port), one per pen, one per session, one per cartridge record. After each
input only what it can have changed is written (``SessionRegistry.to_parts``),
on the writer thread, in decision order; reading back reassembles exactly what
``SessionRegistry.to_dict`` would give.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Mapping
from typing import Any, Final

from .durable_writer import DurableWriter, GroupCommit
from .journal import Journal, JournalRow
from .sessions import SessionRegistry

REGISTRY_DOC: Final = ("registry", "main")


class RegistryJournal:
    """Saves the registry piecewise through ``writer``; reads it back whole."""

    def __init__(
        self, journal: Journal, writer: DurableWriter, commits: GroupCommit[JournalRow, Any]
    ) -> None:
        self.journal = journal
        self.writer = writer
        self.commits = commits
        self._live: dict[str, str] = {}  # port -> the live session last journaled there

    def read(self) -> dict[str, Any] | None:
        """The registry as the journal holds it, once every queued write has landed."""
        return self.writer.call(self._read, "journal read")

    def save(
        self, registry: SessionRegistry, port: str | None, also: Iterable[str] = ()
    ) -> tuple[concurrent.futures.Future[None], dict[str, Any]]:
        """Queue what the input on ``port`` can have changed (None: everything live); the
        commit's future and the parts written (what the edge is told once it lands)."""
        rows, parts = self.serialise(registry, port, also)
        return self.commits.add(a=rows), parts

    def serialise(
        self, registry: SessionRegistry, port: str | None, also: Iterable[str] = ()
    ) -> tuple[list[JournalRow], dict[str, Any]]:
        """The rows that record what the input on ``port`` can have changed (None:
        everything live), and the parts they hold; the caller queues the rows.

        An input changes one port's pen, the session live there before or after it,
        and that session's cartridges; ``also`` names other sessions it changed.
        """
        sessions: set[str | None]
        if port is None:
            ports = set(registry.to_dict()["pens"])
            sessions = {*registry.live_session_ids(), *self._live.values()}
        else:
            ports = {port}
            sessions = {registry.live_session_id(port), self._live.get(port)}
        parts = registry.to_parts({s for s in (*sessions, *also) if s}, ports)
        meta = {k: parts[k] for k in ("format", "next_token", "departed")}
        docs: list[tuple[str, str, Mapping[str, Any]]] = [(*REGISTRY_DOC, meta)]
        docs += [("pen", p, body) for p, body in parts["pens"].items()]
        docs += [("session", sid, body) for sid, body in parts["sessions"].items()]
        docs += [("cartridge", cid, body) for cid, body in parts["ledger"].items()]
        rows = self.journal.encode(docs)
        for p in ports:
            live = registry.live_session_id(p)
            if live is None:
                self._live.pop(p, None)
            else:
                self._live[p] = live
        return rows, parts

    def _read(self) -> dict[str, Any] | None:
        meta = self.journal.load(*REGISTRY_DOC)
        if meta is None:
            return None
        return {
            **meta,
            "pens": self.journal.load_all("pen"),
            "sessions": self.journal.load_all("session"),
            "ledger": self.journal.load_all("cartridge"),
        }
