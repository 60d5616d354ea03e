"""The session journal: atomic saves, reload after a crash, backups."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controller.journal import Journal


def test_save_load_order_and_overwrite(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.save("session", "a", {"passes": 1})
    j.save("session", "b", {"passes": 2})
    j.save("session", "a", {"passes": 3})
    assert j.load("session", "a") == {"passes": 3}
    assert j.load("session", "zzz") is None
    assert list(j.load_all("session").items()) == [("b", {"passes": 2}), ("a", {"passes": 3})]
    j.close()
    again = Journal(tmp_path / "j.db")
    again.save("session", "c", {})
    assert list(again.load_all("session")) == ["b", "a", "c"]  # versions continue


def test_save_many_is_atomic(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    with pytest.raises(TypeError):
        j.save_many([("s", "ok", {"x": 1}), ("s", "bad", {"x": object()})])
    assert j.load_all("s") == {}


def test_backup_is_a_consistent_copy(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.save("cartridge", "77", {"used_by": "s1"})
    j.backup(tmp_path / "copy.db")
    assert Journal(tmp_path / "copy.db").load("cartridge", "77") == {"used_by": "s1"}


def test_every_acknowledged_save_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    writer = textwrap.dedent(
        f"""
        from pathlib import Path
        from controller.journal import Journal
        j = Journal(Path({str(path)!r}))
        i = 0
        while True:
            j.save_many([("session", "s1", {{"passes": i}}), ("cartridge", "c1", {{"n": i}})])
            print(i, flush=True)
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    last = -1
    for line in proc.stdout:
        last = int(line)
        if last >= 200:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    j = Journal(path)
    session, cartridge = j.load("session", "s1"), j.load("cartridge", "c1")
    assert session is not None
    assert cartridge is not None
    assert session["passes"] >= last
    assert session["passes"] == cartridge["n"]  # both documents or neither
