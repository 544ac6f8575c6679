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

The socket's lock (``Connector(lock=True)``: the socket version on a board that
drives a lock actuator with feedback, ``BoardCapabilities.lock``): a
transaction begins only once the lock is confirmed. Plugged and authorized (in
either order), the connector commands ``SetLock(True)`` and waits in LOCKING
(Preparing); ``LockChecked`` (the station's verdict from the board's lock
detection) then begins the transaction, or raises CONNECTOR_LOCK (Faulted, no
transaction, the lock released again) until the EV is unplugged. Every end of
a transaction, a fault, unavailability and ``UnlockRequested`` (OCPP
UnlockConnector) command ``SetLock(False)`` after the ``SetCurrent(0)``; the
station writes it only once that off is acknowledged. A lock that does not
release is CONNECTOR_LOCK too (Faulted), until it does. A welded contactor
keeps the socket locked: no unlock is commanded while WELDED stands.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum
from types import MappingProxyType

from evse.errors import IllegalTransition
from evse.limits import MIN_CURRENT
from fieldbus.signals import PilotState
from ocpp16.idtag import same_id_tag

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
    #: The socket's lock did not engage or did not release (``LockChecked``).
    CONNECTOR_LOCK = "connector_lock_failure"


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
        Fault.CONNECTOR_LOCK: ErrorCode.CONNECTOR_LOCK_FAILURE,
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
    LOCKING = "locking"  # plugged and authorized: the socket's lock is being confirmed
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
        State.LOCKING: Status.PREPARING,
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


class Lock(Enum):
    """The socket's lock as the connector last commanded and heard of it."""

    UNLOCKED = "unlocked"  # released (confirmed), or never locked
    LOCKING = "locking"  # SetLock(True) given, not confirmed yet
    LOCKED = "locked"  # confirmed
    UNLOCKING = "unlocking"  # SetLock(False) given, not confirmed yet
    STUCK = "stuck"  # the unlock failed: still locked (CONNECTOR_LOCK)


#: CONNECTOR_LOCK's info: which way the lock failed.
LOCK_NOT_ENGAGED = "the lock did not engage"
LOCK_NOT_RELEASED = "the lock did not release"


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
class ConnectionTimeOutChanged:
    """OCPP ConnectionTimeOut (9.1.7) changed: how long an authorization waits for
    the EV from now on (a wait already running keeps its deadline)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class StopOnEvDisconnect:
    """OCPP StopTransactionOnEVSideDisconnect (9.1.27): whether unplugging at the
    EV stops the transaction (true) or suspends it until plugged in again."""

    enabled: bool


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


@dataclass(frozen=True, slots=True)
class LockChecked:
    """The station's verdict on the lock command ``locked`` (True: lock, False:
    unlock), from the board's lock detection: ``ok`` it did what was asked.

    Also sent without a new command: a confirmed lock lost (``locked``, not ok),
    a stuck lock that released after all (not ``locked``, ok)."""

    locked: bool
    ok: bool
    info: str = ""


@dataclass(frozen=True, slots=True)
class UnlockRequested:
    """OCPP 1.6 UnlockConnector (5.18): release the socket's lock (the station has
    stopped a running transaction first, with reason UnlockCommand)."""


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
    | StopOnEvDisconnect
    | ConnectionTimeOutChanged
    | LockChecked
    | UnlockRequested
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


@dataclass(frozen=True, slots=True)
class SetLock:
    """Command the socket's lock actuator; the verdict comes back as LockChecked."""

    locked: bool


Effect = (
    SetCurrent
    | BeginTransaction
    | EndTransaction
    | StatusChanged
    | StartTimer
    | CancelTimer
    | SetLock
)


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
    #: That id tag's parentIdTag, as its authorization gave it (``handle`` keeps it
    #: with ``id_tag``): a tag of the same parent may stop the transaction.
    parent_id_tag: str | None = None
    faults: Mapping[Fault, str] = field(default_factory=dict)
    operative: bool = True
    #: The current last commanded to the board.
    commanded: float = 0.0
    reservation: Reservation | None = None
    #: The reservation the authorized id tag claimed (states AUTHORIZED and
    #: LOCKING only): its id goes into the transaction's start, and it holds the
    #: connector again if the authorization lapses before the reservation expires.
    claimed: Reservation | None = None
    #: StopTransactionOnEVSideDisconnect.
    stop_on_ev_disconnect: bool = True
    #: The socket's lock (a connector with ``lock`` only).
    lock: Lock = Lock.UNLOCKED

    @property
    def plugged(self) -> bool:
        return self.pilot in (PilotState.B, PilotState.C, PilotState.D)

    @property
    def in_transaction(self) -> bool:
        return self.state in IN_TRANSACTION


