"""Bugs the extended stateful machine (test_session_stateful.py) found, each as the
smallest sequence that shows it, through the bench (real firmware + delivery)."""

from __future__ import annotations

from controller.safety import SessionState
from controller.sessions import EndSession, PauseSession

from .test_session_harness import PORT, THERAPIST
from .test_session_registry import SID, treating


def test_a_run_unheard_before_the_session_ended_is_a_pass_of_that_session() -> None:
    """The link drops while the pen is armed; within the lease the therapist presses
    (the needle runs, nobody hears it) and then ends the interrupted session. When the
    link is back, the pen's counters show the run: it was made under that session's
    arming, so it is one of its passes, not an unapproved run."""
    bench = treating("forehead", 800)
    pen = bench.pens[PORT]
    bench.connected[PORT] = False  # the host hears nothing; the pen is still armed
    pen.press()
    pen.sample(800, strokes=25)
    pen.release()
    bench.feed(bench.registry.link_down(PORT, "silent", bench.tick()))
    assert bench.act(EndSession(SID, THERAPIST)).refusal is None
    bench.connect()
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.ENDED
    assert pen.firmware.runs == 1
    assert session.zones["forehead"].passes_done == 1  # was 0: the run was never counted
    assert session.passes[-1].recovered
    assert bench.registry.ledger.status(42, "next-client") == "spent"


def test_a_pen_rebooting_mid_pass_counts_that_pass_once() -> None:
    """The pen restarts in the middle of a pass, with the link up. The pass is counted
    when the reboot is announced; after the new handshake the cartridge chip shows more
    strokes than when the pass started, which is that same pass, not another one."""
    bench = treating("cheeks", 1000)
    pen = bench.pens[PORT]
    bench.pen_says(pen.press())
    bench.pen_says(pen.sample(1000, strokes=10)[:-1])
    bench.reboot()
    assert pen.firmware.runs == 0 and pen.firmware.cartridge_strokes == 10  # one run ran
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.FAULTED  # §4.7
    assert session.zones["cheeks"].passes_done == 1  # was 2: counted again from the chip


def test_pausing_mid_pass_with_a_sample_on_the_line_is_no_fault() -> None:
    """The therapist pauses during a pass; the pen's last sample, taken before the Stop
    reached it, still shows the needle running and arrives after the pause was decided.
    That run was approved until our Stop: the session is paused, not faulted (it was
    faulted with 'The needle was running without an approved treatment setting')."""
    bench = treating("cheeks", 1000)
    pen = bench.pens[PORT]
    bench.pen_says(pen.press())
    on_the_line = pen.sample(1000, strokes=10)  # sent, not yet heard by the host
    assert pen.firmware.running
    pause = bench.registry.handle(PauseSession(SID, THERAPIST), bench.tick())
    assert pause.refusal is None
    bench.feed(pause, in_flight=on_the_line)
    assert not pen.firmware.running and not pen.firmware.armed
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.PAUSED
    assert session.fault is None
