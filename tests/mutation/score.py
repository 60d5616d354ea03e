"""Per-file mutation scores from mutmut's results (run by `make mutation`).

A mutant listed in tests/mutation/EQUIVALENT.md (by name) is equivalent to the
original: it is counted apart, not as a survivor.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

FILES = {
    "controller.safety.gate": "controller/safety/gate.py",
    "controller.safety.monitor": "controller/safety/monitor.py",
    "controller.sessions.states": "controller/sessions/states.py",
    "controller.sessions.ledger": "controller/sessions/ledger.py",
    "firmware_protocol.framing": "firmware_protocol/framing.py",
}


def main() -> int:
    equivalent = set(
        re.findall(r"`([\w.]+__mutmut_\d+)`", Path("tests/mutation/EQUIVALENT.md").read_text())
    )
    killed: Counter[str] = Counter()
    total: Counter[str] = Counter()
    same: Counter[str] = Counter()
    survivors: list[str] = []
    for meta in Path("mutants").rglob("*.py.meta"):
        data = json.loads(meta.read_text())
        for name, code in data["exit_code_by_key"].items():
            module = next((m for m in FILES if name.startswith(m + ".")), None)
            if module is None:
                continue
            if name in equivalent:
                same[module] += 1
                continue
            total[module] += 1
            # 0: the tests passed (survived); None: not run; anything else killed it
            # (a failure, or a timeout: an infinite loop is caught too).
            if code not in (0, None):
                killed[module] += 1
            else:
                survivors.append(name)
    print(f"{'file':40} {'killed':>7} {'mutants':>8} {'equiv.':>7} {'score':>7}")
    for module, path in FILES.items():
        n = total[module]
        score = 100.0 * killed[module] / n if n else 100.0
        print(f"{path:40} {killed[module]:7} {n:8} {same[module]:7} {score:6.1f}%")
    for name in sorted(survivors):
        print("survived:", name)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
