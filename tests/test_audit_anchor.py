"""The audit log's head, published over MQTT with TLS, and checked (issue 15.4, 15.7).

A real mosquitto with a TLS listener (certificates from a clinic CA made for
the test, password file for per-clinic credentials) carries the anchor; a
client trusting another CA, or without the client certificate the broker
requires, is refused. A log cut short after its head was published fails
``penctl audit verify --published``, and the publisher reports the disagreement
instead of anchoring the shorter log.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from controller.audit import (
    AuditEntry,
    AuditKind,
    AuditLog,
    ChainHead,
    PublishedHead,
    read_head,
)
from controller.audit_anchor import AuditAnchor, fetch_published, mqtt_client
from controller.config import ConfigError, MqttSettings, load_settings
from controller.ingest.points import MalformedMessage, message_points
from controller.tls import IssuedFiles, make_clinic_ca, make_server_certificate
from devtools.stack.processes import BrokerTls, ServerProcess, start_mosquitto
from penctl.cli import main as penctl

CLINIC, CONTROLLER = "clinic-0042", "controller-1"


@dataclass
class TlsBroker:
    server: ServerProcess
    ca: IssuedFiles
    client: IssuedFiles
    other_ca: IssuedFiles

    def settings(self, **tls: object) -> MqttSettings:
        return MqttSettings(
            port=self.server.port,
            username=CLINIC,
            password="clinic-0042-secret",
            tls={"ca_file": self.ca.cert, "certfile": self.client.cert,
                 "keyfile": self.client.key, **tls},
        )  # fmt: skip


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    """Mosquitto on a TLS-only listener: server verified by the clinic CA, client
    certificates required, and a user per clinic in a password file."""
    ca = make_clinic_ca(tmp_path / "ca", "test clinic")
    broker = make_server_certificate(ca, ["127.0.0.1", "localhost"], tmp_path / "ca")
    client = make_server_certificate(ca, [CLINIC], tmp_path / "ca", stem="client", client=True)
    other = make_clinic_ca(tmp_path / "other", "another clinic")
    passwd = tmp_path / "passwd"
    passwd.touch()
    subprocess.run(
        [shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b", str(passwd), CLINIC,
         "clinic-0042-secret"],
        check=True,
    )  # fmt: skip
    server = start_mosquitto(
        tmp_path / "mosquitto",
        password_file=passwd,
        tls=BrokerTls(ca.cert, broker.cert, broker.key, require_certificate=True),
    )
    yield TlsBroker(server, ca, client, other)
    server.stop()


def _log_with(path: Path, records: int, what: str = "stop") -> None:
    with AuditLog(path) as log:
        for n in range(records):
            log.append(AuditEntry(AuditKind.STOP, 1_800_000_000.0 + n, f"{what} {n}"))


def _cut_off_the_end(path: Path, keep: int) -> None:
    """What someone with the disk can do: drop the guard and delete the newest records."""
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER audit_log_no_delete")
    db.execute("DELETE FROM audit_log WHERE seq > ?", (keep,))
    db.commit()
    db.close()


async def until(predicate: Callable[[], Awaitable[bool] | bool], within: float = 10.0) -> None:
    """Poll ``predicate`` (state in a broker or another task) until it holds."""
    async with asyncio.timeout(within):
        while True:
            result = predicate()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.05)


async def _published(settings: MqttSettings) -> PublishedHead:
    found = await fetch_published(settings, CLINIC, CONTROLLER)
    assert found is not None
    return found


async def test_the_head_is_published_over_tls_and_a_cut_log_is_caught(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.db"
    _log_with(audit, 5)
    settings = tls_broker.settings()
    anchor = AuditAnchor(audit, CLINIC, CONTROLLER, settings, interval_s=0.2)
    task = asyncio.create_task(anchor.run())
    try:
        await until(lambda: anchor.published > 0)
        assert (await _published(settings)).head.seq == 5
        _log_with(audit, 2)  # two more safety records: the anchor follows
        anchor.poke()
        published_count = anchor.published
        await until(lambda: anchor.published > published_count)
        published = await _published(settings)
        assert published.agrees and published.head == read_head(audit)

        config = tmp_path / "controller.toml"
        config.write_text(
            f'clinic_id = "{CLINIC}"\n[mqtt]\nport = {tls_broker.server.port}\n'
            f'username = "{CLINIC}"\npassword = "clinic-0042-secret"\n'
            f'[mqtt.tls]\nca_file = "{tls_broker.ca.cert}"\n'
            f'certfile = "{tls_broker.client.cert}"\nkeyfile = "{tls_broker.client.key}"\n'
        )
        verify = ["audit", "verify", str(audit), "--published", "--config", str(config)]
        assert await asyncio.to_thread(penctl, verify) == 0

        # Someone cuts the last two records off the end: the chain alone still verifies...
        _cut_off_the_end(audit, keep=5)
        assert await asyncio.to_thread(penctl, ["audit", "verify", str(audit)]) == 0
        # ...but not against the published head,
        assert await asyncio.to_thread(penctl, verify) == 1
        # and the publisher keeps the old head, saying it disagrees.
        anchor.poke()
        await until(lambda: anchor.disagreements > 0)
        async with mqtt_client(settings, "peek") as client:
            await client.subscribe(anchor.topic, qos=1)
            message = await anext(aiter(client.messages))
        raw = json.loads(bytes(message.payload))  # type: ignore[arg-type]
        assert (raw["seq"], raw["agrees"], raw["local_seq"]) == (7, False, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_new_publisher_checks_the_whole_log_against_the_retained_head(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.db"
    _log_with(audit, 4)
    settings = tls_broker.settings()
    first = AuditAnchor(audit, CLINIC, CONTROLLER, settings, interval_s=0.2)
    task = asyncio.create_task(first.run())
    await until(lambda: first.published > 0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # The file is rewritten from scratch while the controller is down (fresh hashes).
    audit.unlink()
    _log_with(audit, 6, "a different stop")
    second = AuditAnchor(audit, CLINIC, CONTROLLER, settings, interval_s=0.2)
    task = asyncio.create_task(second.run())
    try:
        await until(lambda: second.published > 0)
        published = await _published(settings)
        assert not published.agrees and published.head.seq == 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"ca_file": "other"}, "CERTIFICATE_VERIFY_FAILED"),
        # TLS 1.3: the broker's "certificate required" alert comes after the handshake,
        # so the client sees its CONNECT go unanswered.
        ({"certfile": None, "keyfile": None}, "timed out|certificate required|Connection"),
    ],
    ids=["server-from-another-ca", "no-client-certificate"],
)
async def test_the_broker_and_the_client_verify_each_other(
    tls_broker: TlsBroker, change: dict[str, object], error: str
) -> None:
    if change.get("ca_file") == "other":
        change = {"ca_file": tls_broker.other_ca.cert}
    settings = tls_broker.settings(**change)
    with pytest.raises(aiomqtt.MqttError, match=error):
        async with mqtt_client(settings, "intruder", timeout=3) as client:
            await client.publish("pen/v1/x", b"x", qos=1)
    # And without TLS at all, the TLS listener answers nothing useful.
    plain = MqttSettings(port=tls_broker.server.port, username=CLINIC, password="x")
    with pytest.raises(aiomqtt.MqttError):
        async with mqtt_client(plain, "plain", timeout=3):
            pass


def test_mqtt_and_influx_tls_settings_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt.tls: .*CA file .*nope.crt does not exist"):
        load_settings(None, mqtt={"tls": {"ca_file": str(tmp_path / "nope.crt")}})
    ca = make_clinic_ca(tmp_path, "c")
    with pytest.raises(ConfigError, match=r"mqtt.tls: .*needs both"):
        load_settings(None, mqtt={"tls": {"ca_file": str(ca.cert), "certfile": str(ca.cert)}})
    with pytest.raises(ConfigError, match=r"influx: .*url is not https"):
        load_settings(None, influx={"tls": {"ca_file": str(ca.cert)}})
    with pytest.raises(ConfigError, match=r"influx.url"):
        load_settings(None, influx={"url": "ftp://influx"})
    good = load_settings(
        None,
        mqtt={"tls": {"ca_file": str(ca.cert)}},
        influx={"url": "https://influx:8086", "tls": {"ca_file": str(ca.cert)}},
    )
    assert good.mqtt.tls is not None and good.mqtt.tls.verify


def test_ingest_files_a_published_head_under_its_own_controller() -> None:
    head = PublishedHead(CLINIC, CONTROLLER, ChainHead(7, "ab" * 32), 1_800_000_000.5, False)
    topic = f"pen/v1/{CLINIC}/controller/{CONTROLLER}/audit-head"
    points = message_points(topic, head.payload())
    [line] = points.lines
    assert line == (
        f'audit_head,clinic={CLINIC},controller={CONTROLLER} seq=7i,hash="{"ab" * 32}",'
        "agrees=0i 1800000000500000000"
    )
    with pytest.raises(MalformedMessage, match="topic_mismatch"):
        message_points(topic.replace(CONTROLLER, "controller-2"), head.payload())
    with pytest.raises(MalformedMessage, match="schema"):
        message_points(topic, b'{"seq": 1}')
