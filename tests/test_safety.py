"""The safety monitor, sans-I/O: readings and commands at given times."""

from __future__ import annotations

import pytest

from evse.connector import Fault, FaultCleared, FaultRaised
from evse.safety import SafetyMonitor, SafetySettings

S = SafetySettings(
    board_timeout=1.0,
    meter_timeout=5.0,
    overcurrent_margin=2.0,
    overcurrent_time=5.0,
    welded_time=1.0,
)


def raised(changes: list[FaultRaised | FaultCleared]) -> set[Fault]:
    return {c.fault for c in changes if isinstance(c, FaultRaised)}


def cleared(changes: list[FaultRaised | FaultCleared]) -> set[Fault]:
    return {c.fault for c in changes if isinstance(c, FaultCleared)}


def test_silent_board_and_meter_after_their_timeouts_and_back() -> None:
    m = SafetyMonitor(S, now=0)
    assert m.check(1.0) == []
    assert raised(m.check(1.01)) == {Fault.BOARD_SILENT}
    assert m.check(2.0) == []  # reported once
    assert raised(m.check(5.01)) == {Fault.METER_SILENT}
    m.board_reading(6.0, contactor_closed=None)
    assert cleared(m.check(6.0)) == {Fault.BOARD_SILENT}
    m.meter_reading(6.5, [0.0, 0.0, 0.0])
    assert cleared(m.check(6.5)) == {Fault.METER_SILENT}


def test_over_current_needs_the_margin_for_the_whole_time() -> None:
    m = SafetyMonitor(S, now=0)
    m.command(0, 16)
    for t in range(5):
        m.board_reading(t, contactor_closed=True)
        m.meter_reading(t, [18.0, 16.0, 16.0])  # exactly at the margin: fine
        assert m.check(t) == []
    m.meter_reading(5, [18.5, 16.0, None])
    assert m.check(5) == []
    m.board_reading(9.9, contactor_closed=True)
    m.meter_reading(9.9, [18.5, 16.0, None])
    assert m.check(9.9) == []
    m.board_reading(10.0, contactor_closed=True)
    m.meter_reading(10.0, [18.5, 16.0, None])
    changes = m.check(10.0)
    assert raised(changes) == {Fault.OVER_CURRENT}
    assert "18.5 A drawn, 16 A offered" in next(
        c.info for c in changes if isinstance(c, FaultRaised)
    )


def test_a_dip_restarts_the_over_current_clock() -> None:
    m = SafetyMonitor(S, now=0)
    m.command(0, 10)
    m.meter_reading(0, [13.0])
    m.meter_reading(4, [11.0])
    m.meter_reading(5, [13.0])
    m.board_reading(9, contactor_closed=None)
    m.meter_reading(9, [13.0])
    assert m.check(9) == []
    m.board_reading(10, contactor_closed=None)
    m.meter_reading(10, [13.0])
    assert raised(m.check(10)) == {Fault.OVER_CURRENT}


def test_welded_by_feedback_latches() -> None:
    m = SafetyMonitor(S, now=0)
    m.command(0, 16)
    m.command(10, 0)
    m.command_written(10, 0)

    def at(t: float, closed: bool) -> list[FaultRaised | FaultCleared]:
        m.board_reading(t, contactor_closed=closed)
        m.meter_reading(t, [0.0, 0.0, 0.0])
        return m.check(t)

    assert at(10.5, True) == []
    assert raised(at(11.0, True)) == {Fault.WELDED}
    assert at(11.5, False) == []  # never cleared by the monitor itself
    m.reset_latched()
    assert at(11.6, False) == []
    assert raised(at(12, True)) == {Fault.WELDED}


def test_welded_by_current_on_boards_without_feedback() -> None:
    m = SafetyMonitor(S, now=0)
    m.command(0, 16)
    m.command(10, 0)
    m.command_written(10, 0)
    for t in (11, 12, 14, 14.9):
        m.board_reading(t, contactor_closed=None)
        m.meter_reading(t, [3.0, 0.0, 0.0])
        assert m.check(t) == []  # the EV is allowed time to stop drawing
    m.board_reading(15, contactor_closed=None)
    m.meter_reading(15, [3.0, 0.0, 0.0])
    assert raised(m.check(15)) == {Fault.WELDED}


def test_welded_by_current_even_where_feedback_reads_open() -> None:
    # Issue 7: feedback used to switch the current-based check off, so a
    # feedback input that reads "open" (a drive bit taken for feedback, a
    # broken wire) hid a welded contactor that still carried current.
    m = SafetyMonitor(S, now=0)
    m.command(0, 16)
    m.command_written(0.01, 16)
    m.command(10, 0)
    m.command_written(10, 0)
    for t in (11, 12, 14, 14.9):
        m.board_reading(t, contactor_closed=False)
        m.meter_reading(t, [16.0, 16.0, 16.0])
        assert m.check(t) == []  # the EV's allowance to stop drawing
    m.board_reading(15, contactor_closed=False)
    m.meter_reading(15, [16.0, 16.0, 16.0])
    changes = m.check(15)
    assert raised(changes) == {Fault.WELDED}
    assert "16.0 A flowing while switched off" in next(
        c.info for c in changes if isinstance(c, FaultRaised)
    )


