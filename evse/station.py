"""The station: the I/O around the connector state machine.

One task (``run_loop``) owns the ``Connector``: it takes events from one
channel, feeds them to the pure machine and carries out the effects in the
order the machine returns them. Everything else talks to it through that
channel: the board and meter pollers, the safety monitor, the timers, and
the inputs (RFID, local control, the central system), whose requests run
inside the loop (``_Call``) so that they see and change consistent state.

The trip lane. A fault verdict (the safety monitor's, pilot E/F, a board
fault flag) and a stop from outside do not wait for the loop, which may be
busy with the disk or the bus: whoever sees it calls ``_trip``, which has the
off-write sent at once by its own task, shielded and deadline-bound, as an
urgent request that the bus master sends ahead of every waiting one; the
event follows through the channel. Until the loop has handled that event, no
current above 0 is written: a command already waiting for the bus is dropped
just before it would go on the wire (``wanted``), so it can never follow the
off-write that overtook it.

Disk and safety: a transaction is written to the store, with its
StartTransaction in the same SQLite commit (``BeginTransaction``), before the
``SetCurrent`` that lets the board close the contactor is sent; at the end,
``SetCurrent(0)`` goes out before the record (and its StopTransaction) is
written, so a stop never waits for the disk. Meter start and stop values are
read from the meter at the start and after the acknowledged off-write, not
taken from the last poll. Readings of a running transaction are persisted by
their own task. Nothing else on the loop's path waits for the disk or a
thread while charging: settings are written by the caller or by a task of
their own, and the central system is told through a hand-off it drains.

Start-up: the first bus write is the off-write; then board and meter must
answer (``HardwareUnavailable`` otherwise), a transaction found running is
ended as PowerLoss with the meter's reading at restart, and only then do the
pollers and the safety monitor's silence clocks start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import outcome
import trio

from evse.auth import NO_SOURCE, AuthChain, AuthResult, AuthStatus
from evse.central import CentralSystemPort, Standalone
from evse.connector import (
    FAULT_ERROR_CODES,
    Authorized,
    AvailabilityChanged,
    BeginTransaction,
    CancelTimer,
    ConnectionTimeOutChanged,
    Connector,
    Effect,
    EndTransaction,
    ErrorCode,
    Event,
    Fault,
    FaultCleared,
    FaultRaised,
    LimitChanged,
    LockChecked,
    MeterSample,
    PilotChanged,
    PowerLossRecovered,
    Reservation,
    ReservationCancelled,
    ReservationMade,
    ResetFaults,
    SetCurrent,
    SetLock,
    StartTimer,
    State,
    Status,
    StatusChanged,
    StopOnEvDisconnect,
    StopReason,
    StopRequested,
    TimerExpired,
    UnlockRequested,
)
from evse.errors import (
    EvseError,
    HardwareUnavailable,
    IllegalTransition,
    InvariantBroken,
    StoreError,
)
from evse.limits import Limit, LimitInputs, arbitrate, effective_fallback, failsafe_current
from evse.safety import CURRENT_NOISE, SafetyMonitor, SafetySettings
from evse.store import Store, TransactionRecord
from fieldbus.boards import NOT_LOCKED, Board, BoardFault, BoardStatus, LockError, PilotState
from fieldbus.errors import FieldbusError, Superseded
from fieldbus.meters import Meter, MeterReading
from ocpp16.idtag import same_id_tag
from ocpp16.vocabulary import TRANSACTION_STATUSES

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: ``trio.to_thread.run_sync``'s shape: blocking work, awaited.
Offload = Callable[..., Awaitable[Any]]

#: Board fault flags -> the station's faults (several flags may share one).
BOARD_FAULTS: dict[BoardFault, Fault] = {
    BoardFault.RCD_TRIP: Fault.RCD_TRIP,
    BoardFault.RCD_SELFTEST: Fault.RCD_TRIP,
    BoardFault.DIODE: Fault.DIODE,
    BoardFault.VENTILATION: Fault.BOARD_ERROR,
    BoardFault.PILOT: Fault.PILOT_ERROR,
    BoardFault.OVERTEMPERATURE: Fault.OVERTEMPERATURE,
    BoardFault.DEVICE: Fault.BOARD_ERROR,
}

#: Faults of the charge point as a whole, not of its connector: connector 0 reports them.
STATION_FAULTS = frozenset({Fault.STORE, Fault.INTERNAL})

#: When no deadline is ahead (verdicts given), the safety monitor looks again after this.
SAFETY_RECHECK = 0.25

#: Central-system notifications waiting to be handed over; beyond, they are
#: dropped with an error (the central system re-reads state; messages are on disk).
NOTICE_BACKLOG = 1000

#: Between two attempts to reach a device at start.
START_RETRY = 0.5

#: Between two attempts of an off-write that did not go through. Short: an
#: attempt against a device that is not there costs one failed open (a refused
#: connect, a missing serial device), and once the device is back this pause
#: is what the off waits for (the bench's bus outage: from the link's return).
OFF_RETRY = 0.05
#: Between two attempts of the other writes the station insists on (the lock
#: actuator, the hardware failsafe).
WRITE_RETRY = 0.2

#: The most a transaction's end may wait (off acknowledged, meter read) before
#: its record is written anyway, with the last reading (shielded; the commit
#: itself is never abandoned).
END_DEADLINE = 5.0
#: The longest UnlockConnector waits for the lock's verdict before it answers
#: UnlockFailed: the stop's off acknowledged, a meter reading without current,
#: the write and ``lock_timeout`` (about 3.5 s on a healthy bus).
UNLOCK_ANSWER_WITHIN = 10.0
#: The source of the answer for the tag that started the running transaction,
#: presented again: it stops it without asking the chain.
STARTED_IT = "started the transaction"

AVAILABILITY_KEY = "connector.{}.operative"
#: Connector 0, the charge point itself (OCPP 1.6 5.2): its own availability.
STATION_AVAILABILITY_KEY = "chargepoint.operative"
LATCHED_KEY = "connector.{}.latched_faults"
#: The reservation the connector holds (OCPP 1.6 ReserveNow), kept until it ends
#: so that it survives a restart until its expiry (``_persist_reservation``).
RESERVATION_KEY = "connector.{}.reservation"


@dataclass(frozen=True)
class StationSettings:
    installer_max: float = 32.0
    fallback: float = 6.0
    connection_timeout: float = 120.0
    #: Free-charging mode: the tag an EV is authorized with on plug-in.
    free_id_tag: str | None = None
    board_poll: float = 0.1
    meter_poll: float = 1.0
    persist_interval: float = 5.0
    failsafe_watchdog: float = 10.0
    safety: SafetySettings = field(default_factory=SafetySettings)
    connector_id: int = 1
    #: The deadline of one off-write (shielded): the trip lane's and start-up's.
    off_deadline: float = 1.0
    #: How long board and meter may take to answer at start.
    start_timeout: float = 10.0
    #: Meter readings of a transaction that fail to persist in a row before it is
    #: a fault (a full or failing disk must not go unnoticed).
    persist_failures: int = 3
    #: Mains is lost when the meter reads less than this on every phase (0: unused).
    mains_lost_voltage: float = 0.0
    #: "socket" (a socket outlet: its lock is driven where the board has one) or
    #: "cable" (a fixed cable: no lock), as ``station.connector`` in the config.
    connector: str = "socket"
    #: The socket's lock is confirmed (released) by the first board reading this
    #: long after its command was acknowledged without a locking (unlocking)
    #: error: the actuator's time to move and the board's to judge it.
    lock_timeout: float = 2.0


@dataclass
class _Call:
    """A request from outside, run inside the loop against the current state."""

    fn: Callable[[], Awaitable[Any]]
    reply: trio.MemorySendChannel[outcome.Outcome[Any]] | None


@dataclass(frozen=True, slots=True)
class _Tripped:
    """An event whose off-write the trip lane already issued; handling it releases
    the trip (the connector then holds the fault or the stop itself)."""

    event: Event


class _Recompute:
    """Recompute the offer (a limit input changed)."""


@dataclass(eq=False)
class _Begin:
    """A transaction's start, written by a task of its own: the loop goes on
    (status, faults) while it waits for the previous end, the meter and the disk."""

    id_tag: str
    done: trio.Event = field(default_factory=trio.Event)
    #: Set once the record is on disk; None with ``error`` when it could not be.
    record: TransactionRecord | None = None
    error: str | None = None
    #: The connector ended the transaction before its start was written.
    ended: bool = False
    #: The reservation the transaction uses (its StartTransaction says so).
    reservation_id: int | None = None


@dataclass(frozen=True, slots=True)
class _Begun:
    """A transaction's start is written (or failed): tell the loop."""

    begin: _Begin


_RECOMPUTE = _Recompute()

_Item = Event | _Call | _Tripped | _Recompute | _Begun


