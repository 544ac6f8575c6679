"""The safety monitor: stale readings, over-current and a welded contactor.

Sans-I/O: the pollers report readings and commands with the time they
happened (trio's clock); ``check(now)`` returns the faults that start or end
at ``now``. The station feeds them to the connector, which switches off
first. The monitor is deliberately independent of the connector's state: it
judges only what the hardware says against what was commanded.

* A board or meter without a good reading for longer than its timeout is a
  fault (BOARD_SILENT, METER_SILENT): the EVSE DIN has no watchdog of its own,
  so a silent bus must end charging from this side (docs/device-maps.md).
* Over-current: a phase current above the offer plus a margin for longer than
  a set time. IEC 61851-1 (annex A, PWM current changes) gives the EV 5 s to
  follow a lower offer, hence a duration, not a single sample.
* Welded contactor, judged only from readings taken after the board
  acknowledged "off" (``command_written`` with 0), by two independent checks:

  - current: the meter still measures current after the EV's own allowance to
    stop drawing (``overcurrent_time``, and at least ``welded_time``). This
    runs on every board, with or without feedback: it is what the supply
    actually does, and a feedback input that reads "open" (a broken wire, a
    contact that reads open while welded, a drive bit mistaken for feedback)
    must not hide current that flows;
  - feedback: on a board that reads an auxiliary contact of the contactor
    (``contactor_closed`` not None), the contact still closed ``welded_time``
    after the off. It is faster and sees a weld while the EV draws nothing.

  A relay *drive* bit (the EVSE DIN's 1007 b0, ``BoardStatus.relay_on``) is
  not feedback and is never passed here as ``contactor_closed``: the drive
  drops whether or not the contacts open (docs/device-maps.md).

  Neither check judges while the board, silent for (nearly) its watchdog
  period, may be applying its hardware failsafe current (``failsafe``): that
  current flows by design. Once the board answers again, the clock of the
  current check restarts, so the EV gets its allowance to stop drawing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from evse.connector import Fault, FaultCleared, FaultRaised

#: Below this a meter's phase current is noise, not a load (A).
CURRENT_NOISE = 0.5

#: A board's hardware failsafe may have tripped once it has been silent for this
#: share of its watchdog period: the board's own timer started at the last
#: request it heard, which may be a little before the last reading completed.
FAILSAFE_SLACK = 0.9


@dataclass(frozen=True, slots=True)
class SafetySettings:
    board_timeout: float = 1.0
    meter_timeout: float = 5.0
    overcurrent_margin: float = 2.0
    overcurrent_time: float = 5.0
    welded_time: float = 1.0


class SafetyMonitor:
    def __init__(self, settings: SafetySettings, *, now: float) -> None:
        self.settings = settings
        self.board_seen = now
        self.meter_seen = now
        self.commanded = 0.0
        self.commanded_at = now
        #: When the board acknowledged the current command (None: not yet).
        self.written_at: float | None = now
        self.contactor_closed: bool | None = None
        self.contactor_at = now
        self.max_current = 0.0
        self.current_at = now
        self._write_failed_at: float | None = None
        self._over_since: float | None = None
        self._active: dict[Fault, str] = {}
        #: The board's hardware failsafe: its watchdog period and the most it may
        #: apply on its own (0: none or armed with 0; inf: not known yet).
        self._failsafe_watchdog = math.inf
        self._failsafe_amps = 0.0
        #: When the board answered again after a silence in which its failsafe
        #: may have applied current (the weld clock restarts there).
        self._failsafe_left = -math.inf

    # -- what the pollers and the station report --------------------------------

    def board_reading(self, now: float, *, contactor_closed: bool | None) -> None:
        """A board reading completed at ``now`` (trio time).

        ``contactor_closed`` is auxiliary-contact feedback, None where the board
        has none (a relay drive state is not feedback: pass None for it).
        """
        if self.failsafe_possible(now):
            # The board hears requests again and leaves its failsafe: judge the
            # contactor from here, once the EV has had its allowance to stop.
            self._failsafe_left = now
        self.board_seen = now
        self.contactor_closed = contactor_closed
        self.contactor_at = now

    def meter_reading(self, now: float, currents: Sequence[float | None]) -> None:
        self.meter_seen = now
        self.current_at = now
        self.max_current = max((c for c in currents if c is not None), default=0.0)
        limit = self.commanded + self.settings.overcurrent_margin
        if self.commanded > 0 and self.max_current > limit:
            if self._over_since is None:
                self._over_since = now
        else:
            self._over_since = None

    def failsafe(self, *, watchdog: float, at_most: float) -> None:
        """The board's hardware failsafe: after ``watchdog`` s without a request it
        applies up to ``at_most`` A of its own accord (0: it switches off)."""
        self._failsafe_watchdog = watchdog
        self._failsafe_amps = at_most

    def failsafe_possible(self, now: float) -> bool:
        """Whether the board, silent this long, may be applying its failsafe current:
        current then flows by design, so it says nothing about the contactor."""
        return (
            self._failsafe_amps > 0
            and now - self.board_seen >= self._failsafe_watchdog * FAILSAFE_SLACK
        )

    def command(self, now: float, amps: float) -> None:
        """The station is about to command ``amps``.

        The over-current clock is not restarted by a change of the offer: after
        a decrease, the first reading above the new offer starts it, which
        gives the EV its allowance from then on; an EV that was already above
        the old, higher offer keeps its earlier start. Restarting it on every
        change would let an offer that changes often hide an over-current.
        """
        if amps != self.commanded:
            self.commanded = amps
            self.commanded_at = now
            self.written_at = None

    def command_failed(self, now: float) -> None:
        """The board did not acknowledge a current command: treat it as silent
        until a board reading completes after this moment."""
        self._write_failed_at = now

    def command_written(self, now: float, amps: float) -> None:
        """The board acknowledged the command at ``now``.

        Feedback is judged only from readings completed after this: the bus
        carries one request at a time, so such a reading was also *taken*
        after the board had the command, never one in flight before it.
        """
        if amps == self.commanded and self.written_at is None:
            self.written_at = now

    # -- the verdict ------------------------------------------------------------------

    def check(self, now: float) -> list[FaultRaised | FaultCleared]:
        s = self.settings
        wanted: dict[Fault, str] = {}
        board_age = now - self.board_seen
        if board_age > s.board_timeout:
            wanted[Fault.BOARD_SILENT] = f"no board reading for {board_age:.1f} s"
        elif self._write_failed_at is not None:
            if self.board_seen <= self._write_failed_at:
                wanted[Fault.BOARD_SILENT] = "a current command was not acknowledged"
            else:
                self._write_failed_at = None
        meter_age = now - self.meter_seen
        if meter_age > s.meter_timeout:
            wanted[Fault.METER_SILENT] = f"no meter reading for {meter_age:.1f} s"
        # The same sum next_deadline gives (not ``now - over_since``, which can
        # round below the allowance at that very instant and leave the checker,
        # woken at its deadline, without a verdict until its next look).
        if self._over_since is not None and now >= self._over_since + s.overcurrent_time:
            wanted[Fault.OVER_CURRENT] = (
                f"{self.max_current:.1f} A drawn, {self.commanded:g} A offered"
            )
        # Welded: only once the board has acknowledged the off (an off still in
        # flight, or refused, proves nothing about the contactor).
        off_since = self.written_at if self.commanded == 0 else None
        if off_since is not None and not self.failsafe_possible(now):
            off_since = max(off_since, self._failsafe_left)
            # Current is judged on every board, feedback or not: an EV may take
            # the allowance to stop drawing, after that any current means the
            # contacts did not open. The reading must itself be fresh; a stale
            # meter is METER_SILENT, not a verdict on the contactor.
            if (
                self.max_current > CURRENT_NOISE
                and self.current_at - off_since >= max(s.welded_time, s.overcurrent_time)
                and meter_age <= s.meter_timeout
            ):
                wanted[Fault.WELDED] = f"{self.max_current:.1f} A flowing while switched off"
            # Feedback, where the board reads an auxiliary contact: faster, and
            # sees a weld while nothing is drawn.
            elif self.contactor_closed and self.contactor_at - off_since >= s.welded_time:
                wanted[Fault.WELDED] = "contactor feedback closed while switched off"
        if Fault.WELDED in self._active:
            wanted.setdefault(Fault.WELDED, self._active[Fault.WELDED])
        changes: list[FaultRaised | FaultCleared] = [
            FaultRaised(fault, info) for fault, info in wanted.items() if fault not in self._active
        ]
        changes += [FaultCleared(fault) for fault in self._active if fault not in wanted]
        self._active = wanted
        return changes

    def next_deadline(self) -> float:
        """The earliest time a verdict can change without a new reading or command.

        Readings and commands can change verdicts too; whoever reports them
        wakes the checker. In between it sleeps until this time.
        """
        s = self.settings
        # Silence is "longer than" the timeout: look just after it.
        after = 1e-3
        deadlines = [
            self.board_seen + s.board_timeout + after,
            self.meter_seen + s.meter_timeout + after,
        ]
        if self._over_since is not None:
            deadlines.append(self._over_since + s.overcurrent_time)
        return min(deadlines)

    def reset_latched(self) -> None:
        """After an installer reset: a contactor still welded is reported again."""
        self._active.pop(Fault.WELDED, None)

    @property
    def active(self) -> frozenset[Fault]:
        return frozenset(self._active)