def test_feedback_is_faster_than_the_current_check() -> None:
    # With feedback that reads closed, the weld shows after welded_time even
    # with no load; the current check would need the EV's whole allowance.
    m = SafetyMonitor(S, now=0)
    m.command(0, 16)
    m.command(10, 0)
    m.command_written(10, 0)
    m.board_reading(11, contactor_closed=True)
    m.meter_reading(11, [16.0, 16.0, 16.0])
    changes = m.check(11)
    assert raised(changes) == {Fault.WELDED}
    assert "feedback" in next(c.info for c in changes if isinstance(c, FaultRaised))


def test_current_from_a_stale_meter_is_no_welded_verdict() -> None:
    m = SafetyMonitor(S, now=0)
    m.command(0, 16)
    m.command(1, 0)
    m.command_written(1, 0)
    m.meter_reading(1.5, [16.0])  # the last reading, in the EV's allowance
    for t in (2, 4, 6.4):
        m.board_reading(t, contactor_closed=None)
        assert Fault.WELDED not in raised(m.check(t))
    m.board_reading(7, contactor_closed=None)
    changes = m.check(7)  # 5.5 s of meter silence: that is the verdict
    assert raised(changes) == {Fault.METER_SILENT}


def test_no_current_when_off_is_fine() -> None:
    m = SafetyMonitor(S, now=0)
    m.command(0, 16)
    m.command(1, 0)
    for t in range(2, 30):
        m.board_reading(t, contactor_closed=False)
        m.meter_reading(t, [0.2, 0.0, 0.0])
        assert m.check(t) == []


def test_feedback_from_before_the_off_write_is_not_welded() -> None:
    m = SafetyMonitor(S, now=0)
    m.command(0, 16)
    m.command_written(0.01, 16)
    m.command(10, 0)
    # A reading still in flight when the command was decided says "closed"...
    m.board_reading(10.05, contactor_closed=True)
    m.meter_reading(10.05, [0.0])
    # ...and the write itself is slow (the bus is busy): no verdict on it.
    assert m.check(11.0) == []
    m.command_written(11.1, 0)
    m.board_reading(11.2, contactor_closed=False)
    m.meter_reading(11.2, [0.0])
    assert m.check(12.0) == []


def test_an_unwritten_off_is_never_judged_welded() -> None:
    m = SafetyMonitor(S, now=0)
    m.command(0, 16)
    m.command_written(0, 16)
    m.command(1, 0)  # the board never acknowledged it
    for t in (2, 3, 4):
        m.board_reading(t, contactor_closed=True)
        m.meter_reading(t, [16.0])
        assert Fault.WELDED not in raised(m.check(t))


def test_an_unacknowledged_command_is_a_silent_board_until_it_answers() -> None:
    m = SafetyMonitor(S, now=0)
    m.board_reading(1.0, contactor_closed=None)
    m.meter_reading(1.0, [0.0])
    m.command(1.0, 16)
    m.command_failed(1.2)
    assert raised(m.check(1.21)) == {Fault.BOARD_SILENT}
    m.board_reading(1.5, contactor_closed=None)
    assert cleared(m.check(1.5)) == {Fault.BOARD_SILENT}


def test_next_deadline_is_the_earliest_verdict_due() -> None:
    m = SafetyMonitor(S, now=0)
    m.board_reading(2.0, contactor_closed=None)
    m.meter_reading(1.0, [0.0])
    assert m.next_deadline() == pytest.approx(3.0 + 1e-3)  # board: 2.0 + 1.0
    m.command(1.0, 10)
    m.meter_reading(2.5, [13.0])  # over from 2.5: due at 7.5
    m.board_reading(9.0, contactor_closed=None)
    m.meter_reading(9.0, [13.0])
    assert m.next_deadline() == pytest.approx(7.5)
    assert not m.check(m.next_deadline() - 0.01)
    assert raised(m.check(m.next_deadline())) == {Fault.OVER_CURRENT}


def test_no_weld_verdict_while_a_silent_boards_failsafe_may_apply_current() -> None:
    """A board silent for its watchdog period may apply its failsafe current by
    design: that current is no weld. Once it answers again, the EV gets its
    allowance to stop drawing before any current is judged (issue 7, found by
    the stateful test: a latched false WELDED on a Heidelberg)."""
    m = SafetyMonitor(S, now=0)
    m.failsafe(watchdog=10.0, at_most=6.0)
    m.command(0, 0)
    m.command_written(0, 0)
    m.board_reading(1, contactor_closed=None)
    for t in (12, 15, 20):  # silent since 1 s: failsafe from ~10 s on
        m.meter_reading(t, [6.0, 6.0, 6.0])
        m.check(t)
        assert m.active == {Fault.BOARD_SILENT}
    m.board_reading(21, contactor_closed=None)  # back: the failsafe ends
    m.meter_reading(21, [6.0, 0.0, 0.0])
    assert Fault.WELDED not in raised(m.check(21))
    m.meter_reading(25.9, [6.0, 0.0, 0.0])
    m.board_reading(25.9, contactor_closed=None)
    assert Fault.WELDED not in raised(m.check(25.9))
    m.meter_reading(26, [6.0, 0.0, 0.0])
    m.board_reading(26, contactor_closed=None)
    assert raised(m.check(26)) == {Fault.WELDED}  # still flowing 5 s after: a weld


def test_a_failsafe_armed_with_0_hides_nothing() -> None:
    m = SafetyMonitor(S, now=0)
    m.failsafe(watchdog=10.0, at_most=0.0)
    m.command(0, 0)
    m.command_written(0, 0)
    m.board_reading(1, contactor_closed=None)
    m.meter_reading(12, [6.0, 0.0, 0.0])
    assert Fault.WELDED in raised(m.check(12))