class Station:
    def __init__(
        self,
        *,
        board: Board,
        meter: Meter,
        store: Store,
        auth: AuthChain,
        settings: StationSettings,
        central: CentralSystemPort | None = None,
        offload: Offload = trio.to_thread.run_sync,
    ) -> None:
        #: Runs blocking work (SQLite) off the loop; the virtual-clock rig runs it
        #: inline so that trio's MockClock cannot jump while a thread works.
        self._offload = offload
        self.board = board
        self.meter = meter
        self.store = store
        self.auth = auth
        self.settings = settings
        self.central: CentralSystemPort = central or Standalone()
        #: The socket version on a board that drives a lock with feedback: every
        #: transaction waits for the lock (``_lock_lane``); UnlockConnector is real.
        self.lock_in_use = settings.connector == "socket" and board.capabilities.lock
        self.connector = Connector(
            connection_timeout=settings.connection_timeout,
            connector_id=settings.connector_id,
            lock=self.lock_in_use,
        )
        self._send, self._receive = trio.open_memory_channel[_Item](512)
        self._persist_send, self._persist_receive = trio.open_memory_channel[
            tuple[int, float, datetime]
        ](1)
        self.monitor: SafetyMonitor | None = None
        self.tx: TransactionRecord | None = None
        self.board_status: BoardStatus | None = None
        self.meter_reading: MeterReading | None = None
        self.limit = Limit(0.0, "starting")
        #: The fallback limit in force (an installer setting, changeable live).
        self.fallback = settings.fallback
        self.commanded = 0.0
        self.status_since = datetime.now(UTC)
        self.recovered: list[TransactionRecord] = []
        self.loop_alive = -math.inf
        self._timers: dict[str, float] = {}
        self._timers_changed = trio.Event()
        self._safety_wakeup = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._last_persist = -math.inf
        self._log_quiet: dict[str, float] = {}
        #: Trips whose event the loop has not handled yet: no current above 0 meanwhile.
        self._trips = 0
        self._off_wakeup = trio.Event()
        self._on_wakeup = trio.Event()
        #: Off-writes asked for, the request the write in flight answers (None:
        #: none in flight), whether no current above 0 went out since it started,
        #: and the highest request answered by an acknowledged write.
        self._off_requested = 0
        self._off_in_flight: int | None = None
        self._off_clean = True
        self._off_acknowledged = 0
        self._off_written = trio.lowlevel.ParkingLot()
        #: A stop_by_disable board was disabled by an off (enabled again before
        #: the next current above 0 takes effect).
        self._disabled_for_off = False
        #: Events handled so far: a request that fails after changing state breaks
        #: an invariant (its effects are half done) and ends the station.
        self._handled = 0
        self._notices_send, self._notices_receive = trio.open_memory_channel[
            Callable[[], Awaitable[None]]
        ](NOTICE_BACKLOG)
        self._settings_lock = trio.Lock()
        self._persist_failed = 0
        #: Set once the last transaction's end is written (or given up).
        self._ending = trio.Event()
        self._ending.set()
        #: A transaction's start being written, and the current above 0 that
        #: waits for it (written once the record is on disk).
        self._beginning: _Begin | None = None
        self._held_current: float | None = None
        self._held_status: Callable[[], Awaitable[None]] | None = None
        #: The board's hardware failsafe current: the fallback while a transaction
        #: runs on disk (``_failsafe_for``: ids), else 0, so that an EV with no
        #: transaction is never charged by it. ``_failsafe_at_most`` is the most
        #: the board may hold (inf until the first write goes through).
        self._failsafe_for: set[int] = set()
        self._failsafe_written: float | None = None
        #: The watchdog period has been written since the start.
        self._failsafe_armed = False
        self._failsafe_at_most = math.inf if board.capabilities.failsafe else 0.0
        self._failsafe_wakeup = trio.Event()
        self._failsafe_settled = trio.lowlevel.ParkingLot()
        #: Waits of transaction ends kept open while the board is silent; the
        #: station's exit cancels them (the end is then written with what it has).
        self._end_waits: set[trio.CancelScope] = set()
        self._end_kept_open: int | None = None
        self._stopping = False
        #: The running transaction whose id tag the central system refused while
        #: StopTransactionOnInvalidId is false: offered 0 A until it ends.
        self._deauthorized: int | None = None
        #: The parentIdTag of an id tag, for a reservation made for a parent when the
        #: authorization gave none (OCPP 1.6 5.13: the local list or cache, else an
        #: Authorize.req); set by the central-system port. None: only the chain's.
        self.parent_lookup: Callable[[str], Awaitable[str | None]] | None = None
        #: ChangeAvailability: the connector's own and the charge point's (connector 0).
        self.connector_operative = True
        self.station_operative = True
        #: Unavailable for this run only, never persisted (``hold_unavailable``: a
        #: firmware install waiting for the transaction to end, OCPP 1.6 5.19).
        self.held_unavailable = False
        self._mains_lost = False
        self._mains_by_meter = False
        #: The socket's lock: the connector's latest command (``SetLock``), counted,
        #: and the lock lane's latest verdict (command number, locked, ok).
        self._lock_target: bool | None = None
        self._lock_command = 0
        self._lock_wakeup = trio.Event()
        self._lock_verdict: tuple[int, bool, bool] | None = None
        self._lock_decided = trio.lowlevel.ParkingLot()
        self._lock_write_time: float | None = None

    # -- the loop ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """All of the station's tasks; reports started once board and meter have
        answered and the loop serves events."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.monitor = SafetyMonitor(self.settings.safety, now=trio.current_time())
            nursery.start_soon(self._off_lane, name="trip lane")
            nursery.start_soon(self._on_lane, name="current commands")
            if self.board.capabilities.failsafe:
                nursery.start_soon(self._failsafe_lane, name="hardware failsafe")
            nursery.start_soon(self._tell_central, name="central-system notices")
            await nursery.start(self._run_loop, name="station loop")
            # The silence clocks start with the pollers, not before: a slow
            # start-up (disk, bus) is not a silent device.
            self.monitor = SafetyMonitor(self.settings.safety, now=trio.current_time())
            self._tell_monitor_failsafe()
            nursery.start_soon(self._poll_board, name="board poller")
            nursery.start_soon(self._poll_meter, name="meter poller")
            nursery.start_soon(self._watch_safety, name="safety monitor")
            nursery.start_soon(self._run_timers, name="timers")
            nursery.start_soon(self._persist_readings, name="meter persistence")
            if self.lock_in_use:
                nursery.start_soon(self._lock_lane, name="socket lock")
            task_status.started()

    async def _run_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await self._startup()
            task_status.started()
            async for item in self._receive:
                self.loop_alive = trio.current_time()
                match item:
                    case _Call():
                        await self._run_call(item)
                    case _Tripped(event=event):
                        try:
                            await self._handle(event)
                        finally:
                            self._trips -= 1
                    case _Recompute():
                        await self._recompute_limit()
                    case _Begun(begin=begin):
                        await self._begun(begin)
                    case _:
                        await self._handle(item)
        finally:
            # The station stops: an end kept open for a silent board is written now,
            # with the last reading (the supervisor has switched off or is about to).
            self._stopping = True
            for scope in self._end_waits:
                scope.cancel()
            # The failsafe lane stops too; the supervisor's switch-off arms 0.
            self._failsafe_settled.unpark_all()

    async def _run_call(self, call: _Call) -> None:
        """A request's failure goes back to whoever asked, and the loop carries on,
        unless it failed after changing state (effects half done) or broke the
        machine's table: then it ends the station, which switches off."""
        handled = self._handled
        broke: Exception | None = None
        try:
            value = await call.fn()
        except Exception as exc:
            result: outcome.Outcome[Any] = outcome.Error(exc)
            if isinstance(exc, IllegalTransition | AssertionError) or (
                self._handled != handled and not isinstance(exc, EvseError)
            ):
                broke = exc
        else:
            result = outcome.Value(value)
        if call.reply is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.WouldBlock):
                call.reply.send_nowait(result)
        if broke is not None:
            log.critical("a request failed after changing the station's state; stopping")
            raise InvariantBroken(f"a request failed after changing state: {broke!r}") from broke

    async def _startup(self) -> None:
        store = self.store
        board = self.board
        cid = self.settings.connector_id
        deadline = trio.current_time() + self.settings.start_timeout
        # The first write after any start is "off": a board a crashed firmware
        # left at 16 A must not keep it through recovery or OCPP.
        await self._until_answered(deadline, "board", board.set_current, 0)
        self.monitor_written_off()
        status = await self._until_answered(deadline, "board", board.read_status)
        self.board_status = status
        reading: MeterReading | None = None
        try:
            reading = await self._until_answered(deadline, "meter", self.meter.read)
        finally:
            # Even with the meter dead, a transaction the crash left running is
            # ended and its StopTransaction queued before the station gives up.
            await self._recover(reading)
        self._take_meter(reading)
        await self._execute(self.connector.start())
        if self.recovered:
            await self._handle(PowerLossRecovered(status.pilot))
        # No transaction runs now (recovery ended any): the failsafe is armed with 0.
        self._want_failsafe()
        if board.capabilities.stop_by_disable:
            # Off on this board means disabled too: enabled with the first current.
            await self._quietly("disable board", board.set_enabled, False)
            self._disabled_for_off = True
        elif board.capabilities.enable_switch:
            await self._quietly("enable board", board.set_enabled, True)
        await self._quietly("initialize board", board.initialize)
        latched = await self._offload(store.get_setting, LATCHED_KEY.format(cid))
        for name in filter(None, (latched or "").split(",")):
            await self._handle(FaultRaised(Fault(name), "latched before the restart"))
        operative = await self._offload(store.get_setting, AVAILABILITY_KEY.format(cid))
        self.connector_operative = operative != "0"
        whole = await self._offload(store.get_setting, STATION_AVAILABILITY_KEY)
        self.station_operative = whole != "0"
        if not (self.connector_operative and self.station_operative):
            await self._handle(AvailabilityChanged(False))
        await self._restore_reservation()
        await self._recompute_limit()

    async def _until_answered(
        self, deadline: float, device: str, fn: Callable[..., Awaitable[_T]], *args: Any
    ) -> _T:
        """``fn`` until it goes through; HardwareUnavailable at ``deadline``."""
        while True:
            try:
                return await fn(*args)
            except FieldbusError as exc:
                if trio.current_time() >= deadline:
                    raise HardwareUnavailable(
                        device,
                        f"no answer within {self.settings.start_timeout:g} s at start: {exc}",
                    ) from None
                self._log_rarely(device, f"{device} not answering at start: {exc}")
            await trio.sleep(START_RETRY)

    def monitor_written_off(self) -> None:
        assert self.monitor is not None
        now = trio.current_time()
        self.monitor.command(now, 0.0)
        self.monitor.command_written(now, 0.0)

    async def _recover(self, reading: MeterReading | None) -> None:
        """End what a crash left running, with the meter's reading at restart: the
        energy that flowed until the off-write belongs to that transaction."""
        at_restart = None
        if reading is not None and reading.energy_import_wh is not None:
            at_restart = (reading.energy_import_wh, reading.timestamp)
        journal = self.central.journal()
        self.recovered = await self._offload(
            partial(self.store.recover_power_loss, reading=at_restart, journal=journal)
        )
        for record in self.recovered:
            log.warning(
                "transaction %d was running at power loss: ended with PowerLoss at %.1f Wh",
                record.id,
                record.meter_stop_wh or 0.0,
            )
            self._notify(partial(self.central.transaction_ended, record))

    async def _handle(self, event: Event) -> None:
        now = trio.current_time()
        reservation = self._held_reservation()
        effects = self.connector.handle(event, now)
        self._handled += 1
        await self._execute(effects)
        if isinstance(event, FaultRaised) and event.fault is Fault.WELDED:
            self._persist_latched()
        if self._held_reservation() != reservation:
            self._persist_reservation_later()
        if (
            isinstance(event, PilotChanged)
            and self.settings.free_id_tag
            and self.connector.state is State.PLUGGED
        ):
            # Free charging: plugging in is the authorization.
            await self._handle(Authorized(self.settings.free_id_tag))

    async def _execute(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case SetCurrent(amps=amps):
                    if amps > 0 and self._beginning is not None:
                        # Written once its transaction is on disk (latest wins).
                        self._held_current = amps
                    else:
                        self._held_current = None
                        await self._set_current(amps)
                case BeginTransaction(
                    id_tag=id_tag, meter_start_wh=meter_start, reservation_id=reservation
                ):
                    self._start_begin(id_tag, meter_start, reservation)
                case EndTransaction(reason=reason, meter_stop_wh=meter_stop, id_tag=id_tag):
                    await self._end(reason, meter_stop, id_tag)
                case StatusChanged(status=status, error_code=code, info=info):
                    self.status_since = datetime.now(UTC)
                    log.info(
                        "connector %d: %s %s %s",
                        self.settings.connector_id,
                        status.value,
                        code.value,
                        info,
                    )
                    notice = partial(
                        self.central.status_changed,
                        self.settings.connector_id,
                        status,
                        code,
                        info,
                    )
                    if self._beginning is not None and status in TRANSACTION_STATUSES:
                        # A transaction's status follows its StartTransaction (OCPP
                        # 1.6 4.8/4.9 order); any other status goes out at once.
                        self._held_status = notice
                    else:
                        self._held_status = None
                        self._notify(notice)
                case StartTimer(name=name, deadline=deadline):
                    self._timers[name] = deadline
                    self._timers_changed.set()
                case CancelTimer(name=name):
                    self._timers.pop(name, None)
                    self._timers_changed.set()
                case SetLock(locked=locked):
                    self._want_lock(locked)

    async def _set_current(self, amps: float) -> None:
        """Hand a current command to the lanes that write it; never waits for the bus
        (a silent board must not stall the loop, nor the status it reports)."""
        assert self.monitor is not None
        if amps > 0 and self._trips:
            # A fault or stop is switching off; its event is right behind in
            # the channel, and the connector will command 0 itself.
            log.info("%.1f A not commanded: switching off", amps)
            return
        self.monitor.command(trio.current_time(), amps)
        self._safety_changed()
        self.commanded = amps
        if amps == 0:
            self._request_off()
        else:
            self._on_wakeup.set()
        await trio.lowlevel.checkpoint()

    def _still_wanted(self, amps: float) -> Callable[[], bool]:
        return lambda: not self._trips and self.commanded == amps

    async def _on_lane(self) -> None:
        """Writes the latest current above 0 the loop commanded (latest wins)."""
        assert self.monitor is not None
        while True:
            await self._on_wakeup.wait()
            self._on_wakeup = trio.Event()
            amps = self.commanded
            if amps <= 0 or self._trips:
                continue
            # An off-write in flight no longer answers a later off request.
            self._off_clean = False
            try:
                await self.board.set_current(amps, wanted=self._still_wanted(amps))
                if self._disabled_for_off:
                    # The current first, then the enable (never enabled at a
                    # stale current); dropped too if an off overtook it.
                    await self.board.set_enabled(True, wanted=self._still_wanted(amps))
                    self._disabled_for_off = False
            except Superseded:
                log.info("%.1f A not commanded: an off-write overtook it", amps)
            except (FieldbusError, ValueError) as exc:
                # The safety monitor raises BOARD_SILENT on its next check (and
                # clears it once the board answers again).
                log.error("could not command %.1f A: %s", amps, exc)
                self.monitor.command_failed(trio.current_time())
                self._safety_changed()
            else:
                self.monitor.command_written(trio.current_time(), amps)
                self._safety_changed()

    # -- the trip lane ------------------------------------------------------------------

    def _trip(self, why: str) -> None:
        """Off at once, from whoever saw the fault; the loop hears of it after."""
        assert self.monitor is not None
        self._trips += 1
        if self.commanded != 0:
            log.warning("tripped: %s", why)
        self.commanded = 0.0
        self.monitor.command(trio.current_time(), 0.0)
        self._safety_changed()
        self._request_off()

    async def _send_tripped(self, event: Event, why: str) -> None:
        self._trip(why)
        await self._send.send(_Tripped(event))

    def _request_off(self) -> None:
        """An off-write, from the trip lane. One already in flight, with no current
        above 0 written since it started, answers this request too."""
        self._off_requested += 1
        if self._off_in_flight is not None and self._off_clean:
            self._off_in_flight = self._off_requested
        else:
            self._off_wakeup.set()

    async def _off_lane(self) -> None:
        """Writes "off" whenever asked: urgent on the bus, shielded, deadline-bound,
        insisted on until it goes through while off is what is wanted."""
        while True:
            await self._off_wakeup.wait()
            self._off_wakeup = trio.Event()
            self._off_in_flight, self._off_clean = self._off_requested, True
            written = await self._write_off()
            covered, self._off_in_flight = self._off_in_flight, None
            if written:
                self._off_acknowledged = max(self._off_acknowledged, covered)
                self._off_written.unpark_all()
            elif self.commanded == 0:
                await trio.sleep(OFF_RETRY)
                self._off_wakeup.set()

    async def _write_off(self) -> bool:
        """One off-write, shielded and deadline-bound."""
        assert self.monitor is not None
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.settings.off_deadline
            try:
                by_disable = self.board.capabilities.stop_by_disable
                try:
                    await self.board.set_current(0)
                except (FieldbusError, ValueError) as exc:
                    if not by_disable:
                        raise
                    # The disable is this board's stop: a refused 0 A (a register
                    # documented as 6..63 A) must not keep it from being written.
                    self._log_rarely("off-current", f"current 0 A not written: {exc}")
                if by_disable:
                    # Current 0 is not a confirmed stop on this board: disable it too.
                    self._disabled_for_off = True
                    await self.board.set_enabled(False)
            except (FieldbusError, ValueError) as exc:
                self._log_rarely("off", f"off-write failed: {exc}; retrying until it goes through")
            else:
                self.monitor.command_written(trio.current_time(), 0.0)
                self._safety_changed()
                return True
        if scope.cancelled_caught:
            log.error(
                "off-write not acknowledged within %.1f s; retrying", self.settings.off_deadline
            )
        return False

    async def _wait_off_acknowledged(self, within: float) -> bool:
        """Wait until every off requested so far has been written (or ``within``)."""
        wanted = self._off_requested
        with trio.move_on_after(within):
            while self._off_acknowledged < wanted:
                await self._off_written.park()
            return True
        return False

    # -- transactions -------------------------------------------------------------------

    async def _read_meter_now(self) -> MeterReading | None:
        """A fresh reading (a transaction's start or stop value), or None."""
        try:
            reading = await self.meter.read()
        except FieldbusError as exc:
            log.warning("meter not read for the transaction's value: %s", exc)
            return None
        self._take_meter(reading)
        return reading

    def _take_meter(self, reading: MeterReading | None) -> None:
        if reading is None or (
            self.meter_reading is not None and reading.read_at < self.meter_reading.read_at
        ):
            return
        self.meter_reading = reading
        self._check_mains(reading)
        if self.monitor is not None:
            self.monitor.meter_reading(reading.read_at, list(reading.current))
            self._safety_changed()

    def _start_begin(
        self, id_tag: str, meter_start: float, reservation_id: int | None = None
    ) -> None:
        """The connector started a transaction: its record is written by a task of
        its own; the current that follows waits for it (``_held_current``)."""
        begin = _Begin(id_tag, reservation_id=reservation_id)
        self._beginning = begin
        # The previous end first (the store allows one running transaction).
        previous = self._ending
        assert self._nursery is not None
        self._nursery.start_soon(
            self._begin, begin, meter_start, previous, name=f"start for {id_tag}"
        )

    async def _begin(self, begin: _Begin, meter_start: float, previous: trio.Event) -> None:
        try:
            await previous.wait()
            reading = await self._read_meter_now()
            if reading is not None and reading.energy_import_wh is not None:
                meter_start, started_at = reading.energy_import_wh, reading.timestamp
            else:
                started_at = datetime.now(UTC)
            journal = self.central.journal()
            try:
                record = await self._offload(
                    partial(
                        self.store.begin_transaction,
                        connector_id=self.settings.connector_id,
                        id_tag=begin.id_tag,
                        meter_start_wh=meter_start,
                        started_at=started_at,
                        journal=journal,
                        reservation_id=begin.reservation_id,
                    )
                )
            except (StoreError, EvseError) as exc:
                log.error("transaction not started: %s", exc)
                begin.error = str(exc)
            else:
                begin.record = record
                # On disk: a dead firmware may now leave the board at the fallback.
                self._failsafe_for.add(record.id)
                self._want_failsafe()
                log.info(
                    "transaction %d started for %s at %.1f Wh", record.id, begin.id_tag, meter_start
                )
                self._notify(partial(self.central.transaction_started, record))
        finally:
            begin.done.set()
        await self._send.send(_Begun(begin))

    async def _begun(self, begin: _Begin) -> None:
        """On the loop: the start is written; the held current may go out."""
        held, self._held_current = self._held_current, None
        status, self._held_status = self._held_status, None
        if status is not None and begin.record is not None:
            self._notify(status)
        if begin.record is not None:
            self._beginning = None
            if not begin.ended:
                self.tx = begin.record
                self._last_persist = trio.current_time()
                if held is not None:
                    await self._set_current(held)
            return
        try:
            # Not on disk: no current. The fault switches off and ends the attempt
            # (``_end`` sees the failed start and has nothing to write).
            await self._handle(FaultRaised(Fault.INTERNAL, f"store: {begin.error}"))
        finally:
            self._beginning = None

    async def _end(self, reason: StopReason, meter_stop: float, id_tag: str | None) -> None:
        """The transaction is over for the connector at once (its off-write has been
        requested); its record is written by a task of its own, shielded, so that
        neither the loop (status, faults) nor a shutdown waits on a silent board,
        the meter or the disk, and a cancellation cannot lose the end."""
        tx, self.tx = self.tx, None
        if self._deauthorized is not None:
            # Its 0 A ends with it: the offer is arbitrated again (by the loop).
            self._deauthorized = None
            assert self._nursery is not None
            self._nursery.start_soon(self.inputs_changed, name="offer after deauthorization")
        source: TransactionRecord | _Begin
        if tx is not None:
            source = tx
        else:
            begin = self._beginning
            if begin is None:
                log.error("transaction end (%s) without a transaction on record", reason.value)
                return
            if begin.done.is_set() and begin.record is None:
                return  # its start was never written: nothing to end
            # Ended before its start was written: the end follows the start.
            begin.ended = True
            source = begin
        done = trio.Event()
        self._ending = done
        assert self._nursery is not None
        self._nursery.start_soon(
            self._write_end, source, reason, meter_stop, id_tag, done, name=f"end ({reason.value})"
        )
        await trio.lowlevel.checkpoint()

    async def _write_end(
        self,
        source: TransactionRecord | _Begin,
        reason: StopReason,
        meter_stop: float,
        id_tag: str | None,
        done: trio.Event,
    ) -> None:
        try:
            with trio.CancelScope(shield=True):
                if isinstance(source, _Begin):
                    await source.done.wait()
                    if source.record is None:
                        return
                    tx = source.record
                else:
                    tx = source
                reading: MeterReading | None = None
                # Waiting is bounded (END_DEADLINE from here, or from when a board
                # kept silent answers again); the commit after it never is (an end
                # abandoned half-way would leave the transaction running).
                read_until = trio.current_time() + END_DEADLINE
                acknowledged = await self._end_switched_off(tx)
                if self._end_kept_open == tx.id:
                    read_until = trio.current_time() + END_DEADLINE
                # Read once the off-write the connector emitted first is
                # acknowledged: the energy that flowed until then belongs to this
                # transaction.
                with trio.move_on_at(read_until):
                    reading = await self._read_meter_now()
                if not acknowledged:
                    log.error("transaction %d: off not acknowledged; ending it anyway", tx.id)
                # The store raises the stop to the last persisted reading if this
                # one is older (a wall clock stepped back, a stale fallback), so
                # the record never goes backwards.
                reading = reading or self.meter_reading
                if reading is not None and reading.energy_import_wh is not None:
                    meter_stop = max(meter_stop, reading.energy_import_wh)
                stopped_at = datetime.now(UTC) if reading is None else reading.timestamp
                journal = self.central.journal(ending=tx.id, stopped_at=stopped_at)
                try:
                    record = await self._offload(
                        partial(
                            self.store.end_transaction,
                            tx.id,
                            reason=reason.value,
                            meter_stop_wh=meter_stop,
                            stopped_at=stopped_at,
                            id_tag=id_tag,
                            journal=journal,
                        )
                    )
                except (StoreError, EvseError) as exc:
                    # It stays "running" on disk: the next start ends it as PowerLoss.
                    log.critical("transaction %d end not written: %s", tx.id, exc)
                    return
            log.info(
                "transaction %d ended (%s) at %.1f Wh", tx.id, reason.value, record.meter_stop_wh
            )
            try:
                with trio.move_on_after(1.0):
                    await self.central.transaction_ended(record)
            except Exception:
                log.exception("central-system port failed")
        finally:
            done.set()

    async def _end_switched_off(self, tx: TransactionRecord) -> bool:
        """Wait for the end's off acknowledgement and, where the board has a hardware
        failsafe, for the failsafe current back at 0; True when both went through.

        Bounded (``board_timeout``), except while the board's failsafe may apply
        a current of its own: the transaction then stays open until the board
        answers (or the station stops), so that the energy a silent board's
        failsafe delivers belongs to it, never to no transaction.
        """
        self._failsafe_for.discard(tx.id)
        self._want_failsafe()
        kept_open = self._failsafe_at_most > 0
        with trio.move_on_after(self.settings.safety.board_timeout):
            await self._wait_off_acknowledged(math.inf)
            await self._wait_failsafe_off()
            return True
        if not kept_open or self._stopping:
            return False
        self._end_kept_open = tx.id
        log.error(
            "transaction %d kept open: the board does not answer, and its failsafe"
            " may apply %.1f A until it does",
            tx.id,
            self._failsafe_at_most,
        )
        # Only this wait is cut short by the station's exit (see _run_loop).
        with trio.CancelScope() as waits:
            self._end_waits.add(waits)
            try:
                await self._wait_off_acknowledged(math.inf)
                await self._wait_failsafe_off()
                log.info("transaction %d: the board answers again; ending it", tx.id)
                return True
            finally:
                self._end_waits.discard(waits)
        return False

    # -- the socket's lock ------------------------------------------------------------------

    def _want_lock(self, locked: bool) -> None:
        """The connector commanded the socket's lock (``SetLock``): the lock lane
        carries it out (latest wins) and answers with LockChecked."""
        self._lock_target = locked
        self._lock_command += 1
        self._lock_wakeup.set()

    async def _lock_tick(self, *, idle: bool = False) -> None:
        """Until the next lock command, or (unless ``idle``) one board poll interval:
        the lane judges from the readings the pollers leave (``board_status``,
        ``meter_reading``)."""
        if idle:
            await self._lock_wakeup.wait()
        else:
            with trio.move_on_after(self.settings.board_poll):
                await self._lock_wakeup.wait()
        if self._lock_wakeup.is_set():
            self._lock_wakeup = trio.Event()

    async def _lock_lane(self) -> None:
        """Carries out the connector's lock commands, one at a time, latest wins.

        The writes are ordinary bus requests (never urgent), each within the time
        the board's poller leaves to other requests (``Board.line``), and only
        while no off-write waits or is on its way: an off never waits for them.
        A release is written only once every off asked for is acknowledged, two
        meter readings completed since show no current (one of them may have
        read its currents before the off: the poller's reading under way then),
        and no welded contactor stands (a weld keeps the socket locked until the
        installer's reset).

        The board confirms nothing positively: the verdict is its lock detection
        at the first reading ``lock_timeout`` after the write, a locking
        (unlocking) error or none. After it, until the next command, a confirmed
        lock that the board no longer reports engaged (a locking error, or its
        read-back of the volatile lock coil gone after a restart) trips the
        station off at once, and a stuck lock that the board reports released
        after all is news too.
        """
        done = 0
        while True:
            command, want = self._lock_command, self._lock_target
            if want is None or command == done:
                await self._lock_tick(idle=True)
                continue
            verdict = await self._carry_out_lock(command, want)
            if verdict is None:
                continue  # a newer command came meanwhile
            done = command
            ok, why = verdict
            self._lock_verdict = (command, want, ok)
            self._lock_decided.unpark_all()
            what = "lock" if want else "release"
            if ok:
                log.info("socket %s confirmed (%s)", what, why)
            else:
                log.error("socket %s failed: %s", what, why)
            await self._send.send(LockChecked(want, ok, why))
            if want == ok:
                # Locked: it must stay so. Stuck: it may free itself.
                await self._watch_lock(command, want, trio.current_time())

    def _off_settled(self) -> bool:
        """Every off asked for is acknowledged, and none waits or is on its way."""
        return (
            self._off_acknowledged >= self._off_requested
            and self._off_in_flight is None
            and not self._off_wakeup.is_set()
        )

    def _quiet_readings(self, since: float, quiet: set[float]) -> int:
        """Count the meter readings completed after ``since`` that show no current
        (at most noise) into ``quiet``; one with current empties it."""
        reading = self.meter_reading
        if reading is not None and reading.read_at > since:
            amps = max((c for c in reading.current if c is not None), default=0.0)
            if amps > CURRENT_NOISE:
                quiet.clear()
            else:
                quiet.add(reading.read_at)
        return len(quiet)

    async def _carry_out_lock(self, command: int, want: bool) -> tuple[bool, str] | None:
        """Write lock command ``command`` and judge it: (ok, why), or None once a
        newer command replaced it."""

        def current() -> bool:
            return self._lock_command == command

        def may_write() -> bool:
            return current() and self._off_settled() and (want or self.commanded == 0)

        first_try: float | None = None
        off_seen: float | None = None
        quiet: set[float] = set()
        while True:
            if not current():
                return None
            if not may_write() or (not want and Fault.WELDED in self.connector.snapshot.faults):
                off_seen = None
                await self._lock_tick()
                continue
            if not want:
                if off_seen is None:
                    off_seen, quiet = trio.current_time(), set()
                if self._quiet_readings(off_seen, quiet) < 2:
                    # Current still flows (the EV's allowance to stop, or a weld
                    # the safety monitor will judge), or no readings yet.
                    await self._lock_tick()
                    continue
            if first_try is None:
                first_try = trio.current_time()
            try:
                await self.board.line.wait(self._lock_write_time or 0.0)
                began = trio.current_time()
                await self.board.set_lock(want, wanted=may_write)
            except Superseded:
                continue
            except FieldbusError as exc:
                if trio.current_time() - first_try >= self.settings.lock_timeout:
                    return (False, f"lock command not acknowledged: {exc}")
                self._log_rarely("lock", f"lock command failed: {exc}; retrying")
                await trio.sleep(WRITE_RETRY)
                continue
            took = trio.current_time() - began
            self._lock_write_time = min(took, self._lock_write_time or took)
            break
        written = trio.current_time()
        wrong = NOT_LOCKED if want else frozenset({LockError.UNLOCKING})
        while current():
            status = self.board_status
            if status is not None and status.read_at >= written + self.settings.lock_timeout:
                errors = status.lock_errors & wrong
                if errors:
                    return (False, ", ".join(sorted(errors)))
                return (True, "no locking error" if want else "no unlocking error")
            await self._lock_tick()
        return None

    async def _watch_lock(self, command: int, locked: bool, since: float) -> None:
        """After a verdict, until the next command: news of the lock for the connector."""
        while self._lock_command == command:
            status = self.board_status
            if status is not None and status.read_at > since:
                if locked:
                    lost = status.lock_errors & NOT_LOCKED
                    forgot = status.lock_commanded is False and status.readback_at > since
                    if lost or forgot:
                        why = ", ".join(sorted(lost)) or "the board no longer holds the lock"
                        await self._send_tripped(LockChecked(True, False, why), f"lock lost: {why}")
                        return
                elif LockError.UNLOCKING not in status.lock_errors:
                    log.info("the stuck socket lock released")
                    await self._send.send(LockChecked(False, True, "released after all"))
                    return
            await self._lock_tick()

    # -- the hardware failsafe -----------------------------------------------------------

    def _want_failsafe(self) -> None:
        """The failsafe current for what runs now: the fallback (clamped) while a
        transaction is on disk, else 0 (station-spec 3: the failsafe is the
        fallback limit's hardware twin, and the fallback is a transaction's)."""
        if self.board.capabilities.failsafe:
            self._failsafe_wakeup.set()

    def _failsafe_target(self) -> float:
        return self._failsafe_current(self.fallback) if self._failsafe_for else 0.0

    def _tell_monitor_failsafe(self) -> None:
        if self.monitor is not None and self.board.capabilities.failsafe:
            self.monitor.failsafe(
                watchdog=self.settings.failsafe_watchdog, at_most=self._failsafe_at_most
            )
            self._safety_changed()

    async def _failsafe_lane(self) -> None:
        """Keeps the board's failsafe current at its target (latest wins, retried)."""
        while True:
            await self._failsafe_wakeup.wait()
            self._failsafe_wakeup = trio.Event()
            want = self._failsafe_target()
            if want == self._failsafe_written:
                self._failsafe_settled.unpark_all()
                continue
            if self.commanded == 0:
                # An off that is wanted reaches the board first (a board that
                # answers again after a silence gets the off-write first).
                await self._wait_off_acknowledged(math.inf)
            # While it is written, the board may hold either value.
            self._failsafe_at_most = max(self._failsafe_at_most, want)
            self._tell_monitor_failsafe()
            try:
                with trio.fail_after(self.settings.off_deadline):
                    if self._failsafe_armed:
                        # The watchdog is armed: the current alone (one request).
                        await self.board.set_failsafe_current(want)
                    else:
                        await self.board.arm_failsafe(self.settings.failsafe_watchdog, want)
                        self._failsafe_armed = True
            except (FieldbusError, ValueError, trio.TooSlowError) as exc:
                self._failsafe_written = None
                why = str(exc) or f"no answer within {self.settings.off_deadline:g} s"
                self._log_rarely("failsafe", f"failsafe not armed with {want:g} A: {why}")
                await trio.sleep(WRITE_RETRY)
                self._failsafe_wakeup.set()
                continue
            self._failsafe_written = want
            self._failsafe_at_most = want
            self._tell_monitor_failsafe()
            self._failsafe_settled.unpark_all()
            if self._failsafe_target() != want:
                self._failsafe_wakeup.set()

    async def _wait_failsafe_off(self) -> None:
        """Until the board's failsafe holds 0 (at once on a board without one, and
        once the station stops: the supervisor's switch-off arms it with 0)."""
        while self._failsafe_at_most > 0 and not self._stopping:
            await self._failsafe_settled.park()

    def _held_reservation(self) -> Reservation | None:
        """The reservation that holds the connector, or that an authorization claimed
        and that holds it again if the authorization lapses."""
        snap = self.connector.snapshot
        return snap.reservation or snap.claimed

    async def _persist_reservation(self) -> None:
        """The held reservation on disk as it is when the write runs (written, or
        removed): each change asks for a write, the writes run in order, so the
        last one leaves what the connector holds. The expiry is kept as wall time
        (trio's clock starts again at a restart)."""
        key = RESERVATION_KEY.format(self.settings.connector_id)
        async with self._settings_lock:
            held = self._held_reservation()
            if held is None:
                await self._quietly(
                    "forget the reservation", self._offload, self.store.delete_setting, key
                )
                return
            expiry = datetime.now(UTC) + timedelta(seconds=held.deadline - trio.current_time())
            text = json.dumps(
                {
                    "reservation_id": held.reservation_id,
                    "id_tag": held.id_tag,
                    "parent_id_tag": held.parent_id_tag,
                    "expiry": expiry.isoformat(),
                }
            )
            await self._quietly(
                "persist the reservation", self._offload, self.store.set_setting, key, text
            )

    def _persist_reservation_later(self) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._persist_reservation, name="persist the reservation")

    async def _restore_reservation(self) -> None:
        """At start: a reservation made before the restart holds the connector again
        until its expiry. An expired one, one the connector cannot hold now
        (faulted, unavailable, an EV left plugged in after a power loss) or an
        unreadable one is dropped."""
        key = RESERVATION_KEY.format(self.settings.connector_id)
        text = await self._offload(self.store.get_setting, key)
        if not text:
            return
        try:
            stored = json.loads(text)
            expiry = datetime.fromisoformat(stored["expiry"])
            event = ReservationMade(
                int(stored["reservation_id"]),
                str(stored["id_tag"]),
                trio.current_time() + (expiry - datetime.now(UTC)).total_seconds(),
                stored["parent_id_tag"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.error("the stored reservation %r is unreadable (%s): dropped", text, exc)
        else:
            if event.deadline <= trio.current_time():
                log.info("reservation %d expired during the restart", event.reservation_id)
            elif self.connector.state is not State.IDLE:
                log.warning(
                    "reservation %d dropped: the connector is %s",
                    event.reservation_id,
                    self.connector.status.value,
                )
            else:
                await self._handle(event)
                log.info("reservation %d held again until %s", event.reservation_id, expiry)
                return
        await self._persist_reservation()

    def _persist_latched(self) -> None:
        """Written by a task of its own (in order), not on the loop."""
        from evse.connector import LATCHING  # noqa: PLC0415

        latched = ",".join(f.value for f in self.connector.snapshot.faults if f in LATCHING)
        key = LATCHED_KEY.format(self.settings.connector_id)
        self._write_setting_later("persist latched faults", key, latched)

    def _write_setting_later(self, what: str, key: str, value: str) -> None:
        async def write() -> None:
            async with self._settings_lock:
                await self._quietly(what, self._offload, self.store.set_setting, key, value)

        if self._nursery is not None:
            self._nursery.start_soon(write, name=what)

    def _notify(self, notice: Callable[[], Awaitable[None]]) -> None:
        """Hand a notification to the central-system port; never waits."""
        try:
            self._notices_send.send_nowait(notice)
        except trio.WouldBlock:
            self._log_rarely("notices", "central-system notifications backlogged: one dropped")

    async def _tell_central(self) -> None:
        """Drain the notifications, in order: the port must never stall or break
        the station, nor the loop wait for it."""
        async for notice in self._notices_receive:
            try:
                with trio.move_on_after(5.0):
                    await notice()
            except Exception:
                log.exception("central-system port failed")

    async def _quietly(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await fn(*args)
        except (FieldbusError, EvseError, ValueError) as exc:
            log.error("%s failed: %s", what, exc)

    # -- limits -------------------------------------------------------------------------

    def _failsafe_current(self, fallback: float) -> float:
        return failsafe_current(
            fallback,
            installer_max=self.settings.installer_max,
            hardware_max=self.board.capabilities.max_current,
        )

    def limit_inputs(self) -> LimitInputs:
        status = self.board_status
        cable = None
        if (
            status is not None
            and status.cable_limit_a is not None
            and self.connector.snapshot.plugged
        ):
            cable = status.cable_limit_a
        return LimitInputs(
            hardware_max=self.board.capabilities.max_current,
            installer_max=self.settings.installer_max,
            fallback=self.fallback,
            cable=cable,
            smart_charging=self.central.smart_charging_limit(),
            tx_profile=self.central.tx_profile_in_effect(),
            central_system=self.central.link,
            mains_lost=self._mains_lost,
        )

    async def _recompute_limit(self) -> None:
        limit = arbitrate(self.limit_inputs())
        if self.tx is not None and self.tx.id == self._deauthorized:
            # StopTransactionOnInvalidId false: no energy for the rest of it.
            limit = Limit(0.0, "deauthorized")
        if limit != self.limit:
            changed = limit.amps != self.limit.amps
            self.limit = limit
            if changed:
                await self._handle(LimitChanged(limit.amps))

    # -- producers of events --------------------------------------------------------------

    async def _poll_board(self) -> None:
        assert self.monitor is not None
        period = self.settings.board_poll
        next_at = trio.current_time()
        faults: set[Fault] = set()
        pilot: PilotState | None = None
        cable: float | None = None
        while True:
            polled = False
            try:
                # The safety requests only; the read-backs below, once acted on.
                status = await self.board.read_status(readbacks=False)
            except FieldbusError as exc:
                self._log_rarely("board", f"board read failed: {exc}")
            else:
                self.board_status = status
                self.monitor.board_reading(status.read_at, contactor_closed=status.contactor_closed)
                self._safety_changed()
                pilot_changed = status.pilot is not pilot
                if pilot_changed:
                    pilot = status.pilot
                    if pilot in (PilotState.E, PilotState.F):
                        # IEC 61851-1 A.3: E/F are faults; off before the loop hears.
                        await self._send_tripped(PilotChanged(pilot), f"control pilot {pilot}")
                    else:
                        await self._send.send(PilotChanged(pilot))
                now_faults = {BOARD_FAULTS[f] for f in status.faults}
                for fault in sorted(now_faults - faults):
                    event = FaultRaised(fault, "reported by the board")
                    await self._send_tripped(event, f"{fault.value} reported by the board")
                for fault in sorted(faults - now_faults):
                    await self._send.send(FaultCleared(fault))
                faults = now_faults
                if status.cable_limit_a != cable or pilot_changed:
                    cable = status.cable_limit_a
                    # The cable limit counts only while plugged (limit_inputs), so
                    # a pilot change recomputes too. Posted, not awaited: the loop
                    # may be writing to disk, and the poller must keep polling.
                    await self._send.send(_RECOMPUTE)
                polled = True
                # Read-backs (every Nth poll; no decision uses them), never while
                # an off-write waits or is on its way: it must not queue behind one.
                if self._off_in_flight is None and not self._off_wakeup.is_set():
                    try:
                        refreshed = await self.board.read_readbacks()
                    except FieldbusError as exc:
                        self._log_rarely("board", f"board read-back failed: {exc}")
                    else:
                        if refreshed is not None:
                            self.board_status = refreshed
            # Not before the board's own request gap (EVSE DIN: 100 ms after the
            # last exchange): waking earlier would only wait again in the master.
            next_at = max(next_at + period, trio.current_time(), self.board.ready_at())
            if polled and self._off_in_flight is None and not self._off_wakeup.is_set():
                # Verdict given, no off-write to make: the meter may have the line
                # until the next poll (it never starts a request that would not fit).
                self.board.share_line(next_at)
            await trio.sleep_until(next_at)

    async def _poll_meter(self) -> None:
        assert self.monitor is not None
        period = self.settings.meter_poll
        # A silent meter holds a shared bus for a whole timeout per attempt:
        # back off (up to half the meter timeout) so the board's polls, which
        # safety depends on, keep their slots.
        backoff_cap = max(period, self.settings.safety.meter_timeout / 2)
        wait = period
        next_at = trio.current_time()
        # On the board's own bus, each request waits for the time the board's
        # poller leaves free (Board.share_line): none delays a poll or an off-write.
        share = self.board.line if self.meter.master is self.board.master else None
        # How long the last failed attempt held the bus (a silent meter: its whole
        # reply timeout); None while the meter answers.
        held: float | None = None
        while True:
            began = trio.current_time()
            try:
                reading = await self.meter.read(share=share)
            except FieldbusError as exc:
                self._log_rarely("meter", f"meter read failed: {exc}")
                wait = min(wait * 2, backoff_cap)
                held = trio.current_time() - began
            else:
                wait = period
                held = None
                self._take_meter(reading)
                if reading.energy_import_wh is not None:
                    await self._send.send(MeterSample(reading.energy_import_wh))
                    tx = self.tx
                    now = trio.current_time()
                    if (
                        tx is not None
                        and now - self._last_persist >= self.settings.persist_interval
                    ):
                        self._last_persist = now
                        # Latest wins: a slow disk skips readings, never queues them.
                        with contextlib.suppress(trio.WouldBlock):
                            self._persist_send.send_nowait(
                                (tx.id, reading.energy_import_wh, reading.timestamp)
                            )
            now = trio.current_time()
            next_at = max(next_at + wait, now)
            last = self.meter_reading
            if held is not None and last is not None:
                # A failing meter's attempt must not be on the bus when its silence
                # verdict falls due: the off-write would wait behind it for the whole
                # reply timeout. Try before it (a meter back in time is no fault),
                # else just after it (the off-write has the bus by then).
                verdict = last.read_at + self.settings.safety.meter_timeout
                margin = self.settings.board_poll
                if next_at < verdict + margin and next_at + held + margin > verdict:
                    before = verdict - held - margin
                    next_at = before if before >= now else verdict + margin
            await trio.sleep_until(next_at)

    async def _persist_readings(self) -> None:
        limit = self.settings.persist_failures
        async for tx_id, energy, at in self._persist_receive:
            try:
                await self._offload(self.store.record_meter, tx_id, energy, at)
            except StoreError as exc:
                tx = self.tx
                if tx is None or tx.id != tx_id:
                    continue  # it ended meanwhile: nothing to keep
                self._persist_failed += 1
                log.error(
                    "meter reading of transaction %d not persisted (%d in a row): %s",
                    tx_id,
                    self._persist_failed,
                    exc,
                )
                if self._persist_failed == limit:
                    event = FaultRaised(
                        Fault.STORE, f"{limit} meter readings in a row not persisted: {exc}"
                    )
                    await self._send_tripped(event, "meter readings not persisted")
            else:
                if self._persist_failed >= limit:
                    await self._send.send(FaultCleared(Fault.STORE))
                self._persist_failed = 0

    async def _watch_safety(self) -> None:
        """Verdicts at once: after every reading and command (they wake this task),
        and exactly at the next deadline (a silent device's timeout, the end of the
        over-current allowance) in between; no polling tick to burn CPU."""
        monitor = self.monitor
        assert monitor is not None
        while True:
            now = trio.current_time()
            for change in monitor.check(now):
                if isinstance(change, FaultRaised):
                    await self._send_tripped(change, f"{change.fault.value}: {change.info}")
                else:
                    await self._send.send(change)
            deadline = monitor.next_deadline()
            if deadline <= now:
                # A deadline already passed is a verdict already given.
                deadline = now + SAFETY_RECHECK
            with trio.move_on_at(deadline):
                await self._safety_wakeup.park()

    def _safety_changed(self) -> None:
        self._safety_wakeup.unpark_all()

    async def _run_timers(self) -> None:
        while True:
            self._timers_changed = trio.Event()
            if self._timers:
                name, deadline = min(self._timers.items(), key=lambda item: item[1])
                with trio.move_on_at(deadline):
                    await self._timers_changed.wait()
                    continue
                if self._timers.get(name) == deadline:
                    del self._timers[name]
                    await self._send.send(TimerExpired(name))
            else:
                await self._timers_changed.wait()

    def _log_rarely(self, key: str, message: str) -> None:
        now = trio.current_time()
        if now - self._log_quiet.get(key, -math.inf) >= 10.0:
            self._log_quiet[key] = now
            log.warning("%s", message)

    # -- requests from the inputs (RFID, local control, central system) -----------------

    async def call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``fn`` inside the loop and return its result."""
        send, receive = trio.open_memory_channel[outcome.Outcome[Any]](1)
        await self._send.send(_Call(fn, send))
        async with receive:
            result = await receive.receive()
        return result.unwrap()

    async def present_id_tag(self, id_tag: str, source: str = "local") -> AuthResult:
        """A card or tag was presented: authorize it and act on the answer.

        During a transaction the tag that started it stops it, online or offline,
        without asking the chain (no Authorize.req for the same identifier), and
        a tag of the same parentIdTag stops it too (``_stops_transaction``).
        """
        snap = self.connector.snapshot
        if snap.in_transaction and same_id_tag(id_tag, snap.id_tag):
            result = AuthResult(
                id_tag, AuthStatus.ACCEPTED, STARTED_IT, parent_id_tag=snap.parent_id_tag
            )
        else:
            result = await self.auth.authorize(id_tag, datetime.now(UTC))
        log.info("id tag %s from %s: %s (%s)", id_tag, source, result.status.value, result.source)
        if self._stops_transaction(id_tag, result):
            await self.request_stop(StopReason.LOCAL, id_tag)
            return result
        if result.accepted:
            parent = await self._parent_for_reservation(result.id_tag, result.parent_id_tag)

            async def apply() -> None:
                if self.connector.accepts(Authorized):
                    await self._handle(Authorized(result.id_tag, parent))
                else:
                    log.warning(
                        "id tag %s accepted, but the connector is %s",
                        id_tag,
                        self.connector.status.value,
                    )

            await self.call(apply)
        return result

    async def remote_start(self, id_tag: str) -> bool:
        """RemoteStartTransaction: the central system authorizes ``id_tag`` (already checked
        with an Authorize.req where AuthorizeRemoteTxRequests asks for it). False when the
        connector cannot take it: in a transaction, faulted, unavailable, reserved for
        another tag."""
        authorized = Authorized(id_tag, await self._parent_for_reservation(id_tag, None))

        async def apply() -> bool:
            snap = self.connector.snapshot
            if snap.in_transaction or not self.connector.accepts(Authorized):
                return False
            reservation = snap.reservation
            if reservation is not None and not reservation.claimed_by(authorized):
                return False
            await self._handle(authorized)
            return True

        result: bool = await self.call(apply)
        return result

    def _stops_transaction(self, id_tag: str, result: AuthResult) -> bool:
        """Whether presenting ``id_tag`` (answered ``result``) stops the running
        transaction: the tag that started it does, and so does one with the same
        parentIdTag, online or offline (OCPP 1.6 IdTagInfo.parentIdTag).

        Each tag's parent is the one its authorization gave (the connector keeps
        the starting one), else the one the chain's tables hold for it, whatever
        their status (``AuthChain.parent_of``: the installer's tags, the local
        list, the cache, which keeps the central system's answers). A tag that a
        step refused by name (Blocked, Expired, Invalid from the list, the cache
        or the central system) stops nothing; one that no step decided on (offline
        with LocalAuthorizeOffline false, say) still belongs to its group.
        """
        snap = self.connector.snapshot
        if not snap.in_transaction or snap.id_tag is None:
            return False
        if same_id_tag(id_tag, snap.id_tag):
            return True
        if not result.accepted and result.source != NO_SOURCE:
            return False
        ours = snap.parent_id_tag or self.auth.parent_of(snap.id_tag)
        theirs = result.parent_id_tag or self.auth.parent_of(id_tag)
        return ours is not None and same_id_tag(theirs, ours)

    async def deauthorize(self, local_tx_id: int, *, stop: bool) -> bool:
        """The central system refused the id tag of transaction ``local_tx_id``
        (StartTransaction.conf not Accepted; OCPP 1.6 9.1.27 StopTransactionOnInvalidId):
        ``stop`` ends it with DeAuthorized, else it goes on offered 0 A (SuspendedEVSE)
        until it ends. False when that transaction is not the one running."""
        if stop:
            if self.tx is None or self.tx.id != local_tx_id:
                return False
            return await self.request_stop(StopReason.DE_AUTHORIZED)

        async def apply() -> bool:
            if self.tx is None or self.tx.id != local_tx_id:
                return False
            self._deauthorized = local_tx_id
            await self._recompute_limit()
            return True

        suspended: bool = await self.call(apply)
        return suspended

    async def _parent_for_reservation(self, id_tag: str, parent: str | None) -> str | None:
        """``id_tag``'s parentIdTag where a reservation made for a parent needs it
        and the authorization gave none (OCPP 1.6 5.13): ``parent_lookup``'s."""
        held = self._held_reservation()
        if (
            parent is not None
            or held is None
            or held.parent_id_tag is None
            or held.claimed_by(Authorized(id_tag))
            or self.parent_lookup is None
        ):
            return parent
        try:
            return await self.parent_lookup(id_tag)
        except Exception:
            log.exception("the parentIdTag of %s could not be looked up", id_tag)
            return None

    async def request_stop(self, reason: StopReason, id_tag: str | None = None) -> bool:
        """Stop the running transaction; False when there is none.

        The off-write goes out at once through the trip lane; the loop ends the
        transaction (and its record) when it gets to the request.
        """
        tripped = self.connector.snapshot.in_transaction
        if tripped:
            self._trip(f"stop requested ({reason.value})")

        async def apply() -> bool:
            try:
                if not self.connector.snapshot.in_transaction:
                    return False
                await self._handle(StopRequested(reason, id_tag))
                return True
            finally:
                if tripped:
                    self._trips -= 1

        send, receive = trio.open_memory_channel[outcome.Outcome[Any]](1)
        queued = False
        try:
            await self._send.send(_Call(apply, send))
            queued = True
        finally:
            if tripped and not queued:
                # Never queued (cancelled): the loop will not release the trip.
                self._trips -= 1
        async with receive:
            answer = await receive.receive()
        result: bool = answer.unwrap()
        return result

    async def set_availability(self, operative: bool, connector_id: int | None = None) -> str:
        """OCPP ChangeAvailability semantics: Accepted, or Scheduled during a transaction.

        Connector 0 is the charge point (OCPP 1.6 5.2): its change applies to it
        and to every connector; a connector's own change leaves connector 0 as it
        is. A connector is operative only while both say so. The settings are
        persisted here, by the caller, not on the loop.
        """
        whole = connector_id == 0
        keys = [AVAILABILITY_KEY.format(self.settings.connector_id)]
        if whole:
            keys.append(STATION_AVAILABILITY_KEY)
        async with self._settings_lock:
            for key in keys:
                await self._offload(self.store.set_setting, key, "1" if operative else "0")

        async def apply() -> str:
            if whole and self.station_operative != operative:
                self.station_operative = operative
                self._notify(partial(self.central.status_changed, 0, *self.station_status()))
            self.connector_operative = operative
            effective = (
                self.connector_operative and self.station_operative and not self.held_unavailable
            )
            scheduled = self.connector.snapshot.in_transaction and not effective
            if effective != self.connector.snapshot.operative:
                await self._handle(AvailabilityChanged(effective))
            return "Scheduled" if scheduled else "Accepted"

        result: str = await self.call(apply)
        return result

    async def hold_unavailable(self, held: bool) -> None:
        """Unavailable (``held``) for this run only, or back to what ChangeAvailability
        set: nothing is persisted, so a restart (into a new release, after a power
        cut) comes back as available as before. A running transaction goes on; the
        connector becomes Unavailable when it ends (OCPP 1.6 5.19: an install waits
        for charging to end, no new transaction starts meanwhile)."""

        async def apply() -> None:
            self.held_unavailable = held
            effective = self.connector_operative and self.station_operative and not held
            if effective != self.connector.snapshot.operative:
                await self._handle(AvailabilityChanged(effective))

        await self.call(apply)

    async def reserve(
        self, reservation_id: int, id_tag: str, expiry: datetime, parent_id_tag: str | None = None
    ) -> str:
        """OCPP 1.6 ReserveNow: Accepted, Occupied, Faulted, Unavailable, or Rejected
        for an expiry already past; ``expiry`` is on the station's (wall) clock.

        The same id again replaces the reservation (OCPP 1.6 5.13); a refusal
        changes nothing. Accepted once the reservation is on disk: it holds the
        connector again after a restart, until its expiry."""

        async def apply() -> str:
            state = self.connector.state
            held = self.connector.snapshot.reservation
            if state is State.FAULTED:
                return "Faulted"
            if state is State.UNAVAILABLE:
                return "Unavailable"
            if state is State.RESERVED and held is not None:
                if held.reservation_id != reservation_id:
                    return "Occupied"
            elif state is not State.IDLE:
                return "Occupied"
            left = (expiry - datetime.now(UTC)).total_seconds()
            if left <= 0:
                return "Rejected"
            event = ReservationMade(
                reservation_id, id_tag, trio.current_time() + left, parent_id_tag
            )
            await self._handle(event)
            return "Accepted"

        result: str = await self.call(apply)
        if result == "Accepted":
            await self._persist_reservation()
        return result

    async def cancel_reservation(self, reservation_id: int) -> bool:
        """OCPP 1.6 CancelReservation: False when no such reservation is held."""

        async def apply() -> bool:
            held = self.connector.snapshot.reservation
            if held is None or held.reservation_id != reservation_id:
                return False
            await self._handle(ReservationCancelled(reservation_id))
            return True

        result: bool = await self.call(apply)
        return result

    async def unlock_connector(self) -> str:
        """OCPP 1.6 UnlockConnector (5.18) for the socket: Unlocked, UnlockFailed or
        NotSupported.

        Without a lock to drive (the cable version, a board without one) it is
        NotSupported and nothing is stopped. Otherwise a running transaction is
        stopped first (UnlockCommand: its off-write goes out at once), then the
        lock is released (``UnlockRequested``): Unlocked once the board's lock
        detection shows no unlocking error, UnlockFailed when it shows one, when
        a welded contactor keeps the socket locked, or when no verdict came
        within UNLOCK_ANSWER_WITHIN (the meter still reading current, a silent
        board); the release then goes on, and the connector hears of it.
        """
        if not self.lock_in_use:
            return "NotSupported"
        if self.connector.snapshot.in_transaction:
            await self.request_stop(StopReason.UNLOCK_COMMAND)

        async def apply() -> int | None:
            before = self._lock_command
            await self._handle(UnlockRequested())
            if self._lock_command == before or self._lock_target is not False:
                return None  # no release commanded: a welded contactor keeps it locked
            return self._lock_command

        command: int | None = await self.call(apply)
        if command is None:
            return "UnlockFailed"
        with trio.move_on_after(UNLOCK_ANSWER_WITHIN):
            while True:
                verdict = self._lock_verdict
                if verdict is not None and verdict[0] >= command:
                    _, locked, ok = verdict
                    return "Unlocked" if ok and not locked else "UnlockFailed"
                await self._lock_decided.park()
        return "UnlockFailed"

    async def reset_faults(self) -> None:
        async def apply() -> None:
            assert self.monitor is not None
            self.monitor.reset_latched()
            await self._handle(ResetFaults())
            self._persist_latched()

        await self.call(apply)

    async def set_fallback(self, amps: float) -> None:
        """A new fallback limit: the offer is recomputed, and the board's failsafe
        re-armed with it while a transaction runs (by its own task)."""

        async def apply() -> None:
            self.fallback = effective_fallback(
                amps,
                installer_max=self.settings.installer_max,
                hardware_max=self.board.capabilities.max_current,
            )
            self._want_failsafe()
            await self._recompute_limit()

        await self.call(apply)

    async def mains_power(self, ok: bool, why: str) -> None:
        """Mains power lost (a UPS daemon's SIGPWR, the meter's voltages) or back.

        Lost: the off-write goes out at once and a running transaction ends with
        PowerLoss while the station still can, its StopTransaction on disk with
        its end (the record is kept); the connector then shows what the EV does
        (Finishing while it is plugged in, OCTT TC_032_1), and the offer is 0 A
        until mains is back (bound by "mains lost": a transaction started
        meanwhile is SuspendedEVSE). Returns once that end is written (bounded).
        """
        if ok == (not self._mains_lost):
            return
        self._mains_lost = not ok
        if ok:
            log.warning("mains power back (%s)", why)
            await self._send.send(_RECOMPUTE)
            return
        log.warning("mains power lost (%s): switching off", why)
        # request_stop writes the off at once (trip lane), then the loop ends the
        # transaction; the recomputation after it keeps the offer at 0 A.
        await self.request_stop(StopReason.POWER_LOSS)
        await self._send.send(_RECOMPUTE)
        with trio.move_on_after(END_DEADLINE + self.settings.safety.board_timeout):
            await self._ending.wait()

    def _check_mains(self, reading: MeterReading) -> None:
        """The meter as the mains input: every phase below the threshold is lost,
        any phase above it (with 10 % hysteresis) is back."""
        threshold = self.settings.mains_lost_voltage
        volts = [v for v in reading.voltage if v is not None]
        if threshold <= 0 or not volts or self._nursery is None:
            return
        if not self._mains_lost and max(volts) < threshold:
            why = f"meter reads {max(volts):.0f} V"
            self._nursery.start_soon(self.mains_power, False, why, name="mains lost")
        elif self._mains_lost and self._mains_by_meter and max(volts) >= threshold * 1.1:
            why = f"meter reads {max(volts):.0f} V"
            self._nursery.start_soon(self.mains_power, True, why, name="mains back")
        self._mains_by_meter = self._mains_lost or max(volts) < threshold

    def connection_timeout_changed(self, seconds: float) -> None:
        """ConnectionTimeOut changed (the registry): the connector hears it as an event."""
        try:
            self._send.send_nowait(ConnectionTimeOutChanged(seconds))
        except trio.WouldBlock:
            log.error("ConnectionTimeOut=%g s not applied: the loop is full", seconds)

    def stop_on_ev_disconnect(self, enabled: bool) -> None:
        """StopTransactionOnEVSideDisconnect changed (or its value at start)."""
        try:
            self._send.send_nowait(StopOnEvDisconnect(enabled))
        except trio.WouldBlock:
            log.error("StopTransactionOnEVSideDisconnect=%s not applied: the loop is full", enabled)

    async def inputs_changed(self) -> None:
        """A limit input outside the station changed (central link, schedule)."""
        await self._send.send(_RECOMPUTE)

    # -- what operators see -------------------------------------------------------------

    def station_status(self) -> tuple[Status, ErrorCode, str]:
        """Connector 0's status: the charge point itself (OCPP 1.6 4.9, 5.2). It
        follows its own availability and the faults of the station as a whole
        (the store, the firmware), never one connector's state."""
        whole = [f for f in self.connector.snapshot.faults if f in STATION_FAULTS]
        if whole:
            info = ", ".join(f.value for f in whole)
            return (Status.FAULTED, FAULT_ERROR_CODES[whole[0]], info)
        if not self.station_operative:
            return (Status.UNAVAILABLE, ErrorCode.NO_ERROR, "")
        return (Status.AVAILABLE, ErrorCode.NO_ERROR, "")

    def view(self) -> dict[str, Any]:
        snap = self.connector.snapshot
        reading = self.meter_reading
        board = self.board_status
        tx = self.tx
        energy = reading.energy_import_wh if reading else None
        return {
            "connector": self.settings.connector_id,
            "state": snap.state.value,
            "status": self.connector.status.value,
            "error_code": self.connector.error_code.value,
            "faults": {f.value: info for f, info in snap.faults.items()},
            "status_since": self.status_since.isoformat().replace("+00:00", "Z"),
            "pilot": snap.pilot.value,
            "offered_a": self.commanded,
            "limit": {"amps": self.limit.amps, "bound_by": self.limit.bound_by},
            "power_w": reading.power_total if reading else None,
            "energy_wh": energy,
            "current_a": list(reading.current) if reading else None,
            "operative": snap.operative,
            "lock": snap.lock.value if self.lock_in_use else None,
            "central_system": self.central.describe(),
            "transaction": None
            if tx is None
            else {
                "id": tx.id,
                "id_tag": tx.id_tag,
                "started_at": tx.started_at.isoformat().replace("+00:00", "Z"),
                "meter_start_wh": tx.meter_start_wh,
                "energy_wh": (energy - tx.meter_start_wh) if energy is not None else None,
            },
            "board": board.to_json() if board else None,
            "meter": reading.to_json() if reading else None,
            # What the last start found running and ended as PowerLoss (``_recover``):
            # an operator who finds the EV not charged after an outage sees why.
            "recovered": [
                {
                    "id": r.id,
                    "id_tag": r.id_tag,
                    "started_at": r.started_at.isoformat().replace("+00:00", "Z"),
                    "stopped_at": r.stopped_at.isoformat().replace("+00:00", "Z")
                    if r.stopped_at
                    else None,
                    "stop_reason": r.stop_reason,
                    "meter_start_wh": r.meter_start_wh,
                    "meter_stop_wh": r.meter_stop_wh,
                    "energy_wh": None
                    if r.meter_stop_wh is None
                    else r.meter_stop_wh - r.meter_start_wh,
                }
                for r in self.recovered
            ],
        }
