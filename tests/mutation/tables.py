"""Mutation testing of the state tables in controller/sessions/states.py (`make mutation`).

mutmut mutates code inside functions, not module-level dict literals, so the tables
are mutated here: for every row of SESSION_TRANSITIONS and ARM_TRANSITIONS, the row
is deleted, and it is sent to the most harmful state (a session that treats again by
itself: ACTIVE; a pen the controller believes disarmed while it may be armed:
DISARMED; for a row into DISARMED, a pen believed ARMED that is not). Each mutant
runs the fast tests in a forked child (the tables are mutated in place, in the
child only) and must make at least one fail. A mutant listed in
tests/mutation/EQUIVALENT.md (as ``table:...``) is equivalent, with its reason there.

Exit status 1 if a mutant survives.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.safety.context import SessionState
from controller.sessions import states
from controller.sessions.states import ArmState

TESTS = [
    "tests/test_session_states.py",
    "tests/test_session_registry.py",
    "tests/test_stateful_findings.py",
    "tests/test_session_harness.py",
    "tests/test_session_stateful.py",
]


def mutants() -> list[tuple[str, Callable[[], None]]]:
    found: list[tuple[str, Callable[[], None]]] = []
    tables: list[tuple[str, dict[Any, Any], list[Any]]] = [
        ("SESSION", states.SESSION_TRANSITIONS, [SessionState.ACTIVE]),
        ("ARM", states.ARM_TRANSITIONS, [ArmState.DISARMED, ArmState.ARMED]),
    ]
    for table_name, table, harmful in tables:
        for key, target in list(table.items()):
            row = f"{table_name}[{key[0]}, {key[1]}]"

            def delete(table: dict[Any, Any] = table, key: Any = key) -> None:
                del table[key]

            found.append((f"table:{row} deleted", delete))
            for bad in harmful:
                if bad is target or (bad is ArmState.ARMED and target is not ArmState.DISARMED):
                    continue

                def redirect(table: dict[Any, Any] = table, key: Any = key, bad: Any = bad) -> None:
                    table[key] = bad

                found.append((f"table:{row} -> {bad}", redirect))
    return found


def run_one(mutate: Callable[[], None]) -> int:
    """The fast tests against one mutant, in a child process: their exit status."""
    pid = os.fork()
    if pid == 0:  # the child: mutate, test, report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        mutate()
        code = pytest.main([*TESTS, "-x", "-q", "-p", "no:cacheprovider", "--no-header"])
        os._exit(int(code))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main() -> int:
    equivalent = set(
        re.findall(r"`(table:[^`]+)`", Path("tests/mutation/EQUIVALENT.md").read_text())
    )
    only = set(sys.argv[1:])  # names to run (default: all)
    survived, killed, same = [], 0, 0
    for name, mutate in mutants():
        if only and name not in only:
            continue
        if name in equivalent:
            same += 1
            continue
        code = run_one(mutate)
        if code == pytest.ExitCode.TESTS_FAILED:
            killed += 1
        elif code == pytest.ExitCode.OK:
            survived.append(name)
        else:
            print(f"error {code}: {name}")
            survived.append(name)
    total = killed + len(survived)
    print(
        f"controller/sessions/states.py tables: {killed} of {total} mutants killed "
        f"({100.0 * killed / total:.1f} %), {same} equivalent"
    )
    for name in survived:
        print("survived:", name)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
