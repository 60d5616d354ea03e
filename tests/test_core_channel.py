"""The core-edge channel over a real Unix socket: what the core tells, what the edge asks.

The core side here answers with small stand-ins (its hello, snapshot, stats and one
request handler); the registry behind it is tested elsewhere. What is checked is
the channel's contract: a mirror from the snapshot and STATE, events and telemetry
in order and acknowledged, nothing queued without bound, a flood answered "busy".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controller.channel.core_side import CoreChannel, socket_path
from controller.channel.framing import encode_frame
from controller.channel.messages import Kind, StreamItem, encode_json
from controller.contract import EventKind
from controller.edge.client import CoreClient
from controller.errors import ActionRefused, CoreUnavailableError
from controller.live import LiveTelemetry
from controller.policy import load_policy, policy_as_dict
from controller.sessions import Actor, ArmPen, Role, SessionEvent
from firmware_protocol.messages import Telemetry

from .controller_rig import eventually

THERAPIST = Actor("t-1", Role.THERAPIST)
POLICY = load_policy()
PAYLOAD = Telemetry(1, 500, 498, 100, 300, 2500, 4000, 10, 0x03, 1).encode()


@dataclass
class Core:
    """A stand-in core: answers the channel, records the requests."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    refuse: bool = False
    events_decided: int = 0

    def handle(self, body: dict[str, Any], reply: Callable[[dict[str, Any]], None]) -> None:
        self.requests.append(body)
        if self.refuse:
            refusal = {"code": "no_depth_set", "message": "No depth.", "remediation": "Set it."}
            reply({"refusal": refusal, "first_event": self.events_decided})
            return
        reply({"ok": True, "first_event": self.events_decided})


@dataclass
class Pair:
    core: Core
    channel: CoreChannel
    client: CoreClient
    items: list[StreamItem]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    core = Core()
    channel = CoreChannel(
        socket_path(tmp_path),
        hello=lambda: {
            "controller_id": "c1",
            "pens": [{"name": "room1", "url": "/dev/null"}],
            "policy": policy_as_dict(POLICY),
            "policy_fingerprint": POLICY.fingerprint,
        },
        snapshot=lambda: [
            {"pens": {}, "sessions": {}},
        ],
        stats=lambda: {"pens": {"room1": {"frames_received": 7}}},
        handle_request=core.handle,
        payload_size=len(PAYLOAD),
        flush_interval=0.02,
        stats_interval=0.05,
    )
    await channel.start()
    items: list[StreamItem] = []

    async def secured(item: StreamItem) -> None:
        items.append(item)

    client = CoreClient(channel.path, state_dir=tmp_path, on_stream=secured)
    await client.start()
    async with asyncio.timeout(5):
        await client.ready.wait()
    yield Pair(core, channel, client, items)
    await client.stop()
    await channel.stop()


def event(n: int) -> SessionEvent:
    return SessionEvent(EventKind.ARMED, float(n), "room1", "s1", {"n": n})


async def test_an_action_is_applied_in_the_core_and_answered(pair: Pair) -> None:
    answer = await pair.client.act(ArmPen("s1", THERAPIST))
    assert answer["ok"]
    assert pair.core.requests[0]["action"]["type"] == "ArmPen"
    assert pair.core.requests[0]["action"]["actor"] == {"actor_id": "t-1", "role": "therapist"}


async def test_a_refusal_comes_back_with_its_sentences(pair: Pair) -> None:
    pair.core.refuse = True
    with pytest.raises(ActionRefused) as info:
        await pair.client.act(ArmPen("s1", THERAPIST))
    assert info.value.refusal.message == "No depth."
    assert str(info.value.refusal.code) == "no_depth_set"


async def test_events_and_telemetry_reach_the_edge_in_order_and_are_acknowledged(
    pair: Pair,
) -> None:
    sub = pair.client.subscribe(1000)
    tags = ("room1", "SIM-1", "s1", "cheeks")
    for n in range(3):
        pair.channel.telemetry(tags, float(n), PAYLOAD)
    pair.channel.events([(0, event(0)), (1, event(1))])
    got: list[Any] = []
    async with asyncio.timeout(5):
        while len([g for g in got if isinstance(g, SessionEvent)]) < 2:
            got.append(await sub.queue.get())
    assert [g.detail["n"] for g in got if isinstance(g, SessionEvent)] == [0, 1]
    assert any(isinstance(g, LiveTelemetry) and g.session_id == "s1" for g in got)
    await eventually(lambda: not pair.channel._unacked)  # the edge secured and acknowledged
    assert sum(len(i.records) for i in pair.items) == 3


