"""The station: the I/O around the connector state machine.

One task (``run_loop``) owns the ``Connector``: it takes events from one
channel, feeds them to the pure machine and carries out the effects in the
order the machine returns them. Everything else talks to it through that
channel: the board and meter pollers, the safety monitor, the timers, and
the inputs (RFID, local control, later the central system), whose requests
run inside the loop (``_Call``) so that they see and change consistent state.

Disk and safety: a transaction is written to the store (``BeginTransaction``)
before the ``SetCurrent`` that lets the board close the contactor is sent;
at the end, ``SetCurrent(0)`` goes out before the record is written, so a
stop never waits for the disk. Meter readings of a running transaction are
persisted by their own task, off the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import outcome
import trio

from evse.auth import AuthChain, AuthResult
from evse.central import CentralSystemPort, Standalone
from evse.connector import (
    TRANSITIONS,
    Authorized,
    AvailabilityChanged,
    BeginTransaction,
    CancelTimer,
    Connector,
    Effect,
    EndTransaction,
    Event,
    Fault,
    FaultCleared,
    FaultRaised,
    LimitChanged,
    MeterSample,
    PilotChanged,
    ReservationCancelled,
    ReservationMade,
    ResetFaults,
    SetCurrent,
    StartTimer,
    State,
    StatusChanged,
    StopReason,
    StopRequested,
    TimerExpired,
)
from evse.errors import StoreError
from evse.limits import Limit, LimitInputs, arbitrate, failsafe_current
from evse.safety import SafetyMonitor, SafetySettings
from evse.store import Store, TransactionRecord
from fieldbus.boards import Board, BoardFault, BoardStatus, PilotState
from fieldbus.errors import FieldbusError
from fieldbus.meters import Meter, MeterReading

log = logging.getLogger(__name__)

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

#: When no deadline is ahead (verdicts given), the safety monitor looks again after this.
SAFETY_RECHECK = 0.25

AVAILABILITY_KEY = "connector.{}.operative"
LATCHED_KEY = "connector.{}.latched_faults"


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


@dataclass
class _Call:
    """A request from outside, run inside the loop against the current state."""

    fn: Callable[[], Awaitable[Any]]
    reply: trio.MemorySendChannel[outcome.Outcome[Any]]


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
        self.connector = Connector(
            connection_timeout=settings.connection_timeout, connector_id=settings.connector_id
        )
        self._send, self._receive = trio.open_memory_channel[Event | _Call](512)
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
        self._insisting_off = False
        self._safety_wakeup = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._last_persist = -math.inf
        self._log_quiet: dict[str, float] = {}

    # -- the loop ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """All of the station's tasks; reports started once the loop serves events."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.monitor = SafetyMonitor(self.settings.safety, now=trio.current_time())
            await nursery.start(self._run_loop, name="station loop")
            nursery.start_soon(self._poll_board, name="board poller")
            nursery.start_soon(self._poll_meter, name="meter poller")
            nursery.start_soon(self._watch_safety, name="safety monitor")
            nursery.start_soon(self._run_timers, name="timers")
            nursery.start_soon(self._persist_readings, name="meter persistence")
            task_status.started()

    async def _run_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        await self._startup()
        task_status.started()
        async for item in self._receive:
            self.loop_alive = trio.current_time()
            if isinstance(item, _Call):
                # A request's own failure goes back to whoever asked; the
                # loop (and the charging it serves) carries on.
                result = await outcome.acapture(item.fn)
                with contextlib.suppress(trio.BrokenResourceError, trio.WouldBlock):
                    item.reply.send_nowait(result)
            else:
                await self._handle(item)

    async def _startup(self) -> None:
        store = self.store
        cid = self.settings.connector_id
        self.recovered = await self._offload(store.recover_power_loss)
        for record in self.recovered:
            log.warning(
                "transaction %d was running at power loss: ended with PowerLoss at %.1f Wh",
                record.id,
                record.meter_stop_wh or 0.0,
            )
            await self._tell_central(self.central.transaction_ended(record))
        await self._execute(self.connector.start())
        board = self.board
        if board.capabilities.failsafe:
            # A dead firmware ends at the fallback limit (or off): station-spec 3.
            current = failsafe_current(self.fallback)
            await self._quietly(
                "arm failsafe", board.arm_failsafe, self.settings.failsafe_watchdog, current
            )
        if board.capabilities.enable_switch:
            await self._quietly("enable board", board.set_enabled, True)
        await self._quietly("initialize board", board.initialize)
        latched = await self._offload(store.get_setting, LATCHED_KEY.format(cid))
        for name in filter(None, (latched or "").split(",")):
            await self._handle(FaultRaised(Fault(name), "latched before the restart"))
        operative = await self._offload(store.get_setting, AVAILABILITY_KEY.format(cid))
        if operative == "0":
            await self._handle(AvailabilityChanged(False))
        await self._recompute_limit()

    async def _handle(self, event: Event) -> None:
        now = trio.current_time()
        effects = self.connector.handle(event, now)
        await self._execute(effects)
        if isinstance(event, FaultRaised) and event.fault is Fault.WELDED:
            await self._persist_latched()
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
                    await self._set_current(amps)
                case BeginTransaction(id_tag=id_tag, meter_start_wh=meter_start):
                    if not await self._begin(id_tag, meter_start):
                        # Not on disk: the current that would follow must not
                        # be sent. The fault switches off and ends the attempt.
                        return
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
                    await self._tell_central(
                        self.central.status_changed(self.settings.connector_id, status, code, info)
                    )
                case StartTimer(name=name, deadline=deadline):
                    self._timers[name] = deadline
                    self._timers_changed.set()
                case CancelTimer(name=name):
                    self._timers.pop(name, None)
                    self._timers_changed.set()

    async def _set_current(self, amps: float) -> None:
        assert self.monitor is not None
        self.monitor.command(trio.current_time(), amps)
        self._safety_changed()
        self.commanded = amps
        try:
            await self.board.set_current(amps)
            self.monitor.command_written(trio.current_time(), amps)
            self._safety_changed()
        except (FieldbusError, ValueError) as exc:
            if amps > 0:
                # Not handled here, in the middle of this effect list: the
                # safety monitor raises BOARD_SILENT on its next check (and
                # clears it once the board answers again), after this list.
                log.error("could not command %.1f A: %s", amps, exc)
                self.monitor.command_failed(trio.current_time())
                self._safety_changed()
            else:
                log.error("could not switch off: %s; retrying until it goes through", exc)
                self._insist_off()

    def _insist_off(self) -> None:
        if self._insisting_off or self._nursery is None:
            return
        self._insisting_off = True

        async def retry() -> None:
            try:
                while self.commanded == 0:
                    try:
                        await self.board.set_current(0)
                        if self.monitor is not None:
                            self.monitor.command_written(trio.current_time(), 0.0)
                        return
                    except FieldbusError:
                        await trio.sleep(0.2)
            finally:
                self._insisting_off = False

        self._nursery.start_soon(retry, name="insist off")

    async def _begin(self, id_tag: str, meter_start: float) -> bool:
        reading = self.meter_reading
        started_at = reading.timestamp if reading is not None else datetime.now(UTC)
        try:
            record = await self._offload(
                lambda: self.store.begin_transaction(
                    connector_id=self.settings.connector_id,
                    id_tag=id_tag,
                    meter_start_wh=meter_start,
                    started_at=started_at,
                )
            )
        except StoreError as exc:
            log.error("transaction not started: %s", exc)
            await self._handle(FaultRaised(Fault.INTERNAL, f"store: {exc}"))
            return False
        self.tx = record
        self._last_persist = trio.current_time()
        log.info("transaction %d started for %s at %.1f Wh", record.id, id_tag, meter_start)
        await self._tell_central(self.central.transaction_started(record))
        return True

    async def _end(self, reason: StopReason, meter_stop: float, id_tag: str | None) -> None:
        tx, self.tx = self.tx, None
        if tx is None:
            log.error("transaction end (%s) without a transaction on record", reason.value)
            return
        # The latest reading is the stop value: it is at least as new as any
        # the persistence task wrote (which only ever writes readings taken
        # before it), so the record never goes backwards.
        reading = self.meter_reading
        if reading is not None and reading.energy_import_wh is not None:
            meter_stop = max(meter_stop, reading.energy_import_wh)
        stopped_at = reading.timestamp if reading is not None else datetime.now(UTC)

        def write() -> TransactionRecord:
            # Never before the last persisted reading, even if the wall clock
            # stepped back meanwhile (NTP): the store refuses going backwards.
            current = self.store.transaction(tx.id)
            return self.store.end_transaction(
                tx.id,
                reason=reason.value,
                meter_stop_wh=max(meter_stop, current.last_meter_wh),
                stopped_at=max(stopped_at, current.last_meter_at),
                id_tag=id_tag,
            )

        try:
            record = await self._offload(write)
        except StoreError as exc:
            # It stays "running" on disk: the next start ends it as PowerLoss.
            log.critical("transaction %d end not written: %s", tx.id, exc)
            return
        log.info("transaction %d ended (%s) at %.1f Wh", tx.id, reason.value, meter_stop)
        await self._tell_central(self.central.transaction_ended(record))

    async def _persist_latched(self) -> None:
        from evse.connector import LATCHING  # noqa: PLC0415

        latched = ",".join(f.value for f in self.connector.snapshot.faults if f in LATCHING)
        key = LATCHED_KEY.format(self.settings.connector_id)
        await self._quietly(
            "persist latched faults", self._offload, self.store.set_setting, key, latched
        )

    async def _tell_central(self, call: Awaitable[None]) -> None:
        """The central-system port must never stall or break the station."""
        try:
            with trio.move_on_after(1.0):
                await call
        except Exception:
            log.exception("central-system port failed")

    async def _quietly(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await fn(*args)
        except (FieldbusError, StoreError, ValueError) as exc:
            log.error("%s failed: %s", what, exc)

    # -- limits -------------------------------------------------------------------------

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
            central_system=self.central.link,
        )

    async def _recompute_limit(self) -> None:
        limit = arbitrate(self.limit_inputs())
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
            try:
                status = await self.board.read_status()
            except FieldbusError as exc:
                self._log_rarely("board", f"board read failed: {exc}")
            else:
                self.board_status = status
                self.monitor.board_reading(status.read_at, contactor_closed=status.contactor_closed)
                self._safety_changed()
                if status.pilot is not pilot:
                    pilot = status.pilot
                    await self._send.send(PilotChanged(pilot))
                now_faults = {BOARD_FAULTS[f] for f in status.faults}
                for fault in sorted(now_faults - faults):
                    await self._send.send(FaultRaised(fault, "reported by the board"))
                for fault in sorted(faults - now_faults):
                    await self._send.send(FaultCleared(fault))
                faults = now_faults
                if status.cable_limit_a != cable:
                    cable = status.cable_limit_a
                    # Posted, not awaited: the loop may be writing to disk
                    # (BeginTransaction), and the poller must keep polling.
                    await self._post(self._recompute_limit)
            next_at = max(next_at + period, trio.current_time())
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
        while True:
            try:
                reading = await self.meter.read()
            except FieldbusError as exc:
                self._log_rarely("meter", f"meter read failed: {exc}")
                wait = min(wait * 2, backoff_cap)
            else:
                wait = period
                self.meter_reading = reading
                self.monitor.meter_reading(reading.read_at, list(reading.current))
                self._safety_changed()
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
            next_at = max(next_at + wait, trio.current_time())
            await trio.sleep_until(next_at)

    async def _persist_readings(self) -> None:
        async for tx_id, energy, at in self._persist_receive:
            try:
                await self._offload(self.store.record_meter, tx_id, energy, at)
            except StoreError as exc:
                # The transaction may have ended meanwhile; nothing to keep then.
                log.debug("meter reading not persisted: %s", exc)

    async def _watch_safety(self) -> None:
        """Verdicts at once: after every reading and command (they wake this task),
        and exactly at the next deadline (a silent device's timeout, the end of the
        over-current allowance) in between; no polling tick to burn CPU."""
        monitor = self.monitor
        assert monitor is not None
        while True:
            now = trio.current_time()
            for change in monitor.check(now):
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

    async def _post(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """Run ``fn`` inside the loop without waiting for it."""
        send, _ = trio.open_memory_channel[outcome.Outcome[Any]](1)
        await self._send.send(_Call(fn, send))

    async def call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``fn`` inside the loop and return its result."""
        send, receive = trio.open_memory_channel[outcome.Outcome[Any]](1)
        await self._send.send(_Call(fn, send))
        async with receive:
            result = await receive.receive()
        return result.unwrap()

    async def present_id_tag(self, id_tag: str, source: str = "local") -> AuthResult:
        """A card or tag was presented: authorize it and act on the answer."""
        result = await self.auth.authorize(id_tag, datetime.now(UTC))
        log.info("id tag %s from %s: %s (%s)", id_tag, source, result.status.value, result.source)
        if result.accepted:

            async def apply() -> None:
                if Authorized in TRANSITIONS[self.connector.state]:
                    await self._handle(Authorized(result.id_tag, result.parent_id_tag))
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

        async def apply() -> bool:
            snap = self.connector.snapshot
            if snap.in_transaction or Authorized not in TRANSITIONS[self.connector.state]:
                return False
            reservation = snap.reservation
            if reservation is not None and not reservation.claimed_by(Authorized(id_tag)):
                return False
            await self._handle(Authorized(id_tag))
            return True

        result: bool = await self.call(apply)
        return result

    async def request_stop(self, reason: StopReason, id_tag: str | None = None) -> bool:
        """Stop the running transaction; False when there is none."""

        async def apply() -> bool:
            if not self.connector.snapshot.in_transaction:
                return False
            await self._handle(StopRequested(reason, id_tag))
            return True

        result: bool = await self.call(apply)
        return result

    async def set_availability(self, operative: bool) -> str:
        """OCPP ChangeAvailability semantics: Accepted, or Scheduled during a transaction."""

        async def apply() -> str:
            key = AVAILABILITY_KEY.format(self.settings.connector_id)
            await self._offload(self.store.set_setting, key, "1" if operative else "0")
            scheduled = self.connector.snapshot.in_transaction and not operative
            await self._handle(AvailabilityChanged(operative))
            return "Scheduled" if scheduled else "Accepted"

        result: str = await self.call(apply)
        return result

    async def reserve(
        self, reservation_id: int, id_tag: str, expiry: datetime, parent_id_tag: str | None = None
    ) -> str:
        """OCPP 1.6 ReserveNow: Accepted, Occupied, Faulted or Unavailable."""

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
                # The same id again replaces the reservation (OCPP 1.6 5.13).
                await self._handle(ReservationCancelled(reservation_id))
            if self.connector.state is not State.IDLE:
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

    async def reset_faults(self) -> None:
        async def apply() -> None:
            assert self.monitor is not None
            self.monitor.reset_latched()
            await self._handle(ResetFaults())
            await self._persist_latched()

        await self.call(apply)

    async def set_fallback(self, amps: float) -> None:
        """A new fallback limit: re-arm the board's failsafe with it, recompute the offer."""

        async def apply() -> None:
            self.fallback = amps
            if self.board.capabilities.failsafe:
                await self._quietly(
                    "re-arm failsafe",
                    self.board.arm_failsafe,
                    self.settings.failsafe_watchdog,
                    failsafe_current(amps),
                )
            await self._recompute_limit()

        await self.call(apply)

    async def inputs_changed(self) -> None:
        """A limit input outside the station changed (central link, schedule)."""
        await self.call(self._recompute_limit)

    # -- what operators see -------------------------------------------------------------

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
        }
