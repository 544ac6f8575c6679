"""The connector state machine: IEC 61851 control pilot in, OCPP 1.6 status out.

Theory of operation
-------------------
A ``Connector`` is a pure object (h11 style): ``handle(event, now)`` takes one
event and the current time on trio's clock and returns the effects the I/O
layer must carry out, in order. It never touches a socket, the bus or the
disk. Every (state, event) pair is listed in ``TRANSITIONS``; a pair that is
not listed raises ``IllegalTransition`` naming both.

Inputs are the raw control-pilot state from the board (IEC 61851-1 table
A.3: A no EV, B connected, C/D charging, E/F error), authorizations already
decided by the authorization chain, stop requests (local, remote, reboot,
...), the offered-current limit from the arbitration (``evse.limits``: below
6 A it is 0), faults from the board and the safety monitor, availability and
timer expiries.

Effects are data: ``SetCurrent`` (the board's allowed current; 0 switches
off), ``BeginTransaction`` / ``EndTransaction`` (persisted by the station
before it relies on them), ``StatusChanged`` (OCPP StatusNotification,
section 4.9), ``StartTimer`` / ``CancelTimer``.

Safety rules the table keeps (and the stateful test checks):
* a current above 0 is commanded only while a transaction runs, no fault is
  active and the limit is at least 6 A (IEC 61851-1: 6 A is the lowest PWM
  offer);
* every fault, and every end of a transaction, commands 0 A first, before
  anything is written or sent;
* a welded contactor is a latched fault: cleared only by ``ResetFaults``
  from the installer, never by itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum
from types import MappingProxyType

from evse.errors import IllegalTransition
from evse.limits import MIN_CURRENT
from fieldbus.signals import PilotState

# Re-exported: the OCPP vocabulary is declared once, in ocpp16.vocabulary
# (stdlib only), and imported from here by the rest of evse/.
from ocpp16.vocabulary import ErrorCode as ErrorCode  # noqa: PLC0414
from ocpp16.vocabulary import Status as Status  # noqa: PLC0414
from ocpp16.vocabulary import StopReason as StopReason  # noqa: PLC0414


class Fault(StrEnum):
    """What the station detects; each maps to one OCPP error code."""

    RCD_TRIP = "rcd_trip"
    PILOT_ERROR = "pilot_error"
    DIODE = "diode_check_failed"
    OVER_CURRENT = "over_current"
    WELDED = "contactor_welded"
    BOARD_SILENT = "board_silent"
    BOARD_ERROR = "board_error"
    OVERTEMPERATURE = "overtemperature"
    METER_SILENT = "meter_silent"
    INTERNAL = "internal_error"
    #: The store keeps failing to persist a transaction's readings (disk full).
    STORE = "store_failure"


FAULT_ERROR_CODES: Mapping[Fault, ErrorCode] = MappingProxyType(
    {
        Fault.RCD_TRIP: ErrorCode.GROUND_FAILURE,
        Fault.PILOT_ERROR: ErrorCode.EV_COMMUNICATION_ERROR,
        Fault.DIODE: ErrorCode.EV_COMMUNICATION_ERROR,
        Fault.OVER_CURRENT: ErrorCode.OVER_CURRENT_FAILURE,
        Fault.WELDED: ErrorCode.POWER_SWITCH_FAILURE,
        Fault.BOARD_SILENT: ErrorCode.INTERNAL_ERROR,
        Fault.BOARD_ERROR: ErrorCode.OTHER_ERROR,
        Fault.OVERTEMPERATURE: ErrorCode.HIGH_TEMPERATURE,
        Fault.METER_SILENT: ErrorCode.POWER_METER_FAILURE,
        Fault.INTERNAL: ErrorCode.INTERNAL_ERROR,
        Fault.STORE: ErrorCode.INTERNAL_ERROR,
    }
)

#: Faults that stay until an installer resets them: a welded contactor cannot
#: be trusted to open again, so charging must never resume by itself.
LATCHING: frozenset[Fault] = frozenset({Fault.WELDED})

#: The order in which simultaneous faults name the reported error code.
_FAULT_PRIORITY = tuple(Fault)


class State(Enum):
    IDLE = "idle"  # no EV, nobody authorized
    RESERVED = "reserved"  # held for one id tag until the reservation expires
    AUTHORIZED = "authorized"  # authorized, waiting for the EV (ConnectionTimeOut runs)
    PLUGGED = "plugged"  # EV connected, waiting for an authorization
    CHARGING = "charging"  # transaction running, EV in C/D, offer >= 6 A
    SUSPENDED_EV = "suspended_ev"  # transaction running, EV in B although offered
    SUSPENDED_EVSE = "suspended_evse"  # transaction running, offer below 6 A
    FINISHING = "finishing"  # transaction over, EV still connected
    UNAVAILABLE = "unavailable"  # ChangeAvailability Inoperative
    FAULTED = "faulted"


STATUS_OF_STATE: Mapping[State, Status] = MappingProxyType(
    {
        State.IDLE: Status.AVAILABLE,
        State.RESERVED: Status.RESERVED,
        State.AUTHORIZED: Status.PREPARING,
        State.PLUGGED: Status.PREPARING,
        State.CHARGING: Status.CHARGING,
        State.SUSPENDED_EV: Status.SUSPENDED_EV,
        State.SUSPENDED_EVSE: Status.SUSPENDED_EVSE,
        State.FINISHING: Status.FINISHING,
        State.UNAVAILABLE: Status.UNAVAILABLE,
        State.FAULTED: Status.FAULTED,
    }
)

IN_TRANSACTION = frozenset({State.CHARGING, State.SUSPENDED_EV, State.SUSPENDED_EVSE})

CONNECTION_TIMER = "connection_timeout"
RESERVATION_TIMER = "reservation"


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: int
    id_tag: str
    parent_id_tag: str | None
    deadline: float

    def claimed_by(self, event: Authorized) -> bool:
        """The reserved tag, or a tag with the reservation's parent (OCPP 1.6 5.13).

        Id tags are CiString20Type: compared case-insensitively."""
        if _same_tag(event.id_tag, self.id_tag):
            return True
        parent = self.parent_id_tag
        return parent is not None and _same_tag(event.parent_id_tag, parent)


def _same_tag(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip().upper() == b.strip().upper()


# -- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PilotChanged:
    pilot: PilotState


@dataclass(frozen=True, slots=True)
class Authorized:
    """The authorization chain accepted ``id_tag`` (rejections never get here)."""

    id_tag: str
    #: The tag's parent (OCPP 1.6 IdTagInfo.parentIdTag): it may claim a
    #: reservation made for the parent.
    parent_id_tag: str | None = None


@dataclass(frozen=True, slots=True)
class ReservationMade:
    """OCPP 1.6 ReserveNow (section 5.13): only ``id_tag`` may charge until ``deadline``."""

    reservation_id: int
    id_tag: str
    deadline: float
    parent_id_tag: str | None = None


@dataclass(frozen=True, slots=True)
class ReservationCancelled:
    reservation_id: int


@dataclass(frozen=True, slots=True)
class StopRequested:
    reason: StopReason
    id_tag: str | None = None


@dataclass(frozen=True, slots=True)
class LimitChanged:
    """The arbitrated offer in A; below 6 A the arbitration already made it 0."""

    amps: float


@dataclass(frozen=True, slots=True)
class FaultRaised:
    fault: Fault
    info: str = ""


@dataclass(frozen=True, slots=True)
class FaultCleared:
    fault: Fault


@dataclass(frozen=True, slots=True)
class ResetFaults:
    """An installer clears latched faults (a welded contactor was replaced)."""


@dataclass(frozen=True, slots=True)
class AvailabilityChanged:
    operative: bool


@dataclass(frozen=True, slots=True)
class TimerExpired:
    name: str


@dataclass(frozen=True, slots=True)
class PowerLossRecovered:
    """At start: a transaction the power loss interrupted was ended (PowerLoss);
    ``pilot`` is the board's first reading. With the EV still plugged in, the
    connector is Finishing, not Preparing (OCPP 1.6 4.9: a stopped transaction
    with the cable in is Finishing until unplugged or a new authorization)."""

    pilot: PilotState


@dataclass(frozen=True, slots=True)
class MeterSample:
    """The latest meter reading: the start and stop values of transactions."""

    energy_wh: float


Event = (
    PilotChanged
    | Authorized
    | ReservationMade
    | ReservationCancelled
    | StopRequested
    | LimitChanged
    | FaultRaised
    | FaultCleared
    | ResetFaults
    | AvailabilityChanged
    | TimerExpired
    | MeterSample
    | PowerLossRecovered
)


# -- effects ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetCurrent:
    """Command the board's allowed current; 0 switches charging off."""

    amps: float


