"""The simulator's physics, without I/O: an EV, a contactor board and a meter.

Time comes in as an argument (``now``, trio's clock in the running simulator),
so the model is tested without sockets and integrates energy exactly.

Control pilot (IEC 61851-1 table A.3/A.4): no EV -> A; EV connected -> B;
the EV goes to C (or D) only while it wants energy *and* the station offers a
PWM duty of at least 6 A; otherwise it stays in B.

Two things are kept apart, as on a real board: the relay *drive* (what the
board commands: the contactor coil is energised only in C/D with an offer of
at least 6 A, the board enabled and no RCD trip) and the *contacts* (closed
while the coil is energised, or always when they are welded). A board with a
drive bit reports the drive (the EVSE DIN's 1007 b0); only a board with an
auxiliary contact could report the contacts, and no simulated model has one.

A welded contact keeps the EV connected to the supply after the board drops
the coil: the EV goes on drawing (up to its own and the cable's limit, since
no PWM offer is left to follow) as long as it wants energy. That is the case
a meter can see and the safety monitor judges by; an EV that stops by itself
would leave a welded contact that no current shows.

The socket's lock actuator (a board model with a ``lock``: the EV Charge
Control Basic): the board drives it to its lock coil where it is set to take
the coil (``lock_by_coil``, HR 4002 = 3 there), else by itself, locked while an
EV is plugged in. The actuator takes ``LOCK_TIME`` to move; the board's lock
detection then reads where it is. One that did not get there (the faults
``lock_fail``: it does not engage, ``unlock_fail``: it does not release) sets
the locking / unlocking error until the next command, or until the fault goes
and the actuator gets there after all (a stuck lock that frees itself).

``refuse_zero``: the board answers a current command of 0 A with exception 03,
as one whose register is documented 6..63 A may; a board that stops by its
enable coil must still be switched off by it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fieldbus.boards import PilotState

NOMINAL_VOLTAGE = 230.0
NOMINAL_FREQUENCY = 50.0
#: IEC 61851-1: the lowest current a PWM duty may offer.
MIN_OFFER = 6.0

#: How long the socket's lock actuator takes to engage or release, s.
LOCK_TIME = 0.3

FAULTS = (
    "rcd_trip",
    "pilot_error",
    "board_silent",
    "meter_silent",
    "welded",
    "overdraw",
    "lock_fail",
    "unlock_fail",
    "refuse_zero",
)


@dataclass
class EV:
    plugged: bool = False
    #: What the EV asks for while plugged: "B" (paused / full) or "C" / "D" (wants charge).
    wants: str = "C"
    phases: int = 3
    #: The EV's on-board charger limit, A per phase.
    max_current: float = 16.0


@dataclass
class Faults:
    rcd_trip: bool = False
    #: None, "E" or "F": the pilot reads as that state whatever the EV does.
    pilot_error: str | None = None
    board_silent: bool = False
    meter_silent: bool = False
    welded: bool = False
    #: Extra amperes the EV draws above the offer (0 = none).
    overdraw: float = 0.0
    #: The socket's lock does not engage (locking error, stays unlocked).
    lock_fail: bool = False
    #: The socket's lock does not release (unlocking error, stays locked).
    unlock_fail: bool = False
    #: The board answers a current command of 0 A with exception 03 (illegal
    #: value), as one documenting its register as 6..63 A may (EV-CC Basic HR 22000).
    refuse_zero: bool = False


@dataclass
class BoardState:
    #: Allowed current as commanded by the firmware, A (0 = off).
    command: float = 0.0
    enabled: bool = True
    #: Hardware failsafe, where the board model has one (seconds, amperes).
    failsafe_timeout: float = 0.0
    failsafe_current: float = 0.0
    failsafe_tripped: bool = False
    last_request: float = 0.0
    hardware_max: float = 32.0
    #: Cable (PP) limit of the plugged cable, A.
    cable_limit: float = 32.0
    #: The lock actuator follows the lock coil (else: locked while plugged in).
    lock_by_coil: bool = False
    #: The lock coil as the firmware wrote it (1 = locked).
    lock_coil: bool = False
    #: Where the board drives the actuator to, and since when.
    lock_target: bool = False
    lock_since: float = 0.0
    #: Where the actuator is (what the board's lock detection reads).
    locked: bool = False
    #: The board's lock detection: the last move did not get there.
    locking_error: bool = False
    unlocking_error: bool = False


@dataclass
class Station:
    """The whole physical state; every method takes the current time."""

    ev: EV = field(default_factory=EV)
    faults: Faults = field(default_factory=Faults)
    board: BoardState = field(default_factory=BoardState)
    energy_wh: float = 0.0
    voltage: float = NOMINAL_VOLTAGE
    frequency: float = NOMINAL_FREQUENCY
    updated: float = 0.0

    # -- derived quantities ------------------------------------------------

    @property
    def offered(self) -> float:
        """The PWM offer the EV sees, A (0 = none)."""
        b = self.board
        command = b.failsafe_current if b.failsafe_tripped else b.command
        if not b.enabled or self.faults.rcd_trip or self.faults.pilot_error:
            return 0.0
        offer = min(command, b.hardware_max, b.cable_limit if self.ev.plugged else b.hardware_max)
        return offer if offer >= MIN_OFFER else 0.0

    @property
    def pilot(self) -> PilotState:
        if self.faults.pilot_error:
            return PilotState(self.faults.pilot_error)
        if not self.ev.plugged:
            return PilotState.A
        if self.ev.wants in ("C", "D") and self.offered >= MIN_OFFER:
            return PilotState(self.ev.wants)
        return PilotState.B

    @property
    def relay_on(self) -> bool:
        """The relay drive the board commands: the contactor coil energised.

        C/D already implies an offer of at least 6 A (so enabled, no pilot
        error); an RCD trip drops the coil whatever the pilot shows.
        """
        return self.pilot in (PilotState.C, PilotState.D) and not self.faults.rcd_trip

    @property
    def contactor_closed(self) -> bool:
        """The physical contacts: closed while driven, or welded whatever the drive."""
        return self.faults.welded or self.relay_on

    @property
    def phase_currents(self) -> tuple[float, float, float]:
        if not self.ev.plugged or not self.contactor_closed:
            return (0.0, 0.0, 0.0)
        if self.relay_on:
            draw = min(self.ev.max_current, self.offered) + self.faults.overdraw
        elif self.ev.wants in ("C", "D"):
            # Welded, the coil dropped: the EV is still on the supply and,
            # with no offer to follow, draws up to its own and the cable's limit.
            draw = min(self.ev.max_current, self.board.cable_limit) + self.faults.overdraw
        else:
            # Welded, but the EV has paused by itself: only an overdraw flows.
            draw = self.faults.overdraw
        phases = 3 if self.ev.phases == 3 else 1
        return tuple(draw if i < phases else 0.0 for i in range(3))  # type: ignore[return-value]

    @property
    def phase_powers(self) -> tuple[float, float, float]:
        a, b, c = (i * self.voltage for i in self.phase_currents)
        return (a, b, c)

    # -- time and inputs ----------------------------------------------------

    def advance(self, now: float) -> None:
        """Integrate energy up to ``now`` and run the board's watchdog."""
        if now > self.updated:
            self.energy_wh += sum(self.phase_powers) * (now - self.updated) / 3600.0
            self.updated = now
        self._run_lock(now)
        b = self.board
        if (
            b.failsafe_timeout > 0
            and not b.failsafe_tripped
            and now - b.last_request >= b.failsafe_timeout
        ):
            b.failsafe_tripped = True

    def command_lock(self, locked: bool) -> None:
        """The firmware wrote the lock coil (at the time of the last ``advance``)."""
        self.board.lock_coil = locked
        self._run_lock(self.updated)

    def _run_lock(self, now: float) -> None:
        b = self.board
        target = b.lock_coil if b.lock_by_coil else self.ev.plugged
        if target != b.lock_target:
            # A new move: the last one's error goes with it.
            b.lock_target, b.lock_since = target, now
            b.locking_error = b.unlocking_error = False
        if b.locked == target:
            b.locking_error = b.unlocking_error = False
            return
        if now - b.lock_since < LOCK_TIME:
            return
        stuck = self.faults.lock_fail if target else self.faults.unlock_fail
        if stuck:
            b.locking_error, b.unlocking_error = target, not target
        else:
            b.locked = target
            b.locking_error = b.unlocking_error = False

    def board_contacted(self, now: float) -> None:
        """A Modbus request reached the board: it feeds the watchdog."""
        self.advance(now)
        self.board.last_request = now
        self.board.failsafe_tripped = False

    def to_json(self) -> dict[str, Any]:
        return {
            "ev": asdict(self.ev),
            "faults": asdict(self.faults),
            "board": asdict(self.board),
            "pilot": self.pilot.value,
            "offered_a": self.offered,
            "relay_on": self.relay_on,
            "contactor_closed": self.contactor_closed,
            "current_a": list(self.phase_currents),
            "power_w": list(self.phase_powers),
            "voltage_v": self.voltage,
            "frequency_hz": self.frequency,
            "energy_wh": self.energy_wh,
        }
