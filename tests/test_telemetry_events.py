"""Events as they leave the controller: reason codes, pseudonyms, complete JSON, no prose."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from controller.config import ConfigError, load_settings
from controller.sessions import EventKind as RegistryEventKind
from controller.telemetry.events import SHAPES, Pseudonymizer, shape_event
from controller.telemetry.schema import MAX_VALUE_CHARS, EventKind, EventRecord

KEY = "0123456789abcdef0123456789abcdef"
FREE_TEXT = {"message", "remediation", "why", "label", "reason_text"}


def test_every_registry_event_kind_has_a_shape() -> None:
    wire = set(typing.get_args(EventKind))
    assert wire == {k.value for k in RegistryEventKind}
    assert set(SHAPES) == wire
    for kind, shape in SHAPES.items():
        assert not FREE_TEXT & set(shape.values), kind


def test_pseudonyms_are_keyed_stable_and_opaque() -> None:
    one, other = Pseudonymizer(KEY), Pseudonymizer(KEY[::-1])
    assert one("Maria.Garcia") == one("Maria.Garcia")
    assert one("Maria.Garcia") != other("Maria.Garcia")
    assert one("Maria.Garcia") != one("Maria.Garcia2")
    pseudonym = one("Maria.Garcia")
    assert pseudonym.startswith("c-") and len(pseudonym) == 34
    assert "maria" not in pseudonym.lower()
    with pytest.raises(ValueError, match="pseudonym_key"):
        Pseudonymizer("short")


def test_a_generated_key_is_kept_private_and_reused(tmp_path: Path) -> None:
    first = Pseudonymizer.from_file(tmp_path / "pseudonym.key")
    assert (tmp_path / "pseudonym.key").stat().st_mode & 0o077 == 0
    assert Pseudonymizer.from_file(tmp_path / "pseudonym.key")("x") == first("x")


def test_a_weak_key_stops_the_start_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"pseudonym_key: .*at least 32 characters"):
        load_settings(None, pseudonym_key="too-short")


def report_detail() -> dict[str, object]:
    reason = "Client Maria Garcia asked for more; she has thick skin on the cheeks " * 4
    return {
        "session_id": "s-1",
        "client_ref": "Maria.Garcia",
        "therapist_id": "t-1",
        "plan_id": "full_face",
        "state": "ended",
        "pen_serial": "SIM-0001",
        "started_at": 1.5,
        "ended_at": 9.25,
        "zones": [
            {
                "zone_id": f"zone_{i}",
                "label": f"Zone {i}",
                "passes_done": 2,
                "max_passes": 3,
                "max_depth_um": 1500,
                "policy_max_depth_um": 1000,
                "deepest_setpoint_um": 1200,
                "peak_depth_um": 1210,
                "override": {"manager_id": "m-1", "reason": reason, "max_passes": 3}
                if i == 0
                else None,
            }
            for i in range(40)
        ],
        "passes": 80,
        "cartridges": ["CART-1", "CART-2"],
        "refusals": 1,
        "policy_fingerprint": "abc123",
    }


def test_a_session_report_carries_a_pseudonym_and_whole_json_without_prose() -> None:
    pseudonymize = Pseudonymizer(KEY)
    shaped = shape_event("session_report", report_detail(), pseudonymize)
    assert shaped.values["client"] == pseudonymize("Maria.Garcia")
    assert shaped.values["cartridges"] == 2
    zones = json.loads(str(shaped.values["zones"]))  # complete JSON, never cut
    assert len(zones) == 40
    assert zones["zone_0"]["overridden"] is True
    assert zones["zone_1"]["overridden"] is False
    text = json.dumps(shaped.values)
    for secret in ("Maria", "Garcia", "thick skin", "Zone 3"):
        assert secret not in text
    EventRecord(clinic="c", device="d", seq=0, ts_ns=1, kind="session_report", values=shaped.values)


def test_an_oversized_value_is_left_out_and_named_never_cut() -> None:
    detail = report_detail()
    zone = dict(detail["zones"][1])  # type: ignore[index]
    detail["zones"] = [dict(zone, zone_id=f"{'z' * 40}{i}") for i in range(200)]
    shaped = shape_event("session_report", detail, Pseudonymizer(KEY))
    assert "zones" not in shaped.values
    assert shaped.values["omitted"] == "zones"
    assert all(len(str(v)) <= MAX_VALUE_CHARS for v in shaped.values.values())


@pytest.mark.parametrize(
    ("kind", "detail", "code", "values"),
    [
        (
            "refused",
            {"code": "depth_over_limit", "message": "1.8 mm is deeper", "remediation": "Set less"},
            "depth_over_limit",
            {},
        ),
        (
            "refused",
            {"by": "pen", "message": "The pen refused Arm: busy."},
            "pen_refused",
            {"by": "pen"},
        ),
        ("stop_sent", {"reason": "overshoot", "message": "Stopped: 2.1 mm"}, "overshoot", {}),
        ("fault", {"kind": "pen_rebooted", "message": "The pen restarted"}, "pen_rebooted", {}),
        (
            "state_changed",
            {"previous": "active", "state": "ended", "input": "end", "why": "ended by t-1"},
            "end",
            {"previous": "active", "state": "ended", "input": "end"},
        ),
        ("pen_disconnected", {"reason": "[Errno 5] /dev/ttyACM0"}, "link_down", {}),
        (
            "override_applied",
            {"zone_id": "cheeks", "max_depth_um": 2000, "max_passes": 5},
            "manager_override",
            {"max_depth_um": 2000, "max_passes": 5},
        ),
        (
            "pass_ended",
            {"zone_id": "cheeks", "number": 2, "reason": "lift_off", "strokes": None},
            "lift_off",
            {"number": 2},
        ),
    ],
)
def test_events_carry_codes_not_sentences(
    kind: EventKind, detail: dict[str, object], code: str, values: dict[str, object]
) -> None:
    shaped = shape_event(kind, detail, Pseudonymizer(KEY))
    assert shaped.code == code
    assert shaped.values == values
    assert shaped.zone == detail.get("zone_id")
