"""A finding (found while trying to wake the safety checker less often), fixed:
``SafetyMonitor.next_deadline`` gives the end of the over-current allowance as
``over_since + overcurrent_time``, and ``check`` tests ``now - over_since >=
overcurrent_time``; at ``now`` equal to that deadline the subtraction can round
below the allowance, so the checker, woken exactly at its deadline, sees no
verdict and (``Station._watch_safety``) looks again only SAFETY_RECHECK (0.25 s)
later. Today every board poll wakes the checker too, which hides it to within a
poll (0.1 s); a checker woken only by its deadlines and by readings would be up
to 0.25 s late (seen on the virtual clock: an over-current off 263 ms after the
allowance instead of 84 ms). The board and meter silences add 1 ms to their
deadlines and do not have the problem. ``check`` now compares against the same
sum ``next_deadline`` gives.
"""

from __future__ import annotations

from evse.safety import SafetyMonitor, SafetySettings


def test_the_over_current_verdict_is_given_at_its_own_deadline() -> None:
    settings = SafetySettings()
    monitor = SafetyMonitor(settings, now=0.0)
    monitor.command(0.0, 16.0)
    monitor.command_written(0.0, 16.0)
    over_since = 5.138333333333333  # a virtual-clock time the rig produced
    monitor.meter_reading(over_since, [30.0, 30.0, 30.0])
    monitor.board_reading(over_since + 4.99, contactor_closed=None)
    deadline = monitor.next_deadline()
    assert deadline == over_since + settings.overcurrent_time
    assert [c.fault.value for c in monitor.check(deadline)] == ["over_current"]
