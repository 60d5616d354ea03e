"""Pens to InfluxDB with TLS on every hop (issue 15.4), and the audit head with them (15.7).

The controller publishes to a real mosquitto whose only listener is TLS (client
certificates required, a password per clinic); ingest reads from it the same
way and writes to a real influxd serving HTTPS only. Everything arrives,
the audit anchor's heads included; a client that trusts another CA is refused
by InfluxDB's certificate.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.errors import ActionRefused
from controller.influx import InfluxClient, InfluxSettings, InfluxUnavailable
from controller.ingest import IngestWorker
from controller.ingest.settings import load_ingest_settings
from controller.sessions import SetZoneDepth
from controller.tls import IssuedFiles, client_context, make_clinic_ca, make_server_certificate
from devtools.stack.processes import BrokerTls, ServerProcess, start_influxd, start_mosquitto

from .controller_rig import THERAPIST, start_rig, stop_rig
from .test_ingest import eventually, running

USER, PASSWORD = "clinic-0001", "clinic-0001-broker-secret"


@dataclass
class Servers:
    broker: ServerProcess
    influxd: ServerProcess
    ca: IssuedFiles
    client: IssuedFiles
    other_ca: IssuedFiles

    def mqtt(self) -> dict[str, Any]:
        return {
            "port": self.broker.port,
            "username": USER,
            "password": PASSWORD,
            "tls": {
                "ca_file": str(self.ca.cert),
                "certfile": str(self.client.cert),
                "keyfile": str(self.client.key),
            },
        }

    def influx(self, ca: Path | None = None) -> InfluxSettings:
        return InfluxSettings(
            url=f"https://127.0.0.1:{self.influxd.port}",
            database="pen",
            verify=client_context(ca or self.ca.cert),
        )


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    ca = make_clinic_ca(tmp_path / "ca", "test clinic")
    names = ["127.0.0.1", "localhost"]
    broker_cert = make_server_certificate(ca, names, tmp_path / "ca", stem="broker")
    influx_cert = make_server_certificate(ca, names, tmp_path / "ca", stem="influx")
    client = make_server_certificate(ca, [USER], tmp_path / "ca", stem="client", client=True)
    other = make_clinic_ca(tmp_path / "other", "another clinic")
    passwd = tmp_path / "passwd"
    passwd.touch()
    subprocess.run(
        [shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b", str(passwd), USER, PASSWORD],
        check=True,
    )
    broker = start_mosquitto(
        tmp_path / "mosquitto",
        password_file=passwd,
        tls=BrokerTls(ca.cert, broker_cert.cert, broker_cert.key, require_certificate=True),
    )
    try:
        influxd = start_influxd(tmp_path / "influxd", https=(influx_cert.cert, influx_cert.key))
    except BaseException:
        broker.stop()
        raise
    yield Servers(broker, influxd, ca, client, other)
    influxd.stop()
    broker.stop()


async def _count(servers: Servers, query: str) -> int:
    async with InfluxClient(servers.influx()) as client:
        try:
            series = await client.query(query)
        except Exception:  # the database is not created yet
            return -1
    return sum(int(row[1]) for s in series for row in s.get("values", []))


async def test_telemetry_and_the_audit_head_travel_over_tls(
    servers: Servers, tmp_path: Path
) -> None:
    settings = load_ingest_settings(
        state_dir=tmp_path / "ingest",
        mqtt=servers.mqtt(),
        influx={"url": f"https://127.0.0.1:{servers.influxd.port}", "tls": {
            "ca_file": str(servers.ca.cert)}},
        ingest={"worker_id": "w1", "stats_interval_s": 0.2, "backoff_max_s": 1.0},
    )  # fmt: skip
    worker = IngestWorker(settings)
    async with running(worker):
        rig, collector = await start_rig(
            tmp_path, mqtt_port=servers.broker.port, mqtt=servers.mqtt()
        )
        service = rig.service
        assert rig.edge is not None and rig.edge.anchor is not None
        anchor = rig.edge.anchor  # the edge's, as under penctl serve
        try:
            sid = await rig.start_treating("cheeks", 1000)
            await rig.one_pass()
            # A refusal is a safety record: its head is published at once.
            with pytest.raises(ActionRefused) as refused:
                service.act(SetZoneDepth(sid, 2400, THERAPIST))
            assert refused.value.refusal.code == "depth_above_zone_limit"

            async def landed() -> bool:
                telemetry = await _count(servers, 'SELECT COUNT("depth_um") FROM "telemetry"')
                heads = await _count(
                    servers, 'SELECT COUNT("seq") FROM "audit_head" WHERE "agrees" = 1'
                )
                return telemetry > 20 and heads >= 1

            await eventually(landed, 30, "telemetry and audit heads in InfluxDB over HTTPS")
            assert anchor.published >= 1 and anchor.disagreements == 0
        finally:
            await stop_rig(rig, collector)


async def test_influxdb_over_https_refuses_a_client_trusting_another_ca(servers: Servers) -> None:
    async with InfluxClient(servers.influx(servers.other_ca.cert)) as client:
        assert not await client.ping()
        with pytest.raises(InfluxUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            await client.write("x value=1i 1")
    async with InfluxClient(servers.influx()) as client:
        assert await client.ping()