Transition = Callable[["Connector", Snapshot, object, float], Snapshot]


class Connector:
    """One connector. ``handle`` is the only way its state changes."""

    def __init__(
        self, *, connection_timeout: float = 120.0, connector_id: int = 1, lock: bool = False
    ) -> None:
        self.connector_id = connector_id
        #: The socket's lock is driven and confirmed before every transaction.
        self.lock = lock
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
        """Effects for a fresh start: switch off (and, with a lock, release it: a
        board that kept power may still hold the lock of a transaction the
        restart ended) and report the status."""
        self._effects = [SetCurrent(0.0)]
        self.snapshot = replace(self.snapshot, commanded=0.0)
        if self.lock:
            self.snapshot = _release(self, self.snapshot, again=True)
        self._report(self.snapshot)
        return self._take()

    def accepts(self, event: type) -> bool:
        """Whether ``event`` (a type) is legal in the current state: callers ask the
        connector rather than reading its transition table."""
        return event in TRANSITIONS.get(self.snapshot.state, {})

    def handle(self, event: Event, now: float) -> list[Effect]:
        """Apply one event; returns the effects to carry out, in order."""
        transition = TRANSITIONS.get(self.snapshot.state, {}).get(type(event))
        if transition is None:
            raise IllegalTransition(self.snapshot.state.value, type(event).__name__)
        new = transition(self, self.snapshot, event, now)
        if new.claimed is not None and new.state not in (State.AUTHORIZED, State.LOCKING):
            # A claimed reservation lives only as long as the authorization that
            # claimed it: a transaction took it (``_begin``), or a fault or
            # unavailability ended it (OCPP 1.6 5.13).
            new = replace(new, claimed=None)
        new = _with_parent(self.snapshot, new, event)
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


def _with_parent(old: Snapshot, new: Snapshot, event: Event) -> Snapshot:
    """The parentIdTag goes with the id tag: an authorization the transition took
    (its tag became or stayed the connector's, outside a transaction) brings its
    parent, and a cleared id tag takes its parent along."""
    if new.id_tag is None:
        return replace(new, parent_id_tag=None) if new.parent_id_tag is not None else new
    if isinstance(event, Authorized) and not old.in_transaction and new.id_tag == event.id_tag:
        return replace(new, parent_id_tag=event.parent_id_tag)
    return new


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
        s = _clear(c, s, FaultCleared(Fault.PILOT_ERROR), now)
    if c.lock and Fault.CONNECTOR_LOCK in s.faults and not s.plugged and s.lock is Lock.UNLOCKED:
        # A lock that did not engage is Faulted until the EV is unplugged.
        s = _clear(c, s, FaultCleared(Fault.CONNECTOR_LOCK), now)
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
    if c.lock and s.lock is not Lock.LOCKED:
        # The socket's lock first: the transaction begins once the station has
        # confirmed it (LockChecked); the EV is here, ConnectionTimeOut is over.
        c._emit(CancelTimer(CONNECTION_TIMER))
        if s.lock is not Lock.LOCKING:
            c._emit(SetLock(True))
        return replace(s, state=State.LOCKING, id_tag=id_tag, lock=Lock.LOCKING)
    c._emit(CancelTimer(CONNECTION_TIMER))
    claimed = s.claimed.reservation_id if s.claimed is not None else None
    c._emit(BeginTransaction(id_tag, s.energy_wh, claimed))
    s = replace(s, id_tag=id_tag, claimed=None)
    s = replace(s, state=_tx_state(s))
    return c._command(s, _offer(s))


def _end(c: Connector, s: Snapshot, reason: StopReason, id_tag: str | None) -> Snapshot:
    """Off first, then the record: a stop must never wait for the disk. The
    socket's lock is released after both (the station writes it once the off is
    acknowledged)."""
    s = c._command(s, 0.0)
    c._emit(EndTransaction(reason, s.energy_wh if s.energy_wh is not None else 0.0, id_tag))
    s = _release(c, s)
    return replace(s, id_tag=None)


