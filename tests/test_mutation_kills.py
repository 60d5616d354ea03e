"""Behaviours that `make mutation` showed no test pinned down: one test each.

Each test names the behaviour; the mutant it was written for is in its docstring
(mutmut's name, without the module). Equivalent mutants are listed with their reason
in tests/mutation/EQUIVALENT.md.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from controller.safety import (
    ALLOWED,
    CartridgeStatus,
    GateContext,
    LinkStatus,
    RefusalReason,
    Refused,
    SessionState,
    check_command,
    check_telemetry,
)
from controller.safety.monitor import StopDecision
from controller.sessions.ledger import CartridgeLedger
from firmware_protocol.framing import SYNC, FrameDecoder, FrameKind, encode_frame
from firmware_protocol.messages import (
    Arm,
    HostStopReason,
    QueryStatus,
    Renew,
    Reset,
    SetDepth,
    SetLiftOffGrace,
    SetSpeed,
    SetTelemetryRate,
    Telemetry,
    TelemetryFlag,
)

from .test_gate import CASES, LIMITS, ready
from .test_gate_monitor import running, sample

# --- the words a therapist reads ---------------------------------------------------------

_SHOUTED = re.compile(r"(?<![\w-])[A-Z]{3,}(?![\w-])")  # a shouted word, not a serial


def _reads_as_a_sentence(text: object) -> None:
    assert isinstance(text, str) and text.strip(), text
    assert text[0].isupper() or text[0].isdigit(), text
    assert text.endswith("."), text
    assert "XX" not in text, text
    assert not _SHOUTED.search(text), text
    assert not re.search(r"\. [a-z]", text), text  # each sentence begins with a capital


def _monitor_decisions() -> list[StopDecision]:
    cheeks = running().zone
    assert cheeks is not None
    decisions = [
        check_telemetry(running(), sample(1051)),
        check_telemetry(running(depth_setpoint_um=1500), sample(1551, pen_set=1500)),
        check_telemetry(running(telemetry_rate_hz=5.0), sample(1000)),
        check_telemetry(running(), sample(900, pen_set=1600)),
        check_telemetry(
            running(zone=dataclasses.replace(cheeks, puncture_budget=50)), sample(1000, strokes=150)
        ),
        check_telemetry(running(session_state=SessionState.PAUSED), sample(500)),
        check_telemetry(running(zone=None), sample(500)),
    ]
    assert all(d is not None for d in decisions)
    return [d for d in decisions if d is not None]


@pytest.mark.parametrize(
    ("ctx", "command"),
    [
        pytest.param(ctx, cmd, id=f"{code}-{i}")
        for code, cases in CASES.items()
        for i, (ctx, cmd, _) in enumerate(cases)
    ],
)
def test_every_gate_refusal_is_two_plain_sentences(ctx: GateContext, command: object) -> None:
    """Kills the gate's wording mutants: lower-cased, shouted, "XX" or None sentences."""
    decision = check_command(ctx, command)  # type: ignore[arg-type]
    assert isinstance(decision, Refused)
    _reads_as_a_sentence(decision.message)
    _reads_as_a_sentence(decision.remediation)


def test_every_monitor_stop_is_two_plain_sentences_with_its_figures() -> None:
    """Kills the monitor's wording mutants and those that drop or rename its details."""
    for decision in _monitor_decisions():
        _reads_as_a_sentence(decision.message)
        _reads_as_a_sentence(decision.remediation)
        details = dict(decision.details)
        assert {"depth_um", "pen_depth_set_um", "strokes", "device_ms"} <= set(details)
        assert all(v is not None for v in details.values()), details
    overshoot, _, slow, _, budget, unapproved, no_zone = _monitor_decisions()
    assert overshoot.details == {
        "depth_um": 1051,
        "pen_depth_set_um": 1000,
        "strokes": 150,
        "device_ms": 1234,
        "zone_id": "cheeks",
        "zone_limit_um": 1500,
        "setpoint_um": 1000,
        "tolerance_um": LIMITS.depth_tolerance_um,
    }
    assert slow.details["telemetry_rate_hz"] == 5.0
    assert budget.details["pass_strokes"] == 50 and budget.details["puncture_budget"] == 50
    assert budget.is_fault is False
    assert unapproved.message == no_zone.message
    assert no_zone.details == {
        "depth_um": 500,
        "pen_depth_set_um": 1000,
        "strokes": 150,
        "device_ms": 1234,
    }