@dataclass(frozen=True, slots=True)
class BeginTransaction:
    id_tag: str
    meter_start_wh: float
    #: The reservation this transaction uses (StartTransaction.req reservationId).
    reservation_id: int | None = None


@dataclass(frozen=True, slots=True)
class EndTransaction:
    reason: StopReason
    meter_stop_wh: float
    id_tag: str | None = None


@dataclass(frozen=True, slots=True)
class StatusChanged:
    status: Status
    error_code: ErrorCode
    info: str = ""


@dataclass(frozen=True, slots=True)
class StartTimer:
    name: str
    deadline: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


Effect = SetCurrent | BeginTransaction | EndTransaction | StatusChanged | StartTimer | CancelTimer


# -- the machine ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the machine knows; transitions return a new one."""

    state: State = State.IDLE
    pilot: PilotState = PilotState.A
    limit: float = 0.0
    energy_wh: float | None = None
    #: The id tag authorized for the next or the running transaction.
    id_tag: str | None = None
    faults: Mapping[Fault, str] = field(default_factory=dict)
    operative: bool = True
    #: The current last commanded to the board.
    commanded: float = 0.0
    reservation: Reservation | None = None
    #: The reservation the authorized id tag claimed (state AUTHORIZED only): its
    #: id goes into the transaction's start, and it holds the connector again if
    #: the authorization lapses before the reservation expires.
    claimed: Reservation | None = None

    @property
    def plugged(self) -> bool:
        return self.pilot in (PilotState.B, PilotState.C, PilotState.D)

    @property
    def in_transaction(self) -> bool:
        return self.state in IN_TRANSACTION


