"""Service configuration: TOML plus environment, errors that name the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.config import ConfigError, load_settings
from controller.cpus import move_off_core, others, pin_core, unpin
from controller.gil import CORE_SWITCH_INTERVAL_S
from controller.service import ControllerService


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.link.lease_ms == 250
    assert settings.mqtt.topic_root == "pen/v1"
    assert settings.pens == []


def test_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'clinic_id = "north"\n[[pens]]\nurl = "socket://127.0.0.1:7000"\n[mqtt]\nport = 1884\n'
    )
    monkeypatch.setenv("PENCTL_MQTT__PORT", "1999")
    settings = load_settings(path)
    assert settings.clinic_id == "north"
    assert settings.pens[0].url == "socket://127.0.0.1:7000"
    assert settings.mqtt.port == 1999  # environment beats the file


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("[mqtt]\nport = 70000\n", "mqtt.port", "less than or equal to 65535"),
        ("[mqtt]\nprot = 1\n", "mqtt.prot", "unknown key"),
        ("[link]\nlease_ms = 10\n", "link.lease_ms", "greater than or equal to 50"),
        ('[[pens]]\nurl = ""\n', "pens.0.url", "at least 1 character"),
        ('clinic_id = "has space"\n', "clinic_id", "match pattern"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, text: str, key: str, why: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert f"  {key}: " in str(info.value)
    assert why in str(info.value)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[mqtt\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_core_cpus_must_exist_and_the_error_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"core_cpus.*not available here"):
        load_settings(None, core_cpus=[4096])
    assert load_settings(None, core_cpus=[0, 0]).core_cpus == [0]


def test_a_pinned_core_leaves_the_other_cpus_to_everything_else() -> None:
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        assert others([min(mine)]) == mine  # one CPU: shared, nothing to leave
        return
    core = min(mine)
    pin_core([core])
    try:
        assert os.sched_getaffinity(0) == {core}
        assert others([core]) == mine - {core}
    finally:
        unpin()
    assert os.sched_getaffinity(0) == mine


def test_another_process_is_moved_off_the_core_cpus() -> None:
    mine = os.sched_getaffinity(0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        move_off_core(child.pid, [])  # no core pinned: left where it is
        assert os.sched_getaffinity(child.pid) == mine
        core = min(mine)
        move_off_core(child.pid, [core])
        assert os.sched_getaffinity(child.pid) == (mine - {core} or mine)
    finally:
        child.kill()
        child.wait()
    move_off_core(child.pid, [min(mine)])  # gone already: nothing raised


async def test_the_core_asks_its_threads_for_the_interpreter_soon_and_gives_the_setting_back(
    tmp_path: Path,
) -> None:
    """While a core runs, its loop waits at most 0.5 ms for the GIL (controller/gil.py);
    once it stops, the process has its own switch interval again (a bench runs on)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)  # whatever the process had: known here
    try:
        service = ControllerService(
            load_settings(None, state_dir=tmp_path / "state", pens=[]), channel=False
        )
        assert sys.getswitchinterval() == 0.004  # built, not running: untouched
        await service.start()
        assert sys.getswitchinterval() == CORE_SWITCH_INTERVAL_S
        await service.stop()
        assert sys.getswitchinterval() == 0.004
    finally:
        sys.setswitchinterval(before)