def test_a_telemetry_rate_is_reported_to_one_decimal() -> None:
    decision = check_telemetry(running(telemetry_rate_hz=45.55), sample(1000))
    assert decision is not None and decision.details["telemetry_rate_hz"] == round(45.55, 1)


def test_a_fault_text_is_made_a_sentence_once() -> None:
    """_sentence: trailing blanks go (rstrip, not lstrip); a final full stop is not doubled."""
    decision = check_command(ready(fault="pen hot  "), Arm(250, 5, 800, 1000))
    assert isinstance(decision, Refused)
    assert decision.message == "There is an unresolved fault: pen hot."
    for ending in (".", "!", "?"):
        decision = check_command(ready(fault=f"pen hot{ending}"), Arm(250, 5, 800, 1000))
        assert isinstance(decision, Refused) and decision.message.endswith(f"pen hot{ending}")


def test_a_paused_session_with_a_fault_on_record_says_it_is_paused() -> None:
    decision = check_command(
        ready(session_state=SessionState.PAUSED, fault="stall"), Arm(250, 5, 800, 1000)
    )
    assert isinstance(decision, Refused) and decision.message == "The session is paused."


def test_an_unconfirmed_zero_depth_is_named_as_zero() -> None:
    decision = check_command(ready(depth_setpoint_um=0, pen_depth_set_um=500), Arm(250, 5, 0, 1000))
    assert isinstance(decision, Refused)
    assert decision.code is RefusalReason.DEPTH_NOT_CONFIRMED
    assert "the depth of 0.00 mm: it holds 0.50 mm" in decision.message


# --- the gate's edges ---------------------------------------------------------------------


def test_an_arm_right_after_its_setdepth_counts_the_depth_on_its_way() -> None:
    """A SetDepth sent and not yet acknowledged is the depth the Arm will meet (the link
    keeps order); what the pen held before no longer counts."""
    on_its_way = ready(pen_depth_set_um=500, pen_depth_pending_um=800)
    assert check_command(on_its_way, Arm(250, 5, 800, 1000)) is ALLOWED
    stale = ready(pen_depth_set_um=800, pen_depth_pending_um=500)
    decision = check_command(stale, Arm(250, 5, 800, 1000))
    assert isinstance(decision, Refused) and decision.code is RefusalReason.DEPTH_NOT_CONFIRMED


@pytest.mark.parametrize("lease_ms", [1, LIMITS.max_lease_ms])
def test_the_shortest_and_the_longest_allowed_lease_arm(lease_ms: int) -> None:
    assert check_command(ready(), Arm(lease_ms, 5, 800, 1000)) is ALLOWED


def test_a_depth_exactly_at_the_pen_ceiling_is_allowed() -> None:
    ctx = ready(
        limits=dataclasses.replace(LIMITS, device_ceiling_um=900),
        zone=dataclasses.replace(ready().zone, max_depth_um=1000),  # type: ignore[type-var]
    )
    assert check_command(ctx, SetDepth(900)) is ALLOWED
    assert isinstance(check_command(ctx, SetDepth(901)), Refused)


def test_telemetry_exactly_at_the_minimum_rate_is_enough() -> None:
    minimum = float(LIMITS.min_telemetry_rate_hz)
    assert check_command(ready(telemetry_rate_hz=minimum), Arm(250, 5, 800, 1000)) is ALLOWED
    assert check_telemetry(running(telemetry_rate_hz=minimum), sample(1000)) is None


def test_a_lift_off_grace_of_zero_is_allowed() -> None:
    assert check_command(ready(), SetLiftOffGrace(0)) is ALLOWED


