"""Run a command that is SIGKILLed when its parent dies: ``python -m devtools.stack.deathsig``.

Usage: ``python -m devtools.stack.deathsig PARENT_PID -- COMMAND [ARG...]``. It sets
``PR_SET_PDEATHSIG`` (SIGKILL) and then *execs* the command, which keeps the
setting (Linux keeps it across execve for a non-setuid program) and the pid.

Why a separate program rather than ``preexec_fn``: the local stack restarts its
ingest worker while the demo's controller runs, and by then the demo has
threads (thread pools, asyncio's child watcher). Python code between fork and
exec in a threaded process can deadlock on a lock another thread held at the
fork (the subprocess documentation warns against ``preexec_fn`` there); a fresh
interpreter has no such locks.

The kernel sends the signal when the *thread* that forked the child exits; the
stack forks from its event loop's thread, which lives as long as the stack.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    """Set the death signal, check the parent is still the one named, exec the command."""
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m devtools.stack.deathsig PARENT_PID -- COMMAND [ARG...]")
        return 2
    parent, command = int(argv[0]), argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        print(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}", file=sys.stderr)
        return 1
    # The parent may have died before prctl took effect: then no signal ever comes,
    # and we were re-parented. Do not start an orphan.
    if os.getppid() != parent:
        print(f"parent {parent} is gone; not starting {command[0]}", file=sys.stderr)
        return 1
    os.execvp(command[0], command)  # never returns; raises OSError if it cannot exec


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
