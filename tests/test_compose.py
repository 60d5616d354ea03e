"""docker-compose.yml: valid for docker-compose, and everything it mounts or names exists.

Docker cannot run on the build machine, so this checks what can be checked without
it: the compose file validates (``docker-compose config -q``), every host path it
mounts and every file the Dockerfile copies is in the repository, the controller's
configuration loads and points at the simulated pens the ``pens`` service opens,
and the ingest worker's environment is a valid configuration.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.config import load_settings
from controller.ingest.settings import load_ingest_settings
from penctl.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKER_COMPOSE = "/usr/bin/docker-compose"  # Debian package docker-compose (make deps)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_docker_compose_validates_the_file() -> None:
    result = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_stack_has_every_service() -> None:
    services = compose()["services"]
    assert set(services) == {"mosquitto", "influxdb", "grafana", "ingest", "pens", "controller"}
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["influxdb"]["image"] == "influxdb:1.8"
    assert services["influxdb"]["environment"]["INFLUXDB_DB"] == "pen"


def test_penctl_services_run_commands_penctl_accepts() -> None:
    services = compose()["services"]
    parser = build_parser()
    for name in ("ingest", "pens", "controller"):
        service = services[name]
        assert service["build"] == "." and service["image"] == "pen-session-controller:latest"
        args = parser.parse_args(service["command"])  # SystemExit if penctl would refuse it
        assert callable(args.handler), name


def test_every_mounted_host_path_is_in_the_repository() -> None:
    mounts = []
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                mounts.append((name, source))
    assert len(mounts) >= 6  # broker conf, acl, passwd, provisioning, dashboards, controller
    missing = [(name, src) for name, src in mounts if not (ROOT / src).exists()]
    assert not missing, f"mounted but not in the repository: {missing}"


def test_dockerfile_copies_only_what_exists() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert next(line for line in lines if line.startswith("FROM")) == "FROM python:3.11-slim"
    sources = [word for line in lines if line.startswith("COPY") for word in line.split()[1:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["penctl"]' in lines


def test_controller_configuration_matches_the_pens_and_the_broker() -> None:
    services = compose()["services"]
    command = services["pens"]["command"]
    base, count = (
        int(command[command.index("--tcp") + 1]),
        int(command[command.index("--pens") + 1]),
    )
    settings = load_settings(ROOT / "deploy" / "controller.toml")
    assert [p.url for p in settings.pens] == [f"socket://pens:{base + i}" for i in range(count)]
    assert settings.mqtt.host == "mosquitto" and settings.mqtt.username == "controller"
    assert settings.api.host == "0.0.0.0"
    volume = services["controller"]["volumes"][0].split(":")
    serve = services["controller"]["command"]
    assert serve[serve.index("--config") + 1] == volume[1]
    assert (ROOT / volume[0]).samefile(ROOT / "deploy" / "controller.toml")
    users = {line.split(":")[0] for line in (ROOT / "deploy/mosquitto/passwd").read_text().split()}
    assert {"controller", "ingest"} <= users


def test_ingest_environment_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose()["services"]["ingest"]["environment"]
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = load_ingest_settings()
    assert settings.mqtt.host == "mosquitto" and settings.mqtt.username == "ingest"
    assert settings.influx.url == "http://influxdb:8086"
    assert settings.ingest.worker_id == "ingest-1"