@pytest.mark.parametrize(
    "command", [SetLiftOffGrace(100), SetTelemetryRate(100), SetSpeed(100), QueryStatus(), Reset()]
)
@pytest.mark.parametrize("link", [LinkStatus.DOWN, LinkStatus.REFUSED])
def test_a_pen_that_is_not_connected_or_failed_its_identity_check_gets_no_setting(
    command: object, link: LinkStatus
) -> None:
    ctx = ready(session_state=None, link=link)
    decision = check_command(ctx, command)  # type: ignore[arg-type]
    assert isinstance(decision, Refused)
    expected = (
        RefusalReason.LINK_DOWN if link is LinkStatus.DOWN else RefusalReason.PEN_NOT_VERIFIED
    )
    assert decision.code is expected


def test_a_foreign_pen_with_no_session_may_be_reset() -> None:
    """Reset is housekeeping: a pen that is not the session's (or the configured one)
    may be restarted when no session uses it."""
    for link in (LinkStatus.FOREIGN, LinkStatus.UNEXPECTED):
        assert check_command(ready(session_state=None, link=link), Reset()) is ALLOWED


def test_arming_is_refused_when_passes_done_exceed_a_lowered_limit() -> None:
    """A manager lowered the zone's limit below the passes already done."""
    zone = dataclasses.replace(ready().zone, max_passes=2, passes_done=3)  # type: ignore[type-var]
    decision = check_command(ready(zone=zone), Arm(250, 5, 800, 1000))
    assert isinstance(decision, Refused) and decision.code is RefusalReason.ZONE_PASSES_USED


def test_a_renew_with_an_older_lease_token_is_refused() -> None:
    decision = check_command(ready(lease_token=5), Renew(4))
    assert isinstance(decision, Refused) and decision.code is RefusalReason.STALE_LEASE


def test_a_pass_whose_strokes_jump_past_the_budget_is_ended() -> None:
    cheeks = running().zone
    ctx = running(zone=dataclasses.replace(cheeks, puncture_budget=50))  # type: ignore[type-var]
    decision = check_telemetry(ctx, sample(1000, strokes=100 + 80))  # 80 > 50, never == 50
    assert decision is not None and decision.reason is HostStopReason.PUNCTURE_BUDGET


def test_a_running_sample_with_no_motor_flag_but_a_running_pass_is_judged() -> None:
    flags = int(TelemetryFlag.ARMED)
    deep = Telemetry(1234, 1000, 1200, 120, 300, 3000, 3900, 150, flags, 1)
    decision = check_telemetry(running(motor_running=True), deep)
    assert decision is not None and decision.reason is HostStopReason.DEPTH_OVERSHOOT


# --- the cartridge ledger ------------------------------------------------------------------


def test_ending_one_session_spends_only_its_own_cartridges() -> None:
    ledger = CartridgeLedger()
    assert ledger.mark_used(1, "a", 1.0) and ledger.mark_used(2, "b", 1.0)
    assert ledger.spend_session("a", 2.0) == [1]
    assert ledger.status(2, "b") is CartridgeStatus.THIS_SESSION
    assert ledger.spend_session("a", 3.0) == []  # already spent: not again


def test_a_ledger_entry_under_the_wrong_id_is_refused_with_both_ids() -> None:
    ledger = CartridgeLedger()
    ledger.mark_used(7, "a", 1.0)
    data = {"8": ledger.to_dict()["7"]}
    with pytest.raises(ValueError, match="ledger entry 8 holds cartridge 7"):
        CartridgeLedger.from_dict(data)


# --- framing --------------------------------------------------------------------------------


def test_a_bad_header_is_counted_as_soon_as_the_header_is_in() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(SYNC + bytes([0xFF, 0, 0, 0, 0])) == []  # LEN 255: impossible
    assert decoder.stats.header_errors == 1


def test_every_crc_error_is_counted() -> None:
    frame = bytearray(encode_frame(FrameKind.RELIABLE, 1, 0x10, b"\x01\x02"))
    frame[-1] ^= 0xFF
    decoder = FrameDecoder()
    decoder.feed(bytes(frame) + bytes(frame))
    assert decoder.stats.crc_errors == 2