Transition = Callable[["Connector", Snapshot, object, float], Snapshot]


class Connector:
    """One connector. ``handle`` is the only way its state changes."""

    def __init__(self, *, connection_timeout: float = 120.0, connector_id: int = 1) -> None:
        self.connector_id = connector_id
        #: OCPP ConnectionTimeOut: how long an authorization waits for the EV.
        self.connection_timeout = connection_timeout
        self.snapshot = Snapshot()
        self._effects: list[Effect] = []
        self._reported: tuple[Status, ErrorCode, str] | None = None

    @property
    def state(self) -> State:
        return self.snapshot.state

    @property
    def status(self) -> Status:
        return STATUS_OF_STATE[self.snapshot.state]

    @property
    def error_code(self) -> ErrorCode:
        return _error_code(self.snapshot)

    def start(self) -> list[Effect]:
        """Effects for a fresh start: switch off and report the status."""
        self._effects = [SetCurrent(0.0)]
        self.snapshot = replace(self.snapshot, commanded=0.0)
        self._report(self.snapshot)
        return self._take()

    def handle(self, event: Event, now: float) -> list[Effect]:
        """Apply one event; returns the effects to carry out, in order."""
        transition = TRANSITIONS.get(self.snapshot.state, {}).get(type(event))
        if transition is None:
            raise IllegalTransition(self.snapshot.state.value, type(event).__name__)
        new = transition(self, self.snapshot, event, now)
        if new.claimed is not None and new.state is not State.AUTHORIZED:
            # A claimed reservation lives only as long as the authorization that
            # claimed it: a transaction took it (``_begin``), or a fault or
            # unavailability ended it (OCPP 1.6 5.13).
            new = replace(new, claimed=None)
        self.snapshot = new
        self._report(new)
        return self._take()

    # -- helpers used by the transitions ---------------------------------------

    def _emit(self, effect: Effect) -> None:
        self._effects.append(effect)

    def _take(self) -> list[Effect]:
        effects, self._effects = self._effects, []
        return effects

    def _command(self, snap: Snapshot, amps: float) -> Snapshot:
        # Off is written again even when already off: repeating it is harmless
        # and a board that reset meanwhile gets it too (once per event).
        if amps != snap.commanded or (amps == 0.0 and SetCurrent(0.0) not in self._effects):
            self._emit(SetCurrent(amps))
        return replace(snap, commanded=amps)

    def _report(self, snap: Snapshot) -> None:
        info = ", ".join(f"{f.value}: {i}" if i else f.value for f, i in _ordered(snap.faults))
        status = (STATUS_OF_STATE[snap.state], _error_code(snap), info)
        if status != self._reported:
            self._reported = status
            self._emit(StatusChanged(*status))