async def test_an_answer_waits_only_for_the_actions_own_events(pair: Pair) -> None:
    pair.core.events_decided = 5  # events 0..4 belong to earlier outcomes
    waiting = asyncio.create_task(
        pair.client.act_and_wait(ArmPen("s1", THERAPIST), lambda e: e.kind is EventKind.ARMED)
    )
    await asyncio.sleep(0.05)
    pair.channel.events([(4, event(4)), (5, event(5))])
    answered = await asyncio.wait_for(waiting, 5)
    assert answered.detail["n"] == 5  # not the earlier ARMED


async def test_a_flood_of_requests_is_answered_busy_not_queued(pair: Pair) -> None:
    pair.channel.max_requests_per_read = 4
    transport = pair.client._transport
    assert transport is not None
    frames = b"".join(
        encode_frame(Kind.REQUEST, n.to_bytes(4, "big") + encode_json({"op": "ping"}))
        for n in range(1000, 1100)
    )
    transport.write(frames)  # 100 requests in one write
    await eventually(lambda: pair.channel.counters.busy + pair.channel.counters.requests >= 100)
    assert pair.channel.counters.busy >= 50
    assert len(pair.core.requests) <= 50


async def test_unacknowledged_items_are_sent_again_to_a_new_edge(pair: Pair) -> None:
    await pair.client.stop()
    pair.channel.telemetry(("room1", "SIM-1", None, None), 1.0, PAYLOAD)
    pair.channel.flush()
    assert pair.channel._unacked  # nobody secured it yet
    items: list[StreamItem] = []

    async def secured(item: StreamItem) -> None:
        items.append(item)

    client = CoreClient(pair.channel.path, state_dir=pair.client.state_dir, on_stream=secured)
    await client.start()
    try:
        await eventually(lambda: bool(items))
        assert items[0].records[0].payload == PAYLOAD
    finally:
        await client.stop()


async def test_items_decided_while_a_new_edge_catches_up_do_not_overtake_older_ones(
    pair: Pair,
) -> None:
    """An event waits unacknowledged for an edge; while the next edge is being brought
    up (snapshot on its way) the core decides another. The edge must get both, oldest
    first, and the core may forget them only once the edge secured both. (The newer
    one went out at once, the edge took the older one for a resend and acknowledged
    past it, and the core deleted it unsecured.)"""
    await pair.client.stop()
    channel = pair.channel
    channel.events([(0, _event(0))])
    assert [seq for seq, _, _ in channel._unacked] == [1]
    snapshot = channel._snapshot

    def snapshot_meanwhile() -> list[dict[str, Any]]:
        # Decided on the core's loop between the edge's HELLO and its snapshot.
        asyncio.get_running_loop().call_soon(channel.events, [(1, _event(1))])
        return snapshot()

    channel._snapshot = snapshot_meanwhile
    items: list[StreamItem] = []

    async def secured(item: StreamItem) -> None:
        items.append(item)

    client = CoreClient(channel.path, state_dir=pair.client.state_dir, on_stream=secured)
    await client.start()
    try:
        await asyncio.wait_for(channel.drained(), 5)
        secured_events = [event.detail["n"] for item in items for _, event in item.events]
        assert secured_events == [0, 1]
        assert [item.seq for item in items] == [1, 2]
    finally:
        await client.stop()


def _event(n: int) -> SessionEvent:
    return SessionEvent(EventKind.ARMED, float(n), "room1", "s1", {"n": n})


async def test_without_the_core_an_action_fails_fast(tmp_path: Path) -> None:
    client = CoreClient(tmp_path / "nobody.sock", state_dir=tmp_path)
    await client.start()
    try:
        with pytest.raises(CoreUnavailableError):
            await client.act(ArmPen("s1", THERAPIST))
    finally:
        await client.stop()


async def test_an_edge_that_stops_reading_is_dropped_not_queued_for(pair: Pair) -> None:
    pair.channel.max_write_buffer = 64 * 1024
    transport = pair.client._transport
    assert transport is not None
    transport.pause_reading()  # the edge hangs
    big = ("room1", "SIM-1", None, None)
    for n in range(20_000):
        pair.channel.telemetry(big, float(n), PAYLOAD)
        if n % 500 == 0:
            pair.channel.flush()
    pair.channel.flush()
    assert pair.channel.counters.overflow_disconnects >= 1
    assert not pair.channel.connected or pair.channel._edge is not None
