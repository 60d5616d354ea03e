"""Ingest without servers: the line-protocol mapping, settings and the CLI entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.config import ConfigError
from controller.influx import format_line
from controller.ingest import load_ingest_settings
from controller.ingest.cli import run_ingest
from controller.ingest.points import (
    MalformedMessage,
    event_lines,
    event_values,
    message_points,
    pen_offline_lines,
    status_lines,
    telemetry_fields,
    telemetry_lines,
)
from controller.telemetry.schema import (
    ControllerStatus,
    DeviceStatus,
    EventRecord,
    TelemetryBatch,
    device_topic,
    dump,
)
from penctl.cli import build_parser

T0 = 1_700_000_000_000_000_000


def _batch(**kw: object) -> TelemetryBatch:
    rows = [
        [T0 + k * 10_000_000, k, 800, 790 + k, 120, 310, 3655, 3987, 1000 + k, 0x07]
        for k in range(3)
    ]
    fields: dict[str, object] = {"clinic": "north-1", "device": "PEN-7", "seq": 4, "samples": rows}
    fields.update(kw)
    return TelemetryBatch.model_validate(fields)


def bundle_bytes(clinic: str, controller: str, batches: list[TelemetryBatch]) -> bytes:
    """A bundle's JSON without the model's checks, so tests can make bad ones."""
    doc = {
        "clinic": clinic,
        "controller": controller,
        "batches": [b.model_dump(exclude_none=True) for b in batches],
    }
    return json.dumps(doc).encode()


def _bundle(controller: str) -> bytes:
    return bundle_bytes("north-1", controller, [_batch()])


def _event(kind: str = "pass_ended", **kw: object) -> EventRecord:
    fields: dict[str, object] = {
        "clinic": "north-1",
        "device": "PEN-7",
        "seq": 9,
        "ts_ns": T0,
        "kind": kind,
    }
    fields.update(kw)
    return EventRecord.model_validate(fields)


def test_telemetry_fast_path_equals_format_line() -> None:
    for extra in ({}, {"session": "S-1", "zone": "forehead"}, {"zone": "neck"}):
        batch = _batch(**extra)
        lines = telemetry_lines(batch)
        assert len(lines) == len(batch.samples) + 1
        for row, line in zip(batch.samples, lines, strict=False):
            fields = telemetry_fields(row)
            fields.update({k: v for k, v in extra.items() if isinstance(v, str)})
            expected = format_line(
                "telemetry", {"clinic": "north-1", "device": "PEN-7"}, fields, row[0]
            )
            assert line == expected
        assert lines[-1].startswith(
            "telemetry_batches,clinic=north-1,device=PEN-7 seq=4i,samples=3i"
        )
        assert lines[-1].endswith(f" {T0}")


def test_telemetry_units_and_flags() -> None:
    fields = telemetry_fields([T0, 1, 800, 790, 120, 310, 3655, 3987, 5, 0x05])
    assert fields["temperature_c"] == 36.55
    assert fields["battery_v"] == 3.987
    assert (fields["armed"], fields["motor_running"], fields["skin_contact"]) == (True, False, True)


def test_event_feeds_the_dashboard_measurements() -> None:
    event = _event(
        "pass_ended",
        session="S-1",
        therapist="T-3",
        plan="P-2",
        zone="cheeks",
        values={"depth_um": 1200, "limit_um": 1500, "pass_no": 2, "cartridge": 88123, "seq": 1},
    )
    lines = event_lines(event)
    by_measurement = {line.split(",", 1)[0]: line for line in lines}
    assert set(by_measurement) == {"events", "zones", "cartridges"}
    zones = by_measurement["zones"]
    assert zones.startswith("zones,clinic=north-1,device=PEN-7,kind=pass_ended,zone=cheeks ")
    assert "depth_ratio=0.8" in zones
    assert 'therapist="T-3"' in zones
    assert 'cartridge="88123"' in by_measurement["cartridges"]  # an id: a string, never a float
    # A value named like a fixed field is prefixed instead of overwriting it.
    assert "seq=9i" in by_measurement["events"]
    assert "v_seq=1.0" in by_measurement["events"]
    assert all(line.endswith(f" {T0}") for line in lines)

    session = event_lines(_event("session_created", session="S-1", therapist="T-3"))
    assert session[1].startswith(
        "sessions,clinic=north-1,device=PEN-7,kind=session_created,therapist=T-3 "
    )
    refusal = event_lines(_event("refused", code="depth_over_limit", message="too deep"))
    assert refusal[1].startswith(
        "safety,clinic=north-1,code=depth_over_limit,device=PEN-7,kind=refused "
    )
    # No session: the therapist tag is left out rather than written empty.
    assert event_lines(_event("session_report"))[1].startswith(
        "sessions,clinic=north-1,device=PEN-7,kind=session_report seq=9i"
    )


def test_event_values_have_stable_types() -> None:
    values = event_values({"depth_um": 1200, "speed": 99.5, "ok": True, "note": "x", "run_id": 7})
    assert values == {"depth_um": 1200.0, "speed": 99.5, "ok": True, "note": "x", "run_id": "7"}
    assert isinstance(values["depth_um"], float)


def test_status_point() -> None:
    status = DeviceStatus(
        clinic="north-1",
        device="PEN-7",
        ts_ns=T0,
        online=True,
        state="armed",
        firmware="1.2.0",
        link={"rtt_ms": 3, "crc_errors": 0},
    )
    assert status_lines(status) == [
        'device_status,clinic=north-1,device=PEN-7 online=true,state="armed",firmware="1.2.0",'
        f"link_rtt_ms=3.0,link_crc_errors=0.0 {T0}"
    ]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("pen/v1/c/device/d/telemetry", b"{not json", "bad_json"),
        (
            "pen/v1/c/device/d/telemetry",
            b'{"clinic":"c","device":"d","seq":0,"samples":[[1]]}',
            "schema",
        ),
        (
            "pen/v1/c/device/d/events",
            b'{"clinic":"c","device":"d","seq":0,"ts_ns":1,"kind":"x"}',
            "schema",
        ),
        ("pen/v1/c/device/d/telemetry", dump(_batch()), "topic_mismatch"),
        ("pen/v1/c/device/d/firmware", b"{}", "unknown_topic"),
        ("pen/v2/c/device/d/telemetry", b"{}", "unknown_topic"),
        ("pen/v1/c/controller/x/status", b"{}", "schema"),
        ("pen/v1/c/controller/x/ack", b"{}", "unknown_topic"),
        ("pen/v1/c/clinic/x/telemetry", b"{}", "unknown_topic"),
        ("pen/v1/c/controller/x/telemetry", b'{"clinic":"c","controller":"x"}', "schema"),
        ("pen/v1/north-1/controller/x/telemetry", _bundle("y"), "topic_mismatch"),
        ("pen/v1/south/controller/x/telemetry", _bundle("x"), "topic_mismatch"),
        (
            "pen/v1/north-1/controller/x/telemetry",
            bundle_bytes("north-1", "x", [_batch(), _batch(clinic="south")]),
            "schema",
        ),
        (
            "pen/v1/north-1/controller/x/telemetry",
            bundle_bytes("north-1", "x", [_batch(clinic="south")]),
            "schema",
        ),
    ],
)
def test_malformed_messages_are_classified(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        message_points(topic, payload)
    assert info.value.reason == reason


def test_a_bundle_gives_the_points_of_its_batches() -> None:
    one, two = _batch(), _batch(device="PEN-8", seq=9)
    topic = "pen/v1/north-1/controller/ctl-1/telemetry"
    points = message_points(topic, bundle_bytes("north-1", "ctl-1", [one, two]))
    assert points.lines == telemetry_lines(one) + telemetry_lines(two)
    assert points.newest_ts_ns == max(one.samples[-1][0], two.samples[-1][0])
    # Acknowledged to the bundle's controller, entry by entry.
    assert points.controller == ("north-1", "ctl-1")
    assert points.keys == (("PEN-7", "telemetry", 4), ("PEN-8", "telemetry", 9))


def test_an_event_is_acknowledged_to_its_controller() -> None:
    topic = device_topic("pen/v1", "north-1", "PEN-7", "events")
    points = message_points(topic, dump(_event(controller="ctl-1")))
    assert (points.controller, points.keys) == (("north-1", "ctl-1"), (("PEN-7", "events", 9),))
    anonymous = message_points(topic, dump(_event()))  # an older producer: nobody waits
    assert (anonymous.controller, anonymous.keys) == (None, ())


def test_a_controller_going_offline_takes_its_online_pens_along() -> None:
    topic = "pen/v1/north-1/controller/ctl-1/status"
    will = ControllerStatus(clinic="north-1", controller="ctl-1", online=False, ts_ns=0)
    points = message_points(topic, dump(will))
    assert points.offline == will
    assert points.lines[0].startswith("controller_status,clinic=north-1,controller=ctl-1 ")
    online = ControllerStatus(clinic="north-1", controller="ctl-1", online=True, ts_ns=T0)
    assert message_points(topic, dump(online)).offline is None
    lines = pen_offline_lines(
        ControllerStatus(clinic="north-1", controller="ctl-1", online=False, ts_ns=T0),
        {"PEN-1": (True, "ctl-1"), "PEN-2": (False, "ctl-1"), "PEN-3": (True, "ctl-2")},
    )
    assert lines == [
        "device_status,clinic=north-1,device=PEN-1 online=false,"
        f'state="controller_offline",controller="ctl-1" {T0}'
    ]


def test_message_points_newest_timestamp() -> None:
    batch = _batch()
    points = message_points(device_topic("pen/v1", "north-1", "PEN-7", "telemetry"), dump(batch))
    assert points.newest_ts_ns == batch.samples[-1][0]
    assert len(points.lines) == 4


# --- settings and CLI ----------------------------------------------------------------


def test_settings_file_environment_and_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text('[mqtt]\nport = 1884\n[ingest]\nworker_id = "w-1"\nbatch_seconds = 0.5\n')
    monkeypatch.setenv("PENCTL_INGEST__GROUP", "g2")
    monkeypatch.setenv("PENCTL_INFLUX__DATABASE", "pens")
    settings = load_ingest_settings(path)
    assert settings.mqtt.port == 1884
    assert settings.ingest.worker_id == "w-1"
    assert settings.ingest.batch_seconds == 0.5
    assert settings.ingest.group == "g2"  # environment merges into the file's section
    assert settings.influx_settings().database == "pens"


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[ingest]\nbatch_messages = 0\n", "ingest.batch_messages", "greater than or equal to 1"),
        ("[ingest]\ngrup = 'x'\n", "ingest.grup", "unknown key"),
        ("[ingest]\ngroup = 'a/b'\n", "ingest.group", "match pattern"),
        ("[ingest]\nstreams = ['video']\n", "ingest.streams.0", "Input should be"),
        ("[ingest]\nbatch_messages = 5000\nreceive_maximum = 100\n", "ingest", "receive_maximum"),
        ("[mqtt]\nport = 0\n", "mqtt.port", "greater than or equal to 1"),
    ],
)
def test_settings_errors_name_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_ingest_settings(path)
    assert f"  {key}: " in str(info.value)
    assert why in str(info.value)


def test_cli_registers_and_rejects_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["ingest", "--worker-id", "w9", "--group", "g"])
    assert args.handler is run_ingest
    path = tmp_path / "bad.toml"
    path.write_text("[ingest]\nbatch_seconds = -1\n")
    assert run_ingest(build_parser().parse_args(["ingest", "--config", str(path)])) == 2
    assert "ingest.batch_seconds" in capsys.readouterr().err
    bad_flag = build_parser().parse_args(["ingest", "--worker-id", "has space"])
    assert run_ingest(bad_flag) == 2
    assert "worker_id" in capsys.readouterr().err
