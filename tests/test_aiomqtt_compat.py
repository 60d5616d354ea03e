"""The aiomqtt workarounds are pinned to the version they were written for."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from controller.telemetry import aiomqtt_compat

ROOT = Path(__file__).resolve().parent.parent


def test_installed_aiomqtt_is_the_version_the_workarounds_were_written_for() -> None:
    installed = aiomqtt_compat.installed_version()
    assert installed == aiomqtt_compat.WRITTEN_FOR, (
        f"aiomqtt {installed} is installed, but controller/telemetry/aiomqtt_compat.py was "
        f"written for {aiomqtt_compat.WRITTEN_FOR}: check each workaround against the new "
        "release (is the upstream issue fixed? is Client._client still the paho client?), "
        "then update WRITTEN_FOR and the pin in pyproject.toml"
    )


def test_pyproject_pins_the_same_version() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"aiomqtt=={aiomqtt_compat.WRITTEN_FOR}"' in pyproject


def test_no_other_module_touches_aiomqtts_private_client() -> None:
    found = subprocess.run(
        ["git", "grep", "-n", "-E", r"\._client\b", "--", "controller", "tests", "simulated_pen"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    # simulated_pen's TCP server has a _client attribute of its own (not aiomqtt's).
    offenders = [
        line
        for line in found
        if not line.startswith("controller/telemetry/aiomqtt_compat.py:")
        and not line.startswith("simulated_pen/transports.py:")
        and not re.match(r"tests/test_aiomqtt_compat\.py:", line)
    ]
    assert offenders == []