def _ordered(faults: Mapping[Fault, str]) -> list[tuple[Fault, str]]:
    return sorted(faults.items(), key=lambda item: _FAULT_PRIORITY.index(item[0]))


def _error_code(snap: Snapshot) -> ErrorCode:
    if not snap.faults:
        return ErrorCode.NO_ERROR
    return FAULT_ERROR_CODES[_ordered(snap.faults)[0][0]]


def _tx_state(snap: Snapshot) -> State:
    """The transaction sub-state: who is holding charging back, if anyone."""
    if snap.limit < MIN_CURRENT:
        return State.SUSPENDED_EVSE
    if snap.pilot in (PilotState.C, PilotState.D):
        return State.CHARGING
    return State.SUSPENDED_EV


def _offer(snap: Snapshot) -> float:
    return snap.limit if snap.limit >= MIN_CURRENT and not snap.faults else 0.0


def _idle_or_plugged(snap: Snapshot) -> State:
    if not snap.operative:
        return State.UNAVAILABLE
    return State.FINISHING if snap.plugged else State.IDLE


# -- transitions ------------------------------------------------------------------
# Each takes (connector, snapshot, event, now) and returns the next snapshot,
# emitting effects through the connector. Named for what they do.


def _keep(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """Legal and without consequence in this state."""
    return s


def _note_meter(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, MeterSample)
    return replace(s, energy_wh=e.energy_wh)


def _note_limit(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, LimitChanged)
    return replace(s, limit=e.amps)


def _note_pilot(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """Record the pilot; E and F are faults in every state (IEC 61851-1 A.3)."""
    assert isinstance(e, PilotChanged)
    s = replace(s, pilot=e.pilot)
    if e.pilot in (PilotState.E, PilotState.F):
        return _raise(c, s, FaultRaised(Fault.PILOT_ERROR, f"control pilot {e.pilot.value}"), now)
    if Fault.PILOT_ERROR in s.faults:
        return _clear(c, s, FaultCleared(Fault.PILOT_ERROR), now)
    return s


def _begin(c: Connector, s: Snapshot, id_tag: str, now: float) -> Snapshot:
    """Authorized and plugged, in either order: start the transaction.

    The record is persisted by the station (``BeginTransaction``) before the
    ``SetCurrent`` that follows lets the board close the contactor.
    """
    if s.energy_wh is None:
        # No meter reading yet (just started): a transaction needs its
        # meterStart (OCPP 1.6 StartTransaction.req). Hold the authorization
        # and start at the first reading; a meter that stays silent is the
        # safety monitor's fault to raise, and ConnectionTimeOut ends the wait.
        if s.state is not State.AUTHORIZED:
            c._emit(StartTimer(CONNECTION_TIMER, now + c.connection_timeout))
        return replace(s, state=State.AUTHORIZED, id_tag=id_tag)
    c._emit(CancelTimer(CONNECTION_TIMER))
    claimed = s.claimed.reservation_id if s.claimed is not None else None
    c._emit(BeginTransaction(id_tag, s.energy_wh, claimed))
    s = replace(s, id_tag=id_tag, claimed=None)
    s = replace(s, state=_tx_state(s))
    return c._command(s, _offer(s))


def _end(c: Connector, s: Snapshot, reason: StopReason, id_tag: str | None) -> Snapshot:
    """Off first, then the record: a stop must never wait for the disk."""
    s = c._command(s, 0.0)
    c._emit(EndTransaction(reason, s.energy_wh if s.energy_wh is not None else 0.0, id_tag))
    return replace(s, id_tag=None)


def _idle_authorize(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, Authorized)
    c._emit(StartTimer(CONNECTION_TIMER, now + c.connection_timeout))
    return replace(s, state=State.AUTHORIZED, id_tag=e.id_tag)


def _idle_recovered(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, PowerLossRecovered)
    s = _note_pilot(c, s, PilotChanged(e.pilot), now)
    if s.state is State.IDLE and s.plugged:
        return replace(s, state=State.FINISHING)
    return s


def _idle_pilot(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    s = _note_pilot(c, s, e, now)
    if s.state is State.IDLE and s.plugged:
        return replace(s, state=State.PLUGGED)
    return s


def _authorized_pilot(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    s = _note_pilot(c, s, e, now)
    if s.state is State.AUTHORIZED and s.plugged:
        assert s.id_tag is not None
        return _begin(c, s, s.id_tag, now)
    return s


def _authorized_meter(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """The first reading a held start was waiting for."""
    s = _note_meter(c, s, e, now)
    if s.plugged and s.id_tag is not None:
        return _begin(c, s, s.id_tag, now)
    return s


def _authorized_again(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """A second card while waiting: it takes over, and the wait starts again."""
    assert isinstance(e, Authorized)
    c._emit(StartTimer(CONNECTION_TIMER, now + c.connection_timeout))
    return replace(s, id_tag=e.id_tag)


def _authorized_stop(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    c._emit(CancelTimer(CONNECTION_TIMER))
    # An EV may be plugged in (a start held for the first meter reading).
    return replace(s, state=State.PLUGGED if s.plugged else State.IDLE, id_tag=None)


def _authorized_timer(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """ConnectionTimeOut: the EV never came; the authorization lapses (OCPP 1.6 9.1.7)."""
    assert isinstance(e, TimerExpired)
    if e.name != CONNECTION_TIMER:
        return s
    return replace(s, state=State.PLUGGED if s.plugged else State.IDLE, id_tag=None)


def _plugged_pilot(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    s = _note_pilot(c, s, e, now)
    if s.state is State.PLUGGED and not s.plugged:
        return replace(s, state=State.IDLE)
    return s


def _plugged_authorize(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, Authorized)
    return _begin(c, s, e.id_tag, now)


def _tx_pilot(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, PilotChanged)
    if e.pilot is PilotState.A:
        # StopTransactionOnEVSideDisconnect is true on this station (R, 1).
        s = _end(c, replace(s, pilot=e.pilot), StopReason.EV_DISCONNECTED, None)
        return replace(s, state=_idle_or_plugged(s))
    s = _note_pilot(c, s, e, now)
    if s.state in IN_TRANSACTION:
        s = replace(s, state=_tx_state(s))
    return s


def _tx_limit(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    s = _note_limit(c, s, e, now)
    s = replace(s, state=_tx_state(s))
    return c._command(s, _offer(s))


def _tx_stop(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, StopRequested)
    s = _end(c, s, e.reason, e.id_tag)
    return replace(s, state=_idle_or_plugged(s))


def _tx_authorize(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """The same card again stops the transaction (Local); another card is ignored."""
    assert isinstance(e, Authorized)
    if e.id_tag != s.id_tag:
        return s
    return _tx_stop(c, s, StopRequested(StopReason.LOCAL, e.id_tag), now)


def _tx_availability(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """Inoperative during a transaction is Scheduled: it applies when the EV is done."""
    assert isinstance(e, AvailabilityChanged)
    return replace(s, operative=e.operative)


def _finishing_pilot(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    s = _note_pilot(c, s, e, now)
    if s.state is State.FINISHING and not s.plugged:
        return replace(s, state=State.IDLE)
    return s


def _raise(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, FaultRaised)
    faults = {**s.faults, e.fault: e.info}
    if s.in_transaction:
        s = _end(c, replace(s, faults=faults), StopReason.OTHER, None)
    else:
        s = c._command(replace(s, faults=faults), 0.0)
    if s.state is State.AUTHORIZED:
        c._emit(CancelTimer(CONNECTION_TIMER))
    if s.state is State.RESERVED:
        # A faulted connector cannot honour a reservation (OCPP 1.6 5.13).
        c._emit(CancelTimer(RESERVATION_TIMER))
    return replace(s, state=State.FAULTED, id_tag=None, reservation=None)


def _clear(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, FaultCleared)
    if e.fault in LATCHING or e.fault not in s.faults:
        return s
    faults = {f: i for f, i in s.faults.items() if f is not e.fault}
    s = replace(s, faults=faults)
    if s.state is State.FAULTED and not faults:
        return replace(s, state=_idle_or_plugged(s))
    return s


def _reset_faults(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """Installer reset: latched faults go; live ones come back at the next poll."""
    faults = {f: i for f, i in s.faults.items() if f not in LATCHING}
    s = replace(s, faults=faults)
    if s.state is State.FAULTED and not faults:
        return replace(s, state=_idle_or_plugged(s))
    return s


def _idle_reserve(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, ReservationMade)
    c._emit(StartTimer(RESERVATION_TIMER, e.deadline))
    reservation = Reservation(e.reservation_id, e.id_tag, e.parent_id_tag, e.deadline)
    return replace(s, state=State.RESERVED, reservation=reservation)


def _reservation_ends(c: Connector, s: Snapshot) -> Snapshot:
    c._emit(CancelTimer(RESERVATION_TIMER))
    s = replace(s, reservation=None)
    return replace(s, state=State.PLUGGED if s.plugged else State.IDLE)


def _reserved_authorize(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """Only the reservation's tag (or one of its parent's) may use the connector."""
    assert isinstance(e, Authorized)
    assert s.reservation is not None
    if not s.reservation.claimed_by(e):
        return s
    c._emit(CancelTimer(RESERVATION_TIMER))
    s = replace(s, reservation=None)
    if s.plugged:
        return _begin(c, s, e.id_tag, now)
    return _idle_authorize(c, replace(s, state=State.IDLE), e, now)


def _reserved_timer(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, TimerExpired)
    if e.name != RESERVATION_TIMER:
        return s
    return _reservation_ends(c, s)


def _reserved_cancel(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, ReservationCancelled)
    assert s.reservation is not None
    if e.reservation_id != s.reservation.reservation_id:
        return s
    return _reservation_ends(c, s)


def _to_unavailable(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, AvailabilityChanged)
    if e.operative:
        return replace(s, operative=True)
    if s.state is State.AUTHORIZED:
        c._emit(CancelTimer(CONNECTION_TIMER))
    if s.state is State.RESERVED:
        c._emit(CancelTimer(RESERVATION_TIMER))
        s = replace(s, reservation=None)
    s = c._command(replace(s, operative=False, id_tag=None), 0.0)
    return replace(s, state=State.UNAVAILABLE)


def _unavailable_availability(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, AvailabilityChanged)
    if not e.operative:
        return s
    s = replace(s, operative=True)
    return replace(s, state=State.PLUGGED if s.plugged else State.IDLE)


def _faulted_availability(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, AvailabilityChanged)
    return replace(s, operative=e.operative)


def _finishing_authorize(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """A new authorization while the EV is still connected starts a new transaction."""
    assert isinstance(e, Authorized)
    return _begin(c, s, e.id_tag, now)


def _finishing_availability(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, AvailabilityChanged)
    if e.operative:
        return replace(s, operative=True)
    return replace(s, operative=False, state=State.UNAVAILABLE)


_COMMON: dict[type, Transition] = {
    # Only a fresh start can follow a power loss; anywhere else it changes nothing.
    PowerLossRecovered: _keep,
    MeterSample: _note_meter,
    LimitChanged: _note_limit,
    FaultRaised: _raise,
    FaultCleared: _clear,
    ResetFaults: _reset_faults,
}

_TX: dict[type, Transition] = {
    **_COMMON,
    PilotChanged: _tx_pilot,
    Authorized: _tx_authorize,
    StopRequested: _tx_stop,
    LimitChanged: _tx_limit,
    AvailabilityChanged: _tx_availability,
    TimerExpired: _keep,
}

TRANSITIONS: Mapping[State, Mapping[type, Transition]] = MappingProxyType(
    {
        State.IDLE: {
            **_COMMON,
            PilotChanged: _idle_pilot,
            PowerLossRecovered: _idle_recovered,
            Authorized: _idle_authorize,
            ReservationMade: _idle_reserve,
            StopRequested: _keep,
            AvailabilityChanged: _to_unavailable,
            TimerExpired: _keep,
        },
        State.RESERVED: {
            **_COMMON,
            # An EV plugged in at a reserved connector waits for the reserved tag.
            PilotChanged: _note_pilot,
            Authorized: _reserved_authorize,
            ReservationCancelled: _reserved_cancel,
            StopRequested: _keep,
            AvailabilityChanged: _to_unavailable,
            TimerExpired: _reserved_timer,
        },
        State.AUTHORIZED: {
            **_COMMON,
            MeterSample: _authorized_meter,
            PilotChanged: _authorized_pilot,
            Authorized: _authorized_again,
            StopRequested: _authorized_stop,
            AvailabilityChanged: _to_unavailable,
            TimerExpired: _authorized_timer,
        },
        State.PLUGGED: {
            **_COMMON,
            PilotChanged: _plugged_pilot,
            Authorized: _plugged_authorize,
            StopRequested: _keep,
            AvailabilityChanged: _to_unavailable,
            TimerExpired: _keep,
        },
        State.CHARGING: _TX,
        State.SUSPENDED_EV: _TX,
        State.SUSPENDED_EVSE: _TX,
        State.FINISHING: {
            **_COMMON,
            PilotChanged: _finishing_pilot,
            Authorized: _finishing_authorize,
            StopRequested: _keep,
            AvailabilityChanged: _finishing_availability,
            TimerExpired: _keep,
        },
        State.UNAVAILABLE: {
            **_COMMON,
            PilotChanged: _note_pilot,
            StopRequested: _keep,
            AvailabilityChanged: _unavailable_availability,
            TimerExpired: _keep,
        },
        State.FAULTED: {
            **_COMMON,
            PilotChanged: _note_pilot,
            StopRequested: _keep,
            AvailabilityChanged: _faulted_availability,
            TimerExpired: _keep,
        },
    }
)