def _release(c: Connector, s: Snapshot, *, again: bool = False) -> Snapshot:
    """Command the socket's lock open, after the ``SetCurrent(0)`` emitted before
    it (the station writes it only once that off is acknowledged). ``again``:
    also when it is released, being released or stuck (UnlockConnector, a
    restart). Never while the contactor is welded: the socket stays locked."""
    if not c.lock or Fault.WELDED in s.faults:
        return s
    if not again and s.lock not in (Lock.LOCKING, Lock.LOCKED):
        return s
    c._emit(SetLock(False))
    return replace(s, lock=Lock.UNLOCKING)


def _idle_authorize(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, Authorized)
    c._emit(StartTimer(CONNECTION_TIMER, now + c.connection_timeout))
    return replace(s, state=State.AUTHORIZED, id_tag=e.id_tag)


def _note_connection_timeout(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, ConnectionTimeOutChanged)
    c.connection_timeout = e.seconds
    return s


def _note_ev_disconnect(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, StopOnEvDisconnect)
    s = replace(s, stop_on_ev_disconnect=e.enabled)
    if e.enabled and s.in_transaction and s.pilot is PilotState.A:
        # Switched on while the EV is away: the transaction it left ends now.
        s = _end(c, s, StopReason.EV_DISCONNECTED, None)
        return replace(s, state=_idle_or_plugged(s))
    return s


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
    """A second card while waiting: it takes over, and the wait starts again; not
    over a reservation's claim, unless it may claim that reservation too."""
    assert isinstance(e, Authorized)
    if s.claimed is not None and not s.claimed.claimed_by(e):
        return s
    c._emit(StartTimer(CONNECTION_TIMER, now + c.connection_timeout))
    return replace(s, id_tag=e.id_tag)


def _lapse(c: Connector, s: Snapshot, now: float) -> Snapshot:
    """The authorization ends without a transaction. A reservation it claimed that
    has not expired holds the connector again: only a transaction, the expiry, a
    fault or unavailability end a reservation (OCPP 1.6 5.13)."""
    claimed = s.claimed
    # An EV may be plugged in (a start held for the first meter reading).
    s = replace(s, state=State.PLUGGED if s.plugged else State.IDLE, id_tag=None, claimed=None)
    if claimed is not None and claimed.deadline > now:
        c._emit(StartTimer(RESERVATION_TIMER, claimed.deadline))
        return replace(s, state=State.RESERVED, reservation=claimed)
    return s


