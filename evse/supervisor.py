"""The supervisor: the one nursery tree of a running station.

::

    Supervisor.run
    ├── store                 SQLite (WAL, synchronous=FULL), opened first, closed last
    ├── buses                 one ModbusMaster per distinct port: a board and a
    │                         meter on one RS-485 line share it (one request in flight)
    └── nursery "station"
        ├── station           evse.station.Station.run (started once board and
        │   │                     meter answered: hardware_ready, systemd READY=1)
        │   ├── trip lane         the off-write of every fault verdict and stop,
        │   │                     at once, urgent on the bus, shielded, deadline-bound
        │   ├── current commands  the latest current above 0 (latest wins; dropped
        │   │                     before the wire when an off overtook it)
        │   ├── hardware failsafe where the board has one: its current, 0 A outside
        │   │                     a transaction, the fallback limit while one is on disk
        │   ├── central notices   hand-off to the central-system port (never awaited
        │   │                     by the loop)
        │   ├── station loop      the single owner of the connector state
        │   ├── start for <tag>   on demand: a transaction's record (fresh meter
        │   │                     reading, one commit with its StartTransaction)
        │   ├── end (<reason>)    on demand, shielded: off acknowledged, meter read,
        │   │                     one commit with its StopTransaction
        │   ├── board poller      pilot, faults, relay, cable limit (fast)
        │   ├── meter poller      energy, currents (slower)
        │   ├── safety monitor    stale readings, over-current, welded contactor
        │   ├── timers            ConnectionTimeOut
        │   ├── socket lock       the socket's lock (where the board drives one): its
        │   │                     writes after the off, its verdict from the board
        │   └── meter persistence the running transaction's reading, to disk
        ├── rfid reader           if configured
        ├── central system        isolated slot: restarted with backoff when it
        │                         fails, never takes charging down (OcppPort.run and
        │                         the charge point's tree: ARCHITECTURE.md)
        └── services              from ops/: local control socket, systemd watchdog
    finally, switch_off: allowed current 0, board disabled, its failsafe current
    0, a transaction still running ended as "Other" (each step shielded, with
    its own deadline, a failure of one never skipping the next).

Any exception in any task cancels the tree; the ``finally`` then runs the
switch-off sequence (rule 1). A clean shutdown (SIGTERM) first stops the
running transaction with reason Reboot (the trip lane writes off at once, the
loop then writes the record), then cancels; ``abort`` (a wedged loop) cancels
at once. A device that does not answer at start ends ``run`` with
HardwareUnavailable, after the off-write was attempted and a transaction left
running by a crash was ended.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import trio

from evse.auth import AuthChain, AuthStep
from evse.central import CentralSystemPort, Standalone
from evse.connector import StopReason
from evse.errors import EvseError
from evse.rfid import ReaderState, RfidConfig, RfidReader
from evse.station import Offload, Station, StationSettings
from evse.store import Store
from fieldbus.boards import BOARD_MODELS, Board
from fieldbus.errors import FieldbusError
from fieldbus.links import Link, make_link
from fieldbus.master import ModbusMaster
from fieldbus.meters import METER_MODELS, Meter
from fieldbus.ports import PortSpec, parse_port

log = logging.getLogger(__name__)

#: The deadline of the switch-off's last step: ending the transaction record
#: (a meter read, one SQLite commit).
ORPHAN_DEADLINE = 3.0

#: The least time a switch-off step gets, even after an earlier one used up
#: the shared deadline (one failure never skips the next step).
MIN_STEP = 1.0

#: How long a shutdown waits for the station loop to end the transaction (its
#: off-write has gone out through the trip lane already) before it cancels.
STOP_WAIT = 3.0

#: Restart back-off of the central-system slot (s): doubles up to the cap.
CENTRAL_RESTART_MIN = 1.0
CENTRAL_RESTART_MAX = 60.0


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    port: str
    unit: int
    timeout: float = 0.5
    retries: int = 1


@dataclass(frozen=True)
class Service:
    """A long-lived task from ops/ (control socket, systemd watchdog)."""

    name: str
    run: Callable[[Supervisor], Awaitable[None]]


@dataclass(frozen=True)
class Plan:
    """Everything a station needs to run, already validated."""

    board: DeviceSpec
    meter: DeviceSpec
    store_path: Path
    station: StationSettings
    auth_steps: Sequence[AuthStep]
    rfid: RfidConfig | None = None
    off_deadline: float = 1.0
    services: Sequence[Service] = field(default_factory=tuple)
    #: How long the board and the meter may take to answer at start before the
    #: station gives up with HardwareUnavailable (exit 69: systemd retries).
    start_timeout: float = 10.0


#: Makes the byte link for a port (tests pass an in-memory one).
LinkFactory = Callable[[PortSpec], Link]


class Supervisor:
    def __init__(
        self,
        plan: Plan,
        *,
        central: CentralSystemPort | None = None,
        links: LinkFactory = make_link,
        offload: Offload = trio.to_thread.run_sync,
    ) -> None:
        self._offload = offload
        self.plan = plan
        self.central: CentralSystemPort = central or Standalone()
        self._links = links
        #: Set once the board and the meter have each answered (systemd READY=1).
        self.hardware_ready = trio.Event()
        self.station: Station | None = None
        self.board: Board | None = None
        self.reader: RfidReader | None = None
        self._cancel = trio.CancelScope()
        self.stopped = trio.Event()
        self.started = trio.Event()

    def healthy(self) -> bool:
        """For the systemd watchdog: the station loop has run recently."""
        station = self.station
        if station is None:
            return False
        idle_for = trio.current_time() - station.loop_alive
        # The loop sees at least one meter sample or board change per poll;
        # a loop silent for many poll periods is wedged.
        return idle_for < max(10.0, 20 * self.plan.station.meter_poll) or math.isinf(idle_for)

    async def run(
        self, *, task_status: trio.TaskStatus[Station] = trio.TASK_STATUS_IGNORED
    ) -> None:
        plan = self.plan
        store = await self._offload(Store.open, plan.store_path)
        masters: dict[str, ModbusMaster] = {}
        try:
            for spec in (plan.board, plan.meter):
                url = parse_port(spec.port).url
                if url not in masters:
                    masters[url] = ModbusMaster(
                        self._links(parse_port(url)), timeout=spec.timeout, retries=spec.retries
                    )
            for spec in (plan.board, plan.meter):
                masters[parse_port(spec.port).url].configure_unit(
                    spec.unit, timeout=spec.timeout, retries=spec.retries
                )
            board = Board(
                masters[parse_port(plan.board.port).url],
                plan.board.unit,
                BOARD_MODELS[plan.board.kind],
            )
            meter = Meter(
                masters[parse_port(plan.meter.port).url],
                plan.meter.unit,
                METER_MODELS[plan.meter.kind],
            )
            self.board = board
            station = Station(
                board=board,
                meter=meter,
                store=store,
                auth=AuthChain(plan.auth_steps),
                settings=replace(
                    plan.station,
                    off_deadline=plan.off_deadline,
                    start_timeout=plan.start_timeout,
                ),
                central=self.central,
                offload=self._offload,
            )
            self.station = station
            try:
                with self._cancel:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(station.run, name="station")
                        self.hardware_ready.set()
                        if plan.rfid is not None:
                            reader = RfidReader(
                                plan.rfid, self._on_tag, on_state=self._on_reader_state
                            )
                            self.reader = reader
                            await nursery.start(reader.run, name="rfid reader")
                        nursery.start_soon(self._central_slot, name="central system")
                        for service in plan.services:
                            nursery.start_soon(service.run, self, name=service.name)
                        self.started.set()
                        task_status.started(station)
            finally:
                await self.switch_off(board, store)
        finally:
            for master in masters.values():
                with trio.CancelScope(shield=True):
                    await master.aclose()
            await self._offload(store.close)
            self.stopped.set()

    async def shutdown(self, reason: StopReason = StopReason.REBOOT) -> None:
        """Stop the running transaction with ``reason``, then end the tree."""
        station = self.station
        if station is not None and self.started.is_set():
            with trio.move_on_after(STOP_WAIT):
                await station.request_stop(reason)
        self._cancel.cancel(reason=f"shutdown: {reason.value}")

    def abort(self, reason: str) -> None:
        """End the tree at once, without the orderly stop through the station loop
        (e.g. the loop is wedged): the shielded switch-off still runs."""
        log.critical("aborting: %s", reason)
        self._cancel.cancel(reason=f"abort: {reason}")

    async def _on_tag(self, id_tag: str) -> None:
        # The reader ends its run on an exception from here (a consumer bug
        # must not be hidden), so only an authorization failure is caught.
        if self.station is not None:
            try:
                await self.station.present_id_tag(id_tag, source="rfid")
            except EvseError as exc:
                log.error("tag %s from the reader not handled: %s", id_tag, exc)

    async def _on_reader_state(self, state: ReaderState) -> None:
        # OCPP reports a broken reader as ReaderFailure; the central-system
        # port reads it from here (ops status shows it too).
        if state.ok:
            log.info("RFID reader connected")
        else:
            log.warning("RFID reader unavailable: %s", state.reason)

    async def _central_slot(self) -> None:
        """Run the central-system port; restart it on failure, never fail ourselves."""
        delay = CENTRAL_RESTART_MIN
        while True:
            started = trio.current_time()
            try:
                await self.central.run()
                return
            except Exception:
                log.exception("central-system connection failed; restarting in %.0f s", delay)
            if trio.current_time() - started > CENTRAL_RESTART_MAX:
                delay = CENTRAL_RESTART_MIN
            await trio.sleep(delay)
            delay = min(delay * 2, CENTRAL_RESTART_MAX)

    async def switch_off(self, board: Board, store: Store) -> None:
        """The one switch-off sequence, the last word on every way out (fault,
        exception, cancellation, SIGTERM, a wedged loop): current 0, then the
        board disabled, then its hardware failsafe armed with 0, then the
        transaction record ended.

        Each step runs shielded (a cancellation cannot skip it) under a deadline
        (a dead bus cannot hang the shutdown; systemd would kill us anyway), and
        is guarded: a step that fails or runs out of time is logged critically,
        by name, and the next step still runs. The two bus steps share
        ``off_deadline`` (the configuration checks it covers the board's worst
        case, evse.budget); a step left with less than ``MIN_STEP`` still gets
        that much.
        """
        off_by = trio.current_time() + self.plan.off_deadline
        await self._step("allowed current 0 A", off_by, board.set_current, 0)
        if board.capabilities.enable_switch:
            await self._step("board disabled", off_by, board.set_enabled, False)
        if board.capabilities.failsafe:
            # A board left with its failsafe at the fallback would charge an EV
            # at it, on no transaction, once its watchdog expires. Its own
            # deadline: not part of the off's budget (evse.budget), the watchdog
            # leaves seconds for it.
            await self._step(
                "failsafe current 0 A",
                trio.current_time() + self.plan.off_deadline,
                board.arm_failsafe,
                self.plan.station.failsafe_watchdog,
                0.0,
            )
        await self._step(
            "transaction record ended",
            trio.current_time() + ORPHAN_DEADLINE,
            self._end_orphan,
            store,
        )

    async def _step(
        self, name: str, deadline: float, fn: Callable[..., Awaitable[object]], *args: object
    ) -> None:
        started = trio.current_time()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = max(deadline, started + MIN_STEP)
            try:
                await fn(*args)
            except (FieldbusError, EvseError, ValueError) as exc:
                log.critical("switch-off: %s did not go through: %s", name, exc)
                return
            except Exception:
                log.critical("switch-off: %s did not go through", name, exc_info=True)
                return
        if scope.cancelled_caught:
            log.critical(
                "switch-off: %s did not go through within %.1f s",
                name,
                scope.deadline - started,
            )
        else:
            log.info("switch-off: %s", name)

    async def _end_orphan(self, store: Store) -> None:
        """A transaction the station loop could not end (it crashed): end it as
        Other, with the meter's reading after the off-write when it answers; its
        StopTransaction is queued in the same commit."""
        station = self.station
        cid = self.plan.station.connector_id
        record = await self._offload(store.running_transaction, cid)
        if record is None:
            return
        reading = None
        if station is not None:
            with trio.move_on_after(self.plan.meter.timeout * (1 + self.plan.meter.retries)):
                with contextlib.suppress(FieldbusError):
                    reading = await station.meter.read()
            reading = reading or station.meter_reading
        energy = reading.energy_import_wh if reading is not None else None
        at = reading.timestamp if reading is not None else datetime.now(UTC)
        ended = await self._offload(
            partial(
                store.end_transaction,
                record.id,
                reason=StopReason.OTHER.value,
                meter_stop_wh=energy if energy is not None else record.last_meter_wh,
                stopped_at=at,
                journal=self.central.journal(ending=record.id, stopped_at=at),
            )
        )
        log.error("transaction %d ended as Other after a failure", ended.id)
        with trio.move_on_after(1.0):
            await self.central.transaction_ended(ended)