def _authorized_stop(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    c._emit(CancelTimer(CONNECTION_TIMER))
    return _lapse(c, s, now)


def _authorized_timer(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """ConnectionTimeOut: the EV never came; the authorization lapses (OCPP 1.6 9.1.7)."""
    assert isinstance(e, TimerExpired)
    if e.name != CONNECTION_TIMER:
        return s
    return _lapse(c, s, now)


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
    if e.pilot is PilotState.A and s.stop_on_ev_disconnect:
        # StopTransactionOnEVSideDisconnect true (OCPP 1.6 9.1.27, the default).
        s = _end(c, replace(s, pilot=e.pilot), StopReason.EV_DISCONNECTED, None)
        return replace(s, state=_idle_or_plugged(s))
    # False: unplugged, the transaction is SuspendedEV until the EV is back.
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
    """The same card again, or one with the same parentIdTag, stops the transaction
    (Local); another card is ignored."""
    assert isinstance(e, Authorized)
    same_group = s.parent_id_tag is not None and same_id_tag(e.parent_id_tag, s.parent_id_tag)
    if e.id_tag != s.id_tag and not same_group:
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
    s = _release(c, s)
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
    if not s.in_transaction:
        # A welded contactor kept the socket locked: released now.
        s = _release(c, s)
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
    s = replace(s, reservation=None, claimed=s.reservation)
    if s.plugged:
        return _begin(c, s, e.id_tag, now)
    return _idle_authorize(c, replace(s, state=State.IDLE), e, now)


def _reserved_timer(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    assert isinstance(e, TimerExpired)
    if e.name != RESERVATION_TIMER:
        return s
    return _reservation_ends(c, s)


def _reserved_replace(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """ReserveNow with the held reservation's id replaces it (OCPP 1.6 5.13), an EV
    plugged in meanwhile or not; another id changes nothing (the answer is Occupied)."""
    assert isinstance(e, ReservationMade)
    assert s.reservation is not None
    if e.reservation_id != s.reservation.reservation_id:
        return s
    return _idle_reserve(c, s, e, now)


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
    s = _release(c, s)
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


def _lock_checked(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """The station's verdict on the last lock command, or news of the lock since.

    A verdict about a command since reversed is ignored. A lock that did not
    engage (or was lost) is CONNECTOR_LOCK: no transaction (a running one
    ends), the lock released; Faulted until the EV is unplugged. One that did
    not release is CONNECTOR_LOCK until it does (STUCK)."""
    assert isinstance(e, LockChecked)
    if not c.lock:
        return s
    if e.locked:
        if s.lock not in (Lock.LOCKING, Lock.LOCKED):
            return s
        if not e.ok:
            return _raise(c, s, FaultRaised(Fault.CONNECTOR_LOCK, LOCK_NOT_ENGAGED), now)
        s = replace(s, lock=Lock.LOCKED)
        if s.state is State.LOCKING:
            assert s.id_tag is not None
            return _begin(c, s, s.id_tag, now)
        return s
    if s.lock not in (Lock.UNLOCKING, Lock.STUCK):
        return s
    if not e.ok:
        s = replace(s, lock=Lock.STUCK)
        return _raise(c, s, FaultRaised(Fault.CONNECTOR_LOCK, LOCK_NOT_RELEASED), now)
    s = replace(s, lock=Lock.UNLOCKED)
    info = s.faults.get(Fault.CONNECTOR_LOCK)
    if info == LOCK_NOT_RELEASED or (info is not None and not s.plugged):
        return _clear(c, s, FaultCleared(Fault.CONNECTOR_LOCK), now)
    return s


def _unlock_requested(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """UnlockConnector outside a transaction: release, whatever was last heard."""
    return _release(c, s, again=True)


def _tx_unlock(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """UnlockConnector during a transaction (the station stops it first, so this
    is a race): stop with UnlockCommand; the end releases the lock."""
    return _tx_stop(c, s, StopRequested(StopReason.UNLOCK_COMMAND), now)


def _locking_pilot(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """Unplugged while the lock is being confirmed: it is released, and the
    authorization waits for the EV again (ConnectionTimeOut anew)."""
    s = _note_pilot(c, s, e, now)
    if s.state is State.LOCKING and not s.plugged:
        s = _release(c, s)
        c._emit(StartTimer(CONNECTION_TIMER, now + c.connection_timeout))
        return replace(s, state=State.AUTHORIZED)
    return s


def _locking_authorize(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """Another card while the lock is being confirmed takes over, as while waiting
    for the EV; not over a reservation's claim it cannot claim."""
    assert isinstance(e, Authorized)
    if s.claimed is not None and not s.claimed.claimed_by(e):
        return s
    return replace(s, id_tag=e.id_tag)


def _locking_cancel(c: Connector, s: Snapshot, e: object, now: float) -> Snapshot:
    """A stop or UnlockConnector before the transaction began: the authorization
    lapses (a claimed reservation holds the connector again), the lock is released."""
    s = _release(c, s, again=isinstance(e, UnlockRequested))
    return _lapse(c, s, now)


_COMMON: dict[type, Transition] = {
    # Only a fresh start can follow a power loss; anywhere else it changes nothing.
    PowerLossRecovered: _keep,
    StopOnEvDisconnect: _note_ev_disconnect,
    ConnectionTimeOutChanged: _note_connection_timeout,
    MeterSample: _note_meter,
    LimitChanged: _note_limit,
    FaultRaised: _raise,
    FaultCleared: _clear,
    ResetFaults: _reset_faults,
    LockChecked: _lock_checked,
    UnlockRequested: _unlock_requested,
}

_TX: dict[type, Transition] = {
    **_COMMON,
    PilotChanged: _tx_pilot,
    Authorized: _tx_authorize,
    StopRequested: _tx_stop,
    LimitChanged: _tx_limit,
    AvailabilityChanged: _tx_availability,
    TimerExpired: _keep,
    UnlockRequested: _tx_unlock,
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
            ReservationMade: _reserved_replace,
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
        State.LOCKING: {
            **_COMMON,
            PilotChanged: _locking_pilot,
            Authorized: _locking_authorize,
            StopRequested: _locking_cancel,
            UnlockRequested: _locking_cancel,
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
